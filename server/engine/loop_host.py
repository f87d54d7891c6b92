"""Run the engine loop on the process's main thread (the HTTP server then runs on a helper thread).

NOTE: measured on this 2-core machine (torch 2.13, 2 OpenMP threads): the same SmolLM2 decode
graph takes 27 ms when called from the main thread and 42 ms from any other thread (matmuls,
copies and softmax all slower), and serving ran at that slower speed. Until the cause inside the
OpenMP runtime is understood, the thread that runs the graphs is the main one.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional


class HostedLoop:
    """Handle of a function handed to the main thread; quacks like a Thread for join/is_alive."""

    def __init__(self, fn: Callable[[], None]):
        self._fn = fn
        self._done = threading.Event()
        self._error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # noqa: BLE001 - handed back to whoever waits on it
            self._error = e
        finally:
            self._done.set()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: Optional[float] = None) -> None:
        self._done.wait(timeout)


class MainThreadHost:
    """The main thread calls serve(); other threads hand it loops with start()."""

    def __init__(self) -> None:
        self._jobs: "queue.Queue[HostedLoop]" = queue.Queue()

    def start(self, fn: Callable[[], None]) -> HostedLoop:
        job = HostedLoop(fn)
        self._jobs.put(job)
        return job

    def serve(self, keep_going: Callable[[], bool], poll_seconds: float = 0.2) -> None:
        """Run handed-over loops, one at a time, while keep_going() is true."""
        while keep_going():
            try:
                job = self._jobs.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            job.run()
