"""The cores of this host: NeuronCores from ``neuron-ls -j``, or CPUs from the affinity mask.

``neuron-ls -j`` prints one JSON object per *device*; the core count is the sum of ``nc_count``
(the length of the list counts devices, a mistake public helpers make). A core's device is
recorded from ``neuroncore_ids`` when present, else cores are numbered device by device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from neuronserve.backends import BackendKind


class InventoryError(RuntimeError):
    """The cores of this host cannot be found; the message says why and what to do."""


@dataclass(frozen=True)
class Inventory:
    """Cores available to deployments, and (Neuron) the device of each core."""

    kind: str  # "neuron" or "cpu"
    cores: tuple[int, ...]
    device_of: dict[int, int]
    cores_per_device: int | None = None
    # Neuron: device memory of each core (its device's ``memory_size`` over its ``nc_count``).
    core_memory: dict[int, int] = field(default_factory=dict)
    # Host memory the deployment may use (MemAvailable); 0 when unknown.
    host_memory: int = 0

    def devices_for(self, cores: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({self.device_of[c] for c in cores})) if self.device_of else ()


def parse_neuron_ls(text: str) -> Inventory:
    """An Inventory from ``neuron-ls -j`` output."""
    try:
        devices: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"neuron-ls -j printed something that is not JSON ({exc})") from None
    if not isinstance(devices, list) or not devices:
        raise InventoryError("neuron-ls -j found no Neuron devices")
    device_of: dict[int, int] = {}
    core_memory: dict[int, int] = {}
    counts = set()
    next_core = 0
    for entry in sorted(devices, key=lambda d: int(d["neuron_device"])):
        device = int(entry["neuron_device"])
        count = int(entry["nc_count"])
        counts.add(count)
        ids = entry.get("neuroncore_ids") or list(range(next_core, next_core + count))
        if len(ids) != count:
            raise InventoryError(
                f"neuron-ls -j: device {device} lists {len(ids)} core ids for nc_count {count}"
            )
        memory = int(entry.get("memory_size") or 0)
        for core in ids:
            device_of[int(core)] = device
            if memory:
                core_memory[int(core)] = memory // count
        next_core = max(device_of) + 1
    cores = tuple(sorted(device_of))
    if cores != tuple(range(len(cores))):
        raise InventoryError(f"neuron-ls -j: core ids {cores[:8]}... are not 0..N-1")
    per_device = counts.pop() if len(counts) == 1 else None
    return Inventory("neuron", cores, device_of, per_device, core_memory)


def neuron_ls_tool() -> str | None:
    """``neuron-ls`` on PATH, or where aws-neuronx-tools installs it; None when absent."""
    installed = "/opt/aws/neuron/bin/neuron-ls"
    return shutil.which("neuron-ls") or (installed if os.path.exists(installed) else None)


def neuron_inventory() -> Inventory:
    """Run ``neuron-ls -j`` (the driver and tools must be installed)."""
    tool = neuron_ls_tool()
    if tool is None:
        raise InventoryError("neuron-ls not found: install aws-neuronx-tools (or use the cpu backend)")
    result = subprocess.run([tool, "-j"], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise InventoryError(
            f"neuron-ls -j failed (exit {result.returncode}): {detail}; is the Neuron driver loaded "
            "(lsmod | grep neuron)?"
        )
    return parse_neuron_ls(result.stdout)


def cpu_inventory() -> Inventory:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return Inventory("cpu", tuple(sorted(os.sched_getaffinity(0))), {})


def host_memory_available(meminfo: str | None = None, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of memory new processes may use: ``MemAvailable`` of /proc/meminfo, capped by this
    process's cgroup (v2 ``memory.max`` less ``memory.current``) inside a container; 0 if unknown."""
    try:
        text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    available = 0
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        current = int((cgroup / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return available
    if limit.isdigit():
        room = max(0, int(limit) - current)
        available = min(available, room) if available else room
    return available


def detect(
    backend: BackendKind, *, neuron_ls: Path | None = None, host_memory: int | None = None
) -> Inventory:
    """This host's inventory; ``neuron_ls`` (a saved ``neuron-ls -j``) and ``host_memory`` plan
    for another host instead."""
    if neuron_ls is not None:
        found = parse_neuron_ls(neuron_ls.read_text())
    else:
        found = neuron_inventory() if backend.neuron_cores else cpu_inventory()
    memory = host_memory if host_memory is not None else host_memory_available()
    return replace(found, host_memory=memory)
