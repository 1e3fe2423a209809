"""Every model one server serves, by name, and the server's lifecycle across them.

The Neuron runtime reserves a process's cores and is not fork-safe, so one process per core set
holds every configured model (``model.*`` and each ``models.<name>.*``), each with its own engine
(queue, batcher, copies). Requests name their model; :meth:`ModelRegistry.pick` finds it, or the
one model that suits the route when the request names none.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

from neuronserve.config import ConfigError, Settings
from neuronserve.serving.engine import Engine
from neuronserve.serving.errors import ServeError, validation
from neuronserve.serving.metrics import ServerMetrics


def is_embedder(engine: Engine) -> bool:
    return engine.task_kind.embeds


def is_cross_encoder(engine: Engine) -> bool:
    """A text-classification model with one output scores (query, text) pairs: a reranker."""
    return engine.task_kind.classifies and len(getattr(engine.task, "labels", ())) == 1


def describe(engine: Engine) -> str:
    return "cross-encoder" if is_cross_encoder(engine) else engine.task_kind.value


class ModelRegistry:
    """See the module docstring. The lifecycle members mirror :class:`Engine`'s over all models:
    ready when every model is, failed when any is, draining all at once."""

    def __init__(self, settings: Settings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.engines: dict[str, Engine] = {}
        ledger = None  # the process's CPUs, lent to every model's batches from one count (cpu)
        for model_settings in settings.per_model().values():
            engine = Engine(model_settings, metrics, ledger)
            ledger = ledger or engine.ledger
            if engine.model_name in self.engines:
                raise ConfigError(f"two models are named {engine.model_name!r}; give each its own name")
            self.engines[engine.model_name] = engine
        first = next(iter(self.engines.values()))
        backends = {e.kind for e in self.engines.values()}
        if len(backends) > 1:
            raise ConfigError(
                f"the models' artifacts are for different backends ({', '.join(sorted(backends))}); "
                "trace every model for one backend"
            )
        self.kind = first.kind
        self.cores = first.cores
        # cpu: the CPUs shared with the deployment's other servers (every model's ledger is one)
        self.shared_cores = first.shared_cores
        self.threads_per_copy = 0
        self.on_fatal: Callable[[str], None] | None = None
        self.on_ready: Callable[[], None] | None = None
        self._failed = False
        for engine in self.engines.values():
            engine.on_fatal = self._fatal
            engine.on_ready = self._engine_ready
            metrics.describe_model(
                model=engine.model_name,
                task=engine.task_kind.value,
                backend=engine.kind.value,
                cores=str(engine.cores),
                copies=engine.copies,
            )

    @property
    def names(self) -> list[str]:
        return list(self.engines)

    def pick(
        self,
        name: str | None,
        route: str,
        suits: Callable[[Engine], bool] = lambda _engine: True,
        kind: str = "",
    ) -> Engine:
        """The model a request names (404 when there is none of that name, 422 when it does not
        suit ``route``), else the one model here that suits the route (``kind`` says what
        suits); several that suit need a name (422), none is a 404."""
        if name is not None:
            engine = self.engines.get(name)
            if engine is None:
                raise ServeError(
                    "not_found",
                    f"model {name!r} not found; this server serves {self._listing()}",
                    field="model",
                )
            if not suits(engine):
                raise validation("model", f"{name!r} is a {describe(engine)} model; {route} needs {kind}")
            return engine
        fitting = [e for e in self.engines.values() if suits(e)]
        if len(fitting) == 1:
            return fitting[0]
        if not fitting:
            raise ServeError("not_found", f"{route} needs {kind}; this server serves {self._listing()}")
        names = ", ".join(repr(e.model_name) for e in fitting)
        raise validation("model", f"required: this server serves several that suit {route}: {names}")

    def _listing(self) -> str:
        return ", ".join(f"{name!r} ({describe(e)})" for name, e in self.engines.items())

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Pin the process once for every model's copies, then start each model's copies."""
        copies = sum(e.copies for e in self.engines.values())
        tag = self.settings.serve.name or f"neuronserve-{self.settings.serve.port}"
        shared = self.settings.serve.neuron_shared_weights
        # A server sharing CPUs runs on all of them (the core ledger keeps the count); its copies'
        # own threads are a share of its own.
        pinned = self.shared_cores or self.cores
        self.threads_per_copy = self.kind.prepare_process(
            pinned, copies, tag, shared_weights=shared, own=self.cores if self.shared_cores else None
        )
        first_copy = 0
        locks: dict[int, threading.Lock] = {}
        for engine in self.engines.values():
            engine.start(self.threads_per_copy, first_copy=first_copy, locks=locks)
            first_copy += engine.copies
        if self.shared_cores is not None:
            # The copy threads (started above, with their thread pools) run on every shared CPU,
            # as many at once as the core ledger lends; this thread, the event loop, and the
            # threads it starts from now on stay on the server's own.
            os.sched_setaffinity(0, set(self.cores.ids))

    @property
    def state(self) -> str:
        states = {e.state for e in self.engines.values()}
        for state in ("failed", "draining", "loading", "unhealthy"):
            if state in states:
                return state
        return "ready"

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines.values())

    @property
    def draining(self) -> bool:
        return any(e.draining for e in self.engines.values())

    @property
    def load_error(self) -> str | None:
        return next((e.load_error for e in self.engines.values() if e.load_error is not None), None)

    @property
    def copies(self) -> int:
        return sum(e.copies for e in self.engines.values())

    @property
    def copies_ready(self) -> int:
        return sum(e.copies_ready for e in self.engines.values())

    def begin_drain(self) -> None:
        for engine in self.engines.values():
            engine.begin_drain()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no model has a request in flight; False if ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for engine in self.engines.values():
            if not engine.idle and not await engine.wait_idle(max(0.0, deadline - loop.time())):
                return False
        return True

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def _engine_ready(self) -> None:
        if self.ready and self.on_ready is not None:
            self.on_ready()

    def _fatal(self, message: str) -> None:
        """One model failed: the whole server drains and exits (its supervisor restarts it)."""
        if self._failed:
            return  # the first reason is the one to report
        self._failed = True
        for engine in self.engines.values():
            engine.begin_drain()
        if self.on_fatal is not None:
            self.on_fatal(message)
