"""Model copies: each owned by one thread that loads, warms and then runs batches forever.

:class:`Copies` places a model's copies on the server's cores and keeps their state (ready,
out of rotation, dead) and their measured costs; :class:`CopyWorker` is one copy's thread. The
event loop never runs model code. A copy loads each artifact of the manifest on its core
(the backend shares one load between copies where it can), runs every compiled shape once (a
load another copy already warmed is not run again), and reports per-shape costs: the trace-time
figure from the manifest, or the warm-up call if that was faster (interference only adds time).
A copy is ready only after every shape of its load answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from neuronserve.artifacts import Manifest
from neuronserve.backends import ArrayModel, Backend, BackendKind, CoreSet, LoadedModel
from neuronserve.config import ConfigError, Settings
from neuronserve.serving import libc
from neuronserve.serving.batcher import Batch, Batcher
from neuronserve.serving.metrics import ModelMetrics
from neuronserve.serving.tasks import Task
from neuronserve.serving.tokenization import Encoded
from neuronserve.serving.work import QueuedInput

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how often a copy out of rotation retries the smallest shape


@dataclass(frozen=True)
class BatchOutcome:
    """What one copy did with one batch: per-item results, or the error that hit all of them."""

    batch: Batch[QueuedInput]
    results: list[Any] | None
    error: BaseException | None
    inference_s: float
    copy: int
    model_failed: bool = False  # the model call itself failed (not the inputs around it)


class Tokenized(Protocol):
    """What :func:`build_inputs` reads of a work item's payload."""

    @property
    def encoded(self) -> Encoded: ...


E = TypeVar("E", bound=Tokenized)


