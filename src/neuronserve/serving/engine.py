"""The engine: what routes call to run inputs through the model.

It owns the verified artifacts, the tokenizer, the batcher and the copy threads, and the
server's lifecycle state (loading, ready, draining). Routes validate, call :meth:`Engine.infer`
and format; they never touch tensors. Results come back from copy threads through
``loop.call_soon_threadsafe``, once per batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from neuronserve.artifacts import Manifest, artifacts_directory, load_manifest
from neuronserve.backends import BackendKind, CoreSet, choose_backend
from neuronserve.config import ConfigError, Settings
from neuronserve.serving import libc
from neuronserve.serving.batcher import Batcher, BatcherClosedError, CoreLedger, QueueFullError, WorkItem
from neuronserve.serving.copies import BatchOutcome, CopyWorker
from neuronserve.serving.errors import ServeError, deadline, overloaded, unavailable, validation
from neuronserve.serving.metrics import ModelMetrics, ServerMetrics
from neuronserve.serving.tasks import ItemOptions, Prompts, task_for
from neuronserve.serving.tokenization import Encoded, TextEncoder

log = logging.getLogger(__name__)

# Inputs up to this many characters are tokenized on the event loop (microseconds); larger ones
# go to a tokenizer thread so the loop never stalls on long texts.
INLINE_TOKENIZE_CHARS = 4096
T = TypeVar("T")
# After this long with nothing in flight, the memory freed by the last batches goes back to the OS.
IDLE_TRIM_S = 2.0


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries.

    glibc keeps freed activation buffers in each copy thread's arena (its mmap threshold grows
    with the largest tensor freed), so after the largest shapes ran a server would otherwise hold
    their working set for good: for MiniLM at b32 s128, ~250 MB per copy. The engine trims after
    warm-up and when idle, never between batches under load (that would add page faults).
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


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


@dataclass(frozen=True)
class InferResult:
    """Results in input order plus the timings the response headers report."""

    outputs: list[Any]
    queue_ms: float
    inference_ms: float
    batch_size: int
    tokens: int


class _ExpiredError(Exception):
    """A request's deadline passed before all of its inputs were answered."""


class _Answer:
    """One request's inputs, answered together: copies fill ``values`` and the future is set
    once, when the last input lands (one future per request, not one per input)."""

    __slots__ = ("batch_size", "future", "inference_s", "queue_s", "remaining", "values")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.future: asyncio.Future[_Answer] = loop.create_future()
        self.values: list[Any] = [None] * count
        self.remaining = count
        self.queue_s = 0.0
        self.inference_s = 0.0
        self.batch_size = 0

    def cancel(self) -> None:
        self.future.cancel()  # a no-op once answered

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def expire(self) -> None:
        self.fail(_ExpiredError())


