"""The artifact directory and its ``manifest.json``: what the tracer writes, what serving trusts.

A directory ``<output_dir>/<model>/<backend>/`` holds the compiled artifacts (``model-b{B}-s{S}.pt``,
named after the shape each was traced at; on backends whose artifacts run any shape one file may
serve several shapes), the tokenizer and model config, and ``manifest.json`` recording versions,
compiler arguments, shapes, input/output names, verification figures, per-shape costs, the sizes
that the memory plan needs and the sha256 of every file.
:func:`load_manifest` refuses tampered, missing or mismatched artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronserve.backends.kinds import BackendKind
from neuronserve.models import sha256_file
from neuronserve.tasks import TaskKind

if TYPE_CHECKING:
    from neuronserve.config import Settings

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
# The shortest length a trimmed batch runs at (see Manifest.trim_step): a real input holds its
# special tokens and more, and a sample text cut shorter than its special tokens is no input.
TRIM_SHORTEST = 8


def trimmed_length(longest: int, step: int) -> int:
    """The length a trimmed batch whose longest input has ``longest`` tokens runs at (before the
    cap at its bucket's length): rounded up to ``step`` (Manifest.trim_step), TRIM_SHORTEST at
    least. The tracer verifies every one of these lengths an artifact may run."""
    return -(-max(longest, TRIM_SHORTEST) // step) * step


class ArtifactError(RuntimeError):
    """Artifacts are missing, tampered with or do not match this host; the message says which."""


ARTIFACT_NAME = re.compile(r"model-b\d+-s\d+\.(pt|onnx)")


def artifact_name(batch_size: int, sequence_length: int, suffix: str = ".pt") -> str:
    """``suffix``: .pt for TorchScript (every backend), .onnx for the cpu backend's ONNX Runtime."""
    return f"model-b{batch_size}-s{sequence_length}{suffix}"


@dataclass(frozen=True)
class ShapeEntry:
    """One compiled static shape, served by the artifact ``file``.

    ``cost_s`` is the measured seconds per call at trace time (one intra-op thread), which
    servers start from instead of timing every shape again at warm-up.
    """

    batch_size: int
    sequence_length: int
    file: str
    cache_key: str
    output_shapes: dict[str, list[int]]
    verification: dict[str, float]
    cost_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "file": self.file,
            "cache_key": self.cache_key,
            "output_shapes": self.output_shapes,
            "verification": self.verification,
            "cost_s": self.cost_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShapeEntry:
        return cls(
            batch_size=int(data["batch_size"]),
            sequence_length=int(data["sequence_length"]),
            file=str(data["file"]),
            cache_key=str(data["cache_key"]),
            output_shapes={k: [int(x) for x in v] for k, v in data["output_shapes"].items()},
            verification={k: float(v) for k, v in data["verification"].items()},
            cost_s=float(data["cost_s"]),
        )


@dataclass(frozen=True)
class MemoryFacts:
    """What the memory plan needs to know about the artifacts, recorded at trace time.

    ``weight_bytes``: the model's parameters and buffers as traced. ``artifact_bytes``: the size
    of each artifact file. ``shapes_share_artifact``: one artifact serves several shapes (so its
    weights are held once for all of them). ``copies_share_load``: the copies of one server run
    one loaded artifact (cpu) rather than loading their own (Neuron: one load per core).
    """

    weight_bytes: int
    artifact_bytes: dict[str, int]
    shapes_share_artifact: bool
    copies_share_load: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "weight_bytes": self.weight_bytes,
            "artifact_bytes": self.artifact_bytes,
            "shapes_share_artifact": self.shapes_share_artifact,
            "copies_share_load": self.copies_share_load,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryFacts:
        return cls(
            weight_bytes=int(data["weight_bytes"]),
            artifact_bytes={str(k): int(v) for k, v in data["artifact_bytes"].items()},
            shapes_share_artifact=bool(data["shapes_share_artifact"]),
            copies_share_load=bool(data["copies_share_load"]),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything serving needs to know about a traced model."""

    model: dict[str, Any]
    backend: BackendKind
    versions: dict[str, str]
    compiler_args: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    shapes: tuple[ShapeEntry, ...]
    tolerance: dict[str, float]
    files: dict[str, str]
    created_at: str
    memory: MemoryFacts
    format: int = FORMAT_VERSION
    # The artifacts also run, verified at trace time, every multiple of trim_step tokens from
    # TRIM_SHORTEST up to each compiled length (cpu: one artifact runs any shape): a batch then
    # runs at its longest input rounded up to it (TRIM_SHORTEST at least) instead of its
    # bucket's full length. 0: compiled lengths only.
    trim_step: int = 0
    directory: Path = field(default=Path(), compare=False)
    source_sha256: str = field(default="", compare=False)  # of the manifest.json bytes read

    @property
    def task(self) -> TaskKind:
        return TaskKind(self.model["task"])

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({s.batch_size for s in self.shapes}))

    @property
    def sequence_lengths(self) -> tuple[int, ...]:
        return tuple(sorted({s.sequence_length for s in self.shapes}))

    @property
    def artifact_files(self) -> tuple[str, ...]:
        """The distinct artifact files, in the order their shapes first appear."""
        return tuple(dict.fromkeys(s.file for s in self.shapes))

    def shape(self, batch_size: int, sequence_length: int) -> ShapeEntry:
        for entry in self.shapes:
            if (entry.batch_size, entry.sequence_length) == (batch_size, sequence_length):
                return entry
        raise KeyError(f"this is a bug: no compiled shape b{batch_size} s{sequence_length}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created_at": self.created_at,
            "model": self.model,
            "backend": self.backend.value,
            "versions": self.versions,
            "compiler_args": self.compiler_args,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "shapes": [s.to_json() for s in self.shapes],
            "tolerance": self.tolerance,
            "files": self.files,
            "memory": self.memory.to_json(),
            "trim_step": self.trim_step,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> Manifest:
        return cls(
            format=int(data["format"]),
            created_at=str(data["created_at"]),
            model=dict(data["model"]),
            backend=BackendKind(str(data["backend"])),
            versions={k: str(v) for k, v in data["versions"].items()},
            compiler_args=str(data["compiler_args"]),
            input_names=tuple(data["input_names"]),
            output_names=tuple(data["output_names"]),
            shapes=tuple(ShapeEntry.from_json(s) for s in data["shapes"]),
            tolerance={k: float(v) for k, v in data["tolerance"].items()},
            files={k: str(v) for k, v in data["files"].items()},
            memory=MemoryFacts.from_json(data["memory"]),
            trim_step=int(data.get("trim_step", 0)),  # absent in manifests of older traces
            directory=directory,
        )


def write_manifest(manifest: Manifest, directory: Path) -> Path:
    """Write ``manifest.json`` atomically (a reader never sees half a file)."""
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(directory: Path) -> Manifest:
    """Parse ``manifest.json`` without checking files (see :func:`load_manifest`)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME}; run `neuronserve trace` first")
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
        if int(data.get("format", -1)) != FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: manifest format {data.get('format')!r}, this neuronserve reads format "
                f"{FORMAT_VERSION}; re-run `neuronserve trace --force`"
            )
        manifest = Manifest.from_json(data, directory)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(
            f"{path}: unreadable manifest ({exc}); re-run `neuronserve trace --force`"
        ) from exc
    return dataclasses.replace(manifest, source_sha256=hashlib.sha256(raw).hexdigest())


