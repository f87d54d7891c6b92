"""HTTP routes: thin; each gets its handler from app.state, calls it, returns the result."""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from compile import __version__
from server.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                 ModelCard, ModelList, TokenizeRequest, TokenizeResponse)

router = APIRouter()
CLIENT_CLOSED_REQUEST = 499


def with_cancellation(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Cancel the handler when the client disconnects (vLLM's decorator of the same name).

    A cancelled handler closes its Generation, which aborts the engine requests. Streaming
    responses need no help: Starlette cancels the stream itself when the client goes away.
    """

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        raw_request: Request = kwargs["raw_request"]
        work = asyncio.create_task(handler(*args, **kwargs))
        gone = asyncio.create_task(_client_gone(raw_request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            gone.cancel()
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    return wrapper


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.get("/health")
async def health(raw_request: Request) -> Response:
    state, engine = raw_request.app.state.server, raw_request.app.state.engine
    if state.startup_error or (state.started and not engine.is_alive()):
        return JSONResponse({"status": "unhealthy", "error": state.startup_error or "engine loop stopped"}, 503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(raw_request: Request) -> Response:
    state = raw_request.app.state.server
    if state.ready:
        return JSONResponse({"status": "ready"})
    status = "draining" if state.draining else ("failed" if state.startup_error else "warming_up")
    return JSONResponse({"status": status}, 503)


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    app_state = raw_request.app.state
    app_state.metrics.observe_engine(app_state.engine.num_running, app_state.engine.num_waiting)
    return Response(generate_latest(app_state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/v1/models")
async def list_models(raw_request: Request) -> ModelList:
    model = raw_request.app.state.model
    return ModelList(data=[ModelCard(id=model.name, created=model.created, root=model.root,
                                     max_model_len=model.max_model_len)])


@router.post("/v1/completions")
@with_cancellation
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.completion.create_completion(request, raw_request)


@router.post("/v1/chat/completions")
@with_cancellation
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.chat.create_chat_completion(request, raw_request)


@router.post("/tokenize")
async def tokenize(request: TokenizeRequest, raw_request: Request) -> TokenizeResponse:
    return await raw_request.app.state.tokenization.tokenize(request, raw_request)


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> DetokenizeResponse:
    return await raw_request.app.state.tokenization.detokenize(request, raw_request)
