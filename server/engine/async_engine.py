"""AsyncEngine: the engine loop on a thread of its own, talking to asyncio through queues.

One thread owns the LLMEngine (and so the runner and KV cache) and steps while there is work;
when idle it sleeps on a condition variable. `python -m server` runs that loop on the main thread
(run(), after the runner's warm-up there: see server/__main__.py); tests and embedders let start()
spawn a thread for it. The HTTP side only touches thread-safe parts:
add_request validates at once (so bad input is a 4xx before anything is queued), then hands
the request to the loop through a locked list; outputs come back through
loop.call_soon_threadsafe into each request's asyncio.Queue, so a slow client never stalls
a step. An exception in the loop fails every live request's stream and marks the engine dead.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, Optional, Sequence as Seq

from server.engine.config import EngineConfig
from server.engine.llm_engine import EngineObserver, LLMEngine
from server.engine.types import (EngineDeadError, QueueFullError, RequestOutput,
                                 SamplingParams, StructuredOutputsParams)

logger = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 0.5   # an idle loop rechecks keep_going() this often


class RequestStream:
    """Async iterator of one request's RequestOutput deltas; ends after the finished one.
    Raises the loop's error (EngineDeadError) if the engine fails while it is live."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    @property
    def finished(self) -> bool:
        return self._done

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item


