"""The kinds of task a model does, and the facts of each: one enum, so no caller compares names.

A task says which Hugging Face head is traced, which outputs it returns, whether an input is one
text or a (question, context) pair, and the named columns its answers have (what the Open
Inference Protocol calls output tensors). The work after the model (pooling, scores, answer
spans) is ``serving.postprocess``'s.

Example: a token-classification task would add a member and its :class:`TaskFacts` row, and
a post-processing class for its results.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One named column of a task's answers: a v2 output tensor (``datatype`` as v2 names it)."""

    name: str
    datatype: str  # FP32, INT64 or BYTES


@dataclass(frozen=True)
class TaskFacts:
    auto_class: str  # the transformers class that loads the model with its head
    output_names: tuple[str, ...]  # what the traced model returns, in order
    input_names: tuple[str, ...]  # what one input is made of, as v2 input tensors
    columns: tuple[Column, ...]  # an answer's named parts, as v2 output tensors


class TaskKind(str, enum.Enum):
    """``model.task``. Its value is the name used in settings, manifests and reports."""

    FEATURE_EXTRACTION = "feature-extraction"
    TEXT_CLASSIFICATION = "text-classification"
    QUESTION_ANSWERING = "question-answering"
    # Served by an LLM engine that neuronserve launches (see neuronserve.generate), not traced.
    TEXT_GENERATION = "text-generation"

    def __str__(self) -> str:
        return self.value

    @property
    def facts(self) -> TaskFacts:
        return _FACTS[self]

    @property
    def generates(self) -> bool:
        """Answers are generated text, served by an LLM engine (copies x tensor parallelism)."""
        return self is TaskKind.TEXT_GENERATION

    @property
    def embeds(self) -> bool:
        """Answers are sentence embeddings (the OpenAI embeddings route, prompts, dimensions)."""
        return self is TaskKind.FEATURE_EXTRACTION

    @property
    def classifies(self) -> bool:
        """Answers are scores of labels (a one-label classifier is a reranker, a cross-encoder)."""
        return self is TaskKind.TEXT_CLASSIFICATION

    @property
    def takes_pairs(self) -> bool:
        """An input is a (question, context) pair, not one text."""
        return len(self.facts.input_names) == 2

    @property
    def records_labels(self) -> bool:
        """The manifest records the model's ``id2label`` (classifiers)."""
        return self.classifies


_FACTS = {
    TaskKind.FEATURE_EXTRACTION: TaskFacts(
        auto_class="AutoModel",
        output_names=("last_hidden_state",),
        input_names=("text",),
        columns=(Column("embedding", "FP32"),),
    ),
    TaskKind.TEXT_CLASSIFICATION: TaskFacts(
        auto_class="AutoModelForSequenceClassification",
        output_names=("logits",),
        input_names=("text",),
        columns=(Column("label", "BYTES"), Column("score", "FP32")),
    ),
    TaskKind.QUESTION_ANSWERING: TaskFacts(
        auto_class="AutoModelForQuestionAnswering",
        output_names=("start_logits", "end_logits"),
        input_names=("question", "context"),
        columns=(
            Column("answer", "BYTES"),
            Column("score", "FP32"),
            Column("start", "INT64"),
            Column("end", "INT64"),
        ),
    ),
}
