"""The memory plan: host and device memory each server and core will hold, checked before start.

Estimated from each model's manifest (artifact sizes, weight bytes, what the backend shares) and
the plan; every server holds every model, so each figure sums over the models:
- host, per server: the process itself (Python, torch, the app), the artifacts it loads (once
  when copies share a load, as on cpu; once per copy otherwise, since each Neuron load keeps its
  host copy), and on cpu each copy's working set at the largest shape;
- device, per NeuronCore: every artifact of every copy placed on it (separately compiled NEFFs
  and separate loads each hold their own weights: nothing in the Neuron documentation promises
  sharing), the runtime's per-core overhead, and one scratchpad for the largest shape (the
  runtime shares the scratchpad between the models of a core).
The figures are estimates: ``bench/memory.py`` measures the real ones on cpu.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from neuronserve.artifacts import Manifest
from neuronserve.backends import CoreSet
from neuronserve.deploy.inventory import Inventory
from neuronserve.deploy.plan import Plan

GIB = 1 << 30
# One server process before any model: Python, torch, transformers, the app, the gunicorn master
# (measured on cpu by bench/memory.py: ~0.40 GB).
PROCESS_BYTES = 450_000_000
# The Neuron runtime's micro-code reservation per physical NeuronCore (Neuron device memory docs).
RUNTIME_BYTES_PER_CORE = 96 << 20
# Working set of one forward pass, as a multiple of its hidden states (batch x seq x hidden x
# 4 bytes): attention scores, the feed-forward intermediate and their copies. bench/memory.py
# measured ~10x on MiniLM at b32 s128; 16 leaves room.
WORKING_SET_FACTOR = 16
DEVICE_KNOBS = (
    "lower serve.models_per_server (a further model's: models.<name>.copies), serve fewer models, compile fewer shapes (trace.batch_sizes, "
    "trace.sequence_lengths), give each server more cores (deploy.cores_per_server) so its "
    "copies spread over them, or share one load per server (serve.neuron_shared_weights=true)"
)
HOST_KNOBS = (
    "run fewer servers (deploy.servers, deploy.cores_per_server), lower serve.models_per_server "
    "(models.<name>.copies), serve fewer models, or compile fewer shapes (trace.batch_sizes, trace.sequence_lengths)"
)


class MemoryPlanError(RuntimeError):
    """The plan does not fit in this host's memory; the message names the knobs."""


@dataclass(frozen=True)
class ServerMemory:
    """Estimated bytes for one server: host memory, and device memory per global core id."""

    name: str
    host: int
    device: dict[int, int]


@dataclass(frozen=True)
class MemoryPlan:
    servers: tuple[ServerMemory, ...]
    host_available: int
    core_capacity: dict[int, int]
    summary: str

    @property
    def host_total(self) -> int:
        return sum(s.host for s in self.servers)

    def table(self) -> str:
        """Per server and per core, for --dry-run and deploy."""
        rows = [self.summary, f"{'server':<12}{'host GiB':>9}  device GiB per NeuronCore (estimate/capacity)"]
        for s in self.servers:
            cores = "  ".join(
                f"nc{c}: {b / GIB:.2f}/{self.core_capacity.get(c, 0) / GIB:.2f}"
                for c, b in sorted(s.device.items())
            )
            rows.append(f"{s.name:<12}{s.host / GIB:>9.2f}  {cores or '-'}")
        available = f"{self.host_available / GIB:.1f} GiB available" if self.host_available else "unknown"
        rows.append(
            f"host memory: {self.host_total / GIB:.1f} GiB for {len(self.servers)} servers ({available})"
        )
        return "\n".join(rows)

    def host_problem(self) -> str | None:
        """Why the servers do not fit in host memory, or None."""
        if self.host_available and self.host_total > self.host_available:
            return (
                f"the servers need ~{self.host_total / GIB:.1f} GiB of host memory but "
                f"{self.host_available / GIB:.1f} GiB is available"
            )
        return None

    def device_problems(self) -> list[str]:
        """NeuronCores whose estimate exceeds their memory, grouped by figure (one line each)."""
        over: dict[tuple[float, float], list[int]] = {}
        for s in self.servers:
            for core, used in sorted(s.device.items()):
                capacity = self.core_capacity.get(core, 0)
                if capacity and used > capacity:
                    over.setdefault((round(used / GIB, 1), round(capacity / GIB, 1)), []).append(core)
        found = []
        for (used_gib, capacity_gib), cores in over.items():
            which = (
                f"NeuronCore {cores[0]}"
                if len(cores) == 1
                else f"{len(cores)} NeuronCores ({_ranges(cores)})"
            )
            found.append(
                f"{which} would need ~{used_gib} GiB of device memory each, a NeuronCore has {capacity_gib} GiB"
            )
        return found

    def check(self) -> None:
        """Refuse a plan that does not fit, before anything starts, naming the knobs."""
        device = self.device_problems()
        host = self.host_problem()
        if device or host:
            found = [*device, *([host] if host else [])]
            knobs = DEVICE_KNOBS if device else HOST_KNOBS
            raise MemoryPlanError(f"the plan does not fit: {'; '.join(found)}; {knobs}")


