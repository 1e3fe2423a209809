"""Per-task work after the model: pooling, label scores, answer spans. Runs in copy threads.

Each task turns the raw outputs of one padded batch into one result per real row; padding rows
and padding tokens never enter a result, so ``run([x, x, x])[i] == run([x])[0]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from neuronserve.models import pooling_mode
from neuronserve.serving.errors import validation
from neuronserve.serving.tokenization import Encoded
from neuronserve.tasks import TaskKind


@dataclass(frozen=True)
class ItemOptions:
    """Per-input options carried from the request to the task."""

    normalize: bool | None = None
    top_k: int | None = None
    context: str | None = None  # question-answering: the text answers are cut from
    rerank: bool = False  # text-classification: (sigmoid score, logit) of the single output
    raw_scores: bool = False  # text-classification: logits instead of softmax/sigmoid scores


class Task(Protocol):
    """Turns one batch's model outputs (numpy arrays, or torch tensors: see :func:`floats`) and
    its int64 attention mask into one result per real row."""

    def results(
        self, outputs: Sequence[Any], mask: np.ndarray, items: list[tuple[Encoded, ItemOptions]]
    ) -> list[Any]: ...


class FeatureExtraction:
    """Sentence embeddings: pooling per the model's sentence-transformers config (mean by default)."""

    def __init__(self, mode: str, normalize: bool) -> None:
        if mode not in {"mean", "cls", "max"}:
            raise ValueError(f"this is a bug: unknown pooling mode {mode!r}")
        self.mode = mode
        self.normalize = normalize

    @classmethod
    def from_directory(cls, directory: Path) -> FeatureExtraction:
        normalize = False
        modules = directory / "modules.json"
        if modules.is_file():
            types = [m.get("type", "") for m in json.loads(modules.read_text(encoding="utf-8"))]
            normalize = any(t.endswith("Normalize") for t in types)
        return cls(pooling_mode(directory), normalize)

    def pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(rows, hidden) from (rows, sequence, hidden) states and their (rows, sequence) mask."""
        return pool_rows(hidden, mask, self.mode)

    def results(
        self, outputs: Sequence[Any], mask: np.ndarray, items: list[tuple[Encoded, ItemOptions]]
    ) -> list[Any]:
        n = len(items)
        # In numpy, in as few calls as it takes: right after the model every call costs several
        # times its usual time (its code and data are out of the caches), 0.15-0.19 ms in all at
        # one client with torch's and numpy's general-purpose functions against 0.05-0.06 ms.
        pooled = self.pool(floats(outputs[0][:n]), mask[:n])
        wants = [self.normalize if opt.normalize is None else opt.normalize for _, opt in items]
        if all(wants):
            pooled = unit_rows(pooled)
        elif any(wants):
            pooled = np.where(np.array(wants)[:, None], unit_rows(pooled), pooled)
        return list(pooled)  # float32 rows: pooling keeps the model's float32


def floats(output: Any) -> np.ndarray:
    """A model output as a float32 numpy array: ONNX Runtime's as it is, a torch tensor's
    (TorchScript's, Neuron's; maybe bfloat16) converted."""
    if isinstance(output, np.ndarray):
        return output if output.dtype == np.float32 else output.astype(np.float32)
    return np.asarray(output.float().numpy())


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row over max(its L2 norm, 1e-12), as torch.nn.functional.normalize divides (the
    norm as numpy.linalg.norm computes it, without its checks)."""
    norms = np.sqrt(np.add.reduce(vectors * vectors, axis=1, keepdims=True))
    return np.asarray(vectors / np.maximum(norms, np.float32(1e-12)))


