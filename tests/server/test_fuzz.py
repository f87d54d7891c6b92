"""Bad input is a 4xx before any work, never a 5xx (docs/api.md, "Limits and bad input").

(a) In-process (FakeEngine behind Starlette's TestClient): every POST endpoint gets random bytes,
invalid UTF-8, lone surrogates, deep nesting, huge and non-finite numbers, wrong types and huge
arrays, each as one mutation of a valid request (hypothesis, plus deterministic sweeps that also
check the error's `param`). No answer may be >= 500, every error must be an OpenAI error object,
and a stream must not carry a server error in-band.
(b) A real `python -m server` serving tiny_artifact: schemathesis generates requests from its
/openapi.json (valid and invalid ones) and checks `not_a_server_error`; /health stays 200.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server.api import protocol
from server.api.middleware import MAX_BODY_BYTES
from app_harness import MODEL, Harness
from server_harness import ServerProcess

Path = tuple  # ('messages', 0, 'content'): keys and list indices from the body's root

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city"]}}}]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]

# Valid requests (each answers 200: test_valid_bodies_are_accepted), one endpoint each.
BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {
        "model": MODEL, "prompt": "Hello there", "max_tokens": 2, "n": 2, "temperature": 0.7, "top_p": 0.9,
        "stop": ["\n\n", "END"], "seed": 7, "presence_penalty": 0.1, "frequency_penalty": 0.2, "user": "fuzz",
        "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 1, "stop_token_ids": [13],
        "logit_bias": {"42": 1.5}, "logprobs": 2, "metadata": {"k": "v"}, "best_of": 2}),
    ("/v1/completions", {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2, "echo": True, "ignore_eos": True}),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True,
                         "stream_options": {"include_usage": True}, "structured_outputs": {"regex": "[a-z]{1,5}"}}),
    ("/v1/completions", {"prompt": "JSON please", "max_tokens": 2, "guided_json": {
        "type": "object", "properties": {"a": {"type": "number", "minimum": -1.5, "maximum": 9.5}},
        "required": ["a"]}}),
    ("/v1/completions", {"prompt": "Pick", "max_tokens": 1, "guided_choice": ["yes", "no"],
                         "include_stop_str_in_output": True}),
    ("/v1/completions", {"prompt": "Say", "max_tokens": 1, "structured_outputs": {"grammar": 'start: "a" | "b" "c"'},
                         "skip_special_tokens": False}),
    ("/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 2,
        "logprobs": True, "top_logprobs": 2, "stop": "STOP", "chat_template_kwargs": {"enable_thinking": False},
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}}}}}),
    ("/v1/chat/completions", {
        "messages": [{"role": "developer", "content": "Use the tool."}, {"role": "user", "content": "Oslo"}],
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_completion_tokens": 2, "stream": True, "parallel_tool_calls": False}),
    ("/tokenize", {"prompt": "hello world", "add_special_tokens": True, "return_token_strs": True}),
    ("/tokenize", {"messages": MESSAGES, "tools": TOOLS, "add_generation_prompt": True}),
    ("/detokenize", {"tokens": [1, 2, 3], "model": MODEL}),
]
ENDPOINTS = sorted({path for path, _ in BODIES})
MODELS = {"/v1/completions": protocol.CompletionRequest, "/v1/chat/completions": protocol.ChatCompletionRequest,
          "/tokenize": protocol.TokenizeRequest, "/detokenize": protocol.DetokenizeRequest}
BODY_IDS = [f"{path}#{i}" for i, (path, _) in enumerate(BODIES)]

SURROGATES = ["\udcff", "\ud800", "\udfff"]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
HUGE_NUMBERS = [1e308, -1e308, 2**70, -(2**70), 2**64, -(2**63) - 1]
WRONG_TYPES = [None, True, False, 0, -1, 1.5, "", "x", [], {}, [1, "a"], {"a": [None]}]
INVALID_UTF8 = [b"\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]


# ---- helpers ------------------------------------------------------------------------------------

def param_of(path: Path) -> str:
    """The `param` errors.py gives a path: ('messages', 0, 'content') -> 'messages[0].content'."""
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


def nodes(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every value in a JSON document (containers too, the root excluded), with its path."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield path + (key,), item
        yield from nodes(item, path + (key,))


def key_paths(value: Any, path: Path = ()) -> Iterator[Path]:
    """The path of every object key."""
    for p, item in [((), value)] + list(nodes(value)):
        if isinstance(item, dict):
            yield from (path + p + (k,) for k in item)


def replaced(body: Any, path: Path, new: Any) -> Any:
    body = copy.deepcopy(body)
    parent = body
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = new
    return body


def renamed(body: Any, path: Path, new_key: str) -> Any:
    body = copy.deepcopy(body)
    parent = body
    for p in path[:-1]:
        parent = parent[p]
    parent[new_key] = parent.pop(path[-1])
    return body


def encode(body: Any) -> bytes:
    """JSON as Python writes it: lone surrogates as \\u escapes, NaN and Infinity as literals."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


