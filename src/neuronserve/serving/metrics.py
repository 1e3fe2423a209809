"""The server's Prometheus metrics, in a registry of its own (prefix ``neuronserve_``)."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
REJECTION_REASONS = ("queue_full", "deadline", "draining", "not_ready")
DROP_REASONS = ("cancelled", "expired")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Every metric one server exports, labelled by model where a model is known (``model=""``
    for requests refused before one was chosen). Thread-safe (copy threads update some)."""

    def __init__(self, server: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "neuronserve_requests",
            "HTTP requests by route, status code and model",
            ["route", "code", "model"],
            registry=r,
        )
        # Labelled children looked up once: every request and every batch updates them.
        self._answered: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        self.request_duration = Histogram(
            "neuronserve_request_duration_seconds",
            "Time from request to response",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "neuronserve_queue_duration_seconds",
            "Time an input waited for a copy",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "neuronserve_inference_duration_seconds",
            "Time of one model call (a whole batch)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "neuronserve_batch_size",
            "Real inputs per model call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.padding_rows = Counter(
            "neuronserve_padding_rows",
            "Batch rows that were padding (compiled size minus real inputs)",
            ["model"],
            registry=r,
        )
        # Padding efficiency per compiled shape: real tokens over the tokens the shape computes.
        self.real_tokens = Counter(
            "neuronserve_real_tokens",
            "Tokens of the real inputs in model calls, by compiled shape",
            ["model", "shape"],
            registry=r,
        )
        self.padded_tokens = Counter(
            "neuronserve_padded_tokens",
            "Tokens model calls computed (batch size x sequence length, padding included), by compiled shape",
            ["model", "shape"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "neuronserve_queue_depth", "Inputs waiting for a copy", ["model"], registry=r
        )
        self.inflight = Gauge(
            "neuronserve_inflight_requests", "Requests being answered", ["model"], registry=r
        )
        self.rejections = Counter(
            "neuronserve_rejections", "Requests refused, by reason", ["reason", "model"], registry=r
        )
        for reason in ("unauthorized", "too_large"):  # refused before a model is chosen
            self.rejections.labels(reason=reason, model="")
        self.inputs_dropped = Counter(
            "neuronserve_inputs_dropped",
            "Queued inputs dropped before reaching a copy: the client left, or the deadline passed",
            ["reason", "model"],
            registry=r,
        )
        self.copies_ready = Gauge(
            "neuronserve_copies_ready", "Model copies loaded and warmed", ["model"], registry=r
        )
        self.worker_restarts = Gauge(
            "neuronserve_worker_restarts",
            "Times this server's master replaced its worker process since the master started",
            registry=r,
        )
        self.copies_unhealthy = Gauge(
            "neuronserve_copies_unhealthy",
            "Copies out of rotation after serve.max_failed_batches failed batches in a row",
            ["model"],
            registry=r,
        )
        self.copy_inferences = Counter(
            "neuronserve_copy_inferences", "Model calls per copy", ["model", "copy"], registry=r
        )
        self.copy_items = Counter(
            "neuronserve_copy_items", "Real inputs run per copy", ["model", "copy"], registry=r
        )
        self.batch_threads = Counter(
            "neuronserve_batch_threads",
            "Model calls by the cores they ran on (cpu: intra-op threads; more than a copy's own "
            "share: idle cores were lent to it, by this server or, with a core ledger, another)",
            ["model", "threads"],
            registry=r,
        )
        self.input_tokens = Counter(
            "neuronserve_input_tokens", "Tokens of accepted inputs", ["model"], registry=r
        )
        self.info = Gauge(
            "neuronserve_server_info",
            "Constant 1, labelled with what this server runs (one series per model)",
            ["server", "model", "task", "backend", "cores", "copies"],
            registry=r,
        )
        self._server = server

    def answered(self, route: str, status: int, seconds: float, model: str = "") -> None:
        """One request answered: its count by route, status and model, and its duration."""
        children = self._answered.get((route, status, model))
        if children is None:
            children = (
                self._requests.labels(route=route, code=str(status), model=model),
                self.request_duration.labels(route=route, model=model),
            )
            self._answered[(route, status, model)] = children
        children[0].inc()
        children[1].observe(seconds)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)

    def describe_model(self, *, model: str, task: str, backend: str, cores: str, copies: int) -> None:
        self.info.labels(
            server=self._server, model=model, task=task, backend=backend, cores=cores, copies=str(copies)
        ).set(1)


