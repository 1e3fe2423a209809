"""neuronserve's own routes: ``POST /predict`` for every task, TEI's ``POST /tokenize``, the
probes (``/health``, ``/ready``) and ``/info``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from neuronserve.config import Settings
from neuronserve.serving.engine import Engine
from neuronserve.serving.errors import validation
from neuronserve.serving.protocols.common import (
    Call,
    Reply,
    Text,
    answered,
    array_limit,
    dumps,
    json_reply,
    labelled,
    model_field,
    one_of_names,
    parse_body,
)
from neuronserve.serving.registry import ModelRegistry, describe
from neuronserve.serving.tasks import ItemOptions
from neuronserve.serving.work import InferRequest, InferResult


class QAInput(BaseModel):
    """One question about one context (question-answering models)."""

    model_config = ConfigDict(extra="forbid")
    question: Text
    context: Text


class PredictParameters(BaseModel):
    """Options for ``POST /predict``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Strict booleans: no 0 or "yes" for false/true. Integers stay lax: JSON Schema counts 5.0
    # as an integer, so pydantic must too.
    truncate: StrictBool = Field(
        False, description="Cut inputs longer than the largest compiled sequence length instead of a 422."
    )
    normalize: StrictBool | None = Field(
        None, description="feature-extraction: L2-normalise embeddings (default: the model's own config)."
    )
    top_k: int | None = Field(
        None, ge=1, description="text-classification: labels to return, best first (default 1)."
    )
    timeout_ms: int | None = Field(
        None, ge=1, description="Deadline for this request, up to serve.max_request_timeout_ms."
    )
    prompt_name: str | None = Field(
        None,
        description="feature-extraction: the model's sentence-transformers prompt to put before each "
        "text (default: serve.default_prompt_name).",
    )


class PredictRequest(BaseModel):
    """``POST /predict``: one input or a list; strings, or question/context pairs for QA models."""

    model_config = ConfigDict(extra="forbid")
    inputs: (
        Text
        | QAInput
        | Annotated[list[Text], Field(min_length=1)]
        | Annotated[list[QAInput], Field(min_length=1)]
    )
    parameters: PredictParameters = PredictParameters()
    model: str | None = model_field()


