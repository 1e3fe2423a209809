"""The kinds of backend and the facts of each: one enum, so no caller compares names.

A kind says what its cores are (CPUs of this host, or NeuronCores of ``/dev/neuron*`` devices),
how a server is pinned to them, what it compiles by default, how many copies a server holds and
whether idle cores may be lent to a running batch. The concrete backend classes (``cpu.py``,
``neuronx.py``, ``neuron.py``) import their SDKs lazily; so does everything here.

Example: a kind for a hypothetical chip adds a member and its :class:`KindFacts` row, then a
branch in :meth:`BackendKind.create`.
"""

from __future__ import annotations

import enum
import glob
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neuronserve.backends.base import Backend, BackendError, CoreSet

if TYPE_CHECKING:
    from neuronserve.config import TraceSettings

log = logging.getLogger(__name__)

MAX_COPIES = 64  # serve.models_per_server's maximum


@dataclass(frozen=True)
class KindFacts:
    """What a kind of backend is, as data. See :class:`BackendKind` for what each means."""

    neuron_cores: bool
    sdk_module: str | None
    default_batch_sizes: tuple[int, ...]
    default_sequence_lengths: tuple[int, ...]
    default_copies: int  # 0: one copy per usable core


class BackendKind(str, enum.Enum):
    """``trace.backend`` once resolved (see :func:`choose_backend`). Its value is the name used in
    paths, images, manifests and settings (``cpu``, ``neuronx``, ``neuron``)."""

    CPU = "cpu"
    NEURONX = "neuronx"  # Inferentia2 / Trainium: torch-neuronx
    NEURON = "neuron"  # Inferentia1: torch-neuron

    def __str__(self) -> str:
        return self.value

    @property
    def facts(self) -> KindFacts:
        return _FACTS[self]

    @property
    def neuron_cores(self) -> bool:
        """Its cores are NeuronCores of ``/dev/neuron*`` devices: a server is pinned by
        ``NEURON_RT_VISIBLE_CORES`` (a contiguous range, set before the SDK is imported), the
        devices are passed into containers, neuron-monitor reports them and Kubernetes allocates
        them as ``aws.amazon.com/neuroncore``. Otherwise they are this host's CPUs."""
        return self.facts.neuron_cores

    @property
    def lends_cores(self) -> bool:
        """A server's idle cores may run a lone batch as extra intra-op threads (CPUs are threads
        to lend; a NeuronCore is not)."""
        return not self.neuron_cores

    @property
    def monitor_source(self) -> str:
        """Where the exporter reads the cores' metrics from when ``monitor.sources=auto``."""
        return "neuron-monitor" if self.neuron_cores else "host"

    def default_grid(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(batch sizes, sequence lengths) compiled when ``trace.*`` names none. cpu: 24 shapes,
        since one artifact serves them all and finer buckets pad less; Neuron: 9, since each
        shape is a NEFF of its own (compile time, device memory per copy)."""
        return self.facts.default_batch_sizes, self.facts.default_sequence_lengths

    def trace_grid(self, trace: TraceSettings) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(batch sizes, sequence lengths) to compile: ``trace.*``, else :meth:`default_grid`."""
        batches, lengths = self.default_grid()
        return trace.batch_sizes or batches, trace.sequence_lengths or lengths

    def copies_per_server(self, configured: int, cores: int) -> int:
        """``serve.models_per_server``, or this kind's default when it is 0, for a server of
        ``cores`` cores. cpu: one copy per core, one intra-op thread each, so a loaded server
        keeps every core busy with its own batch and an idle one lends its cores to a lone batch.
        Neuron: 2, so one copy keeps the NeuronCore busy while the host prepares the next batch.
        The default never exceeds what serve.models_per_server may be set to."""
        default = self.facts.default_copies or min(MAX_COPIES, max(1, cores))
        return configured or default

    def copy_core(self, index: int, cores: CoreSet) -> int:
        """The core (counted from 0 within ``cores``) copy ``index`` of a server runs on: Neuron
        copies go round robin, one core each; cpu copies are threads over the whole CPU set, 0."""
        return index % len(cores) if self.neuron_cores else 0

    def artifact_suffix(self, trace: TraceSettings) -> str:
        """TorchScript (.pt) for every kind, or ONNX (.onnx) with trace.cpu_engine=onnxruntime."""
        return ".onnx" if self is BackendKind.CPU and trace.cpu_engine == "onnxruntime" else ".pt"

    def compiler_args(self, trace: TraceSettings) -> str:
        """The compiler arguments that change an artifact (part of its cache key)."""
        if self is BackendKind.NEURONX:
            return trace.neuronx_compiler_args
        if self is BackendKind.NEURON:
            return f"{trace.neuron_compiler_args} dynamic_batch_size={trace.neuron_dynamic_batch}".strip()
        parts = [
            f"auto-cast={trace.cpu_auto_cast}" if trace.cpu_auto_cast != "none" else "",
            f"engine={trace.cpu_engine}" if trace.cpu_engine != "torchscript" else "",
            f"quantize={trace.cpu_quantize}" if trace.cpu_quantize != "none" else "",
            # fp32 ONNX: attention rewritten into ONNX Runtime's fused operator where it applies
            # (cpu.export_onnx); artifacts traced before it was are traced again
            "attention=fused" if trace.cpu_engine == "onnxruntime" and trace.cpu_quantize == "none" else "",
        ]
        return " ".join(p for p in parts if p)

    def quantized(self, trace: TraceSettings) -> bool:
        """Whether its artifacts hold quantised weights (judged by their own cosine floor)."""
        return self is BackendKind.CPU and trace.cpu_quantize != "none"

    def create(
        self, trace: TraceSettings, *, shared_weights: bool = False, call_threads: tuple[int, ...] = ()
    ) -> Backend:
        """The backend with its compiler settings (to serve on Neuron: whether copies share one
        multi-core load, ``serve.neuron_shared_weights``; on cpu, the thread counts its calls may
        be lent, :meth:`call_thread_counts`)."""
        if self is BackendKind.CPU:
            from neuronserve.backends.cpu import CpuBackend

            return CpuBackend(
                auto_cast=trace.cpu_auto_cast,
                engine=trace.cpu_engine,
                quantize=trace.cpu_quantize,
                call_threads=call_threads,
            )
        if self is BackendKind.NEURONX:
            from neuronserve.backends.neuronx import NeuronxBackend

            return NeuronxBackend(trace.neuronx_compiler_args, shared_weights=shared_weights)
        from neuronserve.backends.neuron import NeuronBackend

        return NeuronBackend(
            trace.neuron_compiler_args, trace.neuron_dynamic_batch, shared_weights=shared_weights
        )

    def prepare_process(
        self,
        cores: CoreSet,
        copies: int,
        tag: str,
        *,
        shared_weights: bool = False,
        own: CoreSet | None = None,
    ) -> int:
        """Pin this process to ``cores`` before any model loads; returns torch threads per copy.

        Neuron: NEURON_RT_VISIBLE_CORES and NEURON_PROCESS_TAG, which the runtime reads once when
        the SDK is first imported, so this runs before that import. cpu: CPU affinity.
        """
        if not self.neuron_cores:
            from neuronserve.backends.cpu import pin_process

            return pin_process(cores, copies, own)
        from neuronserve.backends.sdk import neuron_environment

        os.environ.update(neuron_environment(cores, tag, shared_weights=shared_weights))
        log.info("pinned to NeuronCores %s with tag %s", cores, tag)
        return 1

    def usable_cores(self, cores: CoreSet) -> int:
        """How many of a server's ``cores`` its copies can keep busy: cpu, no more than the
        container's CPU limit; Neuron, every NeuronCore."""
        if self.neuron_cores:
            return len(cores)
        from neuronserve.backends.cpu import usable_cpus

        return usable_cpus(cores)

    def serves_lent_calls(self, artifact_files: Sequence[str]) -> bool:
        """Whether these artifacts take a thread count per call, so that idle cores can be lent
        to them (TorchScript's count is per calling thread, ONNX Runtime's a session's)."""
        return self.lends_cores and all(f.endswith((".pt", ".onnx")) for f in artifact_files)

    def call_thread_counts(
        self, artifact_files: Sequence[str], usable: int, copies: int, span: int = 0
    ) -> tuple[int, ...] | None:
        """The thread counts a lent call may run with on a server of ``usable`` CPUs and
        ``copies`` copies that may borrow up to ``span`` CPUs (its own and those it shares with
        other servers; 0: its own) (None: any): an ONNX artifact has a session per count."""
        if self.lends_cores and any(f.endswith(".onnx") for f in artifact_files):
            from neuronserve.backends.cpu import onnx_thread_counts

            return onnx_thread_counts(usable, copies, span)
        return None

    def call_threads_setter(self, artifact_files: Sequence[str]) -> Callable[[int], None]:
        """How a copy thread sets the intra-op threads of its next call: TorchScript's thread
        count; for ONNX artifacts the session its call runs on, torch (pooling, the rest) staying
        on one thread, whose OpenMP team would otherwise spin on a CPU after each call."""
        if not self.lends_cores:
            raise BackendError(f"this is a bug: {self} copies are not given threads per call")
        from neuronserve.backends.cpu import set_call_threads, set_onnx_call_threads

        return set_onnx_call_threads if any(f.endswith(".onnx") for f in artifact_files) else set_call_threads


_FACTS = {
    BackendKind.CPU: KindFacts(
        neuron_cores=False,
        sdk_module=None,
        default_batch_sizes=(1, 2, 4, 8, 16, 32),
        default_sequence_lengths=(16, 32, 64, 128),
        default_copies=0,
    ),
    BackendKind.NEURONX: KindFacts(
        neuron_cores=True,
        sdk_module="torch_neuronx",
        default_batch_sizes=(1, 4, 8),
        default_sequence_lengths=(32, 64, 128),
        default_copies=2,
    ),
    BackendKind.NEURON: KindFacts(
        neuron_cores=True,
        sdk_module="torch_neuron",
        default_batch_sizes=(1, 4, 8),
        default_sequence_lengths=(32, 64, 128),
        default_copies=2,
    ),
}
BACKENDS = tuple(kind.value for kind in BackendKind)


def _sdk_importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _neuron_devices() -> list[str]:
    return sorted(glob.glob("/dev/neuron[0-9]*"))


def parse_kind(name: str) -> BackendKind:
    """A backend name (a manifest's, a command line's) as its kind; a clear error otherwise."""
    try:
        return BackendKind(name)
    except ValueError:
        raise BackendError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}") from None


def choose_backend(
    requested: str,
    *,
    sdk_importable: Callable[[str], bool] = _sdk_importable,
    devices: Callable[[], Sequence[str]] = _neuron_devices,
) -> tuple[BackendKind, str]:
    """Resolve ``trace.backend`` to a kind; returns (kind, why)."""
    if requested in BACKENDS:
        return BackendKind(requested), f"trace.backend={requested}"
    if requested != "auto":
        raise BackendError(f"unknown backend {requested!r}; use auto, {', '.join(BACKENDS)}")
    found = list(devices())
    if not found:
        return BackendKind.CPU, "auto: no /dev/neuron* devices on this host, using cpu"
    for kind in (BackendKind.NEURONX, BackendKind.NEURON):
        module = kind.facts.sdk_module
        if module is not None and sdk_importable(module):
            return kind, f"auto: {module} is importable and {len(found)} Neuron device(s) exist"
    return BackendKind.CPU, (
        f"auto: {len(found)} Neuron device(s) exist but neither torch_neuronx nor torch_neuron is "
        "installed, using cpu (install the Neuron SDK to use them)"
    )
