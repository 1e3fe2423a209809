"""The serving-side loader refuses tampered, missing or mismatched artifacts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from neuronserve.artifacts import ArtifactError, load_manifest
from neuronserve.backends import BackendKind
from neuronserve.trace import run_trace
from tests.conftest import make_settings


@pytest.fixture
def artifacts(tmp_path: Path, tiny_model: Callable[..., Path]) -> Path:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        trace__backend="cpu",
        trace__cpu_engine="torchscript",
        trace__batch_sizes="1",
        trace__sequence_lengths="16",
    )
    return run_trace(settings, progress=False, emit=lambda _l: None).directory


def test_intact_artifacts_load(artifacts: Path) -> None:
    manifest = load_manifest(artifacts, backend=BackendKind.CPU)
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
        load_manifest(artifacts, backend=BackendKind.NEURONX)


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


def test_artifacts_deploy_verified_are_not_hashed_again_until_they_change(artifacts: Path) -> None:
    from neuronserve.artifacts import artifacts_fingerprint, read_manifest

    fingerprint = artifacts_fingerprint(read_manifest(artifacts))
    assert fingerprint == artifacts_fingerprint(read_manifest(artifacts))
    load_manifest(artifacts, fingerprint=fingerprint)
    # a flipped byte without a write would go unseen (that is the trust), but any write, truncation
    # or replacement changes the fingerprint, and then every file is hashed and the change caught
    path = artifacts / "model-b1-s16.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert artifacts_fingerprint(read_manifest(artifacts)) != fingerprint
    with pytest.raises(ArtifactError, match=r"model-b1-s16\.pt does not match its sha256"):
        load_manifest(artifacts, fingerprint=fingerprint)


def test_small_files_are_hashed_even_with_a_fingerprint(artifacts: Path) -> None:
    from neuronserve.artifacts import artifacts_fingerprint, read_manifest

    fingerprint = artifacts_fingerprint(read_manifest(artifacts))
    (artifacts / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ArtifactError, match=r"vocab\.txt does not match"):
        load_manifest(artifacts, fingerprint=fingerprint)
