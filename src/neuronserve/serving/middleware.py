"""The server's HTTP layer, pure ASGI: request id, route (from the route table), API key,
content type, body limit, the handler, headers, metrics and the access log.

Pure ASGI (not Starlette's BaseHTTPMiddleware) because it sits on the hot path of every request.
Every request is answered here; only what is not HTTP (the lifespan) reaches the application
behind it. The access log never contains input text: method, route, status, duration, sizes and
request id.
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
from neuronserve.serving.metrics import ServerMetrics
from neuronserve.serving.protocols.common import Call, Reply
from neuronserve.serving.routes import Route, Router

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("neuronserve.access")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _RouteLabel:
    """Stands in for a Starlette route in the scope: the route's path labels its metrics."""

    path: str


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
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
        routes: list[Route],
        draining: Callable[[], bool] = lambda: False,
        access_log: bool = True,
    ) -> None:
        self.router = Router(routes)
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
            method = scope["method"]
            route, params, others = self.router.match(method, scope["path"])
            if route is not None:
                scope["route"] = _RouteLabel(route.path)
            if route is not None and route.probe is not None:  # nothing to wait for but the loop's turn
                await _send_reply(route.probe(), send_with_headers, head=method == "HEAD")
                return
            error = (
                self._check_auth(route, others, headers)
                or self._check_route(route, method, scope["path"], others)
                or self._check_content_type(route, method, headers)
                or self._check_declared_size(headers)
            )
            body = b""
            if error is None and method in {"POST", "PUT", "PATCH"}:
                body, error = await self._read_body(receive)
                receive = _replay(body, receive)
            if error is not None or route is None or route.handler is None:
                await _send_error(
                    error or ServeError("internal_error", "this is a bug: no handler"), send_with_headers
                )
            else:
                call = Call(body, receive, params, headers, keyed=self._keyed(headers))
                await self._serve(route.handler, call, send_with_headers, request_id, head=method == "HEAD")
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

    async def _serve(
        self,
        handler: Callable[[Call], Awaitable[Reply]],
        call: Call,
        send: Send,
        request_id: str,
        *,
        head: bool,
    ) -> None:
        try:
            reply = await handler(call)
        except ServeError as exc:
            await _send_error(exc, send)
            return
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            await _send_error(ServeError("internal_error", "internal error; see the server log"), send)
            return
        await _send_reply(reply, send, head=head)

    def _check_auth(
        self, route: Route | None, others: list[Route], headers: dict[bytes, bytes]
    ) -> ServeError | None:
        """The API key, when one is set, for every route that needs it, and for a path that is
        no route: as the path's routes under other methods say (an open path answers 405
        without the key); a path that is no route at all needs it (what is not declared open
        is closed)."""
        if not self.api_key:
            return None
        if route is not None and not route.needs_key:
            return None
        if route is None and others and not any(r.needs_key for r in others):
            return None
        if self._keyed(headers):
            return None
        return ServeError(
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer <key> or x-api-key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _keyed(self, headers: dict[bytes, bytes]) -> bool:
        """The request carries the API key (either header), or none is set."""
        if not self.api_key:
            return True
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return bool(given) and hmac.compare_digest(given, self.api_key)

    @staticmethod
    def _check_route(route: Route | None, method: str, path: str, others: list[Route]) -> ServeError | None:
        if route is not None:
            return None
        allowed = sorted({r.method for r in others})
        if allowed:
            return ServeError(
                "method_not_allowed",
                f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        return ServeError("not_found", f"no route {path}; GET /openapi.json lists them")

    @staticmethod
    def _check_content_type(
        route: Route | None, method: str, headers: dict[bytes, bytes]
    ) -> ServeError | None:
        """Bodies are JSON (v2 binary tensors: octet-stream). Refusing text/plain and form bodies
        keeps a web page in a local browser from posting here: those are the only bodies a
        cross-origin "simple request" may carry without asking first."""
        if method not in {"POST", "PUT", "PATCH"}:
            return None
        declared = headers.get(b"content-type")
        if declared is None:
            return None  # curl --data-binary, raw clients: no browser sends a body without one
        kind = declared.split(b";", 1)[0].strip().lower()
        allowed = JSON_TYPES + (BINARY_TYPES if route is not None and route.binary_body else ())
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


async def _send_reply(reply: Reply, send: Send, *, head: bool = False) -> None:
    headers = [
        (b"content-type", reply.media_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})


async def _send_error(error: ServeError, send: Send) -> None:
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
