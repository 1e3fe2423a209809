"""Reranking with a cross-encoder (a tiny random one, one output): TEI's /rerank and the
Cohere/Jina /v1/rerank, scores equal to sentence-transformers' CrossEncoder on the same weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from neuronserve.serving.app import create_app
from tests.conftest import make_settings, ready_client, trace_tiny

QUERY = "what is the capital of france"
DOCS = ["paris is the capital of france", "the cat sat on the mat", "berlin is in germany", "a b c"]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, artifacts) of a tiny random cross-encoder: one output."""
    tmp = tmp_path_factory.mktemp("rerank")
    report = trace_tiny(
        tmp, "text-classification", num_labels=1, trace__batch_sizes="1,4", trace__sequence_lengths="32"
    )
    return tmp / "tiny", report.directory


@pytest.fixture
def client(tmp_path: Path, cross_encoder: tuple[Path, Path]) -> Iterator[TestClient]:
    with ready_client(make_settings(tmp_path, serve__artifacts=str(cross_encoder[1]), serve__cores="0")) as c:
        yield c


def _reference(model: Path) -> tuple[np.ndarray, np.ndarray]:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model), device="cpu")
    pairs = [(QUERY, d) for d in DOCS]
    return ce.predict(pairs), ce.predict(pairs, activation_fn=torch.nn.Identity())


def test_tei_rerank_matches_cross_encoder(client: TestClient, cross_encoder: tuple[Path, Path]) -> None:
    scores, logits = _reference(cross_encoder[0])
    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    ranked = r.json()
    assert [x["index"] for x in ranked] == list(np.argsort(-scores, kind="stable"))  # best first
    got = np.array([next(x["score"] for x in ranked if x["index"] == i) for i in range(len(DOCS))])
    assert np.abs(got - scores).max() <= 1e-4
    assert all(x["text"] == DOCS[x["index"]] for x in ranked)
    raw = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    got_raw = np.array([next(x["score"] for x in raw if x["index"] == i) for i in range(len(DOCS))])
    assert np.abs(got_raw - logits).max() <= 1e-4
    assert "text" not in raw[0]


def test_cohere_rerank_matches_cross_encoder(client: TestClient, cross_encoder: tuple[Path, Path]) -> None:
    scores, _ = _reference(cross_encoder[0])
    body = {"model": "tiny", "query": QUERY, "documents": [DOCS[0], {"text": DOCS[1]}, *DOCS[2:]], "top_n": 2,
            "return_documents": True}  # fmt: skip
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    best = list(np.argsort(-scores, kind="stable")[:2])
    assert [x["index"] for x in out["results"]] == best
    for x in out["results"]:
        assert abs(x["relevance_score"] - scores[x["index"]]) <= 1e-4
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert out["model"] == "tiny" and out["usage"]["total_tokens"] > 0
    assert client.post("/v1/rerank", json={**body, "model": "other"}).status_code == 404
    # what Cohere/Jina clients also send is accepted, and a long document is cut as those APIs do
    sent = {"query": QUERY, "documents": [{"text": "word " * 200, "id": "d1"}], "rank_fields": ["text"],
            "max_chunks_per_doc": 1}  # fmt: skip
    assert client.post("/v1/rerank", json=sent).status_code == 200


def test_rerank_refuses_bad_input_with_the_field(client: TestClient) -> None:
    empty = client.post("/rerank", json={"query": QUERY, "texts": []})
    assert empty.status_code == 422 and empty.json()["field"] == "texts"
    blank = client.post("/v1/rerank", json={"query": " ", "documents": ["x"]})
    assert blank.status_code == 422 and blank.json()["field"] == "query"
    too_long = client.post("/rerank", json={"query": QUERY, "texts": ["word " * 200]})
    assert too_long.status_code == 422 and "texts[0]" in too_long.json()["field"]
    cut = client.post("/rerank", json={"query": QUERY, "texts": ["word " * 200], "truncate": True})
    assert cut.status_code == 200


def test_predict_on_a_one_output_model_is_a_sigmoid_not_a_constant(client: TestClient) -> None:
    outputs = client.post("/predict", json={"inputs": DOCS}).json()["outputs"]
    scores = [o[0]["score"] for o in outputs]
    assert len(set(scores)) > 1 and all(0 < s < 1 for s in scores)  # a softmax of one logit is 1.0


def test_rerank_on_an_embedding_model_is_a_clear_404(tmp_path: Path) -> None:
    artifacts = trace_tiny(tmp_path).directory
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0")
    with TestClient(create_app(settings)) as c:
        r = c.post("/rerank", json={"query": "q", "texts": ["t"]})
        assert r.status_code == 404 and "cross-encoder" in r.json()["error"]
