"""The batcher shares out work among idle copies, lends idle cores to a batch that runs alone,
pads a batch only to its longest input where the artifacts allow, and fills spare rows with the
longest shorter items. Virtual clock; real threads where a copy has to wait."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from neuronserve.artifacts import TRIM_SHORTEST
from neuronserve.serving.batcher import Batch, Batcher, CoreLedger
from tests.unit.serving.test_batcher import Clock, item

SIZES = (1, 2, 4, 8, 16, 32)


def make(clock: Clock, **options: Any) -> Batcher[int]:
    batcher: Batcher[int] = Batcher(
        sequence_lengths=options.pop("lengths", (32, 128)),
        batch_sizes=SIZES,
        max_queue=1000,
        max_delay_s=options.pop("max_delay_s", 0.0),
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
    batcher = make(clock, ledger=CoreLedger(2), copies=2)
    got: list[Batch[int] | None] = []

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
    batcher = make(clock, ledger=CoreLedger(2), copies=2)
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


def test_the_last_free_core_waits_for_a_fuller_batch_though_other_copies_wait_for_cores() -> None:
    """Under load every other copy runs or waits for a core: neither could run what waits, so the
    copy with the last free core lets the batch fill (up to max_delay) as a lone copy would; with a
    spare core it runs at once."""
    clock = Clock()
    ledger = CoreLedger(2)
    batcher = make(clock, ledger=ledger, copies=2, max_delay_s=0.005)
    held = object()
    assert ledger.take(1, held) == 1  # a batch of another copy runs on one core
    batcher.submit([item(clock, 20) for _ in range(3)])  # the cost model wants 4 rows
    with batcher._cond:  # as next_batch holds it
        batcher._core_waits = 1  # a third copy waits for a core
        batch, until = batcher._select(clock.now)
        assert batch is None and until == pytest.approx(clock.now + 0.005)
        batcher._core_waits = 0
    ledger.give(1)  # a spare core: no reason to wait
    with batcher._cond:
        batch, _ = batcher._select(clock.now)
    assert batch is not None and len(batch.items) == 3
    batcher.finished(batch)


def test_a_lone_copy_of_several_cores_always_runs_on_all_of_them() -> None:
    clock = Clock()
    batcher = make(clock, ledger=CoreLedger(2), copies=1)
    assert batcher.base_threads == 2
    batcher.submit([item(clock, 20), item(clock, 100)])  # more waits: still its own two cores
    batch = batcher.next_batch()
    assert batch is not None and batch.threads == 2


def test_a_servers_one_copy_borrows_every_idle_core_though_more_work_waits() -> None:
    """One copy on its server's one CPU, lent the other server's while that one idles: with more
    waiting it still runs on both, since no other copy of this model could take a core left
    free (two copies split them, as the test above shows)."""
    clock = Clock()
    batcher = make(clock, ledger=CoreLedger(2, own=1), copies=1)
    assert batcher.base_threads == 1
    batcher.submit([item(clock, 20), item(clock, 100)])  # two buckets: two batches in turn
    first = batcher.next_batch()
    assert first is not None and first.threads == 2
    batcher.finished(first)
    second = batcher.next_batch()
    assert second is not None and second.threads == 2


def test_without_lending_threads_stay_one_and_copies_never_wait_for_cores() -> None:
    clock = Clock()
    batcher = make(clock)
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
    exact = make(clock, trim_step=1)  # ONNX Runtime: the longest input's own length ...
    exact.submit([item(clock, 10), item(clock, 19)])
    batch = exact.next_batch()
    assert batch is not None and batch.padded_length == 19
    exact.submit([item(clock, 3)])  # ... but never shorter than the shortest verified
    short = exact.next_batch()
    assert short is not None and short.padded_length == TRIM_SHORTEST


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


def test_one_ledger_lends_a_process_cores_to_every_model_and_never_more() -> None:
    """Two models of one server on two CPUs: a lone batch of one takes both; the other model's
    copy waits for a core instead of running a third thread, then gets what comes back."""
    clock = Clock()
    ledger = CoreLedger(2)
    embedder, reranker = make(clock, ledger=ledger, copies=2), make(clock, ledger=ledger, copies=2)
    embedder.submit([item(clock, 20)])
    first = embedder.next_batch()
    assert first is not None and first.threads == 2 and ledger.free == 0
    got: list[Batch[int] | None] = []
    reranker.submit([item(clock, 20)])
    waiting = threading.Thread(target=lambda: got.append(reranker.next_batch()))
    waiting.start()
    _until(lambda: reranker.waiting_copies == 1)
    assert not got  # no core is free for it
    embedder.finished(first)  # woken by the other model's batcher
    waiting.join(timeout=10)
    assert not waiting.is_alive() and got[0] is not None and got[0].threads == 2
    reranker.finished(got[0])
    assert ledger.free == 2


def test_copies_waiting_for_a_core_go_first_come_first_served_across_models() -> None:
    """A busy model's copy, back for more the moment its batch ends, does not take the core
    before the other model's copy that was already waiting for it."""
    clock = Clock()
    ledger = CoreLedger(1)
    busy, other = make(clock, ledger=ledger, copies=1), make(clock, ledger=ledger, copies=1)
    busy.submit([item(clock, 20), item(clock, 100)])  # two buckets: two batches
    first = busy.next_batch()
    assert first is not None
    got: dict[str, Batch[int] | None] = {}
    other.submit([item(clock, 20)])
    waiting = threading.Thread(target=lambda: got.setdefault("other", other.next_batch()))
    waiting.start()
    _until(lambda: other.waiting_copies == 1)
    busy.finished(first)
    back = threading.Thread(target=lambda: got.setdefault("busy", busy.next_batch()))
    back.start()
    _until(lambda: "other" in got)
    assert "busy" not in got and got["other"] is not None  # its turn came first
    _until(lambda: busy.waiting_copies == 1)
    other.finished(got["other"])
    back.join(timeout=10)
    waiting.join(timeout=10)
    assert got["busy"] is not None and got["busy"].items[0].length == 100
    busy.finished(got["busy"])
    assert ledger.free == 1


