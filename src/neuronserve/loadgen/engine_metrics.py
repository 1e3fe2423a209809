"""The engines' own view of a step: their ``vllm:*`` counters and histograms read before and after
it, summed over every copy, so the report puts the servers' TTFT and inter-token latency beside
the client's and checks the output tokens both counted.

Percentiles come from the histograms' bucket counts as Prometheus' ``histogram_quantile`` does
(linear within the bucket that holds the rank), so they are as coarse as the engine's buckets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = ("vllm:generation_tokens", "vllm:prompt_tokens", "vllm:request_success")
HISTOGRAMS = {
    "ttft_ms": "vllm:time_to_first_token_seconds",
    "itl_ms": "vllm:inter_token_latency_seconds",
    "e2el_ms": "vllm:e2e_request_latency_seconds",
}


@dataclass
class Snapshot:
    counters: dict[str, float] = field(default_factory=dict)  # summed over copies and labels
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # histogram -> le -> count
    reached: int = 0  # copies that answered

    def minus(self, before: Snapshot) -> Snapshot:
        return Snapshot(
            {k: v - before.counters.get(k, 0.0) for k, v in self.counters.items()},
            {
                name: {le: n - before.buckets.get(name, {}).get(le, 0.0) for le, n in les.items()}
                for name, les in self.buckets.items()
            },
            min(self.reached, before.reached),
        )


def scrape(urls: Sequence[str], headers: dict[str, str] | None = None) -> Snapshot:
    """Every copy's metrics now (copies that do not answer are left out and not counted)."""
    snap = Snapshot()
    for url in urls:
        try:
            response = httpx.get(url, timeout=5, headers=headers)
        except httpx.HTTPError:
            continue
        if response.status_code != 200:
            continue
        try:
            families = list(text_string_to_metric_families(response.text))
        except ValueError:  # not Prometheus' text format
            continue
        snap.reached += 1
        for family in families:
            for sample in family.samples:
                name = sample.name.removesuffix("_total")
                if name in COUNTERS and sample.name.endswith("_total"):
                    snap.counters[name] = snap.counters.get(name, 0.0) + sample.value
                elif (
                    sample.name.endswith("_bucket")
                    and sample.name.removesuffix("_bucket") in HISTOGRAMS.values()
                ):
                    hist = snap.buckets.setdefault(sample.name.removesuffix("_bucket"), {})
                    le = float(sample.labels["le"])
                    hist[le] = hist.get(le, 0.0) + sample.value
    return snap


def quantile(buckets: dict[float, float], q: float) -> float:
    """``histogram_quantile(q, ...)`` over cumulative ``buckets`` (le -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    total = buckets[bounds[-1]]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


def summary(delta: Snapshot) -> dict[str, object]:
    """What the engines counted during a step: tokens, successes and latency percentiles (ms)."""
    out: dict[str, object] = {
        "copies": delta.reached,
        "generation_tokens": int(delta.counters.get("vllm:generation_tokens", 0)),
        "prompt_tokens": int(delta.counters.get("vllm:prompt_tokens", 0)),
        "requests": int(delta.counters.get("vllm:request_success", 0)),
    }
    for key, name in HISTOGRAMS.items():
        hist = delta.buckets.get(name, {})
        out[key] = {f"p{q}": quantile(hist, q / 100) * 1000 for q in (50, 90, 95, 99)}
    return out
