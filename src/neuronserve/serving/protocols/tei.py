"""Hugging Face text-embeddings-inference's routes, so TEI clients (``huggingface_hub``'s
``InferenceClient``, LangChain's ``HuggingFaceEndpointEmbeddings``) work unchanged:
``POST /embed``, ``POST /`` (by the model's kind: embed, classify or rerank), ``POST /decode``
and the TEI fields of ``GET /info``. ``/tokenize`` and ``/rerank`` live with their kin
(:mod:`native`, :mod:`rerank`); TEI's ``/predict`` is neuronserve's own route, so TEI's
classification is served at ``POST /``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from neuronserve import __version__
from neuronserve.serving.engine import Engine
from neuronserve.serving.errors import validation
from neuronserve.serving.protocols import rerank
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
from neuronserve.serving.protocols.openai import limit_dimensions, shortened
from neuronserve.serving.registry import ModelRegistry, is_cross_encoder, is_embedder
from neuronserve.serving.tasks import FeatureExtraction, ItemOptions
from neuronserve.serving.work import InferRequest, InferResult

TRUNCATE_HINT = 'send "truncate": true to cut it to {n} tokens, or shorten it'
EMBEDDER = "a feature-extraction model (POST /predict serves any)"
CLASSIFY_INPUTS = "a text, a [text, text_pair] list, or a batch of them: [[text], [text, text_pair], ...]"
# TEI spells its direction "Right"/"Left" and accepts lowercase; only the right end is cut here, so
# the schema names only it (a "left" is a 422 naming the field, before any work).
Direction = Literal["right", "Right"]


class EmbedRequest(BaseModel):
    """``POST /embed``: TEI's embed request. Answers one embedding per input, as a list of lists."""

    model_config = ConfigDict(extra="forbid")
    inputs: Text | Annotated[list[Text], Field(min_length=1)]
    normalize: StrictBool = Field(True, description="L2-normalise each embedding (TEI's default: true).")
    truncate: StrictBool | None = Field(
        None,
        description="Cut inputs longer than the largest compiled sequence length (default: "
        "serve.auto_truncate; else a 422).",
    )
    truncation_direction: Direction | None = Field(None, description='"right" (the end is cut).')
    prompt_name: str | None = Field(
        None, description="The model's sentence-transformers prompt for each input."
    )
    dimensions: int | None = Field(None, ge=1, description="The first N values of each embedding.")
    # huggingface_hub's InferenceClient.feature_extraction may send it; vectors are JSON numbers here.
    encoding_format: Literal["float"] | None = Field(
        None, description='"float" only; POST /v1/embeddings answers base64.'
    )
    model: str | None = Field(None, description="A neuronserve extension: which model, when several embed.")


class ClassifyParameters(BaseModel):
    """The HF Inference API's text-classification parameters, as ``InferenceClient`` sends them."""

    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, description="Labels to return, best first (default: all).")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description='"none": logits; otherwise the model\'s own (softmax, sigmoid when multi-label).'
    )


class ClassifyRequest(BaseModel):
    """``POST /`` on a classifier: TEI's predict request (a text, a ``[text, text_pair]`` pair, or
    a batch of ``[text]`` and ``[text, text_pair]`` lists), or the HF Inference API's
    ``{"inputs", "parameters"}``, whose answer is always a list of lists (as InferenceClient reads)."""

    model_config = ConfigDict(extra="forbid")
    inputs: (
        Annotated[Text, Field(description="One text.")]
        | Annotated[list[Text], Field(min_length=1, max_length=2, description="[text] or [text, text_pair].")]
        | Annotated[
            list[Annotated[list[Text], Field(min_length=1, max_length=2)]],
            Field(min_length=1, description="A batch: every item [text], or every item [text, text_pair]."),
        ]
    )
    truncate: StrictBool | None = None
    truncation_direction: Direction | None = None
    raw_scores: StrictBool = Field(False, description="Logits instead of softmax (or sigmoid) scores.")
    parameters: ClassifyParameters | None = None
    model: str | None = None


class ClassScore(BaseModel):
    """One label's score (TEI's predict answer)."""

    label: str
    score: float


class DecodeRequest(BaseModel):
    """``POST /decode``: token ids back to text (TEI's request)."""

    model_config = ConfigDict(extra="forbid")
    ids: (
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1)
        ]
    )
    skip_special_tokens: StrictBool = True
    model: str | None = None


