"""sentence-transformers prompts: a named or default prompt goes before each text, exactly as
``SentenceTransformer.encode(prompt_name=...)`` does (tiny random model, real engine)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from neuronserve.config import ConfigError
from neuronserve.serving.app import create_app
from tests.conftest import build_tiny_model, make_settings, ready_client

TEXTS = ["the quick brown fox", "a lazy dog sleeps"]
PROMPTS = {"query": "query: ", "doc": "a passage of text: "}  # different lengths: different means


def _sentence_transformers_model(tmp_path: Path) -> Path:
    directory = build_tiny_model(tmp_path / "tiny", "feature-extraction")
    (directory / "modules.json").write_text(
        json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ])
    )  # fmt: skip
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    (directory / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": PROMPTS, "default_prompt_name": "query"})
    )
    return directory


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from neuronserve.trace import run_trace

    tmp = tmp_path_factory.mktemp("prompts")
    model = _sentence_transformers_model(tmp)
    settings = make_settings(
        tmp,
        model__source=str(model),
        trace__backend="cpu",
        trace__batch_sizes="1,4",
        trace__sequence_lengths="32",
    )
    return model, run_trace(settings, progress=False, emit=lambda _line: None).directory


def _client(tmp_path: Path, artifacts: Path, **values: str) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0", **values)
    with ready_client(settings) as client:
        yield client


def _embed(client: TestClient, **body: Any) -> np.ndarray:
    r = client.post("/v1/embeddings", json={"input": TEXTS, **body})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def test_named_and_default_prompts_match_sentence_transformers(
    tmp_path: Path, traced: tuple[Path, Path]
) -> None:
    from sentence_transformers import SentenceTransformer

    model, artifacts = traced
    st = SentenceTransformer(str(model), device="cpu")
    for client in _client(tmp_path, artifacts):
        for name in PROMPTS:
            expected = st.encode(TEXTS, prompt_name=name)
            assert np.abs(_embed(client, prompt_name=name) - expected).max() <= 1e-4
            predicted = client.post("/predict", json={"inputs": TEXTS, "parameters": {"prompt_name": name}})
            assert np.abs(np.array(predicted.json()["outputs"]) - expected).max() <= 1e-4
        # no name: the model's default_prompt_name (query), as sentence-transformers does
        assert np.abs(_embed(client) - st.encode(TEXTS)).max() <= 1e-4
        assert np.abs(_embed(client) - _embed(client, prompt_name="doc")).max() > 1e-3  # prompts matter
        unknown = client.post("/v1/embeddings", json={"input": "x", "prompt_name": "nope"})
        assert unknown.status_code == 422
        assert unknown.json()["field"] == "prompt_name" and "doc, query" in unknown.json()["error"]


def test_the_default_prompt_is_configurable(tmp_path: Path, traced: tuple[Path, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    model, artifacts = traced
    st = SentenceTransformer(str(model), device="cpu")
    for client in _client(tmp_path, artifacts, serve__default_prompt_name="none"):
        assert np.abs(_embed(client) - st.encode(TEXTS, prompt="")).max() <= 1e-4
    for client in _client(tmp_path, artifacts, serve__default_prompt_name="doc"):
        assert np.abs(_embed(client) - st.encode(TEXTS, prompt_name="doc")).max() <= 1e-4
    with pytest.raises(ConfigError, match="prompts are: doc, query"):
        create_app(
            make_settings(tmp_path, serve__artifacts=str(artifacts), serve__default_prompt_name="nope")
        )
