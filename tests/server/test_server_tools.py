"""Tool calling and structured outputs at the HTTP layer (FakeEngine replays scripted output).

What the engine is asked for (the constraint, the prompt) and how output text becomes tool calls,
in full responses and in streamed deltas, with the official openai client. That the constraint is
enforced while decoding is tested against the real engine (tests/engine/test_structured_outputs.py,
tests/server/test_structured_e2e.py).
"""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from app_harness import MODEL
from server.api.serving import ServingOptions
from server.api.tool_parsers import required_calls_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def h(make_harness):
    harness = make_harness(max_model_len=2048)
    harness.engine.default_max_tokens = 200     # chat's max_tokens defaults to "until the end"
    return harness


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def prompt_text(h) -> str:
    (ids, _), = h.engine.requests.values()
    return h.tokenizer.decode(ids)


def reassemble(stream) -> tuple[str, dict[int, dict], list]:
    """Content, tool calls by index (OpenAI's delta merge), and finish reasons of choice 0."""
    content, calls, finishes = "", {}, []
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    return content, calls, finishes


def test_auto_tool_call_is_parsed_in_full_and_streamed_responses(h):
    h.engine.script = pieces('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                             '</tool_call>')
    out = h.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], max_tokens=200)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,), = [choice.message.tool_calls]
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    # the model's template has no tool section: the hermes fallback put the tools in the system turn
    assert "<tools>" in prompt_text(h) and '"get_weather"' in prompt_text(h)
    assert h.engine.requests.popitem()[1][1].structured_outputs is None    # auto: not constrained

    content, calls, finishes = reassemble(h.client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], max_tokens=200, stream=True))
    assert content == "Let me check." and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]


def test_auto_without_a_call_is_plain_content(h):
    h.engine.script = pieces("It is sunny in Paris.")
    out = h.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], max_tokens=50)
    assert out.choices[0].message.content == "It is sunny in Paris." and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


def test_named_tool_choice_constrains_to_the_function_schema(h):
    h.engine.script = pieces('{"city": "Oslo", "unit": "c"}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = h.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice=named)
    (_, params), = h.engine.requests.values()
    assert json.loads(params.structured_outputs.json) == WEATHER["function"]["parameters"]
    (call,) = out.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo", "unit": "c"})
    assert out.choices[0].finish_reason == "tool_calls"

    chunks = list(h.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                                   tool_choice=named, stream=True))
    content, calls, finishes = reassemble(chunks)
    assert content == "" and finishes == ["tool_calls"]
    assert calls == {0: {"id": calls[0]["id"], "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}
    # the arguments stream as they are generated: more than one chunk carries them
    assert sum(1 for c in chunks for ch in c.choices if ch.delta.tool_calls) > 2


def test_required_tool_choice_constrains_to_an_array_of_calls(h):
    h.engine.script = pieces('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", '
                             '"parameters": {"city": "Rome"}}]')
    out = h.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False)
    (_, params), = h.engine.requests.values()
    assert json.loads(params.structured_outputs.json) == required_calls_schema([WEATHER, TIME], parallel=False)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in out.choices[0].message.tool_calls] == [
        ("get_time", {}), ("get_weather", {"city": "Rome"})]
    content, calls, finishes = reassemble(h.client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice="required", stream=True))
    assert [c["name"] for c in calls.values()] == ["get_time", "get_weather"] and finishes == ["tool_calls"]
    assert len({c["id"] for c in calls.values()}) == 2


def test_a_cut_short_required_array_comes_back_as_content(h):
    h.engine.script = pieces('[{"name": "get_time", "param')     # ends without closing the array
    out = h.client.chat.completions.create(model=MODEL, messages=USER, tools=[TIME], tool_choice="required")
    assert out.choices[0].message.content == '[{"name": "get_time", "param' and not out.choices[0].message.tool_calls
    content, calls, _ = reassemble(h.client.chat.completions.create(
        model=MODEL, messages=USER, tools=[TIME], tool_choice="required", stream=True))
    assert content == '[{"name": "get_time", "param' and not calls


def test_tool_results_and_earlier_calls_reach_the_prompt(h):
    h.engine.script = pieces("It is 21 C in Paris.")
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    out = h.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert out.choices[0].message.content == "It is 21 C in Paris."
    text = prompt_text(h)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text


