"""The hardware acceptance run, end to end on the cpu backend (all of it that can run here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from neuronserve.acceptance import _throughput
from tests.conftest import REPO
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration


def test_the_acceptance_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "acceptance"
    result = subprocess.run(
        [
            str(REPO / "scripts" / "hardware-acceptance.sh"),
            *("--backend", "cpu", "--model", "bundled:all-MiniLM-L6-v2"),
            *("--concurrency", "1,4", "--duration", "2", "--output", str(out)),
            *("--set", f"deploy.port={free_port()}", "--set", f"deploy.base_port={free_port(8)}"),
            *(
                "--set",
                f"trace.output_dir={tmp_path / 'trace-models'}",
                "--set",
                f"deploy.run_dir={tmp_path / 'run'}",
            ),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = (out / "report.md").read_text()
    assert "result: **passed**" in report
    for step in ("doctor", "trace", "deploy", "load", "cleanup"):
        assert f"| {step} | 0 |" in report
    assert "Best: **" in report and "sequences/s** at concurrency" in report
    assert not (tmp_path / "run" / "acceptance").exists()  # cleaned up


def test_the_ratio_to_aws_published_figure() -> None:
    best = {"rps": 1337.1, "level": 32.0, "latency_ms": {"p95": 40.0}, "mean_batch_size": 7.5}
    lines = _throughput(best, "bert-base-uncased", "inf2.xlarge")
    assert "2674.19 sequences/s; served / published = **0.500**" in "\n".join(lines)
    assert "no ratio" in "\n".join(_throughput(best, "all-MiniLM-L6-v2", "inf2.xlarge"))