# --- /embed -------------------------------------------------------------------------------------


async def embed(registry: ModelRegistry, call: Call) -> Reply:
    """TEI's ``/embed``: ``[[float, ...], ...]``, one embedding per input."""
    request = parse_body(EmbedRequest, call.body)
    engine = registry.pick(request.model, "/embed", is_embedder, EMBEDDER)
    return await labelled(engine, _embed(engine, request, call))


async def _embed(engine: Engine, request: EmbedRequest, call: Call) -> Reply:
    dim = engine.manifest.model.get("hidden_size")
    if request.dimensions is not None and dim and request.dimensions > dim:
        raise validation("dimensions", f"{request.dimensions} exceeds this model's {dim}; send at most {dim}")
    texts = tuple(request.inputs) if isinstance(request.inputs, list) else (request.inputs,)
    decoded = InferRequest(
        texts=texts,
        options=(ItemOptions(normalize=request.normalize),) * len(texts),
        prompt_name=request.prompt_name,
        truncate=bool(request.truncate),
        truncate_hint=TRUNCATE_HINT,
    )
    result = await engine.infer(decoded, receive=call.receive)

    def body(result: InferResult) -> bytes:
        vectors = result.outputs
        if request.dimensions is not None and request.dimensions != dim:
            vectors = shortened(vectors, request.dimensions, request.normalize)
        return dumps(list(vectors))

    return answered(result, body)


# --- POST /: by the model's kind ----------------------------------------------------------------


async def root(registry: ModelRegistry, call: Call) -> Reply:
    """TEI's ``POST /``: embed, classify or rerank, as the (one, or named) model is."""
    try:
        named = orjson.loads(call.body).get("model") if call.body else None
    except (orjson.JSONDecodeError, AttributeError):
        named = None  # the kind's own parser says what is wrong with the body
    engine = registry.pick(named if isinstance(named, str) else None, "/")
    if is_embedder(engine):
        return await embed(registry, call)
    if is_cross_encoder(engine):
        return await rerank.rerank(registry, call)
    if engine.task_kind.classifies:
        request = parse_body(ClassifyRequest, call.body, expected=CLASSIFY_INPUTS)
        return await labelled(engine, _classify(engine, request, call))
    raise validation(
        "model",
        f"POST / serves embedding, classification and reranking models (TEI's kinds); "
        f"{engine.model_name!r} is {engine.task_kind}: use POST /predict",
    )


async def _classify(engine: Engine, request: ClassifyRequest, call: Call) -> Reply:
    labels = len(getattr(engine.task, "labels", ())) or 1
    params = request.parameters or ClassifyParameters()
    raw = request.raw_scores or params.function_to_apply == "none"
    own = "sigmoid" if getattr(engine.task, "multi_label", False) or labels == 1 else "softmax"
    if params.function_to_apply not in (None, "none", own):
        raise validation(
            "parameters.function_to_apply",
            f'this model scores with {own}; send "{own}", "none" (logits) or leave it out',
        )
    # TEI: a list of strings is one input (a text and its pair), a list of lists a batch.
    batch = isinstance(request.inputs, list) and isinstance(request.inputs[0], list)
    rows: list[list[str]] = (
        [list(x) for x in request.inputs if isinstance(x, list)]
        if batch
        else [request.inputs if isinstance(request.inputs, list) else [request.inputs]]  # type: ignore[list-item]
    )
    for i, row in enumerate(rows):
        if not 1 <= len(row) <= 2:
            raise validation(
                f"inputs[{i}]" if batch else "inputs", f"{len(row)} texts; send {CLASSIFY_INPUTS}"
            )
    if any(len(r) != len(rows[0]) for r in rows):
        raise validation("inputs", "send every item as [text] or every item as [text, text_pair], not both")
    options = (ItemOptions(top_k=params.top_k or labels, raw_scores=raw),) * len(rows)
    common: dict[str, Any] = {
        "options": options,
        "truncate": bool(request.truncate),
        "truncate_hint": TRUNCATE_HINT,
    }
    decoded = (
        InferRequest(pairs=tuple((r[0], r[1]) for r in rows), **common)
        if len(rows[0]) == 2
        else InferRequest(texts=tuple(r[0] for r in rows), **common)
    )
    result = await engine.infer(decoded, receive=call.receive)
    nested = batch or request.parameters is not None  # InferenceClient reads a list of lists
    return answered(result, lambda r: dumps(r.outputs if nested else r.outputs[0]))


