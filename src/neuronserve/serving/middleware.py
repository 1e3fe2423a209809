"""Pure ASGI middleware for every request: id, API key, body limit, headers, metrics, access log.

Pure ASGI (not Starlette's BaseHTTPMiddleware) because it sits on the hot path of every request.
The access log never contains input text: method, route, status, duration, sizes and request id.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from neuronserve.serving.errors import ServeError
from neuronserve.serving.handlers import Reply
from neuronserve.serving.metrics import ServerMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("neuronserve.access")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _FastRoute:
    """Stands in for a Starlette route in the scope, so metrics label fast-path requests too."""

    path: str


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROTECTED_PREFIXES = ("/predict", "/v1/", "/v2/models", "/v2/repository", "/info", "/rerank", "/tokenize")
TIMING_HEADERS = (b"x-queue-ms", b"x-inference-ms", b"x-batch-size")
JSON_TYPES = (b"application/json",)
BINARY_TYPES = (b"application/octet-stream",)  # the v2 binary tensor extension


class ServingMiddleware:
    """See the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        server_name: str,
        max_body_bytes: int,
        api_key: str,
        metrics: ServerMetrics,
        draining: Callable[[], bool] = lambda: False,
        fast_routes: dict[str, Callable[[bytes, Receive], Awaitable[Reply]]] | None = None,
        probe_routes: dict[str, Callable[[], Reply]] | None = None,
        access_log: bool = True,
    ) -> None:
        self.fast_routes = fast_routes or {}
        self.probe_routes = probe_routes or {}
        # Request ids: a random prefix per process and a counter (uuid4 costs a syscall each).
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self.app = app
        self.draining = draining
        self.server_name = server_name.encode()
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode()
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.lower(): v for k, v in scope["headers"]}
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else f"{self._id_prefix}-{next(self._ids):x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        sent = 0
        model = ""
        extra = [(b"x-request-id", request_id.encode()), (b"x-server", self.server_name)]

        async def send_with_headers(message: Message) -> None:
            nonlocal status, sent, model
            if message["type"] == "http.response.start":
                status = message["status"]
                out = list(message.get("headers", []))
                present = {k.lower() for k, _ in out}
                if b"x-model" in present:  # the handler says which model answered
                    model = next(v for k, v in out if k.lower() == b"x-model").decode("latin-1")
                out.extend(extra)
                out.extend((name, b"0") for name in TIMING_HEADERS if name not in present)
                if self.draining():  # clients must not reuse a connection to a server that is leaving
                    out.append((b"connection", b"close"))
                message["headers"] = out
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            probe = self.probe_routes.get(scope["path"]) if scope["method"] == "GET" else None
            if probe is not None:  # no body, no key, nothing to wait for but the loop's turn
                scope["route"] = _FastRoute(scope["path"])
                await _send_reply(probe(), send_with_headers)
                return
            error = (
                self._check_auth(scope["path"], headers)
                or self._check_content_type(scope, headers)
                or self._check_declared_size(headers)
            )
            if error is None and scope["method"] in {"POST", "PUT", "PATCH"}:
                body, error = await self._read_body(receive)
                receive = _replay(body, receive)
            fast = self.fast_routes.get(scope["path"]) if scope["method"] == "POST" else None
            if error is not None:
                await _send_error(error, send_with_headers)
            elif fast is not None:
                scope["route"] = _FastRoute(scope["path"])
                await self._serve_fast(fast, body, receive, send_with_headers, request_id)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            self._record(scope, request_id, status=status, model=model, elapsed=elapsed, sent=sent)

    def _record(
        self, scope: Scope, request_id: str, *, status: int, model: str, elapsed: float, sent: int
    ) -> None:
        """One request's metrics and access-log line (never its input text)."""
        label = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.answered(label, status, elapsed, model)
        if status in (401, 413):
            reason = "unauthorized" if status == 401 else "too_large"
            self.metrics.rejections.labels(reason=reason, model=model).inc()
        if self.access_log:
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": label,
                    "model": model,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "bytes_out": sent,
                },
            )

    async def _serve_fast(
        self,
        handler: Callable[[bytes, Receive], Awaitable[Reply]],
        body: bytes,
        receive: Receive,
        send: Send,
        request_id: str,
    ) -> None:
        try:
            reply = await handler(body, receive)
        except ServeError as exc:
            await _send_error(exc, send)
            return
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            await _send_error(ServeError("internal_error", "internal error; see the server log"), send)
            return
        await _send_reply(reply, send)

    def _check_auth(self, path: str, headers: dict[bytes, bytes]) -> ServeError | None:
        if not self.api_key or not path.startswith(PROTECTED_PREFIXES):
            return None
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given and hmac.compare_digest(given, self.api_key):
            return None
        return ServeError(
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer <key> or x-api-key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @staticmethod
    def _check_content_type(scope: Scope, headers: dict[bytes, bytes]) -> ServeError | None:
        """Bodies are JSON (v2 binary tensors: octet-stream). Refusing text/plain and form bodies
        keeps a web page in a local browser from posting here: those are the only bodies a
        cross-origin "simple request" may carry without asking first."""
        if scope["method"] not in {"POST", "PUT", "PATCH"}:
            return None
        declared = headers.get(b"content-type")
        if declared is None:
            return None  # curl --data-binary, raw clients: no browser sends a body without one
        kind = declared.split(b";", 1)[0].strip().lower()
        allowed = JSON_TYPES + (BINARY_TYPES if scope["path"].startswith("/v2/") else ())
        if kind in allowed:
            return None
        names = ", ".join(t.decode() for t in allowed)
        return ServeError(
            "unsupported_media_type",
            f"content-type {kind.decode('latin-1')!r} is not accepted here; send {names}",
            field="content-type",
        )

    def _check_declared_size(self, headers: dict[bytes, bytes]) -> ServeError | None:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large(int(declared))
        return None

    def _too_large(self, size: int | None) -> ServeError:
        what = f"{size} bytes" if size is not None else "the body"
        return ServeError(
            "payload_too_large",
            f"body: {what} exceed serve.max_body_bytes ({self.max_body_bytes} bytes)",
            field="body",
        )

    async def _read_body(self, receive: Receive) -> tuple[bytes, ServeError | None]:
        """Read the whole body, stopping as soon as it passes the limit (chunked bodies too)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", ServeError("invalid_request", "client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then the real stream (disconnects)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_reply(reply: Reply, send: Send) -> None:
    headers = [
        (b"content-type", reply.media_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _send_error(error: ServeError, send: Send) -> None:
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