def _ranges(ids: list[int]) -> str:
    return str(CoreSet(tuple(sorted(ids))))


def working_set(manifest: Manifest) -> int:
    """Bytes one forward pass of the largest compiled shape is estimated to need."""
    hidden = int(manifest.model.get("hidden_size") or 1024)
    largest = max(s.batch_size * s.sequence_length for s in manifest.shapes)
    return largest * hidden * 4 * WORKING_SET_FACTOR


def estimate(
    plan: Plan, manifests: Sequence[Manifest], inventory: Inventory, *, shared_weights: bool = False
) -> MemoryPlan:
    """The memory plan of ``plan`` serving ``manifests`` (one per model, in the order of
    ``plan.model_copies``; every server holds them all) on ``inventory``'s host.

    ``shared_weights`` (``serve.neuron_shared_weights``): each artifact is loaded once per server,
    replicated on its cores; the first replica on each device holds the weights, the others
    share them. How much of a NEFF is weights is not recorded, so the saving per further replica
    is counted as half the model's fp32 weight bytes (the weights in bf16), never more.
    """
    copies_of = [c for _name, c in plan.model_copies] or [plan.servers[0].copies if plan.servers else 1]
    if len(copies_of) != len(manifests):
        raise ValueError(f"this is a bug: {len(manifests)} manifests for {len(copies_of)} planned models")
    neuron = plan.backend.neuron_cores
    multicore = neuron and shared_weights
    servers = []
    for server in plan.servers:
        host = PROCESS_BYTES
        device: dict[int, int] = {}
        scratch_of: dict[int, int] = {}  # the runtime shares one scratchpad between a core's models
        first_copy = 0  # placements go on where the previous model's ended (see Engine.start)
        for manifest, copies in zip(manifests, copies_of, strict=True):
            facts = manifest.memory
            artifacts = sum(facts.artifact_bytes.values())
            scratch = working_set(manifest)
            loads = 1 if facts.copies_share_load or multicore else copies
            # An ONNX artifact is loaded as a session per thread count (see call_thread_counts),
            # counted for the server's CPUs: a container's CPU limit, known where it runs, only
            # ever makes them fewer.
            span = len(plan.shared_cores) if plan.shared_cores is not None else 0  # what it may borrow
            counts = plan.backend.call_thread_counts(
                list(facts.artifact_bytes), len(server.cores.ids), copies, span
            )
            loads *= len(counts or (1,))
            host += loads * artifacts + (0 if neuron else copies * scratch)
            if multicore:
                saving = sum(min(size, facts.weight_bytes // 2) for size in facts.artifact_bytes.values())
                devices_seen: set[int] = set()
                for core in server.cores.ids:
                    on_device = inventory.device_of.get(core, core)
                    first = on_device not in devices_seen
                    devices_seen.add(on_device)
                    device[core] = device.get(core, 0) + artifacts - (0 if first else saving)
                    scratch_of[core] = max(scratch_of.get(core, 0), scratch)
            elif neuron:
                for index in range(first_copy, first_copy + copies):
                    core = server.cores.ids[plan.backend.copy_core(index, server.cores)]
                    device[core] = device.get(core, 0) + artifacts
                    scratch_of[core] = max(scratch_of.get(core, 0), scratch)
            first_copy += copies
        for core in device:
            device[core] += RUNTIME_BYTES_PER_CORE + scratch_of[core]
        servers.append(ServerMemory(server.name, host, device))
    names = [name for name, _copies in plan.model_copies] or [str(m.model.get("name")) for m in manifests]
    lines = [_model_summary(m, multicore) for m in manifests]
    summary = (
        lines[0]
        if len(lines) == 1
        else "memory estimate, every server holding every model:\n"
        + "\n".join(
            f"  {name}: {line.removeprefix('memory estimate: ')}"
            for name, line in zip(names, lines, strict=True)
        )
    )
    return MemoryPlan(tuple(servers), inventory.host_memory, dict(inventory.core_memory), summary)


def _model_summary(manifest: Manifest, multicore: bool) -> str:
    facts = manifest.memory
    artifacts = sum(facts.artifact_bytes.values())
    shared = "one artifact serves several shapes" if len(facts.artifact_bytes) < len(manifest.shapes) else ""
    if multicore:
        copies = "copies share one load per server, replicated on its cores with shared weights"
    else:
        copies = "copies share one load" if facts.copies_share_load else "copies each load their own"
        if any(file.endswith(".onnx") for file in facts.artifact_bytes):
            copies += (
                " (ONNX Runtime: a session per thread count a call may get: one, a copy's share of"
                " the CPUs, all of them)"
            )
    return (
        f"memory estimate: weights {facts.weight_bytes / GIB:.2f} GiB; {len(facts.artifact_bytes)} "
        f"artifact(s) of {artifacts / GIB:.2f} GiB for {len(manifest.shapes)} shapes"
        f"{' (' + shared + ')' if shared else ''}; {copies}"
    )
