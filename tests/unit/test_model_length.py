"""How long a model's inputs may be, from its files, and the default grid fitted to it."""

from __future__ import annotations

import json
from pathlib import Path

from neuronserve.models import model_max_length
from neuronserve.trace import DEFAULT_LONGEST, fitted_lengths


def _model(tmp_path: Path, **files: dict[str, object]) -> Path:
    tmp_path.mkdir(parents=True)
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


def test_the_longest_input_comes_from_the_models_own_files(tmp_path: Path) -> None:
    bert = _model(tmp_path / "bert", config={"model_type": "bert", "max_position_embeddings": 512},
                  tokenizer_config={"model_max_length": 1000000000000000019884624838656})  # fmt: skip
    assert model_max_length(bert) == 512  # the tokenizer's sentinel says nothing
    st = _model(tmp_path / "st", config={"model_type": "bert", "max_position_embeddings": 512},
                sentence_bert_config={"max_seq_length": 256})  # fmt: skip
    assert model_max_length(st) == 256  # sentence-transformers' own limit
    # RoBERTa counts positions from pad_token_id + 1: 514 embeddings hold 512 tokens, and a
    # declared max_seq_length never goes beyond them
    roberta = _model(tmp_path / "roberta", config={"model_type": "roberta", "max_position_embeddings": 514,
                     "pad_token_id": 1}, sentence_bert_config={"max_seq_length": 1024})  # fmt: skip
    assert model_max_length(roberta) == 512
    short = _model(
        tmp_path / "short",
        config={"max_position_embeddings": 512},
        tokenizer_config={"model_max_length": 128},
    )
    assert model_max_length(short) == 128
    assert model_max_length(_model(tmp_path / "none", config={})) is None
    (tmp_path / "nothing").mkdir()
    assert model_max_length(tmp_path / "nothing") is None


def test_the_default_grid_reaches_the_models_longest_but_never_beyond_it_or_a_hosts_reach() -> None:
    default = (16, 32, 64, 128)
    assert fitted_lengths(default, 256, extend=True) == (16, 32, 64, 128, 256)
    assert fitted_lengths(default, 8192, extend=True) == (16, 32, 64, 128, DEFAULT_LONGEST)
    assert fitted_lengths(default, 100, extend=True) == (16, 32, 64, 100)
    assert fitted_lengths(default, None, extend=True) == default
    # Neuron (a graph per length): never extended, but a length beyond the model is replaced by its own
    assert fitted_lengths((32, 64, 128), 512, extend=False) == (32, 64, 128)
    assert fitted_lengths((32, 64, 128), 100, extend=False) == (32, 64, 100)
