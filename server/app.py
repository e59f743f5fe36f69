"""The starlette application: routes, middleware, error handlers and the lifespan.

`create_app(engine, settings)` builds one app around an already-started engine. Per-app
state (`ServerState`: metrics registry, served names, compiled chat template) is created
here and published on `app.state.server` by the lifespan, whose shutdown marks the server
as shutting down (`/health` turns 503) and stops the engine. uvicorn runs the lifespan
shutdown after in-flight requests finished or its graceful timeout cancelled them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from radixserve.server import protocol as p
from radixserve.server.chat import chat_completions
from radixserve.server.completions import completions
from radixserve.server.errors import APIError, api_error_handler, http_exception_handler
from radixserve.server.info import detokenize, health, list_models, model_info, tokenize
from radixserve.server.metrics import metrics_endpoint
from radixserve.server.middleware import AuthMiddleware, BodyLimitMiddleware, ErrorGuardMiddleware, RequestContextMiddleware
from radixserve.server.native import generate
from radixserve.server.openapi import Endpoint, build_openapi
from radixserve.server.settings import ServerSettings
from radixserve.server.state import ServerState

logger = logging.getLogger(__name__)

_NO_BODY_ERRORS = (401, 500)


async def openapi_document(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", "POST", chat_completions, "Create a chat completion (OpenAI).",
             p.ChatCompletionRequest, p.ChatCompletion, stream_event=p.ChatCompletionChunk),
    Endpoint("/v1/completions", "POST", completions, "Create a text completion (OpenAI, legacy).",
             p.CompletionRequest, p.Completion, stream_event=p.Completion),
    Endpoint("/generate", "POST", generate, "Generate with native sampling parameters (token ids, logprobs).",
             p.GenerateRequest, p.GenerateResponse, stream_event=p.GenerateStreamEvent),
    Endpoint("/tokenize", "POST", tokenize, "Tokenize a prompt or chat messages.", p.TokenizeRequest, p.TokenizeResponse),
    Endpoint("/detokenize", "POST", detokenize, "Turn token ids into text.", p.DetokenizeRequest, p.DetokenizeResponse),
    Endpoint("/v1/models", "GET", list_models, "List the served model.", response=p.ModelList, errors=_NO_BODY_ERRORS),
    Endpoint("/model_info", "GET", model_info, "Model name, context length, chat template, special tokens.",
             response=p.ModelInfo, errors=_NO_BODY_ERRORS),
    Endpoint("/health", "GET", health, "200 when the engine is healthy, 503 otherwise.",
             response=p.HealthStatus, public=True, errors=(503,)),
    Endpoint("/metrics", "GET", metrics_endpoint, "Prometheus metrics.", public=True, media_type="text/plain", errors=(500,)),
    Endpoint("/openapi.json", "GET", openapi_document, "This document.", public=True, errors=(500,)),
)


def create_app(engine: Any, settings: ServerSettings) -> Starlette:
    """The app serving `engine`. The engine must already be running; the app shuts it down
    on exit when `settings.shutdown_engine`."""
    state = ServerState.create(engine, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.server = state
        logger.info("serving %s (accepting %s)", state.served_name, ", ".join(sorted(state.accepted_names)))
        try:
            yield
        finally:
            state.shutting_down = True
            if settings.shutdown_engine:
                logger.info("stopping the engine")
                await asyncio.to_thread(engine.shutdown, 10.0)

    middleware = [
        Middleware(RequestContextMiddleware, on_response=_count_response(state), known_paths=[ep.path for ep in ENDPOINTS]),
        Middleware(ErrorGuardMiddleware),
    ]
    if settings.api_key is not None:
        public = [ep.path for ep in ENDPOINTS if ep.public]
        middleware.append(Middleware(AuthMiddleware, api_key=settings.api_key, public_paths=public))
    middleware.append(Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes))

    app = Starlette(
        routes=[Route(ep.path, ep.handler, methods=[ep.method]) for ep in ENDPOINTS],
        middleware=middleware,
        exception_handlers={APIError: api_error_handler, HTTPException: http_exception_handler},
        lifespan=lifespan,
    )
    app.state.openapi = build_openapi(ENDPOINTS, title="radixserve", version=_version(), auth=settings.api_key is not None)
    return app


def _count_response(state: ServerState):  # noqa: ANN202 - a small closure
    def count(route: str, status: int) -> None:
        state.metrics.http_requests.labels(route=route, status=str(status)).inc()

    return count


def _version() -> str:
    try:
        return metadata.version("radixserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"
