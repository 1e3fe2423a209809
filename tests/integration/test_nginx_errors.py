"""nginx's own answers (a body over the limit, a malformed request, no server) are JSON in the
servers' error shape, from the endpoint configuration deploy writes, on a real nginx."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.servers import free_port, nginx_endpoint

pytestmark = pytest.mark.integration
LIMIT = 4096


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    # nothing listens at the upstream: no server
    with nginx_endpoint(tmp_path, [f"127.0.0.1:{free_port()}"], max_body_bytes=LIMIT) as url:
        yield url


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
