"""Shared fixtures: settings builders, tiny random models, and the traced bundled model."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from neuronserve.config import Settings, build_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# Words of the built-in sample texts, so tiny tokenizers produce real, varied token ids.
_WORDS = [
    "the",
    "a",
    "is",
    "of",
    "to",
    "and",
    "in",
    "on",
    "at",
    "for",
    "by",
    "with",
    "that",
    "it",
    "are",
    "be",
    "as",
    "this",
    "from",
    "or",
    "not",
    "when",
    "so",
    "which",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "paris",
    "capital",
    "france",
    "largest",
    "city",
    "where",
    "company",
    "based",
    "new",
    "york",
    "huggingface",
    "what",
    "do",
    "inferentia",
    "chips",
    "run",
    "transformer",
    "encoders",
    "low",
    "cost",
    "per",
    "inference",
    "who",
    "why",
    "sky",
    "blue",
    "hi",
    "static",
    "shapes",
    "mean",
    "every",
    "request",
    "padded",
    "compiled",
    "sequence",
    "length",
    "batch",
    "size",
    "batcher",
    "picks",
    "smallest",
    "bucket",
    "fits",
    "short",
    "texts",
    "pay",
    "long",
    "ones",
    "bounded",
    "queue",
    "turns",
    "overload",
    "into",
    "fast",
    "honest",
    "responses",
    "instead",
    "timeouts",
    "sentence",
    "embeddings",
    "map",
    "text",
    "vectors",
    "whose",
    "cosine",
    "similarity",
    "tracks",
    "meaning",
    "dynamic",
    "batching",
    "groups",
    "requests",
    "arrive",
    "together",
    "one",
    "call",
    "model",
    "monitoring",
    "exports",
    "neuroncore",
    "utilization",
    "latency",
    "percentiles",
    "errors",
    "prometheus",
    "grafana",
    "draws",
    "them",
    "next",
    "rate",
    "depth",
    "server",
    "deployment",
    "its",
]


def run_cli(*args: str, cwd: Path = REPO) -> Any:
    """``neuronserve <args>`` in a subprocess, as a user runs it; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", *args], capture_output=True, text=True, check=False, cwd=cwd
    )


def make_settings(tmp_path: Path, **values: str) -> Settings:
    """Settings from ``section__key=value`` keyword arguments, relative to ``tmp_path``."""
    raw = {k.replace("__", "."): (v, "test") for k, v in values.items()}
    return build_settings(raw, base_dir=tmp_path)


def _write_tokenizer(directory: Path, token_types: bool) -> None:
    from transformers import BertTokenizer

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(_WORDS)), *letters]
    vocab += [f"##{c}" for c in letters]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    names = (
        ["input_ids", "token_type_ids", "attention_mask"] if token_types else ["input_ids", "attention_mask"]
    )
    # transformers 5 takes the vocabulary as ``vocab`` (a vocab_file argument is ignored, and
    # the tokenizer then knows its five special tokens only)
    tok = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_input_names=names)
    tok.save_pretrained(directory)


def build_tiny_model(directory: Path, task: str, *, token_types: bool = True, num_labels: int = 3) -> Path:
    """A randomly initialised 2-layer BERT for ``task`` saved with its tokenizer."""
    import torch
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertModel,
    )

    directory.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(directory, token_types)
    vocab_size = len((directory / "vocab.txt").read_text().split())
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label={i: f"LABEL_{chr(65 + i)}" for i in range(num_labels)},
        label2id={f"LABEL_{chr(65 + i)}": i for i in range(num_labels)},
    )
    if task == "question-answering":
        config.num_labels = 2  # start and end logits
    torch.manual_seed(0)
    classes = {
        "feature-extraction": BertModel,
        "text-classification": BertForSequenceClassification,
        "question-answering": BertForQuestionAnswering,
    }
    model = classes[task](config)
    model.save_pretrained(directory)
    return directory


HUB_COMMIT = "4f3c2b1a" * 5


def hub_cache(root: Path, repo: str, model: Path, commit: str = HUB_COMMIT) -> Path:
    """``root`` laid out as huggingface_hub's cache leaves ``repo`` at main: the files in
    ``blobs/``, the snapshot ``snapshots/<commit>/`` of relative links to them, ``refs/main``.
    Returns the snapshot."""
    import hashlib
    import os

    home = root / f"models--{repo.replace('/', '--')}"
    snapshot = home / "snapshots" / commit
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        blob = home / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.read_bytes())
        link = snapshot / path.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (home / "refs").mkdir(parents=True)
    (home / "refs" / "main").write_text(commit)
    return snapshot


def trace_tiny(
    tmp_path: Path, task: str = "feature-extraction", *, num_labels: int = 3, **values: str
) -> Any:
    """Trace a tiny random model for ``task`` on cpu (grid b1 x s16 unless ``values`` say
    otherwise; the model is in ``tmp_path/tiny``); returns the TraceReport."""
    from neuronserve.trace import run_trace

    grid = {"trace__batch_sizes": "1", "trace__sequence_lengths": "16", **values}
    model_dir = build_tiny_model(tmp_path / "tiny", task, num_labels=num_labels)
    settings = make_settings(
        tmp_path, model__source=str(model_dir), model__task=task, trace__backend="cpu", **grid
    )
    return run_trace(settings, progress=False, emit=lambda _line: None)


@contextmanager
def ready_client(settings: Settings, timeout_s: float = 60.0) -> Iterator[Any]:
    """An in-process server for ``settings`` (a FastAPI TestClient), once /ready answers 200."""
    from fastapi.testclient import TestClient

    from neuronserve.serving.app import create_app

    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + timeout_s
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.01)  # poll readiness
        yield client


@pytest.fixture
def tiny_model() -> Callable[..., Path]:
    """Factory: ``tiny_model(dir, task, token_types=True)`` builds a tiny random model there."""
    return build_tiny_model


@pytest.fixture(scope="session")
def bundled_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled all-MiniLM-L6-v2 traced on cpu at b1,b8 x s32,s128 (once per session)."""
    from neuronserve.trace import run_trace

    base = tmp_path_factory.mktemp("bundled")
    settings = make_settings(
        base,
        trace__backend="cpu",
        trace__batch_sizes="1,8",
        trace__sequence_lengths="32,128",
    )
    report = run_trace(settings, progress=False, emit=lambda _line: None)
    return report.directory
