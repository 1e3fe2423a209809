"""What the benches share: the CLI, a cpu trace, a deployment with free ports, and hey."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.servers import free_port

REPO = Path(__file__).resolve().parents[1]


def neuronserve(work: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run ``neuronserve`` with ``work``'s config; its stdout, or exit naming the failure.
    ``env`` adds to the environment; with VIRTUAL_ENV (see :func:`checkout`) it runs that
    environment's interpreter, whose code every process it starts runs too."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    python = (
        str(Path(env["VIRTUAL_ENV"]) / "bin" / "python") if env and "VIRTUAL_ENV" in env else sys.executable
    )
    cmd = [python, "-m", "neuronserve.cli", *args, "--config", str(work / "config.properties")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=environment, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"neuronserve {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


@contextmanager
def checkout(ref: str, work: Path) -> Iterator[dict[str, str]]:
    """Another commit's code for everything a bench starts with it, the servers that deploy
    starts included: a git worktree of ``ref`` and a virtual environment that finds the
    worktree's ``src`` first and this environment's packages after it (PYTHONPATH alone would
    not reach the servers: deploy hands them only a few variables). Yields the environment to
    pass to :func:`neuronserve`; removes both afterwards."""
    tree, venv = work / f"checkout-{ref}", work / f"venv-{ref}"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref],
        check=True,
        capture_output=True,
    )
    try:
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        ours = [p for p in sys.path if p.endswith("site-packages")]
        # The worktree first; this environment's packages after it (its editable install of this
        # checkout is a .pth hook that only this environment's own site directory runs).
        (Path(site) / "checkout.pth").write_text("\n".join([str(tree / "src"), *ours]) + "\n")
        yield {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"}
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(venv, ignore_errors=True)


def trace_cpu(work: Path, output_dir: Path | str, *settings: str, env: dict[str, str] | None = None) -> None:
    """Trace on cpu into ``output_dir``; the tracer's cache compiles only what changed."""
    sets = [
        a for kv in ("trace.backend=cpu", f"trace.output_dir={output_dir}", *settings) for a in ("--set", kv)
    ]
    neuronserve(work, "trace", "--quiet", *sets, env=env)


@dataclass(frozen=True)
class Deployment:
    name: str
    port: int  # the endpoint (nginx)
    ready_s: float  # how long `neuronserve deploy` took to return (every server ready)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def deployed(
    work: Path, artifacts: Path, name: str, *settings: str, env: dict[str, str] | None = None
) -> Iterator[Deployment]:
    """A local deployment of ``artifacts`` on free ports, run directory ``work/run/<name>``,
    no exporter; cleaned up afterwards whatever happened."""
    port, base = free_port(), free_port(os.cpu_count() or 1)
    sets = [
        f"serve.artifacts={artifacts}",
        f"deploy.name={name}",
        f"deploy.run_dir={work / 'run'}",
        f"deploy.port={port}",
        f"deploy.base_port={base}",
        "monitor.enabled=false",
        *settings,
    ]
    args = [a for kv in sets for a in ("--set", kv)]
    started = time.perf_counter()
    neuronserve(work, "deploy", *args, env=env)
    try:
        yield Deployment(name, port, time.perf_counter() - started)
    finally:
        neuronserve(work, "cleanup", *args, check=False, env=env)


@dataclass(frozen=True)
class Hey:
    """One closed-loop run of hey: 200s, other status codes and its wall time."""

    ok: int
    other_codes: dict[str, int]
    seconds: float
    output: str


def hey(url: str, payload: Path, concurrency: int, duration: float) -> Hey:
    """POST ``payload`` (JSON) to ``url`` from ``concurrency`` clients for ``duration`` seconds."""
    tool = shutil.which("hey")
    if tool is None:
        raise SystemExit("hey not found: sudo apt-get install -y hey (the Debian package)")
    started = time.perf_counter()
    result = subprocess.run(
        [tool, "-z", f"{duration}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
         "-D", str(payload), url],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"hey failed: {result.stderr[-2000:]}")
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", result.stdout))
    ok = int(codes.pop("200", 0))
    if ok == 0:
        raise SystemExit(f"no request succeeded:\n{result.stdout[-2000:]}")
    return Hey(ok, {k: int(v) for k, v in codes.items()}, seconds, result.stdout)


def server_rss(run_dir: Path) -> int:
    """Bytes of memory the servers of the local deployment in ``run_dir`` hold: the PSS of
    every server process (gunicorn masters and their workers), so pages a worker shares with its
    master count once."""
    from neuronserve.deploy.local import RunDir, Supervisor, children

    total = 0
    for process in Supervisor(RunDir(run_dir)).processes():
        if not str(process["name"]).startswith("server-") or not process["pid"]:
            continue
        for pid in (int(process["pid"]), *children(int(process["pid"]))):
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            kb = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
            total += kb * 1024
    return total
