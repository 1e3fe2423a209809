"""cpu backend: TorchScript trace + freeze; pinning by CPU affinity and torch thread count.

A frozen trace of an encoder runs any (batch, sequence) shape, so one artifact serves every
shape the tracer verifies it at, and the copies of a server share that one loaded module
(TorchScript inference is safe from several threads): a server holds the weights once,
whatever its number of shapes and copies. Measured on all-MiniLM-L6-v2: the shared artifact
runs each grid shape within noise of an artifact traced at that very shape.

With ``trace.cpu_auto_cast=bf16`` every ``nn.Linear`` runs in bfloat16 (weights stored in bf16,
activations cast on the way in, fp32 out) and everything else stays fp32: the CPU counterpart of
neuronx-cc's ``--auto-cast matmult --auto-cast-type bf16``. On CPUs with AMX or AVX512-BF16,
oneDNN runs those matmuls natively, which is where a transformer encoder spends its time.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from neuronserve.backends.base import CoreSet, LoadedModel, Sharing, TorchScriptModel, torchscript_quietly

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)


@functools.cache
def _bf16_linear_class() -> type[torch.nn.Module]:
    import torch

    class Bf16Linear(torch.nn.Module):
        """``nn.Linear`` with bf16 weights: input cast to bf16, output cast back to its dtype."""

        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
            bias = linear.bias
            self.bias = (
                None
                if bias is None
                else torch.nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias)
            return out.to(x.dtype)

    return Bf16Linear


def cast_linears_to_bf16(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose ``nn.Linear`` layers compute in bf16 (the original is untouched)."""
    import torch

    bf16_linear = _bf16_linear_class()
    converted = copy.deepcopy(module)
    swaps = [
        (parent, name, child)
        for parent in converted.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, bf16_linear(child))
    return converted


class CpuBackend:
    """Runs anywhere; the embedded default and the vehicle for every test on hosts without Neuron."""

    name = "cpu"
    sharing = Sharing(shapes=True, copies=True)

    def __init__(self, auto_cast: str = "none") -> None:
        if auto_cast not in ("none", "bf16"):
            raise ValueError(f"trace.cpu_auto_cast={auto_cast!r}: use none or bf16")
        self.auto_cast = auto_cast
        # The tracer compiles every shape from the same eager module: cast it once, not per shape.
        self._cast: tuple[torch.nn.Module, torch.nn.Module] | None = None
        # One loaded module per artifact file, shared by every copy that loads it.
        self._loaded: dict[Path, LoadedModel] = {}
        self._load_lock = threading.Lock()

    def versions(self) -> dict[str, str]:
        # torch's own version is recorded for every backend by the tracer.
        return {}

    def compile(
        self, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dest: Path
    ) -> LoadedModel:
        import torch

        if self.auto_cast == "bf16":
            module = self._bf16_copy(module)
        with torchscript_quietly(), torch.no_grad():
            traced = torch.jit.trace(module.eval(), example_inputs, check_trace=False)
            frozen = torch.jit.freeze(traced)
            torch.jit.save(frozen, str(dest))
        # Verify the round trip through the file, which is what serving will load.
        return _load_file(dest)

    def _bf16_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        import torch

        if self._cast is None or self._cast[0] is not module:
            if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                log.warning(
                    "trace.cpu_auto_cast=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); "
                    "the bf16 matmuls will be emulated and likely slower than fp32"
                )
            self._cast = (module, cast_linears_to_bf16(module))
        return self._cast[1]

    def load(self, artifact: Path, cores: CoreSet, start_nc: int) -> LoadedModel:
        del cores, start_nc  # the process is pinned once by pin_process; nothing per copy
        key = artifact.resolve()
        with self._load_lock:
            if key not in self._loaded:
                self._loaded[key] = _load_file(artifact)
            return self._loaded[key]


def _load_file(artifact: Path) -> LoadedModel:
    import torch

    with torchscript_quietly():
        return TorchScriptModel(torch.jit.load(str(artifact), map_location="cpu"))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs this process's cgroup may use (its quota over its period, rounded up), or None
    without a limit (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``)."""
    try:
        quota_text, period_text = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota_text = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period_text = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota_text in ("max", "-1"):
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return max(1, -(-quota // period)) if quota > 0 and period > 0 else None


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
    # In a container with a CPU limit (a Kubernetes pod) the affinity may list every CPU of the
    # node: size the pool by the limit, or the copies are throttled.
    usable = min(len(cores), cgroup_cpu_limit() or len(cores))
    threads = max(1, usable // max(1, copies))
    torch.set_num_threads(threads)
    return threads
