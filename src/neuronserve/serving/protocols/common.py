"""What every protocol shares: one request as a handler sees it, its reply, bodies decoded with
errors that name the field at fault, and JSON out."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import BaseModel, Field, StringConstraints, ValidationError

from neuronserve.serving.engine import Engine
from neuronserve.serving.errors import ServeError, validation
from neuronserve.serving.work import InferResult, Receive

JSON = "application/json"
CLIENT_CLOSED = 499  # nginx's code for "the client closed the request"; nobody reads the answer
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
M = TypeVar("M", bound=BaseModel)

# A text with at least one character that is not whitespace (a blank input has no meaning).
Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


def model_field() -> Any:
    """A body's optional ``model``: which of the server's models runs it."""
    return Field(None, description="The model to run (GET /v1/models lists them); needed when several could.")


@dataclass(frozen=True)
class Call:
    """One request as its handler gets it: the whole body (already read and size-checked), the
    client's channel (to notice it leaving), the path's parameters and the request headers."""

    body: bytes = b""
    receive: Receive | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    keyed: bool = True  # it carried the API key, or none is set (an open route may say more then)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = JSON


Handler = Callable[[Call], Awaitable[Reply]]
Probe = Callable[[], Reply]


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str
    type: str
    field: str | None = None


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=JSON_OPTIONS)


def json_reply(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, dumps(value), headers or {})


def answered(result: InferResult | None, body: Callable[[InferResult], bytes]) -> Reply:
    """The engine's result as a 200 with its timing headers; the client's own leaving as 499."""
    if result is None:
        return Reply(CLIENT_CLOSED, b"")
    return Reply(200, body(result), result.timing_headers())


_UNION_TAG = re.compile(r"^[A-Z]|[\[\-]")  # pydantic names union branches like "list[QAInput]"


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.search(part):
            path += f".{part}" if path else part
    return path or "body"


UNION_ADVICE = "a non-empty string, a list of them, or {question, context} objects"


def parse_body(model: type[M], body: bytes, *, expected: str = UNION_ADVICE) -> M:
    """Validate a JSON body; the 422 names the most specific field at fault (``expected``: what
    an input that fits no branch of a union should be)."""
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
            raise validation(where, f"must be {expected}") from None
        if deepest["type"] == "string_pattern_mismatch":
            raise validation(where, "must not be blank (whitespace only)") from None
        raise validation(where, deepest["msg"]) from None


async def labelled(engine: Engine, work: Awaitable[Reply]) -> Reply:
    """``work``'s reply, or its error, with the ``x-model`` header that says which model answered
    (clients see it; the middleware labels the request's metrics and log line by it)."""
    try:
        reply = await work
    except ServeError as exc:
        exc.headers["x-model"] = engine.model_name
        raise
    reply.headers["x-model"] = engine.model_name
    return reply


def array_limit(schema: dict[str, Any], limit: int) -> None:
    """``maxItems`` on a schema that is an array, or on each array branch of a union."""
    for branch in [schema, *schema.get("anyOf", [])]:
        if branch.get("type") == "array":
            branch["maxItems"] = limit


def one_of_names(schema: dict[str, Any], names: list[str]) -> None:
    """A nullable string narrowed to ``names`` (or to null when there are none)."""
    schema.pop("anyOf", None)
    schema.pop("type", None)
    schema["anyOf"] = [{"type": "string", "enum": names}, {"type": "null"}] if names else [{"type": "null"}]
