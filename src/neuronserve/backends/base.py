"""The Backend protocol: the only seam between neuronserve and a compiler/runtime.

A backend compiles a model at one static shape and loads the result onto a set of cores. It is
always given whole, padded batches of a compiled shape; padding and bucketing live in the
batcher, never here. Only modules in this package import torch-neuron or torch-neuronx, and only
lazily, so ``import neuronserve`` works on any host.

Example, a backend for a hypothetical SDK::

    class MyBackend:
        name = "mychip"
        sharing = Sharing(shapes=False, copies=False)

        def versions(self) -> dict[str, str]:
            return {"mychip-sdk": mychip.__version__}

        def compile(self, module, example_inputs, dest):
            traced = mychip.trace(module, example_inputs)
            torch.jit.save(traced, dest)
            return TorchScriptModel(traced)

        def load(self, artifact, cores, start_nc):
            with mychip.place(start_nc):
                return TorchScriptModel(torch.jit.load(artifact))
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch


class BackendError(RuntimeError):
    """A backend cannot do what was asked (for example its SDK is missing); the message says why."""


@dataclass(frozen=True)
class CoreSet:
    """The cores one server process owns: NeuronCores on Neuron hosts, CPUs on the cpu backend.

    ``ids`` are global indices, contiguous and increasing (the Neuron runtime requires it).
    """

    ids: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> CoreSet:
        """Parse ``NEURON_RT_VISIBLE_CORES`` syntax: ``"0"``, ``"0-3"``, ``"3,4,5"``, ``"3-5,6"``."""
        ids: list[int] = []
        for raw in text.split(","):
            part = raw.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                start, end = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise ValueError(f"cores {text!r}: use a range like 0-3 or a list like 0,1") from None
            if start < 0 or end < start:
                raise ValueError(f"cores {text!r}: {part} is not an increasing range of indices")
            ids.extend(range(start, end + 1))
        if not ids:
            raise ValueError(f"cores {text!r}: name at least one core, e.g. 0 or 0-1")
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"cores {text!r}: cores must be contiguous and increasing, e.g. 2-3")
        return cls(tuple(ids))

    def __str__(self) -> str:
        """Compact ``NEURON_RT_VISIBLE_CORES`` syntax: ``0-3``, or ``0,2-3`` for CPU sets."""
        parts: list[str] = []
        start = prev = self.ids[0]
        for core in (*self.ids[1:], None):
            if core is not None and core == prev + 1:
                prev = core
                continue
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            if core is not None:
                start = prev = core
        return ",".join(parts)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Sharing:
    """What a backend shares, recorded in the manifest; the memory plan counts everything else.

    ``shapes``: one compiled artifact can run several shapes, so the tracer verifies an existing
    artifact at each new shape before compiling another (each artifact holds its own weights).
    ``copies``: the copies of one server run one loaded artifact instead of loading their own.
    ``trim_step``: with ``shapes``, the tracer verifies the artifacts at every multiple of this
    many tokens from ``TRIM_SHORTEST`` up, so that a batch is padded only to its longest input
    rounded up to it (see ``artifacts.trimmed_length``).
    """

    shapes: bool
    copies: bool
    trim_step: int = 8


class LoadedModel(Protocol):
    """A compiled model loaded onto cores; ``run`` takes and returns CPU tensors."""

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Run one whole batch of a compiled shape; inputs are in the manifest's input order."""
        ...


@runtime_checkable
class ArrayModel(Protocol):
    """A loaded model that also runs numpy arrays in and out (ONNX Runtime's own types): serving
    calls ``run_arrays`` instead of ``run``, with no torch tensor on either side. Each conversion
    costs microseconds, and right after a call, with the model's weights through the caches,
    every step costs several times its usual time: at one client, 0.06 ms of a request."""

    def run_arrays(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """``run`` on numpy arrays (int64 inputs; float32 outputs)."""
        ...


class Backend(Protocol):
    """A compiler and runtime for one kind of core. See the module docstring for an example."""

    name: str
    sharing: Sharing

    def versions(self) -> dict[str, str]:
        """Versions of the SDK and compiler, recorded in the manifest and in every cache key."""
        ...

    def compile(
        self, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dest: Path
    ) -> LoadedModel:
        """Compile ``module`` at the shape of ``example_inputs``, save it to ``dest`` and return
        the compiled model ready to run, so the tracer verifies exactly what it saved."""
        ...

    def load(self, artifact: Path, cores: CoreSet, start_nc: int) -> LoadedModel:
        """Load one saved artifact for a process that owns ``cores``, placed on the core
        ``start_nc`` (counted from 0 within ``cores``; the copy's own core on Neuron)."""
        ...


@contextlib.contextmanager
def torchscript_quietly() -> Iterator[None]:
    """Use TorchScript without torch's deprecation notices.

    TorchScript is the artifact format torch-neuronx and torch-neuron produce (their ``trace``
    returns a ScriptModule), so neuronserve uses it on purpose for every backend; torch >= 2.10
    warns on each ``torch.jit`` call regardless.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r".*TorchScript.* deprecated", category=DeprecationWarning)
        yield


class TorchScriptModel:
    """A loaded TorchScript module (all three backends save TorchScript)."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self._module = module

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        import torch

        with torch.inference_mode():
            out = self._module(*inputs)
        return tuple(out) if isinstance(out, tuple | list) else (out,)
