"""The batcher shares out work among idle copies, lends idle cores to a batch that runs alone,
pads a batch only to its longest input where the artifacts allow, and fills spare rows with the
longest shorter items. Virtual clock; real threads where a copy has to wait."""

from __future__ import annotations

import threading
import time
from typing import Any

from neuronserve.serving.batcher import Batch, Batcher
from tests.unit.serving.test_batcher import Clock, item

SIZES = (1, 2, 4, 8, 16, 32)


def make(clock: Clock, **options: Any) -> Batcher:
    batcher = Batcher(
        sequence_lengths=options.pop("lengths", (32, 128)),
        batch_sizes=SIZES,
        max_queue=1000,
        max_delay_s=0.0,
        on_drop=lambda _dropped: None,
        clock=clock,
        **options,
    )
    # per item, larger batches are cheaper: one copy alone would take everything waiting
    batcher.set_costs({(b, s): 0.001 * s * (b**0.5) for b in SIZES for s in batcher.sequence_lengths})
    return batcher


def test_what_waits_is_shared_out_among_idle_copies() -> None:
    clock = Clock()
    batcher = make(clock)
    batcher.submit([item(clock, 20) for _ in range(32)])
    with batcher._cond:  # as next_batch holds it
        batcher._idle = 1  # another copy waits for work
        first, _ = batcher._select(clock.now)
        assert first is not None and (first.batch_size, len(first.items)) == (16, 16)
        batcher._idle = 0  # it took the rest
        second, _ = batcher._select(clock.now)
    assert second is not None and (second.batch_size, len(second.items)) == (16, 16)
    # nobody else idle: one copy takes all that waits, as before
    batcher.submit([item(clock, 20) for _ in range(32)])
    with batcher._cond:
        alone, _ = batcher._select(clock.now)
    assert alone is not None and (alone.batch_size, len(alone.items)) == (32, 32)


def test_a_lone_batch_gets_every_idle_core_and_holds_them_until_finished() -> None:
    clock = Clock()
    batcher = make(clock, cores=2, copies=2, lend_cores=True)
    got: list[Batch | None] = []

    def copy() -> None:
        got.append(batcher.next_batch())

    batcher.submit([item(clock, 20)])
    first = batcher.next_batch()
    assert first is not None and first.threads == 2  # alone, nothing else waiting: both cores
    batcher.submit([item(clock, 20)])
    other = threading.Thread(target=copy)
    other.start()
    _until(lambda: batcher.waiting_copies == 1)  # the other copy's core is lent: it waits
    assert not got and batcher.depth == 1
    batcher.finished(first)
    other.join(timeout=10)
    assert not other.is_alive() and got[0] is not None and got[0].threads == 2


def test_no_core_is_lent_while_other_work_runs_or_waits() -> None:
    clock = Clock()
    batcher = make(clock, cores=2, copies=2, lend_cores=True)
    batcher.submit([item(clock, 20), item(clock, 100)])  # two buckets: one batch each
    first = batcher.next_batch()
    assert first is not None and first.threads == 1  # another input still waits
    second = batcher.next_batch()
    assert second is not None and second.threads == 1  # the first batch runs
    batcher.finished(first)
    batcher.finished(second)
    batcher.submit([item(clock, 20)])
    third = batcher.next_batch()
    assert third is not None and third.threads == 2


def test_a_lone_copy_of_several_cores_always_runs_on_all_of_them() -> None:
    clock = Clock()
    batcher = make(clock, cores=2, copies=1, lend_cores=True)
    assert batcher.base_threads == 2
    batcher.submit([item(clock, 20), item(clock, 100)])  # more waits: still its own two cores
    batch = batcher.next_batch()
    assert batch is not None and batch.threads == 2


def test_without_lending_threads_stay_one_and_copies_never_wait_for_cores() -> None:
    clock = Clock()
    batcher = make(clock, cores=2)
    batcher.submit([item(clock, 20)])
    batch = batcher.next_batch()
    assert batch is not None and batch.threads == 1
    batcher.submit([item(clock, 20)])
    assert batcher.next_batch() is not None  # the first is still running


def test_a_batch_is_padded_to_its_longest_input_where_the_artifacts_allow() -> None:
    clock = Clock()
    trimmed = make(clock, trim_step=8)
    trimmed.submit([item(clock, 10), item(clock, 19)])
    batch = trimmed.next_batch()
    assert batch is not None and (batch.sequence_length, batch.padded_length) == (32, 24)
    trimmed.submit([item(clock, 128)])
    full = trimmed.next_batch()
    assert full is not None and full.padded_length == 128
    static = make(clock)  # Neuron: compiled lengths only
    static.submit([item(clock, 10)])
    kept = static.next_batch()
    assert kept is not None and kept.padded_length == 32


def test_spare_rows_take_the_longest_shorter_items_first() -> None:
    """They waste the least of a long row (a 10-token input in a 128-token row wastes 118)."""
    clock = Clock()
    batcher = make(clock, lengths=(32, 64, 128))
    batcher.set_costs({(b, s): 0.001 * s for b in SIZES for s in (32, 64, 128)})  # a call costs its length
    longs = [item(clock, 100) for _ in range(3)]
    batcher.submit(longs)  # the oldest: their bucket goes first, at batch 4 (3 per call beats 2)
    clock.now += 0.001
    shorts = [item(clock, 10) for _ in range(3)]
    batcher.submit(shorts)  # older than the mids, but shorter
    clock.now += 0.001
    mids = [item(clock, 50) for _ in range(3)]
    batcher.submit(mids)
    batch = batcher.next_batch()
    assert batch is not None and (batch.sequence_length, batch.batch_size) == (128, 4)
    assert batch.items == (*longs, mids[0])


def _until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)  # poll interval
