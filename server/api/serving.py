"""What the endpoints share: the EngineClient contract, tokenizing, admission, SSE framing.

An HTTP request becomes one `Generation`: one engine request per prompt, merged into one
stream of (prompt index, RequestOutput delta). Closing the Generation aborts whatever is
still running, so a client that goes away frees its slots on the engine's next step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Optional, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api import errors
from server.api.chat_template import ChatRenderer
from server.api.lifecycle import ServerState
from server.api.protocol import FieldError, PromptTokensDetails, UsageInfo, unknown_fields
from server.api.tool_parsers import get_tool_parser
from server.engine.structured import GrammarError
from server.engine.types import (CompletionOutput, EngineDeadError, FinishReason, QueueFullError, RequestOutput,
                                 RequestTooLongError, SamplingParams, SamplingParamsError, StructuredOutputsParams,
                                 TokenLogprob)
from server.metrics import Metrics

LOG_SCOPE_KEY = "kiln.log"        # per-request dict of fields for the request's log line
ARRIVAL_SCOPE_KEY = "kiln.arrival"  # time.monotonic() when the HTTP request arrived
LONG_TEXT_CHARS = 8192            # tokenize longer texts off the event loop
SSE_KEEPALIVE_SECONDS = 10.0      # a stream with nothing to send for this long gets ": ping"
SSE_PING = ": ping\n\n"           # an SSE comment: clients skip it, TTFT timers do not count it

logger = logging.getLogger(__name__)


class EngineClient(Protocol):
    """What the API layer needs from the engine (server.engine.async_engine.AsyncEngine)."""

    num_running: int
    num_waiting: int

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def is_alive(self) -> bool: ...

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue a request; raises QueueFullError, RequestTooLongError, ValueError or
        EngineDeadError at once. The stream yields RequestOutput deltas, the last one finished."""

    def abort(self, request_id: str) -> None: ...

    def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile (and cache) a structured-output constraint; raises GrammarError. Thread-safe."""


@dataclass(frozen=True)
class ServingOptions:
    """API behaviour chosen at start-up (server/__main__.py flags)."""

    strict_request_fields: bool = False      # unknown request fields: 400 (else logged and ignored)
    enable_auto_tool_choice: bool = True     # tool_choice "auto": parse tool calls out of the output
    tool_call_parser: str = "hermes"         # server/api/tool_parsers


class RequestFailedError(RuntimeError):
    """The engine could not produce a valid output for this request (FinishReason.ERROR)."""


@dataclass
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    root: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))


class Generation:
    """The engine requests of one HTTP request; registered with ServerState while open."""

    def __init__(self, engine: EngineClient, state: ServerState):
        self.engine, self.state = engine, state
        self.request_ids: list[str] = []
        self._streams: list[AsyncIterator[RequestOutput]] = []
        self._finished: set[str] = set()
        self._cached_tokens: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        state.active.add(self)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._streams.append(self.engine.add_request(request_id, prompt_ids, params))
        self.request_ids.append(request_id)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self._streams) == 1:
            async for out in self._streams[0]:
                self._note(out)
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((i, e))

        self._tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        remaining = len(self._tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                self._note(item)
                yield i, item

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the prefix cache supplied, over this generation's prompts."""
        return sum(self._cached_tokens.values())

    def _note(self, out: RequestOutput) -> None:
        self._cached_tokens[out.request_id] = out.num_cached_tokens
        if out.finished:
            self._finished.add(out.request_id)
        if any(c.finish_reason is FinishReason.ERROR for c in out.outputs):
            # a stream reports it as a final SSE error event, a JSON response as a 500
            raise RequestFailedError(f"request {out.request_id} failed: the model produced non-finite logits")

    def abort(self) -> None:
        for request_id in self.request_ids:
            if request_id not in self._finished:
                self.engine.abort(request_id)
                self._finished.add(request_id)

    def close(self) -> None:
        """Idempotent: cancel the merge, abort unfinished requests, leave ServerState."""
        for task in self._tasks:
            task.cancel()
        self.abort()
        self.state.active.discard(self)


