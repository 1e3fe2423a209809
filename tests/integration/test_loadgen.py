"""The load client against a real server: agreement with hey, open loop, the report on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuronserve.loadgen.cli import main
from tests.conftest import REPO
from tests.integration.servers import RunningServer, start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(bundled_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(bundled_artifacts, tmp_path_factory.mktemp("lg"), "serve.max_queue=4096") as running:
        yield running


def test_open_loop_report_on_disk(server: RunningServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_apis.py"),
            "--target",
            server.url,
            "--mode",
            "open",
            "--rates",
            "5,10,20",
            "--duration",
            "3",
            "--warmup",
            "0.5",
            "--output",
            str(tmp_path),
            "--name",
            "open",
            "--no-progress",
            "--set",
            "bench.latency_budget_ms=5000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = list(tmp_path.glob("open-*"))
    for name in (
        "requests.csv",
        "summary.json",
        "report.md",
        "throughput_vs_p95.png",
        "latency_percentiles.png",
        "latency_vs_tokens.png",
        "error_rate.png",
    ):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["level"] for s in summary["steps"]] == [5.0, 10.0, 20.0]
    for s in summary["steps"]:  # Poisson arrivals at the offered rate (within sampling noise)
        assert s["rps"] == pytest.approx(s["level"], rel=0.5)
        assert s["error_rate"] == 0.0
    rows = (run_dir / "requests.csv").read_text().splitlines()
    assert len(rows) - 1 == sum(s["requests"] for s in summary["steps"])
    report = (run_dir / "report.md").read_text()
    assert "open-loop latency counts from each request's intended send time" in report
    assert "knee of the latency-throughput curve" in report


def test_budget_stops_the_sweep(server: RunningServer, tmp_path: Path) -> None:
    code = main(
        [
            "--target",
            server.url,
            "--concurrency",
            "1,2,4",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--output",
            str(tmp_path),
            "--name",
            "tight",
            "--no-progress",
            "--set",
            "bench.latency_budget_ms=1",
        ]
    )
    assert code == 0
    summary = json.loads(next(tmp_path.glob("tight-*/summary.json")).read_text())
    assert len(summary["steps"]) == 1
    assert "sweep stopped here" in summary["steps"][0]["notes"][0]
    assert summary["decision"]["best"] is None


def test_processes_share_the_load(server: RunningServer, tmp_path: Path) -> None:
    code = main(
        [
            "--target",
            server.url,
            "--concurrency",
            "4",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--processes",
            "2",
            "--output",
            str(tmp_path),
            "--name",
            "mp",
            "--no-progress",
        ]
    )
    assert code == 0
    (step,) = json.loads(next(tmp_path.glob("mp-*/summary.json")).read_text())["steps"]
    assert step["ok"] > 0 and step["error_rate"] == 0.0
