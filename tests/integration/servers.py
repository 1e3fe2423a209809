"""Start real neuronserve servers as subprocesses on loopback and wait for readiness by polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from neuronserve.deploy.local import free_ports

READY_TIMEOUT_S = 180.0


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    return free_ports(count)


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
    artifacts: Path,
    tmp: Path,
    *settings: str,
    mode: str = "uvicorn",
    copies: int = 2,
    env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """A server on a free port, ready; ``env`` adds to the environment it runs in."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    args = [sys.executable, "-m", "neuronserve.cli", "serve", "--mode", mode, "--port", str(port)]
    args += ["--artifacts", str(artifacts), "--copies", str(copies)]
    for item in settings:
        args += ["--set", item]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=tmp)
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


@contextmanager
def tei_client(url: str, api_key: str | None = None) -> Iterator[Any]:
    """huggingface_hub's InferenceClient for ``url``. While the hub is offline (HF_HUB_OFFLINE,
    which the tests set) the client refuses every request, a loopback one too: lifted for the
    block's calls only."""
    from huggingface_hub import InferenceClient, constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield InferenceClient(base_url=url, api_key=api_key)
    finally:
        constants.HF_HUB_OFFLINE = saved
