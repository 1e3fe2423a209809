"""cpu backend: TorchScript trace + freeze, or ONNX export; pinning by CPU affinity; per-call threads.

A frozen trace of an encoder runs any (batch, sequence) shape, so one artifact serves every
shape the tracer verifies it at, and the copies of a server share that one loaded module
(TorchScript inference is safe from several threads): a server holds the weights once,
whatever its number of shapes and copies. Measured on all-MiniLM-L6-v2: the shared artifact
runs each grid shape within noise of an artifact traced at that very shape.

With ``trace.cpu_engine=onnxruntime`` the artifact is an ONNX export (dynamic batch and sequence
axes, so it too runs any shape) run by ONNX Runtime, optionally with int8 weights
(``trace.cpu_quantize=int8``, dynamic quantisation per channel). A server loads it as one
session per thread count its calls may be lent (see :func:`onnx_thread_counts`): one thread, a
copy's own share of the CPUs, and every usable CPU, for a batch that runs alone. Copies share
them (a session's ``run`` is thread-safe; serving calls it on numpy arrays, see
:class:`~neuronserve.backends.base.ArrayModel`), and each call takes the session of the thread count
its copy was lent: ONNX Runtime fixes a session's threads when it is made, and two calls on one
session of two threads contend for its pool (measured: 15-20% fewer texts/s than two sessions
of one thread each, when every copy is busy). The price is the weights held once per session.

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

from neuronserve.backends.base import (
    BackendError,
    CoreSet,
    LoadedModel,
    Sharing,
    TorchScriptModel,
    torchscript_quietly,
)

if TYPE_CHECKING:
    import numpy as np
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

    def __init__(
        self,
        auto_cast: str = "none",
        engine: str = "torchscript",
        quantize: str = "none",
        call_threads: tuple[int, ...] = (),
    ) -> None:
        if auto_cast not in ("none", "bf16"):
            raise ValueError(f"trace.cpu_auto_cast={auto_cast!r}: use none or bf16")
        if engine not in ("torchscript", "onnxruntime") or quantize not in ("none", "int8"):
            raise ValueError(f"this is a bug: cpu engine {engine!r}, quantize {quantize!r}")
        self.auto_cast = auto_cast
        self.engine = engine
        # ONNX Runtime runs every length as it comes (measured on all-MiniLM-L6-v2, time follows
        # the length: 8 texts of 9 tokens take 0.63x of the same at 16), so its batches are padded
        # to their longest input exactly (to a multiple of 8, as TorchScript's always are, if the
        # tracer finds a length it does not reproduce; see trace._verify_trim).
        self.sharing = Sharing(shapes=True, copies=True, trim_step=1 if engine == "onnxruntime" else 8)
        self.quantize = quantize
        # The thread counts a server's copies are lent (the batcher's): an ONNX artifact gets a
        # session for each. None given (tracing): one thread.
        self.call_threads = call_threads or (1,)
        # The tracer compiles every shape from the same eager module: cast it once, not per shape.
        self._cast: tuple[torch.nn.Module, torch.nn.Module] | None = None
        # One loaded module per artifact file, shared by every copy that loads it.
        self._loaded: dict[Path, LoadedModel] = {}
        self._load_lock = threading.Lock()

    def versions(self) -> dict[str, str]:
        # torch's own version is recorded for every backend by the tracer.
        if self.engine != "onnxruntime":
            return {}
        try:
            from importlib import metadata

            return {"onnxruntime": metadata.version("onnxruntime"), "onnx": metadata.version("onnx")}
        except metadata.PackageNotFoundError as exc:
            raise BackendError(
                f"trace.cpu_engine=onnxruntime needs {exc.name}: pip install 'neuronserve[trace]' "
                "(or set trace.cpu_engine=torchscript)"
            ) from None

    def compile(
        self, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dest: Path
    ) -> LoadedModel:
        import torch

        if self.engine == "onnxruntime":
            export_onnx(module, example_inputs, dest, int8=self.quantize == "int8")
            return _load_onnx(dest, threads=(1,))  # costs are measured for one core, as torchscript's
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
                if artifact.suffix == ".onnx":
                    self._loaded[key] = _load_onnx(artifact, threads=self.call_threads)
                else:
                    self._loaded[key] = _load_file(artifact)
            return self._loaded[key]


def _load_file(artifact: Path) -> LoadedModel:
    import torch

    with torchscript_quietly():
        return TorchScriptModel(torch.jit.load(str(artifact), map_location="cpu"))


def _dynamic_axes(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[dict[int, str]]:
    """For each output, which dimensions follow the batch and the sequence: found by running the
    module at the example's shape and at one row more and one token less (never more: the example
    may be at the model's longest)."""
    import torch

    b, s = example_inputs[0].shape
    other = tuple(torch.cat([t, t[:1]])[:, : s - 1] for t in example_inputs)
    with torch.no_grad():
        first, second = tuple(module(*example_inputs)), tuple(module(*other))
    axes = []
    for given, changed in zip(first, second, strict=True):
        named = {}
        for dim, (x, y) in enumerate(zip(given.shape, changed.shape, strict=True)):
            if (x, y) == (b, b + 1):
                named[dim] = "batch"
            elif (x, y) == (s, s - 1):
                named[dim] = "sequence"
        axes.append(named)
    return axes


