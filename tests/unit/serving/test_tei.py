"""TEI's routes on a real engine with tiny random models: ``POST /embed``, ``POST /`` by the
model's kind, ``POST /decode`` and ``/info``'s TEI fields, against the model's own outputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import make_settings, ready_client, trace_tiny

KEY = "s3cret"
TEXTS = ["the cat sat on the mat", "paris is the capital of france"]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trace_tiny(tmp_path_factory.mktemp("tei-embed"), trace__sequence_lengths="16,64").directory  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    report = trace_tiny(
        tmp_path_factory.mktemp("tei-classify"),
        "text-classification",
        trace__batch_sizes="1,4",
        trace__sequence_lengths="16,64",
    )
    return report.directory  # type: ignore[no-any-return]


@contextmanager
def _client(tmp_path: Path, artifacts: Path, **values: str) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0", **values)
    with ready_client(settings) as client:
        yield client


def _logits(model: Path, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(model).eval()
    encoded = tokenizer(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():
        return net(**encoded).logits.numpy()  # type: ignore[no-any-return]


def test_embed_answers_tei_shapes(tmp_path: Path, embedder: Path) -> None:
    with _client(tmp_path, embedder) as client:
        native = np.array(client.post("/predict", json={"inputs": TEXTS}).json()["outputs"])
        answer = client.post("/embed", json={"inputs": TEXTS})
        assert answer.status_code == 200, answer.text
        vectors = np.array(answer.json())
        assert vectors.shape == (2, 32)
        # TEI normalises by default; the direction is the model's own
        unit = native / np.linalg.norm(native, axis=1, keepdims=True)
        assert np.allclose(vectors, unit, atol=1e-5)
        raw = np.array(client.post("/embed", json={"inputs": TEXTS[0], "normalize": False}).json())
        assert raw.shape == (1, 32) and np.allclose(raw[0], native[0], atol=1e-5)
        short = np.array(client.post("/embed", json={"inputs": TEXTS, "dimensions": 8}).json())
        assert short.shape == (2, 8) and np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
        # the root dispatches to /embed for an embedding model
        assert np.allclose(np.array(client.post("/", json={"inputs": TEXTS}).json()), vectors, atol=1e-6)
        left = client.post("/embed", json={"inputs": "hi", "truncation_direction": "Left"})
        assert left.status_code == 422 and left.json()["field"] == "truncation_direction"
        wide = client.post("/embed", json={"inputs": "hi", "dimensions": 33})
        assert wide.status_code == 422 and "at most 32" in wide.json()["error"]


def test_embed_refuses_a_long_input_with_advice_that_works(tmp_path: Path, embedder: Path) -> None:
    long = " ".join(["cat"] * 30)  # 90 tokens
    with _client(tmp_path, embedder) as client:
        refused = client.post("/embed", json={"inputs": long})
        assert refused.status_code == 422, refused.text
        assert '"truncate": true' in refused.json()["error"]
        followed = client.post("/embed", json={"inputs": long, "truncate": True})
        assert followed.status_code == 200 and followed.headers["x-truncated-inputs"] == "1"
    with _client(tmp_path, embedder, serve__auto_truncate="true") as client:
        cut = client.post("/embed", json={"inputs": long})
        assert cut.status_code == 200 and cut.headers["x-truncated-inputs"] == "1"


def test_root_classifies_as_tei_and_as_the_inference_api(tmp_path: Path, classifier: Path) -> None:
    model = classifier.parent.parent.parent / "tiny"
    logits = _logits(model, TEXTS)
    probs = torch.softmax(torch.tensor(logits), dim=-1).numpy()
    with _client(tmp_path, classifier) as client:
        one = client.post("/", json={"inputs": TEXTS[0]})
        assert one.status_code == 200, one.text
        got = one.json()  # TEI: one input, a list of every label, best first
        assert [p["label"] for p in got] == [f"LABEL_{chr(65 + i)}" for i in np.argsort(-probs[0])]
        assert np.allclose([p["score"] for p in got], np.sort(probs[0])[::-1], atol=1e-5)
        batch = client.post("/", json={"inputs": [[t] for t in TEXTS], "raw_scores": True}).json()
        assert len(batch) == 2 and all(len(b) == 3 for b in batch)
        for row, expected in zip(batch, logits, strict=True):
            by_label = {p["label"]: p["score"] for p in row}
            assert np.allclose([by_label[f"LABEL_{chr(65 + i)}"] for i in range(3)], expected, atol=1e-4)
        # a [text, text_pair] list is one input of two segments, as TEI reads it
        pair_logits = _logits(model, [TEXTS[0]], [TEXTS[1]])[0]
        pair = client.post("/", json={"inputs": TEXTS, "raw_scores": True}).json()
        assert np.isclose(pair[0]["score"], pair_logits.max(), atol=1e-4)
        # the Inference API's shape (InferenceClient): always a list of lists, top_k honoured
        api = client.post("/", json={"inputs": TEXTS[0], "parameters": {"top_k": 2}}).json()
        assert len(api) == 1 and len(api[0]) == 2 and api[0][0]["label"] == got[0]["label"]
        wrong = client.post("/", json={"inputs": "x", "parameters": {"function_to_apply": "sigmoid"}})
        assert wrong.status_code == 422 and wrong.json()["field"] == "parameters.function_to_apply"
        three = client.post("/", json={"inputs": ["a", "b", "c"]})
        assert three.status_code == 422 and three.json()["field"].startswith("inputs")
        assert client.post("/embed", json={"inputs": "x"}).status_code == 404  # not an embedding model
        # the document says what POST / takes from this server: a classifier's body, not embed's
        root = client.get("/openapi.json").json()["paths"]["/"]["post"]
        assert root["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ClassifyRequest"
        )


def test_decode_inverts_tokenize(tmp_path: Path, embedder: Path) -> None:
    with _client(tmp_path, embedder) as client:
        tokens = client.post("/tokenize", json={"inputs": TEXTS}).json()
        ids = [[t["id"] for t in row] for row in tokens]
        assert client.post("/decode", json={"ids": ids}).json() == TEXTS
        one = client.post("/decode", json={"ids": ids[0], "skip_special_tokens": False}).json()
        assert one[0].startswith("[CLS]") and one[0].endswith("[SEP]")
        bad = client.post("/decode", json={"ids": [1, 10**6]})
        assert bad.status_code == 422 and bad.json()["field"] == "ids[0][1]"


def test_info_is_open_with_teis_fields_and_settings_only_with_the_key(tmp_path: Path, embedder: Path) -> None:
    with _client(tmp_path, embedder, serve__api_key=KEY, serve__auto_truncate="true") as client:
        open_info = client.get("/info")
        assert open_info.status_code == 200
        info = open_info.json()
        assert info["model_type"] == {"embedding": {"pooling": "mean"}}
        assert info["max_input_length"] == 64 and info["auto_truncate"] is True
        assert info["max_client_batch_size"] > 0 and info["version"] and info["model_id"]
        assert "settings" not in info and "artifacts" not in info and "artifacts" not in info["models"][0]
        keyed = client.get("/info", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert keyed["settings"]["serve"]["api_key"] == "***" and keyed["artifacts"] == str(embedder)
        assert client.post("/embed", json={"inputs": "x"}).status_code == 401  # inference keeps the key
