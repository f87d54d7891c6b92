"""Faults: what fails, what continues, and that nothing hangs or leaks a slot (docs/reliability.md).

In-process faults wrap the tiny artifact's real runner in a test double (`inject`: the runner's own
decode primitive replaced on the instance; no production code path knows of it) behind the real
AsyncEngine and app. Process faults (SIGKILL, a client that stops reading) use a real server.
"""
from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.serving import ModelInfo
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.metrics import Metrics
from server.runner.artifact import load_artifact
from server_harness import ServerProcess, wait_until

CHAT = {"messages": [{"role": "user", "content": "Tell me about kilns."}], "ignore_eos": True}


class FaultyServer:
    """The real engine and app around the tiny artifact, with a fault in the runner's decode."""

    def __init__(self, artifact, step_timeout=None):
        loaded = load_artifact(artifact)
        self.runner = loaded.runner
        self.engine = AsyncEngine(self.runner, loaded.tokenizer, EngineConfig(), step_timeout=step_timeout)
        info = ModelInfo(name="tiny", max_model_len=self.engine.config.max_model_len,
                         vocab_size=self.runner.vocab_size)
        self.app = create_app(self.engine, loaded.tokenizer, info, Metrics("tiny"))
        self.http = TestClient(self.app, raise_server_exceptions=False)
        self.http.__enter__()
        assert wait_until(lambda: self.http.get("/ready").status_code == 200, timeout=30)
        self._decode = self.runner.decode

    def inject(self, fault) -> None:
        """fault(original_decode, token_ids, positions) -> RunnerOutput, called for every decode."""
        self.runner.decode = lambda token_ids, positions: fault(self._decode, token_ids, positions)

    def chat(self, max_tokens=24, stream=False, **extra) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={**CHAT, "max_tokens": max_tokens, "stream": stream,
                                                           **extra})

    def idle(self) -> bool:
        return self.engine.num_running == 0 and self.engine.num_waiting == 0 and not self.engine.engine.has_unfinished()

    def close(self) -> None:
        self.http.__exit__(None, None, None)


@pytest.fixture
def faulty(tiny_artifact):
    made = []

    def make(**kwargs) -> FaultyServer:
        made.append(FaultyServer(tiny_artifact, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def sse_data(text: str) -> list[dict]:
    return [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e.startswith("data: {")]


def test_nan_logits_fail_that_request_only(faulty):
    server = faulty()
    long_prompt = [{"role": "user", "content": "Tell me about kilns. " * 12}]     # positions beyond 70

    def nan_for_long_rows(decode, token_ids, positions):
        out = decode(token_ids, positions)
        for row, position in enumerate(positions):
            if position >= 70:
                out.logits[row] = float("nan")
        return out

    server.inject(nan_for_long_rows)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(server.chat, 24, False, messages=long_prompt)
        good = pool.submit(server.chat, 8, True)
        bad, good = bad.result(timeout=60), good.result(timeout=60)
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "internal_error"
    events = sse_data(good.text)
    assert good.status_code == 200 and "error" not in events[-1] and events[-1]["choices"][0]["finish_reason"] == "length"
    assert wait_until(server.idle, timeout=10)
    assert server.http.get("/health").status_code == 200
    assert server.chat(4).status_code == 200          # the engine goes on


def test_a_nan_stream_ends_with_an_sse_error_event(faulty):
    server = faulty()
    server.inject(lambda decode, ids, pos: type(out := decode(ids, pos))(out.logits.fill_(float("nan")), out.run))
    response = server.chat(8, stream=True)
    assert response.status_code == 200
    events = sse_data(response.text)
    assert events[-1]["error"]["code"] == "internal_error" and response.text.endswith("data: [DONE]\n\n")
    assert wait_until(server.idle, timeout=10)


def test_a_graph_that_raises_kills_the_engine_and_health_says_so(faulty):
    server = faulty()
    calls = {"n": 0}

    def raise_once(decode, token_ids, positions):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device error")
        return decode(token_ids, positions)

    server.inject(raise_once)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(server.chat, 40, True)
        plain = pool.submit(server.chat, 40)
        streamed, plain = streamed.result(timeout=60), plain.result(timeout=60)
    # every live request fails (stream: a final error event; JSON: 503 engine_dead), nothing hangs
    assert sse_data(streamed.text)[-1]["error"]["code"] == "engine_dead"
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_dead"
    assert server.http.get("/health").status_code == 503      # Kubernetes restarts the pod
    refused = server.chat(4)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"


def test_a_step_past_its_deadline_fails_live_requests_at_once(faulty):
    server = faulty(step_timeout=0.5)
    release = {"hang": True}

    def hang(decode, token_ids, positions):
        start = time.monotonic()
        while release["hang"] and time.monotonic() - start < 20:
            time.sleep(0.02)
        return decode(token_ids, positions)

    server.inject(hang)
    start = time.monotonic()
    response = server.chat(8)
    took = time.monotonic() - start
    assert response.status_code == 503 and "0.5 s" in response.json()["error"]["message"]
    assert took < 5, took                                # the client did not wait for the hung step
    assert server.http.get("/health").status_code == 503
    release["hang"] = False


# ---- a real process ------------------------------------------------------------------------------

@pytest.fixture
def process(tiny_artifact, tmp_path):
    made = []

    def make() -> ServerProcess:
        made.append(ServerProcess(tiny_artifact, tmp_path, "--served-model-name", "tiny").wait_ready())
        return made[-1]

    yield make
    for server in made:
        server.stop()


def test_sigkill_mid_stream_breaks_the_stream_and_a_restart_serves(process):
    server = process()
    body = {"model": "tiny", "max_tokens": 60, "stream": True, **CHAT}
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200          # the stream has begun
            server.signal(signal.SIGKILL)
            for _ in response.iter_lines():
                pass
    assert server.wait(timeout=10) == -signal.SIGKILL
    again = process()              # the artifact is read-only to the server: nothing to repair
    assert httpx.post(f"{again.url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4},
                      timeout=30).status_code == 200


def test_a_client_that_stops_reading_holds_nothing_back(process):
    server = process()
    body = json.dumps({"model": "tiny", "max_tokens": 60, "stream": True, **CHAT}).encode()
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        # it never reads; others are served meanwhile, and its request runs to its end and frees its slot
        out = httpx.post(f"{server.url}/v1/completions", timeout=30,
                         json={"model": "tiny", "prompt": "hi", "max_tokens": 8, "ignore_eos": True})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 8
        assert wait_until(lambda: server.metrics().get("kiln:num_requests_running") == 0
                          and server.metrics().get("kiln:request_success_total", finished_reason="length") >= 2,
                          timeout=30)
    finally:
        stalled.close()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_sampler_reports_non_finite_rows():
    from server.engine.types import SamplingParams, SamplingRow
    from server.runner.sampler import Sampler
    logits = torch.zeros(3, 8)
    logits[1, 2] = float("nan")
    logits[2, 5] = float("inf")
    rows = [SamplingRow(key=str(i), params=SamplingParams(temperature=0), prompt_token_ids=[1], output_token_ids=[])
            for i in range(3)]
    assert Sampler().sample(logits, rows).failed_rows == [1, 2]
