"""Start real neuronserve servers as subprocesses on loopback and wait for readiness by polling."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_TIMEOUT_S = 180.0


# Below Linux's ephemeral range (32768-60999): the kernel never gives these to an outgoing
# connection, so a port found free stays free for the server that binds it a moment later.
_PORTS = (20000, 32000)


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive free loopback ports (a deployment's base_port needs
    one per server)."""
    rng = random.Random()
    for _ in range(1000):
        first = rng.randrange(_PORTS[0], _PORTS[1] - count)
        if all(_bindable(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports in {_PORTS}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # poll interval, not synchronisation: readiness is what we wait for
    raise TimeoutError(f"server not ready after {timeout_s}s:\n{log.read_text()[-4000:]}")


@contextmanager
def start_server(
    artifacts: Path, tmp: Path, *settings: str, mode: str = "uvicorn", copies: int = 2
) -> Iterator[RunningServer]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    args = [sys.executable, "-m", "neuronserve.cli", "serve", "--mode", mode, "--port", str(port)]
    args += ["--artifacts", str(artifacts), "--copies", str(copies)]
    for item in settings:
        args += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield RunningServer(url, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
