"""Every route a server answers, in one table: method, path, handler, body, whether it needs the
API key, whether it is a probe, what it is for. The middleware dispatches from the table, checks
the key by it, and the OpenAPI document is built from it; nothing declares a route twice.

A probe is answered before the body is read, the key checked or anything else waits: under
overload it waits only for the event loop's turn. Every other route reads its (size-checked)
body and runs its handler, a coroutine from :class:`Call` to :class:`Reply`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from neuronserve import __version__
from neuronserve.config import Settings
from neuronserve.serving.metrics import ServerMetrics
from neuronserve.serving.protocols import kserve, native, openai, rerank, tei
from neuronserve.serving.protocols.common import JSON, Call, ErrorBody, Handler, Probe, Reply, dumps
from neuronserve.serving.registry import ModelRegistry, describe, is_cross_encoder, is_embedder

Narrow = Callable[[dict[str, Any]], None]
OPENAPI_PATH = "/openapi.json"
BINARY = "application/octet-stream"
SECURITY_SCHEMES = {  # serve.api_key: either header carries it
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
}


@dataclass(frozen=True)
class Route:
    """One operation. ``handler`` runs it; a ``probe`` (GET only) answers at once instead.
    ``body`` documents the JSON body the handler parses (``narrow`` then says, in the schema,
    what this server's models take); ``response`` documents the 200 answer, ``errors`` the error
    statuses it may give (and ``extra`` any other status with its own body)."""

    method: str
    path: str
    operation: str  # a name of its own; with the path and method, its OpenAPI operationId
    summary: str
    handler: Handler | None = None
    probe: Probe | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    binary_body: bool = False  # also takes application/octet-stream (v2's binary extension)
    binary_answer: bool = False  # may answer application/octet-stream (v2's binary outputs)
    response: Any = None
    media_type: str = JSON
    needs_key: bool = True
    errors: bool = True
    extra: dict[int, tuple[type[BaseModel], str]] = field(default_factory=dict)
    documented: bool = True
    narrow: Narrow | None = None

    @property
    def operation_id(self) -> str:
        """The name, path and method as one identifier (as FastAPI made them: ``predict_predict_post``)."""
        return re.sub(r"\W", "_", f"{self.operation}{self.path}") + f"_{self.method.lower()}"


def route_table(
    registry: ModelRegistry, metrics: ServerMetrics, settings: Settings, server_name: str
) -> list[Route]:
    """Every route of a server of ``registry``'s models. Routes a model of the server could
    never answer (rerank without a cross-encoder, embeddings without an embedding model) still
    answer with an error that says what is missing, but are not documented."""
    r = registry
    engines = list(r.engines.values())
    embeds = any(is_embedder(e) for e in engines)
    reranks = any(is_cross_encoder(e) for e in engines)
    open_metrics = not settings.serve.metrics_need_key
    narrow_rerank = partial(rerank.narrow, r)  # one narrowing for both rerank bodies
    root_body, root_answer, root_narrow = tei.root_schema(r)  # POST / is as its one model is

    async def prometheus(_call: Call) -> Reply:
        return Reply(200, generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def info(call: Call) -> Reply:
        return await native.info(r, settings, server_name, keyed=call.keyed, head=tei.info_fields(r))

    return [
        # probes: no body, no key, nothing to wait for but the loop's turn
        Route("GET", "/health", "health", "Liveness: the process answers.", probe=native.liveness,
              response=native.Liveness, needs_key=False, errors=False),
        Route("GET", "/ready", "ready", "Readiness: every copy loaded and warmed on every compiled shape.",
              probe=partial(native.readiness, r), needs_key=False, errors=False,
              extra={503: (ErrorBody, "Loading, draining or a copy failing; the body says which and why.")}),
        Route("GET", "/v2/health/live", "v2_live", "v2 liveness.", probe=kserve.liveness, response=kserve.V2Live,
              needs_key=False, errors=False),
        Route("GET", "/v2/health/ready", "v2_ready", "v2 readiness: every copy loaded and warmed.",
              probe=partial(kserve.readiness, r), response=kserve.V2Ready, needs_key=False, errors=False,
              extra={503: (kserve.V2Ready, "Loading, draining or a copy failing.")}),
        # inference
        Route("POST", "/predict", "predict", "Run the model on one input or a list (every task).",
              partial(native.predict, r), body=native.PredictRequest, response=native.PredictResponse,
              narrow=partial(native.narrow_predict, r)),
        Route("POST", "/v1/embeddings", "embeddings", "OpenAI-compatible embeddings.", partial(openai.embeddings, r),
              body=openai.EmbeddingsRequest, documented=embeds, narrow=partial(openai.narrow_embeddings, r)),
        Route("POST", "/rerank", "rerank",
              "TEI rerank: each text's score against the query (cross-encoders), best first.",
              partial(rerank.rerank, r), body=rerank.RerankRequest, response=list[rerank.RerankResult],
              documented=reranks, narrow=narrow_rerank),
        Route("POST", "/v1/rerank", "cohere_rerank",
              "Cohere/Jina rerank (LangChain, LlamaIndex): results[{index, relevance_score, document}].",
              partial(rerank.cohere_rerank, r), body=rerank.CohereRerankRequest,
              response=rerank.CohereRerankResponse, documented=reranks, narrow=narrow_rerank),
        Route("POST", "/v2/models/{model}/infer", "v2_infer", "v2 inference with BYTES text inputs.",
              partial(kserve.infer, r), body=kserve.V2InferRequest, binary_body=True, binary_answer=True,
              narrow=partial(kserve.narrow_infer, r)),
        Route("POST", "/v2/models/{model}/versions/{version}/infer", "v2_infer", "v2 inference of a model version.",
              partial(kserve.infer, r), binary_body=True, documented=False),
        Route("POST", "/embed", "embed", "TEI embed: one embedding per input, as a list of lists.",
              partial(tei.embed, r), body=tei.EmbedRequest, response=list[list[float]], documented=embeds,
              narrow=partial(tei.narrow_embed, r)),
        Route("POST", "/", "tei_root",
              "TEI's root: embed, classify (TEI's predict) or rerank, as the model is (InferenceClient's "
              "feature_extraction and text_classification call it).", partial(tei.root, r),
              body=root_body, response=root_answer, documented=root_body is not None, narrow=root_narrow),
        Route("POST", "/decode", "decode", "TEI decode: token ids back to text.", partial(tei.decode, r),
              body=tei.DecodeRequest, response=list[str], narrow=partial(tei.narrow_decode, r)),
        Route("POST", "/tokenize", "tokenize", "Tokens of each input (TEI's shape): id, text, special, character span.",
              partial(native.tokenize, r), body=native.TokenizeRequest, response=list[list[native.Token]],
              narrow=partial(native.narrow_tokenize, r)),
        # discovery and the server's own state
        Route("GET", "/v1/models", "v1_models", "OpenAI model list: the models this server serves.",
              partial(openai.models, r), response=openai.ModelList, errors=False),
        Route("GET", "/v1/models/{model}", "v1_model", "One OpenAI model object.", partial(openai.model, r),
              response=openai.ModelCard),
        Route("GET", "/v2", "v2_server", "v2 server metadata.", kserve.server_metadata, needs_key=False, errors=False),
        Route("GET", "/v2/models/{model}", "v2_model", "v2 model metadata.", partial(kserve.model_metadata, r)),
        Route("GET", "/v2/models/{model}/versions/{version}", "v2_model", "v2 model metadata of a version.",
              partial(kserve.model_metadata, r), documented=False),
        Route("GET", "/v2/models/{model}/ready", "v2_model_ready", "v2 model readiness.", partial(kserve.model_ready, r),
              response=kserve.V2ModelReady, extra={503: (kserve.V2ModelReady, "Not ready.")}),
        Route("POST", "/v2/repository/index", "v2_repository_index",
              "v2 repository index: every model with its state (tritonclient's model list).",
              partial(kserve.repository_index, r), body=kserve.RepositoryIndexRequest, body_required=False,
              response=list[kserve.RepositoryModel]),
        Route("GET", "/info", "info",
              "TEI's model facts (open, no key), the models, shapes and copies; with the key (or with "
              "none set) also the effective settings, secrets redacted.", info, needs_key=False),
        Route("GET", "/metrics", "prometheus_metrics",
              "Prometheus metrics" + ("." if open_metrics else " (with the API key)."),
              prometheus, media_type="text/plain", needs_key=not open_metrics, errors=False),
    ]  # fmt: skip


def describe_server(registry: ModelRegistry) -> str:
    served = ", ".join(f"{name} ({describe(e)})" for name, e in registry.engines.items())
    return f"Serving {served} on {registry.kind.value}."


class Router:
    """Finds a request's route: exact paths by lookup, templated ones (``{model}``) by pattern."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._exact: dict[tuple[str, str], Route] = {}
        self._templated: list[tuple[re.Pattern[str], Route]] = []
        self._by_path: dict[str, list[Route]] = {}
        for route in routes:
            if route.probe is not None and (route.needs_key or route.method != "GET"):
                raise ValueError(f"this is a bug: the probe {route.path} is answered before any key check")
            if "{" in route.path:
                pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", route.path)
                self._templated.append((re.compile(f"^{pattern}$"), route))
            elif (route.method, route.path) in self._exact:
                raise ValueError(f"this is a bug: {route.method} {route.path} is declared twice")
            else:
                self._exact[(route.method, route.path)] = route
            if "{" not in route.path:
                self._by_path.setdefault(route.path, []).append(route)

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[Route]]:
        """(the route, its path parameters, []), or (None, {}, the routes of the path under
        other methods) when the path takes another method or none at all."""
        method = "GET" if method == "HEAD" else method  # a GET route answers HEAD too (no body)
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}, []
        others = [r for r in self._by_path.get(path, [])]
        for pattern, candidate in self._templated:
            found = pattern.match(path)
            if found is None:
                continue
            if candidate.method == method:
                return candidate, found.groupdict(), []
            others.append(candidate)
        return None, {}, others


