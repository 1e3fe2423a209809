"""The trace stage: compile a model at a grid of static shapes, verify each against eager PyTorch,
and write artifacts plus ``manifest.json``.

Up-to-date shapes are skipped without importing torch or loading the model: a shape is up to
date when the previous manifest lists it with the same cache key (model sha256, task, backend,
SDK and torch versions, compiler arguments, shape) and its file still has the recorded sha256.

On backends whose artifacts can run several shapes (``Backend.sharing.shapes``, the cpu backend),
a new shape first tries the artifacts already made for this model: if one reproduces eager
PyTorch at that shape it serves it, otherwise the shape gets an artifact of its own. Every shape
is verified either way, and its cost per call is measured for the servers' batcher.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronserve.artifacts import (
    ARTIFACT_NAME,
    MANIFEST_NAME,
    ArtifactError,
    Manifest,
    MemoryFacts,
    ShapeEntry,
    artifact_name,
    read_manifest,
    trimmed_length,
    write_manifest,
)
from neuronserve.backends import BackendKind, choose_backend
from neuronserve.backends.base import Backend, LoadedModel
from neuronserve.models import (
    SERVING_FILES,
    EagerModel,
    ModelSourceError,
    default_name,
    is_hub_source,
    load_eager,
    model_max_length,
    model_sha256,
    pool_hidden,
    resolve_source,
    sample_inputs,
    sha256_file,
)
from neuronserve.tasks import TaskKind

if TYPE_CHECKING:
    import torch

    from neuronserve.config import Settings, TraceSettings

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """A traced shape's outputs differ from eager PyTorch beyond the configured tolerance."""


@dataclass(frozen=True)
class TraceReport:
    """What one run of the tracer did: ``compiled`` are the shapes done in this run (compiled, or
    verified on an artifact that already serves other shapes), ``skipped`` those up to date."""

    manifest: Manifest
    directory: Path
    backend_reason: str
    compiled: tuple[tuple[int, int], ...]
    skipped: tuple[tuple[int, int], ...]