def test_shares_of_a_request_split_the_idle_cores() -> None:
    """A two-text request on four idle CPUs: two batches of two threads, not one thread each
    beside two idle CPUs."""
    clock = Clock()
    ledger = CoreLedger(4)
    batcher = make(clock, ledger=ledger, copies=4)
    batcher.submit([item(clock, 20), item(clock, 20)])
    with batcher._cond:  # as next_batch holds it
        batcher._idle = 3  # the other copies wait for work
        first, _ = batcher._select(clock.now)
        batcher._idle = 2
        second, _ = batcher._select(clock.now)
    assert first is not None and second is not None
    assert (len(first.items), first.threads, len(second.items), second.threads) == (1, 2, 1, 2)
    assert ledger.free == 0


def test_a_batch_runs_with_the_most_threads_a_call_can_use_and_the_rest_stay_free() -> None:
    """Sessions of one thread and of four (an ONNX artifact on four CPUs): two shares of a
    request would each get two threads, which no session has, so each runs on one and the other
    CPUs stay free; a batch alone runs on all four."""
    clock = Clock()
    ledger = CoreLedger(4)
    batcher = make(clock, ledger=ledger, copies=4, thread_counts=(1, 4))
    batcher.submit([item(clock, 20), item(clock, 20)])
    with batcher._cond:  # as next_batch holds it
        batcher._idle = 3
        first, _ = batcher._select(clock.now)
    assert first is not None and first.threads == 1 and ledger.free == 3
    batcher.finished(first)
    with batcher._cond:
        batcher._idle = 0
        alone, _ = batcher._select(clock.now)
    assert alone is not None and alone.threads == 4 and ledger.free == 0
    batcher.finished(alone)
    assert ledger.free == 4
    # Another model of the process holds two cores: a batch alone here may have the other two,
    # runs on one, and the ledger never counts the second as lent (another copy may take it).
    other = make(clock, ledger=ledger, copies=4)
    other.submit([item(clock, 20), item(clock, 100)])  # two batches: the first takes half
    held = other.next_batch()
    assert held is not None and held.threads == 2 and ledger.free == 2
    batcher.submit([item(clock, 20)])
    give = ledger.give

    def refuse(_cores: int) -> None:
        pytest.fail("a grant is fitted inside the ledger's lock, never given back")

    ledger.give = refuse  # type: ignore[method-assign,assignment]
    partial = batcher.next_batch()
    ledger.give = give  # type: ignore[method-assign]
    assert partial is not None and partial.threads == 1 and ledger.free == 1
    batcher.finished(partial)
    other.finished(held)
    assert ledger.free == 4
    # a copy's own share is a count a call can use, too: two copies on four CPUs run on one each
    assert make(clock, ledger=CoreLedger(4), copies=2, thread_counts=(1, 4)).base_threads == 1
    assert make(clock, ledger=CoreLedger(4), copies=2, thread_counts=(1, 2, 4)).base_threads == 2


