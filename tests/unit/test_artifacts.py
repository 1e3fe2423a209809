"""The serving-side loader refuses tampered, missing or mismatched artifacts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from neuronserve.artifacts import ArtifactError, load_manifest
from neuronserve.trace import run_trace
from tests.conftest import make_settings


@pytest.fixture
def artifacts(tmp_path: Path, tiny_model: Callable[..., Path]) -> Path:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        trace__backend="cpu",
        trace__batch_sizes="1",
        trace__sequence_lengths="16",
    )
    return run_trace(settings, progress=False, emit=lambda _l: None).directory


def test_intact_artifacts_load(artifacts: Path) -> None:
    manifest = load_manifest(artifacts, backend="cpu")
    assert manifest.batch_sizes == (1,)
    assert manifest.sequence_lengths == (16,)


def test_flipped_byte_is_refused(artifacts: Path) -> None:
    path = artifacts / "model-b1-s16.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model-b1-s16.pt does not match its sha256"):
        load_manifest(artifacts)


def test_tampered_tokenizer_is_refused(artifacts: Path) -> None:
    (artifacts / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ArtifactError, match=r"vocab\.txt does not match"):
        load_manifest(artifacts)


def test_missing_file_is_refused(artifacts: Path) -> None:
    (artifacts / "model-b1-s16.pt").unlink()
    with pytest.raises(ArtifactError, match=r"model-b1-s16\.pt is missing"):
        load_manifest(artifacts)


def test_wrong_backend_is_refused(artifacts: Path) -> None:
    with pytest.raises(ArtifactError, match="traced for backend cpu, not neuronx"):
        load_manifest(artifacts, backend="neuronx")


def _edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_unchecksummed_shape_file_is_refused(artifacts: Path) -> None:
    _edit_manifest(artifacts, lambda d: d["files"].pop("model-b1-s16.pt"))
    with pytest.raises(ArtifactError, match="not checksummed"):
        load_manifest(artifacts)


def test_other_torch_is_refused(artifacts: Path) -> None:
    _edit_manifest(artifacts, lambda d: d["versions"].update(torch="1.13.1"))
    with pytest.raises(ArtifactError, match=r"traced with torch 1\.13\.1"):
        load_manifest(artifacts)


def test_unreadable_manifest_is_refused(artifacts: Path) -> None:
    (artifacts / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        load_manifest(artifacts)


def test_no_manifest(tmp_path: Path, artifacts: Path) -> None:
    shutil.copytree(artifacts, tmp_path / "copy")
    (tmp_path / "copy" / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="run `neuronserve trace` first"):
        load_manifest(tmp_path / "copy")


def test_a_manifest_deploy_verified_is_checked_by_size(artifacts: Path) -> None:
    from neuronserve.artifacts import manifest_sha256

    verified = manifest_sha256(artifacts)
    load_manifest(artifacts, verified_sha256=verified)
    path = artifacts / "model-b1-s16.pt"
    path.write_bytes(path.read_bytes()[:-1])  # truncated after deploy verified it: still caught
    with pytest.raises(ArtifactError, match=r"model-b1-s16\.pt does not have its recorded size"):
        load_manifest(artifacts, verified_sha256=verified)
    # small files are still hashed; and a manifest that changed since is verified in full
    with pytest.raises(ArtifactError, match=r"does not match its sha256"):
        load_manifest(artifacts, verified_sha256="0" * 64)
    (artifacts / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ArtifactError, match=r"vocab\.txt does not match"):
        load_manifest(artifacts, verified_sha256=verified)
