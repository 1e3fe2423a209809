"""Figures of a generative step, its cost, the knee and the decision under budgets.

Per step (see :mod:`~neuronserve.loadgen.sse` for the per-request definitions):

- ``ttft_ms``, ``tpot_ms``, ``itl_ms``, ``e2el_ms``: mean and percentiles (linear between ranks,
  as the other clients compute them) over every successful request (ITL: over every gap of every
  successful request);
- output token throughput = all output tokens / duration; request throughput = completed /
  duration; transactions per minute = completed / duration x 60;
- goodput = requests meeting every given SLO (``ttft``, ``tpot``, ``e2el`` in ms) / duration;
- ``ms_per_output_token``: each request's E2EL / its output tokens (JumpStart's latency figure);
- cost per 1M output tokens = 1e6 / output tokens/s / 3600 x price per hour; per 10k
  transactions = 1e4 / requests/s / 3600 x price per hour.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from neuronserve.loadgen.sse import StreamRecord

QUANTILES = (50, 90, 95, 99)


def linear_percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolated between the two nearest ranks (numpy's
    default, which vLLM's client, genai-perf and LLMPerf use: a median of an even count is the
    mean of the middle two, which matters for the bimodal TTFTs of synchronised streams)."""
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(v for v in values if not math.isnan(v))
    out = {"mean": statistics.fmean(ordered) if ordered else math.nan}
    out |= {f"p{q}": linear_percentile(ordered, q) for q in QUANTILES}
    out["max"] = ordered[-1] if ordered else math.nan
    return out


@dataclass(frozen=True)
class Slo:
    """Per-request objectives for goodput (0: none)."""

    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    e2el_ms: float = 0.0

    def met(self, r: StreamRecord) -> bool:
        checks = (
            (self.ttft_ms, r.ttft_s * 1000),
            (self.tpot_ms, 0.0 if math.isnan(r.tpot_s) else r.tpot_s * 1000),
            (self.e2el_ms, r.e2el_s * 1000),
        )
        return r.ok and all(not limit or value <= limit for limit, value in checks)

    @property
    def given(self) -> bool:
        return bool(self.ttft_ms or self.tpot_ms or self.e2el_ms)


@dataclass
class GenStep:
    mode: str
    level: float
    duration_s: float
    requests: int
    completed: int
    errors: dict[str, int]
    error_rate: float
    request_throughput: float
    transactions_per_minute: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens: int
    prompt_tokens_per_s: float
    prompt_tokens_mean: float
    output_tokens_mean: float
    tokens_from: dict[str, int]
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    ms_per_output_token: dict[str, float]
    goodput_per_s: float | None
    cost_per_million_output_tokens: float | None = None
    cost_per_10k_transactions: float | None = None
    server: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def summarize(
    records: Sequence[StreamRecord],
    *,
    mode: str,
    level: float,
    duration_s: float,
    slo: Slo,
    dollars_per_hour: float | None,
) -> GenStep:
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    rps = len(ok) / duration_s
    tokens_per_s = output / duration_s
    step = GenStep(
        mode=mode,
        level=level,
        duration_s=duration_s,
        requests=len(records),
        completed=len(ok),
        errors=dict(Counter(r.error for r in records if r.error)),
        error_rate=(len(records) - len(ok)) / len(records) if records else 0.0,
        request_throughput=rps,
        transactions_per_minute=rps * 60,
        output_tokens=output,
        output_tokens_per_s=tokens_per_s,
        prompt_tokens=prompt,
        prompt_tokens_per_s=prompt / duration_s,
        prompt_tokens_mean=prompt / len(ok) if ok else math.nan,
        output_tokens_mean=output / len(ok) if ok else math.nan,
        tokens_from=dict(Counter(r.tokens_from for r in ok)),
        ttft_ms=spread([r.ttft_s * 1000 for r in ok]),
        tpot_ms=spread([r.tpot_s * 1000 for r in ok]),
        itl_ms=spread([gap * 1000 for r in ok for gap in r.itl_s]),
        e2el_ms=spread([r.e2el_s * 1000 for r in ok]),
        ms_per_output_token=spread([r.e2el_s * 1000 / r.output_tokens for r in ok if r.output_tokens]),
        goodput_per_s=sum(1 for r in records if slo.met(r)) / duration_s if slo.given else None,
    )
    if dollars_per_hour is not None:
        if tokens_per_s > 0:
            step.cost_per_million_output_tokens = 1e6 / tokens_per_s / 3600 * dollars_per_hour
        if rps > 0:
            step.cost_per_10k_transactions = 1e4 / rps / 3600 * dollars_per_hour
    return step


