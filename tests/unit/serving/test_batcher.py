"""The batcher with a virtual clock: buckets, batch-size choice, expiry, delay, drain."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest

from neuronserve.serving.batcher import EXPLORE_EVERY, Batcher, BatcherClosedError, QueueFullError, WorkItem
from neuronserve.serving.tokenization import Encoded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    clock: Clock, *, max_queue: int = 100, delay: float = 0.0, sizes: tuple[int, ...] = (1, 8)
) -> tuple[Batcher[int], list[Any]]:
    dropped: list[Any] = []
    batcher: Batcher[int] = Batcher(
        sequence_lengths=(32, 128),
        batch_sizes=sizes,
        max_queue=max_queue,
        max_delay_s=delay,
        on_drop=dropped.extend,
        clock=clock,
    )
    return batcher, dropped


def item(clock: Clock, length: int, deadline_in: float = 10.0) -> WorkItem[int]:
    return WorkItem(length=length, deadline=clock.now + deadline_in, payload=length, enqueued_at=clock.now)


def test_smallest_bucket_that_fits() -> None:
    batcher, _ = make(Clock())
    assert [batcher.bucket(n) for n in (1, 32, 33, 128)] == [32, 32, 128, 128]
    with pytest.raises(ValueError, match="this is a bug"):
        batcher.bucket(129)


def test_oldest_bucket_first_and_smaller_items_fill_only_padding_rows() -> None:
    clock = Clock()
    batcher, _ = make(clock)
    batcher.set_costs({(1, 32): 0.01, (8, 32): 0.03, (1, 128): 0.05, (8, 128): 0.08})
    longs = [item(clock, 100), item(clock, 100)]
    batcher.submit(longs)
    clock.now += 0.001
    shorts = [item(clock, 10) for _ in range(3)]
    batcher.submit(shorts)
    batch = batcher.next_batch()
    assert batch is not None
    # two long items: batch 8 is cheaper per item (40 vs 50 ms); its 6 spare rows take the shorts
    assert (batch.sequence_length, batch.batch_size) == (128, 8)
    assert batch.items == (*longs, *shorts)
    assert batcher.depth == 0


def test_a_long_item_does_not_drag_short_ones_into_a_long_batch() -> None:
    clock = Clock()
    batcher, _ = make(clock)
    batcher.set_costs({(1, 32): 0.023, (8, 32): 0.090, (1, 128): 0.098, (8, 128): 0.357})
    long_item = item(clock, 100)
    batcher.submit([long_item])
    clock.now += 0.001
    batcher.submit([item(clock, 10) for _ in range(7)])
    first = batcher.next_batch()
    assert first is not None and (first.sequence_length, first.batch_size, first.items) == (
        128,
        1,
        (long_item,),
    )
    second = batcher.next_batch()
    assert second is not None and (second.sequence_length, second.batch_size, len(second.items)) == (32, 8, 7)


def test_batch_size_by_measured_cost_per_item() -> None:
    clock = Clock()
    batcher, _ = make(clock)
    batcher.set_costs({(1, 32): 0.010, (8, 32): 0.030, (1, 128): 0.05, (8, 128): 0.4})
    assert batcher.choose_batch_size(1, 32) == 1
    assert batcher.choose_batch_size(2, 32) == 1  # 10 ms/item beats 15 ms/item
    assert batcher.choose_batch_size(3, 32) == 1  # a tie (10 ms/item): the one without padding
    assert batcher.choose_batch_size(4, 32) == 8  # 7.5 ms/item
    assert batcher.choose_batch_size(20, 32) == 8
    batcher.submit([item(clock, 10), item(clock, 10)])
    first = batcher.next_batch()
    assert first is not None and (first.batch_size, len(first.items)) == (1, 1)
    assert batcher.depth == 1  # the other waits for the next free copy


def test_full_queue_refuses_all_or_nothing() -> None:
    clock = Clock()
    batcher, _ = make(clock, max_queue=3)
    batcher.submit([item(clock, 5), item(clock, 5)])
    with pytest.raises(QueueFullError, match="2 of 3"):
        batcher.submit([item(clock, 5), item(clock, 5)])
    assert batcher.depth == 2


def test_expired_and_cancelled_items_never_reach_a_copy() -> None:
    clock = Clock()
    batcher, dropped = make(clock)
    expiring = item(clock, 5, deadline_in=0.5)
    cancelled = item(clock, 5)
    kept = item(clock, 5)
    batcher.submit([expiring, cancelled, kept])
    cancelled.cancelled = True
    clock.now += 1.0
    batch = batcher.next_batch()
    assert batch is not None and batch.items == (kept,)
    assert sorted((reason, i is expiring) for i, reason in dropped) == [
        ("cancelled", False),
        ("expired", True),
    ]


def test_delay_only_while_every_other_copy_is_busy() -> None:
    clock = Clock()
    batcher, _ = make(clock, delay=0.002)
    batcher.submit([item(clock, 5), item(clock, 5)])  # 2 waiting, batch 8 chosen: room to fill
    # No copy is idle (this caller is the only one asking): it may wait for a fuller batch...
    decision, wait_until = batcher._select(clock.now)
    assert decision is None and wait_until == pytest.approx(clock.now + 0.002)
    # ...but once the delay has passed it takes what is there.
    clock.now += 0.003
    decision, _ = batcher._select(clock.now)
    assert decision is not None and len(decision.items) == 2


def test_a_full_batch_never_waits() -> None:
    clock = Clock()
    batcher, _ = make(clock, delay=10.0)
    batcher.submit([item(clock, 5)])  # batch 1 holds it: nothing to wait for
    decision, _ = batcher._select(clock.now)
    assert decision is not None


def test_an_idle_copy_means_no_waiting() -> None:
    clock = Clock()
    batcher, _ = make(clock, delay=10.0)
    batcher._idle = 1  # another copy is waiting for work
    batcher.submit([item(clock, 5)])
    decision, _ = batcher._select(clock.now)
    assert decision is not None


def test_blocking_hand_off_between_threads() -> None:
    batcher, _ = make(Clock())
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(batcher.next_batch()))
    worker.start()
    batcher.submit([WorkItem(length=5, deadline=1e12, payload=7, enqueued_at=100.0)])
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert got[0].items[0].payload == 7


def test_close_drains_then_stops() -> None:
    clock = Clock()
    batcher, _ = make(clock)
    batcher.submit([item(clock, 5)])
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.submit([item(clock, 5)])
    assert batcher.next_batch() is not None  # queued work still runs
    assert batcher.next_batch() is None


def test_noisy_costs_are_corrected_by_lowering_never_by_raising() -> None:
    batcher, _ = make(Clock())
    # warm-up of batch 8 ran while something else hogged the core: 20x its real cost; and
    # batch 1 of the long bucket was slowed 5x (batch 8 cannot really cost less in total)
    batcher.set_costs({(1, 32): 0.010, (8, 32): 0.600, (1, 128): 0.05, (8, 128): 0.01})
    assert batcher._costs[(8, 32)] == pytest.approx(0.080)  # capped: never dearer per item
    assert batcher._costs[(1, 128)] == pytest.approx(0.01)  # capped at the larger batch's total
    assert batcher._costs[(8, 128)] == pytest.approx(0.01)  # a fast figure is never raised
    batcher.observe(8, 32, 0.040)  # a real run shows the true cost
    assert batcher._costs[(8, 32)] == pytest.approx(0.040)
    batcher.observe(8, 32, 0.500)  # a slow run (interference) never raises it
    assert batcher._costs[(8, 32)] == pytest.approx(0.040)
    assert batcher.choose_batch_size(2, 32) == 1  # 10 ms/item beats 40/2 = 20 ms/item
    assert batcher.choose_batch_size(8, 32) == 8  # 5 ms/item


def test_an_inflated_smaller_size_does_not_lock_in_a_larger_one() -> None:
    clock = Clock()
    batcher, _ = make(clock, sizes=(1, 8, 16))
    # Warm-up beside a noisy neighbour inflated batch 1 and batch 8; batch 16 was measured
    # cleanly. Really: 10 ms, 22 ms and 37 ms.
    batcher.set_costs(
        {(1, 32): 0.050, (8, 32): 0.200, (16, 32): 0.037, (1, 128): 0.05, (8, 128): 0.2, (16, 128): 0.4}
    )
    # batch 8 cannot cost more than batch 16 in total: it is capped at 37 ms, not left at 200
    # ms (which would send 6 waiting inputs to 16 rows, mostly padding, for good)
    assert batcher._costs[(8, 32)] == pytest.approx(0.037)
    dispatched = []
    for _ in range(3):
        batcher.submit([item(clock, 5) for _ in range(6)])
        batch = batcher.next_batch()
        assert batch is not None and len(batch.items) == 6
        dispatched.append(batch.batch_size)
        batcher.observe(batch.batch_size, 32, {1: 0.010, 8: 0.022, 16: 0.037}[batch.batch_size])
    assert dispatched == [8, 8, 8]
    assert batcher._costs[(1, 32)] == pytest.approx(0.022)  # batch 8's real run capped batch 1


def test_exploration_corrects_an_inflated_batch_cost() -> None:
    clock = Clock()
    batcher, _ = make(clock)
    # warm-up of batch 8 ran beside a noisy neighbour: 70 ms looks dearer per item than 10 ms
    # for 5 waiting inputs (14 ms), though it really costs 30 ms (6 ms per item)
    batcher.set_costs({(1, 32): 0.010, (8, 32): 0.070, (1, 128): 0.05, (8, 128): 0.08})
    dispatched: list[int] = []
    while 8 not in dispatched:
        batcher.submit([item(clock, 5) for _ in range(5 - batcher.depth)])
        batch = batcher.next_batch()
        assert batch is not None
        dispatched.append(batch.batch_size)
        assert len(dispatched) <= EXPLORE_EVERY
    assert dispatched == [1] * (EXPLORE_EVERY - 1) + [8]  # one exploration in EXPLORE_EVERY
    batcher.observe(8, 32, 0.030)  # what the copy measured when batch 8 really ran
    assert batcher.choose_batch_size(5, 32) == 8  # corrected: batch 8 now wins on its own


def test_warm_up_calibrates_trace_costs_to_this_host() -> None:
    from neuronserve.serving.copies import calibrated_costs

    traced = {(1, 16): 0.010, (8, 16): 0.040, (8, 128): 0.200}
    # same host: a first call a little slower everywhere keeps the trace's precise figures ~as is
    same = calibrated_costs(traced, {(1, 16): 0.011, (8, 16): 0.041, (8, 128): 0.230})
    assert same == pytest.approx({(1, 16): 0.011, (8, 16): 0.041, (8, 128): 0.22}, rel=0.01)  # x1.1
    # a host twice as slow: every figure doubles, even where one warm-up call was lucky
    slow = calibrated_costs(traced, {(1, 16): 0.020, (8, 16): 0.081, (8, 128): 0.300})
    assert slow == pytest.approx({(1, 16): 0.020, (8, 16): 0.080, (8, 128): 0.300}, rel=0.02)
    # a faster host (more threads per copy): the warm-up figures, never scaled below the trace's
    fast = calibrated_costs(traced, {(1, 16): 0.005, (8, 16): 0.020, (8, 128): 0.100})
    assert fast == {(1, 16): 0.005, (8, 16): 0.020, (8, 128): 0.100}


def test_the_queue_is_bounded_in_tokens_too() -> None:
    dropped: list[Any] = []
    batcher = Batcher(
        sequence_lengths=(16, 128),
        batch_sizes=(1, 8),
        max_queue=100,
        max_delay_s=0.0,
        max_queue_tokens=300,
        on_drop=dropped.extend,
    )
    batcher.submit([WorkItem(length=120, deadline=1e18, payload=None) for _ in range(2)])
    assert batcher.depth == 2 and batcher.depth_tokens == 240
    with pytest.raises(QueueFullError, match=r"queue full \(240 of 300 tokens waiting\)"):
        batcher.submit([WorkItem(length=100, deadline=1e18, payload=None)])  # 3 inputs fit, 340 tokens do not
    batcher.submit(
        [WorkItem(length=10, deadline=1e18, payload=None) for _ in range(6)]
    )  # short ones still fit
    assert batcher.depth_tokens == 300
    batch = batcher.next_batch()  # the two long ones, the short ones in the padding rows
    assert batch is not None and len(batch.items) == 8 and batcher.depth_tokens == 0
    expired = WorkItem(length=10, deadline=0.0, payload=None)  # dropped, not run: its tokens go too
    batcher.submit([expired, WorkItem(length=12, deadline=1e18, payload=None)])
    assert batcher.depth_tokens == 22
    batch = batcher.next_batch()
    assert batch is not None and [item.length for item in batch.items] == [12]
    assert batcher.depth_tokens == 0 and [item for item, _ in dropped] == [expired]


@pytest.mark.parametrize("seed", range(8))
def test_build_inputs_pads_each_row_like_row_by_row_copying(seed: int) -> None:
    """The vectorised padding equals the obvious loop, segment ids and padding rows included
    (seeds from 5 on: a lone input, at its exact length or padded)."""
    import numpy as np

    from neuronserve.serving.batcher import Batch
    from neuronserve.serving.copies import build_inputs

    rng = np.random.default_rng(seed)
    size, seq = (8, 16) if seed < 5 else (1, 11 if seed == 7 else 9)
    rows = int(rng.integers(1, size + 1))
    encoded = []
    for _ in range(rows):
        n = int(rng.integers(1, seq + 1)) if seed < 5 else 9
        segments = rng.random() < 0.5 if seed < 5 else seed == 6  # the lone input: without, with
        types = rng.integers(0, 2, n) if segments else None
        encoded.append(Encoded(ids=rng.integers(1, 1000, n), type_ids=types))
    batch = Batch(seq, size, tuple(WorkItem(length=e.length, deadline=1.0, payload=_Row(e)) for e in encoded))
    (ids, mask, types_out), mask_again = build_inputs(
        batch, ("input_ids", "attention_mask", "token_type_ids")
    )
    want_ids, want_mask, want_types = (np.zeros((size, seq), dtype=np.int64) for _ in range(3))
    for row, e in enumerate(encoded):
        want_ids[row, : e.length] = e.ids
        want_mask[row, : e.length] = 1
        if e.type_ids is not None:
            want_types[row, : e.length] = e.type_ids
    assert np.array_equal(ids, want_ids)
    assert np.array_equal(mask, want_mask) and np.array_equal(mask_again, want_mask)
    assert np.array_equal(types_out, want_types)
    assert ids.dtype == mask.dtype == types_out.dtype == mask_again.dtype  # int64, as traced


@dataclass(frozen=True)
class _Row:
    """A payload with the one thing build_inputs reads of it."""

    encoded: Encoded
