"""The HTTP layer against FakeEngine (no model): shapes, SSE framing, errors, auth, limits, logs.

The official openai client talks to the ASGI app through Starlette's TestClient.
"""
from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest

from server.api.lifecycle import ServerState
from server.api.serving import Generation, ServingOptions
from server.engine.types import EngineDeadError, SamplingParams
from app_harness import MAX_MODEL_LEN, MODEL, Harness
from server_fakes import FakeEngine
from server_harness import Scrape


@pytest.fixture
def h(make_harness) -> Harness:
    return make_harness()


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


# ---- happy paths -------------------------------------------------------------------------------

def test_models_version_health_ready(h):
    models = h.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    assert h.http.get("/version").json()["version"]
    assert h.http.get("/health").json() == {"status": "ok"}
    assert h.http.get("/ready").json() == {"status": "ready"}


def test_completion_n2_text_and_usage(h):
    out = h.client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, n=2)
    prompt = h.ids("Hello world")
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [h.engine.expected_text(prompt, i, 5) for i in range(2)]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt), 10, len(prompt) + 10)
    assert out.model == MODEL and out.id.startswith("cmpl-") and out.object == "text_completion"


def test_completion_several_prompts_index_as_prompt_times_n_plus_choice(h):
    texts = ["first prompt", "the second one"]
    out = h.client.completions.create(model=MODEL, prompt=texts, max_tokens=3, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert c.text == h.engine.expected_text(h.ids(texts[c.index // 2]), c.index % 2, 3)
    assert out.usage.prompt_tokens == sum(len(h.ids(t)) for t in texts)
    assert out.usage.completion_tokens == 12
    assert sorted(h.engine.requests) == sorted(f"{out.id}-{i}" for i in range(2))


def test_completion_token_id_prompts(h):
    ids = h.ids("token ids in")
    single = h.client.completions.create(model=MODEL, prompt=ids, max_tokens=2)
    assert single.choices[0].text == h.engine.expected_text(ids, 0, 2)
    batch = h.client.completions.create(model=MODEL, prompt=[ids, ids[:1]], max_tokens=2)
    assert [c.text for c in batch.choices] == [h.engine.expected_text(p, 0, 2) for p in (ids, ids[:1])]
    assert batch.usage.prompt_tokens == len(ids) + 1


def test_completion_stream_concatenates_to_non_stream_and_reports_usage(h):
    kwargs = dict(model=MODEL, prompt=["one", "two"], max_tokens=4, n=2, seed=3)
    full = h.client.completions.create(**kwargs)
    chunks = list(h.client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: "length" for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_stream_is_sse_ending_in_done(h):
    response = h.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])
    assert "usage" not in response.text or json.loads(events[-2]).get("usage") is None


def test_chat_completion_and_stream(h):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    full = h.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2)
    prompt = h.chat_ids(messages)
    assert [c.message.content for c in full.choices] == [h.engine.expected_text(prompt, i, 4) for i in range(2)]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in full.choices)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(prompt), 8)

    stream = list(h.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2, stream=True,
                                                    stream_options={"include_usage": True}))
    # each choice's first chunk carries the role together with its first token (vLLM's order):
    # a chunk before the first token would make clients time TTFT at the request's acceptance
    content: dict[int, str] = {}
    for chunk in stream[:-1]:
        for c in chunk.choices:
            assert (c.delta.role == "assistant") == (c.index not in content)
            assert c.delta.content
            content[c.index] = content.get(c.index, "") + c.delta.content
    assert content == {c.index: c.message.content for c in full.choices}
    assert stream[-1].usage == full.usage and stream[-1].choices == []


def test_chat_content_parts_and_developer_role(h):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "again"}]
    out = h.client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be kind."}, {"role": "user", "content": parts}],
        max_tokens=1)
    expected = h.chat_ids([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello\nagain"}])
    assert out.usage.prompt_tokens == len(expected)


def test_sampling_fields_reach_the_engine(h):
    h.client.completions.create(
        model=MODEL, prompt="x", max_tokens=3, temperature=0.5, top_p=0.9, seed=11, stop=["\n", "END"],
        presence_penalty=0.5, frequency_penalty=-0.5, user="u1",
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 1, "ignore_eos": True,
                    "stop_token_ids": [7], "include_stop_str_in_output": True})
    (_, params), = h.engine.requests.values()
    assert params == SamplingParams(
        n=1, max_tokens=3, min_tokens=1, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=11, stop=("\n", "END"), stop_token_ids=(7,),
        ignore_eos=True, logprobs=None, include_stop_str_in_output=True)


def test_chat_max_completion_tokens_and_default_max_tokens(h):
    messages = [{"role": "user", "content": "x"}]
    h.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=2, max_tokens=9)
    h.client.chat.completions.create(model=MODEL, messages=messages)
    first, second = (p for _, p in h.engine.requests.values())
    assert first.max_tokens == 2 and second.max_tokens is None     # chat: until the context is full