def nested_raw(depth: int) -> bytes:
    """nested(depth) as JSON text (json.dumps itself recurses)."""
    opens = b"".join(b"[" if i % 2 else b'{"a": ' for i in reversed(range(depth)))
    closes = b"".join(b"]" if i % 2 else b"}" for i in range(depth))
    return opens + b"1" + closes


def spliced(body: Any, path: Path, raw: bytes) -> bytes:
    """`body` as JSON text with the value at `path` replaced by the JSON text `raw`."""
    return encode(replaced(body, path, "@@HOLE@@")).replace(b'"@@HOLE@@"', raw)


def post(h: Harness, path: str, raw: bytes):
    return h.http.post(path, content=raw, headers={"content-type": "application/json"})


def check(response, expect_status: int | None = None) -> dict | None:
    """No 5xx; an error is an OpenAI error object (returned); a stream carries no server error."""
    text = response.content.decode("utf-8")         # whatever it is, it is valid UTF-8
    assert response.status_code < 500, (response.status_code, text[:1000])
    if expect_status is not None:
        assert response.status_code == expect_status, (response.status_code, text[:1000])
    if response.status_code < 400:
        assert "server_error" not in text, text[:1000]
        return None
    body = json.loads(text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    return error


@pytest.fixture(scope="module")
def h(smollm2_tokenizer):
    """One app for the module (hypothesis runs many examples per test); a context long enough for
    the tool-fallback system prompt."""
    harness = Harness(smollm2_tokenizer, max_model_len=4096)
    yield harness
    harness.close()


# CI replays the same examples every run (a red CI is a bug, not bad luck); elsewhere each run explores anew.
DERANDOMIZE = bool(os.environ.get("CI"))
FUZZ = settings(deadline=None, database=None, max_examples=150, derandomize=DERANDOMIZE,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


# ---- (a) in-process: deterministic sweeps ------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(BODIES)), ids=BODY_IDS)
def test_valid_bodies_are_accepted(h, index):
    path, body = BODIES[index]
    check(post(h, path, encode(body)), 200)


def test_a_lone_surrogate_was_a_500_and_is_a_400_naming_the_field(h):
    """Issue 16: the tokenizer raised a TypeError on a prompt of "\\udcff"."""
    for path, raw in [("/v1/completions", b'{"prompt": "\\udcff"}'), ("/tokenize", b'{"prompt": "\\udcff"}'),
                      ("/v1/completions", b'{"prompt": "\xed\xb3\xbf"}'),        # the same, UTF-8 encoded
                      ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}')]:
        error = check(post(h, path, raw), 400)
        assert error["code"] == "invalid_unicode" and error["param"] in ("prompt", "messages[0].content"), error


@pytest.mark.parametrize("index", range(len(BODIES)), ids=BODY_IDS)
def test_lone_surrogates_in_any_string_or_key_are_400_naming_it(h, index):
    path, body = BODIES[index]
    strings = [(p, v) for p, v in nodes(body) if isinstance(v, str)] + [(("x_unknown",), "extra")]
    for i, (where, value) in enumerate(strings):
        bad = value[:1] + SURROGATES[i % len(SURROGATES)] + value[1:]
        error = check(post(h, path, encode(replaced(body, where, bad))), 400)
        assert (error["param"], error["code"]) == (param_of(where), "invalid_unicode"), (where, error)
    for where in key_paths(body):
        error = check(post(h, path, encode(renamed(body, where, str(where[-1]) + "\udcff"))), 400)
        assert error["code"] == "invalid_unicode" and error["param"].startswith(param_of(where)), (where, error)


@pytest.mark.parametrize("index", range(len(BODIES)), ids=BODY_IDS)
def test_non_finite_numbers_anywhere_are_400_naming_them(h, index):
    """Python's json reads NaN, Infinity and 1e999 (as inf): any field, any depth."""
    path, body = BODIES[index]
    for i, (where, _) in enumerate(nodes(body)):
        error = check(post(h, path, encode(replaced(body, where, NON_FINITE[i % 3]))), 400)
        assert error["param"] == param_of(where), (where, error)
    raw = encode(body)[:-1] + b', "x_unknown": [1e999]}'
    assert check(post(h, path, raw), 400)["param"] == "x_unknown[0]"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_field_with_an_absurd_number_is_400_naming_it(h, endpoint):
    """Every declared field of the request, even those the valid bodies leave out: NaN, +-Infinity,
    +-1e308 and integers beyond int64 are a 400 whose param is the field; -0.0 is no 5xx."""
    base = next(body for path, body in BODIES if path == endpoint)
    for name, field in MODELS[endpoint].model_fields.items():
        name = field.alias or name
        for value in NON_FINITE + HUGE_NUMBERS:
            error = check(post(h, endpoint, encode({**base, name: value})), 400)
            assert error["param"] == name, (name, value, error)
        check(post(h, endpoint, encode({**base, name: -0.0})))


@pytest.mark.parametrize("index", range(len(BODIES)), ids=BODY_IDS)
def test_wrong_types_in_every_field_are_4xx(h, index):
    """One field of a valid request at a time (containers and leaves, nested ones too)."""
    path, body = BODIES[index]
    for where, value in nodes(body):
        for wrong in WRONG_TYPES:
            if type(wrong) is not type(value):
                check(post(h, path, encode(replaced(body, where, wrong))))


@pytest.mark.parametrize("depth", [protocol.MAX_JSON_DEPTH + 1, 500, 10_000, 100_000])
def test_deep_nesting_is_400(h, depth):
    """Deeper than Python's recursion limit, json fails (RecursionError): 400 invalid_json. Shallower
    but deeper than MAX_JSON_DEPTH: a 400 naming the top-level field."""
    assert json.loads(nested_raw(5)) == nested(5)
    for endpoint in ENDPOINTS:
        check(post(h, endpoint, nested_raw(depth)), 400)
        base = next(body for path, body in BODIES if path == endpoint)
        for name in list(base) + ["x_unknown"]:
            error = check(post(h, endpoint, spliced(base, (name,), nested_raw(depth))), 400)
            assert error["param"] in (name, None), error
            if depth < 900:
                assert error["param"] == name, error
    raw = b'{"prompt": "x", "x_unknown": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"
    check(post(h, "/v1/completions", raw), 400)


def test_a_json_schema_of_64_levels_is_accepted(h):
    schema = {"type": "integer"}
    for _ in range(29):            # 29 levels of objects: the body is 60 containers deep
        schema = {"type": "object", "properties": {"a": schema}}
    check(post(h, "/v1/completions", encode({"prompt": "x", "max_tokens": 1, "guided_json": schema})), 200)


@pytest.mark.parametrize("endpoint, body, param, at_limit", [
    ("/v1/completions", {"prompt": ["a"] * (protocol.MAX_PROMPTS + 1)}, "prompt", None),
    ("/v1/completions", {"prompt": [[1]] * (protocol.MAX_PROMPTS + 1)}, "prompt", None),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * (protocol.MAX_STOP + 1)}, "stop", ["s"] * protocol.MAX_STOP),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [1] * (protocol.MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids",
     [1] * protocol.MAX_STOP_TOKEN_IDS),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(protocol.MAX_LOGIT_BIAS + 1)}},
     "logit_bias", {str(i): 1 for i in range(protocol.MAX_LOGIT_BIAS)}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * (protocol.MAX_MESSAGES + 1)},
     "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * (
        protocol.MAX_CONTENT_PARTS + 1)}]}, "messages[0].content", None),
    ("/v1/chat/completions", {"messages": MESSAGES[:2], "tools": [
        {"type": "function", "function": {"name": f"f{i}"}} for i in range(protocol.MAX_TOOLS + 1)]}, "tools", None),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}] * (protocol.MAX_MESSAGES + 1)}, "messages", None),
])
def test_arrays_over_their_limit_are_400_naming_the_field(h, endpoint, body, param, at_limit):
    error = check(post(h, endpoint, encode(body)), 400)
    assert (error["param"], error["code"]) == (param, "array_above_max_length"), error
    if at_limit is not None:
        check(post(h, endpoint, encode({**body, param: at_limit, "max_tokens": 1})), 200)


