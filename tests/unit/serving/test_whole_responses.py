"""Each response reaches the socket in one write, so a worker killed mid-response never leaves
nginx holding headers without their body (nginx could then neither finish nor retry it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import HTTP_PROTOCOLS, Config
from uvicorn.importer import import_from_string
from uvicorn.server import ServerState

from neuronserve.serving.worker import Worker, whole_responses


class _Socket:
    """The transport uvicorn writes to: it records each write, as the kernel would see them."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8081), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    body = b'{"ok":true}'
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": body})


def _connect(protocol_class: type[asyncio.Protocol], sock: _Socket, app: Any = _app) -> Any:
    """A connection as uvicorn's server makes one (must run inside the event loop)."""
    config = Config(app=app, http=protocol_class, lifespan="off", log_config=None, access_log=False)
    config.load()
    factory: Any = config.http_protocol_class
    protocol = factory(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(sock)
    return protocol


def _serve_one(
    protocol_class: type[asyncio.Protocol], request: bytes, app: Any = _app, sock: _Socket | None = None
) -> _Socket:
    sock = sock or _Socket()

    async def main() -> None:
        protocol = _connect(protocol_class, sock, app)
        protocol.data_received(request)
        for _ in range(100):  # poll: the app runs as a task of the loop
            if b"".join(sock.writes).endswith(b'{"ok":true}'):
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    return sock


REQUEST = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"


@pytest.mark.parametrize("name", ["h11", "httptools"])
def test_status_line_headers_and_body_go_out_in_one_write(name: str) -> None:
    try:
        base = import_from_string(HTTP_PROTOCOLS[name])
    except ImportError:  # httptools is optional
        pytest.skip(f"uvicorn's {name} protocol is not installed")
    plain = _serve_one(base, REQUEST)
    assert len([w for w in plain.writes if w]) == 2, (
        "uvicorn itself writes headers and body apart (what this guards)"
    )
    whole = _serve_one(whole_responses(base), REQUEST)
    assert len(whole.writes) == 1
    assert whole.writes[0].startswith(b"HTTP/1.1 200") and whole.writes[0].endswith(b'{"ok":true}')
    assert b"".join(plain.writes).split(b"\r\n")[0] == whole.writes[0].split(b"\r\n")[0]


@pytest.mark.parametrize("name", ["h11", "httptools"])
def test_a_response_goes_out_with_its_last_send_before_the_apps_work_after_it(name: str) -> None:
    """The write is not left for a later turn of the loop: what the app does after its last send
    (metrics, logs) and the loop's other callbacks do not delay the response."""
    try:
        base = import_from_string(HTTP_PROTOCOLS[name])
    except ImportError:  # httptools is optional
        pytest.skip(f"uvicorn's {name} protocol is not installed")
    written_by_then: list[int] = []
    sock = _Socket()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _app(scope, receive, send)
        written_by_then.append(len(sock.writes))  # the app's own work after its last send

    _serve_one(whole_responses(base), REQUEST, app, sock)
    assert written_by_then == [1] and sock.writes[0].endswith(b'{"ok":true}')


def test_closing_writes_what_is_pending_first() -> None:
    base = import_from_string(HTTP_PROTOCOLS["h11"])
    sock = _Socket()

    async def main() -> None:
        protocol = _connect(whole_responses(base), sock)
        protocol.transport.write(b"pending")
        protocol.transport.close()
        assert sock.writes == [b"pending"] and sock.closed

    asyncio.run(main())


def test_the_worker_serves_with_whole_responses() -> None:
    http = Worker.CONFIG_KWARGS["http"]
    assert isinstance(http, type) and http.__name__.startswith("WholeResponses")


def test_what_is_pending_when_the_peer_left_is_dropped_not_raised() -> None:
    base = import_from_string(HTTP_PROTOCOLS["h11"])
    sock = _Socket()

    async def main() -> None:
        protocol = _connect(whole_responses(base), sock)
        protocol.transport.write(b"late")
        sock.closed = True  # the connection closed before the loop turned
        await asyncio.sleep(0)  # the flush runs
        await asyncio.sleep(0)
        assert sock.writes == []

    asyncio.run(main())