def cache_key(
    *,
    model_sha: str,
    task: TaskKind,
    backend: BackendKind,
    versions: dict[str, str],
    compiler_args: str,
    batch_size: int,
    sequence_length: int,
) -> str:
    """The identity of one compiled shape: change any input and the shape is compiled again."""
    payload = {
        "model_sha256": model_sha,
        "task": task.value,
        "backend": backend.value,
        "versions": {k: v for k, v in sorted(versions.items()) if k != "python"},
        "compiler_args": compiler_args,
        "shape": [batch_size, sequence_length],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def compare_outputs(traced: tuple[torch.Tensor, ...], eager: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Max absolute difference and the smallest per-row cosine similarity over all outputs."""
    import torch

    if len(traced) != len(eager):
        raise VerificationError(f"traced model returned {len(traced)} outputs, eager {len(eager)}")
    max_abs = 0.0
    min_cos = 1.0
    for t, e in zip(traced, eager, strict=True):
        if t.shape != e.shape:
            raise VerificationError(f"traced output shape {tuple(t.shape)} != eager {tuple(e.shape)}")
        t32, e32 = t.detach().float(), e.detach().float()
        max_abs = max(max_abs, float((t32 - e32).abs().max()))
        rows_t, rows_e = t32.reshape(t32.shape[0], -1), e32.reshape(e32.shape[0], -1)
        cos = torch.nn.functional.cosine_similarity(rows_t, rows_e, dim=1, eps=1e-12)
        min_cos = min(min_cos, float(cos.min()))
    return {"max_abs_diff": max_abs, "min_cosine": min_cos}


def served_cosine(
    traced: tuple[torch.Tensor, ...],
    eager: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
    pooling: str = "mean",
) -> float:
    """The smallest per-row cosine of what requests are answered from, over the real tokens:
    hidden states (batch, sequence, hidden) pooled as the model's embeddings are (``pooling``),
    per-token outputs (batch, sequence) with the padding left out, per-row outputs (logits) as
    they are."""
    import torch

    worst = 1.0
    real = mask.to(torch.float32)

    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool_hidden(hidden, mask, pooling)

    for t, e in zip(traced, eager, strict=True):
        t32, e32 = t.detach().float(), e.detach().float()
        if t32.dim() == 3:
            t32, e32 = pool(t32, mask), pool(e32, mask)
        elif t32.dim() == 2 and t32.shape == mask.shape:
            t32, e32 = t32 * real, e32 * real
        cos = torch.nn.functional.cosine_similarity(
            t32.reshape(len(t32), -1), e32.reshape(len(e32), -1), dim=1
        )
        worst = min(worst, float(cos.min()))
    return worst


def verification_tolerance(kind: BackendKind, settings: Settings) -> dict[str, float]:
    """What a traced shape must meet against eager PyTorch: int8 artifacts only their own cosine
    floor (quantisation moves single values far more than any fp32 engine does)."""
    t = settings.trace
    if kind.quantized(t):
        return {"min_cosine": t.quantized_min_cosine}
    return {"max_abs_diff": t.max_abs_diff, "min_cosine": t.min_cosine}


def _versions(sdk_versions: dict[str, str]) -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
        "neuronserve": metadata.version("neuronserve"),
    }
    versions.update(sdk_versions)
    return versions


def _copy_serving_files(model_dir: Path, out_dir: Path) -> None:
    for rel in SERVING_FILES:
        src = model_dir / rel
        if src.is_file():
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


def _model_info(job: _Job) -> dict[str, Any]:
    """The model's facts in the manifest: where it came from (a hub id's revision and the commit
    of its cached snapshot, which names the snapshot's directory), its task and sizes."""
    source, model_dir, task = job.settings.model.source, job.model_dir, job.task
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    info: dict[str, Any] = {
        "source": source,
        "revision": job.settings.model.revision,
        "commit": model_dir.name if is_hub_source(source) else "",
        "name": job.name,
        "sha256": job.model_sha,
        "task": task.value,
        "model_type": config.get("model_type", ""),
        "hidden_size": config.get("hidden_size"),
        "max_position_embeddings": config.get("max_position_embeddings"),
    }
    if task.records_labels:
        id2label = config.get("id2label") or {}
        info["id2label"] = {str(k): str(v) for k, v in id2label.items()}
    return info


def _verify_shape(
    *,
    compiled: Any,
    eager: EagerModel,
    task: TaskKind,
    batch_size: int,
    seq: int,
    tolerance: dict[str, float],
    output_shapes: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """The worst figures over two input sets; ``output_shapes`` is filled with the outputs'."""
    import torch

    worst = {"max_abs_diff": 0.0, "min_cosine": 1.0}
    # Two input sets: the traced example and a rotation with other texts and padding patterns.
    for offset in (0, batch_size + 1):
        inputs = sample_inputs(eager, task, batch_size, seq, offset=offset)
        with torch.no_grad():
            expected = tuple(eager.module(*inputs))
        got = compiled.run(inputs)
        if output_shapes is not None and offset == 0:
            output_shapes.update({n: list(t.shape) for n, t in zip(eager.output_names, got, strict=True)})
        figures = compare_outputs(got, expected)
        if "max_abs_diff" not in tolerance:  # int8: judged by what requests get back
            mask = inputs[eager.input_names.index("attention_mask")]
            figures["min_cosine"] = served_cosine(got, expected, mask, eager.pooling)
        worst["max_abs_diff"] = max(worst["max_abs_diff"], figures["max_abs_diff"])
        worst["min_cosine"] = min(worst["min_cosine"], figures["min_cosine"])
    # A tolerance without max_abs_diff (int8 artifacts) checks the cosine only.
    allowed_abs = tolerance.get("max_abs_diff", float("inf"))
    if worst["max_abs_diff"] > allowed_abs or worst["min_cosine"] < tolerance["min_cosine"]:
        allowed = f"allowed {allowed_abs:.3g}" if "max_abs_diff" in tolerance else "not checked"
        raise VerificationError(
            f"shape b{batch_size} s{seq}: traced outputs differ from eager PyTorch "
            f"(max abs diff {worst['max_abs_diff']:.3g}, {allowed}; "
            f"min cosine {worst['min_cosine']:.6f}, required {tolerance['min_cosine']:.6f}); "
            "check the compiler arguments (e.g. --auto-cast none, or trace.cpu_auto_cast=none) or "
            "loosen trace.max_abs_diff / trace.min_cosine (int8: trace.quantized_min_cosine)"
        )
    return worst


COST_CALLS = 2  # after verification's calls have warmed the shape; the minimum is kept
TRIM_BATCH = 2  # ... at this batch size: two rows, so padding differs between them
# The step verified when an artifact fails at some length of its own finer step (Sharing.trim_step).
TRIM_FALLBACK = 8


def measure_cost(compiled: LoadedModel, inputs: tuple[torch.Tensor, ...]) -> float:
    """Seconds per call of ``compiled`` at the shape of ``inputs``, with one intra-op thread.

    One thread is what each copy of a cpu server gets by default (one copy per core); on Neuron
    the call runs on the device and the thread count does not matter. The minimum is kept:
    interference from the rest of the host only ever adds time.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(COST_CALLS):
            started = time.perf_counter()
            compiled.run(inputs)
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return min(times)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


@dataclass(frozen=True)
class _Job:
    """What one trace run works from: the backend, the model, and the key of every shape."""

    settings: Settings
    kind: BackendKind
    reason: str
    backend: Backend
    task: TaskKind
    model_dir: Path
    name: str
    out_dir: Path
    model_sha: str
    versions: dict[str, str]
    compiler_args: str
    tolerance: dict[str, float]
    shapes: list[tuple[int, int]]
    keys: dict[tuple[int, int], str]

    @property
    def staging(self) -> Path:
        """Where a run builds, beside the artifacts; swapped in when it finishes."""
        return self.out_dir.with_name(f".{self.out_dir.name}.staging")


def _backend_for(kind: BackendKind, trace: TraceSettings) -> Backend:
    """The backend that compiles (a seam for tests that stand in a faulty compiler)."""
    return kind.create(trace)


# The longest a default grid reaches by itself (a model reading 8k tokens is traced to it only
# when trace.sequence_lengths says so: a b32 x s8192 warm-up would not fit a host's memory).
DEFAULT_LONGEST = 512


def fitted_lengths(lengths: tuple[int, ...], longest: int | None, *, extend: bool) -> tuple[int, ...]:
    """The default sequence lengths fitted to a model whose inputs stop at ``longest`` tokens:
    none beyond it; where it drops one, the model's own longest instead; and (``extend``: cpu,
    where one artifact serves every length) up to it, at most DEFAULT_LONGEST, so what the model
    itself can read is served by default."""
    if not longest:
        return lengths
    kept = tuple(s for s in lengths if s <= longest)
    reach = min(longest, DEFAULT_LONGEST)
    if (not kept or kept[-1] < reach) and (extend or reach < lengths[-1]):
        kept = (*kept, reach)
    return kept


def _job(settings: Settings, say: Callable[[str], None]) -> _Job:
    kind, reason = choose_backend(settings.trace.backend)
    backend = _backend_for(kind, settings.trace)
    sdk_versions = backend.versions()  # raises BackendError naming the install step if missing
    say(f"backend: {kind} ({reason})")
    task = settings.model.task
    model_dir = resolve_source(settings.model.source, revision=settings.model.revision)
    name = settings.model.name or default_name(settings.model.source)
    model_sha = model_sha256(model_dir)
    versions = _versions(sdk_versions)
    compiler_args = kind.compiler_args(settings.trace)
    batch_sizes, sequence_lengths = kind.trace_grid(settings.trace)
    if not settings.trace.sequence_lengths:  # the default grid: to the model's own longest
        sequence_lengths = fitted_lengths(
            sequence_lengths, model_max_length(model_dir), extend=not kind.neuron_cores
        )
    shapes = [(b, s) for s in sequence_lengths for b in batch_sizes]
    keys = {
        (b, s): cache_key(
            model_sha=model_sha,
            task=task,
            backend=kind,
            versions=versions,
            compiler_args=compiler_args,
            batch_size=b,
            sequence_length=s,
        )
        for b, s in shapes
    }
    return _Job(
        settings=settings,
        kind=kind,
        reason=reason,
        backend=backend,
        task=task,
        model_dir=model_dir,
        name=name,
        out_dir=settings.path(settings.trace.output_dir) / name / kind.value,
        model_sha=model_sha,
        versions=versions,
        compiler_args=compiler_args,
        tolerance=verification_tolerance(kind, settings),
        shapes=shapes,
        keys=keys,
    )


def _manifest_of(
    job: _Job,
    done: dict[tuple[int, int], ShapeEntry],
    hashes: dict[str, str],
    input_names: tuple[str, ...],
    weights: int,
    *,
    trim: int = 0,
) -> Manifest:
    """The manifest of the shapes ``done`` so far, checksummed as they lie in the staging area."""
    staging = job.staging
    ordered = tuple(done[shape] for shape in job.shapes if shape in done)
    return Manifest(
        model=_model_info(job),
        backend=job.kind,
        versions=job.versions,
        compiler_args=job.compiler_args,
        input_names=input_names,
        output_names=job.task.facts.output_names,
        shapes=ordered,
        tolerance=job.tolerance,
        files=_checksum_files(staging, hashes, remember=hashes),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        memory=MemoryFacts(
            weight_bytes=weights,
            artifact_bytes={f: (staging / f).stat().st_size for f in dict.fromkeys(e.file for e in ordered)},
            shapes_share_artifact=job.backend.sharing.shapes,
            copies_share_load=job.backend.sharing.copies,
        ),
        trim_step=trim,
        directory=job.out_dir,
    )


def run_trace(
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
    emit: Callable[[str], None] | None = None,
) -> TraceReport:
    """Trace ``settings.model`` at every configured shape; see the module docstring."""
    say = emit or (lambda line: log.info("%s", line))
    job = _job(settings, say)
    out_dir, shapes = job.out_dir, job.shapes
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_manifest(out_dir)
    entries, hashes = ({}, {}) if force else _up_to_date(previous, job.keys, out_dir)
    if len(entries) == len(shapes) and previous is not None and _same_shape_set(previous, shapes):
        for b, s in shapes:
            say(f"b{b} s{s}: up to date, skipped")
        say(f"all {len(shapes)} shapes up to date in {out_dir}")
        # A staging directory left by an interrupted run is of no use any more.
        shutil.rmtree(job.staging, ignore_errors=True)
        return TraceReport(previous, out_dir, job.reason, (), tuple(shapes))

    # Everything else is built in a staging directory beside the artifacts and swapped in at the
    # end: a trace that fails leaves the served directory exactly as it was, and the shapes it
    # finished (recorded in the staging manifest after each) are not compiled again next time.
    staging = job.staging
    entries = _prepare_staging(staging, out_dir, entries, hashes, keys=job.keys, force=force, say=say)
    todo = [shape for shape in shapes if shape not in entries]
    skipped = tuple(shape for shape in shapes if shape in entries)
    for b, s in skipped:
        say(f"b{b} s{s}: up to date, skipped")

    if todo:
        _check_lengths(job.model_dir, tuple(sorted({s for _b, s in shapes})))
        done_so_far = dict(entries)

        def record(entry: ShapeEntry, input_names: tuple[str, ...], weights: int) -> None:
            done_so_far[(entry.batch_size, entry.sequence_length)] = entry
            write_manifest(_manifest_of(job, done_so_far, hashes, input_names, weights), staging)

        compiled, input_names, weights, trim = _compile_shapes(
            backend=job.backend,
            model_dir=job.model_dir,
            out_dir=staging,
            task=job.task,
            todo=todo,
            reusable=list(dict.fromkeys(e.file for e in entries.values())),
            keys=job.keys,
            tolerance=job.tolerance,
            progress=progress,
            say=say,
            on_shape=record,
            served={shape: entry.file for shape, entry in entries.items()},
            suffix=job.kind.artifact_suffix(settings.trace),
            trust_remote_code=settings.model.trust_remote_code,
        )
        entries.update(compiled)
    else:
        known = _traced_model(staging, previous)
        input_names, weights, trim = known.input_names, known.memory.weight_bytes, known.trim_step
        if known.compiler_args != job.compiler_args:
            trim = 0  # another engine's manifest (an interrupted swap): claim no length unchecked
    _copy_serving_files(job.model_dir, staging)
    _keep_only(staging, {entry.file for entry in entries.values()})
    manifest = _manifest_of(job, entries, hashes, input_names, weights, trim=trim)
    write_manifest(manifest, staging)
    _swap_in(staging, out_dir)
    return TraceReport(manifest, out_dir, job.reason, tuple(todo), skipped)


def _traced_model(staging: Path, previous: Manifest | None) -> Manifest:
    """With nothing to compile, the manifest that describes the traced model: an interrupted
    run's staging manifest if it finished shapes (it may have traced a changed model), else the
    served one."""
    staged = _previous_manifest(staging)
    known = staged if staged is not None and staged.shapes else previous
    assert known is not None, "this is a bug: shapes skipped without a manifest"
    return known


def _prepare_staging(
    staging: Path,
    out_dir: Path,
    entries: dict[tuple[int, int], ShapeEntry],
    hashes: dict[str, str],
    *,
    keys: dict[tuple[int, int], str],
    force: bool,
    say: Callable[[str], None],
) -> dict[tuple[int, int], ShapeEntry]:
    """Link the still-valid served artifacts (and any file that is not ours) into ``staging``;
    returns those entries plus the shapes an interrupted earlier trace finished there."""
    staging.mkdir(exist_ok=True)
    resumed, resumed_hashes = ({}, {}) if force else _up_to_date(_previous_manifest(staging), keys, staging)
    if resumed:
        say(f"resuming an interrupted trace: {len(resumed)} shape(s) already done")
    for file in dict.fromkeys(e.file for e in entries.values()):
        _link_into(out_dir / file, staging / file)
    ours = {MANIFEST_NAME, *SERVING_FILES}
    for path in out_dir.iterdir() if out_dir.is_dir() else ():
        if path.is_file() and path.name not in ours and not ARTIFACT_NAME.fullmatch(path.name):
            _link_into(path, staging / path.name)  # a file someone put beside the artifacts
    for file, digest in resumed_hashes.items():  # a served file linked over a staged one wins
        hashes.setdefault(file, digest)
    return {**resumed, **entries}


def _check_lengths(model_dir: Path, sequence_lengths: tuple[int, ...]) -> None:
    max_positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    too_long = [s for s in sequence_lengths if max_positions and s > max_positions]
    if too_long:
        raise ModelSourceError(
            f"trace.sequence_lengths {too_long} exceed the model's max_position_embeddings "
            f"{max_positions}; use lengths up to {max_positions}"
        )


def _keep_only(directory: Path, artifacts: set[str]) -> None:
    """Remove every artifact not in ``artifacts`` (a removed shape's, or one named like ours by
    an older manifest format) and the compilers' work directories."""
    for path in directory.glob("model-b*-s*.*"):
        if ARTIFACT_NAME.fullmatch(path.name) and path.name not in artifacts:
            path.unlink()
    for path in directory.glob(".compiler-*"):
        shutil.rmtree(path, ignore_errors=True)


def _link_into(source: Path, dest: Path) -> None:
    """``dest`` as a hard link to ``source`` (a copy across file systems)."""
    if dest.exists():
        dest.unlink()
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Make ``staging`` the served directory in one step and remove the old one.

    Linux's renameat2(RENAME_EXCHANGE) swaps the two directories atomically, so a server that
    starts meanwhile sees either the old artifacts or the new, never none; elsewhere two renames.
    """
    if out_dir.exists() and not _exchange(staging, out_dir):
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        os.rename(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    shutil.rmtree(staging, ignore_errors=True)  # now the old directory


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None) if name else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return bool(renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0)


def _previous_manifest(out_dir: Path) -> Manifest | None:
    try:
        return read_manifest(out_dir)
    except ArtifactError:
        return None


def _up_to_date(
    previous: Manifest | None, keys: dict[tuple[int, int], str], out_dir: Path
) -> tuple[dict[tuple[int, int], ShapeEntry], dict[str, str]]:
    """Shapes of the previous manifest with the same cache key whose file is unchanged."""
    entries: dict[tuple[int, int], ShapeEntry] = {}
    hashes: dict[str, str] = {}
    if previous is None:
        return entries, hashes
    for entry in previous.shapes:
        shape = (entry.batch_size, entry.sequence_length)
        path = out_dir / entry.file
        if keys.get(shape) != entry.cache_key or not path.is_file():
            continue
        digest = hashes.get(entry.file) or sha256_file(path)  # one file may serve several shapes
        if digest == previous.files.get(entry.file):
            hashes[entry.file] = digest
            entries[shape] = entry
    return entries, hashes


def _same_shape_set(previous: Manifest, shapes: list[tuple[int, int]]) -> bool:
    return [(e.batch_size, e.sequence_length) for e in previous.shapes] == shapes


def _compile_shapes(
    *,
    backend: Backend,
    model_dir: Path,
    out_dir: Path,
    task: TaskKind,
    todo: list[tuple[int, int]],
    reusable: list[str],
    keys: dict[tuple[int, int], str],
    tolerance: dict[str, float],
    progress: bool,
    say: Callable[[str], None],
    on_shape: Callable[[ShapeEntry, tuple[str, ...], int], None],
    served: dict[tuple[int, int], str] | None = None,
    suffix: str = ".pt",
    trust_remote_code: bool = False,
) -> tuple[dict[tuple[int, int], ShapeEntry], tuple[str, ...], int, int]:
    """Verify (and where needed compile) every shape of ``todo``; returns entries, input names,
    the model's weight bytes and the trim step verified (see ``Manifest.trim_step``; 0 where
    artifacts do not serve several shapes). ``on_shape`` records each finished shape as it is
    done; ``served`` names the file of each shape already done (for the trim verification)."""
    from tqdm import tqdm

    from neuronserve.backends.base import CoreSet

    eager = load_eager(model_dir, task, trust_remote_code=trust_remote_code)
    weights = weight_bytes(eager.module)
    # Artifacts this run may try at a new shape, loaded once each; the largest shape goes
    # first so that the artifact every other shape tries was traced at full size.
    candidates: dict[str, LoadedModel] = {}
    if backend.sharing.shapes:
        candidates = {f: backend.load(out_dir / f, CoreSet((0,)), 0) for f in reusable}
        todo = sorted(todo, key=lambda shape: (shape[0] * shape[1], shape), reverse=True)
    done: dict[tuple[int, int], ShapeEntry] = {}
    bar = tqdm(todo, desc="tracing", unit="shape", disable=not progress, file=sys.stderr)
    for b, s in bar:
        bar.set_postfix_str(f"b{b} s{s}")
        shapes: dict[str, list[int]] = {}
        file, compiled, figures = _reuse(
            candidates, eager=eager, task=task, b=b, s=s, tolerance=tolerance, output_shapes=shapes
        )
        if compiled is None:
            file = artifact_name(b, s, suffix)
            compiled, figures = _compile_one(
                backend,
                eager=eager,
                task=task,
                dest=out_dir / file,
                b=b,
                s=s,
                tolerance=tolerance,
                output_shapes=shapes,
            )
            if backend.sharing.shapes:
                candidates[file] = compiled
            how = "compiled and verified"
        else:
            how = f"served by {file}, verified"
        done[(b, s)] = ShapeEntry(
            batch_size=b,
            sequence_length=s,
            file=file,
            cache_key=keys[(b, s)],
            output_shapes=shapes,
            verification=figures,
            cost_s=measure_cost(compiled, sample_inputs(eager, task, b, s)),
        )
        on_shape(done[(b, s)], eager.input_names, weights)
        say(
            f"b{b} s{s}: {how} (max abs diff {figures['max_abs_diff']:.2e}, "
            f"min cosine {figures['min_cosine']:.6f}, {done[(b, s)].cost_s * 1000:.1f} ms per call)"
        )
    bar.close()
    trim = 0
    if backend.sharing.shapes:
        files = {**(served or {}), **{shape: entry.file for shape, entry in done.items()}}
        trim = _verify_trim(
            candidates, files, backend.sharing.trim_step, eager=eager, task=task, tolerance=tolerance, say=say
        )
    return done, eager.input_names, weights, trim


# CPU kernels (ONNX Runtime's MLAS, oneDNN) handle a length by vector blocks of up to this many
# elements plus a tail; the tail's code path depends only on the length modulo it.
PROBE_BLOCK = 16
# ... and switch strategies at larger sizes (GEMM blocking, packing, how work is split between
# threads) at multiples of this: the lengths on either side of each are checked too.
PROBE_THRESHOLD = 64


def trim_probe_lengths(step: int, top: int, compiled: Collection[int] = ()) -> list[int]:
    """The lengths verified to claim an artifact runs at every multiple of ``step`` up to ``top``.

    At a coarse step (a multiple of PROBE_BLOCK's divisors, e.g. 8), every such length. At a
    finer one, what proves it without running every length: an exported graph is the same
    computation at any length (its sequence axis is dynamic), and what a length changes is the
    kernels' tail handling, by the length modulo PROBE_BLOCK, and their strategy past the sizes
    where it switches. So: every length of the first two blocks and of the last block (each
    remainder short and long, the longest itself), one length per block between them with the
    remainder going round, the lengths on either side of every multiple of PROBE_THRESHOLD and
    each compiled length's neighbours. The compiled lengths themselves are verified as shapes.
    """
    every = list(range(trimmed_length(1, step), top + 1, step))
    if (step > 1 and PROBE_BLOCK % step == 0) or len(every) <= 4 * PROBE_BLOCK // step:
        return [n for n in every if n not in compiled]
    first = every[0]
    chosen = {n for n in every if n < first + 2 * PROBE_BLOCK or n > top - PROBE_BLOCK}
    for block, start in enumerate(range(first + 2 * PROBE_BLOCK, top - PROBE_BLOCK + 1, PROBE_BLOCK)):
        chosen.add(start + (block * step) % PROBE_BLOCK)
    edges = {*compiled, *range(PROBE_THRESHOLD, top + 1, PROBE_THRESHOLD)}
    chosen |= {n + d for n in edges for d in (-step, 0, step)}
    runnable = set(every)
    return sorted(n for n in chosen if n in runnable and n not in compiled)


def _verify_trim(
    candidates: dict[str, LoadedModel],
    files: dict[tuple[int, int], str],
    step: int,
    *,
    eager: EagerModel,
    task: TaskKind,
    tolerance: dict[str, float],
    say: Callable[[str], None],
) -> int:
    """``step`` (``Sharing.trim_step``) if every artifact reproduces eager PyTorch at the
    lengths that prove it runs every length ``trimmed_length`` gives for it, from TRIM_SHORTEST
    up to the longest compiled length the artifact serves (:func:`trim_probe_lengths`; batch
    sizes are covered by the compiled shapes); else TRIM_FALLBACK if that step's lengths all
    pass; else 0."""
    longest: dict[str, int] = {}
    for (_b, s), file in files.items():
        longest[file] = max(longest.get(file, 0), s)
    compiled_lengths = {s for _b, s in files}
    if any(file not in candidates for file in longest):
        return 0  # an artifact that was not loaded: do not claim what was not checked
    checked: set[tuple[str, int]] = set()  # (file, length) that passed: the fallback skips them
    for trial in dict.fromkeys((step, TRIM_FALLBACK)):
        failed, failed_at = None, 0
        probed = 0
        for file, top in sorted(longest.items()):
            for length in trim_probe_lengths(trial, top, compiled_lengths):
                if (file, length) in checked:
                    continue
                probed += 1
                try:
                    with _quiet_tracing():
                        _verify_shape(
                            compiled=candidates[file],
                            eager=eager,
                            task=task,
                            batch_size=TRIM_BATCH,
                            seq=length,
                            tolerance=tolerance,
                        )
                except (VerificationError, RuntimeError) as exc:
                    failed, failed_at = f"{file} at {length} tokens: {exc}", length
                    break
                checked.add((file, length))
            if failed:
                break
        if failed is None:
            every = "every length" if trial == 1 else f"every multiple of {trial} tokens"
            say(
                f"verified for {every} from {trimmed_length(1, trial)} (at {probed} lengths besides the "
                "compiled ones): batches run at their longest input's length"
            )
            return trial
        # A failed length that is a multiple of the fallback's step would fail it too.
        if trial == TRIM_FALLBACK or failed_at % TRIM_FALLBACK == 0:
            say(f"{failed}; compiled lengths only")
            return 0
        say(f"{failed}; trying every multiple of {TRIM_FALLBACK}")
    return 0


def _reuse(
    candidates: dict[str, LoadedModel],
    *,
    eager: EagerModel,
    task: TaskKind,
    b: int,
    s: int,
    tolerance: dict[str, float],
    output_shapes: dict[str, list[int]],
) -> tuple[str, LoadedModel | None, dict[str, float]]:
    """The first candidate artifact that reproduces eager PyTorch at (b, s), if any (its
    outputs' shapes into ``output_shapes``)."""
    for file, model in candidates.items():
        try:
            with _quiet_tracing():
                figures = _verify_shape(
                    compiled=model,
                    eager=eager,
                    task=task,
                    batch_size=b,
                    seq=s,
                    tolerance=tolerance,
                    output_shapes=output_shapes,
                )
        except (VerificationError, RuntimeError) as exc:
            log.info("b%d s%d: %s does not serve this shape (%s); compiling its own", b, s, file, exc)
            continue
        return file, model, figures
    return "", None, {}


def _compile_one(
    backend: Backend,
    *,
    eager: EagerModel,
    task: TaskKind,
    dest: Path,
    b: int,
    s: int,
    tolerance: dict[str, float],
    output_shapes: dict[str, list[int]],
) -> tuple[LoadedModel, dict[str, float]]:
    """Compile at (b, s) into ``dest`` (atomically: a failed shape leaves no file); its
    outputs' shapes into ``output_shapes``."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with _quiet_tracing():
            compiled = backend.compile(eager.module, sample_inputs(eager, task, b, s), tmp)
        figures = _verify_shape(
            compiled=compiled,
            eager=eager,
            task=task,
            batch_size=b,
            seq=s,
            tolerance=tolerance,
            output_shapes=output_shapes,
        )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return compiled, figures


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence warnings that tracing a HF model always raises and that verification covers.

    transformers' mask code compares tensor *shapes* (constant at a static shape), which
    torch.jit reports as a TracerWarning; verification then runs other texts and padding
    patterns through the artifact, so a genuinely data-dependent branch would fail there.
    """
    from torch.jit._trace import TracerWarning

    from neuronserve.backends.base import torchscript_quietly

    with torchscript_quietly(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=TracerWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _checksum_files(
    out_dir: Path, known: dict[str, str], remember: dict[str, str] | None = None
) -> dict[str, str]:
    """sha256 of every file in the artifact directory except the manifest and scratch files.

    Artifacts are written once, so their digests go into ``remember`` (the manifest is written
    after every shape, and must not hash every artifact again each time)."""
    files: dict[str, str] = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir).as_posix()
        if (
            not path.is_file()
            or rel == MANIFEST_NAME
            or rel.endswith(".tmp")
            or any(part.startswith(".") for part in Path(rel).parts)
        ):
            continue
        files[rel] = known.get(rel) or sha256_file(path)
        if remember is not None and ARTIFACT_NAME.fullmatch(rel):
            remember[rel] = files[rel]
    return files