def test_bodies_over_the_size_limit_are_413(h):
    for endpoint in ENDPOINTS:
        raw = b'{"prompt": [' + b"1," * (MAX_BODY_BYTES // 2) + b"1]}"
        assert check(post(h, endpoint, raw), 413)["code"] == "request_too_large"


def test_huge_token_ids_are_400_not_an_overflow(h):
    for endpoint, body, param in [
        ("/detokenize", {"tokens": [1, 2**70]}, "tokens"), ("/detokenize", {"tokens": [-(2**70)]}, "tokens"),
        ("/detokenize", {"tokens": [2**63]}, "tokens"), ("/v1/completions", {"prompt": [2**70]}, "prompt"),
        ("/v1/completions", {"prompt": [[1], [2**64]]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [2**70]}, "stop_token_ids[0]"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {str(2**70): 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
        ("/v1/completions", {"prompt": "x", "seed": 2**64 - 1, "n": 2}, "seed"),   # choice 1 would use 2**64
    ]:
        assert check(post(h, endpoint, encode(body)), 400)["param"] == param, body


# ---- (a) in-process: hypothesis ----------------------------------------------------------------------

def _text_with_surrogate():
    return st.builds(lambda a, s, b: a + s + b, st.text(max_size=4),
                     st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=4))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4),
                           max_leaves=12)
