"""The batcher: the one owner of queued work, shared by the event loop and the copy threads.

The event loop ``submit``s work items (never blocking: a full queue raises :class:`QueueFullError`).
Each copy thread calls ``next_batch`` when it is free and gets a :class:`Batch` for one compiled
shape:

- the sequence bucket is that of the oldest waiting item (first come, first served); the batch
  size is chosen for that bucket's own items, and items of smaller buckets only fill rows that
  would otherwise be padding (a long text never drags short ones into a long batch);
- the batch size is the compiled size with the lowest measured cost *per real item* for what is
  waiting (warm-up measures every shape), so two waiting items on a {1, 8} grid go to two copies
  at batch 1 rather than one batch-8 run that is three quarters padding;
- a free copy takes whatever is waiting now; it waits up to ``max_delay_s`` for a fuller batch
  only while every other copy is busy, so an idle copy never sits next to a waiting request;
- while other copies are idle, what waits is shared out among them (a 32-text request runs on
  every copy at once, not on one after the other);
- with ``trim_step`` (artifacts that run any length, verified at trace time), a batch is padded to
  its longest input rounded up to a multiple of it (``TRIM_SHORTEST`` at least), not to its
  bucket's full length, and its items
  are the oldest one and those nearest its length among the oldest waiting (a request's inputs
  are queued shortest first), so the batch holds inputs of like length; and the batch size may
  come down from the one the costs at the bucket's length chose, to the size whose plan (its
  batch, and one call for the inputs it leaves of those the larger size would take) costs the
  least per input at the lengths it runs at (a larger batch reaches further from the oldest
  input's length and pads every row to it);
- with a ``ledger`` (the cpu backend, whose copies share the server's CPUs and take a thread count
  per call), the idle cores go to what runs: a batch running alone gets every one as intra-op
  threads, batches that share out what waits split them (with ``thread_counts``, e.g. ONNX
  Runtime's sessions, a batch takes only the most of them a call can use); a lent core is busy
  until that batch is ``finished``, and one ledger counts every model of the process, so threads
  never outnumber cores.

Expired and cancelled items are dropped before they reach a copy (``on_drop`` answers them).
Work wakes the copy that went idle last: one request at a time keeps running on one copy, whose
thread pool (and caches) are warm, instead of going round the copies.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from neuronserve.artifacts import trimmed_length
from neuronserve.serving import hostcores
from neuronserve.serving.hostcores import HostCores

EXPLORE_EVERY = 16  # one dispatch in this many may try a larger batch size (see _explore)
# With trim_step, a batch's items are chosen by length among this many times its size of the
# oldest waiting items of its bucket: a bound on how far a younger input can overtake.
LENGTH_WINDOW = 4
P = TypeVar("P")  # what a work item carries for its owner (the engine: a tokenized input and its answer)


class QueueFullError(Exception):
    """The queue is at capacity, in inputs or in tokens; answer 429."""

    def __init__(self, depth: int, capacity: int, unit: str = "inputs") -> None:
        super().__init__(f"queue full ({depth} of {capacity} {unit} waiting)")
        self.depth = depth
        self.capacity = capacity


class BatcherClosedError(Exception):
    """The batcher no longer accepts work (the server is draining)."""


@dataclass(eq=False)
class WorkItem(Generic[P]):
    """One input waiting for a copy (a request with k inputs makes k items).

    ``length`` picks the sequence bucket; ``payload`` is what the owner needs to run and answer
    it (the batcher never looks inside). ``cancelled`` is set by the event loop when the client
    leaves or the deadline passes.
    """

    length: int
    deadline: float
    payload: P
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    dispatched_at: float = 0.0


@dataclass(frozen=True)
class Batch(Generic[P]):
    """Work for one call of one compiled shape: ``len(items) <= batch_size`` real rows."""

    sequence_length: int
    batch_size: int
    items: tuple[WorkItem[P], ...]
    threads: int = 1  # the cores this call may use (see Batcher's ledger)
    length: int = 0  # tokens each row is padded to; 0: the compiled sequence_length

    @property
    def padded_length(self) -> int:
        return self.length or self.sequence_length


DropReason = str  # "expired" or "cancelled"


def consistent_costs(costs: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """Per-shape costs made to respect two physical facts, per sequence length.

    A larger batch never costs less in total than a smaller one, nor more per item. Every figure
    is an upper bound of the true cost (a noisy host only ever adds time), so each fact is
    enforced by lowering the figure it contradicts, never by raising one: one inflated warm-up
    measurement cannot make its neighbours look dear, nor switch batching off.
    """
    fixed = dict(costs)
    for seq in {s for _b, s in fixed}:
        sizes = sorted(b for b, s in fixed if s == seq)
        for larger, smaller in itertools.pairwise(reversed(sizes)):  # walking down the sizes
            fixed[(smaller, seq)] = min(fixed[(smaller, seq)], fixed[(larger, seq)])
        for smaller, larger in itertools.pairwise(sizes):
            fixed[(larger, seq)] = min(fixed[(larger, seq)], fixed[(smaller, seq)] * larger / smaller)
    return fixed


class CoreLedger:
    """The CPUs of one server process, lent to the batches that run on them (cpu backend): a
    batch holds its threads' cores until it finishes. Every model's batcher in the process takes
    from one ledger, so threads never outnumber cores (a copy probing after failures aside).

    Copies that find no free core wait their turn here, first come first served, whatever their
    model: a busy model's copies, back for more the moment they finish, cannot starve another
    model's. A turn is a token of the waiting ``next_batch`` call.

    With ``host`` (:class:`~neuronserve.serving.hostcores.HostCores`), the process may run on
    ``cores`` CPUs that it shares with the deployment's other servers, ``own`` of them its own:
    a core is free when no process holds it, and a copy waiting for one another server holds
    looks again every ``hostcores.POLL_S``.
    """

    def __init__(self, cores: int, *, host: HostCores | None = None, own: int = 0) -> None:
        if cores < 1:
            raise ValueError("this is a bug: a core ledger needs at least one core")
        if host is not None and host.cores != cores:
            raise ValueError(f"this is a bug: a host ledger of {host.cores} cores for {cores}")
        self.cores = cores
        self.own = own or cores  # the process's own share (its copies' base threads divide it)
        self._host = host
        self._busy = 0
        self._working = 0  # requests in flight in the process, every model's (with ``host``)
        self._cond = threading.Condition(threading.Lock())
        self._turns: deque[object] = deque()

    def work_begins(self) -> None:
        """A request is in flight (any model's): with ``host``, the other servers stop
        borrowing this one's cores once the first is."""
        with self._cond:
            self._working += 1
            if self._working == 1 and self._host is not None:
                self._host.busy(True)

    def work_ends(self) -> None:
        with self._cond:
            self._working -= 1
            if self._working == 0 and self._host is not None:
                self._host.busy(False)

    def _state(self) -> tuple[int, bool]:
        """(free cores, whether one this process could take is held by another process: only
        polling sees such a core come back)."""
        return self._host.state() if self._host is not None else (self.cores - self._busy, False)

    def _free(self) -> int:
        return self._state()[0]

    @property
    def free(self) -> int:
        with self._cond:
            return self._free()

    def in_line(self, token: object) -> bool:
        with self._cond:
            return token in self._turns

    def others_waiting(self, token: object) -> int:
        """Copies other than ``token``'s waiting for a core."""
        with self._cond:
            return sum(1 for t in self._turns if t is not token)

    def take(self, wanted: int, token: object, fit: Callable[[int], int] | None = None) -> int:
        """Lend up to ``wanted`` free cores to ``token``'s copy if it is its turn; returns how
        many (``fit``: the most a call can use of what is free). 0: none is free, or an earlier
        copy waits; ``token`` keeps its place in line."""
        with self._cond:
            free = self._free()
            if free <= 0 or (self._turns and self._turns[0] is not token):
                if token not in self._turns:
                    self._turns.append(token)
                return 0
            granted = min(wanted, free)
            if fit is not None:
                granted = fit(granted)
            if self._host is not None:
                got = self._host.take(granted)  # another server may have taken one since
                if got < granted:
                    kept = fit(got) if (fit is not None and got) else got
                    self._host.give(got - kept)
                    granted = kept
                if granted == 0:
                    if token not in self._turns:
                        self._turns.append(token)
                    return 0
            if self._turns:
                self._turns.popleft()
            self._busy += granted
            if self._turns and self._free() > 0:
                self._cond.notify_all()  # a core is left for the next in line
            return granted

    def wait_turn(self, token: object) -> None:
        """Block while ``token`` is in line and it is not its turn with a core free."""
        with self._cond:
            while token in self._turns:
                free, elsewhere = self._state()
                first = self._turns[0] is token
                if first and free > 0:
                    return
                # Releases by this process wake it (take() and give()). The first in line polls for
                # a core another process holds (it comes back unannounced); with ``host`` every wait
                # has a backstop.
                if self._host is None:
                    self._cond.wait()
                else:
                    self._cond.wait(hostcores.POLL_S if first and elsewhere else hostcores.BACKSTOP_S)

    def leave(self, token: object) -> None:
        """``token``'s copy no longer waits for a core (no work left, or it stops)."""
        with self._cond:
            if token not in self._turns:
                return
            was_first = self._turns[0] is token
            self._turns.remove(token)
            if was_first and self._turns and self._busy < self.cores:
                self._cond.notify_all()

    def give(self, cores: int) -> None:
        with self._cond:
            self._busy -= cores
            if self._busy < 0:
                raise RuntimeError("this is a bug: more cores returned than were lent")
            if self._host is not None:
                self._host.give(cores)
            if self._turns:
                self._cond.notify_all()  # the copy whose turn it is goes


class _LastIdleFirst(threading.Condition):
    """A condition whose ``notify`` wakes the threads that began waiting last (the stdlib's
    wakes the first), for every backend: a copy back from its last batch is the warmest.

    Measured on TorchScript copies lent two threads each (all-MiniLM-L6-v2, 128 tokens): a call
    took 81 ms when consecutive calls went to alternating copies (the OpenMP team of one still
    spinning as the other's starts), 50-60 ms when they stayed on one.
    """

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters  # type: ignore[attr-defined]
        while waiters and n > 0:
            waiter = waiters[-1]
            # As the stdlib's: release, then remove, so an interruption between the two loses
            # no wake-up (the next notify finds the waiter released and only removes it).
            try:
                waiter.release()
            except RuntimeError:
                pass
            else:
                n -= 1
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)


