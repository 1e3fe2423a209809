"""The gunicorn heartbeat comes from a thread: a blocked-for-a-while loop keeps its worker."""

from __future__ import annotations

import asyncio
import threading
import time

from neuronserve.serving.worker import start_heartbeat


def _beats_while_the_loop_is_blocked(hung_s: float) -> tuple[int, int]:
    """Block the loop for 1.2 s (overload, say); count the heartbeats before and during it."""
    beats: list[float] = []
    alive = threading.Event()
    alive.set()

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        start_heartbeat(
            loop,
            notify=lambda: beats.append(time.monotonic()),
            alive=alive.is_set,
            interval_s=0.05,
            hung_s=hung_s,
            mark_every_s=0.05,
        )
        await asyncio.sleep(0.3)  # the loop turns normally for a while
        before = len(beats)
        blocked_at = time.monotonic()
        time.sleep(1.2)  # the fault under test: a loop that does not turn (not synchronisation)
        during = sum(1 for t in beats if t > blocked_at)
        alive.clear()
        return before, during

    return asyncio.run(main())


def test_a_busy_loop_keeps_beating() -> None:
    before, during = _beats_while_the_loop_is_blocked(hung_s=5.0)
    assert before >= 2
    assert during >= 10  # the master keeps hearing from the worker while its loop is busy


def test_a_hung_loop_stops_the_heartbeat() -> None:
    _before, during = _beats_while_the_loop_is_blocked(hung_s=0.3)
    assert during <= 8  # after ~0.3 s without a turn the beats stop, and the master replaces it
