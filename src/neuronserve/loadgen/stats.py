"""Statistics of a load run: population percentiles, per-step summaries, cost, knee, decision.

Percentiles are nearest-rank over every successful request of a step (the population), never
averages of per-window or per-process percentiles. Throughput counts successful requests over
the measured window.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from neuronserve.loadgen.http import Record


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100); NaN for no values."""
    if not sorted_values:
        return math.nan
    if q <= 0:
        return sorted_values[0]
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


@dataclass
class StepSummary:
    """Figures of one step (one concurrency level or one rate)."""

    mode: str
    level: float
    duration_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    error_rate: float
    rps: float
    items_per_s: float
    latency_ms: dict[str, float]
    server_queue_ms: dict[str, float]
    server_inference_ms: dict[str, float]
    mean_batch_size: float
    per_server: dict[str, dict[str, float]]
    client_cpu_percent: float
    cost_per_million: float | None = None
    notes: list[str] = field(default_factory=list)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def summarize(
    records: Sequence[Record], *, mode: str, level: float, duration_s: float, client_cpu_s: float
) -> StepSummary:
    ok = [r for r in records if not r.error]
    lat = sorted(r.latency_s * 1000.0 for r in ok)
    errors = Counter(r.error for r in records if r.error)
    queue = sorted(_finite([r.queue_ms for r in ok]))
    infer = sorted(_finite([r.inference_ms for r in ok]))
    per_server: dict[str, dict[str, float]] = {}
    for server in sorted({r.server for r in ok}):
        mine = sorted(r.latency_s * 1000.0 for r in ok if r.server == server)
        per_server[server] = {
            "requests": len(mine),
            "share": len(mine) / len(ok),
            "p50_ms": percentile(mine, 50),
        }
    return StepSummary(
        mode=mode,
        level=level,
        duration_s=duration_s,
        requests=len(records),
        ok=len(ok),
        errors=dict(errors),
        error_rate=(len(records) - len(ok)) / len(records) if records else 0.0,
        rps=len(ok) / duration_s if duration_s else 0.0,
        items_per_s=sum(r.items for r in ok) / duration_s if duration_s else 0.0,
        latency_ms={
            "mean": statistics.fmean(lat) if lat else math.nan,
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "max": lat[-1] if lat else math.nan,
        },
        server_queue_ms={
            "mean": statistics.fmean(queue) if queue else math.nan,
            "p50": percentile(queue, 50),
        },
        server_inference_ms={
            "mean": statistics.fmean(infer) if infer else math.nan,
            "p50": percentile(infer, 50),
        },
        mean_batch_size=statistics.fmean([r.batch_size for r in ok]) if ok else math.nan,
        per_server=per_server,
        client_cpu_percent=100.0 * client_cpu_s / duration_s if duration_s else 0.0,
    )


@dataclass(frozen=True)
class Pricing:
    prices: dict[str, float]
    source: str
    date: str

    @classmethod
    def load(cls, path: Path | None = None) -> Pricing:
        text = (
            path.read_text()
            if path
            else resources.files("neuronserve").joinpath("data/pricing.json").read_text()
        )
        data = json.loads(text)
        return cls({k: float(v) for k, v in data["prices"].items()}, str(data["source"]), str(data["date"]))

    def per_hour(self, instance_type: str, count: int) -> float:
        if instance_type not in self.prices:
            raise ValueError(
                f"bench.instance_type {instance_type!r} is not in the price table; known: {', '.join(self.prices)}"
            )
        return self.prices[instance_type] * count


def cost_per_million(rps: float, dollars_per_hour: float) -> float | None:
    """Dollars per million successful requests at ``rps``; None when nothing succeeded."""
    if rps <= 0:
        return None
    return dollars_per_hour / (rps * 3600.0) * 1e6


def knee(steps: Sequence[StepSummary]) -> int | None:
    """Index of the step where the latency-throughput curve bends (Kneedle on the difference curve).

    With throughput and p95 latency each scaled to [0, 1] across the steps, the knee is the step
    where throughput has gained the most relative to latency: after it, each step buys less
    throughput for more latency. Needs at least three steps with successes.
    """
    usable = [
        (i, s.rps, s.latency_ms["p95"])
        for i, s in enumerate(steps)
        if s.ok and not math.isnan(s.latency_ms["p95"])
    ]
    if len(usable) < 3:
        return None
    xs, ys = [u[1] for u in usable], [u[2] for u in usable]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    scores = [((x - min(xs)) / x_span) - ((y - min(ys)) / y_span) for x, y in zip(xs, ys, strict=True)]
    return usable[max(range(len(scores)), key=lambda k: (scores[k], -k))][0]


@dataclass(frozen=True)
class Budgets:
    latency_p95_ms: float
    error_rate: float
    cost_per_million: float  # 0 means no cost budget


def violations(step: StepSummary, budgets: Budgets) -> list[str]:
    out = []
    if step.ok == 0:
        out.append("no successful request")
    elif step.latency_ms["p95"] > budgets.latency_p95_ms:
        out.append(f"p95 {step.latency_ms['p95']:.1f} ms > {budgets.latency_p95_ms:g} ms")
    if step.error_rate > budgets.error_rate:
        out.append(f"error rate {step.error_rate:.2%} > {budgets.error_rate:.2%}")
    if budgets.cost_per_million > 0 and (
        step.cost_per_million is None or step.cost_per_million > budgets.cost_per_million
    ):
        cost = "n/a" if step.cost_per_million is None else f"${step.cost_per_million:.2f}"
        out.append(f"cost {cost}/M > ${budgets.cost_per_million:g}/M")
    return out


def decide(steps: Sequence[StepSummary], budgets: Budgets) -> dict[str, Any]:
    """The step with the highest throughput inside every budget, or why none qualifies."""
    qualifying = [(i, s) for i, s in enumerate(steps) if not violations(s, budgets)]
    if not qualifying:
        reasons = {f"{s.mode} {s.level:g}": violations(s, budgets) for s in steps}
        return {"best": None, "verdict": "no step meets every budget", "reasons": reasons}
    index, best = max(qualifying, key=lambda t: (t[1].rps, -t[0]))
    return {
        "best": index,
        "verdict": f"{best.mode} {best.level:g}: {best.rps:.1f} req/s at p95 {best.latency_ms['p95']:.1f} ms",
        "reasons": {},
    }


def to_json(steps: Sequence[StepSummary]) -> list[dict[str, Any]]:
    return [asdict(s) for s in steps]