class Batcher(Generic[P]):
    """See the module docstring. All public methods are thread-safe."""

    def __init__(
        self,
        *,
        sequence_lengths: Sequence[int],
        batch_sizes: Sequence[int],
        max_queue: int,
        max_delay_s: float,
        max_queue_tokens: int = 0,
        on_drop: Callable[[list[tuple[WorkItem[P], DropReason]]], None],
        clock: Callable[[], float] = time.monotonic,
        ledger: CoreLedger | None = None,
        copies: int = 1,
        trim_step: int = 0,
        thread_counts: Sequence[int] | None = None,
    ) -> None:
        if not sequence_lengths or not batch_sizes:
            raise ValueError("this is a bug: the batcher needs at least one compiled shape")
        self.sequence_lengths = tuple(sorted(sequence_lengths))
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_queue = max_queue
        self.max_queue_tokens = max_queue_tokens  # 0: no limit in tokens
        self.max_delay_s = max_delay_s
        self._on_drop = on_drop
        self._clock = clock
        self._queues: dict[int, deque[WorkItem[P]]] = {s: deque() for s in self.sequence_lengths}
        self._size = 0
        self._tokens = 0  # tokens of the queued inputs
        self._idle = 0  # copies waiting in next_batch for work
        self._core_waits = 0  # copies waiting in next_batch for a core (with a ledger)
        self.ledger = ledger
        self.copies = max(1, copies)
        # The thread counts a call can use (None: any); a batch is lent the most of them that fit
        # what is free, and the rest are never taken from the ledger.
        self.thread_counts = tuple(sorted({1, *thread_counts})) if thread_counts else None
        # Each copy's own share of the cores (what warm-up measures); idle ones are lent on top.
        self.base_threads = (
            self._usable_threads(max(1, ledger.own // self.copies)) if ledger is not None else 1
        )
        # Artifacts that run every multiple of trim_step tokens (Manifest.trim_step): a batch is
        # padded to its longest input rounded up to it (TRIM_SHORTEST at least), not to its
        # bucket's full length.
        self.trim_step = trim_step
        self._closed = False
        self._costs: dict[tuple[int, int], float] = {}
        self._dispatches = 0
        self._cond = _LastIdleFirst()

    # --- event loop side ------------------------------------------------------------------

    def bucket(self, length: int) -> int:
        """The smallest compiled sequence length that fits ``length`` tokens."""
        for s in self.sequence_lengths:
            if length <= s:
                return s
        raise ValueError(f"this is a bug: {length} tokens exceed every compiled length (validate first)")

    def submit(self, items: Iterable[WorkItem[P]]) -> None:
        """Queue all of ``items`` or none of them."""
        # A request's inputs shortest first: the shares its batch is split into hold like lengths.
        batch = sorted(items, key=lambda item: item.length)
        buckets = [self.bucket(item.length) for item in batch]
        with self._cond:
            if self._closed:
                raise BatcherClosedError()
            if self._size + len(batch) > self.max_queue:
                raise QueueFullError(self._size, self.max_queue)
            tokens = sum(item.length for item in batch)
            if self.max_queue_tokens and self._tokens + tokens > self.max_queue_tokens:
                raise QueueFullError(self._tokens, self.max_queue_tokens, "tokens")
            for item, s in zip(batch, buckets, strict=True):
                self._queues[s].append(item)
            self._size += len(batch)
            self._tokens += tokens
            self._cond.notify(len(batch))

    @property
    def depth(self) -> int:
        return self._size

    @property
    def waiting_copies(self) -> int:
        """Copies blocked in ``next_batch`` (for nothing to do, or for a core to be returned)."""
        return self._idle + self._core_waits

    @property
    def depth_tokens(self) -> int:
        return self._tokens

    def set_costs(self, costs: dict[tuple[int, int], float]) -> None:
        """Seconds per call of each compiled (batch size, sequence length), from warm-up."""
        with self._cond:
            self._costs = consistent_costs(costs)

    def close(self) -> None:
        """Refuse new work; copies drain what is queued, then ``next_batch`` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # --- copy thread side -----------------------------------------------------------------

    def next_batch(self) -> Batch[P] | None:
        """Block until there is work (and, with a ledger, a core); None once closed and empty."""
        dropped: list[tuple[WorkItem[P], DropReason]] = []
        turn = object()  # this call's place in the ledger's line while it waits for a core
        try:
            while True:
                with self._cond:
                    now = self._clock()
                    self._purge(now, dropped)
                    if self._size == 0:
                        if self.ledger is not None:
                            self.ledger.leave(turn)
                        if self._closed:
                            return None
                        self._wait(None)
                        continue
                    batch, wait_until = self._select(now, turn)
                    if batch is not None:
                        return batch
                    if wait_until is not None or self.ledger is None:
                        self._wait(None if wait_until is None else wait_until - now)
                        continue
                    self._core_waits += 1  # waiting for a core, outside this batcher's lock
                try:
                    self.ledger.wait_turn(turn)
                finally:
                    with self._cond:
                        self._core_waits -= 1
        finally:
            if self.ledger is not None:
                self.ledger.leave(turn)
            if dropped:
                self._on_drop(dropped)

    def finished(self, batch: Batch[P]) -> None:
        """A copy is done with ``batch``: its cores are free again (for every model's copies)."""
        if self.ledger is not None:
            self.ledger.give(batch.threads)

    def _wait(self, timeout: float | None) -> None:
        self._idle += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._idle -= 1

    def _purge(self, now: float, dropped: list[tuple[WorkItem[P], DropReason]]) -> None:
        for queue in self._queues.values():
            if not queue or not any(i.cancelled or i.deadline <= now for i in queue):
                continue
            keep: deque[WorkItem[P]] = deque()
            for item in queue:
                if item.cancelled:
                    dropped.append((item, "cancelled"))
                elif item.deadline <= now:
                    dropped.append((item, "expired"))
                else:
                    keep.append(item)
            self._size -= len(queue) - len(keep)
            self._tokens -= sum(i.length for i in queue) - sum(i.length for i in keep)
            queue.clear()
            queue.extend(keep)

    def choose_batch_size(self, waiting: int, sequence_length: int) -> int:
        """The compiled batch size with the lowest cost per real item for ``waiting`` items."""
        costs = [self._costs.get((b, sequence_length)) for b in self.batch_sizes]
        if any(c is None for c in costs):
            # Before warm-up has measured: the smallest size that holds everything waiting.
            return next((b for b in self.batch_sizes if b >= waiting), self.batch_sizes[-1])
        # Ties go to the smaller size: less padding and latency for the same modelled throughput,
        # and the size that runs gets measured (see observe), so a figure that only matches a
        # larger size's because the invariants capped it at that size gets corrected.
        per_item = [
            (float(c or 0.0) / min(waiting, b), b) for b, c in zip(self.batch_sizes, costs, strict=True)
        ]
        return min(per_item)[1]

    def observe(self, batch_size: int, sequence_length: int, seconds: float) -> None:
        """Lower a shape's cost when a real run was faster (interference only ever adds time).

        The invariants are applied again, so one fast run also caps its neighbours: a smaller
        batch at this run's total, a larger one at this run's cost per item.
        """
        shape = (batch_size, sequence_length)
        with self._cond:
            if shape in self._costs and seconds < self._costs[shape]:
                self._costs[shape] = seconds
                self._costs = consistent_costs(self._costs)

    def _select(self, now: float, turn: object = None) -> tuple[Batch[P] | None, float | None]:
        """A batch, or None and until when to wait (None: until woken)."""
        heads = [(q[0].enqueued_at, s) for s, q in self._queues.items() if q]
        oldest_at, seq = min(heads)
        # The size is chosen for the bucket's own items: shorter items may only take rows that
        # would otherwise be padding, never turn a short batch into a long one.
        own = len(self._queues[seq])
        smaller = [s for s in self.sequence_lengths if s < seq]
        available = own + sum(len(self._queues[s]) for s in smaller)
        # Copies idle right now (and a core for each) share what waits instead of one taking it all.
        free_cores = self.ledger.free if self.ledger is not None else self._idle + 1
        sharing = max(1, min(self._idle + self._core_waits + 1, free_cores))
        share = -(-own // sharing)
        size = self._explore(self._fitted_to_lengths(seq, self.choose_batch_size(share, seq), share), share)
        # A batch may wait for more inputs while it would take the last free core (every other copy
        # runs, or waits for a core): capacity is scarce, so the fuller batch is worth its delay.
        if (
            available < size
            and self.max_delay_s > 0
            and free_cores == 1
            and now < oldest_at + self.max_delay_s
            and not self._closed
            and not self._holds_turn_from_others(turn)
        ):
            return None, oldest_at + self.max_delay_s
        threads = 1
        if self.ledger is not None:
            # This batch, the shares of what still waits (as many as this model has other copies
            # to run them) and other models' copies waiting for a core split the free cores: all
            # of them for a batch that runs alone or a lone copy's, one each when there is work
            # for every copy.
            own_taken = min(size, share)
            count = own_taken + min(size - own_taken, available - own)
            shares_left = min(self.copies - 1, -(-(self._size - count) // max(1, share)))
            later = shares_left + self.ledger.others_waiting(turn)
            batches = max(1, min(free_cores, 1 + later))
            threads = self.ledger.take(
                max(self.base_threads, free_cores // batches), turn, self._usable_threads
            )
            if threads == 0:
                return None, None  # no free core, or another copy's turn: wait in line
        taken: list[WorkItem[P]] = []
        self._take(seq, min(size, share), taken, by_length=bool(self.trim_step))
        # Spare rows take the longest of the shorter items: they waste the least of the row.
        for s in sorted(smaller, reverse=True):
            self._take(s, size, taken)
        self._size -= len(taken)
        self._tokens -= sum(item.length for item in taken)
        for item in taken:
            item.dispatched_at = now
        if self._size and self._idle:
            self._cond.notify()  # an idle copy takes the next share
        length = seq
        if self.trim_step:
            length = self._run_length(seq, max(item.length for item in taken))
        return Batch(seq, size, tuple(taken), threads, length), now

    def _fitted_to_lengths(self, seq: int, size: int, share: int) -> int:
        """With trimming, the size up to ``size`` whose plan costs the least per input at the
        lengths it would run at (``size`` itself without trimming or costs): its batch, plus one
        call for what ``size`` would have taken that it leaves.

        A larger batch takes inputs further from the oldest one's length, and every row is padded
        to the longest: 4 inputs of about 35 tokens and 4 of 64 run cheaper as two calls than as
        one at 64 tokens. A shape's cost at a length below its bucket's is interpolated between
        the compiled lengths' costs (see ``_cost_at``: flat at or below the shortest compiled
        length, where trimming is not counted on to save anything).
        """
        queue = self._queues[seq]
        if not self.trim_step or size == 1 or len(queue) < 2:
            return size
        whole = _nearest(queue, min(size, share, len(queue)))  # what ``size`` would take
        best: tuple[float, int] | None = None
        for b in self.batch_sizes:
            if b > size:
                break
            chosen = _nearest(queue, min(b, share, len(queue)))
            rest = sorted(set(whole) - set(chosen))
            # the rest in one call (fewer than ``size`` items: a compiled size holds them)
            calls = [(chosen, b)] + (
                [(rest, next(c for c in self.batch_sizes if c >= len(rest)))] if rest else []
            )
            costs = [self._run_cost(queue, positions, rows, seq) for positions, rows in calls]
            if any(cost is None for cost in costs):
                return size  # before warm-up has measured
            per_input = sum(cost or 0.0 for cost in costs) / (len(chosen) + len(rest))
            if best is None or per_input < best[0]:  # ties go to the smaller size
                best = (per_input, b)
        return best[1] if best is not None else size

    def _run_cost(
        self, queue: deque[WorkItem[P]], positions: list[int], batch_size: int, seq: int
    ) -> float | None:
        """The modelled seconds of one call of ``batch_size`` rows for the items of ``queue`` at
        ``positions``, at the length they would run at."""
        return self._cost_at(batch_size, self._run_length(seq, max(queue[i].length for i in positions)))

    def _run_length(self, seq: int, longest: int) -> int:
        """The length a trimmed batch of bucket ``seq`` whose longest input has ``longest`` tokens
        runs at."""
        return min(seq, trimmed_length(longest, self.trim_step))

    def _cost_at(self, batch_size: int, length: int) -> float | None:
        """The modelled seconds of a call of ``batch_size`` rows at ``length`` tokens: linear
        between the costs of the compiled lengths around it; at or below the shortest compiled
        length, that length's cost (an upper bound: a call's fixed part does not shrink)."""
        below: tuple[int, float] | None = None
        for s in self.sequence_lengths:
            cost = self._costs.get((batch_size, s))
            if cost is None:
                return None
            if length <= s:
                if below is None or length == s:
                    return cost
                return below[1] + (cost - below[1]) * (length - below[0]) / (s - below[0])
            below = (s, cost)
        return below[1] if below is not None else None

    def _holds_turn_from_others(self, turn: object) -> bool:
        """Whether ``turn`` is in the ledger's line with another model's copy waiting too: a copy
        never holds such a turn idle waiting for a fuller batch. This model's other copies in line
        wait for a core, so they could not run what waits anyway (under load, that is every
        other copy: the batch still fills as a lone copy's would)."""
        if self.ledger is None or not self.ledger.in_line(turn):
            return False
        return self.ledger.others_waiting(turn) > self._core_waits

    def _usable_threads(self, threads: int) -> int:
        """The most threads a call can use of ``threads`` (see ``thread_counts``, which hold 1)."""
        if self.thread_counts is None:
            return threads
        return max((n for n in self.thread_counts if n <= threads), default=1)

    def _explore(self, size: int, waiting: int) -> int:
        """Now and then try the next larger size the cost model avoids while more inputs wait.

        Costs only ever go down with observations, so a size whose warm-up figure was inflated
        (a noisy neighbour during warm-up) would otherwise never run and never be corrected.
        """
        self._dispatches += 1
        if waiting > size and self._dispatches % EXPLORE_EVERY == 0:
            return next((b for b in self.batch_sizes if b > size), size)
        return size

    def _take(self, seq: int, size: int, taken: list[WorkItem[P]], *, by_length: bool = False) -> None:
        """Move up to ``size - len(taken)`` items of bucket ``seq`` to ``taken``: the oldest
        first, or (``by_length``) the oldest and those nearest its length."""
        queue = self._queues[seq]
        wanted = min(size - len(taken), len(queue))
        if wanted <= 0:
            return
        if not by_length:
            taken.extend(queue.popleft() for _ in range(wanted))
            return
        chosen = _nearest(queue, wanted)
        window = [queue.popleft() for _ in range(chosen[-1] + 1)]
        picked = set(chosen)
        taken.extend(window[i] for i in chosen)
        queue.extendleft(reversed([item for i, item in enumerate(window) if i not in picked]))


def _nearest(queue: deque[WorkItem[P]], wanted: int) -> list[int]:
    """Positions in ``queue`` (ascending) of the oldest item and the ``wanted - 1`` nearest its
    length among the oldest waiting: the batch is padded to its longest, so inputs of like length
    waste the least (see LENGTH_WINDOW)."""
    if wanted in (1, len(queue)):
        return list(range(wanted))
    window = min(len(queue), wanted * LENGTH_WINDOW)
    head = queue[0].length
    order = sorted(range(1, window), key=lambda i: (abs(queue[i].length - head), i))
    return sorted({0, *order[: wanted - 1]})
