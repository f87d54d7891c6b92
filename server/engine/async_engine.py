"""AsyncEngine: the engine loop on its own thread, talking to asyncio through queues.

One thread owns the LLMEngine (and so the runner and KV cache) and steps while there is work;
when idle it sleeps on a condition variable. The HTTP side only touches thread-safe parts:
add_request validates at once (so bad input is a 4xx before anything is queued), then hands
the request to the loop through a locked list; outputs come back through
loop.call_soon_threadsafe into each request's asyncio.Queue, so a slow client never stalls
a step. An exception in the loop fails every live request's stream and marks the engine dead.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Optional, Sequence as Seq

from server.engine.config import EngineConfig
from server.engine.llm_engine import EngineObserver, LLMEngine
from server.engine.types import (EngineDeadError, QueueFullError, RequestOutput,
                                 SamplingParams)

logger = logging.getLogger(__name__)


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
                 observer: Optional[EngineObserver] = None, loop_host=None):
        """loop_host: where the engine loop runs (server.engine.loop_host.MainThreadHost);
        None: a thread of its own."""
        self.engine = LLMEngine(runner, tokenizer, config, observer)
        self._loop_host = loop_host
        self.config = self.engine.config
        self._cond = threading.Condition()
        self._new: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._num_waiting = 0     # snapshot of engine.num_waiting, plus requests handed over
        self._num_running = 0
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        if self._loop_host is not None:
            self._thread = self._loop_host.start(self._run)
        else:
            self._thread = threading.Thread(target=self._run, name="kiln-engine-loop", daemon=True)
            self._thread.start()

    async def run_on_loop_thread(self, fn) -> None:
        """Run fn (e.g. the runner's warm-up) on the thread the engine loop will use, before start().

        NOTE: torch work done on a helper thread that stays alive slowed the loop's graphs by 1.5x
        afterwards (measured: SmolLM2 decode 27 -> 47 ms), so warm-up must not use a thread pool."""
        if self._loop_host is None:
            await asyncio.to_thread(fn)
            return
        job = self._loop_host.start(fn)
        await asyncio.to_thread(job.join)
        job.raise_error()

    async def shutdown(self) -> None:
        """Abort what is in flight (streams end with finish_reason "abort") and stop the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self._error is None
                and not self._stopping)

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return self._num_waiting + len(self._new)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: SamplingParams) -> RequestStream:
        """Queue a request and return its stream. Raises at once: ValueError (bad params or
        duplicate id), RequestTooLongError, QueueFullError, EngineDeadError (not running)."""
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

    # ---- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._new or self._aborts or self._stopping
                               or engine.has_unfinished()):
                        self._cond.wait()
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
                outputs = engine.step()
                with self._cond:
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
