"""The gunicorn worker: a uvicorn worker that lets the app stop its server after draining.

uvicorn's own SIGTERM handling re-raises the signal after shutdown (the process then ends by the
signal, not with status 0) and gives the app no drain phase. This worker hands the app a
``request_exit`` callable instead, which the app calls once in-flight requests are done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from neuronserve.serving import libc


class _WholeWrites:
    """A transport that hands everything written in one turn of the event loop to the socket in
    one write (a response's at the latest when it is complete: see ``on_response_complete``).

    uvicorn writes a response's status line and headers, then its body, in two writes. A worker
    killed between them (the OOM killer, an operator) leaves nginx holding headers it has
    already passed on, so it cannot retry the request elsewhere and the client sees a truncated
    response. Written whole, a response either reached nginx or did not (then nginx retries), and
    each response costs one syscall instead of two.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending or self._transport.is_closing():
            return  # the peer left meanwhile: as uvicorn's own writes, dropped
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def whole_responses(protocol: type[Any]) -> type[asyncio.Protocol]:
    """``protocol`` (a uvicorn HTTP protocol class) writing each response in one piece."""

    class WholeResponses(protocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            loop = asyncio.get_running_loop()
            super().connection_made(_WholeWrites(transport, loop))  # type: ignore[arg-type]

        def on_response_complete(self) -> None:
            # The response is whole: it goes out now, not after the app's bookkeeping that
            # follows its last send (metrics, the access log) and the loop's other callbacks.
            transport = getattr(self, "transport", None)
            if isinstance(transport, _WholeWrites):
                transport.flush()
            super().on_response_complete()

    WholeResponses.__name__ = WholeResponses.__qualname__ = f"WholeResponses{protocol.__name__}"
    return WholeResponses


# httptools when installed (it is a dependency), each response written whole.
HTTP_PROTOCOL = whole_responses(import_from_string(HTTP_PROTOCOLS["auto"]))


class Worker(UvicornWorker):  # type: ignore[misc]
    """One uvicorn worker per core set (the Neuron runtime gives each process exclusive cores)."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "auto",
        "http": HTTP_PROTOCOL,
        # nginx is the only client and sends no forwarding headers: nothing to rewrite per request.
        "proxy_headers": False,
        "lifespan": "on",
        "access_log": False,
    }

    def _start_heartbeat(self) -> None:
        start_heartbeat(
            asyncio.get_running_loop(),
            notify=self.notify,
            alive=lambda: bool(self.alive),
            interval_s=max(0.5, self.timeout / 4),
            hung_s=LOOP_HUNG_S,
        )

    def init_process(self) -> None:
        die_with_parent(self.ppid)
        # The app reports worker restarts inside this server (gunicorn counts spawned workers).
        os.environ["NEURONSERVE_WORKER_AGE"] = str(self.age)
        super().init_process()

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        self._start_heartbeat()
        server = Server(config=self.config)
        self.wsgi.state.request_exit = lambda: setattr(server, "should_exit", True)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        code = getattr(self.wsgi.state, "exit_code", 0)  # set when a copy failed (see app.py)
        if code:
            sys.exit(code)


# The master kills a worker whose heartbeat stops for --timeout seconds. The heartbeat comes from
# a thread, so an event loop slowed by overload never gets a serving worker killed; only a loop
# that has not turned for this long (hung, not busy) stops it.
LOOP_HUNG_S = 120.0


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent (the gunicorn master) dies.

    A master killed on its own (the OOM killer, an operator's kill) must not leave its worker
    alive as an orphan holding the port, which the restarted master then cannot bind.
    """
    libc.die_with(signal.SIGKILL)
    if os.getppid() != parent:  # the master died before the request took effect
        os._exit(1)


def start_heartbeat(
    loop: asyncio.AbstractEventLoop,
    *,
    notify: Callable[[], None],
    alive: Callable[[], bool],
    interval_s: float,
    hung_s: float,
    mark_every_s: float = 1.0,
) -> threading.Thread:
    """Call ``notify`` every ``interval_s`` from a thread while ``alive()``, unless the event
    loop has not turned for ``hung_s`` (a busy loop still turns now and then; a hung one not)."""
    turned = [time.monotonic()]

    def mark() -> None:
        turned[0] = time.monotonic()
        loop.call_later(mark_every_s, mark)

    loop.call_soon_threadsafe(mark)
    tick = threading.Event()  # never set: its wait() is the heartbeat's interval

    def beat() -> None:
        while alive() and not tick.wait(interval_s):
            if time.monotonic() - turned[0] < hung_s:
                notify()

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    return thread
