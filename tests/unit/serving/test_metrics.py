"""Metrics updated in bulk export exactly what one update per value would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from neuronserve.serving.metrics import LATENCY_BUCKETS, ServerMetrics, observe_many


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=registry)


def _samples(registry: CollectorRegistry) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if not line.startswith("h_seconds_created")
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_observe_many_matches_observing_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    # Values on bucket bounds, between them, below the first and above the last.
    values = [rng.choice(LATENCY_BUCKETS) for _ in range(20)] + [rng.uniform(0, 40) for _ in range(40)]
    values += [0.0, 1e-6, 31.0, float(LATENCY_BUCKETS[0])]
    # The bulk path, not its fallback: the client library still has the internals it updates.
    assert all(hasattr(_histogram()[1], a) for a in ("_upper_bounds", "_buckets", "_sum"))
    one_registry, one = _histogram()
    for v in values:
        one.observe(v)
    bulk_registry, bulk = _histogram()
    observe_many(bulk, values[:30])
    observe_many(bulk, values[30:])
    observe_many(bulk, [])
    bulk_lines, one_lines = _samples(bulk_registry), _samples(one_registry)
    sums = [
        float(next(x for x in lines if x.startswith("h_seconds_sum ")).split()[1])
        for lines in (bulk_lines, one_lines)
    ]
    assert sums[0] == pytest.approx(sums[1], rel=1e-12)  # summed in another order
    assert [x for x in bulk_lines if not x.startswith("h_seconds_sum ")] == [
        x for x in one_lines if not x.startswith("h_seconds_sum ")
    ]


def test_answered_and_batch_ran_export_the_series_labelled_by_model() -> None:
    m = ServerMetrics("s")
    for _ in range(3):
        m.answered("/predict", 200, 0.004, "emb")
    m.answered("/predict", 429, 0.0001, "rr")
    m.answered("/predict", 401, 0.0001)  # refused before a model was chosen
    m.for_model("emb").batch_ran(
        1,
        shape=(8, 32),
        padded_length=32,
        lengths=[10, 32, 7, 20, 3],
        seconds=0.02,
        queued=[0.001, 0.002, 0.003, 0.004, 0.2],
    )
    # a trimmed call (padded to 16 of its compiled 32) computed what it padded to
    m.for_model("emb").batch_ran(1, shape=(1, 32), padded_length=16, lengths=[12], seconds=0.01, queued=[0.0])
    rr = m.for_model("rr")
    rr.rejected("queue_full")
    text = generate_latest(m.registry).decode()
    assert 'neuronserve_requests_total{code="200",model="emb",route="/predict"} 3.0' in text
    assert 'neuronserve_requests_total{code="429",model="rr",route="/predict"} 1.0' in text
    assert 'neuronserve_requests_total{code="401",model="",route="/predict"} 1.0' in text
    assert 'neuronserve_request_duration_seconds_count{model="emb",route="/predict"} 3.0' in text
    assert 'neuronserve_copy_items_total{copy="1",model="emb"} 6.0' in text
    assert 'neuronserve_copy_inferences_total{copy="1",model="emb"} 2.0' in text
    assert 'neuronserve_padding_rows_total{model="emb"} 3.0' in text
    # padding efficiency per shape: real tokens over the tokens each call computed
    assert 'neuronserve_real_tokens_total{model="emb",shape="b8s32"} 72.0' in text
    assert 'neuronserve_padded_tokens_total{model="emb",shape="b8s32"} 256.0' in text
    assert 'neuronserve_real_tokens_total{model="emb",shape="b1s32"} 12.0' in text
    assert 'neuronserve_padded_tokens_total{model="emb",shape="b1s32"} 16.0' in text
    assert 'neuronserve_queue_duration_seconds_count{model="emb"} 6.0' in text
    assert 'neuronserve_queue_duration_seconds_bucket{le="0.0025",model="emb"} 3.0' in text
    assert 'neuronserve_rejections_total{model="rr",reason="queue_full"} 1.0' in text
    # every model's reasons exist from the start, so rates and panels do too
    assert 'neuronserve_rejections_total{model="emb",reason="deadline"} 0.0' in text
