"""Reranking with a cross-encoder, in the two shapes clients send: TEI's ``POST /rerank`` and the
Cohere/Jina ``POST /v1/rerank`` (LangChain, LlamaIndex). Both score (query, text) pairs, batched
like any input, and answer best first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from neuronserve.serving.engine import Engine
from neuronserve.serving.protocols.common import (
    Call,
    Reply,
    Text,
    answered,
    array_limit,
    dumps,
    labelled,
    model_field,
    parse_body,
)
from neuronserve.serving.registry import ModelRegistry, is_cross_encoder
from neuronserve.serving.tasks import ItemOptions
from neuronserve.serving.work import InferRequest, InferResult

RERANKER = "a cross-encoder (a text-classification model with one output)"


class RerankRequest(BaseModel):
    """``POST /rerank``: TEI's request: one query, the texts to rank against it."""

    model_config = ConfigDict(extra="forbid")
    query: Text
    texts: Annotated[list[Text], Field(min_length=1)]
    truncate: StrictBool = Field(
        False, description="Cut pairs longer than the largest compiled length (else 422)."
    )
    raw_scores: StrictBool = Field(False, description="Logits instead of sigmoid scores.")
    return_text: StrictBool = Field(False, description="Echo each text in its result.")
    model: str | None = model_field()


class RerankResult(BaseModel):
    """One ranked text (TEI's shape), best first."""

    index: int
    score: float
    text: str | None = None


class RerankDocument(BaseModel):
    """A document given as an object (Cohere/Jina also accept bare strings); other keys are
    ignored, as those APIs rank on ``text``."""

    model_config = ConfigDict(extra="ignore")
    text: Text


class CohereRerankRequest(BaseModel):
    """``POST /v1/rerank``: the Cohere/Jina rerank request that LangChain and LlamaIndex send.
    Fields of those APIs that do not apply here (``rank_fields``, ``max_chunks_per_doc``,
    ``max_tokens_per_doc``) are accepted and ignored; a document longer than the model takes is
    cut, as those APIs do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    query: Text
    documents: Annotated[list[Text | RerankDocument], Field(min_length=1)]
    top_n: int | None = Field(None, ge=1, description="Return the best N (default: all).")
    return_documents: StrictBool = Field(False, description="Include each document's text.")


class CohereRerankResponse(BaseModel):
    """``POST /v1/rerank`` answer, best first."""

    model: str
    results: list[dict[str, Any]]
    usage: dict[str, int]


def _pairs(query: str, texts: Sequence[str], *, truncate: bool, field: str) -> InferRequest:
    """(query, text) pairs scored as (sigmoid score, logit) each."""
    pairs = tuple((query, text) for text in texts)
    return InferRequest(
        pairs=pairs,
        options=(ItemOptions(rerank=True),) * len(pairs),
        field=field,
        truncate=truncate,
        truncate_hint='send "truncate": true to cut it to {n} tokens, or shorten it',
    )


def _best_first(result: InferResult) -> list[int]:
    return sorted(range(len(result.outputs)), key=lambda i: -result.outputs[i][0])


async def rerank(registry: ModelRegistry, call: Call) -> Reply:
    """TEI's ``/rerank``: every text with its score against the query, best first."""
    request = parse_body(RerankRequest, call.body)
    engine = registry.pick(request.model, "/rerank", is_cross_encoder, RERANKER)
    return await labelled(engine, _rerank(engine, request, call))


async def _rerank(engine: Engine, request: RerankRequest, call: Call) -> Reply:
    decoded = _pairs(request.query, request.texts, truncate=request.truncate, field="texts")
    result = await engine.infer(decoded, receive=call.receive)

    def body(result: InferResult) -> bytes:
        pick = 1 if request.raw_scores else 0
        return dumps(
            [
                {
                    "index": i,
                    "score": result.outputs[i][pick],
                    **({"text": request.texts[i]} if request.return_text else {}),
                }
                for i in _best_first(result)
            ]
        )

    return answered(result, body)


async def cohere_rerank(registry: ModelRegistry, call: Call) -> Reply:
    """The Cohere/Jina ``/v1/rerank``: ``results[{index, relevance_score, document}]``, best first."""
    request = parse_body(CohereRerankRequest, call.body)
    engine = registry.pick(request.model, "/v1/rerank", is_cross_encoder, RERANKER)
    return await labelled(engine, _cohere_rerank(engine, request, call))


async def _cohere_rerank(engine: Engine, request: CohereRerankRequest, call: Call) -> Reply:
    texts = [d.text if isinstance(d, RerankDocument) else d for d in request.documents]
    result = await engine.infer(
        _pairs(request.query, texts, truncate=True, field="documents"), receive=call.receive
    )

    def body(result: InferResult) -> bytes:
        results = [
            {
                "index": i,
                "relevance_score": result.outputs[i][0],
                **({"document": {"text": texts[i]}} if request.return_documents else {}),
            }
            for i in _best_first(result)[: request.top_n]
        ]
        usage = {"total_tokens": result.tokens}
        return dumps({"model": engine.model_name, "results": results, "usage": usage})

    return answered(result, body)


def narrow(registry: ModelRegistry, components: dict[str, Any]) -> None:
    limit = registry.settings.serve.max_inputs_per_request
    array_limit(components["RerankRequest"]["properties"]["texts"], limit)
    array_limit(components["CohereRerankRequest"]["properties"]["documents"], limit)