class PredictResponse(BaseModel):
    """``POST /predict`` answer: one output per input, in order."""

    model: str
    outputs: list[Any]


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: one text or a list (TEI's request)."""

    model_config = ConfigDict(extra="forbid")
    inputs: Text | Annotated[list[Text], Field(min_length=1)]
    add_special_tokens: StrictBool = Field(
        True, description="Include the model's special tokens ([CLS], [SEP])."
    )
    model: str | None = model_field()


class Token(BaseModel):
    """One token: its id, its text, and (unless special) its character span in the input."""

    id: int
    text: str
    special: bool
    start: int | None = Field(None, description="First character of the token in the input (None: special).")
    stop: int | None = Field(None, description="One past its last character (None: special).")


class Liveness(BaseModel):
    """``GET /health``."""

    status: Literal["alive"]


# --- /predict -------------------------------------------------------------------------------


def predict_request(engine: Engine, request: PredictRequest) -> InferRequest:
    """The engine's request: texts, or (question, context) pairs for question answering."""
    raw = request.inputs if isinstance(request.inputs, list) else [request.inputs]
    params = request.parameters
    common: dict[str, Any] = {
        "truncate": params.truncate,
        "timeout_ms": params.timeout_ms,
        "timeout_field": "parameters.timeout_ms",
        "prompt_name": params.prompt_name,
        "prompt_field": "parameters.prompt_name",
    }
    if engine.task_kind.takes_pairs:
        if not all(isinstance(x, QAInput) for x in raw):
            raise validation(
                "inputs", 'this question-answering model takes {"question": ..., "context": ...} items'
            )
        pairs = tuple((x.question, x.context) for x in raw if isinstance(x, QAInput))
        return InferRequest(pairs=pairs, options=tuple(ItemOptions(context=c) for _, c in pairs), **common)
    if not all(isinstance(x, str) for x in raw):
        raise validation("inputs", f"this {engine.task_kind} model takes strings")
    options = ItemOptions(normalize=params.normalize, top_k=params.top_k)
    return InferRequest(
        texts=tuple(x for x in raw if isinstance(x, str)), options=(options,) * len(raw), **common
    )


async def predict(registry: ModelRegistry, call: Call) -> Reply:
    request = parse_body(PredictRequest, call.body)
    engine = registry.pick(request.model, "/predict")
    return await labelled(engine, _predict(engine, request, call))


async def _predict(engine: Engine, request: PredictRequest, call: Call) -> Reply:
    result = await engine.infer(predict_request(engine, request), receive=call.receive)
    return answered(result, lambda r: _predict_body(engine, r))


def _predict_body(engine: Engine, result: InferResult) -> bytes:
    return dumps({"model": engine.model_name, "outputs": result.outputs})


def narrow_predict(registry: ModelRegistry, components: dict[str, Any]) -> None:
    """What this server's models take: texts, or question/context objects (QA), at most
    serve.max_inputs_per_request of them; deadlines up to serve.max_request_timeout_ms; its
    embedding models' prompt names."""
    serve = registry.settings.serve
    pairs = {e.task_kind.takes_pairs for e in registry.engines.values()}
    inputs = components["PredictRequest"]["properties"]["inputs"]
    inputs["anyOf"] = [b for b in inputs["anyOf"] if ("QAInput" in orjson.dumps(b).decode()) in pairs]
    array_limit(inputs, serve.max_inputs_per_request)
    parameters = components["PredictParameters"]["properties"]
    parameters["timeout_ms"]["anyOf"][0]["maximum"] = serve.max_request_timeout_ms
    one_of_names(parameters["prompt_name"], prompt_names(registry))


def prompt_names(registry: ModelRegistry) -> list[str]:
    """The prompt names every embedding model of this server knows (a name one lacks is a 422)."""
    embedders = [e for e in registry.engines.values() if e.task_kind.embeds and e.prompts.include_prompt]
    if not embedders:
        return []
    common = set(embedders[0].prompts.prompts)
    for engine in embedders[1:]:
        common &= set(engine.prompts.prompts)
    return sorted(common)


# --- /tokenize -------------------------------------------------------------------------------


async def tokenize(registry: ModelRegistry, call: Call) -> Reply:
    """TEI's ``/tokenize``: every token of each input with its id, text and character span."""
    request = parse_body(TokenizeRequest, call.body)
    engine = registry.pick(request.model, "/tokenize")
    return await labelled(engine, _tokenize(engine, request))


async def _tokenize(engine: Engine, request: TokenizeRequest) -> Reply:
    texts = request.inputs if isinstance(request.inputs, list) else [request.inputs]
    return json_reply(await engine.tokens(texts, add_special_tokens=request.add_special_tokens))


def narrow_tokenize(registry: ModelRegistry, components: dict[str, Any]) -> None:
    array_limit(
        components["TokenizeRequest"]["properties"]["inputs"], registry.settings.serve.max_inputs_per_request
    )


# --- probes and /info ----------------------------------------------------------------------------

_ALIVE = Reply(200, b'{"status":"alive"}')


def liveness() -> Reply:
    """``/health``: the process and its event loop answer."""
    return _ALIVE


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


async def info(
    registry: ModelRegistry, settings: Settings, server_name: str, *, keyed: bool, head: dict[str, Any]
) -> Reply:
    """``/info``: ``head`` (TEI's fields), models, shapes and copies, open as TEI's clients
    expect; the effective settings (secrets redacted) and the artifacts' directory only to a
    caller with the key (or when none is set)."""
    models = [_model_info(e, keyed=keyed) for e in registry.engines.values()]
    return json_reply(
        {
            **head,
            "server": server_name,
            "state": registry.state,
            "backend": registry.kind.value,
            "cores": str(registry.cores),
            "threads_per_copy": registry.threads_per_copy,
            # model.*'s fields at the top, as before several models (each is also in "models")
            **{k: v for k, v in models[0].items() if k not in ("name", "task", "kind", "state")},
            "models": models,
            **({"settings": settings.as_dict(redact=True)} if keyed else {}),
        }
    )


def _model_info(engine: Engine, *, keyed: bool) -> dict[str, Any]:
    m = engine.manifest
    info = {
        "name": engine.model_name,
        "task": engine.task_kind.value,
        "kind": describe(engine),
        "state": engine.state,
        "model": m.model,
        "versions": m.versions,
        "artifacts": str(m.directory),
        "shapes": [{"batch_size": s.batch_size, "sequence_length": s.sequence_length} for s in m.shapes],
        "batch_sizes_in_use": list(engine.batch_sizes),
        "copies": engine.copies,
        "measured_ms": {f"b{b}-s{s}": round(c * 1000, 3) for (b, s), c in sorted(engine.costs.items())},
    }
    if not keyed:  # where this host keeps things is for its operators
        del info["artifacts"]
    return info
