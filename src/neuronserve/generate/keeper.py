"""Keeps one engine copy's processes together: ``python -m neuronserve.generate.keeper -- CMD...``.

vLLM's API server starts an engine-core process (and a resource tracker). When the API server is
killed (SIGKILL, the OOM killer), those outlive it, reparented to init, holding the copy's memory
and cores while the supervisor starts a new copy beside them. supervisord only stops a process
group when it stops a program itself, so this keeper sits between supervisord and the engine:

- it starts the engine in a process group of its own, marked with ``NEURONSERVE_ENGINE_COPY``;
- when the engine's main process ends, however it ended, it kills whatever is left of that group,
  then exits as the engine did (so supervisord restarts the copy);
- SIGTERM / SIGINT are passed to the group (the engine stops cleanly), SIGKILL after a grace;
- it records the group in ``<mark>.pgid`` (the mark is a path in the deployment's run directory):
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


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def recorded_groups(directory: Path) -> list[int]:
    """The engine process groups recorded in ``directory`` (a deployment's run directory)."""
    groups = []
    for path in directory.glob("*.pgid"):
        with contextlib.suppress(OSError, ValueError):
            groups.append(int(path.read_text().strip()))
    return groups


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: python -m neuronserve.generate.keeper -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    mark = os.environ.get(MARK, "")
    record = Path(f"{mark}.pgid") if mark else None
    if record is not None and record.is_file():  # left running by a keeper that was killed itself
        with contextlib.suppress(ValueError, OSError):
            _kill_group(int(record.read_text().strip()), signal.SIGKILL)
    engine = subprocess.Popen(command, start_new_session=True)
    if record is not None:
        record.write_text(f"{engine.pid}\n")
    stopping: list[float] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(time.monotonic())
        _kill_group(engine.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        try:
            code = engine.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
                _kill_group(engine.pid, signal.SIGKILL)
    _kill_group(engine.pid, signal.SIGKILL)  # whatever the engine left (its engine core)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
