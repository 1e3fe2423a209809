"""``neuronserve top``'s frame: per server, and per model when a deployment serves several."""

from __future__ import annotations

from prometheus_client import generate_latest

from neuronserve.monitor.top import Scrape, frame
from neuronserve.serving.metrics import ServerMetrics


def _scrape(metrics: ServerMetrics, at: float) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    result = Scrape(at)
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            result.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return result


def test_a_deployment_of_two_models_gets_a_row_per_model_summed_over_servers() -> None:
    plan = {"deployment": "d", "backend": "cpu", "host": "127.0.0.1", "port": 8080}
    plan["servers"] = [{"name": "server-0", "cores": "0"}, {"name": "server-1", "cores": "1"}]
    servers = [ServerMetrics(f"s{i}") for i in range(2)]
    for m in servers:
        for model, task in (("emb", "feature-extraction"), ("rr", "text-classification")):
            m.describe_model(model=model, task=task, backend="cpu", cores="0", copies=1)
    before = {f"server-{i}": _scrape(m, 0.0) for i, m in enumerate(servers)}
    for m in servers:  # in 2 s, each server: 6 embeddings (10 ms), 2 reranks (200 ms), one 429 on rr
        for _ in range(6):
            m.answered("/v1/embeddings", 200, 0.01, "emb")
        for _ in range(2):
            m.answered("/rerank", 200, 0.2, "rr")
        m.answered("/rerank", 429, 0.001, "rr")
    after = {f"server-{i}": _scrape(m, 2.0) for i, m in enumerate(servers)}
    text = frame(plan, before, after)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["server-0"][1] == "4.5"  # (6 + 2 + 1) requests / 2 s
    assert rows["emb"][:2] == ["6.0", "10.0"]  # 12 requests / 2 s over both servers, p50 10 ms
    assert rows["rr"][:3] == ["3.0", "250.0", "250.0"]  # p50/p99: the 250 ms bucket's bound
    assert rows["rr"][5] == "1.0"  # err/s: two 429s in 2 s


def test_a_deployment_of_one_model_has_no_model_rows() -> None:
    plan = {"deployment": "d", "backend": "cpu", "host": "127.0.0.1", "port": 8080}
    plan["servers"] = [{"name": "server-0", "cores": "0"}]
    m = ServerMetrics("s0")
    m.describe_model(model="emb", task="feature-extraction", backend="cpu", cores="0", copies=1)
    before = {"server-0": _scrape(m, 0.0)}
    m.answered("/predict", 200, 0.01, "emb")
    text = frame(plan, before, {"server-0": _scrape(m, 1.0)})
    assert "model (all servers)" not in text