def test_one_request_at_a_time_keeps_running_on_the_copy_that_went_idle_last() -> None:
    """Two idle copies, requests one after the other: each wakes the copy back from the last one
    (its thread pool warm), not the copies in turn."""
    clock = Clock()
    batcher = make(clock, ledger=CoreLedger(2), copies=2)
    served: list[str] = []

    def copy(name: str) -> None:
        while (batch := batcher.next_batch()) is not None:
            served.append(name)
            batcher.finished(batch)

    copies = [threading.Thread(target=copy, args=(name,), daemon=True) for name in ("a", "b")]
    try:
        copies[0].start()
        _until(lambda: batcher.waiting_copies == 1)
        copies[1].start()  # idle after "a"
        _until(lambda: batcher.waiting_copies == 2)
        for n in range(1, 7):
            batcher.submit([item(clock, 20)])
            _until(lambda: len(served) == n and batcher.waiting_copies == 2)  # noqa: B023 - polled here
    finally:
        batcher.close()  # wakes every waiting copy (notify_all goes through the same notify)
        for thread in copies:
            thread.join(timeout=10)
    assert served == ["b"] * 6, served
    assert not any(thread.is_alive() for thread in copies)


def test_a_request_is_split_into_shares_of_like_lengths() -> None:
    """Its inputs are queued shortest first, so each share is padded to a length near its own."""
    clock = Clock()
    batcher = make(clock, trim_step=8, lengths=(128,))
    lengths = [100, 12, 90, 15, 110, 9, 120, 14]
    batcher.submit([item(clock, n) for n in lengths])
    with batcher._cond:
        batcher._idle = 1
        first, _ = batcher._select(clock.now)
        batcher._idle = 0
        second, _ = batcher._select(clock.now)
    assert first is not None and second is not None
    assert sorted(i.length for i in first.items) == [9, 12, 14, 15] and first.padded_length == 16
    assert sorted(i.length for i in second.items) == [90, 100, 110, 120] and second.padded_length == 120


def test_across_the_queue_a_batch_takes_the_oldest_and_those_nearest_its_length() -> None:
    clock = Clock()
    batcher = make(clock, trim_step=8, lengths=(128,))
    pairs = {(b, 128): 0.001 * (1 if b == 1 else b / 2) for b in SIZES}  # batch 2 is cheapest per item
    batcher.set_costs(pairs)
    arrivals = [30, 120, 33, 110, 31]  # one input per request, oldest first
    for n in arrivals:
        batcher.submit([item(clock, n)])
        clock.now += 0.001
    batch = batcher.next_batch()
    assert batch is not None and [i.length for i in batch.items] == [30, 31] and batch.padded_length == 32
    rest = batcher.next_batch()
    assert rest is not None and [i.length for i in rest.items] == [120, 110]  # the oldest left leads
    # without trimming (compiled lengths only) padding is the same whatever is taken: first come
    static = make(clock, lengths=(128,))
    static.set_costs(pairs)
    for n in arrivals:
        static.submit([item(clock, n)])
    kept = static.next_batch()
    assert kept is not None and [i.length for i in kept.items] == [30, 120]


# Costs on lengths (32, 64): each token of each row, and a call's fixed part.
WITH_A_FIXED_PART = {(b, s): 0.001 * s * b + 0.02 for b in SIZES for s in (32, 64)}


def test_with_trimming_a_batch_stays_as_small_as_its_like_length_inputs_run_cheapest() -> None:
    """At the bucket's length 8 inputs per call cost the least each, but the 8 waiting would run
    at 64 tokens; the 4 nearest the oldest's length run at 37, and cost less each there."""
    clock = Clock()
    batcher = make(clock, trim_step=1, lengths=(32, 64))
    batcher.set_costs(WITH_A_FIXED_PART)
    for n in [34, 64, 64, 35, 64, 36, 64, 37]:  # one input per request, oldest first
        batcher.submit([item(clock, n)])
        clock.now += 0.001
    assert batcher.choose_batch_size(8, 64) == 8  # what the costs at 64 tokens alone would run
    like = batcher.next_batch()
    assert like is not None and [i.length for i in like.items] == [34, 35, 36, 37]
    assert (like.batch_size, like.padded_length) == (4, 37)
    rest = batcher.next_batch()
    assert rest is not None and [i.length for i in rest.items] == [64] * 4 and rest.padded_length == 64
    # compiled lengths only (Neuron): every batch runs at 64 whatever it holds, so all 8 go at once
    static = make(clock, lengths=(32, 64))
    static.set_costs(WITH_A_FIXED_PART)
    static.submit([item(clock, n) for n in [34, 64, 64, 35, 64, 36, 64, 37]])
    whole = static.next_batch()
    assert whole is not None and len(whole.items) == 8


def test_with_trimming_a_batch_does_not_leave_inputs_for_more_calls_than_they_save() -> None:
    """One request of 8 inputs, the shortest queued first: alone at 33 tokens it costs the least
    per input, but the 7 left still run at 60; one call of all 8 at 60 costs less in all."""
    clock = Clock()
    batcher = make(clock, trim_step=1, lengths=(32, 64))
    batcher.set_costs(WITH_A_FIXED_PART)
    batcher.submit([item(clock, n) for n in [60] * 7 + [33]])
    batch = batcher.next_batch()
    assert batch is not None and len(batch.items) == 8 and batch.padded_length == 60


def _until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)  # poll interval
