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
REJECTION_REASONS = ("queue_full", "deadline", "draining", "not_ready", "unauthorized", "too_large")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Every metric one server exports. Thread-safe (copy threads update some of them)."""

    def __init__(self, server: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "neuronserve_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        # Labelled children looked up once: every request and every batch updates them.
        self._answered: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._per_copy: dict[int, tuple[Any, Any]] = {}
        self.request_duration = Histogram(
            "neuronserve_request_duration_seconds",
            "Time from request to response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "neuronserve_queue_duration_seconds",
            "Time an input waited for a copy",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "neuronserve_inference_duration_seconds",
            "Time of one model call (a whole batch)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "neuronserve_batch_size", "Real inputs per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.padding_rows = Counter(
            "neuronserve_padding_rows",
            "Batch rows that were padding (compiled size minus real inputs)",
            registry=r,
        )
        self.queue_depth = Gauge("neuronserve_queue_depth", "Inputs waiting for a copy", registry=r)
        self.inflight = Gauge("neuronserve_inflight_requests", "Requests being answered", registry=r)
        self.rejections = Counter(
            "neuronserve_rejections", "Requests refused, by reason", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:  # present at 0 from the start, so rates and panels exist
            self.rejections.labels(reason=reason)
        self.inputs_dropped = Counter(
            "neuronserve_inputs_dropped",
            "Queued inputs dropped before reaching a copy: the client left, or the deadline passed",
            ["reason"],
            registry=r,
        )
        for reason in ("cancelled", "expired"):
            self.inputs_dropped.labels(reason=reason)
        self.copies_ready = Gauge("neuronserve_copies_ready", "Model copies loaded and warmed", registry=r)
        self.worker_restarts = Gauge(
            "neuronserve_worker_restarts",
            "Times this server's master replaced its worker process since the master started",
            registry=r,
        )
        self.copies_unhealthy = Gauge(
            "neuronserve_copies_unhealthy",
            "Copies out of rotation after serve.max_failed_batches failed batches in a row",
            registry=r,
        )
        self.copy_inferences = Counter(
            "neuronserve_copy_inferences", "Model calls per copy", ["copy"], registry=r
        )
        self.copy_items = Counter("neuronserve_copy_items", "Real inputs run per copy", ["copy"], registry=r)
        self.input_tokens = Counter("neuronserve_input_tokens", "Tokens of accepted inputs", registry=r)
        self.info = Gauge(
            "neuronserve_server_info",
            "Constant 1, labelled with what this server runs",
            ["server", "model", "backend", "cores", "copies"],
            registry=r,
        )
        self._server = server

    def answered(self, route: str, status: int, seconds: float) -> None:
        """One request answered: its count by route and status, and its duration by route."""
        children = self._answered.get((route, status))
        if children is None:
            children = (
                self._requests.labels(route=route, code=str(status)),
                self.request_duration.labels(route=route),
            )
            self._answered[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def batch_ran(
        self, copy: int, inputs: int, padding: int, seconds: float, queued: Sequence[float]
    ) -> None:
        """One model call of ``copy``: ``inputs`` real rows, their queue times, and its duration."""
        children = self._per_copy.get(copy)
        if children is None:
            children = (self.copy_inferences.labels(copy=str(copy)), self.copy_items.labels(copy=str(copy)))
            self._per_copy[copy] = children
        children[0].inc()
        children[1].inc(inputs)
        self.inference_duration.observe(seconds)
        self.batch_size.observe(inputs)
        self.padding_rows.inc(padding)
        observe_many(self.queue_duration, queued)

    def describe_server(self, *, model: str, backend: str, cores: str, copies: int) -> None:
        self.info.labels(
            server=self._server, model=model, backend=backend, cores=cores, copies=str(copies)
        ).set(1)

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