class SSEResponse(StreamingResponse):
    """text/event-stream that runs `on_close` however the stream ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def _framed(chunks: AsyncGenerator[str, None], generation: Generation) -> AsyncIterator[str]:
    """The stream has started (status 200 sent): a failure is reported in-band, then [DONE]."""
    try:
        async for chunk in _keepalive(chunks, SSE_KEEPALIVE_SECONDS):
            yield chunk
    except EngineDeadError as e:    # the same error object a new request would get (503)
        logger.error("stream of %s ended: %s", ",".join(generation.request_ids), e)
        yield sse(errors.OpenAIError(503, f"The engine is not running: {e}", code="engine_dead").body())
    except Exception:  # noqa: BLE001
        logger.exception("stream of %s failed", ",".join(generation.request_ids))
        yield sse(errors.internal_error().body())
    yield SSE_DONE


async def _keepalive(chunks: AsyncGenerator[str, None], interval: float) -> AsyncIterator[str]:
    """`chunks`, with SSE_PING whenever none came for `interval` seconds (a long prefill): proxies
    keep the connection, while the first `data:` chunk still waits for the first token."""
    pending: Optional[asyncio.Future] = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(chunks.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield SSE_PING
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await chunks.aclose()


@dataclass
class ChoiceState:
    """One choice, accumulated from its deltas."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[str | int] = None
    num_generated: int = 0
    sent_role: bool = False     # streamed chat: the role goes with the choice's first chunk

    def add(self, out: CompletionOutput) -> None:
        self.text.append(out.text)
        self.logprobs.extend(out.logprobs or ())
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason.value
            self.stop_reason = out.stop_reason
        self.num_generated = out.num_generated_tokens      # cumulative


class RequestTracker:
    """Per-HTTP-request accounting: choices, usage, time to first token, the log fields."""

    def __init__(self, raw_request: Request, num_prompt_tokens: int, n: int, stream: bool):
        self.start = raw_request.scope.get(ARRIVAL_SCOPE_KEY) or time.monotonic()
        self.first_token: Optional[float] = None
        self.num_prompt_tokens = num_prompt_tokens
        self.choices: dict[int, ChoiceState] = {}
        self.log = raw_request.scope.setdefault(LOG_SCOPE_KEY, {})
        self.log.update(prompt_tokens=num_prompt_tokens, n=n, stream=stream)

    def add(self, index: int, out: CompletionOutput) -> ChoiceState:
        if self.first_token is None and out.token_ids:
            self.first_token = time.monotonic()
            self.log["ttft_s"] = round(self.first_token - self.start, 4)
        choice = self.choices.setdefault(index, ChoiceState())
        choice.add(out)
        return choice

    def usage(self, num_cached_tokens: int = 0) -> UsageInfo:
        completion = sum(c.num_generated for c in self.choices.values())
        return UsageInfo(prompt_tokens=self.num_prompt_tokens, completion_tokens=completion,
                         total_tokens=self.num_prompt_tokens + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens))

    def finish(self) -> None:
        """Fill the log line's outcome (a choice with no finish reason was aborted)."""
        reasons = {c.finish_reason or "abort" for c in self.choices.values()} or {"abort"}
        self.log.update(output_tokens=self.usage().completion_tokens, finish_reason=",".join(sorted(reasons)))


