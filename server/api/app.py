"""The FastAPI app factory. The lifespan starts the engine (and waits for its loop to run), then stops it."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from compile import __version__
from server.api import errors
from server.api.lifecycle import ServerState
from server.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from server.api.routes import router
from server.api.serving import LOG_SCOPE_KEY, EngineClient, ModelInfo, ServingOptions
from server.api.serving_chat import OpenAIServingChat
from server.api.serving_completion import OpenAIServingCompletion
from server.api.serving_tokenization import OpenAIServingTokenization
from server.engine.types import EngineDeadError
from server.metrics import Metrics

logger = logging.getLogger(__name__)


def create_app(engine: EngineClient, tokenizer: Any, model: ModelInfo, metrics: Metrics, *,
               api_key: Optional[str] = None, allowed_origins: Sequence[str] = ("*",),
               options: ServingOptions = ServingOptions(), docs: bool = True) -> FastAPI:
    """/ready answers 200 once the engine loop runs (after the runner's warm-up, which whoever
    runs the loop does first: server/__main__.py). docs: serve /docs, /redoc and /openapi.json."""
    state = ServerState()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(_start(engine, state))
        try:
            yield
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await engine.shutdown()

    app = FastAPI(title="Kiln", version=__version__, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.server, app.state.engine, app.state.metrics, app.state.model = state, engine, metrics, model
    args = (engine, tokenizer, model, state, metrics, options)
    app.state.completion = OpenAIServingCompletion(*args)
    app.state.chat = OpenAIServingChat(*args)
    app.state.tokenization = OpenAIServingTokenization(*args)
    app.include_router(router)

    app.add_exception_handler(errors.OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineDeadError, _engine_dead)

    # add_middleware wraps: the last one added is the outermost.
    app.add_middleware(BodyLimitMiddleware)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestContextMiddleware)
    return app


async def _start(engine: EngineClient, state: ServerState) -> None:
    try:
        await engine.start()
    except Exception as e:  # noqa: BLE001 - reported by /health and /ready
        logger.exception("start-up failed")
        state.startup_error = f"start-up failed: {e!r}"
        return
    state.started = True
    logger.info("ready")


def _respond(request: Request, error: errors.OpenAIError):
    request.scope.setdefault(LOG_SCOPE_KEY, {})["error"] = error.code or error.status
    return error.response()


async def _openai_error(request: Request, exc: errors.OpenAIError):
    return _respond(request, exc)


async def _validation_error(request: Request, exc: RequestValidationError):
    return _respond(request, errors.from_validation_error(exc))


async def _engine_dead(request: Request, exc: EngineDeadError):
    return _respond(request, errors.OpenAIError(503, f"The engine is not running: {exc}", code="engine_dead"))


async def _http_error(request: Request, exc: StarletteHTTPException):
    return _respond(request, errors.from_http_exception(exc.status_code, exc.detail, exc.__cause__, exc.headers))
