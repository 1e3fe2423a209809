"""nginx's own answers (a body over the limit, a malformed request, no server) are JSON in the
servers' error shape, from the endpoint configuration deploy writes, on a real nginx."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from neuronserve.deploy.local import _nginx_user
from neuronserve.deploy.nginx import render_nginx_conf
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration
LIMIT = 4096


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
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
            upstreams=[f"127.0.0.1:{free_port()}"],  # nothing listens there: no server
            run_dir=tmp_path,
            max_body_bytes=LIMIT,
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


def _raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_nginx_answers_in_the_servers_json_shape(endpoint: str) -> None:
    big = httpx.post(
        f"{endpoint}/predict", content=b"x" * (8 * LIMIT), headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and big.headers["content-type"] == "application/json"
    assert big.json() == {
        "error": f"body: more than {LIMIT} bytes exceed serve.max_body_bytes ({LIMIT} bytes); send fewer or "
        "shorter inputs per request",
        "type": "payload_too_large",
        "field": "body",
    }
    down = httpx.post(f"{endpoint}/predict", json={"inputs": "hi"})
    assert (
        down.status_code == 503
        and down.json()["type"] == "unavailable"
        and down.headers["retry-after"] == "1"
    )
    long_uri = httpx.get(f"{endpoint}/{'a' * 20000}")
    assert long_uri.status_code == 414 and long_uri.json()["type"] == "invalid_request"
    status, headers, body = _raw(endpoint, b"NOT A REQUEST\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json", body
    assert httpx.Response(status, content=body).json()["type"] == "invalid_request"
    huge_header = {"x-big": "b" * 40000}
    too_large = httpx.get(f"{endpoint}/ready", headers=huge_header)
    assert too_large.status_code == 431 and too_large.json()["type"] == "invalid_request"
