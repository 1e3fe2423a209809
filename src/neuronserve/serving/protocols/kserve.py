"""The Open Inference Protocol (KServe v2), as tritonclient and KServe speak it: server and model
metadata, health, the repository index and ``infer`` with BYTES text tensors (JSON or the binary
extension: see :mod:`~neuronserve.serving.protocols.kserve_wire`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from neuronserve import __version__
from neuronserve.serving.engine import Engine
from neuronserve.serving.errors import validation
from neuronserve.serving.protocols.common import (
    CLIENT_CLOSED,
    Call,
    Reply,
    Text,
    json_reply,
    labelled,
    parse_body,
)
from neuronserve.serving.protocols.kserve_wire import (
    HEADER_LENGTH,
    V2Request,
    V2Tensor,
    encode_infer,
    parse_infer,
)
from neuronserve.serving.registry import ModelRegistry
from neuronserve.serving.tasks import ItemOptions
from neuronserve.serving.work import InferRequest, InferResult


class V2InputTensor(BaseModel):
    """One v2 input tensor of text: BYTES, ``shape`` elements in ``data`` (or, with the binary
    extension, ``parameters.binary_data_size`` bytes after the JSON header)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal["BYTES"]
    data: list[Text]


class V2OutputParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    binary_data: StrictBool = Field(False, description="This output as raw bytes after the JSON header.")


class V2RequestedOutput(BaseModel):
    """An output the client wants."""

    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: V2OutputParameters | None = None


class V2Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    binary_data_output: StrictBool = Field(
        False, description="Every output as raw bytes after the JSON header."
    )


# The Open Inference Protocol's request has no truncation: shorter inputs, or a server that cuts.
V2_HINT = "shorten it to {n} tokens (this protocol has no truncation; a server with serve.auto_truncate=true cuts it)"