# --- /decode and /info --------------------------------------------------------------------------


async def decode(registry: ModelRegistry, call: Call) -> Reply:
    """TEI's ``/decode``: one text per list of token ids."""
    request = parse_body(DecodeRequest, call.body)
    engine = registry.pick(request.model, "/decode")
    rows = request.ids if isinstance(request.ids[0], list) else [request.ids]
    ids = [list(r) for r in rows if isinstance(r, list)]
    return await labelled(engine, _decoded(engine, ids, request.skip_special_tokens))


async def _decoded(engine: Engine, ids: list[list[int]], skip: bool) -> Reply:
    return json_reply(await engine.decode(ids, skip_special_tokens=skip))


def model_type(engine: Engine) -> dict[str, Any]:
    """TEI's ``model_type``: embedding (with its pooling), classifier or reranker (with labels)."""
    task = engine.task
    if isinstance(task, FeatureExtraction):
        return {"embedding": {"pooling": task.mode}}
    labels = list(getattr(task, "labels", ()))
    kind = "reranker" if is_cross_encoder(engine) else "classifier"
    return {
        kind: {
            "id2label": {str(i): x for i, x in enumerate(labels)},
            "label2id": {x: i for i, x in enumerate(labels)},
        }
    }


def info_fields(registry: ModelRegistry) -> dict[str, Any]:
    """TEI's ``/info`` fields, of the server's first model (the others are under ``models``)."""
    engine = next(iter(registry.engines.values()))
    serve = registry.settings.serve
    m = engine.manifest
    return {
        "model_id": str(m.model.get("source") or engine.model_name),
        "model_sha": m.model.get("commit") or m.model.get("revision") or None,  # the snapshot traced
        "model_dtype": m.model.get("dtype", "float32"),
        "served_model_name": engine.model_name,
        "model_type": model_type(engine),
        "max_concurrent_requests": serve.max_queue,
        "max_input_length": engine.max_sequence_length,
        "max_batch_tokens": max(engine.batch_sizes) * engine.max_sequence_length,
        "max_batch_requests": max(engine.batch_sizes),
        "max_client_batch_size": serve.max_inputs_per_request,
        "auto_truncate": serve.auto_truncate,
        "tokenization_workers": 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }


def narrow_embed(registry: ModelRegistry, components: dict[str, Any]) -> None:
    """As /v1/embeddings: the input limit, dimensions up to the embedding size, the prompt names."""
    properties = components["EmbedRequest"]["properties"]
    array_limit(properties["inputs"], registry.settings.serve.max_inputs_per_request)
    limit_dimensions(properties["dimensions"], registry)
    one_of_names(properties["prompt_name"], prompt_names(registry))


def root_schema(registry: ModelRegistry) -> tuple[Any, Any, Callable[[dict[str, Any]], None] | None]:
    """``POST /``'s body, answer and narrowing, as the model it serves without a name is (none
    when the server's several models need one: the route then stays out of the document)."""
    engines = list(registry.engines.values())
    if len(engines) != 1:
        return None, None, None
    engine = engines[0]
    if is_embedder(engine):
        return EmbedRequest, list[list[float]], partial(narrow_embed, registry)
    if is_cross_encoder(engine):
        return rerank.RerankRequest, list[rerank.RerankResult], partial(rerank.narrow, registry)
    if engine.task_kind.classifies:
        return ClassifyRequest, list[ClassScore] | list[list[ClassScore]], partial(narrow_classify, registry)
    return None, None, None


def narrow_classify(registry: ModelRegistry, components: dict[str, Any]) -> None:
    """A batch holds at most serve.max_inputs_per_request items."""
    inputs = components["ClassifyRequest"]["properties"]["inputs"]
    batch = [b for b in inputs["anyOf"] if b.get("items", {}).get("type") == "array"]
    for branch in batch:
        branch["maxItems"] = registry.settings.serve.max_inputs_per_request


def narrow_decode(registry: ModelRegistry, components: dict[str, Any]) -> None:
    """At most serve.max_inputs_per_request lists of ids; ids within every model's vocabulary."""
    flat, nested = components["DecodeRequest"]["properties"]["ids"]["anyOf"]
    nested["maxItems"] = registry.settings.serve.max_inputs_per_request
    highest = min(e.encoder.vocab_size for e in registry.engines.values()) - 1
    flat["items"]["maximum"] = highest
    nested["items"]["items"]["maximum"] = highest
