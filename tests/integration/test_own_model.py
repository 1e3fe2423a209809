"""A user's own model by hub id, offline: a Hugging Face cache laid out as the hub client leaves it
(refs/main naming a snapshot of links into blobs), served with one command,
`neuronserve serve --model org/name`, which traces what is missing and serves it; an id the
cache does not have is refused in one line that names the command to fetch it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import HUB_COMMIT, build_tiny_model, hub_cache
from tests.integration.servers import free_port, tei_client, wait_ready

pytestmark = pytest.mark.integration


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_cached_hub_id_is_traced_and_served_with_one_command_offline(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", "feature-extraction")
    hub_cache(tmp_path / "hub", "acme/tiny-embedder", model)
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
        # a TEI client: huggingface_hub's InferenceClient (POST /, normalised as TEI does)
        with tei_client(f"http://127.0.0.1:{port}", api_key="k3y") as client:
            tei = client.feature_extraction("hello there")
        assert tei.shape == (1, 32) and _cos(tei[0], served) >= 0.9999
        info = httpx.get(f"http://127.0.0.1:{port}/info").json()  # open: TEI's fields, no settings
        assert info["model_id"] == "acme/tiny-embedder" and "settings" not in info
        assert info["model_sha"] == HUB_COMMIT  # the snapshot it was traced from
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


def test_a_classifier_directory_answers_the_tei_client_as_the_model_does(tmp_path: Path) -> None:
    """``neuronserve serve --model DIR --task text-classification`` and InferenceClient's
    text_classification: every label, scored as the model's own softmax of its logits."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = build_tiny_model(tmp_path / "classifier", "text-classification")
    text = "the cat sat on the mat"
    with torch.no_grad():
        encoded = AutoTokenizer.from_pretrained(model)([text], return_tensors="pt")
        logits = AutoModelForSequenceClassification.from_pretrained(model).eval()(**encoded).logits[0]
    expected = dict(zip([f"LABEL_{c}" for c in "ABC"], torch.softmax(logits, dim=-1).tolist(), strict=True))
    (tmp_path / "config.properties").write_text(f"trace.output_dir={tmp_path / 'trace-models'}\n")
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "neuronserve.cli", "serve", "--model", str(model), "--task", "text-classification",
               "--port", str(port), "--mode", "uvicorn", "--quiet", "--config", str(tmp_path / "config.properties")]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, log, timeout_s=300)
        with tei_client(f"http://127.0.0.1:{port}") as client:
            labels = client.text_classification(text)
        assert len(labels) == 3 and labels[0].score >= labels[1].score >= labels[2].score
        for label in labels:
            assert abs(label.score - expected[label.label]) <= 1e-5
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_a_changed_revision_is_not_deployed_from_the_old_trace(tmp_path: Path) -> None:
    """The manifest records a hub model's id, revision and snapshot commit; deploy refuses
    artifacts traced at another revision than model.revision says."""
    hub_cache(
        tmp_path / "hub", "acme/tiny-embedder", build_tiny_model(tmp_path / "tiny", "feature-extraction")
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    config = tmp_path / "config.properties"
    config.write_text(
        "model.source=acme/tiny-embedder\nmodel.revision=main\ntrace.backend=cpu\ntrace.batch_sizes=1\n"
        f"trace.sequence_lengths=16\ntrace.output_dir={tmp_path / 'trace-models'}\n"
        f"deploy.run_dir={tmp_path / 'run'}\n"
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "neuronserve.cli", *args, "--config", str(config)],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
        )  # fmt: skip

    traced = cli("trace", "--runner", "local", "--quiet")
    assert traced.returncode == 0, traced.stderr
    manifest = json.loads((tmp_path / "trace-models" / "tiny-embedder" / "cpu" / "manifest.json").read_text())
    assert {k: manifest["model"][k] for k in ("source", "revision", "commit")} == {
        "source": "acme/tiny-embedder",
        "revision": "main",
        "commit": HUB_COMMIT,
    }
    assert cli("deploy", "--dry-run").returncode == 0
    moved = cli("deploy", "--dry-run", "--set", "model.revision=v2")
    assert moved.returncode == 1
    errors = [line for line in moved.stderr.splitlines() if line.startswith("neuronserve:")]
    assert len(errors) == 1 and "acme/tiny-embedder@main" in errors[0] and "@v2" in errors[0], moved.stderr
    assert "trace again" in errors[0] and "Traceback" not in moved.stderr
