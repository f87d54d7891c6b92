"""The official openai client against a real `python -m server` process serving tiny_artifact.

One server for the module (started with --api-key and --log-format json). The tiny model has
random weights, so tests use ignore_eos where they need exact token counts.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from server_harness import API_KEY, ServerProcess, wait_until

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Write a haiku about kilns."}]


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    proc = ServerProcess(tiny_artifact, tmp_path_factory.mktemp("server_e2e"), "--api-key", API_KEY,
                         "--served-model-name", "tiny", "--log-format", "json")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_completion_and_chat(client, smollm2_tokenizer):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.model == "tiny" and out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.prompt_tokens == len(smollm2_tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 8
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(chat_prompt_ids(smollm2_tokenizer, CHAT))
    assert chat.usage.completion_tokens == 6


def test_stream_concatenation_equals_non_stream_for_the_same_seed(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, n=2, temperature=0.9, seed=1234,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    texts: dict[int, str] = {}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in full.choices}
    assert full.choices[0].text != full.choices[1].text          # choice i uses seed + i
    assert chunks[-1].usage == full.usage and full.usage.completion_tokens == 24

    chat_kwargs = dict(model="tiny", messages=CHAT, max_tokens=10, temperature=0.9, seed=99,
                       extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(**chat_kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **chat_kwargs)
                       if c.choices)
    assert streamed == chat.choices[0].message.content


def test_seed_reproduces_and_differs(client):
    def run(seed):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_truncates_and_reports_stop(client):
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 3]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and out.text == base[:base.index(stop)]
    assert out.model_extra["stop_reason"] == stop


def test_logprobs_and_usage_count_every_generated_token(client, smollm2_tokenizer):
    out = client.completions.create(model="tiny", prompt=[PROMPT, "Hello"], max_tokens=5, n=2, logprobs=2,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == len(smollm2_tokenizer.encode(PROMPT)) + len(smollm2_tokenizer.encode("Hello"))
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices) == 20
    for c in out.choices:
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in c.logprobs.top_logprobs)
        assert "".join(c.logprobs.tokens) == c.text
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3,
                                          temperature=0, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 4
    assert all(len(t.top_logprobs) == 3 for t in content)
    # greedy: the sampled token is the most likely one (raw logprobs)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4) for t in content)


def test_tokenize_agrees_with_usage(http, client):
    tokens = http.post("/tokenize", json={"messages": CHAT}).json()
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    assert tokens["count"] == chat.usage.prompt_tokens and tokens["max_model_len"] == 128
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"].endswith("assistant\n")


def test_errors_are_the_sdk_exception_types(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=" word" * 200, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and "128" in e.value.message
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, response_format=bad_schema)
    assert e.value.param == "response_format" and "not" in e.value.message
    # unknown fields are ignored, and named in the log (vLLM's behaviour; --strict-request-fields: 400)
    client.completions.create(model="tiny", prompt="x", max_tokens=1, extra_body={"tempurature": 0.5})
    assert wait_until(lambda: "tempurature" in server.log())
    for path in ("/health", "/ready", "/metrics", "/version"):
        assert httpx.get(server.url + path).status_code == 200


def test_metrics_counters_move_by_exactly_the_requests(server, client, smollm2_tokenizer):
    before = server.metrics()
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, n=2, extra_body={"ignore_eos": True})
    list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, stream=True,
                                        extra_body={"ignore_eos": True}))
    expected_prompt = len(smollm2_tokenizer.encode(PROMPT)) + len(chat_prompt_ids(smollm2_tokenizer, CHAT))
    after = wait_until(lambda: (m := server.metrics()).get("kiln:request_success_total", finished_reason="length")
                       - before.get("kiln:request_success_total", finished_reason="length") == 2 and m)
    assert after, "both requests should be counted"

    def delta(name, **labels):
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("kiln:prompt_tokens_total") == expected_prompt
    assert delta("kiln:generation_tokens_total") == 5 * 2 + 3
    assert delta("kiln:time_to_first_token_seconds_count") == 2
    assert delta("kiln:e2e_request_latency_seconds_count") == 2
    assert delta("kiln:request_queue_time_seconds_count") == 2
    assert delta("kiln:request_prompt_tokens_sum") == expected_prompt
    assert delta("kiln:request_generation_tokens_sum") == 13
    assert delta("kiln:inter_token_latency_seconds_count") == (5 - 1) * 2 + (3 - 1)
    assert after.get("kiln:num_requests_running") == 0 and after.get("kiln:num_requests_waiting") == 0
    documented = (server_docs_metric_names())
    exported = {fam.name for fam in after.families}
    assert documented <= exported | {n.removesuffix("_total") for n in exported}, documented - exported


def test_a_resent_chat_history_reports_cached_tokens_and_prefix_cache_metrics(server, client, smollm2_tokenizer):
    """Turn 2 resends turn 1 (system, user, the reply): the cache supplies at least turn 1's prompt, usage says
    how much (prompt_tokens_details.cached_tokens, as OpenAI and vLLM report it) and the counters agree."""
    system = {"role": "system", "content": "You are a terse assistant who answers about pottery kilns. " * 3}
    history = [system, {"role": "user", "content": "What is a kiln?"}]
    before = server.metrics()
    first = client.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And a glaze?"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=history, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    usage = [c.usage for c in chunks if c.usage is not None][-1]
    turn1_prompt = len(chat_prompt_ids(smollm2_tokenizer, history[:2]))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert turn1_prompt <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    after = wait_until(lambda: (m := server.metrics()).get("kiln:prefix_cache_hits_total")
                       - before.get("kiln:prefix_cache_hits_total") > 0 and m)
    assert after, "the hit should be counted"
    assert (after.get("kiln:prefix_cache_hits_total") - before.get("kiln:prefix_cache_hits_total")
            == usage.prompt_tokens_details.cached_tokens)
    assert (after.get("kiln:prefix_cache_queries_total") - before.get("kiln:prefix_cache_queries_total")
            == first.usage.prompt_tokens + usage.prompt_tokens)
    assert after.get("kiln:prefix_cache_rows") >= 1 and after.get("kiln:prefix_cache_tokens") >= turn1_prompt


def server_docs_metric_names() -> set[str]:
    from server_harness import REPO_ROOT
    import re
    text = (REPO_ROOT / "docs" / "metrics.md").read_text()
    return {m.removesuffix("_total") for m in re.findall(r"^\| `(kiln:[a-z_]+)`", text, re.M)}


def test_client_disconnect_mid_stream_aborts_and_frees_the_slot(server, http):
    before = server.metrics()
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 120,
                                                      "stream": True, "ignore_eos": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break                                  # one token received; hang up
    closed = time.monotonic()
    aborted = wait_until(lambda: server.metrics().get("kiln:request_success_total", finished_reason="abort")
                         == before.get("kiln:request_success_total", finished_reason="abort") + 1, timeout=10)
    assert aborted, "the disconnected request should finish as aborted"
    assert time.monotonic() - closed < 5
    after = server.metrics()
    assert after.get("kiln:num_requests_running") == 0
    generated = after.get("kiln:generation_tokens_total") - before.get("kiln:generation_tokens_total")
    assert generated < 120


def test_non_streaming_client_timeout_aborts_its_request(server):
    before = server.metrics()
    with pytest.raises(httpx.ReadTimeout):
        # (the tiny model makes 120 steps of 4 rows in ~0.2 s: the read timeout must be well below that)
        httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(5.0, read=0.03),
                   json={"prompt": PROMPT, "max_tokens": 120, "n": 4, "ignore_eos": True})
    aborted = wait_until(lambda: server.metrics().get("kiln:request_success_total", finished_reason="abort")
                         == before.get("kiln:request_success_total", finished_reason="abort") + 1, timeout=10)
    assert aborted
    after = server.metrics()
    assert after.get("kiln:num_requests_running") == 0
    assert after.get("kiln:generation_tokens_total") - before.get("kiln:generation_tokens_total") < 4 * 120


def test_malformed_burst_leaves_the_server_healthy(server, client):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    json_type = {**auth, "content-type": "application/json"}
    bad = [
        ("POST", "/v1/completions", dict(content=b'{"prompt": ', headers=json_type)),
        ("POST", "/v1/completions", dict(content=b"\x00\xff" * 50, headers=json_type)),
        ("POST", "/v1/completions", dict(json={"prompt": {"nested": True}}, headers=auth)),
        ("POST", "/v1/completions", dict(json={"prompt": "x", "n": "two"}, headers=auth)),
        ("POST", "/v1/chat/completions", dict(json={"messages": [{"role": "wizard", "content": 1}]}, headers=auth)),
        ("POST", "/v1/chat/completions", dict(json={"messages": CHAT, "model": "other"}, headers=auth)),
        ("POST", "/v1/completions", dict(content=b"[" * 100_000, headers=json_type)),
        ("POST", "/v1/completions", dict(content=b" " * (5 << 20), headers=json_type)),
        ("POST", "/v1/completions", dict(json={"prompt": "x"})),                       # no key
        ("GET", "/v1/completions", dict(headers=auth)),
        ("POST", "/tokenize", dict(json={"prompt": 1}, headers=auth)),
    ]

    def fire(i):
        method, path, kwargs = bad[i % len(bad)]
        return httpx.request(method, server.url + path, timeout=30, **kwargs).status_code

    def good():
        chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, stream=True,
                                                extra_body={"ignore_eos": True}, stream_options={"include_usage": True}))
        return chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        good_result = pool.submit(good)
        statuses = list(pool.map(fire, range(4 * len(bad))))
        assert good_result.result(timeout=60) == 20
    assert all(400 <= s < 500 for s in statuses), statuses
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.proc.poll() is None


def test_json_request_log_lines(server, http):
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True},
              headers={"X-Request-Id": "e2e-log-1"})
    assert http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "e2e-log-1"}).headers[
        "x-request-id"] == "e2e-log-1"

    def line():
        for raw in server.log().splitlines():
            if raw.startswith("{") and '"e2e-log-1"' in raw:
                return json.loads(raw)
    record = wait_until(line, timeout=5)
    assert record["logger"] == "kiln.request" and record["status"] == 200
    assert record["prompt_tokens"] == 1 and record["output_tokens"] == 2 and record["finish_reason"] == "length"
    assert record["ttft_s"] >= 0 and record["total_s"] >= record["ttft_s"]


def test_default_token_budget_is_timed_at_start_up(server):
    # the tiny model prefills its largest bucket (64) in milliseconds: the untimed default, timed and logged
    messages = [json.loads(raw)["message"] for raw in server.log().splitlines() if raw.startswith("{")]
    timed = [m for m in messages if m.startswith("max_num_batched_tokens=")]
    assert len(timed) == 1 and timed[0].startswith("max_num_batched_tokens=64: the largest prefill bucket"), timed
    assert "16 tokens" in timed[0] and "64 tokens" in timed[0]
