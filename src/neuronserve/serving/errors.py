"""The error taxonomy and the one place that maps error types to HTTP status codes.

Every error answer has the same JSON shape: ``{"error": "<what and how to fix>", "type": "<type>"}``,
plus ``"field"`` when one input field is at fault.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import orjson

STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "overloaded": 429,
    "internal_error": 500,
    "unavailable": 503,
    "deadline_exceeded": 504,
}


@dataclass
class ServeError(Exception):
    """An answer other than success. ``type`` is a key of :data:`STATUS`."""

    type: str
    message: str
    field: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in STATUS:
            raise ValueError(f"this is a bug: unknown error type {self.type!r}")
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return STATUS[self.type]

    def body(self) -> bytes:
        payload: dict[str, str] = {"error": self.message, "type": self.type}
        if self.field is not None:
            payload["field"] = self.field
        return orjson.dumps(payload)


def validation(field_name: str, message: str) -> ServeError:
    return ServeError("validation_error", f"{field_name}: {message}", field=field_name)


def too_large(field_name: str, message: str) -> ServeError:
    return ServeError("payload_too_large", f"{field_name}: {message}", field=field_name)


def overloaded(message: str, retry_after_s: int) -> ServeError:
    return ServeError("overloaded", message, headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> ServeError:
    return ServeError("unavailable", message, headers={"Retry-After": "1"})


def deadline(message: str) -> ServeError:
    return ServeError("deadline_exceeded", message)