# --- the OpenAPI document -----------------------------------------------------------------------


def error_responses(settings: Settings) -> dict[int, str]:
    s = settings.serve
    return {
        400: "A malformed request (a bad v2 header length, say).",
        401: "Missing or wrong API key (when serve.api_key or serve.api_key_file is set).",
        404: "Unknown model name.",
        413: f"Body over {s.max_body_bytes} bytes or more than {s.max_inputs_per_request} inputs.",
        415: "A body that is not JSON (v2: or octet-stream).",
        422: "Malformed JSON, wrong types, empty inputs, or an input longer than the largest compiled "
        "sequence length without parameters.truncate; `field` names the culprit.",
        429: f"More than {s.max_queue} inputs waiting; retry after the Retry-After header.",
        503: "Model copies still loading, or the server is draining.",
        504: f"No answer within the deadline ({s.request_timeout_ms} ms default).",
    }


class _Components:
    """Schemas of bodies and answers, each under its own name (``#/components/schemas/Name``)."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def schema(self, kind: Any, mode: JsonSchemaMode) -> dict[str, Any]:
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found = kind.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
            self.schemas.update(found.pop("$defs", {}))
            self.schemas[kind.__name__] = found
            return {"$ref": f"#/components/schemas/{kind.__name__}"}
        found = TypeAdapter(kind).json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        self.schemas.update(found.pop("$defs", {}))
        return found


def openapi_document(routes: list[Route], settings: Settings, description: str) -> dict[str, Any]:
    """The server's OpenAPI document, from its route table alone."""
    components = _Components()
    narrows: list[Narrow] = []
    paths: dict[str, dict[str, Any]] = {}
    keyed = bool(settings.api_key())
    errors = error_responses(settings)
    for route in routes:
        if not route.documented:
            continue
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.operation_id,
            "responses": _responses(route, components, errors),
        }
        if keyed and route.needs_key:
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
        parameters = re.findall(r"\{(\w+)\}", route.path)
        if parameters:
            operation["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string", "title": p.title()}}
                for p in parameters
            ]
        if route.body is not None:
            operation["requestBody"] = {
                "required": route.body_required,
                "content": {JSON: {"schema": components.schema(route.body, "validation")}},
            }
        if route.narrow is not None and route.narrow not in narrows:
            narrows.append(route.narrow)
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    for narrow in narrows:
        narrow(components.schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "neuronserve", "version": __version__, "description": description},
        "paths": paths,
        "components": {
            "schemas": components.schemas,
            **({"securitySchemes": SECURITY_SCHEMES} if keyed else {}),
        },
    }


