"""The inference handlers: request bytes in, a :class:`Reply` out.

Both the FastAPI routes (which own the OpenAPI documentation) and the middleware's fast path
for the hot routes call these, so there is one implementation of each protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from neuronserve.serving import formats
from neuronserve.serving.engine import Engine, InferResult
from neuronserve.serving.errors import ServeError, validation
from neuronserve.serving.registry import ModelRegistry, is_cross_encoder, is_embedder
from neuronserve.serving.schemas import (
    CohereRerankRequest,
    EmbeddingsRequest,
    PredictRequest,
    RepositoryIndexRequest,
    RerankDocument,
    RerankRequest,
    TokenizeRequest,
)
from neuronserve.serving.tasks import ItemOptions
from neuronserve.serving.v2 import encode_infer, parse_infer

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
JSON = "application/json"
CLIENT_CLOSED = 499  # nginx's code for "the client closed the request"; nobody reads the answer

_UNION_TAG = re.compile(r"^[A-Z]|[\[\-]")  # pydantic names union branches like "list[QAInput]"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = JSON


# --- probes: answered by the middleware before anything else (see ServingMiddleware) -----------

_ALIVE = Reply(200, b'{"status":"alive"}')
_V2_LIVE = Reply(200, b'{"live":true}')


def liveness() -> Reply:
    """``/health``: the process and its event loop answer."""
    return _ALIVE


def v2_liveness() -> Reply:
    return _V2_LIVE


def readiness(registry: ModelRegistry) -> Reply:
    """``/ready``: 200 once every copy of every model is loaded and warmed; else 503 and why."""
    several = len(registry.engines) > 1
    body: dict[str, Any] = {
        "status": registry.state,
        "copies_ready": registry.copies_ready,
        "copies": registry.copies,
        # copies out of rotation: by copy number, as ever; "<model>/<copy>" with several models
        "unhealthy": {
            (f"{name}/{copy}" if several else str(copy)): why
            for name, e in registry.engines.items()
            for copy, why in e.unhealthy.items()
        },
        "models": {
            name: {
                "status": e.state,
                "copies_ready": e.copies_ready,
                "copies": e.copies,
                "unhealthy": {str(copy): why for copy, why in e.unhealthy.items()},
            }
            for name, e in registry.engines.items()
        },
    }
    if registry.ready:
        return Reply(200, orjson.dumps(body))
    message = registry.load_error or f"not ready: {registry.state}"
    return Reply(503, orjson.dumps({"error": message, "type": "unavailable", **body}))


def v2_readiness(registry: ModelRegistry) -> Reply:
    ready = registry.ready
    return Reply(200 if ready else 503, orjson.dumps({"ready": ready}))


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.search(part):
            path += f".{part}" if path else part
    return path or "body"


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; the 422 names the most specific field at fault."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise validation("body", f"malformed JSON: {errors[0]['msg']}") from None
        deepest = max(errors, key=lambda e: len(e["loc"]))
        where = _field_path(deepest["loc"])
        if len(errors) > 1 and len(deepest["loc"]) <= 2:  # the value fits no branch of a union
            if any(e["type"] == "too_short" for e in errors):
                raise validation(where, "must not be an empty list") from None
            raise validation(
                where, "must be a non-empty string, a list of them, or {question, context} objects"
            ) from None
        if deepest["type"] == "string_pattern_mismatch":
            raise validation(where, "must not be blank (whitespace only)") from None
        raise validation(where, deepest["msg"]) from None


async def _run(
    engine: Engine,
    receive: Receive,
    inputs: list[str] | list[tuple[str, str]],
    options: list[ItemOptions],
    *,
    truncate: bool,
    timeout_s: float,
    field: str = "inputs",
) -> InferResult | None:
    """The engine's answer, or None when the client left (its queued inputs were dropped).

    Only the client's own disconnect becomes None; any other cancellation (shutdown, a
    cancelled handler task) propagates as it must.
    """
    watch = formats.DisconnectWatch(receive)
    try:
        return await engine.infer(
            inputs, options, truncate=truncate, timeout_s=timeout_s, watch=watch.items, field=field
        )
    except asyncio.CancelledError:
        if watch.disconnected:
            return None
        raise
    finally:
        watch.close()


async def _labelled(engine: Engine, work: Awaitable[Reply]) -> Reply:
    """``work``'s reply, or its error, with the ``x-model`` header that says which model answered
    (clients see it; the middleware labels the request's metrics and log line by it)."""
    try:
        reply = await work
    except ServeError as exc:
        exc.headers["x-model"] = engine.model_name
        raise
    reply.headers["x-model"] = engine.model_name
    return reply


async def predict(registry: ModelRegistry, body: bytes, receive: Receive) -> Reply:
    request = parse_body(PredictRequest, body)
    engine = registry.pick(request.model, "/predict")
    return await _labelled(engine, _predict(engine, request, receive))


async def _predict(engine: Engine, request: PredictRequest, receive: Receive) -> Reply:
    inputs, options = formats.predict_inputs(engine, request)
    if engine.task_kind.embeds:
        inputs = engine.prompted(inputs, request.parameters.prompt_name, "parameters.prompt_name")  # type: ignore[arg-type]
    elif request.parameters.prompt_name is not None:
        raise validation(
            "parameters.prompt_name", "prompts apply to feature-extraction (embedding) models only"
        )
    timeout = formats.timeout_seconds(engine, request.parameters.timeout_ms, "parameters.timeout_ms")
    result = await _run(
        engine, receive, inputs, options, truncate=request.parameters.truncate, timeout_s=timeout
    )
    if result is None:
        return Reply(CLIENT_CLOSED, b"")
    return Reply(200, formats.predict_body(engine, result), formats.timing_headers(result))


async def embeddings(registry: ModelRegistry, body: bytes, receive: Receive) -> Reply:
    request = parse_body(EmbeddingsRequest, body)
    engine = registry.pick(
        request.model, "/v1/embeddings", is_embedder, "a feature-extraction model (POST /predict serves any)"
    )
    return await _labelled(engine, _embeddings(engine, request, receive))


async def _embeddings(engine: Engine, request: EmbeddingsRequest, receive: Receive) -> Reply:
    dim = engine.manifest.model.get("hidden_size")
    if request.dimensions is not None and dim and request.dimensions > dim:
        raise validation(
            "dimensions", f"{request.dimensions} exceeds this model's {dim} dimensions; send at most {dim}"
        )
    inputs = request.input if isinstance(request.input, list) else [request.input]
    formats.check_count(len(inputs), engine.settings.serve.max_inputs_per_request, "input")
    inputs = engine.prompted(inputs, request.prompt_name, "prompt_name")
    timeout = formats.timeout_seconds(engine, None, "timeout")
    result = await _run(
        engine,
        receive,
        inputs,
        [ItemOptions()] * len(inputs),
        truncate=False,
        timeout_s=timeout,
        field="input",
    )
    if result is None:
        return Reply(CLIENT_CLOSED, b"")
    if request.dimensions is not None and request.dimensions != dim:
        result = dataclasses.replace(
            result, outputs=formats.shortened(result.outputs, request.dimensions, engine.normalizes)
        )
    body_out = formats.embeddings_body(engine, result, request.encoding_format)
    return Reply(200, body_out, formats.timing_headers(result))


RERANKER = "a cross-encoder (a text-classification model with one output)"


async def _scores(
    engine: Engine, receive: Receive, query: str, texts: list[str], *, truncate: bool, field: str
) -> tuple[list[tuple[float, float]], InferResult] | None:
    """(sigmoid score, logit) of each (query, text) pair, batched like any input; None when the
    client left. ``engine`` is a cross-encoder (see :func:`registry.is_cross_encoder`)."""
    formats.check_count(len(texts), engine.settings.serve.max_inputs_per_request, field)
    pairs = [(query, text) for text in texts]
    timeout = formats.timeout_seconds(engine, None, "timeout")
    result = await _run(
        engine, receive, pairs, [ItemOptions(rerank=True)] * len(pairs), truncate=truncate, timeout_s=timeout,
        field=field,
    )  # fmt: skip
    if result is None:
        return None
    return list(result.outputs), result


async def rerank(registry: ModelRegistry, body: bytes, receive: Receive) -> Reply:
    """TEI's ``/rerank``: every text with its score against the query, best first."""
    request = parse_body(RerankRequest, body)
    engine = registry.pick(request.model, "/rerank", is_cross_encoder, RERANKER)
    return await _labelled(engine, _rerank(engine, request, receive))


async def _rerank(engine: Engine, request: RerankRequest, receive: Receive) -> Reply:
    scored = await _scores(
        engine, receive, request.query, request.texts, truncate=request.truncate, field="texts"
    )
    if scored is None:
        return Reply(CLIENT_CLOSED, b"")
    scores, result = scored
    pick = 1 if request.raw_scores else 0
    order = sorted(range(len(scores)), key=lambda i: -scores[i][0])
    ranked = [
        {"index": i, "score": scores[i][pick], **({"text": request.texts[i]} if request.return_text else {})}
        for i in order
    ]
    return Reply(200, formats.dumps(ranked), formats.timing_headers(result))


async def cohere_rerank(registry: ModelRegistry, body: bytes, receive: Receive) -> Reply:
    """The Cohere/Jina ``/v1/rerank``: ``results[{index, relevance_score, document}]``, best first."""
    request = parse_body(CohereRerankRequest, body)
    engine = registry.pick(request.model, "/v1/rerank", is_cross_encoder, RERANKER)
    return await _labelled(engine, _cohere_rerank(engine, request, receive))


async def _cohere_rerank(engine: Engine, request: CohereRerankRequest, receive: Receive) -> Reply:
    texts = [d.text if isinstance(d, RerankDocument) else d for d in request.documents]
    scored = await _scores(engine, receive, request.query, texts, truncate=True, field="documents")
    if scored is None:
        return Reply(CLIENT_CLOSED, b"")
    scores, result = scored
    order = sorted(range(len(scores)), key=lambda i: -scores[i][0])[: request.top_n]
    results = [
        {
            "index": i,
            "relevance_score": scores[i][0],
            **({"document": {"text": texts[i]}} if request.return_documents else {}),
        }
        for i in order
    ]
    usage = {"total_tokens": result.tokens}
    return Reply(200, formats.dumps({"model": engine.model_name, "results": results, "usage": usage}),
                 formats.timing_headers(result))  # fmt: skip


async def tokenize(registry: ModelRegistry, body: bytes) -> Reply:
    """TEI's ``/tokenize``: every token of each input with its id, text and character span."""
    request = parse_body(TokenizeRequest, body)
    engine = registry.pick(request.model, "/tokenize")
    return await _labelled(engine, _tokenize(engine, request))


async def _tokenize(engine: Engine, request: TokenizeRequest) -> Reply:
    texts = request.inputs if isinstance(request.inputs, list) else [request.inputs]
    formats.check_count(len(texts), engine.settings.serve.max_inputs_per_request, "inputs")
    tokens = await engine.tokens(texts, add_special_tokens=request.add_special_tokens)
    return Reply(200, formats.dumps(tokens))


def repository_index(registry: ModelRegistry, body: bytes) -> Reply:
    """The v2 repository index (tritonclient's ``get_model_repository_index``): an empty body
    lists every model, ``{"ready": true}`` only the ready ones."""
    request = parse_body(RepositoryIndexRequest, body) if body.strip() else RepositoryIndexRequest()
    entries = [
        {
            "name": name,
            "version": "1",
            "state": "READY" if engine.ready else "UNAVAILABLE",
            "reason": "" if engine.ready else (engine.load_error or f"not ready: {engine.state}"),
        }
        for name, engine in registry.engines.items()
    ]
    return Reply(200, formats.dumps([e for e in entries if e["state"] == "READY" or not request.ready]))


async def v2_infer(
    registry: ModelRegistry, model: str, body: bytes, header_length: str | None, receive: Receive
) -> Reply:
    engine = registry.pick(model, "v2 infer")
    return await _labelled(engine, _v2_infer(engine, body, header_length, receive))


async def _v2_infer(engine: Engine, body: bytes, header_length: str | None, receive: Receive) -> Reply:
    parsed = parse_infer(body, header_length)
    inputs, options = formats.v2_inputs(engine, parsed)
    if engine.task_kind.embeds:  # the default prompt, as on every embedding route
        inputs = engine.prompted(inputs, None, "inputs")  # type: ignore[arg-type]
    timeout = formats.timeout_seconds(engine, None, "timeout")
    result = await _run(engine, receive, inputs, options, truncate=False, timeout_s=timeout)
    if result is None:
        return Reply(CLIENT_CLOSED, b"")
    tensors = formats.v2_outputs(engine, result, parsed.requested)
    out, headers = encode_infer(engine.model_name, parsed.id, tensors, parsed.binary_outputs)
    media = headers.pop("content-type")
    return Reply(200, out, {**headers, **formats.timing_headers(result)}, media)
