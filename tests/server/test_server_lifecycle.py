"""DrainingServer's signal and tick logic, and start-up failure, without a real process."""
from __future__ import annotations

import asyncio
import signal
import time

import uvicorn
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.lifecycle import DrainingServer, ServerState
from server.api.serving import ModelInfo
from server.metrics import Metrics
from server_fakes import FakeEngine


class FakeGeneration:
    def __init__(self):
        self.aborted = 0

    def abort(self):
        self.aborted += 1


def make_server(drain_timeout: float) -> tuple[DrainingServer, ServerState]:
    state = ServerState()
    server = DrainingServer(uvicorn.Config(app=None), state, drain_timeout)
    server.started = True
    return server, state


def test_first_signal_drains_then_exits_when_nothing_is_in_flight():
    server, state = make_server(30)
    generation = FakeGeneration()
    state.active.add(generation)
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining and not server.should_exit
    assert asyncio.run(server.on_tick(1)) is False
    state.active.discard(generation)
    assert asyncio.run(server.on_tick(2)) is True
    assert generation.aborted == 0
    assert server._captured_signals == []          # nothing re-raised after shutdown: exit status 0


def test_drain_timeout_aborts_what_is_in_flight():
    server, state = make_server(0)
    generation = FakeGeneration()
    state.active.add(generation)
    server.handle_exit(signal.SIGTERM, None)
    assert asyncio.run(server.on_tick(1)) is True
    assert generation.aborted == 1


def test_second_signal_exits_at_once():
    server, state = make_server(30)
    state.active.add(FakeGeneration())
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and server.force_exit


def test_failed_startup_is_unhealthy_and_ends_the_server(smollm2_tokenizer):
    engine = FakeEngine(smollm2_tokenizer)
    engine.fail_start = RuntimeError("graph mismatch")     # e.g. the warm-up failed: AsyncEngine.fail
    app = create_app(engine, smollm2_tokenizer, ModelInfo("m", 64, len(smollm2_tokenizer)), Metrics("m"))
    with TestClient(app) as http:
        for _ in range(100):
            if app.state.server.startup_error:
                break
            time.sleep(0.01)
        assert http.get("/health").status_code == 503
        assert http.get("/ready").json() == {"status": "failed"}
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 503
    assert not engine.started
    server = DrainingServer(uvicorn.Config(app=None), app.state.server, 30)
    assert asyncio.run(server.on_tick(1)) is True