def test_templates_with_a_tool_section_get_the_tools(h):
    original = h.tokenizer.chat_template   # the session tokenizer is shared: restored after
    h.tokenizer.chat_template = ("{% for t in tools or [] %}TOOL:{{ t.function.name }}\n{% endfor %}"
                                 "{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                                 "{% for c in m.tool_calls or [] %}CALL:{{ c.function.arguments.city }}\n{% endfor %}"
                                 "{% endfor %}")
    try:
        from server.api.chat_template import ChatRenderer
        h.app.state.chat.chat_renderer = ChatRenderer(h.tokenizer, h.app.state.chat.tool_parser)
        messages = USER + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Lyon"}'}}]}, {"role": "tool", "content": "7", "tool_call_id": "c"}]
        h.engine.script = ["ok"]
        h.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME])
        text = prompt_text(h)
        assert text.startswith("TOOL:get_weather\nTOOL:get_time\nuser: Weather in Paris?") and "CALL:Lyon" in text
        assert "<tools>" not in text and "tool: 7" in text
    finally:
        h.tokenizer.chat_template = original


def test_tool_choice_none_leaves_tools_out_and_auto_can_be_switched_off(h, make_harness):
    h.engine.script = ["hi"]
    h.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none")
    assert "get_weather" not in prompt_text(h)
    off = make_harness(max_model_len=2048, options=ServingOptions(enable_auto_tool_choice=False))
    with pytest.raises(openai.BadRequestError) as e:
        off.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    assert e.value.response.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in e.value.response.json()["error"]["message"]
    off.engine.script = ['{"city": "Nice"}']
    out = off.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="required")
    assert out.choices[0].message.content == '{"city": "Nice"}'    # not an array: content, as the text was


class Person(BaseModel):
    name: str
    age: int


def test_openai_parse_with_a_pydantic_model(h):
    h.engine.script = pieces('{"name": "Ada", "age": 36}')
    out = h.client.chat.completions.parse(model=MODEL, messages=USER, response_format=Person)
    assert out.choices[0].message.parsed == Person(name="Ada", age=36)
    (_, params), = h.engine.requests.values()
    schema = json.loads(params.structured_outputs.json)
    assert schema["required"] == ["name", "age"] and schema["additionalProperties"] is False
    assert h.metrics.structured_output_requests.labels(MODEL, "json")._value.get() == 1


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"guided_regex": r"\d+"}, {"regex": r"\d+"}),
    ({"guided_choice": ["yes", "no"]}, {"choice": ("yes", "no")}),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, {"grammar": 'root ::= "a" | "b"'}),
    ({"structured_outputs": {"json": '{"type": "integer"}'}}, {"json": '{"type": "integer"}'}),
    ({"guided_json": {"type": "array", "items": {"type": "string"}}},
     {"json": '{"type": "array", "items": {"type": "string"}}'}),
])
def test_every_structured_output_field_reaches_the_engine(h, body, expected):
    for endpoint, extra in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": USER})):
        response = h.http.post(endpoint, json={**extra, **body, "max_tokens": 4})
        assert response.status_code == 200, response.text
        _, (_, params) = h.engine.requests.popitem()
        spec = params.structured_outputs
        assert {k: getattr(spec, k) for k in expected} == expected


def test_request_fields_real_clients_send(h):
    h.engine.script = ["ok"]
    body = {"messages": USER, "logit_bias": {"42": -100, "7": 5.5}, "skip_special_tokens": False,
            "spaces_between_special_tokens": False, "chat_template_kwargs": {"enable_thinking": False}}
    assert h.http.post("/v1/chat/completions", json=body).status_code == 200
    (_, params), = h.engine.requests.values()
    assert params.logit_bias == ((42, -100.0), (7, 5.5))
    assert not params.skip_special_tokens and not params.spaces_between_special_tokens


def test_openapi_and_docs_are_served_unless_disabled(h, make_harness):
    schema = h.http.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "ChatCompletionRequest" in schema["components"]["schemas"]
    assert h.http.get("/docs").status_code == 200
    off = make_harness(docs=False)
    assert off.http.get("/openapi.json").status_code == 404 and off.http.get("/docs").status_code == 404


def test_streamed_chat_sends_nothing_but_pings_before_the_first_token(h, monkeypatch):
    """Issue 17: the role goes with the first token, and a long prefill is bridged by SSE comments."""
    monkeypatch.setattr("server.api.serving.SSE_KEEPALIVE_SECONDS", 0.05)
    h.engine.hold = True
    h.engine.script = ["Hel", "lo"]

    async def scenario() -> str:
        transport = httpx.ASGITransport(app=h.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            async def read() -> str:
                async with client.stream("POST", "/v1/chat/completions",
                                         json={"messages": USER, "stream": True}) as response:
                    return "".join([part async for part in response.aiter_text()])
            task = asyncio.create_task(read())
            await asyncio.sleep(0.4)          # "prefill": the engine holds the first token
            h.engine.release()
            return await task

    text = asyncio.run(scenario())
    events = [e for e in text.split("\n\n") if e]
    first_data = next(i for i, e in enumerate(events) if e.startswith("data: "))
    assert first_data >= 3 and all(e == ": ping" for e in events[:first_data])
    first = json.loads(events[first_data][len("data: "):])["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": "Hel"}
