"""The RAG pair in one deployment: the bundled MiniLM embedder and a tiny cross-encoder, traced,
planned, deployed and cleaned up with the CLI as a user runs it, and called through nginx with
the clients people use (openai, tritonclient) and TEI's and Cohere's rerank shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import build_tiny_model, run_cli
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

MINILM = "all-MiniLM-L6-v2"
QUERY = "what is the capital of france"
DOCS = ["paris is the capital of france", "the cat sat on the mat", "berlin is in germany", "a b c"]


def _config(tmp_path: Path, bundled_artifacts: Path, reranker: Path) -> Path:
    config = tmp_path / "config.properties"
    config.write_text(
        "\n".join(
            [
                "trace.backend=cpu",
                "trace.batch_sizes=1,8",
                "trace.sequence_lengths=32,128",
                # MiniLM is already traced there at this grid: trace finds it up to date
                f"trace.output_dir={bundled_artifacts.parent.parent}",
                "serve.models_per_server=1",
                "deploy.name=ragpair",
                f"deploy.run_dir={tmp_path / 'run'}",
                f"deploy.port={free_port()}",
                f"deploy.base_port={free_port(4)}",
                "deploy.servers=1",
                "monitor.enabled=false",
                f"models.reranker.source={reranker}",
                "models.reranker.task=text-classification",
                "models.reranker.batch_sizes=1,4",
                "models.reranker.sequence_lengths=64",
                "",
            ]
        )
    )
    return config


def _cross_encoder(model: Path) -> tuple[np.ndarray, np.ndarray]:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model), device="cpu")
    pairs = [(QUERY, d) for d in DOCS]
    return ce.predict(pairs), ce.predict(pairs, activation_fn=torch.nn.Identity())


def test_one_deployment_serves_an_embedder_and_a_reranker(tmp_path: Path, bundled_artifacts: Path) -> None:
    import openai
    import tritonclient.http as httpclient
    from tokenizers import Tokenizer

    reranker = build_tiny_model(tmp_path / "ce", "text-classification", num_labels=1)
    config = _config(tmp_path, bundled_artifacts, reranker)
    args = ("--config", str(config))

    traced = run_cli("trace", "--runner", "local", *args, cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert "== model all-MiniLM-L6-v2 ==" in traced.stdout and "== model reranker ==" in traced.stdout
    minilm_part = traced.stdout.split("== model reranker ==")[0]
    assert "all 4 shapes up to date" in minilm_part  # cached per model: nothing recompiled
    assert (bundled_artifacts.parent.parent / "reranker" / "cpu" / "manifest.json").is_file()

    dry = run_cli("deploy", "--dry-run", *args, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"{MINILM}:1 reranker:1" in dry.stdout  # the plan's copies, per model
    assert "every server holding every model" in dry.stdout  # the memory plan counts both
    assert f"  {MINILM}: weights" in dry.stdout and "  reranker: weights" in dry.stdout

    deployed = run_cli("deploy", *args, cwd=tmp_path)
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    url = deployed.stdout.split("ready: ")[1].split()[0]
    try:
        # OpenAI: both models listed; embeddings with Matryoshka truncation
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list()} == {MINILM, "reranker"}
        full = client.embeddings.create(model=MINILM, input=DOCS)
        short = client.embeddings.create(model=MINILM, input=DOCS, dimensions=128)
        for whole, cut in zip(full.data, short.data, strict=True):
            head = np.array(whole.embedding[:128])
            assert len(cut.embedding) == 128
            assert np.linalg.norm(cut.embedding) == pytest.approx(1.0, abs=1e-5)
            assert np.allclose(cut.embedding, head / np.linalg.norm(head), atol=1e-5)
        with pytest.raises(openai.UnprocessableEntityError):  # the reranker makes no embeddings
            client.embeddings.create(model="reranker", input="x")

        # tritonclient: the repository index lists both, ready
        triton = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        index = triton.get_model_repository_index()
        assert {(m["name"], m["state"]) for m in index} == {(MINILM, "READY"), ("reranker", "READY")}

        scores, logits = _cross_encoder(reranker)
        with httpx.Client(base_url=url, timeout=60) as http:
            # TEI's /rerank names no model: the one cross-encoder here answers
            tei = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True})
            assert tei.status_code == 200, tei.text
            assert tei.headers["x-model"] == "reranker"
            got = {x["index"]: x["score"] for x in tei.json()}
            assert max(abs(got[i] - logits[i]) for i in range(len(DOCS))) <= 1e-4
            cohere = http.post("/v1/rerank", json={"model": "reranker", "query": QUERY, "documents": DOCS})
            assert cohere.status_code == 200, cohere.text
            results = cohere.json()["results"]
            assert [r["index"] for r in results] == list(np.argsort(-scores, kind="stable"))
            assert max(abs(r["relevance_score"] - scores[r["index"]]) for r in results) <= 1e-4
            wrong = http.post("/v1/rerank", json={"model": MINILM, "query": QUERY, "documents": DOCS})
            assert wrong.status_code == 422 and wrong.json()["field"] == "model"

            # /tokenize per model agrees with each model's own tokenizer
            for name in (MINILM, "reranker"):
                served = (
                    bundled_artifacts if name == MINILM else bundled_artifacts.parent.parent / name / "cpu"
                )
                tokenizer = Tokenizer.from_file(str(served / "tokenizer.json"))
                tokenizer.no_padding()
                tokens = http.post("/tokenize", json={"model": name, "inputs": DOCS[0]}).json()[0]
                assert [t["id"] for t in tokens] == tokenizer.encode(DOCS[0]).ids

            # /predict: several models, so it needs a name; with one, each model answers its task
            unnamed = http.post("/predict", json={"inputs": "hello"})
            assert unnamed.status_code == 422 and unnamed.json()["field"] == "model"
            assert "several" in unnamed.json()["error"]
            label = http.post("/predict", json={"model": "reranker", "inputs": "hello"})
            assert label.status_code == 200 and label.headers["x-model"] == "reranker"
            assert http.post("/predict", json={"model": "nope", "inputs": "x"}).status_code == 404

            # each server's metrics carry both models
            info = http.get("/info").json()
            assert [m["name"] for m in info["models"]] == [MINILM, "reranker"]
        plan = json.loads((tmp_path / "run" / "ragpair" / "plan.json").read_text())
        server_port = plan["servers"][0]["port"]
        metrics = httpx.get(f"http://127.0.0.1:{server_port}/metrics").text
        models = {
            s.labels.get("model")
            for f in text_string_to_metric_families(metrics)
            for s in f.samples
            if s.name == "neuronserve_requests_total"
        }
        assert {MINILM, "reranker"} <= models

        # the operator's commands against the same deployment: status, and the load client
        status = run_cli("status", *args, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert re.search(r"^server-0\s+RUNNING\s+yes\s", status.stdout, re.MULTILINE), status.stdout
        results = tmp_path / "results"
        bench = run_cli(
            "bench", "--concurrency", "4", "--duration", "3", "--warmup", "0.5", "--model", MINILM,
            "--route", "/v1/embeddings", "--output", str(results), "--no-progress", *args, cwd=tmp_path,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr
        (summary,) = results.glob("bench-*/summary.json")
        (step,) = json.loads(summary.read_text())["steps"]
        assert step["level"] == 4 and step["ok"] > 0 and step["errors"] == {}, step
    finally:
        cleaned = run_cli("cleanup", *args, cwd=tmp_path)
    assert cleaned.returncode == 0, cleaned.stderr
    assert "stopped deployment 'ragpair'" in cleaned.stdout
