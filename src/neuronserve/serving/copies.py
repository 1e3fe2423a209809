"""Model copies: each owned by one thread that loads, warms and then runs batches forever.

The event loop never runs model code. A copy loads each artifact of the manifest on its core
(the backend shares one load between copies where it can), runs every compiled shape once, and
reports per-shape costs: the trace-time figure from the manifest, or the warm-up call if that
was faster (interference only adds time). A copy is ready only after every shape answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuronserve.artifacts import Manifest
from neuronserve.backends.base import Backend, CoreSet, LoadedModel
from neuronserve.serving import libc
from neuronserve.serving.batcher import Batch, Batcher
from neuronserve.serving.tasks import Task

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how often a copy out of rotation retries the smallest shape


@dataclass(frozen=True)
class BatchOutcome:
    """What one copy did with one batch: per-item results, or the error that hit all of them."""

    batch: Batch
    results: list[Any] | None
    error: BaseException | None
    inference_s: float
    copy: int
    model_failed: bool = False  # the model call itself failed (not the inputs around it)


def build_inputs(batch: Batch, input_names: tuple[str, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Pad a batch to its shape (its compiled batch size, its padded length); returns (inputs in
    manifest order, attention mask).

    Vectorised: each row's tokens go to its first ``length`` columns, which is where a boolean
    mask of the real tokens puts a concatenation of the rows (in row-major order).
    """
    b, s = batch.batch_size, batch.padded_length
    encoded = [item.payload[0] for item in batch.items]
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
    tensors = tuple(torch.from_numpy(by_name[name]) for name in input_names)
    return tensors, torch.from_numpy(mask)


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
        batcher: Batcher,
        on_ready: Callable[[int, dict[tuple[int, int], float]], None],
        on_failed: Callable[[int, str], None],
        on_outcome: Callable[[BatchOutcome], None],
        on_health: Callable[[int, str | None], None],
        measure_lock: threading.Lock,
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
            self._models[(entry.batch_size, entry.sequence_length)] = loaded[entry.file]
        warm: dict[tuple[int, int], float] = {}
        names = self._manifest.input_names
        # Copies that share a core warm one at a time, so a warm-up figure is never the sum of
        # two copies' work; copies on other cores (Neuron) warm in parallel.
        with self._measure_lock:
            for entry in self._manifest.shapes:
                shape = (entry.batch_size, entry.sequence_length)
                inputs = tuple(torch.ones(shape, dtype=torch.int64) for _ in names)
                started = time.perf_counter()
                self._models[shape].run(inputs)
                warm[shape] = time.perf_counter() - started
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

    def _run(self, batch: Batch) -> BatchOutcome:
        started = time.perf_counter()
        model_called = False
        try:
            if self._set_threads is not None and batch.threads != self._threads:
                self._set_threads(batch.threads)
                self._threads = batch.threads
            inputs, mask = build_inputs(batch, self._manifest.input_names)
            model = self._models[(batch.batch_size, batch.sequence_length)]
            model_called = True
            outputs = model.run(inputs)
            model_called = False
            results = self._task.results(outputs, mask, [item.payload for item in batch.items])
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
