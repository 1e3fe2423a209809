"""The gunicorn worker: a uvicorn worker that lets the app stop its server after draining.

uvicorn's own SIGTERM handling re-raises the signal after shutdown (the process then ends by the
signal, not with status 0) and gives the app no drain phase. This worker hands the app a
``request_exit`` callable instead, which the app calls once in-flight requests are done.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker


class Worker(UvicornWorker):  # type: ignore[misc]
    """One uvicorn worker per core set (the Neuron runtime gives each process exclusive cores)."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "auto",
        "http": "auto",
        "lifespan": "on",
        "access_log": False,
    }

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = Server(config=self.config)
        self.wsgi.state.request_exit = lambda: setattr(server, "should_exit", True)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        code = getattr(self.wsgi.state, "exit_code", 0)  # set when a copy failed (see app.py)
        if code:
            sys.exit(code)
