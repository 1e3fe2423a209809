"""Start real neuronserve servers as subprocesses on loopback and wait for readiness by polling."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from neuronserve.deploy.local import _nginx_user, free_ports
from neuronserve.deploy.nginx import render_nginx_conf

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


@contextmanager
def nginx_endpoint(tmp_path: Path, upstreams: list[str], *, max_body_bytes: int = 1048576) -> Iterator[str]:
    """A real nginx on a free port with the endpoint configuration deploy writes, in front of
    ``upstreams``; its URL. Stopped afterwards, workers included (skips without nginx)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (scripts/system-deps.sh nginx): the endpoint cannot run")
    (tmp_path / "logs").mkdir()
    user = _nginx_user()
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "nginx" / kind).mkdir(parents=True)
        if user:
            shutil.chown(tmp_path / "nginx" / kind, "nobody", "nogroup")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        render_nginx_conf(
            listen_host="127.0.0.1",
            listen_port=port,
            upstreams=upstreams,
            run_dir=tmp_path,
            max_body_bytes=max_body_bytes,
            read_timeout_s=10,
            user=user,
        )
    )
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path / "nginx"), "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "nginx exited; see its error log in the run directory"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen in time"
                time.sleep(0.05)  # poll until it listens
        yield f"http://127.0.0.1:{port}"
    finally:
        workers = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
        process.terminate()
        process.wait(timeout=20)
        _gone, alive = psutil.wait_procs(workers, timeout=20)
        assert alive == [], f"nginx workers left behind: {alive}"
