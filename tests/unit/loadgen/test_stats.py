"""Statistics on synthetic data with known answers; the Poisson schedule; knee and decision."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest

from neuronserve.loadgen.http import Record, poisson_schedule
from neuronserve.loadgen.payloads import PayloadError, TokenCounter, build_payloads, load_texts, parse_buckets
from neuronserve.loadgen.report import compare
from neuronserve.loadgen.stats import (
    Budgets,
    Pricing,
    StepSummary,
    cost_per_million,
    decide,
    knee,
    percentile,
    summarize,
)


def rec(latency_ms: float, error: str = "", server: str = "s0", tokens: int = 10) -> Record:
    return Record(
        0.0, 0.0, latency_ms / 1000, 200 if not error else 503, error, server, 1.0, 5.0, 4, tokens, 1, "t"
    )


def test_nearest_rank_percentiles_of_1_to_100() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 95, 99, 100)] == [50.0, 90.0, 95.0, 99.0, 100.0]
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_population_not_average_of_percentiles() -> None:
    # two "processes": one fast, one slow; the population p50 is not the mean of their p50s
    fast = [rec(10) for _ in range(90)]
    slow = [rec(1000) for _ in range(10)]
    step = summarize([*fast, *slow], mode="closed", level=4, duration_s=10, client_cpu_s=1)
    assert step.latency_ms["p50"] == pytest.approx(10)
    assert step.latency_ms["p95"] == pytest.approx(1000)
    assert step.latency_ms["mean"] == pytest.approx(109)
    assert step.rps == pytest.approx(10)
    assert step.client_cpu_percent == pytest.approx(10)


def test_errors_by_class_and_spread() -> None:
    records = [
        rec(10, server="a"),
        rec(20, server="b"),
        rec(30, server="b"),
        rec(0, "http_503"),
        rec(0, "timeout"),
    ]
    step = summarize(records, mode="closed", level=1, duration_s=1, client_cpu_s=0)
    assert step.errors == {"http_503": 1, "timeout": 1}
    assert step.error_rate == pytest.approx(0.4)
    assert step.per_server["b"] == {"requests": 2, "share": pytest.approx(2 / 3), "p50_ms": pytest.approx(20)}
    assert step.latency_ms["p50"] == pytest.approx(20)  # failures are not latencies


def test_poisson_schedule() -> None:
    times = poisson_schedule(rate=200.0, duration_s=50.0, seed=7)
    assert times == sorted(times) and times[-1] < 50.0
    assert len(times) == pytest.approx(10_000, rel=0.05)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 200, rel=0.05)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 200, rel=0.08)  # exponential: sd == mean
    assert poisson_schedule(200.0, 50.0, seed=7) == times  # seeded, repeatable


def step(level: float, rps: float, p95: float, errors: float = 0.0, cost: float | None = None) -> StepSummary:
    lat = {"mean": p95, "p50": p95 / 2, "p90": p95, "p95": p95, "p99": p95, "max": p95}
    return StepSummary("closed", level, 10, 100, 100, {}, errors, rps, rps, lat, {}, {}, 1.0, {}, 1.0, cost)


def test_knee_of_a_saturating_curve() -> None:
    curve = [
        step(1, 30, 25),
        step(2, 58, 27),
        step(4, 95, 33),
        step(8, 110, 60),
        step(16, 112, 140),
        step(32, 113, 290),
    ]
    # scaled throughput minus scaled p95 peaks at concurrency 8 (0.83): beyond it, +3 req/s
    # costs +230 ms of p95
    assert knee(curve) == 3
    sharp = [step(1, 10, 20), step(2, 20, 21), step(4, 40, 22), step(8, 41, 200), step(16, 41, 400)]
    assert knee(sharp) == 2
    assert knee(curve[:2]) is None


def test_decision_best_within_budgets_and_none() -> None:
    steps = [
        step(1, 30, 25),
        step(4, 95, 33, cost=2.0),
        step(16, 112, 140, cost=1.5),
        step(32, 113, 290, errors=0.05),
    ]
    chosen = decide(steps, Budgets(latency_p95_ms=150, error_rate=0.01, cost_per_million=0))
    assert chosen["best"] == 2
    assert decide(steps, Budgets(latency_p95_ms=50, error_rate=0.01, cost_per_million=0))["best"] == 1
    none = decide(steps, Budgets(latency_p95_ms=10, error_rate=0.01, cost_per_million=0))
    assert none["best"] is None
    assert none["verdict"] == "no step meets every budget"
    assert none["reasons"]["closed 32"] == ["p95 290.0 ms > 10 ms", "error rate 5.00% > 1.00%"]
    cheap = decide(steps, Budgets(latency_p95_ms=1000, error_rate=0.01, cost_per_million=1.8))
    assert cheap["best"] == 2


def test_cost_per_million() -> None:
    pricing = Pricing.load()
    assert pricing.per_hour("inf2.xlarge", 2) == pytest.approx(1.5164)
    assert cost_per_million(100.0, 0.7582) == pytest.approx(0.7582 / 360000 * 1e6)
    assert cost_per_million(0.0, 1.0) is None
    with pytest.raises(ValueError, match="not in the price table"):
        pricing.per_hour("p5.48xlarge", 1)
    assert "2026" in pricing.date and pricing.source


def test_datasets_and_buckets(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n{"text": "one two three four five six"}\n')
    (tmp_path / "d.csv").write_text("id,body\n1,hello there\n")
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\n")
    assert load_texts(str(tmp_path / "d.jsonl"), "text") == ["a b c", "one two three four five six"]
    assert load_texts(str(tmp_path / "d.csv"), "body") == ["hello there"]
    assert load_texts(str(tmp_path / "d.txt"), "text") == ["first line", "second line"]
    with pytest.raises(PayloadError, match="no column 'text'"):
        load_texts(str(tmp_path / "d.csv"), "text")
    buckets = parse_buckets("1-3,4-10")
    words = TokenCounter(None)
    texts = load_texts(str(tmp_path / "d.jsonl"), "text")
    assert [json.loads(p.body)["inputs"] for p in build_payloads(texts, "/predict", words, buckets[0])] == [
        "a b c"
    ]
    assert json.loads(build_payloads(texts, "/v1/embeddings", words)[0].body) == {"input": "a b c"}
    with pytest.raises(PayloadError, match="no input texts in bucket"):
        build_payloads(texts, "/predict", words, parse_buckets("50-60")[0])
    with pytest.raises(PayloadError, match="write ranges"):
        parse_buckets("5-1")


def test_compare_flags_regressions(tmp_path: Path) -> None:
    for name, rps, p95 in (("a", 100.0, 50.0), ("b", 80.0, 70.0)):
        (tmp_path / name).mkdir()
        data = {
            "steps": [
                {"mode": "closed", "level": 4.0, "rps": rps, "latency_ms": {"p95": p95}, "error_rate": 0.0}
            ]
        }
        (tmp_path / name / "summary.json").write_text(json.dumps(data))
    table = compare(tmp_path / "a", tmp_path / "b")
    assert "REGRESSION" in table and "-20.0%" in table and "+40.0%" in table