class ModelMetrics:
    """One model's children of the server's metrics (its engine and copies update these)."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.server = metrics
        self.model = model
        self.queue_duration = metrics.queue_duration.labels(model=model)
        self.inference_duration = metrics.inference_duration.labels(model=model)
        self.batch_size = metrics.batch_size.labels(model=model)
        self.padding_rows = metrics.padding_rows.labels(model=model)
        self.queue_depth = metrics.queue_depth.labels(model=model)
        self.inflight = metrics.inflight.labels(model=model)
        self.copies_ready = metrics.copies_ready.labels(model=model)
        self.copies_unhealthy = metrics.copies_unhealthy.labels(model=model)
        self.input_tokens = metrics.input_tokens.labels(model=model)
        # present at 0 from the start, so rates and panels exist
        self._rejections = {r: metrics.rejections.labels(reason=r, model=model) for r in REJECTION_REASONS}
        self._dropped = {r: metrics.inputs_dropped.labels(reason=r, model=model) for r in DROP_REASONS}
        self._copy_inferences = metrics.copy_inferences
        self._copy_items = metrics.copy_items
        self._per_copy: dict[int, tuple[Any, Any]] = {}
        self._real_tokens = metrics.real_tokens
        self._padded_tokens = metrics.padded_tokens
        self._per_shape: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._batch_threads = metrics.batch_threads
        self._per_threads: dict[int, Any] = {}

    def rejected(self, reason: str) -> None:
        self._rejections[reason].inc()

    def dropped(self, reason: str) -> None:
        self._dropped[reason].inc()

    def batch_ran(
        self,
        copy: int,
        *,
        shape: tuple[int, int],
        padded_length: int,
        lengths: Sequence[int],
        seconds: float,
        queued: Sequence[float],
        threads: int = 1,
    ) -> None:
        """One model call of ``copy`` at compiled ``shape`` (batch size, sequence length), its
        rows padded to ``padded_length`` tokens: its real rows' token ``lengths``, their queue
        times, its duration and the cores (``threads``) it ran on."""
        inputs = len(lengths)
        per_shape = self._per_shape.get(shape)
        if per_shape is None:
            label = f"b{shape[0]}s{shape[1]}"
            per_shape = (
                self._real_tokens.labels(model=self.model, shape=label),
                self._padded_tokens.labels(model=self.model, shape=label),
            )
            self._per_shape[shape] = per_shape
        per_shape[0].inc(sum(lengths))
        per_shape[1].inc(shape[0] * padded_length)
        children = self._per_copy.get(copy)
        if children is None:
            children = (
                self._copy_inferences.labels(model=self.model, copy=str(copy)),
                self._copy_items.labels(model=self.model, copy=str(copy)),
            )
            self._per_copy[copy] = children
        children[0].inc()
        children[1].inc(inputs)
        counter = self._per_threads.get(threads)
        if counter is None:
            counter = self._per_threads[threads] = self._batch_threads.labels(
                model=self.model, threads=str(threads)
            )
        counter.inc()
        self.inference_duration.observe(seconds)
        self.batch_size.observe(inputs)
        self.padding_rows.inc(shape[0] - inputs)
        observe_many(self.queue_duration, queued)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, with one update per bucket touched instead of
    one per value (a batch's inputs share a handful of buckets). Same samples as observing one
    by one; falls back to that when the client library's internals are not the expected ones."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    if not values:
        return
    total.inc(sum(values))
    # observe() counts a value in the first bucket whose upper bound is >= it.
    for index, count in collections.Counter(bisect.bisect_left(bounds, v) for v in values).items():
        buckets[index].inc(count)