HOSTILE = st.one_of(
    _text_with_surrogate(),
    st.sampled_from(NON_FINITE + HUGE_NUMBERS + [-0.0, 5e-324, 2**31, 2**63 - 1, -1]),
    st.integers(min_value=protocol.MAX_JSON_DEPTH - 2, max_value=300).map(nested),   # deeper: test_deep_nesting
    st.sampled_from([[0] * 5000, ["a"] * 5000, [[1]] * 5000, [{"role": "user", "content": "x"}] * 5000]),
    st.sampled_from([{str(i): 1.0 for i in range(5000)}]),
    st.sampled_from(WRONG_TYPES),
    JSON_VALUES,
)


@FUZZ
@given(data=st.data())
def test_fuzz_one_field_of_a_valid_request(h, data):
    path, body = data.draw(st.sampled_from(BODIES), label="body")
    existing = [p for p, _ in nodes(body)]
    where = data.draw(st.sampled_from(existing + [(data.draw(st.text(max_size=8), label="new key"),)]),
                      label="path")
    value = data.draw(HOSTILE, label="value")
    if where in existing and isinstance(where[-1], str) and data.draw(st.booleans(), label="rename the key"):
        mutated = renamed(body, where, data.draw(_text_with_surrogate() | st.text(max_size=6), label="key"))
    else:
        mutated = replaced(body, where, value)
    check(post(h, path, encode(mutated)))


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=256))
def test_fuzz_random_bytes(h, endpoint, raw):
    check(post(h, endpoint, raw))


