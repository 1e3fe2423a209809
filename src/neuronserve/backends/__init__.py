"""Backends and how one is chosen. See ``base.Backend`` for the protocol."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from neuronserve.backends.base import Backend, BackendError, CoreSet, LoadedModel

if TYPE_CHECKING:
    from neuronserve.config import TraceSettings

__all__ = [
    "Backend",
    "BackendError",
    "CoreSet",
    "LoadedModel",
    "artifact_suffix",
    "call_thread_counts",
    "choose_backend",
    "copies_per_server",
    "copy_core",
    "create_backend",
    "lends_cores",
    "trace_grid",
    "usable_cores",
]

log = logging.getLogger(__name__)

BACKENDS = ("cpu", "neuronx", "neuron")


def _sdk_importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _neuron_devices() -> list[str]:
    return sorted(glob.glob("/dev/neuron[0-9]*"))


def choose_backend(
    requested: str,
    *,
    sdk_importable: Callable[[str], bool] = _sdk_importable,
    devices: Callable[[], Sequence[str]] = _neuron_devices,
) -> tuple[str, str]:
    """Resolve ``trace.backend`` to a concrete backend; returns (name, why)."""
    if requested in BACKENDS:
        return requested, f"trace.backend={requested}"
    if requested != "auto":
        raise BackendError(f"unknown backend {requested!r}; use auto, {', '.join(BACKENDS)}")
    found = list(devices())
    if not found:
        return "cpu", "auto: no /dev/neuron* devices on this host, using cpu"
    if sdk_importable("torch_neuronx"):
        return "neuronx", f"auto: torch_neuronx is importable and {len(found)} Neuron device(s) exist"
    if sdk_importable("torch_neuron"):
        return "neuron", f"auto: torch_neuron is importable and {len(found)} Neuron device(s) exist"
    return "cpu", (
        f"auto: {len(found)} Neuron device(s) exist but neither torch_neuronx nor torch_neuron is "
        "installed, using cpu (install the Neuron SDK to use them)"
    )


def create_backend(
    name: str, trace: TraceSettings, *, shared_weights: bool = False, call_threads: tuple[int, ...] = ()
) -> Backend:
    """Instantiate a concrete backend with its compiler settings (and, to serve on Neuron,
    whether copies share one multi-core load: ``serve.neuron_shared_weights``; on cpu, the
    thread counts its calls are lent: :func:`call_thread_counts`)."""
    if name == "cpu":
        from neuronserve.backends.cpu import CpuBackend

        return CpuBackend(
            auto_cast=trace.cpu_auto_cast,
            engine=trace.cpu_engine,
            quantize=trace.cpu_quantize,
            call_threads=call_threads,
        )
    if name == "neuronx":
        from neuronserve.backends.neuronx import NeuronxBackend

        return NeuronxBackend(trace.neuronx_compiler_args, shared_weights=shared_weights)
    if name == "neuron":
        from neuronserve.backends.neuron import NeuronBackend

        return NeuronBackend(
            trace.neuron_compiler_args, trace.neuron_dynamic_batch, shared_weights=shared_weights
        )
    raise BackendError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


def compiler_args_for(name: str, trace: TraceSettings) -> str:
    """The compiler arguments that affect an artifact of backend ``name`` (part of its cache key)."""
    if name == "neuronx":
        return trace.neuronx_compiler_args
    if name == "neuron":
        return f"{trace.neuron_compiler_args} dynamic_batch_size={trace.neuron_dynamic_batch}".strip()
    parts = [
        f"auto-cast={trace.cpu_auto_cast}" if trace.cpu_auto_cast != "none" else "",
        f"engine={trace.cpu_engine}" if trace.cpu_engine != "torchscript" else "",
        f"quantize={trace.cpu_quantize}" if trace.cpu_quantize != "none" else "",
    ]
    return " ".join(p for p in parts if p)


def artifact_suffix(name: str, trace: TraceSettings) -> str:
    """The file type of backend ``name``'s artifacts: TorchScript (.pt), or ONNX (.onnx) for the
    cpu backend with trace.cpu_engine=onnxruntime."""
    return ".onnx" if name == "cpu" and trace.cpu_engine == "onnxruntime" else ".pt"


def prepare_process(name: str, cores: CoreSet, copies: int, tag: str, *, shared_weights: bool = False) -> int:
    """Pin this process to ``cores`` before any model loads; returns torch threads per copy.

    Neuron: sets NEURON_RT_VISIBLE_CORES and NEURON_PROCESS_TAG, which the runtime reads once
    when the SDK is first imported, so this must run before that import. cpu: CPU affinity.
    """
    if name == "cpu":
        from neuronserve.backends.cpu import pin_process

        return pin_process(cores, copies)
    from neuronserve.backends.sdk import neuron_environment

    os.environ.update(neuron_environment(cores, tag, shared_weights=shared_weights))
    log.info("pinned to NeuronCores %s with tag %s", cores, tag)
    return 1


def copy_core(name: str, index: int, cores: CoreSet) -> int:
    """The core (counted from 0 within ``cores``) that copy ``index`` of a server runs on.

    Neuron: copies go round robin over the server's NeuronCores, one core each. cpu: 0 for every
    copy, because copies are threads over the process's whole CPU set (see ``pin_process``).
    """
    return 0 if name == "cpu" else index % len(cores)


def lends_cores(name: str, artifact_files: Sequence[str]) -> bool:
    """Whether a server's idle CPUs may be lent to a batch that runs alone (as its intra-op
    threads), which needs a model that takes a thread count per call: cpu artifacts (TorchScript's
    count is per calling thread; ONNX Runtime's is a session's, see :func:`call_thread_counts`).
    A NeuronCore is not a thread to lend."""
    return name == "cpu" and all(file.endswith((".pt", ".onnx")) for file in artifact_files)


def call_thread_counts(
    name: str, artifact_files: Sequence[str], usable: int, copies: int
) -> tuple[int, ...] | None:
    """The thread counts a lent call may run with on a server of ``usable`` CPUs and ``copies``
    copies (None: any): an ONNX artifact has a session per count (see ``cpu.onnx_thread_counts``)."""
    if name == "cpu" and any(file.endswith(".onnx") for file in artifact_files):
        from neuronserve.backends.cpu import onnx_thread_counts

        return onnx_thread_counts(usable, copies)
    return None


def call_threads_setter(name: str) -> Callable[[int], None]:
    """How a copy thread sets the intra-op threads of its next call (see :func:`lends_cores`)."""
    if name != "cpu":
        raise BackendError(f"this is a bug: {name} copies are not given threads per call")
    from neuronserve.backends.cpu import set_call_threads

    return set_call_threads


def usable_cores(name: str, cores: CoreSet) -> int:
    """How many of a server's ``cores`` its copies can keep busy: cpu, no more than the
    container's CPU limit; Neuron, every NeuronCore."""
    if name != "cpu":
        return len(cores)
    from neuronserve.backends.cpu import usable_cpus

    return usable_cpus(cores)


MAX_COPIES = 64  # serve.models_per_server's maximum


def copies_per_server(name: str, configured: int, cores: int) -> int:
    """``serve.models_per_server``, or the backend's default when it is 0, for a server of
    ``cores`` cores.

    cpu: one copy per core, one intra-op thread each, so that a loaded server keeps every core
    busy with its own batch, and an idle one lends its cores to a lone batch (see
    ``lends_cores``). Neuron: 2, so one copy keeps the NeuronCore busy while the host prepares
    the next batch. The default never exceeds what serve.models_per_server may be set to.
    """
    return configured or (min(MAX_COPIES, max(1, cores)) if name == "cpu" else 2)


def trace_grid(name: str, trace: TraceSettings) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch sizes, sequence lengths) to compile: ``trace.*``, or the backend's default grid.

    cpu: 24 shapes, since one artifact serves them all and finer buckets waste less on padding.
    Neuron: 9, since each shape is a NEFF of its own (compile time, and device memory per copy).
    """
    cpu = name == "cpu"
    batches = trace.batch_sizes or ((1, 2, 4, 8, 16, 32) if cpu else (1, 4, 8))
    lengths = trace.sequence_lengths or ((16, 32, 64, 128) if cpu else (32, 64, 128))
    return batches, lengths