def export_onnx(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dest: Path, *, int8: bool
) -> None:
    """Export ``module`` to ONNX at ``dest`` with dynamic batch and sequence axes (int8: its
    weights quantised per channel, activations quantised as they come)."""
    import warnings

    import torch

    input_names = list(getattr(module, "input_names", [f"input_{i}" for i in range(len(example_inputs))]))
    output_axes = _dynamic_axes(module, example_inputs)
    output_names = list(getattr(module, "output_names", [f"output_{i}" for i in range(len(output_axes))]))
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes.update(dict(zip(output_names, output_axes, strict=True)))
    fp32 = dest.with_name(dest.name + ".fp32") if int8 else dest
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter (its deprecation notice) and the tracer's notices
            # about shape comparisons, which verification against eager covers.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                example_inputs,
                str(fp32),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        _keep_every_input(fp32, input_names)  # fp32 is dest itself without int8
        if int8:
            _quantize(fp32, dest)
        else:
            _fuse_attention(module, dest, input_names, example_inputs)
    except BaseException:
        dest.unlink(missing_ok=True)  # nothing half-written is left beside the artifacts
        raise
    finally:
        if int8:
            fp32.unlink(missing_ok=True)


# ONNX Runtime's fusions other than attention's (SkipLayerNormalization, BiasGelu,
# EmbedLayerNormalization) ran slower on CPU than the exported graph: 1.01-1.10x the time on one
# thread, all-MiniLM-L6-v2; attention's alone took 0.95-1.01x on one thread and 0.85-0.97x on two.
_OTHER_FUSIONS = (
    "enable_skip_layer_norm",
    "enable_embed_layer_norm",
    "enable_bias_gelu",
    "enable_gelu",
    "enable_bias_skip_layer_norm",
    "enable_layer_norm",
    "enable_gelu_approximation",
)


