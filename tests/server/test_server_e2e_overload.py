"""Overload: one slot and a waiting queue of one. Excess requests get 429 + Retry-After at once;
every accepted request still completes in full."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from server_harness import ServerProcess

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    proc = ServerProcess(tiny_artifact, tmp_path_factory.mktemp("server_overload"),
                         "--max-num-seqs", "1", "--max-num-queued-reqs", "1")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_queue_full_is_429_and_accepted_requests_complete(server):
    before = server.metrics()

    async def burst():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)

        async def one(i):
            try:
                return await client.completions.create(model=None, prompt=f"request {i}", max_tokens=MAX_TOKENS,
                                                       extra_body={"ignore_eos": True})
            except openai.RateLimitError as e:
                return e
        return await asyncio.gather(*(one(i) for i in range(8)))

    results = asyncio.run(burst())
    done = [r for r in results if not isinstance(r, Exception)]
    rejected = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(done) + len(rejected) == 8
    assert done and rejected
    assert all(r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length" for r in done)
    for e in rejected:
        assert e.status_code == 429 and e.response.headers["retry-after"] == "1"
        assert e.code == "queue_full"
    after = server.metrics()
    assert (after.get("kiln:num_requests_rejected_total", reason="queue_full")
            - before.get("kiln:num_requests_rejected_total", reason="queue_full")) == len(rejected)
    assert (after.get("kiln:request_success_total", finished_reason="length")
            - before.get("kiln:request_success_total", finished_reason="length")) == len(done)
    assert httpx.get(f"{server.url}/health").status_code == 200
    follow_up = httpx.post(f"{server.url}/v1/completions", json={"prompt": "again", "max_tokens": 3}, timeout=60)
    assert follow_up.status_code == 200


def test_n_above_max_num_seqs_is_400(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=None, prompt="x", n=2, max_tokens=2)
    assert e.value.param == "n"


def test_offered_load_above_capacity_loses_nothing(server):
    """loadtest/overload.py's accounting: every offered request completes in full or is refused with
    Retry-After (the figures at 2x the sustainable rate of the default model: docs/benchmarks.md)."""
    from loadtest.overload import offer
    out, _, offered = asyncio.run(offer(server.url, rate=40.0, duration=2.0, max_tokens=16, seed=3))
    assert not out.lost, out.lost
    assert out.completed + sum(out.refused.values()) == offered
    assert out.completed >= 1 and out.refused.get(429, 0) >= 1
