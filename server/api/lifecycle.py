"""Readiness, draining and shutdown: the state /ready, /health and the routes share.

Start-up: uvicorn listens first, then a background task warms the runner and starts the
engine loop; /ready answers 200 only after that. SIGTERM (or SIGINT): /ready and new
requests answer 503, requests in flight run for up to `drain_timeout` seconds, the rest
are aborted, then uvicorn shuts down and the lifespan stops the engine; the process exits 0.
A second signal exits at once. A failed warm-up or engine start ends the process (exit 1)
instead of leaving it up and never ready.
"""
from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING, Optional

import uvicorn

if TYPE_CHECKING:
    from server.api.serving import Generation

logger = logging.getLogger(__name__)


class ServerState:
    """One per app. Changed only by the lifespan (started, startup_error), the signal handler
    (draining) and Generation objects (in `active` while they hold engine requests)."""

    def __init__(self) -> None:
        self.started = False          # engine loop started (after warm-up)
        self.startup_error: Optional[str] = None
        self.draining = False
        self.active: set["Generation"] = set()

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.startup_error is None

    @property
    def num_inflight(self) -> int:
        return len(self.active)

    def abort_all(self) -> int:
        """Abort every engine request still running; their streams end with finish_reason abort."""
        active = list(self.active)
        for generation in active:
            generation.abort()
        return len(active)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing at once.

    NOTE: uvicorn's own handle_exit records the signal and re-raises it after shutdown, which
    would end the process with the signal's status instead of 0; this one never records it.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._drain_deadline: Optional[float] = None

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if self._drain_deadline is not None or not self.started:
            self.should_exit = True
            self.force_exit = self._drain_deadline is not None
            return
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout
        logger.info("%s: draining %d request(s) in flight for up to %g s",
                    signal.Signals(sig).name, self.state.num_inflight, self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if self.state.startup_error is not None and not self.should_exit:
            logger.error("exiting: %s", self.state.startup_error)
            self.should_exit = True
        if self._drain_deadline is not None and not self.should_exit:
            if self.state.num_inflight == 0:
                logger.info("drained; shutting down")
                self.should_exit = True
            elif time.monotonic() >= self._drain_deadline:
                logger.warning("drain timeout: aborting %d request(s) still in flight", self.state.abort_all())
                self.should_exit = True
        return await super().on_tick(counter)