def _major_minor(version: str) -> str:
    return ".".join(version.split("+", maxsplit=1)[0].split(".")[:2])


def artifacts_fingerprint(manifest: Manifest) -> str:
    """The manifest's hash with each artifact's size, inode and modification time.

    deploy hands this to its servers once it has hashed every file against the manifest; a
    server whose files still give the same fingerprint (nothing written, replaced or truncated
    since) skips hashing them again, so N servers do not each read every artifact.
    """
    digest = hashlib.sha256(manifest.source_sha256.encode())
    for name in sorted(manifest.memory.artifact_bytes):
        try:
            st = (manifest.directory / name).stat()
        except OSError:
            return ""
        digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    return digest.hexdigest()


def load_manifest(directory: Path, backend: BackendKind | None = None, *, fingerprint: str = "") -> Manifest:
    """Read and verify an artifact directory for serving.

    Refuses: a missing manifest or file; any file whose sha256 differs from the manifest (tampered
    or truncated); a file in a shape entry that the manifest does not checksum; a backend other
    than ``backend``; a torch whose major.minor differs from the one that traced (TorchScript
    archives are not portable across them). When ``fingerprint`` still matches
    :func:`artifacts_fingerprint` (deploy verified every file and nothing changed since), the
    artifacts are not hashed again; the small files always are.
    """
    manifest = read_manifest(directory)
    trusted = bool(fingerprint) and artifacts_fingerprint(manifest) == fingerprint
    if backend is not None and manifest.backend != backend:
        raise ArtifactError(
            f"{directory}: artifacts were traced for backend {manifest.backend}, not {backend}; "
            f"trace again with trace.backend={backend}"
        )
    problems: list[str] = []
    for entry in manifest.shapes:
        if entry.file not in manifest.files:
            problems.append(f"{entry.file} is not checksummed in the manifest")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif trusted and name in manifest.memory.artifact_bytes:
            continue
        elif sha256_file(path) != expected:
            problems.append(f"{name} does not match its sha256 (modified or truncated)")
    if problems:
        raise ArtifactError(
            f"{directory}: refusing to serve: " + "; ".join(problems) + "; re-run `neuronserve trace --force`"
        )
    traced_torch = manifest.versions.get("torch", "")
    installed = metadata.version("torch")
    if _major_minor(traced_torch) != _major_minor(installed):
        raise ArtifactError(
            f"{directory}: traced with torch {traced_torch} but torch {installed} is installed; "
            "trace again on this host"
        )
    return manifest


def artifacts_directory(settings: Settings, kind: BackendKind) -> Path:
    """``serve.artifacts``, or the trace output for the configured model and ``kind`` (the
    resolved ``trace.backend``: see ``backends.choose_backend``; working out a path never probes
    the host)."""
    if settings.serve.artifacts:
        return settings.path(settings.serve.artifacts)
    return settings.path(settings.trace.output_dir) / settings.model_name / kind.value