def _fuse_attention(
    module: torch.nn.Module, path: Path, input_names: list[str], example_inputs: tuple[torch.Tensor, ...]
) -> int:
    """Rewrite the exported attention blocks at ``path`` into ONNX Runtime's fused Attention
    operator, when its optimizer recognises them and the result answers as the export did on a
    padded sample; returns how many it fused (0: the file is left as exported). The tracer then
    verifies the file against eager PyTorch at every shape, as any artifact."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    for flag in _OTHER_FUSIONS:
        if hasattr(options, flag):
            setattr(options, flag, False)
    # The model's own sizes (a wrapped transformers model's config), else the optimizer's guess.
    config = getattr(getattr(module, "model", None), "config", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    # What it could not fuse is not the tracer's user's business: its modules' loggers (top-level
    # names: fusion_attention, onnx_model, ...) say nothing below an error while it works.
    quiet = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(
            ("fusion_", "onnx_model", "onnxruntime.transformers", "shape_infer", "symbolic_shape")
        )
    ]
    levels = [(logger, logger.level) for logger in quiet]
    candidate = path.with_name(path.name + ".fused.tmp")
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        try:
            fused = optimizer.optimize_model(
                str(path),
                model_type="bert",
                num_heads=heads,
                hidden_size=hidden,
                optimization_options=options,
                opt_level=0,
            )
            count = int(fused.get_fused_operator_statistics().get("Attention", 0))
            if count:
                fused.save_model_to_file(str(candidate))
        except Exception as exc:  # the optimizer's failures are plain Exceptions: keep the export
            log.info(
                "ONNX Runtime's attention fusion does not apply to this model (%s); kept as exported", exc
            )
            return 0
        finally:
            for logger, level in levels:
                logger.setLevel(level)
        if not count:
            return 0
        _keep_every_input(candidate, input_names)  # the optimizer prunes inputs the graph never reads
        try:
            _check_alike(path, candidate, input_names, example_inputs)
        except Exception as exc:
            log.info(
                "ONNX Runtime's fused attention does not answer as the export does (%s); kept as exported",
                exc,
            )
            return 0
        os.replace(candidate, path)
        return count
    finally:
        candidate.unlink(missing_ok=True)  # whatever was left of it


def _check_alike(
    exported: Path, fused: Path, input_names: list[str], example_inputs: tuple[torch.Tensor, ...]
) -> None:
    """Raise ValueError unless ``fused`` answers as ``exported`` on two rows of at most 16 tokens
    of the example, the second padded after 9, at every real position."""
    import numpy as np
    import torch

    rows = tuple(torch.cat([t, t])[:2, :16].clone() for t in example_inputs)
    if rows[0].shape[1] < 10:
        raise ValueError("the example is too short to check the fused graph on")
    real = None
    if "attention_mask" in input_names:
        mask = rows[input_names.index("attention_mask")]
        mask[:] = 1
        mask[1, 9:] = 0
        real = mask.numpy() > 0
    before = _load_onnx(exported, threads=(1,)).run(rows)
    after = _load_onnx(fused, threads=(1,)).run(rows)
    for a, b in zip(before, after, strict=True):
        x, y = a.numpy(), b.numpy()
        if real is not None and x.shape[:2] == real.shape:
            x, y = x[real], y[real]
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-3, atol=1e-4):
            raise ValueError(f"an output differs by up to {np.abs(x - y).max():.2e}")


def _keep_every_input(path: Path, input_names: list[str]) -> None:
    """Put back the inputs the exporter dropped because the graph never reads them (e.g.
    token_type_ids of a model without token types): copies feed every input, in order."""
    import onnx

    model = onnx.load(str(path))
    present = [i.name for i in model.graph.input]
    if present == input_names:
        return
    by_name = {i.name: i for i in model.graph.input}
    inputs = [
        by_name.get(name)
        or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, ["batch", "sequence"])
        for name in input_names
    ]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))


def _quantize(fp32: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Its advice to pre-process first is logged on the root logger itself (a filter there sees
    # only such records): not this tracer's user's business.
    root = logging.getLogger()
    quiet = logging.Filter("neuronserve.quantize")  # passes no record logged on root
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(fp32), str(dest), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.removeFilter(quiet)


# The intra-op threads this thread's next call may use (see set_call_threads); unset: the fewest.
_call_threads = threading.local()


def set_call_threads(threads: int) -> None:
    """Give this thread's next model calls ``threads`` intra-op threads: torch's count (per calling
    thread) and the session an :class:`OnnxModel` picks."""
    import torch

    torch.set_num_threads(threads)
    _call_threads.count = threads


def set_onnx_call_threads(threads: int) -> None:
    """Run this thread's next ONNX calls on the session of ``threads`` threads (see OnnxModel);
    torch (pooling, padding) runs on this one thread: an OpenMP team of its own would spin on
    the CPUs after every call, taking them from the next call, in this server or another."""
    if getattr(_call_threads, "count", None) is None:
        import torch

        torch.set_num_threads(1)
    _call_threads.count = threads


def onnx_thread_counts(usable: int, copies: int, span: int = 0) -> tuple[int, ...]:
    """The thread counts a server's ONNX sessions are made with, for ``usable`` CPUs shared by
    ``copies`` copies that may borrow up to ``span`` (0: ``usable``): one, a copy's own share,
    and all of them (a batch alone). A call lent a count in between runs on the largest of these
    it holds, so the weights are held at most three times (twice with the default of one copy
    per CPU)."""
    usable = max(1, usable)
    return tuple(sorted({1, max(1, usable // max(1, copies)), max(usable, span)}))


class OnnxModel:
    """ONNX Runtime sessions of one artifact, one per thread count; ``run_arrays`` (and ``run``,
    on tensors) is thread-safe, so every copy of a server calls it, on the session of the most
    threads its call was given."""

    def __init__(self, sessions: dict[int, object]) -> None:
        self._sessions = dict(sorted(sessions.items()))
        self.thread_counts = tuple(self._sessions)
        first = next(iter(self._sessions.values()))
        self._names = [i.name for i in first.get_inputs()]  # type: ignore[attr-defined]

    def session_threads(self) -> int:
        """The thread count of the session this thread's next call runs on."""
        wanted = getattr(_call_threads, "count", 0)
        return max((n for n in self.thread_counts if n <= wanted), default=self.thread_counts[0])

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        import torch

        return tuple(torch.from_numpy(out) for out in self.run_arrays(tuple(t.numpy() for t in inputs)))

    def run_arrays(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        session = self._sessions[self.session_threads()]
        try:
            return tuple(session.run(None, dict(zip(self._names, inputs, strict=True))))  # type: ignore[attr-defined]
        except Exception as exc:  # ONNX Runtime's errors are plain Exceptions: as torch's are
            raise RuntimeError(f"ONNX Runtime: {exc}") from exc


def _load_onnx(artifact: Path, *, threads: tuple[int, ...]) -> OnnxModel:
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise BackendError(
            f"{artifact.name} is an ONNX artifact: pip install 'neuronserve[serve]' (it brings onnxruntime)"
        ) from None

    def session(count: int) -> object:
        options = ort.SessionOptions()
        options.intra_op_num_threads = count
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No arena: it keeps the peak of the largest shape run (warm-up runs every one: with the
        # default grid at 256 tokens that held 1.95 GB for two servers against 1.12 GB without it,
        # measured by bench/traffic.py, at the same texts/s within the host's noise).
        options.enable_cpu_mem_arena = False
        # A pool's threads spin between the parallel steps of a call (a wake-up per step made a
        # lone text on two threads 1.07x slower, measured in-process on all-MiniLM-L6-v2) and
        # sleep the moment it returns: its cores are lent on to the next call, often another
        # server's, that a spinning pool would take them from. (One thread: no pool at all.)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # A parallel loop's blocks shrink as it goes, so a thread slowed by another (a lent core's
        # owner waking, the loop thread) holds up the rest less: a lone text on two threads took
        # 0.93-0.99x the time, batches of 8-32 0.99-1.00x (paired, in-process, all-MiniLM-L6-v2).
        options.add_session_config_entry("session.dynamic_block_base", "4")
        options.log_severity_level = 3  # errors only: its warnings are about optimisations it skipped
        try:
            return ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's errors are plain Exceptions: as torch's are
            raise RuntimeError(f"ONNX Runtime could not load {artifact.name}: {exc}") from exc

    return OnnxModel({count: session(count) for count in threads})


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


def usable_cpus(cores: CoreSet) -> int:
    """How many of ``cores`` this process can keep busy: in a container with a CPU limit (a
    Kubernetes pod) the affinity may list every CPU of the node, but only the limit's worth run."""
    return min(len(cores), cgroup_cpu_limit() or len(cores))


def pin_process(cores: CoreSet, copies: int, own: CoreSet | None = None) -> int:
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
    # Sized by the CPU limit where there is one (usable_cpus), or the copies are throttled; by
    # the server's ``own`` CPUs when it runs on more (lent ones are given per call).
    threads = max(1, usable_cpus(own or cores) // max(1, copies))
    torch.set_num_threads(threads)
    return threads