def test_completion_logprobs_shape(h):
    out = h.client.completions.create(model=MODEL, prompt="x", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.token_logprobs == [-0.25] * 3
    assert all(len(top) in (2, 3) and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_logprobs_shape_and_stream(h):
    messages = [{"role": "user", "content": "x"}]
    out = h.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, logprobs=True,
                                           top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] and "".join(c.token for c in content) == out.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    chunks = list(h.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, logprobs=True,
                                                    top_logprobs=2, stream=True))
    streamed = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert [t.token for t in streamed] == [c.token for c in content]
    no_lp = h.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert no_lp.choices[0].logprobs is None


def test_echo_prepends_the_prompt(h):
    out = h.client.completions.create(model=MODEL, prompt="Echo me", max_tokens=2, echo=True)
    assert out.choices[0].text == "Echo me" + h.engine.expected_text(h.ids("Echo me"), 0, 2)
    chunks = list(h.client.completions.create(model=MODEL, prompt="Echo me", max_tokens=2, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_explicit_nulls_mean_defaults(h):
    body = {"prompt": "x", "max_tokens": None, "temperature": None, "top_p": None, "n": None, "stop": None,
            "presence_penalty": None, "seed": None, "logprobs": None, "stream": None, "user": None}
    out = h.http.post("/v1/completions", json=body)
    assert out.status_code == 200, out.text
    (_, params), = h.engine.requests.values()
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.n == 1
    assert h.http.post("/v1/completions", json={"prompt": None}).json()["error"]["param"] == "prompt"


def test_unknown_fields_are_ignored_with_a_warning_or_400_when_strict(make_harness, caplog):
    h = make_harness()
    body = {"prompt": "x", "max_tokens": 2, "foo": 1, "vendor_extra": {"a": 1}}
    with caplog.at_level(logging.WARNING, logger="server.api.serving"):
        assert h.http.post("/v1/completions", json=body).status_code == 200
    assert "foo, vendor_extra" in caplog.text
    chat = {"messages": [{"role": "user", "content": "x", "cache_control": {"type": "ephemeral"}}], "max_tokens": 1}
    assert h.http.post("/v1/chat/completions", json=chat).status_code == 200
    strict = make_harness(options=ServingOptions(strict_request_fields=True))
    error = strict.http.post("/v1/completions", json=body).json()["error"]
    assert (error["param"], error["code"]) == ("foo", "unrecognized_argument")
    error = strict.http.post("/v1/chat/completions", json=chat).json()["error"]
    assert error["param"] == "messages[0].cache_control"
    assert not strict.engine.requests


def test_harmless_openai_fields_are_accepted(h):
    h.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1, tools=[], tool_choice="none",
        response_format={"type": "text"}, logit_bias={}, store=False, metadata={"a": "b"}, modalities=["text"],
        parallel_tool_calls=False, service_tier="auto")


# ---- errors ----------------------------------------------------------------------------------

def error_of(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_unknown_model_is_404(h):
    with pytest.raises(openai.NotFoundError) as e:
        h.client.completions.create(model="nope", prompt="x")
    assert error_of(e.value) == {"message": "The model `nope` does not exist.", "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(n=5), "n"),                              # more choices than KV slots (engine's check)
    (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(extra_body={"top_k": -2}), "top_k"),
    (dict(extra_body={"min_tokens": 9}), "min_tokens"),
    (dict(echo=True, logprobs=1), "echo"),
    (dict(best_of=3), "best_of"),
    (dict(suffix="tail"), "suffix"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 101.0}), "logit_bias"),
    (dict(logit_bias={"999999999": 1.0}), "logit_bias"),
    (dict(extra_body={"guided_regex": "[a-"}), "guided_regex"),
    (dict(extra_body={"guided_json": {"type": "object"}, "guided_regex": "a"}), "guided_regex"),
    (dict(extra_body={"structured_outputs": {"json": {"type": "nope"}}}), "structured_outputs"),
    (dict(extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}}), "response_format"),
])
def test_invalid_completion_fields_are_400_naming_the_field(h, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        h.client.completions.create(model=MODEL, prompt="x", max_tokens=8, **kwargs)
    error = error_of(e.value)
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert not h.engine.requests


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(tool_choice={"type": "function", "function": {"name": "g"}},
          tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}] * 2), "tools"),
    (dict(tool_choice="required", response_format={"type": "json_object"},
          tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice"),
    (dict(tool_choice="required", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "wrong"}}}}}]), "tools"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "not json"}}]}]), "messages[0].tool_calls"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}]), "messages[0].tool_calls"),
    (dict(extra_body={"chat_template_kwargs": {"tools": []}}), "chat_template_kwargs"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
     "messages[0].content"),
    (dict(messages=[]), "messages"),
])
def test_unsupported_chat_fields_are_400(h, kwargs, param):
    kwargs.setdefault("messages", [{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        h.client.chat.completions.create(model=MODEL, max_tokens=2, **kwargs)
    assert error_of(e.value)["param"] == param


def test_prompt_longer_than_context_is_400_with_both_lengths(h):
    prompt = " word" * 80
    num = len(h.ids(prompt))
    with pytest.raises(openai.BadRequestError) as e:
        h.client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    error = error_of(e.value)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(MAX_MODEL_LEN) in error["message"] and str(num) in error["message"]
    with pytest.raises(openai.BadRequestError) as e:
        h.client.completions.create(model=MODEL, prompt="x", max_tokens=MAX_MODEL_LEN)
    assert error_of(e.value)["param"] == "max_tokens"
    assert f"{MAX_MODEL_LEN + 1} tokens" in error_of(e.value)["message"]


def test_out_of_vocabulary_token_ids_are_400(h):
    with pytest.raises(openai.BadRequestError) as e:
        h.client.completions.create(model=MODEL, prompt=[1, 10**9], max_tokens=1)
    assert error_of(e.value)["param"] == "prompt"


def test_queue_full_is_429_with_retry_after_and_counted(h):
    h.engine.queue_full = True
    with pytest.raises(openai.RateLimitError) as e:
        h.client.completions.create(model=MODEL, prompt="x")
    assert e.value.response.headers["retry-after"] == "1"
    assert error_of(e.value)["code"] == "queue_full"
    assert Scrape(h.http.get("/metrics").text).get("kiln:num_requests_rejected_total", reason="queue_full") == 1


def test_draining_is_503_and_not_ready(h):
    h.app.state.server.draining = True
    with pytest.raises(openai.InternalServerError) as e:
        h.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    assert h.http.get("/ready").status_code == 503
    assert h.http.get("/health").status_code == 200
    assert Scrape(h.http.get("/metrics").text).get("kiln:num_requests_rejected_total", reason="draining") == 1


def test_engine_crash_is_500_without_details(h):
    h.engine.fail_add = RuntimeError("secret internals")
    response = h.http.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.json()["error"]["type"] == "server_error"
    assert response.headers["x-request-id"]


def test_dead_engine_is_503(h):
    h.engine.fail_add = EngineDeadError("the engine loop failed")
    assert h.http.post("/v1/completions", json={"prompt": "x"}).status_code == 503
    h.engine.fail_add = None
    h.engine.fail_stream = EngineDeadError("the engine loop failed")
    response = h.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
    assert h.app.state.server.num_inflight == 0


def test_engine_failure_mid_stream_is_reported_in_band(h):
    h.engine.fail_stream = RuntimeError("boom")
    response = h.http.post("/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 4})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"


def test_malformed_requests_get_openai_errors(h):
    post = h.http.post
    cases = [
        (post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"}), 400),
        (post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400),
        (post("/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}), 400),
        (post("/v1/completions", content=b"\xff\xfe garbage", headers={"content-type": "application/json"}), 400),
        (post("/v1/chat/completions", json={"messages": "hello"}), 400),
        (post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400),
        (post("/v1/completions", content=b"{}" + b" " * (5 << 20), headers={"content-type": "application/json"}), 413),
        (h.http.get("/v1/nothing-here"), 404),
        (h.http.delete("/v1/models"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Content-Type" in cases[2][0].json()["error"]["message"]
    assert not h.engine.requests
    assert h.http.get("/health").status_code == 200


def test_chunked_body_over_the_limit_is_413(h):
    def body():
        for _ in range(5):
            yield b" " * (1 << 20)
    response = h.http.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413


# ---- auth, CORS, request ids, logs ----------------------------------------------------------------

def test_api_key_guards_v1_and_tokenize_only(make_harness):
    h = make_harness(api_key="sekret")
    assert h.client.models.list().data
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path in ("/v1/models", "/v1/completions", "/tokenize", "/detokenize"):
            response = h.http.request("GET" if path == "/v1/models" else "POST", path, headers=headers, json={})
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=h.http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x")
    for path in ("/health", "/ready", "/metrics", "/version"):
        assert h.http.get(path).status_code == 200, path
    preflight = h.http.options("/v1/completions", headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"


def test_cors_origins_are_configurable(make_harness):
    h = make_harness(allowed_origins=("https://ok.example",))
    ok = h.http.get("/v1/models", headers={"Origin": "https://ok.example"})
    other = h.http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert ok.headers["access-control-allow-origin"] == "https://ok.example"
    assert "access-control-allow-origin" not in other.headers


def test_request_id_is_echoed_or_generated(h):
    given = h.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "abc-1"})
    assert given.headers["x-request-id"] == "abc-1"
    generated = h.http.get("/v1/models")
    assert len(generated.headers["x-request-id"]) == 32
    error = h.http.post("/v1/completions", json={"prompt": "x", "model": "nope"}, headers={"X-Request-Id": "e-2"})
    assert error.headers["x-request-id"] == "e-2"
    unsafe = h.http.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


def test_one_structured_log_line_per_request(h, caplog):
    caplog.set_level(logging.INFO, logger="kiln.request")
    h.http.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 3, "n": 2},
                headers={"X-Request-Id": "log-1"})
    h.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                              "stream": True}, headers={"X-Request-Id": "log-2"})
    h.http.post("/v1/completions", json={"prompt": "x", "model": "nope"}, headers={"X-Request-Id": "log-3"})
    h.http.get("/health")
    lines = [r.fields for r in caplog.records if r.name == "kiln.request"]
    assert [line["request_id"] for line in lines] == ["log-1", "log-2", "log-3"]
    first, second, third = lines
    assert first["status"] == 200 and first["prompt_tokens"] == len(h.ids("Hello world"))
    assert first["output_tokens"] == 6 and first["finish_reason"] == "length" and first["ttft_s"] >= 0
    assert first["total_s"] >= first["ttft_s"]
    assert second["stream"] is True and second["output_tokens"] == 2
    assert third["status"] == 404 and third["error"] == "model_not_found"


# ---- tokenize / detokenize ---------------------------------------------------------------------

def test_tokenize_and_detokenize(h):
    ids = h.ids("Hello world")
    out = h.http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert out["tokens"] == ids and out["count"] == len(ids) and out["max_model_len"] == MAX_MODEL_LEN
    assert out["token_strs"] == h.tokenizer.convert_ids_to_tokens(ids)
    messages = [{"role": "user", "content": "Hi"}]
    chat = h.http.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == h.chat_ids(messages)
    assert h.http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    assert h.http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert h.http.post("/tokenize", json={"prompt": "x", "messages": messages}).status_code == 400
    assert h.http.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404


# ---- abort bookkeeping --------------------------------------------------------------------------

def test_generation_close_aborts_only_unfinished_requests(smollm2_tokenizer):
    async def run():
        engine, state = FakeEngine(smollm2_tokenizer), ServerState()
        generation = Generation(engine, state)
        generation.add("r-0", [1, 2], SamplingParams(max_tokens=1))
        generation.add("r-1", [3], SamplingParams(max_tokens=50))
        seen = []
        async for i, out in generation.outputs():
            seen.append((i, out.finished))
            if out.finished:      # r-0 is done; r-1 still runs
                break
        assert state.num_inflight == 1
        generation.close()
        generation.close()
        return engine.aborted, state.num_inflight

    aborted, inflight = asyncio.run(run())
    assert aborted == ["r-1"] and inflight == 0


def test_abort_all_ends_streams_with_abort(h):
    h.engine.hold = True

    async def scenario():
        transport = httpx.ASGITransport(app=h.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 50}))
            while not h.engine.requests:
                await asyncio.sleep(0.01)
            assert h.app.state.server.abort_all() == 1
            h.engine.release()
            return (await task).json()

    body = asyncio.run(scenario())
    assert body["choices"][0]["finish_reason"] == "abort"
