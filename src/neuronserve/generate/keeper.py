"""Keeps one engine copy's processes together: ``python -m neuronserve.generate.keeper -- CMD...``.

vLLM's API server starts an engine-core process (and a resource tracker). When the API server is
killed (SIGKILL, the OOM killer), those outlive it, reparented to init, holding the copy's memory
and cores while the supervisor starts a new copy beside them. supervisord only stops a process
group when it stops a program itself, so this keeper sits between supervisord and the engine:

- it starts the engine in a process group of its own;
- when the engine's main process ends, however it ended, it kills whatever is left of that group,
  then exits as the engine did (so supervisord restarts the copy);
- SIGTERM / SIGINT are passed to the group (the engine stops cleanly), SIGKILL after a grace;
- it records the group in ``<mark>.pgid`` (``NEURONSERVE_ENGINE_COPY``: a path in the
  deployment's run directory) with its leader's start time and the boot's id, so that a group is
  only ever killed while it is still that one (a pid can be reused, a reboot restarts the count):
  a keeper that was itself killed leaves the engine running, and the next one (or cleanup) kills
  that group first. Groups, not environments: vLLM's processes set their titles over their
  environment, so no variable can be read back from them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK = "NEURONSERVE_ENGINE_COPY"
STOP_GRACE_S = 20.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _identity(pid: int) -> str | None:
    """The boot's id and ``pid``'s start time: who ``pid`` is, unlike the number alone."""
    fields = _stat(pid)
    if fields is None:
        return None
    with contextlib.suppress(OSError):
        return f"{BOOT_ID.read_text().strip()} {fields[19]}"  # starttime, field 22 of stat
    return None


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` that this user may signal."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or int(fields[2]) != pgid or fields[0] == "Z":
            continue
        with contextlib.suppress(OSError):
            if os.geteuid() in (0, entry.stat().st_uid):
                found.append(int(entry.name))
    return found


def _read_record(path: Path) -> int | None:
    """The group a record names, if it is still that group: recorded in this boot, and its leader
    is the process recorded, or gone (the kernel reuses no pid while a group of that id lives)."""
    try:
        pgid_text, boot, started = path.read_text().split()
        pgid = int(pgid_text)
        this_boot = BOOT_ID.read_text().strip()
    except (OSError, ValueError):
        return None
    if boot != this_boot:
        return None
    leader = _identity(pgid)
    return pgid if leader is None or leader == f"{boot} {started}" else None


def recorded_groups(directory: Path) -> list[int]:
    """The engine process groups recorded in ``directory`` (a deployment's run directory) that
    still run; a record whose leader is gone or was reused names nothing."""
    return [pgid for path in directory.glob("*.pgid") if (pgid := _read_record(path)) is not None]


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _end_group(pgid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL the group and wait until none of it runs (its port is free again)."""
    _kill_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll until the kernel has taken them down


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: python -m neuronserve.generate.keeper -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    mark = os.environ.get(MARK, "")
    record = Path(f"{mark}.pgid") if mark else None
    if record is not None and (left := _read_record(record)) is not None:
        _end_group(left)  # left running by a keeper that was killed itself
    stopping: list[float] = []
    engine: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        stopping.append(time.monotonic())
        if engine is not None:
            _kill_group(engine.pid, signum)

    # before the engine starts: a stop that comes while it starts still reaches it
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    engine = subprocess.Popen(command, start_new_session=True)
    if stopping:
        _kill_group(engine.pid, signal.SIGTERM)
    try:
        if record is not None:
            record.write_text(f"{engine.pid} {_identity(engine.pid)}\n")
        while True:
            try:
                code = engine.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
                    _kill_group(engine.pid, signal.SIGKILL)
    finally:
        _end_group(engine.pid)  # whatever the engine left (its engine core)
        if record is not None:
            record.unlink(missing_ok=True)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