def build_inputs(batch: Batch[E], input_names: tuple[str, ...]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Pad a batch to its shape (its compiled batch size, its padded length); returns (inputs in
    manifest order, attention mask), int64 arrays.

    Vectorised: each row's tokens go to its first ``length`` columns, which is where a boolean
    mask of the real tokens puts a concatenation of the rows (in row-major order). A lone input
    at its exact length (one client, artifacts that run any length) is its own arrays: half the
    numpy calls, each several times its usual cost between two model calls.
    """
    b, s = batch.batch_size, batch.padded_length
    encoded = [item.payload.encoded for item in batch.items]
    if b == 1 and len(encoded) == 1 and encoded[0].length == s:
        lone = encoded[0]
        ids = np.asarray(lone.ids, dtype=np.int64).reshape(1, s)
        mask = np.ones((1, s), dtype=np.int64)
        types = (
            np.zeros((1, s), dtype=np.int64)
            if lone.type_ids is None
            else np.asarray(lone.type_ids, dtype=np.int64).reshape(1, s)
        )
        by_lone = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return tuple(by_lone[name] for name in input_names), mask
    lengths = np.fromiter((enc.length for enc in encoded), dtype=np.int64, count=len(encoded))
    real = np.zeros((b, s), dtype=bool)
    real[: len(encoded)] = np.arange(s) < lengths[:, None]
    ids = np.zeros((b, s), dtype=np.int64)
    ids[real] = np.concatenate([enc.ids for enc in encoded])
    mask = real.astype(np.int64)
    types = np.zeros((b, s), dtype=np.int64)
    if any(enc.type_ids is not None for enc in encoded):
        types[real] = np.concatenate(
            [enc.type_ids if enc.type_ids is not None else np.zeros(enc.length, np.int64) for enc in encoded]
        )
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return tuple(by_name[name] for name in input_names), mask


def array_call(model: LoadedModel) -> Callable[[tuple[np.ndarray, ...]], Sequence[Any]]:
    """How a copy runs ``model`` on the arrays of :func:`build_inputs`: its own ``run_arrays``
    (:class:`~neuronserve.backends.ArrayModel`), else ``run`` on tensors sharing their memory."""
    if isinstance(model, ArrayModel):
        return model.run_arrays

    def run(inputs: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
        return model.run(tuple(torch.from_numpy(array) for array in inputs))

    return run


def server_cores(settings: Settings, backend: BackendKind) -> CoreSet:
    """The cores this server owns: ``serve.cores``, else (cpu) every CPU the process may use."""
    if settings.serve.cores:
        try:
            return CoreSet.parse(settings.serve.cores)
        except ValueError as exc:
            raise ConfigError(f"serve.cores {exc}") from None
    if backend.neuron_cores:
        # On Kubernetes the Neuron device plugin allocates the pod's cores; whatever set
        # NEURON_RT_VISIBLE_CORES for this process (the plugin, Ray) has named them.
        given = os.environ.get("NEURON_RT_VISIBLE_CORES", "")
        if given:
            try:
                return CoreSet.parse(given)
            except ValueError as exc:
                raise ConfigError(f"NEURON_RT_VISIBLE_CORES {exc}") from None
        raise ConfigError(
            "serve.cores must name this server's NeuronCores (e.g. 0-1): deploy sets it, and on "
            "Kubernetes NEURON_RT_VISIBLE_CORES does; neither is set"
        )
    return CoreSet(tuple(sorted(os.sched_getaffinity(0))))


def shared_cores(settings: Settings, backend: BackendKind, home: CoreSet) -> CoreSet | None:
    """``serve.shared_cores``: the CPUs this server shares with the deployment's other servers
    through ``serve.core_ledger`` (cpu), ``home`` among them; None when it runs on its own only."""
    if not settings.serve.shared_cores:
        return None
    try:
        shared = CoreSet.parse(settings.serve.shared_cores)
    except ValueError as exc:
        raise ConfigError(f"serve.shared_cores {exc}") from None
    if not backend.lends_cores:
        raise ConfigError(f"serve.shared_cores is for the cpu backend; these artifacts are {backend}'s")
    if not settings.serve.core_ledger:
        raise ConfigError(
            "serve.shared_cores needs serve.core_ledger: the file its servers lend cores through"
        )
    outside = [c for c in home.ids if c not in shared.ids]
    if outside:
        raise ConfigError(f"serve.cores {home}: CPU(s) {outside} are not in serve.shared_cores {shared}")
    return shared


def calibrated_costs(
    traced: dict[tuple[int, int], float], warm: dict[tuple[int, int], float]
) -> dict[tuple[int, int], float]:
    """Per-shape costs for the batcher from the trace's figures and one warm-up call per shape.

    The trace's figures are precise (several calls) but may come from another host; one warm-up
    call is of this host but noisy. So the trace's figures are scaled by how much slower this
    host ran them (the median ratio, never below 1), and any shape whose warm-up call was faster
    still keeps that figure: every figure is an upper bound, which the batcher only lowers.
    """
    ratios = sorted(warm[shape] / cost for shape, cost in traced.items() if cost > 0)
    scale = max(1.0, ratios[len(ratios) // 2]) if ratios else 1.0
    return {shape: min(cost * scale, warm[shape]) for shape, cost in traced.items()}


class Copies:
    """A model's copies on its server's cores: where each runs, which are ready, which are out of
    rotation and why, and the per-shape costs they measured (the slowest copy's, the safe figure
    to plan with). Copy threads report through the event loop; every callback given here runs
    there, once per event.
    """

    def __init__(
        self,
        *,
        kind: BackendKind,
        settings: Settings,
        manifest: Manifest,
        cores: CoreSet,
        count: int,
        task: Task,
        batcher: Batcher[QueuedInput],
        metrics: ModelMetrics,
        call_threads: tuple[int, ...] | None,
        lend_cores: bool,
    ) -> None:
        self.kind, self.settings, self.manifest, self.cores = kind, settings, manifest, cores
        self.count = count
        self.task, self.batcher, self.metrics = task, batcher, metrics
        self.call_threads, self.lend_cores = call_threads, lend_cores
        # Set by the engine before start(): each runs on the event loop.
        self.on_all_ready: Callable[[], None] = lambda: None
        self.on_failed: Callable[[str], None] = lambda _message: None
        self.on_outcome: Callable[[BatchOutcome], None] = lambda _outcome: None
        self.unhealthy: dict[int, str] = {}  # copies out of rotation, and why
        self.costs: dict[tuple[int, int], float] = {}
        self._ready: set[int] = set()
        self._threads: list[CopyWorker] = []
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> int:
        """How many copies are loaded and warmed."""
        return len(self._ready)

    def start(
        self, loop: asyncio.AbstractEventLoop, *, first_copy: int, locks: dict[int, threading.Lock]
    ) -> None:
        """Load and warm every copy in its own thread. Copies go on the server's cores from the
        ``first_copy``-th placement on (a server's models take turns, so the second model's first
        copy is not on the first model's core); ``locks`` (one per core, shared by the server's
        models) keep warm-up timings apart."""
        self._loop = loop
        backend = self.kind.create(
            self.settings.trace,
            shared_weights=self.settings.serve.neuron_shared_weights,
            call_threads=self.call_threads or (),
        )
        slots = [self.kind.copy_core(first_copy + i, self.cores) for i in range(self.count)]
        for slot in slots:
            locks.setdefault(slot, threading.Lock())
        files = self.manifest.artifact_files
        warmed: dict[tuple[int, int, tuple[int, int]], float] = {}  # shared by this model's copies
        for index, slot in enumerate(slots):
            worker = CopyWorker(
                set_threads=self.kind.call_threads_setter(files) if self.lend_cores else None,
                index=index,
                start_nc=slot,
                backend=backend,
                manifest=self.manifest,
                cores=self.cores,
                task=self.task,
                batcher=self.batcher,
                on_ready=lambda i, costs: self._to_loop(self._mark_ready, i, costs),
                on_failed=lambda _i, message: self._to_loop(self.on_failed, message),
                on_outcome=self._observe,
                on_health=lambda i, problem: self._to_loop(self._set_health, i, problem),
                measure_lock=locks[slot],
                warmed=warmed,
                max_failures=self.settings.serve.max_failed_batches,
                stop=self._stop,
            )
            self._threads.append(worker)
            worker.start()

    def stop(self) -> None:
        self._stop.set()

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the event loop. Once the loop is closed (the server stopped while a
        copy was still loading or running) there is nobody left to tell, and it is dropped."""
        assert self._loop is not None, "this is a bug: a copy started before its engine"
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            if not self._loop.is_closed():
                raise

    def _mark_ready(self, index: int, costs: dict[tuple[int, int], float]) -> None:
        for shape, cost in costs.items():
            self.costs[shape] = max(cost, self.costs.get(shape, 0.0))
        self.batcher.set_costs(self.costs)
        self._ready.add(index)
        self.metrics.copies_ready.set(len(self._ready))
        if len(self._ready) == self.count:
            log.info("all %d copies ready on cores %s", self.count, self.cores)
            self.on_all_ready()

    def _set_health(self, index: int, problem: str | None) -> None:
        if problem is None:
            self.unhealthy.pop(index, None)
            log.info("copy %d healthy again", index)
        else:
            self.unhealthy[index] = problem
            log.error("copy %d out of rotation: %s", index, problem)
        self.metrics.copies_unhealthy.set(len(self.unhealthy))

    def _observe(self, outcome: BatchOutcome) -> None:
        """In the copy's thread: the batch's answers go to the loop, nothing before them."""
        self._to_loop(self._answer, outcome)

    def _answer(self, outcome: BatchOutcome) -> None:
        """On the loop: the batch's answers, then (once their responses are out) its cost and
        metrics. Every Python step between the model and the response is latency, several times
        its usual cost right after a call: at one client these took 0.04 ms of a request."""
        assert self._loop is not None, "this is a bug: a copy started before its engine"
        try:
            self.on_outcome(outcome)  # resolving a request's answer queues its handler's next step
        finally:
            self._loop.call_soon(self._record, outcome)

    def _record(self, outcome: BatchOutcome) -> None:
        batch = outcome.batch
        # Costs are of a copy's own cores at the full compiled length: a trimmed or helped call is
        # faster than that.
        own = batch.threads == self.batcher.base_threads
        if outcome.error is None and own and batch.padded_length == batch.sequence_length:
            self.batcher.observe(batch.batch_size, batch.sequence_length, outcome.inference_s)
        self.metrics.batch_ran(
            outcome.copy,
            shape=(batch.batch_size, batch.sequence_length),
            padded_length=batch.padded_length,
            lengths=[item.length for item in batch.items],
            seconds=outcome.inference_s,
            queued=[item.dispatched_at - item.enqueued_at for item in batch.items],
            threads=batch.threads,
        )


class CopyWorker(threading.Thread):
    """One model copy: loads every compiled shape, warms up, then serves the batcher."""

    def __init__(
        self,
        *,
        index: int,
        start_nc: int,
        backend: Backend,
        manifest: Manifest,
        cores: CoreSet,
        task: Task,
        batcher: Batcher[QueuedInput],
        on_ready: Callable[[int, dict[tuple[int, int], float]], None],
        on_failed: Callable[[int, str], None],
        on_outcome: Callable[[BatchOutcome], None],
        on_health: Callable[[int, str | None], None],
        measure_lock: threading.Lock,
        warmed: dict[tuple[int, int, tuple[int, int]], float],
        max_failures: int,
        stop: threading.Event,
        set_threads: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(name=f"copy-{index}", daemon=True)
        # Lent cores (see the Batcher's CoreLedger): the intra-op threads of this thread's next call.
        self._set_threads = set_threads
        self._threads = 0  # set when the thread starts
        self._on_health = on_health
        self._max_failures = max_failures
        self._stopping = stop
        self._measure_lock = measure_lock
        # Warm-up figures by loaded model, core and shape, shared by the model's copies: a copy
        # that shares its load and core with one that warmed it (cpu: every copy of a server)
        # runs it no more.
        self._warmed = warmed
        self.index = index
        self._start_nc = start_nc
        self._backend = backend
        self._manifest = manifest
        self._cores = cores
        self._task = task
        self._batcher = batcher
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._on_outcome = on_outcome
        self._models: dict[tuple[int, int], LoadedModel] = {}
        self._calls: dict[tuple[int, int], Callable[[tuple[np.ndarray, ...]], Sequence[Any]]] = {}

    def run(self) -> None:
        libc.name_this_thread(self.name)  # so per-thread CPU (top -H, /proc) shows the copies
        if self._set_threads is not None:
            # its own share of the cores: what warm-up measures, and what it runs with when busy
            self._threads = self._batcher.base_threads
            self._set_threads(self._threads)
        # Whatever ends this thread other than the batcher closing is fatal to the server: a copy
        # that cannot load or dies must not leave a process that looks alive but never answers.
        try:
            costs = self._load_and_warm()
        except BaseException as exc:
            log.exception("copy %d failed to load", self.index)
            self._on_failed(self.index, f"copy {self.index} failed to load: {type(exc).__name__}: {exc}")
            return
        self._on_ready(self.index, costs)
        try:
            self._serve()
        except BaseException as exc:
            log.exception("copy %d died", self.index)
            self._on_failed(self.index, f"copy {self.index} died: {type(exc).__name__}: {exc}")

    def _load_and_warm(self) -> dict[tuple[int, int], float]:
        directory: Path = self._manifest.directory
        loaded = {
            file: self._backend.load(directory / file, self._cores, self._start_nc)
            for file in self._manifest.artifact_files
        }
        for entry in self._manifest.shapes:
            model = loaded[entry.file]
            self._models[(entry.batch_size, entry.sequence_length)] = model
            self._calls[(entry.batch_size, entry.sequence_length)] = array_call(model)
        warm: dict[tuple[int, int], float] = {}
        names = self._manifest.input_names
        # Copies that share a core warm one at a time, so a warm-up figure is never the sum of
        # two copies' work; copies on other cores (Neuron) warm in parallel. A load another copy
        # has warmed on this core is warm: its figures are taken, not measured again (on cpu a
        # server's copies share one load, and warming it once per copy doubled the time to ready).
        with self._measure_lock:
            for entry in self._manifest.shapes:
                shape = (entry.batch_size, entry.sequence_length)
                key = (id(self._models[shape]), self._start_nc, shape)
                if key not in self._warmed:
                    inputs = tuple(torch.ones(shape, dtype=torch.int64) for _ in names)
                    started = time.perf_counter()
                    self._models[shape].run(inputs)
                    self._warmed[key] = time.perf_counter() - started
                warm[shape] = self._warmed[key]
        traced = {(e.batch_size, e.sequence_length): e.cost_s for e in self._manifest.shapes}
        costs = calibrated_costs(traced, warm)
        log.info(
            "copy %d ready on core %d: %s",
            self.index,
            self._start_nc,
            ", ".join(f"b{b} s{s} {c * 1000:.1f}ms" for (b, s), c in sorted(costs.items())),
        )
        return costs

    def _serve(self) -> None:
        failures = 0
        while (batch := self._batcher.next_batch()) is not None:
            try:
                outcome = self._run(batch)
            finally:
                self._batcher.finished(batch)  # its cores go back before anyone hears of it
            self._on_outcome(outcome)
            # Only the model call counts for the copy's health: an input that breaks the code
            # around it is that request's problem, not the copy's.
            if outcome.model_failed:
                failures += 1
            elif outcome.error is None:
                failures = 0
            if failures >= self._max_failures:
                error = outcome.error
                self._on_health(
                    self.index, f"{failures} batches in a row failed, last: {type(error).__name__}: {error}"
                )
                if not self._probe_until_healthy():
                    return
                failures = 0
                self._on_health(self.index, None)

    def _run(self, batch: Batch[QueuedInput]) -> BatchOutcome:
        started = time.perf_counter()
        model_called = False
        try:
            if self._set_threads is not None and batch.threads != self._threads:
                self._set_threads(batch.threads)
                self._threads = batch.threads
            inputs, mask = build_inputs(batch, self._manifest.input_names)
            call = self._calls[(batch.batch_size, batch.sequence_length)]
            model_called = True
            outputs = call(inputs)
            model_called = False
            results = self._task.results(
                outputs, mask, [(item.payload.encoded, item.payload.options) for item in batch.items]
            )
            return BatchOutcome(batch, results, None, time.perf_counter() - started, self.index)
        except Exception as exc:  # a failed batch answers its items; the copy lives on
            log.exception(
                "copy %d: batch b%d s%d failed", self.index, batch.batch_size, batch.sequence_length
            )
            elapsed = time.perf_counter() - started
            return BatchOutcome(batch, None, exc, elapsed, self.index, model_failed=model_called)

    def _probe_until_healthy(self) -> bool:
        """Out of rotation: run the smallest shape every PROBE_INTERVAL_S until it succeeds.

        Returns False when the server stops first. Other copies keep taking batches meanwhile.
        """
        if self._set_threads is not None:  # the probe holds no lent core: its own share only
            self._threads = self._batcher.base_threads
            self._set_threads(self._threads)
        entry = min(self._manifest.shapes, key=lambda e: e.batch_size * e.sequence_length)
        shape = (entry.batch_size, entry.sequence_length)
        inputs = tuple(torch.ones(shape, dtype=torch.int64) for _ in self._manifest.input_names)
        while not self._stopping.wait(PROBE_INTERVAL_S):
            try:
                self._models[shape].run(inputs)
            except Exception as exc:
                log.warning(
                    "copy %d: probe b%d s%d still fails: %s: %s", self.index, *shape, type(exc).__name__, exc
                )
                continue
            log.info("copy %d: probe succeeded; back in rotation", self.index)
            return True
        return False
