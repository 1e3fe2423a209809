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


def neuronserve(work: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run ``neuronserve`` with ``work``'s config; its stdout, or exit naming the failure.
    ``env`` adds to the environment (PYTHONPATH runs another checkout's code)."""
    cmd = [sys.executable, "-m", "neuronserve.cli", *args, "--config", str(work / "config.properties")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=environment, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"neuronserve {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


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
