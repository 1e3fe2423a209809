"""A user's own model by hub id, offline: a Hugging Face cache laid out as the hub client leaves it
(refs/main naming a snapshot of a small model), served with one command,
`neuronserve serve --model org/name`, which traces what is missing and serves it; an id the
cache does not have is refused in one line that names the command to fetch it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import build_tiny_model
from tests.integration.servers import free_port, wait_ready

pytestmark = pytest.mark.integration

COMMIT = "4f3c2b1a" * 5


def _hub_cache(root: Path, repo: str, model: Path) -> Path:
    """``root`` laid out as huggingface_hub's cache holding ``repo`` at main."""
    home = root / f"models--{repo.replace('/', '--')}"
    snapshot = home / "snapshots" / COMMIT
    shutil.copytree(model, snapshot)
    (home / "refs").mkdir(parents=True)
    (home / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_cached_hub_id_is_traced_and_served_with_one_command_offline(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", "feature-extraction")
    _hub_cache(tmp_path / "hub", "acme/tiny-embedder", model)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "config.properties").write_text(f"trace.output_dir={tmp_path / 'trace-models'}\n")
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "neuronserve.cli", "serve", "--model", "acme/tiny-embedder", "--port", str(port),
               "--api-key", "k3y", "--mode", "uvicorn", "--quiet", "--config", str(tmp_path / "config.properties")]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, log, timeout_s=300)
        headers = {"Authorization": "Bearer k3y"}
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["hello there"]}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        served = np.array(answer.json()["data"][0]["embedding"])
        assert served.shape == (32,) and np.isfinite(served).all()
        assert httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["x"]}).status_code == 401
        # traced from the cached snapshot, under the id's name
        assert (tmp_path / "trace-models" / "tiny-embedder" / "cpu" / "manifest.json").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    missing = subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", "serve", "--model", "acme/not-cached", "--port", str(free_port()),
         "--quiet", "--config", str(tmp_path / "config.properties")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert missing.returncode == 1
    errors = [line for line in missing.stderr.splitlines() if line.startswith("neuronserve:")]
    assert (
        len(errors) == 1 and "`hf download acme/not-cached`" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    ), missing.stderr
    assert "Traceback" not in missing.stderr
