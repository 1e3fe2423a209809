"""cpu backend: TorchScript trace + freeze; pinning by CPU affinity and torch thread count."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from neuronserve.backends.base import CoreSet, LoadedModel, TorchScriptModel, torchscript_quietly

if TYPE_CHECKING:
    import torch


class CpuBackend:
    """Runs anywhere; the embedded default and the vehicle for every test on hosts without Neuron."""

    name = "cpu"

    def versions(self) -> dict[str, str]:
        # torch's own version is recorded for every backend by the tracer.
        return {}

    def compile(
        self, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dest: Path
    ) -> LoadedModel:
        import torch

        with torchscript_quietly(), torch.no_grad():
            traced = torch.jit.trace(module.eval(), example_inputs, check_trace=False)
            frozen = torch.jit.freeze(traced)
            torch.jit.save(frozen, str(dest))
        # Verify the round trip through the file, which is what serving will load.
        return self.load(dest, CoreSet((0,)))

    def load(self, artifact: Path, cores: CoreSet) -> LoadedModel:
        import torch

        del cores  # the process is pinned once by pin_process; nothing per copy
        with torchscript_quietly():
            return TorchScriptModel(torch.jit.load(str(artifact), map_location="cpu"))


def pin_process(cores: CoreSet, copies: int) -> int:
    """Pin this process to ``cores`` and size torch's thread pool; returns threads per copy.

    Each copy runs in its own thread and torch's intra-op pool is shared by the process, so the
    pool gets ``max(1, cores // copies)`` threads: with copies >= cores every copy runs
    single-threaded on its own core instead of all copies fighting over every core.
    """
    import torch

    available = os.sched_getaffinity(0)
    missing = [c for c in cores.ids if c not in available]
    if missing:
        raise ValueError(
            f"cores {cores}: CPU(s) {missing} are not available to this process "
            f"(available: {sorted(available)})"
        )
    os.sched_setaffinity(0, set(cores.ids))
    threads = max(1, len(cores) // max(1, copies))
    torch.set_num_threads(threads)
    return threads
