"""`neuronserve tune` end to end on a tiny model: real traces, real deployments (supervisord,
nginx, gunicorn) one at a time, the real load client; and Ctrl-C in the middle of a trial."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuronserve.config import load_settings
from neuronserve.deploy import local
from tests.conftest import REPO, build_tiny_model

pytestmark = pytest.mark.integration


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    model = build_tiny_model(tmp_path / "tiny", "feature-extraction")
    config = tmp_path / "config.properties"
    config.write_text(
        "\n".join([
            f"model.source={model}",
            "trace.backend=cpu",
            "trace.batch_sizes=1,4",
            "trace.sequence_lengths=16,32",
            "trace.output_dir=trace",
            "bench.output_dir=results",
            f"deploy.run_dir={tmp_path / 'run'}",
            "deploy.name=t",
            "bench.latency_budget_ms=2000",
        ]) + "\n"
    )  # fmt: skip
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "near",
        "the",
        "river",
        "bank",
    ]
    dataset = tmp_path / "traffic.txt"
    dataset.write_text("\n".join(" ".join(words[: 3 + i % 10]) for i in range(40)) + "\n")
    return config, dataset


def _as_a_terminal_runs_it() -> None:
    """Ctrl-C's default: a job started in the background by a non-interactive shell (as CI may
    start the tests) inherits SIGINT ignored, and so would the tune."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _tune(config: Path, dataset: Path, budget: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "neuronserve.cli", "tune", "--config", str(config), "--dataset", str(dataset),
         "--time-budget", str(budget)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
        preexec_fn=_as_a_terminal_runs_it,  # noqa: PLW1509 - one signal call, before exec
    )  # fmt: skip


def _listening() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _ours(tmp_path: Path) -> list[int]:
    """Processes carrying a run-dir marker under tmp_path (servers, supervisord's programs)."""
    marker = f"{local.RUN_DIR_MARKER}={tmp_path}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(v.startswith(marker) for v in (entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_tune_writes_a_report_and_a_config_that_deploys_as_it_is(tmp_path: Path) -> None:
    config, dataset = _setup(tmp_path)
    process = _tune(config, dataset, 60)
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out
    results = next((tmp_path / "results").glob("tune-*"))
    report = (results / "report.md").read_text()
    assert "## Winner" in report and "## Every trial" in report
    assert (results / "pareto.png").stat().st_size > 0
    tuned = results / "tuned.properties"
    settings = load_settings(tuned)
    # the tuned grid lives in its own directory, and the file works from anywhere
    assert settings.trace.output_dir == str(tmp_path / "trace" / "tuned")
    assert settings.model.source == str(tmp_path / "tiny")
    assert max(settings.trace.sequence_lengths) == 32
    dry = subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", "deploy", "--dry-run", "--config", str(tuned)],
        capture_output=True, text=True, cwd="/", env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "server-0" in dry.stdout  # the plan of the winner's layout, from the file alone
    assert not list((tmp_path / "run").glob("t-tune*"))
    assert not _ours(tmp_path)


def test_ctrl_c_in_a_trial_stops_it_cleanly_and_writes_the_report(tmp_path: Path) -> None:
    config, dataset = _setup(tmp_path)
    before = _listening()
    process = _tune(config, dataset, 600)
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    # Wait until one trial has finished and the next one's deployment is up.
    while not any(line.startswith("  rung 1 |") for line in lines):
        assert time.monotonic() < deadline, "no trial finished:\n" + "".join(lines)
        line = process.stdout.readline()
        assert line, "tune ended early:\n" + "".join(lines)
        lines.append(line)
    while not _ours(tmp_path):
        assert time.monotonic() < deadline, "the next trial never deployed"
        time.sleep(0.05)  # poll for the next trial's servers
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    try:
        rest, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        # What still runs, then the tune's own account; kill it so that no pipe or process
        # outlives this test and fails another one.
        still = subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(process.pid)],
                               capture_output=True, text=True, check=False).stdout  # fmt: skip
        os.killpg(process.pid, signal.SIGKILL)
        for pid in _ours(tmp_path):  # its deployment runs in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        rest, _ = process.communicate()  # a retried communicate returns what the first one read too
        pytest.fail(
            f"tune did not end within 180 s of Ctrl-C; still running:\n{still}\n{''.join(lines)}{rest}"
        )
    assert process.returncode == 130, "".join(lines) + rest
    results = next((tmp_path / "results").glob("tune-*"))
    report = (results / "report.md").read_text()
    assert "interrupted" in report
    assert "| 1 |" in report  # the finished trial is in it
    assert not list((tmp_path / "run").glob("t-tune*"))
    assert not _ours(tmp_path)
    assert _listening() <= before
