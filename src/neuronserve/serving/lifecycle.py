"""A server's life after start: draining on SIGTERM, stopping itself when a copy fails, and
freezing what start-up built out of the garbage collector's sight once it is ready."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable

from fastapi import FastAPI

from neuronserve.serving.registry import ModelRegistry

log = logging.getLogger(__name__)


# Exit statuses of a server that stops itself because a copy failed. A copy that never loaded
# is a boot error (gunicorn's worker boot error: the master stops, and supervisord restarts
# the program with backoff); one that died while serving restarts the worker.
EXIT_BOOT_FAILED = 3
EXIT_COPY_DIED = 70


def install_drain(app: FastAPI, registry: ModelRegistry) -> None:
    """On SIGTERM, or when a copy failed: ready and new requests turn 503, in-flight requests
    finish, then exit (status 0 after SIGTERM, non-zero after a failed copy).

    The runner (``neuronserve serve``, or the gunicorn worker class) puts a ``request_exit``
    callable on ``app.state`` that stops the server cleanly, and reads ``app.state.exit_code``
    afterwards; without it the previous SIGTERM handler (uvicorn's) is called.
    """
    loop = asyncio.get_running_loop()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    timeout = registry.settings.serve.drain_timeout_s

    def stop() -> None:
        request_exit: Callable[[], None] | None = getattr(app.state, "request_exit", None)
        if request_exit is not None:
            request_exit()
        elif callable(previous):
            previous(signal.SIGTERM, None)

    async def drain() -> None:
        finished = await registry.wait_idle(timeout)
        if finished:
            log.info("drained: no request in flight; exiting")
        else:
            log.warning("drain timeout (%.1fs) passed with requests in flight; exiting", timeout)
        stop()

    def begin() -> None:
        if registry.draining:  # gunicorn forwards the signal too; SIGINT or SIGQUIT force an exit
            return
        log.info("SIGTERM: draining (ready and new requests answer 503)")
        registry.begin_drain()
        app.state.drain_task = loop.create_task(drain())

    def fatal(_message: str) -> None:  # the failing engine has logged why and begun draining
        app.state.exit_code = EXIT_COPY_DIED if registry.copies_ready == registry.copies else EXIT_BOOT_FAILED
        app.state.drain_task = loop.create_task(drain())

    registry.on_fatal = fatal
    if main:
        registry.on_ready = freeze_startup_objects
        signal.signal(signal.SIGTERM, lambda _sig, _frame: loop.call_soon_threadsafe(begin))


def freeze_startup_objects() -> None:
    """Move what start-up built (torch, transformers, the model, the tokenizer: hundreds of
    thousands of long-lived objects) out of the garbage collector's sight, once the server is
    ready. The collections that serving's short-lived objects trigger then walk those, not every
    object ever imported (measured: ~15% less CPU per single-text request). Only for a process
    the server owns: a collection that never looks at them again is right for a server, not for a
    test process that builds many apps."""
    gc.collect()  # freeze what lives, not start-up's garbage
    gc.freeze()