def _responses(route: Route, components: _Components, errors: dict[int, str]) -> dict[str, Any]:
    """Its answer, the error statuses it may give (401 alone when only the key can fail) and its
    other statuses, each with its body's schema."""

    def content(kind: Any) -> dict[str, Any]:
        return {JSON: {"schema": components.schema(kind, "serialization")}}

    answer: dict[str, Any] = {
        route.media_type: {
            "schema": components.schema(route.response, "serialization") if route.response else {}
        }
    }
    if route.binary_answer:  # a JSON header, then the tensors' bytes
        answer[BINARY] = {"schema": {"type": "string", "format": "binary"}}
    responses: dict[str, Any] = {"200": {"description": "Successful Response", "content": answer}}
    if route.errors:
        responses.update(
            {str(code): {"description": text, "content": content(ErrorBody)} for code, text in errors.items()}
        )
    elif route.needs_key:
        responses["401"] = {"description": errors[401], "content": content(ErrorBody)}
    for code, (model, text) in route.extra.items():
        responses[str(code)] = {"description": text, "content": content(model)}
    return responses


def document_routes(routes: list[Route], settings: Settings, description: str) -> list[Route]:
    """``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc`` for ``routes``: open, like the
    probes (no input, no secret)."""
    document: list[bytes] = []  # built on first request: the routes' schemas cost ~100 ms

    async def openapi(_call: Call) -> Reply:
        if not document:
            document.append(dumps(openapi_document(routes, settings, description)))
        return Reply(200, document[0])

    async def docs(_call: Call) -> Reply:
        page = get_swagger_ui_html(openapi_url=OPENAPI_PATH, title="neuronserve - Swagger UI")
        return Reply(200, bytes(page.body), media_type="text/html")

    async def redoc(_call: Call) -> Reply:
        page = get_redoc_html(openapi_url=OPENAPI_PATH, title="neuronserve - ReDoc")
        return Reply(200, bytes(page.body), media_type="text/html")

    return [
        Route("GET", OPENAPI_PATH, "openapi", "This document.", openapi, needs_key=False, documented=False),
        Route("GET", "/docs", "swagger_ui_html", "Swagger UI.", docs, needs_key=False, documented=False),
        Route("GET", "/redoc", "redoc_html", "ReDoc.", redoc, needs_key=False, documented=False),
    ]
