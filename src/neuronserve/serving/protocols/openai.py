"""The OpenAI API's embeddings and models: ``POST /v1/embeddings``, ``GET /v1/models[/{model}]``."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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
    one_of_names,
    parse_body,
)
from neuronserve.serving.protocols.native import prompt_names
from neuronserve.serving.registry import ModelRegistry, is_embedder
from neuronserve.serving.tasks import unit_rows
from neuronserve.serving.work import InferRequest, InferResult


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``: the OpenAI embeddings request."""

    model_config = ConfigDict(extra="forbid")
    input: Text | Annotated[list[Text], Field(min_length=1)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None,
        ge=1,
        description="Matryoshka-style: the first N values of each embedding (re-normalised when the "
        "model normalises); above the model's size is a 422.",
    )
    user: str | None = None
    truncate: bool = Field(
        False,
        description="A neuronserve extension: cut inputs longer than the largest compiled sequence length "
        "to it (the response's usage.truncated_inputs counts them); without it such an input is a 422.",
    )
    prompt_name: str | None = Field(
        None,
        description="The model's sentence-transformers prompt to put before each input (default: "
        "serve.default_prompt_name).",
    )


class ModelCard(BaseModel):
    """One model in ``GET /v1/models`` (OpenAI's model object)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models``: the models this server serves (OpenAI's list)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


async def embeddings(registry: ModelRegistry, call: Call) -> Reply:
    request = parse_body(EmbeddingsRequest, call.body)
    engine = registry.pick(
        request.model, "/v1/embeddings", is_embedder, "a feature-extraction model (POST /predict serves any)"
    )
    return await labelled(engine, _embeddings(engine, request, call))


async def _embeddings(engine: Engine, request: EmbeddingsRequest, call: Call) -> Reply:
    dim = engine.manifest.model.get("hidden_size")
    if request.dimensions is not None and dim and request.dimensions > dim:
        raise validation(
            "dimensions", f"{request.dimensions} exceeds this model's {dim} dimensions; send at most {dim}"
        )
    texts = tuple(request.input) if isinstance(request.input, list) else (request.input,)
    decoded = InferRequest(
        texts=texts,
        field="input",
        prompt_name=request.prompt_name,
        prompt_field="prompt_name",
        truncate=request.truncate,
        truncate_hint='send "truncate": true to cut it to {n} tokens, or shorten it',
    )
    result = await engine.infer(decoded, receive=call.receive)
    return answered(result, lambda r: _body(engine, r, request, dim))


def _body(engine: Engine, result: InferResult, request: EmbeddingsRequest, dim: Any) -> bytes:
    vectors = result.outputs
    if request.dimensions is not None and request.dimensions != dim:
        vectors = shortened(vectors, request.dimensions, engine.normalizes)
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(vectors):
        array = np.asarray(vector, dtype=np.float32)
        embedding: Any = (
            base64.b64encode(array.astype("<f4").tobytes()).decode()
            if request.encoding_format == "base64"
            else array
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage: dict[str, int] = {"prompt_tokens": result.tokens, "total_tokens": result.tokens}
    if result.truncated:
        usage["truncated_inputs"] = result.truncated
    return dumps({"object": "list", "data": data, "model": engine.model_name, "usage": usage})


def shortened(outputs: list[Any], dimensions: int, normalize: bool) -> list[Any]:
    """Matryoshka-style: the first ``dimensions`` values of each embedding, re-normalised to unit
    length when the model's embeddings are normalised (a prefix of a unit vector is not)."""
    vectors = np.asarray(outputs, dtype=np.float32)[:, :dimensions]
    return list(unit_rows(vectors) if normalize else vectors)


def narrow_embeddings(registry: ModelRegistry, components: dict[str, Any]) -> None:
    """At most serve.max_inputs_per_request inputs; dimensions up to the largest embedding size;
    the embedding models' prompt names."""
    properties = components["EmbeddingsRequest"]["properties"]
    array_limit(properties["input"], registry.settings.serve.max_inputs_per_request)
    limit_dimensions(properties["dimensions"], registry)
    one_of_names(properties["prompt_name"], prompt_names(registry))


def limit_dimensions(schema: dict[str, Any], registry: ModelRegistry) -> None:
    """A ``dimensions`` field's maximum: the largest embedding size, when every embedder has one."""
    hidden = [e.manifest.model.get("hidden_size") for e in registry.engines.values() if e.task_kind.embeds]
    sizes = [h for h in hidden if isinstance(h, int)]
    if sizes and len(sizes) == len(hidden):
        schema["anyOf"][0]["maximum"] = max(sizes)


# --- models --------------------------------------------------------------------------------------


def _card(engine: Engine) -> dict[str, Any]:
    try:
        created = int(dt.datetime.fromisoformat(engine.manifest.created_at).timestamp())
    except ValueError:
        created = 0
    return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "neuronserve"}


async def models(registry: ModelRegistry, _call: Call) -> Reply:
    """``GET /v1/models``: every model this server serves."""
    return json_reply({"object": "list", "data": [_card(e) for e in registry.engines.values()]})


async def model(registry: ModelRegistry, call: Call) -> Reply:
    """``GET /v1/models/{model}``: one of them."""
    return json_reply(_card(registry.pick(call.params["model"], "/v1/models")))
