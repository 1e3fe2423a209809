"""One server, two models (a tiny embedder and a tiny cross-encoder): which model answers which
request, what each answer and metric says about it, and one failing model failing the server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.backends.cpu import CpuBackend
from neuronserve.config import Settings
from neuronserve.serving.metrics import ServerMetrics
from neuronserve.serving.registry import ModelRegistry
from tests.conftest import make_settings, ready_client, trace_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(embedder artifacts, cross-encoder artifacts)."""
    emb = trace_tiny(tmp_path_factory.mktemp("emb"), trace__sequence_lengths="16,32").directory
    ce = trace_tiny(
        tmp_path_factory.mktemp("ce"), "text-classification", num_labels=1, trace__sequence_lengths="32"
    ).directory
    return emb, ce


def _values(pair: tuple[Path, Path]) -> dict[str, str]:
    return {
        "serve__artifacts": str(pair[0]),
        "serve__cores": "0",
        "models__ce__source": "/unused/when/artifacts/are/given",
        "models__ce__task": "text-classification",
        "models__ce__artifacts": str(pair[1]),
    }


def _settings(tmp_path: Path, pair: tuple[Path, Path]) -> Settings:
    return make_settings(tmp_path, **_values(pair))


@pytest.fixture
def client(tmp_path: Path, pair: tuple[Path, Path]) -> Iterator[TestClient]:
    with ready_client(_settings(tmp_path, pair)) as c:
        yield c


def test_each_route_reaches_the_model_that_suits_it(client: TestClient) -> None:
    emb = client.post("/v1/embeddings", json={"input": "hello"})  # the only embedder
    assert emb.status_code == 200 and emb.headers["x-model"] == "tiny" and emb.json()["model"] == "tiny"
    rerank = client.post("/rerank", json={"query": "q", "texts": ["a", "b"]})  # the only cross-encoder
    assert rerank.status_code == 200 and rerank.headers["x-model"] == "ce"
    for path, body in (("/predict", {"inputs": "hello"}), ("/tokenize", {"inputs": "hello"})):
        unnamed = client.post(path, json=body)
        assert unnamed.status_code == 422, path
        assert unnamed.json()["field"] == "model" and "'tiny', 'ce'" in unnamed.json()["error"]
        for name in ("tiny", "ce"):
            named = client.post(path, json={**body, "model": name})
            assert named.status_code == 200 and named.headers["x-model"] == name
    missing = client.post("/predict", json={"inputs": "x", "model": "nope"})
    assert missing.status_code == 404
    assert "'tiny' (feature-extraction), 'ce' (cross-encoder)" in missing.json()["error"]
    wrong = client.post("/v1/rerank", json={"model": "tiny", "query": "q", "documents": ["a"]})
    assert wrong.status_code == 422 and "'tiny' is a feature-extraction model" in wrong.json()["error"]
    assert client.post("/v1/embeddings", json={"input": "x", "model": "ce"}).status_code == 422
    # v2 and the OpenAI model objects, per model
    for name in ("tiny", "ce"):
        assert client.get(f"/v2/models/{name}/ready").status_code == 200
        assert client.get(f"/v1/models/{name}").json()["id"] == name
    infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    scored = client.post("/v2/models/ce/infer", json=infer)
    assert scored.status_code == 200 and scored.json()["model_name"] == "ce"


def test_ready_info_and_metrics_are_per_model(client: TestClient) -> None:
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and set(ready["models"]) == {"tiny", "ce"}
    assert ready["copies"] == 2 and ready["copies_ready"] == 2
    info = client.get("/info").json()
    assert [(m["name"], m["kind"]) for m in info["models"]] == [
        ("tiny", "feature-extraction"),
        ("ce", "cross-encoder"),
    ]
    assert info["models"][1]["shapes"] == [{"batch_size": 1, "sequence_length": 32}]
    # an error after the model was chosen is counted for that model, and says which one it was
    too_long = client.post("/rerank", json={"query": "q", "texts": ["word " * 100]})
    assert too_long.status_code == 422 and too_long.headers["x-model"] == "ce"
    client.post("/v1/embeddings", json={"input": "hello"})
    samples = [
        s
        for f in text_string_to_metric_families(client.get("/metrics").text)
        for s in f.samples
        if s.name == "neuronserve_requests_total"
    ]
    assert any(s.labels == {"route": "/rerank", "code": "422", "model": "ce"} for s in samples)
    assert any(s.labels == {"route": "/v1/embeddings", "code": "200", "model": "tiny"} for s in samples)
    metrics = client.get("/metrics").text
    assert 'neuronserve_copies_ready{model="ce"} 1.0' in metrics
    assert 'neuronserve_copies_ready{model="tiny"} 1.0' in metrics


def test_a_model_that_cannot_load_fails_the_whole_server(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    load = CpuBackend.load

    def broken_for_ce(self: CpuBackend, artifact: Path, *args: Any) -> Any:
        if artifact.parent == pair[1]:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return load(self, artifact, *args)

    monkeypatch.setattr(CpuBackend, "load", broken_for_ce)
    registry = ModelRegistry(_settings(tmp_path, pair), ServerMetrics("test"))
    fatal: list[str] = []

    async def main() -> None:
        registry.on_fatal = fatal.append
        for engine in registry.engines.values():  # pinned as the server would be, without pinning
            engine.start(threads_per_copy=1)
        deadline = time.monotonic() + 30
        while not fatal:
            assert time.monotonic() < deadline, "the failure was not reported"
            await asyncio.sleep(0.01)  # poll
        assert registry.state == "failed" and registry.draining and not registry.ready
        assert registry.engines["tiny"].draining  # the healthy model drains with it
        registry.close()

    asyncio.run(main())
    assert fatal == ["copy 0 failed to load: RuntimeError: PytorchStreamReader failed reading zip archive"]


def test_the_models_of_a_server_lend_from_one_count_of_its_usable_cpus(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each model has a copy per usable CPU, and one ledger for all of them, so two models'
    batches never run more threads than the server has CPUs; a container's CPU limit caps both
    (a pod may see every CPU of its node)."""
    from neuronserve.backends import cpu

    settings = make_settings(tmp_path, **{**_values(pair), "serve__cores": "0-1"})
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)  # whatever limit this host has
    registry = ModelRegistry(settings, ServerMetrics("test"))
    ledgers = {id(e.ledger) for e in registry.engines.values()}
    first = next(iter(registry.engines.values())).ledger
    assert len(ledgers) == 1 and first is not None and first.cores == 2
    assert [e.copies for e in registry.engines.values()] == [2, 2]
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 1)  # a pod limited to one CPU
    limited = ModelRegistry(settings, ServerMetrics("test"))
    assert [(e.copies, e.ledger.cores if e.ledger else 0) for e in limited.engines.values()] == [
        (1, 1),
        (1, 1),
    ]
