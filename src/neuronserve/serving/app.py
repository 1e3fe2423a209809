"""The application a server runs: ``create_app(settings)`` verifies the artifacts, builds the
route table (:mod:`~neuronserve.serving.routes`) and the HTTP layer in front of it
(:mod:`~neuronserve.serving.middleware`), and loads the copies at start-up. Every request is
answered by that layer; FastAPI runs the lifespan and holds the application's state.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from neuronserve import __version__
from neuronserve.config import Settings, load_settings
from neuronserve.serving.lifecycle import install_drain
from neuronserve.serving.metrics import ServerMetrics
from neuronserve.serving.middleware import ServingMiddleware
from neuronserve.serving.registry import ModelRegistry
from neuronserve.serving.routes import describe_server, document_routes, openapi_document, route_table


class ServingApp(FastAPI):
    """FastAPI with the serving middleware outermost: it answers every HTTP request from the
    route table; FastAPI's own layers see only the lifespan."""

    serving_options: dict[str, Any]

    def build_middleware_stack(self) -> ASGIApp:
        return ServingMiddleware(super().build_middleware_stack(), **self.serving_options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """HTTP requests go straight to the middleware stack, as Starlette sends them.

        FastAPI's own ``__call__`` first asks OpenTelemetry whether its native tracing is
        configured, on every request (a measurable share of a request's CPU here); this server
        exports its own metrics instead. Lifespan and anything else take FastAPI's way.
        """
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    """Build the server for ``settings``: verifies the artifacts now, loads copies at startup."""
    server_name = settings.serve.name or f"{settings.serve.host}:{settings.serve.port}"
    metrics = ServerMetrics(server_name)
    # gunicorn numbers the workers it spawns (see serving.worker): the first is 1.
    metrics.worker_restarts.set(int(os.environ.get("NEURONSERVE_WORKER_AGE", "1")) - 1)
    registry = ModelRegistry(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.start()
        install_drain(app, registry)
        yield
        registry.close()

    description = describe_server(registry)
    app = ServingApp(
        title="neuronserve",
        version=__version__,
        description=description,
        lifespan=lifespan,
        openapi_url=None,  # the route table serves the document and the docs page
        docs_url=None,
        redoc_url=None,
    )
    app.state.registry = registry
    routes = route_table(registry, metrics, settings, server_name)
    app.openapi = lambda: openapi_document(routes, settings, description)  # type: ignore[method-assign]
    app.serving_options = {
        "server_name": server_name,
        "max_body_bytes": settings.serve.max_body_bytes,
        "api_key": settings.api_key(),
        "metrics": metrics,
        "routes": [*routes, *document_routes(routes, settings, description)],
        "draining": lambda: registry.draining,
        "access_log": settings.serve.access_log != "off",
    }
    return app


def app_from_environment() -> FastAPI:
    """The gunicorn entry point: settings from $NEURONSERVE_CONFIG and NEURONSERVE_* variables."""
    from neuronserve.serving.logs import configure_logging

    configure_logging()
    return create_app(load_settings(None))
