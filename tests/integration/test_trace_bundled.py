"""The real bundled all-MiniLM-L6-v2 traced on cpu, and the trace scripts run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuronserve.artifacts import load_manifest
from neuronserve.backends import BackendKind
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_bundled_model_traces_and_verifies(bundled_artifacts: Path) -> None:
    manifest = load_manifest(bundled_artifacts, backend=BackendKind.CPU)
    assert manifest.model["source"] == "bundled:all-MiniLM-L6-v2"
    assert manifest.model["hidden_size"] == 384
    assert [(s.batch_size, s.sequence_length) for s in manifest.shapes] == [
        (1, 32),
        (8, 32),
        (1, 128),
        (8, 128),
    ]
    for entry in manifest.shapes:
        assert entry.output_shapes == {"last_hidden_state": [entry.batch_size, entry.sequence_length, 384]}
        assert entry.verification["min_cosine"] >= 0.9999
        assert entry.verification["max_abs_diff"] < 1e-3
    # sentence-transformers pooling config travels with the artifacts
    assert "1_Pooling/config.json" in manifest.files
    assert "modules.json" in manifest.files


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_cli_rerun_skips_every_shape_quickly(tmp_path: Path, bundled_artifacts: Path) -> None:
    # Reuse the session's artifacts: a config whose output_dir points at them.
    output_dir = bundled_artifacts.parent.parent
    cfg = tmp_path / "config.properties"
    cfg.write_text(
        f"trace.backend=cpu\ntrace.batch_sizes=1,8\ntrace.sequence_lengths=32,128\ntrace.output_dir={output_dir}\n"
    )
    started = time.monotonic()
    result = _cli("trace", "--config", str(cfg), "--quiet", cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("up to date, skipped") == 4
    assert "all 4 shapes up to date" in result.stdout
    assert elapsed < 10, f"re-run took {elapsed:.1f}s"


def test_run_script_without_neuronx_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "NEURONSERVE_TRACE__BACKEND": "neuronx", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(REPO / "trace-model" / "run.sh"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install torch-neuronx" in lines[0]


def test_typo_in_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config.properties"
    cfg.write_text("trace.batch_size=4\n")
    result = _cli("trace", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "did you mean trace.batch_sizes?" in result.stderr


def test_manifest_command_verifies(bundled_artifacts: Path, tmp_path: Path) -> None:
    result = _cli("manifest", str(bundled_artifacts), "--backend", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "checksums: all files verified" in result.stdout
    data = json.loads((bundled_artifacts / "manifest.json").read_text())
    assert data["versions"]["torch"].startswith("2.13")
