"""The engine: one model of a server, from a decoded request to its answers.

It owns the verified artifacts, the tokenizer, the batcher and the model's copies (see
:mod:`~neuronserve.serving.copies`), and admits work: every protocol decodes its body into one
:class:`InferRequest`, and the engine checks its limits (input count, length, deadline, prompt)
once, here, tokenizes, queues, and returns the :class:`InferResult` the protocol encodes.
Results come back from copy threads through the event loop, once per batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, overload

from neuronserve.artifacts import Manifest, artifacts_directory, load_manifest
from neuronserve.backends import choose_backend
from neuronserve.config import ConfigError, Settings
from neuronserve.serving import libc
from neuronserve.serving.batcher import Batcher, BatcherClosedError, CoreLedger, QueueFullError, WorkItem
from neuronserve.serving.copies import BatchOutcome, Copies, server_cores, shared_cores
from neuronserve.serving.errors import ServeError, deadline, overloaded, too_large, unavailable, validation
from neuronserve.serving.hostcores import HostCores
from neuronserve.serving.metrics import ModelMetrics, ServerMetrics
from neuronserve.serving.tasks import Prompts, task_for
from neuronserve.serving.tokenization import Encoded, TextEncoder
from neuronserve.serving.work import (
    Answer,
    DisconnectWatch,
    ExpiredError,
    InferRequest,
    InferResult,
    Item,
    QueuedInput,
    Receive,
)

log = logging.getLogger(__name__)

# Inputs up to this many characters are tokenized on the event loop (microseconds); larger ones
# go to a tokenizer thread so the loop never stalls on long texts.
INLINE_TOKENIZE_CHARS = 4096
T = TypeVar("T")
# After this long with nothing in flight, the memory freed by the last batches goes back to the OS.
IDLE_TRIM_S = 2.0


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
        # cpu: the CPUs shared with the deployment's other servers (None: its own only)
        self.shared_cores = shared_cores(settings, self.kind, self.cores)
        span = len(self.shared_cores) if self.shared_cores is not None else usable
        # by default a copy per CPU of its own (they share one load); a lone copy's batch takes
        # the CPUs other servers lend as intra-op threads
        self.copies = self.kind.copies_per_server(settings.serve.models_per_server, usable)
        self.batch_sizes = self._allowed_batch_sizes()
        self.max_sequence_length = max(self.manifest.sequence_lengths)
        self.encoder = TextEncoder(directory, self.max_sequence_length)
        self.task = task_for(self.task_kind, directory)
        self.prompts = self._prompts(directory)
        # cpu copies share the server's CPUs: a batch running alone gets the idle ones.
        lend_cores = self.kind.serves_lent_calls(self.manifest.artifact_files)
        self.ledger = (ledger or self._new_ledger(span, usable)) if lend_cores else None
        # The thread counts a lent call can run with (the batcher's and the backend's: one list)
        call_threads = self.kind.call_thread_counts(self.manifest.artifact_files, usable, self.copies, span)
        if self.ledger is not None and self.ledger.cores != span:
            raise RuntimeError(f"this is a bug: a ledger of {self.ledger.cores} cores for {span}")
        self.batcher: Batcher[QueuedInput] = Batcher(
            ledger=self.ledger,
            copies=self.copies,
            trim_step=self.manifest.trim_step,
            thread_counts=call_threads,
            sequence_lengths=self.manifest.sequence_lengths,
            batch_sizes=self.batch_sizes,
            max_queue=settings.serve.max_queue,
            max_queue_tokens=self._queue_tokens(),
            max_delay_s=settings.serve.max_batch_delay_ms / 1000.0,
            on_drop=self._on_drop,
        )
        self.copy_set = Copies(
            kind=self.kind,
            settings=settings,
            manifest=self.manifest,
            cores=self.cores,
            count=self.copies,
            task=self.task,
            batcher=self.batcher,
            metrics=self.metrics,
            call_threads=call_threads,
            lend_cores=lend_cores,
        )
        self.copy_set.on_all_ready = self._all_ready
        self.copy_set.on_failed = self._fatal
        self.copy_set.on_outcome = self._resolve
        self.threads_per_copy = 0
        self.draining = False
        self.load_error: str | None = None
        # Called once, on the event loop, when a copy failed to load or died: the app drains
        # and exits non-zero so that the supervisor restarts the whole process.
        self.on_fatal: Callable[[str], None] | None = None
        # Called once, on the event loop, when every copy is ready (before the first request).
        self.on_ready: Callable[[], None] | None = None
        self._inflight = 0
        self._admitting = 0  # inputs admitted but not yet queued (being tokenized)
        self._idle = asyncio.Event()
        self._idle.set()
        self._trim_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._malloc_trim = libc.find_malloc_trim()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="tokenize",
            initializer=libc.name_this_thread,
            initargs=("tokenize",),
        )
        self.metrics.track_queue_depth(lambda: self.batcher.depth)

    def _prompts(self, directory: Path) -> Prompts:
        try:
            prompts = Prompts.from_directory(directory, self.settings.serve.default_prompt_name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if prompts.default is not None and not prompts.include_prompt:
            log.warning(
                "this model pools without its prompt's tokens (1_Pooling include_prompt=false), which "
                "neuronserve does not support: no default prompt (requests naming one get a 422)"
            )
            return dataclasses.replace(prompts, default=None)
        return prompts

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

    def _new_ledger(self, span: int, usable: int) -> CoreLedger:
        """The process's ledger: of its own CPUs, or of those it shares host-wide."""
        if self.shared_cores is None:
            return CoreLedger(usable)
        home = [self.shared_cores.ids.index(c) for c in self.cores.ids]
        host = HostCores(Path(self.settings.serve.core_ledger), span, home)
        return CoreLedger(span, host=host, own=usable)

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
        already pinned, with ``threads_per_copy`` torch threads for each copy. See
        :meth:`Copies.start` for ``first_copy`` and ``locks``."""
        self._loop = asyncio.get_running_loop()
        self.threads_per_copy = threads_per_copy
        self.copy_set.start(self._loop, first_copy=first_copy, locks={} if locks is None else locks)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def state(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        if self.copy_set.ready < self.copies:
            return "loading"
        return "unhealthy" if self.copy_set.unhealthy else "ready"

    @property
    def unhealthy(self) -> dict[int, str]:
        """Copies out of rotation after failed batches, and why."""
        return dict(self.copy_set.unhealthy)

    @property
    def copies_ready(self) -> int:
        return self.copy_set.ready

    @property
    def costs(self) -> dict[tuple[int, int], float]:
        return dict(self.copy_set.costs)

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
        self._closed = True  # a request's bookkeeping may still come (see _run): no new trim
        self.copy_set.stop()
        self.batcher.close()
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def _all_ready(self) -> None:
        if self.ready and self.on_ready is not None:
            self.on_ready()
        self._release_free_memory()  # warm-up ran every shape; keep none of its buffers

    def _fatal(self, message: str) -> None:
        if self.load_error is not None:
            return  # already failing; the first reason is the one to report
        self.load_error = message
        log.critical("%s; the server stops so that its supervisor restarts it", message)
        self.begin_drain()
        if self.on_fatal is not None:
            self.on_fatal(message)

    # --- answers (event loop) -----------------------------------------------------------------

    def _on_drop(self, dropped: list[tuple[Item, str]]) -> None:
        """In a copy's thread or the loop: inputs the batcher dropped unrun, and why."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._resolve_dropped, dropped)
            except RuntimeError:
                if not self._loop.is_closed():
                    raise

    def _resolve(self, outcome: BatchOutcome) -> None:
        size = len(outcome.batch.items)
        results = outcome.results
        failed = outcome.error is not None or results is None
        for i, item in enumerate(outcome.batch.items):
            answer = item.payload.answer
            if answer.future.done():
                continue
            if failed or results is None:
                answer.fail(ServeError("internal_error", "inference failed; see the server log"))
                continue
            answer.values[item.payload.slot] = results[i]
            answer.queue_s = max(answer.queue_s, item.dispatched_at - item.enqueued_at)
            answer.inference_s = max(answer.inference_s, outcome.inference_s)
            answer.batch_size = max(answer.batch_size, size)
            answer.remaining -= 1
            if answer.remaining == 0:
                answer.future.set_result(answer)

    def _resolve_dropped(self, dropped: list[tuple[Item, str]]) -> None:
        for item, reason in dropped:
            self.metrics.dropped(reason)
            if reason == "expired":
                item.payload.answer.fail(deadline("the request's deadline passed while it waited for a copy"))
            else:
                item.payload.answer.cancel()

    def _schedule_trim(self) -> None:
        if self._trim_timer is None and self._loop is not None and not self._closed:
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
        per_item = [c / b for (b, _s), c in self.copy_set.costs.items() if b == self.batch_sizes[-1]]
        seconds_per_item = max(per_item) if per_item else 0.01
        return max(1, math.ceil(self.batcher.depth * seconds_per_item / self.copies))

    # --- admission ----------------------------------------------------------------------------

    def check_available(self) -> None:
        if self.draining:
            self.metrics.rejected("draining")
            raise unavailable("the server is shutting down; retry on another server")
        if not self.ready:
            self.metrics.rejected("not_ready")
            if self.copy_set.unhealthy:
                raise unavailable(f"copy {min(self.copy_set.unhealthy)} is failing; retry on another server")
            raise unavailable(self.load_error or "model copies are still loading; retry shortly")

    def check_count(self, count: int, field: str) -> None:
        """At most serve.max_inputs_per_request inputs (a 413 naming ``field``)."""
        limit = self.settings.serve.max_inputs_per_request
        if count > limit:
            raise too_large(field, f"{count} inputs exceed serve.max_inputs_per_request ({limit})")

    def timeout_s(self, requested_ms: int | None, field: str) -> float:
        """The request's deadline: its own up to serve.max_request_timeout_ms, else the default."""
        serve = self.settings.serve
        if requested_ms is None:
            return serve.request_timeout_ms / 1000.0
        if requested_ms > serve.max_request_timeout_ms:
            raise validation(
                field, f"{requested_ms} exceeds serve.max_request_timeout_ms ({serve.max_request_timeout_ms})"
            )
        return requested_ms / 1000.0

    def prompted(self, texts: tuple[str, ...], name: str | None, field: str) -> tuple[str, ...]:
        """``texts`` with their prompt before each: see :meth:`Prompts.apply`."""
        return self.prompts.apply(texts, name, field=field, embeds=self.task_kind.embeds)

    @property
    def normalizes(self) -> bool:
        """Whether this model's embeddings are L2-normalised by default."""
        return bool(getattr(self.task, "normalize", False))

    @overload
    async def infer(self, request: InferRequest) -> InferResult: ...

    @overload
    async def infer(self, request: InferRequest, *, receive: Receive | None) -> InferResult | None: ...

    async def infer(self, request: InferRequest, *, receive: Receive | None = None) -> InferResult | None:
        """Check ``request`` against this server's limits, tokenize, queue and await it; raises
        ServeError for every refusal. With ``receive`` (the client's ASGI channel), a client that
        leaves has its queued inputs dropped before any copy takes them, and the answer is None.

        Only the client's own disconnect becomes None; any other cancellation (shutdown, a
        cancelled handler task) propagates as it must.
        """
        self.check_count(request.count, request.field)
        timeout_s = self.timeout_s(request.timeout_ms, request.timeout_field)
        texts = self.prompted(request.texts, request.prompt_name, request.prompt_field)
        if texts is not request.texts:  # a prompt was put before them (no copy on the hot path otherwise)
            request = dataclasses.replace(request, texts=texts)
        self.check_available()
        watch = DisconnectWatch(receive) if receive is not None else None
        try:
            return await self._run(request, timeout_s, watch)
        except asyncio.CancelledError:
            if watch is not None and watch.disconnected:
                return None
            raise
        finally:
            if watch is not None:
                watch.close()

    async def _run(
        self, request: InferRequest, timeout_s: float, watch: DisconnectWatch | None
    ) -> InferResult:
        started = time.monotonic()
        encoded = await self._admit(request)
        expires = started + timeout_s
        loop = asyncio.get_running_loop()
        answer = Answer(loop, len(encoded))
        items = self._work_items(encoded, request, expires, answer)
        if watch is not None:
            watch.add(items)
        tokens = sum(enc.length for enc in encoded)
        # In flight before a copy can take the work: the other servers stop borrowing this one's
        # cores before its batch looks for them, and a woken copy does not wait on the ledger
        # while this marks the server busy.
        self._inflight += 1
        if self._inflight == 1 and self.ledger is not None:
            self.ledger.work_begins()
        self._idle.clear()
        self.metrics.inflight.inc()
        answered = queued = False
        # Everything but the queueing itself before it: the woken copy needs this thread's GIL.
        timer = loop.call_later(max(0.0, expires - time.monotonic()), answer.expire)
        try:
            self._enqueue(items)
            queued = True
            await answer.future
            answered = True
        except ExpiredError:
            self.metrics.rejected("deadline")
            raise deadline(f"no answer within the request's deadline of {timeout_s * 1000:.0f} ms") from None
        finally:
            timer.cancel()
            if not answered:  # timed out, failed or the client left: never run what nobody awaits
                for item in items:
                    item.cancelled = True
                answer.cancel()
            # Answered: the bookkeeping waits for the rest of this step, which sends the response
            # (unless the socket's buffer is full).
            if answered:
                loop.call_soon(self._request_done, tokens)
            else:
                self._request_done(tokens if queued else 0)
        return InferResult(
            outputs=answer.values,
            queue_ms=answer.queue_s * 1000.0,
            inference_ms=answer.inference_s * 1000.0,
            batch_size=answer.batch_size,
            tokens=tokens,
            truncated=sum(1 for enc in encoded if enc.truncated),
        )

    def _request_done(self, tokens: int) -> None:
        """A request is no longer in flight; ``tokens``: those it queued."""
        self.metrics.input_tokens.inc(tokens)
        self._inflight -= 1
        self.metrics.inflight.dec()
        if self._inflight == 0:
            if self.ledger is not None:
                self.ledger.work_ends()
            self._idle.set()
            self._schedule_trim()

    async def _admit(self, request: InferRequest) -> list[Encoded]:
        """Refuse at once when the queue plus what is being tokenized is full; else tokenize.

        Counting the inputs still being tokenized bounds the work a burst can start before the
        queue would have said no.
        """
        limit = self.settings.serve.max_queue
        waiting = self._admitting + self.batcher.depth
        if waiting + request.count > limit:
            self.metrics.rejected("queue_full")
            raise overloaded(
                f"server overloaded: queue full ({waiting} of {limit} inputs waiting); retry later",
                self.retry_after_s(),
            )
        self._admitting += request.count
        try:
            return await self._tokenize(request)
        finally:
            self._admitting -= request.count

    @staticmethod
    def _work_items(
        encoded: list[Encoded], request: InferRequest, expires: float, answer: Answer
    ) -> list[Item]:
        now = time.monotonic()
        return [
            WorkItem(
                length=enc.length,
                deadline=expires,
                payload=QueuedInput(enc, request.options_for(i), answer, i),
                enqueued_at=now,
            )
            for i, enc in enumerate(encoded)
        ]

    def _enqueue(self, items: list[Item]) -> None:
        try:
            self.batcher.submit(items)
        except QueueFullError as exc:
            self.metrics.rejected("queue_full")
            raise overloaded(f"server overloaded: {exc}; retry later", self.retry_after_s()) from None
        except BatcherClosedError:
            self.metrics.rejected("draining")
            raise unavailable("the server is shutting down; retry on another server") from None

    async def _tokenize(self, request: InferRequest) -> list[Encoded]:
        """Token ids of the request's inputs; a refusal names its field."""
        truncate, field = request.truncate or self.settings.serve.auto_truncate, request.field
        hint = request.truncate_hint
        if request.pairs:
            pairs = list(request.pairs)
            size = sum(len(q) + len(t) for q, t in pairs)
            return await self._tokenizer_work(
                size, lambda: self.encoder.encode_pairs(pairs, truncate=truncate, field=field, hint=hint)
            )
        texts = list(request.texts)
        size = sum(len(t) for t in texts)
        return await self._tokenizer_work(
            size, lambda: self.encoder.encode(texts, truncate=truncate, field=field, hint=hint)
        )

    async def tokens(
        self, texts: list[str], *, add_special_tokens: bool, field: str = "inputs"
    ) -> list[list[dict[str, Any]]]:
        """Every token of each text (``/tokenize``)."""
        self.check_count(len(texts), field)
        size = sum(len(t) for t in texts)
        return await self._tokenizer_work(
            size, lambda: self.encoder.tokens(texts, add_special_tokens=add_special_tokens)
        )

    async def decode(self, ids: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """Each list of token ids as text (``/decode``)."""
        self.check_count(len(ids), "ids")
        size = sum(len(row) for row in ids) * 4  # ~characters of text out
        return await self._tokenizer_work(
            size, lambda: self.encoder.decode(ids, skip_special_tokens=skip_special_tokens)
        )

    async def _tokenizer_work(self, chars: int, work: Callable[[], T]) -> T:
        """Small requests inline (microseconds); larger ones on the tokenizer thread."""
        if chars <= INLINE_TOKENIZE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, work)