class Engine:
    """See the module docstring: one model of a server (``settings`` as from
    :meth:`Settings.per_model`). Create it, then ``start()`` it inside the running event loop,
    once the process is pinned (see :class:`~neuronserve.serving.registry.ModelRegistry`)."""

    def __init__(self, settings: Settings, metrics: ServerMetrics, ledger: CoreLedger | None = None) -> None:
        """``ledger``: the process's CPUs, shared with the server's other models (cpu; a new one
        when this is the first or only model)."""
        self.settings = settings
        directory = artifacts_directory(settings, choose_backend(settings.trace.backend)[0])
        self.manifest: Manifest = load_manifest(directory, fingerprint=settings.serve.artifacts_fingerprint)
        self.kind = self.manifest.backend
        # Requests choose the model by this: model.name (models.<name>), else the manifest's.
        self.model_name = settings.model.name or str(self.manifest.model["name"])
        self.metrics: ModelMetrics = metrics.for_model(self.model_name)
        self.task_kind = self.manifest.task
        self.cores = server_cores(settings, self.kind)
        usable = self.kind.usable_cores(self.cores)
        self.copies = self.kind.copies_per_server(settings.serve.models_per_server, usable)
        self.batch_sizes = self._allowed_batch_sizes()
        self.max_sequence_length = max(self.manifest.sequence_lengths)
        self.encoder = TextEncoder(directory, self.max_sequence_length)
        self.task = task_for(self.task_kind, directory)
        try:
            self.prompts = Prompts.from_directory(directory, settings.serve.default_prompt_name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.prompts.default is not None and not self.prompts.include_prompt:
            log.warning(
                "this model pools without its prompt's tokens (1_Pooling include_prompt=false), which "
                "neuronserve does not support: no default prompt (requests naming one get a 422)"
            )
            self.prompts = dataclasses.replace(self.prompts, default=None)
        # cpu copies share the server's CPUs: a batch running alone gets the idle ones.
        self.lend_cores = self.kind.serves_lent_calls(self.manifest.artifact_files)
        self.ledger = (ledger or CoreLedger(usable)) if self.lend_cores else None
        # The thread counts a lent call can run with (the batcher's and the backend's: one list)
        self.call_threads = self.kind.call_thread_counts(self.manifest.artifact_files, usable, self.copies)
        if self.ledger is not None and self.ledger.cores != usable:
            raise RuntimeError(f"this is a bug: a ledger of {self.ledger.cores} cores for {usable}")
        self.batcher = Batcher(
            ledger=self.ledger,
            copies=self.copies,
            trim_step=self.manifest.trim_step,
            thread_counts=self.call_threads,
            sequence_lengths=self.manifest.sequence_lengths,
            batch_sizes=self.batch_sizes,
            max_queue=settings.serve.max_queue,
            max_queue_tokens=self._queue_tokens(),
            max_delay_s=settings.serve.max_batch_delay_ms / 1000.0,
            on_drop=self._on_drop,
        )
        self.threads_per_copy = 0
        self.draining = False
        self.load_error: str | None = None
        # Called once, on the event loop, when a copy failed to load or died: the app drains
        # and exits non-zero so that the supervisor restarts the whole process.
        self.on_fatal: Callable[[str], None] | None = None
        # Called once, on the event loop, when every copy is ready (before the first request).
        self.on_ready: Callable[[], None] | None = None
        self._copy_threads: list[CopyWorker] = []
        self._unhealthy: dict[int, str] = {}  # copies out of rotation, and why
        self._stop = threading.Event()
        self._ready: set[int] = set()
        self._costs: dict[tuple[int, int], float] = {}
        self._inflight = 0
        self._admitting = 0  # inputs admitted but not yet queued (being tokenized)
        self._idle = asyncio.Event()
        self._idle.set()
        self._trim_timer: asyncio.TimerHandle | None = None
        self._malloc_trim = find_malloc_trim()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="tokenize",
            initializer=libc.name_this_thread,
            initargs=("tokenize",),
        )
        self.metrics.track_queue_depth(lambda: self.batcher.depth)

    def _queue_tokens(self) -> int:
        """``serve.max_queue_tokens``, or half of what max_queue inputs of the largest length
        would hold: a queue of long texts fills at half the inputs of a queue of short ones."""
        s = self.settings.serve
        longest = max(self.manifest.sequence_lengths)
        if not s.max_queue_tokens:
            return max(s.max_queue * longest // 2, s.max_inputs_per_request * longest)
        if s.max_queue_tokens < s.max_inputs_per_request * longest:
            raise ConfigError(
                f"serve.max_queue_tokens={s.max_queue_tokens} cannot hold one request of "
                f"serve.max_inputs_per_request={s.max_inputs_per_request} inputs of {longest} tokens; "
                f"use at least {s.max_inputs_per_request * longest}, or 0 for the default"
            )
        return s.max_queue_tokens

    def _allowed_batch_sizes(self) -> tuple[int, ...]:
        limit = self.settings.serve.max_batch_size
        compiled = self.manifest.batch_sizes
        allowed = tuple(b for b in compiled if limit == 0 or b <= limit)
        if not allowed:
            raise ConfigError(
                f"serve.max_batch_size={limit} but the smallest compiled batch size is {compiled[0]}; "
                f"trace with trace.batch_sizes including {limit} or raise serve.max_batch_size"
            )
        return allowed

    # --- lifecycle --------------------------------------------------------------------------

    def start(
        self, threads_per_copy: int, *, first_copy: int = 0, locks: dict[int, threading.Lock] | None = None
    ) -> None:
        """Load and warm every copy in its own thread (ready comes later); the process is
        already pinned, with ``threads_per_copy`` torch threads for each copy.

        Copies go on the server's cores from the ``first_copy``-th placement on (a server's
        models take turns, so the second model's first copy is not on the first model's core);
        ``locks`` (one per core, shared by the server's models) keep warm-up timings apart.
        """
        self._loop = asyncio.get_running_loop()
        self.threads_per_copy = threads_per_copy
        shared = self.settings.serve.neuron_shared_weights
        backend = self.kind.create(
            self.settings.trace, shared_weights=shared, call_threads=self.call_threads or ()
        )
        slots = [self.kind.copy_core(first_copy + i, self.cores) for i in range(self.copies)]
        locks = {} if locks is None else locks
        for slot in slots:
            locks.setdefault(slot, threading.Lock())
        for index, slot in enumerate(slots):
            worker = CopyWorker(
                set_threads=self.kind.call_threads_setter() if self.lend_cores else None,
                index=index,
                start_nc=slot,
                backend=backend,
                manifest=self.manifest,
                cores=self.cores,
                task=self.task,
                batcher=self.batcher,
                on_ready=self._on_copy_ready,
                on_failed=self._on_copy_failed,
                on_outcome=self._on_outcome,
                on_health=self._on_copy_health,
                measure_lock=locks[slot],
                max_failures=self.settings.serve.max_failed_batches,
                stop=self._stop,
            )
            self._copy_threads.append(worker)
            worker.start()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def state(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        if len(self._ready) < self.copies:
            return "loading"
        return "unhealthy" if self._unhealthy else "ready"

    @property
    def unhealthy(self) -> dict[int, str]:
        """Copies out of rotation after failed batches, and why."""
        return dict(self._unhealthy)

    @property
    def copies_ready(self) -> int:
        return len(self._ready)

    @property
    def costs(self) -> dict[tuple[int, int], float]:
        return dict(self._costs)

    def begin_drain(self) -> None:
        """Stop taking work: ready and new requests answer 503; queued work still runs."""
        self.draining = True
        self.batcher.close()

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:  # a distinct class before Python 3.11
            return False
        return True

    def close(self) -> None:
        self._stop.set()
        self.batcher.close()
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # --- copy thread callbacks (run in copy threads) ----------------------------------------

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the event loop. Once the loop is closed (the server stopped while a
        copy was still loading or running) there is nobody left to tell, and it is dropped."""
        assert self._loop is not None, "this is a bug: a copy started before the engine"
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            if not self._loop.is_closed():
                raise

    def _on_copy_ready(self, index: int, costs: dict[tuple[int, int], float]) -> None:
        assert self._loop is not None, "this is a bug: a copy started before the engine"
        self._to_loop(self._mark_ready, index, costs)

    def _mark_ready(self, index: int, costs: dict[tuple[int, int], float]) -> None:
        for shape, cost in costs.items():  # the slowest copy's figure is the safe one to plan with
            self._costs[shape] = max(cost, self._costs.get(shape, 0.0))
        self.batcher.set_costs(self._costs)
        self._ready.add(index)
        self.metrics.copies_ready.set(len(self._ready))
        if self.ready:
            if self.on_ready is not None:
                self.on_ready()
            self._release_free_memory()  # warm-up ran every shape; keep none of its buffers
            log.info("all %d copies ready on cores %s", self.copies, self.cores)

    def _on_copy_failed(self, index: int, message: str) -> None:
        assert self._loop is not None, "this is a bug: a copy started before the engine"
        del index  # the message names the copy
        self._to_loop(self._fatal, message)

    def _fatal(self, message: str) -> None:
        if self.load_error is not None:
            return  # already failing; the first reason is the one to report
        self.load_error = message
        log.critical("%s; the server stops so that its supervisor restarts it", message)
        self.begin_drain()
        if self.on_fatal is not None:
            self.on_fatal(message)

    def _on_copy_health(self, index: int, problem: str | None) -> None:
        assert self._loop is not None, "this is a bug: a copy started before the engine"
        self._to_loop(self._set_health, index, problem)

    def _set_health(self, index: int, problem: str | None) -> None:
        if problem is None:
            self._unhealthy.pop(index, None)
            log.info("copy %d healthy again", index)
        else:
            self._unhealthy[index] = problem
            log.error("copy %d out of rotation: %s", index, problem)
        self.metrics.copies_unhealthy.set(len(self._unhealthy))

    def _on_outcome(self, outcome: BatchOutcome) -> None:
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
        )
        assert self._loop is not None, "this is a bug: a copy started before the engine"
        self._to_loop(self._resolve, outcome)

    def _on_drop(self, dropped: list[tuple[WorkItem, str]]) -> None:
        if self._loop is not None:
            self._to_loop(self._resolve_dropped, dropped)

    # --- event loop side ----------------------------------------------------------------------

    def _resolve(self, outcome: BatchOutcome) -> None:
        size = len(outcome.batch.items)
        results = outcome.results
        failed = outcome.error is not None or results is None
        for i, item in enumerate(outcome.batch.items):
            answer: _Answer = item.handle
            if answer.future.done():
                continue
            if failed or results is None:
                answer.fail(ServeError("internal_error", "inference failed; see the server log"))
                continue
            answer.values[item.slot] = results[i]
            answer.queue_s = max(answer.queue_s, item.dispatched_at - item.enqueued_at)
            answer.inference_s = max(answer.inference_s, outcome.inference_s)
            answer.batch_size = max(answer.batch_size, size)
            answer.remaining -= 1
            if answer.remaining == 0:
                answer.future.set_result(answer)

    def _resolve_dropped(self, dropped: list[tuple[WorkItem, str]]) -> None:
        for item, reason in dropped:
            self.metrics.dropped(reason)
            answer: _Answer = item.handle
            if reason == "expired":
                answer.fail(deadline("the request's deadline passed while it waited for a copy"))
            else:
                answer.cancel()

    def _schedule_trim(self) -> None:
        if self._trim_timer is None and self._loop is not None:
            self._trim_timer = self._loop.call_later(IDLE_TRIM_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim_timer = None
        if self._inflight == 0 and self.batcher.depth == 0:
            self._release_free_memory()

    def _release_free_memory(self) -> None:
        """Return freed heap to the OS, off the event loop (it walks every arena)."""
        if self._malloc_trim is not None:
            self._tokenizer_pool.submit(self._malloc_trim, 0)

    def retry_after_s(self) -> int:
        """Seconds until the queue is likely to have room: queue depth over measured throughput."""
        per_item = [c / b for (b, _s), c in self._costs.items() if b == self.batch_sizes[-1]]
        seconds_per_item = max(per_item) if per_item else 0.01
        return max(1, math.ceil(self.batcher.depth * seconds_per_item / self.copies))

    async def _admit(
        self, inputs: list[str] | list[tuple[str, str]], *, truncate: bool, field: str
    ) -> list[Encoded]:
        """Refuse at once when the queue plus what is being tokenized is full; else tokenize.

        Counting the inputs still being tokenized bounds the work a burst can start before the
        queue would have said no.
        """
        limit = self.settings.serve.max_queue
        waiting = self._admitting + self.batcher.depth
        if waiting + len(inputs) > limit:
            self.metrics.rejected("queue_full")
            raise overloaded(
                f"server overloaded: queue full ({waiting} of {limit} inputs waiting); retry later",
                self.retry_after_s(),
            )
        self._admitting += len(inputs)
        try:
            return await self._tokenize(inputs, truncate=truncate, field=field)
        finally:
            self._admitting -= len(inputs)

    @staticmethod
    def _work_items(
        encoded: list[Encoded], options: list[ItemOptions], expires: float, answer: _Answer
    ) -> list[WorkItem]:
        now = time.monotonic()
        return [
            WorkItem(
                length=enc.length,
                deadline=expires,
                payload=(enc, opt),
                handle=answer,
                slot=i,
                enqueued_at=now,
            )
            for i, (enc, opt) in enumerate(zip(encoded, options, strict=True))
        ]

    def _enqueue(self, items: list[WorkItem]) -> None:
        try:
            self.batcher.submit(items)
        except QueueFullError as exc:
            self.metrics.rejected("queue_full")
            raise overloaded(f"server overloaded: {exc}; retry later", self.retry_after_s()) from None
        except BatcherClosedError:
            self.metrics.rejected("draining")
            raise unavailable("the server is shutting down; retry on another server") from None

    async def _tokenize(
        self, inputs: list[str] | list[tuple[str, str]], *, truncate: bool, field: str = "inputs"
    ) -> list[Encoded]:
        size = sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in inputs)
        return await self._tokenizer_work(size, lambda: self.encode(inputs, truncate=truncate, field=field))

    async def tokens(self, texts: list[str], *, add_special_tokens: bool) -> list[list[dict[str, Any]]]:
        """Every token of each text (``/tokenize``)."""
        size = sum(len(t) for t in texts)
        return await self._tokenizer_work(
            size, lambda: self.encoder.tokens(texts, add_special_tokens=add_special_tokens)
        )

    async def _tokenizer_work(self, chars: int, work: Callable[[], T]) -> T:
        """Small requests inline (microseconds); larger ones on the tokenizer thread."""
        if chars <= INLINE_TOKENIZE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, work)

    def prompted(self, texts: list[str], name: str | None, field: str) -> list[str]:
        """``texts`` with the named sentence-transformers prompt before each (the default one
        when ``name`` is None); a 422 naming ``field`` for a name the model does not have."""
        chosen = name if name is not None else self.prompts.default
        if chosen is None:
            return texts
        if not self.task_kind.embeds:
            raise validation(field, "prompts apply to feature-extraction (embedding) models only")
        prompt = self.prompts.prompts.get(chosen)
        if prompt is None:
            names = ", ".join(sorted(self.prompts.prompts)) or "none"
            raise validation(field, f"unknown prompt {chosen!r}; this model's prompts: {names}")
        if not self.prompts.include_prompt:
            raise validation(
                field, "this model pools without its prompt's tokens (include_prompt=false): not supported"
            )
        return [prompt + text for text in texts]

    @property
    def normalizes(self) -> bool:
        """Whether this model's embeddings are L2-normalised by default."""
        return bool(getattr(self.task, "normalize", False))

    def encode(
        self, inputs: list[str] | list[tuple[str, str]], *, truncate: bool, field: str = "inputs"
    ) -> list[Encoded]:
        """Token ids of ``inputs``; a refusal names ``field`` (the request's own name for them)."""
        if inputs and isinstance(inputs[0], tuple):
            return self.encoder.encode_pairs(inputs, truncate=truncate, field=field)
        return self.encoder.encode(inputs, truncate=truncate, field=field)  # type: ignore[arg-type]

    def check_available(self) -> None:
        if self.draining:
            self.metrics.rejected("draining")
            raise unavailable("the server is shutting down; retry on another server")
        if not self.ready:
            self.metrics.rejected("not_ready")
            if self._unhealthy:
                raise unavailable(f"copy {min(self._unhealthy)} is failing; retry on another server")
            raise unavailable(self.load_error or "model copies are still loading; retry shortly")

    async def infer(
        self,
        inputs: list[str] | list[tuple[str, str]],
        options: list[ItemOptions],
        *,
        truncate: bool,
        timeout_s: float,
        watch: list[WorkItem] | None = None,
        field: str = "inputs",
    ) -> InferResult:
        """Tokenize, queue and await ``inputs``; raises ServeError for every refusal.

        The work items are appended to ``watch`` before they are queued, so that whoever
        watches the client can cancel them (a cancelled item is dropped before it reaches a
        copy), also when the client left while its inputs were tokenized. ``field`` is what the
        request calls its inputs, for the errors that name one.
        """
        self.check_available()
        started = time.monotonic()
        encoded = await self._admit(inputs, truncate=truncate, field=field)
        expires = started + timeout_s
        loop = asyncio.get_running_loop()
        answer = _Answer(loop, len(encoded))
        items = self._work_items(encoded, options, expires, answer)
        if watch is not None:
            watch.extend(items)
        self._enqueue(items)
        tokens = sum(enc.length for enc in encoded)
        self.metrics.input_tokens.inc(tokens)
        self._inflight += 1
        self._idle.clear()
        self.metrics.inflight.inc()
        answered = False
        timer = loop.call_later(max(0.0, expires - time.monotonic()), answer.expire)
        try:
            await answer.future
            answered = True
        except _ExpiredError:
            self.metrics.rejected("deadline")
            raise deadline(f"no answer within the request's deadline of {timeout_s * 1000:.0f} ms") from None
        finally:
            timer.cancel()
            if not answered:  # timed out, failed or the client left: never run what nobody awaits
                for item in items:
                    item.cancelled = True
                answer.cancel()
            self._inflight -= 1
            self.metrics.inflight.dec()
            if self._inflight == 0:
                self._idle.set()
                self._schedule_trim()
        return InferResult(
            outputs=answer.values,
            queue_ms=answer.queue_s * 1000.0,
            inference_ms=answer.inference_s * 1000.0,
            batch_size=answer.batch_size,
            tokens=tokens,
        )
