"""The host's CPUs, lent between the server processes of one deployment (cpu backend).

Each server of a cpu deployment owns some of the host's CPUs (its *home* cores) and may run on
all of them: a batch that runs while the other servers are idle borrows their cores as intra-op
threads, and a server that gets work back takes its own cores again as soon as the batch that
borrowed them ends. So the deployment keeps several processes (one of them dying loses no
request: nginx retries the others) and a lone request still runs on every idle core.

The ledger is a file with one byte per core of the deployment, locked with open-file-description
locks (``F_OFD_SETLK``) while a batch runs on that core. The kernel is the only arbiter:

- threads never outnumber cores across the processes, without a coordinator process;
- a process that dies (SIGKILL, OOM) releases every core it held, with nothing to clean up;
- a second range of bytes, one per core, is locked by the server that owns the core while it has
  work (a request in flight): only an idle server's cores are borrowed, so under load every server
  runs on its own and none waits for a core another took in the gap between two of its batches.

A copy whose own core is still lent to another server's batch (its request came while that batch
ran) polls every :data:`POLL_S` (a core freed by another process wakes nobody here) until that
batch ends (only the first in line polls); a copy that waits for a core its own server's batch
holds is woken when that batch ends (under load, every server's copies wait so), looking again
every :data:`BACKSTOP_S` at most.

Not thread-safe: :class:`~neuronserve.serving.batcher.CoreLedger` calls it under its lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# How often a copy waiting for a core another server holds looks again (see the module docstring).
POLL_S = 0.001
# The longest any copy waits for a core without looking again (a backstop: every release this
# process makes wakes it, and releases by others are polled for by the first in line).
BACKSTOP_S = 0.05

# struct flock on Linux (x86-64 and arm64): l_type, l_whence, l_start, l_len, l_pid (0 for OFD).
_FLOCK = struct.Struct("@hhqqi4x")


def _flock(kind: int, offset: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)


class HostCores:
    """A server's view of the deployment's host-wide core ledger at ``path``.

    ``cores``: how many CPUs the deployment lends between its servers (byte ``i`` is the ``i``-th
    of them); ``home``: the indexes of this server's own, tried first and released last.
    """

    def __init__(self, path: Path, cores: int, home: Sequence[int]) -> None:
        if cores < 1 or not home or any(not 0 <= i < cores for i in home):
            raise ValueError(f"this is a bug: home cores {list(home)} of a ledger of {cores}")
        self.cores = cores
        self.home = tuple(home)
        self._order = (*self.home, *(i for i in range(cores) if i not in self.home))
        self._held: list[int] = []  # in the order taken
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        """Release everything (the kernel does it too when the process dies)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._held.clear()

    # --- the kernel's locks ---------------------------------------------------------------

    def _lock(self, offset: int) -> bool:
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, offset))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):  # another server holds it
                return False
            raise
        return True

    def _unlock(self, offset: int) -> None:
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, offset))

    def _locked_by_another(self, offset: int) -> bool:
        answer = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
        return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)

    # --- what the in-process ledger asks ----------------------------------------------------

    def lendable(self, core: int) -> bool:
        """Whether ``core`` (an index) is this server's own, or its owner has no work."""
        return core in self.home or not self._locked_by_another(self.cores + core)

    def _candidates(self) -> list[int]:
        """The cores this process could take now, its own first, then idle servers'."""
        return [i for i in self._order if i not in self._held and self.lendable(i)]

    def state(self) -> tuple[int, bool]:
        """(cores this process could take now, whether one it could take is held by another
        process), from one look at the locks: that one comes back unannounced, so only polling
        sees it; the others are this process's own batches', whose end wakes a waiting copy."""
        held = [self._locked_by_another(i) for i in self._candidates()]
        return held.count(False), any(held)

    def free(self) -> int:
        """Cores this process could take now (see :meth:`take`)."""
        return self.state()[0]

    def take(self, wanted: int) -> int:
        """Lock up to ``wanted`` free cores, this server's own first; how many it got."""
        got = 0
        for i in self._candidates():
            if got >= wanted:
                break
            if self._lock(i):
                self._held.append(i)
                got += 1
        return got

    def give(self, count: int) -> None:
        """Release ``count`` of the held cores, borrowed ones first."""
        if count > len(self._held):
            raise RuntimeError("this is a bug: more host cores returned than were held")
        borrowed_first = sorted(self._held, key=lambda i: i in self.home)
        for i in borrowed_first[:count]:
            self._unlock(i)
            self._held.remove(i)

    def busy(self, working: bool) -> None:
        """This server has work (a request in flight), or no longer: while it has, no other
        server borrows its cores. Best effort: a lock that cannot be set or dropped (the ledger
        file gone) only means borrowing as if it were idle, never a failed request."""
        for i in self.home:
            try:
                if working:
                    self._lock(self.cores + i)
                else:
                    self._unlock(self.cores + i)
            except OSError:
                log.warning("the core ledger could not mark this server %s", "busy" if working else "idle")
                return