@dataclass(frozen=True)
class GenBudgets:
    ttft_p95_ms: float  # 0: none
    tpot_p95_ms: float  # 0: none; also the per-token latency the knee is read against
    error_rate: float


def violations(step: GenStep, budgets: GenBudgets) -> list[str]:
    out = []
    if step.completed == 0:
        return ["no successful request"]
    if budgets.ttft_p95_ms and step.ttft_ms["p95"] > budgets.ttft_p95_ms:
        out.append(f"p95 TTFT {step.ttft_ms['p95']:.0f} ms > {budgets.ttft_p95_ms:g} ms")
    if budgets.tpot_p95_ms and step.tpot_ms["p95"] > budgets.tpot_p95_ms:  # NaN (1-token answers): none
        out.append(f"p95 TPOT {step.tpot_ms['p95']:.1f} ms > {budgets.tpot_p95_ms:g} ms")
    if step.error_rate > budgets.error_rate:
        out.append(f"error rate {step.error_rate:.2%} > {budgets.error_rate:.2%}")
    return out


def knee(steps: Sequence[GenStep], per_token_budget_ms: float) -> int | None:
    """The last step before per-token latency (p50 TPOT) crosses ``per_token_budget_ms`` (the
    JumpStart knee; None when even the first step is over it), else, with no budget or every
    step within it, the Kneedle point of output tokens/s against p50 TPOT (where each step starts
    to buy less throughput for more latency)."""
    usable = [(i, s) for i, s in enumerate(steps) if s.completed and not math.isnan(s.tpot_ms["p50"])]
    if per_token_budget_ms:
        within = [i for i, s in usable if s.tpot_ms["p50"] <= per_token_budget_ms]
        if usable and not within:
            return None  # every step is over the budget: no knee below it
        if len(within) < len(usable):
            return within[-1]
    if len(usable) < 3:
        return None
    xs = [s.output_tokens_per_s for _, s in usable]
    ys = [s.tpot_ms["p50"] for _, s in usable]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    scores = [(x - min(xs)) / x_span - (y - min(ys)) / y_span for x, y in zip(xs, ys, strict=True)]
    return usable[max(range(len(scores)), key=lambda k: (scores[k], -k))][0]


def decide(steps: Sequence[GenStep], budgets: GenBudgets, *, by_goodput: bool) -> dict[str, Any]:
    """The step with the most output tokens/s (or goodput) inside every budget, or why none."""
    qualifying = [(i, s) for i, s in enumerate(steps) if not violations(s, budgets)]
    if not qualifying:
        reasons = {f"{s.mode} {s.level:g}": violations(s, budgets) for s in steps}
        return {"best": None, "verdict": "no step meets every budget", "reasons": reasons}

    def score(item: tuple[int, GenStep]) -> tuple[float, int]:
        s = item[1]
        return ((s.goodput_per_s or 0.0) if by_goodput else s.output_tokens_per_s, -item[0])

    index, best = max(qualifying, key=score)
    goodput = f", goodput {best.goodput_per_s:.2f} req/s" if best.goodput_per_s is not None else ""
    return {
        "best": index,
        "verdict": (
            f"{best.mode} {best.level:g}: {best.output_tokens_per_s:.1f} output tokens/s{goodput} at p95 TTFT "
            f"{best.ttft_ms['p95']:.0f} ms, p95 TPOT {best.tpot_ms['p95']:.1f} ms"
        ),
        "reasons": {},
    }


def to_json(steps: Sequence[GenStep]) -> list[dict[str, Any]]:
    return [asdict(s) for s in steps]
