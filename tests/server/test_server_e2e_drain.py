"""SIGTERM: /ready and new requests answer 503, requests in flight finish (or are aborted at
--drain-timeout), and the process exits 0. Each test owns its server (it ends it)."""
from __future__ import annotations

import concurrent.futures
import json
import signal

import httpx
import openai

from server_harness import ServerProcess, wait_until

LONG = {"prompt": "Drain me", "max_tokens": 100, "n": 4, "ignore_eos": True, "stream": True}


def stream_finish_reasons(url: str, accepted: concurrent.futures.Future) -> list[str]:
    """Stream one request; resolve `accepted` once the server answers 200; return the finish reasons."""
    reasons, done = [], False
    with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=120) as response:
        accepted.set_result(response.status_code)
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            for choice in json.loads(line[6:])["choices"]:
                if choice["finish_reason"]:
                    reasons.append(choice["finish_reason"])
    assert done
    return reasons


def start_streams(server: ServerProcess, pool, num: int):
    """`num` streaming requests, all accepted (status 200) when this returns."""
    accepted = [concurrent.futures.Future() for _ in range(num)]
    futures = [pool.submit(stream_finish_reasons, server.url, a) for a in accepted]
    assert [a.result(timeout=60) for a in accepted] == [200] * num
    return futures


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_artifact, tmp_path):
    server = ServerProcess(tiny_artifact, tmp_path, "--drain-timeout", "60").wait_ready()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            # 3 requests x 4 choices on 4 slots: they run one after another for a few seconds.
            futures = start_streams(server, pool, 3)
            server.signal(signal.SIGTERM)
            assert wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 503, timeout=5)
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
            try:
                client.completions.create(model=None, prompt="too late", max_tokens=2)
                raise AssertionError("a new request during the drain must be refused")
            except openai.APIStatusError as e:
                assert e.status_code == 503 and e.response.headers["retry-after"] == "1"
                assert e.code == "draining"
            assert httpx.get(f"{server.url}/health").status_code == 200
            results = [f.result(timeout=120) for f in futures]
        assert results == [["length"] * 4] * 3
        assert server.wait(timeout=60) == 0
        assert "draining 3 request(s)" in server.log()
    finally:
        server.stop()


def test_drain_timeout_aborts_what_is_left_and_exits_0(tiny_artifact, tmp_path):
    server = ServerProcess(tiny_artifact, tmp_path, "--drain-timeout", "0.5").wait_ready()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = start_streams(server, pool, 4)
            server.signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        assert any("abort" in reasons for reasons in results)
        assert server.wait(timeout=60) == 0
        assert "drain timeout: aborting" in server.log()
    finally:
        server.stop()