@FUZZ
@given(data=st.data())
def test_fuzz_invalid_utf8_spliced_into_a_valid_request(h, data):
    path, body = data.draw(st.sampled_from(BODIES), label="body")
    raw = encode(body)
    at = data.draw(st.integers(0, len(raw)), label="at")
    junk = data.draw(st.sampled_from(INVALID_UTF8) | st.binary(min_size=1, max_size=4), label="junk")
    check(post(h, path, raw[:at] + junk + raw[at:]))


@FUZZ
@given(data=st.data())
def test_fuzz_json_text_with_nan_infinity_and_huge_literals(h, data):
    """Literals Python's json reads but JSON has not (or that overflow): spliced over a value."""
    path, body = data.draw(st.sampled_from(BODIES), label="body")
    leaves = [(p, v) for p, v in nodes(body) if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    where, _ = data.draw(st.sampled_from(leaves), label="path")
    literal = data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e308", "9" * 5000,
                                         "-" + "9" * 4000, "1" + "0" * 400 + ".5", "-0.0", "0e-999999"]))
    check(post(h, path, spliced(body, where, literal.encode())))


# ---- (b) a real server: schemathesis against /openapi.json ---------------------------------------

@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    proc = ServerProcess(tiny_artifact, tmp_path_factory.mktemp("server_fuzz"), "--served-model-name", "tiny")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


REAL_SERVER_BODIES = [
    ("/v1/completions", b'{"prompt": "\\udcff"}'),
    ("/v1/completions", b'{"prompt": "\xed\xb3\xbf", "max_tokens": 1}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}'),
    ("/v1/completions", b'{"prompt": "x", "repetition_penalty": 1e308}'),
    ("/v1/completions", b'{"prompt": "x", "seed": 18446744073709551615, "n": 2, "max_tokens": 1}'),
    ("/v1/completions", b'{"prompt": [1180591620717411303424]}'),
    ("/detokenize", b'{"tokens": [1180591620717411303424]}'),
    ("/v1/completions", b'{"prompt": "x", "top_k": 1180591620717411303424}'),
    ("/v1/completions", b'{"prompt": "x", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
    ("/v1/completions", b'{"prompt": "\xff"}'),
    ("/v1/chat/completions", encode({"messages": [{"role": "user", "content": "x"}] * 5000})),
]


def test_real_server_answers_hostile_bodies_with_400(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for endpoint, raw in REAL_SERVER_BODIES:
            check(client.post(endpoint, content=raw, headers={"content-type": "application/json"}), 400)
        assert client.get("/health").status_code == 200


SCHEMA_EXAMPLES = {"POST": 40, "GET": 2}     # per operation and generation mode: 20-45 s on 2 cores


def test_schemathesis_finds_no_server_error(server):
    import schemathesis             # the `test` extras install it; imported here so (a) runs without it
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                               "POST /tokenize", "POST /detokenize"}

    def steer(case):
        """Valid cases name the served model, so they reach the engine rather than a 404, and ask
        for a few tokens (the time goes to checking input, not to generating)."""
        if isinstance(case.body, dict):
            if "model" in case.body:
                case.body["model"] = "tiny"
            for name in ("max_tokens", "max_completion_tokens"):
                if isinstance(case.body.get(name), int) and case.body[name] > 4:
                    case.body[name] = 1 + case.body[name] % 4
            if isinstance(case.body.get("prompt"), list) and len(case.body["prompt"]) > 4 and \
                    not isinstance(case.body["prompt"][0], int):
                del case.body["prompt"][4:]
        return case

    for op in operations:
        method = op.method.upper()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if method == "POST":                      # a GET without parameters has no invalid request
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)
            if mode == schemathesis.GenerationMode.POSITIVE:
                strategy = strategy.map(steer)

            @settings(deadline=None, database=None, max_examples=SCHEMA_EXAMPLES[method], derandomize=DERANDOMIZE,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case):
                case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=60)

            run()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert "Traceback" not in server.log(), server.log()[-3000:]