class AsyncEngine:
    def __init__(self, runner, tokenizer, config: Optional[EngineConfig] = None,
                 observer: Optional[EngineObserver] = None, own_thread: bool = True,
                 step_timeout: Optional[float] = None):
        """own_thread: start() spawns the loop's thread; False: the owner calls run() itself
        (on the main thread, where the graphs run fastest: server/__main__.py).
        step_timeout: seconds one engine step may run before the engine is declared dead (every
        live stream fails, is_alive() turns false so /health answers 503); None: no limit."""
        self.engine = LLMEngine(runner, tokenizer, config, observer)
        self.config = self.engine.config
        self._own_thread = own_thread
        self.step_timeout = step_timeout
        self._step_started: Optional[float] = None     # monotonic start of the step in progress
        self._watchdog: Optional[asyncio.Task] = None
        self._cond = threading.Condition()
        self._new: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._num_waiting = 0     # snapshot of engine.num_waiting, plus requests handed over
        self._num_running = 0
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._looping = threading.Event()   # run() has begun (or start-up failed: fail())
        self._active = False                # run() is executing
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the event loop outputs go to, then wait until the engine loop runs (raises
        EngineDeadError if start-up failed first)."""
        if self._loop is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        if self.step_timeout is not None:
            self._watchdog = asyncio.create_task(self._watch())
        if self._own_thread:
            threading.Thread(target=self.run, name="kiln-engine-loop", daemon=True).start()
        while not self._looping.is_set():
            await asyncio.sleep(0.02)
        if self._error is not None:
            raise EngineDeadError(self._dead_message())

    def fail(self, error: BaseException) -> None:
        """Start-up failed before run() (e.g. the warm-up): start() and new requests see it."""
        with self._cond:
            self._error = error
        self._looping.set()

    async def shutdown(self) -> None:
        """Abort what is in flight (streams end with finish_reason "abort") and stop the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._watchdog is not None:
            self._watchdog.cancel()
        while self._active and not self._overdue():
            await asyncio.sleep(0.02)

    def is_alive(self) -> bool:
        return self._active and self._error is None and not self._stopping and not self._overdue()

    # ---- the step deadline -------------------------------------------------------------------
    def _overdue(self) -> bool:
        """True (and the engine declared dead) once a step has outrun step_timeout. NOTE: a graph
        call cannot be interrupted; the hung thread is left behind and the process is restarted
        (Kubernetes, on /health 503); meanwhile no client waits on it."""
        started = self._step_started
        if self.step_timeout is None or started is None or time.monotonic() - started <= self.step_timeout:
            return False
        with self._cond:
            if self._error is not None:
                return True
            self._error = TimeoutError(f"an engine step has run for more than {self.step_timeout:g} s")
            streams = list(self._streams)
        logger.error("engine step deadline passed (%g s): failing %d live requests; the engine is dead",
                     self.step_timeout, len(streams))
        self._publish([], {request_id: EngineDeadError(self._dead_message()) for request_id in streams})
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.step_timeout / 4))
            if self._overdue():
                return

    def set_token_budget(self, tokens: int) -> None:
        """LLMEngine.set_token_budget; call it before run()."""
        self.engine.set_token_budget(tokens)
        self.config = self.engine.config

    @property
    def prefix_cache_rows(self) -> int:
        """Store rows the prefix cache uses (0: prefix caching off)."""
        return self.engine.scheduler.prefix.num_rows

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return self._num_waiting + len(self._new)

    # ---- requests -----------------------------------------------------------------------------
    def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile (and cache) a structured-output constraint; raises GrammarError. Any thread."""
        self.engine.structured.compile(spec)

    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: SamplingParams) -> RequestStream:
        """Queue a request and return its stream. Raises at once: ValueError (bad params or
        duplicate id), RequestTooLongError, QueueFullError, EngineDeadError (not running).
        This is the one admission check; the engine loop trusts what it is handed."""
        self.engine.check_request(prompt_token_ids, params)
        with self._cond:
            if not self.is_alive():
                raise EngineDeadError(self._dead_message())
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self._num_waiting + len(self._new) >= self.config.max_num_queued_reqs:
                raise QueueFullError(
                    f"the waiting queue is full ({self.config.max_num_queued_reqs} requests)")
            stream = RequestStream(request_id)
            self._streams[request_id] = stream
            self._new.append((request_id, list(prompt_token_ids), params))
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request ends (finish_reason "abort") at the next step boundary."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """The engine loop, on the calling thread, until shutdown() (or keep_going() turns false
        while idle). Failures end every live stream with EngineDeadError."""
        engine = self.engine
        with self._cond:
            if self._error is not None or self._active:
                return
            self._active = True
        self._looping.set()
        try:
            while True:
                with self._cond:
                    while not (self._new or self._aborts or self._stopping
                               or engine.has_unfinished()):
                        if not keep_going():
                            return
                        self._cond.wait(timeout=IDLE_POLL_SECONDS)
                    new, self._new = self._new, []
                    aborts, self._aborts = self._aborts, []
                    stopping = self._stopping
                    self._num_waiting += len(new)
                for request_id, prompt_token_ids, params in new:
                    try:
                        engine.add_request(request_id, prompt_token_ids, params)
                    except Exception as e:   # validated already; a race on the queue bound
                        self._publish([], {request_id: e})
                for request_id in aborts:
                    engine.abort(request_id)
                if stopping:
                    engine.abort_all()
                self._step_started = time.monotonic()
                outputs = engine.step()
                self._step_started = None
                with self._cond:
                    if self._error is not None:     # the step outran its deadline: nobody listens
                        return
                    self._num_waiting = engine.num_waiting
                    self._num_running = engine.num_running
                self._publish(outputs, {})
                if stopping and not engine.has_unfinished():
                    return
        except BaseException as e:   # noqa: BLE001 - any failure must reach the streams
            logger.exception("engine loop failed")
            with self._cond:
                self._error = e
            error = EngineDeadError(f"engine loop failed: {e!r}")
            error.__cause__ = e
            self._publish([], {request_id: error for request_id in list(self._streams)})
        finally:
            self._active = False

    def _publish(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        if (outputs or errors) and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._dispatch, outputs, errors)
            except RuntimeError:      # the event loop is closed; nobody is listening
                pass

    def _dispatch(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        """Runs on the event loop: hand each output to its stream."""
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream._put(out)
                    if out.finished:
                        del self._streams[out.request_id]
            for request_id, error in errors.items():
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream._put(error)

    def _dead_message(self) -> str:
        if self._error is not None:
            return f"the engine loop failed: {self._error!r}"
        return "the engine is not running" if not self._stopping else "the engine is shutting down"