def pool_rows(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """:func:`neuronserve.models.pool_hidden` in numpy (serving's; the tracer verifies with
    torch's): (rows, hidden) float32 from (rows, sequence, hidden) states and their mask."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return np.asarray(np.where(mask[:, :, None] > 0, hidden, -np.inf).max(axis=1))
    if mode != "mean":
        raise ValueError(f"this is a bug: unknown pooling mode {mode!r}")
    if np.count_nonzero(mask) == mask.size:  # no padding (a lone input at its exact length)
        return np.asarray(np.add.reduce(hidden, axis=1) / np.float32(hidden.shape[1]))
    # Padding tokens weighted 0: the same sums in the same order as without them.
    real = mask.astype(hidden.dtype)
    counts = np.maximum(np.add.reduce(real, axis=1, keepdims=True), np.float32(1e-9))
    return np.asarray(np.add.reduce(hidden * real[:, :, None], axis=1) / counts)


class TextClassification:
    """Scores per label (softmax, or sigmoid for multi-label models), best first."""

    def __init__(self, id2label: dict[int, str], multi_label: bool) -> None:
        self.labels = [id2label[i] for i in sorted(id2label)]
        self.multi_label = multi_label

    @classmethod
    def from_directory(cls, directory: Path) -> TextClassification:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
        multi = config.get("problem_type") == "multi_label_classification"
        return cls(id2label, multi)

    def results(
        self, outputs: Sequence[Any], mask: np.ndarray, items: list[tuple[Encoded, ItemOptions]]
    ) -> list[Any]:
        del mask
        logits = torch.from_numpy(floats(outputs[0][: len(items)]))
        # One output (a cross-encoder or a regression head): a sigmoid, as sentence-transformers'
        # CrossEncoder and transformers' pipeline do; a softmax over one logit is always 1.
        sigmoid = self.multi_label or logits.shape[-1] == 1
        scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
        out: list[Any] = []
        for row, raw, (_, opt) in zip(scores.numpy(), logits.numpy(), items, strict=True):
            if opt.rerank:
                out.append((float(row[0]), float(raw[0])))
                continue
            values = raw if opt.raw_scores else row
            order = np.argsort(-values, kind="stable")[: opt.top_k or 1]
            out.append([{"label": self.labels[i], "score": float(values[i])} for i in order])
        return out


class QuestionAnswering:
    """The best answer span inside the context, its character offsets and its probability."""

    def __init__(self, max_answer_tokens: int = 30) -> None:
        self.max_answer_tokens = max_answer_tokens

    def results(
        self, outputs: Sequence[Any], mask: np.ndarray, items: list[tuple[Encoded, ItemOptions]]
    ) -> list[Any]:
        del mask
        n = len(items)
        starts, ends = floats(outputs[0][:n]), floats(outputs[1][:n])
        return [self._best(starts[i], ends[i], enc, opt.context or "") for i, (enc, opt) in enumerate(items)]

    def _best(self, start: np.ndarray, end: np.ndarray, enc: Encoded, context: str) -> dict[str, Any]:
        assert enc.sequence_ids is not None and enc.offsets is not None, "this is a bug: QA needs offsets"
        ctx = np.array([sid == 1 for sid in enc.sequence_ids], dtype=bool)
        if not ctx.any():
            return {"answer": "", "start": 0, "end": 0, "score": 0.0}
        length = len(enc.sequence_ids)
        s_logits = np.where(ctx, start[:length], -np.inf)
        e_logits = np.where(ctx, end[:length], -np.inf)
        s_prob = np.exp(s_logits - s_logits.max())
        s_prob /= s_prob.sum()
        e_prob = np.exp(e_logits - e_logits.max())
        e_prob /= e_prob.sum()
        # score[i, j] = P(start=i) * P(end=j) for i <= j < i + max_answer_tokens
        scores = np.triu(np.outer(s_prob, e_prob))
        scores = np.tril(scores, self.max_answer_tokens - 1)
        i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        char_start, char_end = enc.offsets[i][0], enc.offsets[j][1]
        return {
            "answer": context[char_start:char_end],
            "start": int(char_start),
            "end": int(char_end),
            "score": float(scores[i, j]),
        }


@dataclass(frozen=True)
class Prompts:
    """sentence-transformers prompts: text put before an input, by name (``query: ``, ...)."""

    prompts: dict[str, str]
    default: str | None  # the name used when a request names none
    include_prompt: bool = True  # pooling counts the prompt's tokens (sentence-transformers' default)

    @classmethod
    def from_directory(cls, directory: Path, configured_default: str) -> Prompts:
        """The model's prompts; ``configured_default`` is serve.default_prompt_name ("" keeps the
        model's own default, "none" turns it off). Raises ValueError for an unknown name."""
        config_file = directory / "config_sentence_transformers.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        prompts = {str(k): str(v) for k, v in (config.get("prompts") or {}).items()}
        default = config.get("default_prompt_name") or None
        if configured_default == "none":
            default = None
        elif configured_default:
            default = configured_default
        if default is not None and default not in prompts:
            names = ", ".join(sorted(prompts)) or "none"
            raise ValueError(f"serve.default_prompt_name={default!r}: this model's prompts are: {names}")
        pooling = directory / "1_Pooling" / "config.json"
        include = True
        if pooling.is_file():
            include = bool(json.loads(pooling.read_text(encoding="utf-8")).get("include_prompt", True))
        return cls(prompts, default, include)

    def apply(self, texts: tuple[str, ...], name: str | None, *, field: str, embeds: bool) -> tuple[str, ...]:
        """``texts`` with the named prompt before each (the default one when ``name`` is None, on
        embedding models); a 422 naming ``field`` for a name the model does not have, or any name
        for a model that does not embed."""
        if not embeds:
            if name is not None:
                raise validation(field, "prompts apply to feature-extraction (embedding) models only")
            return texts
        chosen = name if name is not None else self.default
        if chosen is None:
            return texts
        prompt = self.prompts.get(chosen)
        if prompt is None:
            names = ", ".join(sorted(self.prompts)) or "none"
            raise validation(field, f"unknown prompt {chosen!r}; this model's prompts: {names}")
        if not self.include_prompt:
            raise validation(
                field, "this model pools without its prompt's tokens (include_prompt=false): not supported"
            )
        return tuple(prompt + text for text in texts)


def task_for(task: TaskKind, directory: Path) -> Task:
    if task is TaskKind.FEATURE_EXTRACTION:
        return FeatureExtraction.from_directory(directory)
    if task is TaskKind.TEXT_CLASSIFICATION:
        return TextClassification.from_directory(directory)
    return QuestionAnswering()
