"""Turning requests into engine inputs and engine results into each protocol's answer."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import numpy as np
import orjson

from neuronserve.serving.batcher import WorkItem
from neuronserve.serving.engine import Engine, InferResult
from neuronserve.serving.errors import too_large, validation
from neuronserve.serving.schemas import PredictRequest, QAInput
from neuronserve.serving.tasks import ItemOptions
from neuronserve.serving.v2 import V2Request, V2Tensor

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def timing_headers(result: InferResult) -> dict[str, str]:
    return {
        "x-queue-ms": f"{result.queue_ms:.3f}",
        "x-inference-ms": f"{result.inference_ms:.3f}",
        "x-batch-size": str(result.batch_size),
    }


def check_count(count: int, limit: int, field: str) -> None:
    if count > limit:
        raise too_large(field, f"{count} inputs exceed serve.max_inputs_per_request ({limit})")


def timeout_seconds(engine: Engine, requested_ms: int | None, field: str) -> float:
    serve = engine.settings.serve
    if requested_ms is None:
        return serve.request_timeout_ms / 1000.0
    if requested_ms > serve.max_request_timeout_ms:
        raise validation(
            field, f"{requested_ms} exceeds serve.max_request_timeout_ms ({serve.max_request_timeout_ms})"
        )
    return requested_ms / 1000.0


def predict_inputs(
    engine: Engine, request: PredictRequest
) -> tuple[list[str] | list[tuple[str, str]], list[ItemOptions]]:
    """The texts (or pairs) of a /predict request and per-input options, checked against the task."""
    raw = request.inputs if isinstance(request.inputs, list) else [request.inputs]
    check_count(len(raw), engine.settings.serve.max_inputs_per_request, "inputs")
    params = request.parameters
    qa = engine.task_kind.takes_pairs
    if qa:
        if not all(isinstance(x, QAInput) for x in raw):
            raise validation(
                "inputs", 'this question-answering model takes {"question": ..., "context": ...} items'
            )
        pairs = [(x.question, x.context) for x in raw if isinstance(x, QAInput)]
        return pairs, [ItemOptions(context=c) for _, c in pairs]
    if not all(isinstance(x, str) for x in raw):
        raise validation("inputs", f"this {engine.task_kind} model takes strings")
    options = ItemOptions(normalize=params.normalize, top_k=params.top_k)
    return [x for x in raw if isinstance(x, str)], [options] * len(raw)


class DisconnectWatch:
    """Cancels a request's queued work when its client disconnects (it is then never run).

    It reads ``receive`` until the disconnect: the first messages may be the body again (the
    middleware replays what it has read), which must not end the watch. The engine registers a
    request's work items in :attr:`items` before it queues them, so an item is marked cancelled
    (and dropped by the batcher before any copy takes it) whenever the client left first.
    """

    def __init__(self, receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
        self.items = _Registered(self)
        self.disconnected = False
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            continue
        self.disconnected = True
        _cancel(self.items)

    def close(self) -> None:
        self._task.cancel()


def _cancel(items: Iterable[WorkItem]) -> None:
    for item in items:
        item.cancelled = True  # the batcher drops it instead of dispatching it
        item.handle.cancel()  # the request's answer: its awaiting handler stops waiting


class _Registered(list):  # type: ignore[type-arg]
    """The work items a watch cancels; any added after the client left (it left while its
    inputs were being tokenized) are cancelled at once, before they are queued."""

    def __init__(self, watch: DisconnectWatch) -> None:
        super().__init__()
        self._watch = watch

    def extend(self, items: Iterable[WorkItem]) -> None:
        added = list(items)
        super().extend(added)
        if self._watch.disconnected:
            _cancel(added)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=JSON_OPTIONS)


def shortened(outputs: list[Any], dimensions: int, normalize: bool) -> list[Any]:
    """Matryoshka-style: the first ``dimensions`` values of each embedding, re-normalised to unit
    length when the model's embeddings are normalised (a prefix of a unit vector is not)."""
    vectors = np.asarray(outputs, dtype=np.float32)[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return list(vectors)


def predict_body(engine: Engine, result: InferResult) -> bytes:
    return orjson.dumps({"model": engine.model_name, "outputs": result.outputs}, option=JSON_OPTIONS)


def embeddings_body(engine: Engine, result: InferResult, encoding_format: str) -> bytes:
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(result.outputs):
        array = np.asarray(vector, dtype=np.float32)
        embedding: Any = (
            base64.b64encode(array.astype("<f4").tobytes()).decode() if encoding_format == "base64" else array
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body = {
        "object": "list",
        "data": data,
        "model": engine.model_name,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
    }
    return orjson.dumps(body, option=JSON_OPTIONS)


def v2_inputs(
    engine: Engine, request: V2Request
) -> tuple[list[str] | list[tuple[str, str]], list[ItemOptions]]:
    """Texts (or question/context pairs) from v2 BYTES tensors named as in the model metadata."""
    limit = engine.settings.serve.max_inputs_per_request
    if engine.task_kind.takes_pairs:
        missing = [n for n in ("question", "context") if n not in request.inputs]
        if missing:
            raise validation(
                f"inputs.{missing[0]}", "question-answering needs BYTES inputs question and context"
            )
        questions, contexts = request.inputs["question"], request.inputs["context"]
        if len(questions) != len(contexts):
            raise validation("inputs.context", "needs as many elements as inputs.question")
        check_count(len(questions), limit, "inputs.question")
        return list(zip(questions, contexts, strict=True)), [ItemOptions(context=c) for c in contexts]
    if "text" not in request.inputs:
        raise validation("inputs.text", "a BYTES input named text is required")
    texts = request.inputs["text"]
    check_count(len(texts), limit, "inputs.text")
    return texts, [ItemOptions()] * len(texts)


def v2_outputs(engine: Engine, result: InferResult, requested: list[str] | None) -> list[V2Tensor]:
    n = len(result.outputs)
    task = engine.task_kind
    if task.embeds:
        matrix = np.stack([np.asarray(v, dtype=np.float32) for v in result.outputs])
        tensors = [V2Tensor("embedding", "FP32", list(matrix.shape), matrix)]
    elif task.classifies:
        tensors = [
            V2Tensor("label", "BYTES", [n], [r[0]["label"] for r in result.outputs]),
            V2Tensor(
                "score", "FP32", [n], np.array([r[0]["score"] for r in result.outputs], dtype=np.float32)
            ),
        ]
    else:
        tensors = [
            V2Tensor("answer", "BYTES", [n], [r["answer"] for r in result.outputs]),
            V2Tensor("score", "FP32", [n], np.array([r["score"] for r in result.outputs], dtype=np.float32)),
            V2Tensor("start", "INT64", [n], np.array([r["start"] for r in result.outputs], dtype=np.int64)),
            V2Tensor("end", "INT64", [n], np.array([r["end"] for r in result.outputs], dtype=np.int64)),
        ]
    if requested is None:
        return tensors
    known = {t.name: t for t in tensors}
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise validation("outputs", f"unknown output {unknown[0]!r}; this model has {', '.join(known)}")
    return [known[name] for name in requested]


def v2_metadata(engine: Engine) -> dict[str, Any]:
    task = engine.task_kind
    if task.takes_pairs:
        inputs = [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in ("question", "context")]
        outputs = [
            {"name": "answer", "datatype": "BYTES", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "start", "datatype": "INT64", "shape": [-1]},
            {"name": "end", "datatype": "INT64", "shape": [-1]},
        ]
    else:
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        if task.embeds:
            dim = engine.manifest.model.get("hidden_size") or -1
            outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}]
        else:
            outputs = [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "score", "datatype": "FP32", "shape": [-1]},
            ]
    return {
        "name": engine.model_name,
        "versions": ["1"],
        "platform": f"neuronserve_{engine.kind.value}",
        "inputs": inputs,
        "outputs": outputs,
    }