class V2InferRequest(BaseModel):
    """``POST /v2/models/{model}/infer`` (Open Inference Protocol) with a JSON body: each input a
    BYTES tensor of shape [n] holding n texts. Also served, though a JSON schema cannot describe
    them: tritonclient's binary bodies (a JSON header, then each input's bytes, its size in
    ``parameters.binary_data_size``), and shapes of more dimensions with nested ``data``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    inputs: Annotated[list[V2InputTensor], Field(min_length=1)]
    outputs: list[V2RequestedOutput] | None = None
    parameters: V2Parameters | None = None


class RepositoryIndexRequest(BaseModel):
    """``POST /v2/repository/index`` body (optional): ``ready`` lists only ready models."""

    model_config = ConfigDict(extra="forbid")
    ready: StrictBool = False


class RepositoryModel(BaseModel):
    """One entry of the v2 repository index (Triton's shape)."""

    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class V2Live(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class V2Ready(BaseModel):
    """``GET /v2/health/ready``."""

    ready: bool


class V2ModelReady(BaseModel):
    """``GET /v2/models/{model}/ready``."""

    name: str
    ready: bool


_LIVE = Reply(200, b'{"live":true}')


def liveness() -> Reply:
    return _LIVE


def readiness(registry: ModelRegistry) -> Reply:
    ready = registry.ready
    return Reply(200 if ready else 503, orjson.dumps({"ready": ready}))


async def server_metadata(_call: Call) -> Reply:
    return json_reply({"name": "neuronserve", "version": __version__, "extensions": ["binary_tensor_data"]})


async def model_metadata(registry: ModelRegistry, call: Call) -> Reply:
    engine = registry.pick(call.params["model"], "v2 model metadata")
    columns = engine.task_kind.facts.columns
    outputs = [{"name": c.name, "datatype": c.datatype, "shape": [-1]} for c in columns]
    if engine.task_kind.embeds:
        outputs[0]["shape"] = [-1, engine.manifest.model.get("hidden_size") or -1]
    inputs = [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in engine.task_kind.facts.input_names]
    return json_reply(
        {
            "name": engine.model_name,
            "versions": ["1"],
            "platform": f"neuronserve_{engine.kind.value}",
            "inputs": inputs,
            "outputs": outputs,
        }
    )


async def model_ready(registry: ModelRegistry, call: Call) -> Reply:
    engine = registry.pick(call.params["model"], "v2 model readiness")
    ready = engine.ready
    return Reply(200 if ready else 503, orjson.dumps({"name": engine.model_name, "ready": ready}))


async def repository_index(registry: ModelRegistry, call: Call) -> Reply:
    """tritonclient's ``get_model_repository_index``: an empty body lists every model,
    ``{"ready": true}`` only the ready ones."""
    body = call.body
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
    return json_reply([e for e in entries if e["state"] == "READY" or not request.ready])


# --- infer ---------------------------------------------------------------------------------------


def infer_request(engine: Engine, parsed: V2Request) -> InferRequest:
    """Texts (or question/context pairs) from BYTES tensors named as in the model's metadata."""
    if engine.task_kind.takes_pairs:
        missing = [n for n in ("question", "context") if n not in parsed.inputs]
        if missing:
            raise validation(
                f"inputs.{missing[0]}", "question-answering needs BYTES inputs question and context"
            )
        questions, contexts = parsed.inputs["question"], parsed.inputs["context"]
        if len(questions) != len(contexts):
            raise validation("inputs.context", "needs as many elements as inputs.question")
        options = tuple(ItemOptions(context=c) for c in contexts)
        return InferRequest(
            pairs=tuple(zip(questions, contexts, strict=True)),
            options=options,
            field="inputs.question",
            truncate_hint=V2_HINT,
        )
    if "text" not in parsed.inputs:
        raise validation("inputs.text", "a BYTES input named text is required")
    return InferRequest(texts=tuple(parsed.inputs["text"]), field="inputs.text", truncate_hint=V2_HINT)


def outputs(engine: Engine, result: InferResult, requested: list[str] | None) -> list[V2Tensor]:
    """The answers as the model's output tensors (see its metadata), or the ``requested`` ones."""
    n = len(result.outputs)
    if engine.task_kind.embeds:
        matrix = np.stack([np.asarray(v, dtype=np.float32) for v in result.outputs])
        tensors = [V2Tensor("embedding", "FP32", list(matrix.shape), matrix)]
    else:
        rows = [r[0] if engine.task_kind.classifies else r for r in result.outputs]  # the best label
        dtypes = {"BYTES": None, "FP32": np.float32, "INT64": np.int64}
        tensors = []
        for column in engine.task_kind.facts.columns:
            values = [row[column.name] for row in rows]
            dtype = dtypes[column.datatype]
            tensors.append(
                V2Tensor(
                    column.name,
                    column.datatype,
                    [n],
                    values if dtype is None else np.array(values, dtype=dtype),
                )
            )
    if requested is None:
        return tensors
    known = {t.name: t for t in tensors}
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise validation("outputs", f"unknown output {unknown[0]!r}; this model has {', '.join(known)}")
    return [known[name] for name in requested]


async def infer(registry: ModelRegistry, call: Call) -> Reply:
    engine = registry.pick(call.params["model"], "v2 infer")
    return await labelled(engine, _infer(engine, call))


async def _infer(engine: Engine, call: Call) -> Reply:
    header = call.headers.get(HEADER_LENGTH.encode())
    parsed = parse_infer(call.body, header.decode("latin-1") if header is not None else None)
    result = await engine.infer(infer_request(engine, parsed), receive=call.receive)
    if result is None:
        return Reply(CLIENT_CLOSED, b"")
    out, headers = encode_infer(
        engine.model_name, parsed.id, outputs(engine, result, parsed.requested), parsed.binary_outputs
    )
    media = headers.pop("content-type")
    return Reply(200, out, {**headers, **result.timing_headers()}, media)


# The document describes a tensor of each count from 1 to this (or serve.max_inputs_per_request),
# a branch each; larger ones are served as well.
DOCUMENTED_COUNTS = 32


def _tensor(name: str, count: int) -> dict[str, Any]:
    """A BYTES input tensor named ``name`` of shape [count] holding ``count`` texts."""
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "const": name},
            "shape": {
                "type": "array",
                "items": {"type": "integer", "const": count},
                "minItems": 1,
                "maxItems": 1,
            },
            "datatype": {"type": "string", "const": "BYTES"},
            "data": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "pattern": r"\S"},
                "minItems": count,
                "maxItems": count,
            },
        },
        "required": ["name", "shape", "datatype", "data"],
        "additionalProperties": False,
    }


def narrow_infer(registry: ModelRegistry, components: dict[str, Any]) -> None:
    """What this server's models take, so that what the schema calls valid is served: the inputs
    of a model's metadata (text; or question and context, in that order, as many of each),
    each of shape [n] with its n texts, n up to serve.max_inputs_per_request; outputs named as in
    the metadata."""
    limit = min(registry.settings.serve.max_inputs_per_request, DOCUMENTED_COUNTS)
    kinds = sorted({e.task_kind for e in registry.engines.values()}, key=lambda k: k.value)
    branches: list[dict[str, Any]] = []
    for names in dict.fromkeys(k.facts.input_names for k in kinds):
        for count in range(1, limit + 1):
            tensors = [_tensor(name, count) for name in names]
            if len(tensors) == 1:
                branches.append({"type": "array", "items": tensors[0], "minItems": 1, "maxItems": 1})
            else:
                branches.append(
                    {
                        "type": "array",
                        "prefixItems": tensors,
                        "items": False,
                        "minItems": len(tensors),
                        "maxItems": len(tensors),
                    }
                )
    components["V2InferRequest"]["properties"]["inputs"] = {"anyOf": branches}
    columns = sorted({c.name for k in kinds for c in k.facts.columns})
    components["V2RequestedOutput"]["properties"]["name"] = {"type": "string", "enum": columns}
