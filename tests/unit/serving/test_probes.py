"""Probes (/health, /ready and the v2 health routes) answer while every copy is stuck in a batch
and the queue is full: they are answered before the body, the API key and the routing, and read
state nobody locks. Real app and engine, tiny cpu model, the copy held by a gate."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.serving.copies import CopyWorker
from tests.conftest import make_settings, ready_client, trace_tiny


def test_probes_answer_while_the_copy_is_stuck_and_the_queue_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = trace_tiny(tmp_path).directory
    settings = make_settings(
        tmp_path,
        serve__artifacts=str(artifacts),
        serve__cores="0",
        serve__models_per_server="1",
        serve__max_queue="2",
        serve__max_batch_size="1",
        serve__api_key="secret",
    )
    gate = threading.Event()
    running = threading.Event()
    real_run = CopyWorker._run

    def held(self: CopyWorker, batch: Any) -> Any:
        running.set()
        gate.wait(60)
        return real_run(self, batch)

    auth = {"Authorization": "Bearer secret"}
    with ready_client(settings) as client:
        monkeypatch.setattr(CopyWorker, "_run", held)
        with cf.ThreadPoolExecutor(3) as pool:
            # one request in the copy, two queued: the queue (2 inputs) is full
            stuck = [pool.submit(client.post, "/predict", json={"inputs": "a b"}, headers=auth)]
            assert running.wait(30), "the copy never took the first batch"
            stuck += [
                pool.submit(client.post, "/predict", json={"inputs": "a b"}, headers=auth) for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while _queue_depth(client.get("/metrics").text) < 2:
                assert time.monotonic() < deadline, "the queue never filled"
                time.sleep(0.01)  # poll until both queued requests are in
            try:
                refused = client.post("/predict", json={"inputs": "a"}, headers=auth)
                # no API key, no body: probes need neither
                health = client.get("/health")
                ready = client.get("/ready")
                v2_live = client.get("/v2/health/live")
                v2_ready = client.get("/v2/health/ready")
            finally:
                gate.set()
            answers = [f.result(timeout=60) for f in stuck]
        metrics = client.get("/metrics").text
    assert refused.status_code == 429
    assert (health.status_code, health.json()) == (200, {"status": "alive"})
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    assert (v2_live.status_code, v2_live.json()) == (200, {"live": True})
    assert (v2_ready.status_code, v2_ready.json()) == (200, {"ready": True})
    assert health.headers["x-request-id"] and health.headers["x-server"]
    assert [a.status_code for a in answers] == [200, 200, 200]
    counted = {
        s.labels["route"]: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "neuronserve_requests_total" and s.labels["code"] == "200"
    }
    assert counted["/health"] == 1 and counted["/ready"] >= 2  # ready_client polled it too


def _queue_depth(metrics: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "neuronserve_queue_depth"
    )
