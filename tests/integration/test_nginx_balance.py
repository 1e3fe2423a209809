"""How the endpoint configuration deploy writes spreads requests over two servers, on a real
nginx: a lone client stays on one server, a second request in flight goes to the idle one, and a
dead server costs no request even when it takes two attempts to get past it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.integration.servers import nginx_endpoint

pytestmark = pytest.mark.integration


class Upstream:
    """A server that answers its name; ``/hold`` answers only once released. HTTP/1.0: every
    connection closes after its answer, so a closed server refuses the next attempt at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = threading.Event()
        self.holding = 0
        lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/hold":
                    with lock:
                        upstream.holding += 1
                    upstream.release.wait(20)
                    with lock:
                        upstream.holding -= 1
                body = upstream.name.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def stop(self) -> None:
        """Stop listening: the next attempt to connect is refused, as to a dead server."""
        self.server.shutdown()
        self.server.server_close()

    def wait_holding(self, count: int) -> None:
        deadline = time.monotonic() + 20
        while self.holding != count:
            assert time.monotonic() < deadline, f"{self.name} holds {self.holding} requests, not {count}"
            time.sleep(0.01)  # poll until the held requests arrived


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[str, Upstream, Upstream]]:
    a, b = Upstream("a"), Upstream("b")
    try:
        with nginx_endpoint(tmp_path, [a.address, b.address]) as url:
            try:
                yield url, a, b
            finally:  # held requests are answered before nginx stops, whatever the test did
                a.release.set()
                b.release.set()
    finally:
        for upstream in (a, b):
            if upstream.server.socket.fileno() != -1:
                upstream.stop()


def _held(url: str, answers: list[str]) -> threading.Thread:
    def run() -> None:
        answers.append(httpx.get(f"{url}/hold", timeout=30).text)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_lone_client_stays_on_one_server_and_the_next_request_in_flight_takes_the_idle_one(
    two: tuple[str, Upstream, Upstream],
) -> None:
    url, a, b = two
    with httpx.Client(timeout=10) as client:
        assert [client.get(f"{url}/").text for _ in range(30)] == ["a"] * 30
        answers: list[str] = []
        first = _held(url, answers)
        a.wait_holding(1)
        assert [client.get(f"{url}/").text for _ in range(5)] == ["b"] * 5  # a is busy: the idle b
        second = _held(url, answers)
        b.wait_holding(1)
        # Both busy: the rest are spread between them by open requests.
        third, fourth = _held(url, answers), _held(url, answers)
        deadline = time.monotonic() + 20
        while a.holding + b.holding != 4:
            assert time.monotonic() < deadline, "nginx did not pass on every request"
            time.sleep(0.01)  # poll until the held requests arrived
        assert (a.holding, b.holding) == (2, 2)
        a.release.set()
        b.release.set()
        for thread in (first, second, third, fourth):
            thread.join(30)
        assert sorted(answers) == ["a", "a", "b", "b"]


def test_no_request_is_lost_to_a_dead_server_while_the_other_is_busy(
    two: tuple[str, Upstream, Upstream],
) -> None:
    url, a, b = two
    answers: list[str] = []
    on_a = _held(url, answers)
    a.wait_holding(1)
    on_b = _held(url, answers)
    b.wait_holding(1)
    a.release.set()
    on_a.join(30)
    a.stop()
    # a's one-request entry is free but dead, its backup entry too, b's one-request entry is
    # busy: the request gets past both of a's entries to b's backup.
    with httpx.Client(timeout=10) as client:
        got = [client.get(f"{url}/") for _ in range(10)]
    assert [(r.status_code, r.text) for r in got] == [(200, "b")] * 10
    b.release.set()
    on_b.join(30)
    assert answers == ["a", "b"]
