"""Installing neuronserve next to a torch that is already there (a Neuron host, a DLC image)
leaves that torch alone; the cpu install pins its own through constraints/cpu.txt."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _site_packages(venv: Path) -> Path:
    relative = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / relative


def test_the_neuron_host_install_keeps_the_torch_it_finds(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # A torch other than the cpu pin, as torch-neuronx brings it (only its metadata: what pip
    # resolves against; nothing here imports it).
    dist = _site_packages(venv) / "torch-2.9.0+cpu.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.0+cpu\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    report = tmp_path / "report.json"
    # The documented Neuron-host command (README "Neuron hosts"), as a dry run with a report.
    result = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--report", str(report), str(REPO)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "neuronserve" in planned
    assert "torch" not in planned, planned["torch"]  # the torch that was there stays
    shown = subprocess.run([*pip, "show", "torch"], capture_output=True, text=True, check=True).stdout
    assert "Version: 2.9.0+cpu" in shown


def test_the_cpu_install_pins_the_local_cpu_wheel() -> None:
    constraints = (REPO / "constraints" / "cpu.txt").read_text().split("\n")
    assert "torch==2.13.0" in constraints
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints/cpu.txt torch" in makefile and "-c constraints/cpu.txt -e '.[dev]'" in makefile
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch>=1.13",' in pyproject and "torch==" not in pyproject