class OpenAIServing:
    """Shared by the completion, chat and tokenize handlers."""

    def __init__(self, engine: EngineClient, tokenizer: Any, model: ModelInfo, state: ServerState,
                 metrics: Metrics, options: ServingOptions = ServingOptions()):
        self.engine, self.tokenizer, self.model, self.state, self.metrics = (
            engine, tokenizer, model, state, metrics)
        self.options = options
        self.tool_parser = get_tool_parser(options.tool_call_parser) if options.enable_auto_tool_choice else None
        self.chat_renderer = ChatRenderer(tokenizer, self.tool_parser or get_tool_parser(options.tool_call_parser))
        self._token_strs: dict[int, str] = {}

    # ---- checks ----
    def check_fields(self, request: BaseModel, raw_request: Request) -> None:
        """Unknown request fields: a 400 naming the first with --strict-request-fields, else a
        warning in the log (vLLM's behaviour: clients send other servers' extras)."""
        unknown = unknown_fields(request)
        if not unknown:
            return
        if self.options.strict_request_fields:
            raise errors.bad_request(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                                     code="unrecognized_argument")
        raw_request.scope.setdefault(LOG_SCOPE_KEY, {})["ignored_fields"] = ",".join(unknown)
        logger.warning("ignoring unknown request fields: %s", ", ".join(unknown))

    async def check_structured(self, params: SamplingParams, param: Optional[str]) -> None:
        """Compile the request's constraint (off the event loop; cached), a 400 naming `param` if it
        cannot be; counted in kiln:structured_output_requests."""
        spec = params.structured_outputs
        if spec is None:
            return
        try:
            await asyncio.to_thread(self.engine.compile_grammar, spec)
        except GrammarError as e:
            raise errors.bad_request(str(e), param=param) from None
        self.metrics.observe_structured_request(spec.kind)
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model.name:
            raise errors.model_not_found(model)

    def check_accepting(self) -> None:
        if self.state.draining:
            self.metrics.observe_rejected("draining")
            raise errors.draining()
        if not self.state.started:
            raise errors.OpenAIError(503, "The model is still warming up; retry shortly.", code="not_ready",
                                     headers={"Retry-After": str(errors.RETRY_AFTER_SECONDS)})

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.model.vocab_size), None)
        if bad is not None:
            raise errors.bad_request(f"token id {bad} is outside the vocabulary [0, {self.model.vocab_size})",
                                     param=param)

    def check_length(self, num_prompt_tokens: int, max_tokens: Optional[int], param: str) -> None:
        limit = self.model.max_model_len
        if num_prompt_tokens + 1 > limit:
            raise errors.context_length_exceeded(str(RequestTooLongError(num_prompt_tokens, limit)), param)
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
                f"for the completion). Please reduce the prompt or max_tokens.", "max_tokens")

    def sampling_params(self, request: Any) -> SamplingParams:
        try:
            params = request.to_sampling_params()   # SamplingParams check themselves when made
        except ValueError as e:
            raise _params_error(e) from None
        self.check_token_ids([t for t, _ in params.logit_bias], "logit_bias")
        return params

    # ---- tokenizer ----
    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_str(self, token_id: int) -> str:
        text = self._token_strs.get(token_id)
        if text is None:
            text = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return text

    # ---- responses ----
    async def respond(self, stream: bool, generation: Generation, tracker: RequestTracker,
                      chunks: Callable[[], AsyncGenerator[str, None]], collect: Callable[[], Awaitable[BaseModel]]) -> Response:
        """SSE of `chunks()` framed and ended by `data: [DONE]`, or the JSON of `collect()`.
        Either way, when it ends the Generation closes (aborting what runs) and the log line is filled."""
        def close() -> None:
            generation.close()
            tracker.finish()

        if stream:
            return SSEResponse(_framed(chunks(), generation), close)
        try:
            return JSONResponse((await collect()).model_dump())
        finally:
            close()

    # ---- engine ----
    def start_generation(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> Generation:
        """One engine request per prompt (`{request_id}-{i}` when several); errors map to 4xx."""
        self.check_accepting()
        generation = Generation(self.engine, self.state)
        try:
            for i, ids in enumerate(prompts):
                generation.add(request_id if len(prompts) == 1 else f"{request_id}-{i}", ids, params)
        except BaseException as e:
            generation.close()
            if isinstance(e, QueueFullError):
                self.metrics.observe_rejected("queue_full")
                raise errors.queue_full() from None
            if isinstance(e, RequestTooLongError):
                raise errors.context_length_exceeded(str(e), "prompt") from None
            if isinstance(e, ValueError):
                raise _params_error(e) from None
            raise                  # EngineDeadError: app.py answers 503
        return generation


def _params_error(e: ValueError) -> errors.OpenAIError:
    """A SamplingParams/engine/request-model ValueError as a 400, naming the field when the error does."""
    if isinstance(e, FieldError):
        return errors.bad_request(str(e), param=e.param, code=e.code)
    return errors.bad_request(str(e), param=e.field if isinstance(e, SamplingParamsError) else None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def clamp_logprob(value: float) -> float:
    """JSON has no -inf; vLLM reports -9999.0 for impossible tokens."""
    return max(value, -9999.0)
