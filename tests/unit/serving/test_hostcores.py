"""The host-wide core ledger: servers of one deployment lend each other CPUs through file locks.

Two :class:`HostCores` on one file in one process stand for two servers (open-file-description
locks conflict between descriptions, as between processes); the death test uses a real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from neuronserve.serving.batcher import CoreLedger
from neuronserve.serving.hostcores import HostCores


@pytest.fixture()
def ledger_file(tmp_path: Path) -> Path:
    return tmp_path / "cores.ledger"


def test_a_lone_server_borrows_every_idle_core_and_threads_never_outnumber_cores(ledger_file: Path) -> None:
    a, b = HostCores(ledger_file, 2, [0]), HostCores(ledger_file, 2, [1])
    assert a.free() == 2 and b.free() == 2
    assert a.take(2) == 2
    assert b.free() == 0 and b.take(1) == 0
    a.give(1)  # the borrowed core goes back first
    assert b.free() == 1 and b.take(2) == 1
    assert a.take(1) == 0  # both held: one each
    a.give(1)
    b.give(1)
    assert a.free() == 2 and b.free() == 2
    with pytest.raises(RuntimeError, match="bug"):
        a.give(1)


def test_a_server_with_work_keeps_its_cores_from_the_others(ledger_file: Path) -> None:
    """Under load no server borrows: a core free only between two of its owner's batches is not
    taken, so the owner never waits for it."""
    a, b = HostCores(ledger_file, 2, [0]), HostCores(ledger_file, 2, [1])
    b.busy(True)
    assert not a.lendable(1) and b.lendable(0)
    assert a.free() == 1 and a.take(2) == 1  # its own core only
    assert b.take(1) == 1
    a.give(1)
    b.give(1)
    b.busy(False)
    assert a.lendable(1)
    assert a.take(2) == 2


def test_the_kernel_returns_a_killed_servers_cores(ledger_file: Path) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib\n"
            "from neuronserve.serving.hostcores import HostCores\n"
            f"h = HostCores(pathlib.Path({str(ledger_file)!r}), 2, [0])\n"
            "h.busy(True)\n"
            "print(h.take(2), flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "2"
            b = HostCores(ledger_file, 2, [1])
            assert b.free() == 0 and not b.lendable(0)
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
            assert b.free() == 2 and b.lendable(0)
            b.close()
        finally:
            holder.kill()


def test_a_copy_waiting_for_another_servers_core_gets_it_when_that_batch_ends(ledger_file: Path) -> None:
    a = CoreLedger(2, host=HostCores(ledger_file, 2, [0]), own=1)
    b = CoreLedger(2, host=HostCores(ledger_file, 2, [1]), own=1)
    first, second = object(), object()
    a.work_begins()
    assert a.take(2, first) == 2  # a lone request's batch on every core
    b.work_begins()  # then a request reaches b
    assert b.free == 0 and b.take(1, second) == 0 and b.in_line(second)
    got: list[int] = []

    def wait_then_take() -> None:
        b.wait_turn(second)
        got.append(b.take(2, second))

    waiter = threading.Thread(target=wait_then_take, daemon=True)  # a hang fails, not blocks exit
    waiter.start()
    a.give(2)  # the lent batch ends (a's request is still being answered)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert got == [1]  # its own core: a has work, so its core is not lent
    assert a.take(2, first) == 1  # b has work: a takes its own core only
    a.give(1)
    a.work_ends()
    b.give(1)
    assert b.take(2, second) == 2  # a is idle now: b borrows its core
    b.give(2)
    b.work_ends()
