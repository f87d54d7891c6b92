"""Tool-call parsers (server/api/tool_parsers): each format's rules, and the property that a
streamed output adds up to `extract(full_text)` however the text is chunked."""
from __future__ import annotations

import copy
import json
import keyword

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.tool_parsers import (
    TOOL_PARSERS, ExtractedToolCalls, ParsedToolCall, RequiredCallsStreamer, StreamDelta,
    ToolCallStreamer, ToolParser, get_tool_parser, parse_required_calls, required_calls_schema,
)

HERMES, LLAMA, PYTHONIC = (get_tool_parser(n) for n in ("hermes", "llama3_json", "pythonic"))


def call(name: str, **args) -> ParsedToolCall:
    return ParsedToolCall(name, json.dumps(args, ensure_ascii=False))


def run_stream(streamer: ToolCallStreamer, chunks: list[str]) -> tuple[str, list[ParsedToolCall]]:
    content, calls = [], []
    for delta in [streamer.feed(c) for c in chunks] + [streamer.finish()]:
        assert isinstance(delta, StreamDelta)
        content.append(delta.content)
        calls.extend(delta.tool_calls)
    return "".join(content), calls


def split_at(text: str, cuts) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def assert_stream_matches_extract(parser: ToolParser, text: str, chunks: list[str]) -> None:
    expected = parser.extract(text)
    content, calls = run_stream(parser.streamer(), chunks)
    assert calls == expected.tool_calls, (text, chunks)
    assert content.strip() == (expected.content or "").strip(), (text, chunks)
    if not expected.tools_called:
        assert content == text, (text, chunks)          # plain output streams unchanged


# --- hermes ---------------------------------------------------------------------------------

def hermes_call(name, args=None, **extra) -> str:
    obj = {"name": name, **({} if args is None else {"arguments": args}), **extra}
    return f"<tool_call>\n{json.dumps(obj, ensure_ascii=False)}\n</tool_call>"


def test_hermes_single_call():
    out = HERMES.extract(hermes_call("get_weather", {"city": "Paris"}))
    assert out == ExtractedToolCalls(None, [call("get_weather", city="Paris")])
    assert out.tools_called


def test_hermes_several_calls_and_content_before():
    text = "Let me check both.\n\n" + hermes_call("a", {"x": 1}) + "\n" + hermes_call("b", {})
    assert HERMES.extract(text) == ExtractedToolCalls("Let me check both.", [call("a", x=1), call("b")])


def test_hermes_no_calls_is_content_unchanged():
    assert HERMES.extract("  Just text, 1 < 2.\n") == ExtractedToolCalls("  Just text, 1 < 2.\n", [])
    assert HERMES.extract(" \n") == ExtractedToolCalls(None, [])
    assert not HERMES.extract("hi").tools_called


@pytest.mark.parametrize("bad", [
    '<tool_call>{"name": "f", "arguments": {</tool_call>',            # JSON does not parse
    '<tool_call>{"arguments": {"x": 1}}</tool_call>',                # no name
    '<tool_call>{"name": 3}</tool_call>',                            # name not a string
    '<tool_call>{"name": "f", "arguments": "[1, 2]"}</tool_call>',   # string arguments, not an object
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',  # would not round-trip as JSON
    '<tool_call>{"name": "f", "arguments": {"x": "\\ud800"}}</tool_call>',  # lone surrogate
    '<tool_call>{"name": "f", "arguments": {}}',   # unclosed: its body runs into the next call
])
def test_hermes_malformed_first_call_makes_everything_content(bad):
    text = "Before. " + bad + "\n" + hermes_call("later", {})
    assert HERMES.extract(text) == ExtractedToolCalls(text, [])


def test_hermes_arguments_missing_null_or_json_string():
    assert HERMES.extract(hermes_call("f")).tool_calls == [call("f")]
    assert HERMES.extract(hermes_call("f", None, arguments=None)).tool_calls == [call("f")]
    assert HERMES.extract(hermes_call("f", '{"x": [1, "é"]}')).tool_calls == [call("f", x=[1, "é"])]


def test_hermes_unicode_and_nested_arguments():
    args = {"text": "日本語 👩‍👩‍👧 café", "opts": {"deep": [{"a": None, "b": [True, 1.5]}]}}
    (got,) = HERMES.extract(hermes_call("translate", args)).tool_calls
    assert json.loads(got.arguments) == args
    assert "日本語 👩‍👩‍👧" in got.arguments                   # ensure_ascii=False
    escaped = '<tool_call>{"name": "t", "arguments": {"s": "\\u65e5"}}</tool_call>'
    assert HERMES.extract(escaped).tool_calls == [call("t", s="日")]


def test_hermes_unclosed_last_call_at_eos():
    text = 'Checking.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
    assert HERMES.extract(text) == ExtractedToolCalls("Checking.", [call("f", x=1)])
    streamer = HERMES.streamer()
    assert streamer.feed(text) == StreamDelta("Checking.", [])
    assert streamer.finish() == StreamDelta("", [call("f", x=1)])
    cut = 'Checking.\n<tool_call>\n{"name": "f", "argu'
    assert HERMES.extract(cut) == ExtractedToolCalls(cut, [])
    assert run_stream(HERMES.streamer(), [cut]) == (cut, [])


def test_hermes_text_after_and_between_calls_is_dropped():
    text = hermes_call("a", {}) + "\nI called a.\n" + hermes_call("b", {}) + "\nDone!"
    assert HERMES.extract(text) == ExtractedToolCalls(None, [call("a"), call("b")])


def test_hermes_bad_call_after_a_good_one_is_dropped():
    text = hermes_call("a", {}) + "<tool_call>not json</tool_call>" + hermes_call("b", {})
    assert HERMES.extract(text) == ExtractedToolCalls(None, [call("a"), call("b")])


def test_hermes_streams_text_promptly():
    s = HERMES.streamer()
    assert s.feed("Hello") == StreamDelta("Hello")
    assert s.feed(" wor") == StreamDelta(" wor")
    assert s.feed("ld <tool") == StreamDelta("ld")               # " <tool" could start a call
    assert s.feed("_call>\n{\"name\": \"f\", ") == StreamDelta()
    assert s.feed('"arguments": {}}\n</tool_') == StreamDelta()
    assert s.feed("call>") == StreamDelta("", [call("f")])        # sent when it closes
    assert s.feed("\ntrailing") == StreamDelta()
    assert s.finish() == StreamDelta()


def test_hermes_partial_marker_that_is_not_a_call_is_flushed():
    s = HERMES.streamer()
    assert s.feed("a <tool") == StreamDelta("a")
    assert s.feed("box> b") == StreamDelta(" <toolbox> b")
    assert s.feed(" <tool") == StreamDelta()
    assert s.finish() == StreamDelta(" <tool")


# --- llama3_json ----------------------------------------------------------------------------

def test_llama3_single_call_and_python_tag():
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    expected = ExtractedToolCalls(None, [call("get_weather", city="Paris")])
    assert LLAMA.extract(text) == expected
    assert LLAMA.extract("<|python_tag|>" + text) == expected
    assert LLAMA.extract(" \n<|python_tag|>\n " + text + "\n") == expected


def test_llama3_several_calls_and_arguments_alias():
    text = '{"name": "a", "parameters": {"s": "};{"}}; {"name": "b", "arguments": {"y": [1, {"z": null}]}};'
    assert LLAMA.extract(text).tool_calls == [call("a", s="};{"), call("b", y=[1, {"z": None}])]


@pytest.mark.parametrize("text", [
    "The weather is nice.",
    'Sure: {"name": "f", "parameters": {}}',          # does not start with the call
    '<|python_tag|>print("hi")',                      # code, not a JSON call
    '{"not": "a call"}',
    '{"name": "f", "parameters": {"x": 1}',           # never closes
    '{"name": "f", "parameters": {"x": NaN}}',
    '{"name": "f", "parameters": [1]}',
    "<|python_tag|>",
])
def test_llama3_not_a_call_is_content(text):
    assert LLAMA.extract(text) == ExtractedToolCalls(text, [])


def test_llama3_after_the_calls_is_dropped():
    assert LLAMA.extract('{"name": "a", "parameters": {}} and more').tool_calls == [call("a")]
    text = '{"name": "a", "parameters": {}}; {"bad": 1}; {"name": "c"}'
    assert LLAMA.extract(text).tool_calls == [call("a")]


def test_llama3_unicode_and_escapes():
    text = '{"name": "say", "parameters": {"text": "quote \\" brace } \\\\ 日本 👋"}}'
    assert LLAMA.extract(text).tool_calls == [call("say", text='quote " brace } \\ 日本 👋')]


def test_llama3_streams_content_and_calls_promptly():
    s = LLAMA.streamer()
    assert s.feed("  ") == StreamDelta()
    assert s.feed("The") == StreamDelta("  The")
    assert s.feed(" end") == StreamDelta(" end")
    s = LLAMA.streamer()
    assert s.feed("<|python") == StreamDelta()
    assert s.feed('_tag|>{"name": "a", "parameters": {"x": "}"}') == StreamDelta()
    assert s.feed('}; {"name": "b", ') == StreamDelta("", [call("a", x="}")])
    assert s.feed('"parameters": {}}') == StreamDelta("", [call("b")])
    assert s.finish() == StreamDelta()


# --- pythonic -------------------------------------------------------------------------------

def test_pythonic_calls():
    text = '[get_weather(city="Paris", unit="c"), get_time()]'
    assert PYTHONIC.extract(text) == ExtractedToolCalls(None, [call("get_weather", city="Paris", unit="c"),
                                                               call("get_time")])
    wrapped = "<|python_start|>" + text + "<|python_end|>"
    assert PYTHONIC.extract(wrapped) == PYTHONIC.extract(text)


def test_pythonic_nested_literals_and_unicode():
    text = ("[f(x={'a': [1, 2.5, -3, +4, True, None, {'b': \"c\"}], 't': (1, 'two')}, "
            "s='''multi\nline ] str''', u=\"日本語 👩‍👩‍👧\", e='')]")
    assert PYTHONIC.extract(text).tool_calls == [
        call("f", x={"a": [1, 2.5, -3, 4, True, None, {"b": "c"}], "t": [1, "two"]},
             s="multi\nline ] str", u="日本語 👩‍👩‍👧", e="")]


@pytest.mark.parametrize("text", [
    "[get_weather(city=paris)]",            # a name, not a literal
    "[f(x=1 + 2)]",
    "[f(x=open('/etc/passwd'))]",
    "[f('positional')]",
    "[f(**kw)]",
    "[os.system(cmd='ls')]",
    "[f(x={1: 2})]",
    "[f(x=1e999)]",
    "[f(x=b'bytes')]",
    "[f(x=1) for f in g]",
    "[1, 2, 3] are numbers",
    "[]",
    "Sure: [f()]",
    "[f(x=1), ",
    "plain text",
])
def test_pythonic_not_calls_is_content(text):
    assert PYTHONIC.extract(text) == ExtractedToolCalls(text, [])


def test_pythonic_after_the_list_is_dropped_and_comments_are_skipped():
    assert PYTHONIC.extract("[f(x=1)] and some text").tool_calls == [call("f", x=1)]
    assert PYTHONIC.extract("[f(x=1)  # a ] comment\n, g()]").tool_calls == [call("f", x=1), call("g")]


def test_pythonic_streams_content_and_calls_promptly():
    s = PYTHONIC.streamer()
    assert s.feed("It") == StreamDelta("It")
    s = PYTHONIC.streamer()
    assert s.feed('[f(s="])') == StreamDelta()
    assert s.feed('"), g()') == StreamDelta()
    assert s.feed("]<|python_end|>") == StreamDelta("", [call("f", s="])"), call("g")])
    assert s.finish() == StreamDelta()


# --- required -------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time"}},
]


def test_parse_required_calls():
    text = ('[{"name": "get_weather", "parameters": {"city": "Zürich"}}, '
            '{"name": "get_time", "parameters": {}}]')
    assert parse_required_calls(text) == [call("get_weather", city="Zürich"), call("get_time")]
    assert parse_required_calls(' [ {"name": "f", "arguments": {"a": [1]}} ] ') == [call("f", a=[1])]


@pytest.mark.parametrize("text", [
    "", "not json", "{}", "[]", '{"name": "f", "parameters": {}}', '[{"parameters": {}}]',
    '[{"name": "f", "parameters": 3}]', '[{"name": "f", "parameters": {}}', '[1]',
    '[{"name": "f", "parameters": {}}] x',
])
def test_parse_required_calls_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_required_calls(text)


def test_required_streamer_emits_each_call_when_its_object_closes():
    s = RequiredCallsStreamer()
    assert s.feed(' [\n  {"name": "get_weather", "parameters": {"city": "{[\\"') == StreamDelta()
    assert s.feed('"}}') == StreamDelta("", [call("get_weather", city='{["')])
    assert s.feed(', {"name": "get_time", "parameters": {}}') == StreamDelta("", [call("get_time")])
    assert s.feed("]\n") == StreamDelta()
    assert s.finish() == StreamDelta()


@pytest.mark.parametrize("chunks", [
    ["[]"], ["x"], ['[{"name": "f"}'], ['[{"name": "f"} {'], ['[{"name": 1}]'], ['[{"name": "f"}]', ","],
    ['[{"name": "f", "parameters": {}}, ]'],
])
def test_required_streamer_rejects_malformed(chunks):
    s = RequiredCallsStreamer()
    with pytest.raises(ValueError):
        for chunk in chunks:
            s.feed(chunk)
        s.finish()


def test_required_calls_schema_shape():
    params = TOOLS[0]["function"]["parameters"]
    variants = [
        {"properties": {"name": {"type": "string", "enum": ["get_weather"]}, "parameters": params},
         "required": ["name", "parameters"]},
        {"properties": {"name": {"type": "string", "enum": ["get_time"]},
                        "parameters": {"type": "object", "properties": {}}},
         "required": ["name", "parameters"]},
    ]
    expected = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    assert required_calls_schema(TOOLS, parallel=True) == expected
    assert required_calls_schema(TOOLS, parallel=False) == {**expected, "maxItems": 1}


def test_required_calls_schema_hoists_defs_without_touching_the_tools():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}]
    before = copy.deepcopy(tools)
    schema = required_calls_schema(tools, parallel=True)
    assert tools == before
    assert schema["$defs"] == {"P": {"type": "integer"}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    clash = copy.deepcopy(tools)
    clash[0]["function"]["parameters"]["$defs"]["P"] = {"type": "string"}
    with pytest.raises(ValueError):
        other = {"type": "function", "function": {**clash[0]["function"], "name": "g"}}
        required_calls_schema(tools + [other], parallel=True)


def test_required_calls_schema_accepts_what_the_parser_reads():
    jsonschema = pytest.importorskip("jsonschema")
    good = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(good, required_calls_schema(TOOLS, parallel=True))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, required_calls_schema(TOOLS, parallel=False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "nope", "parameters": {}}], required_calls_schema(TOOLS, parallel=True))
    assert parse_required_calls(json.dumps(good)) == [call("get_weather", city="Oslo"), call("get_time")]


# --- registry and fallback prompts ----------------------------------------------------------

def test_registry():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "pythonic"}
    for name, cls in TOOL_PARSERS.items():
        assert cls.name == name and isinstance(get_tool_parser(name), cls)
    with pytest.raises(ValueError, match="hermes, llama3_json, pythonic"):
        get_tool_parser("mistral")


@pytest.mark.parametrize("name, syntax", [
    ("hermes", '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'),
    ("llama3_json", '"parameters"'),
    ("pythonic", "[func_name1(params_name1=params_value1"),
])
def test_fallback_instructions_show_the_tools_and_the_syntax(name, syntax):
    text = get_tool_parser(name).fallback_instructions(TOOLS)
    assert syntax in text
    assert '"get_weather"' in text and "Weather in a city" in text and '"get_time"' in text
    if name == "hermes":
        assert text.startswith("You are a function calling AI model.")
        assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n" + json.dumps(TOOLS[1]) + "\n</tools>" in text


# --- streaming adds up to extract, however the output is chunked ----------------------------

SAMPLES = {
    "hermes": [
        "", "  \n", "Hello, world!", "1 < 2 and <b>bold</b> <tool", "a <toolbox> b <tool_cal",
        "</tool_call> stray closer",
        hermes_call("get_weather", {"city": "Paris"}),
        "Let me check.\n\n" + hermes_call("a", {"x": 1}) + "\n" + hermes_call("b", {"y": [1, {"z": None}]}),
        hermes_call("translate", {"text": "日本語 👩‍👩‍👧 café e\u0301",
                                  "to": "ελληνικά"}),
        "Before <tool_call>{\"name\": \"f\", \"arguments\": {</tool_call> after",
        '<tool_call>{"arguments": {}}</tool_call>' + hermes_call("b", {}),
        'Checking.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n',
        'Text <tool_call>{"name": "f", "argu',
        hermes_call("a", {}) + "<tool_call>nope</tool_call>" + hermes_call("b", {}) + "<tool_call>{",
        hermes_call("a", {}) + "\nbetween\n" + hermes_call("b", {}) + "\nDone! <tool",
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"s": "</tool"}}</tool_call>',
        "<tool_call><tool_call>" + hermes_call("x", {}),
        hermes_call("a", {}) + "<tool_call>not json",
    ],
    "llama3_json": [
        "", "   ", "The weather is nice.", "<|python_ta", "<|python_tag|>", "<|python_tag|>print('hi')",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        ' \n<|python_tag|> {"name": "f", "parameters": {}}\n',
        '{"name": "a", "parameters": {"s": "};{"}}; {"name": "b", "arguments": {"y": [1, {"z": null}]}}',
        '{"name": "a", "parameters": {}};', '{"name": "a", "parameters": {}} and then text',
        '{"name": "a", "parameters": {}}; {"bad": 1}; {"name": "c"}', '{"not": "a call"}',
        '{"name": "a", "parameters": {', 'Hello {"name": "a", "parameters": {}}',
        '{"name": "say", "parameters": {"text": "quote \\" brace } \\\\ 日本 👩‍👩‍👧"}}',
        '{"name": "f", "parameters": {"x": NaN}}', '{"name": "a", "parameters": {}} ; x',
        '{"name": "a", "parameters": {}};{"name": "b", "parameters": {"u": "\\u00e9"}}',
    ],
    "pythonic": [
        "", " \n", "plain text", "<|python_sta", "<|python_start|>",
        '[get_weather(city="Paris", unit="c"), get_time()]',
        "<|python_start|>[f(a=1)]<|python_end|>",
        " [f(x={'a': [1, 2.5, -3, True, None, {'b': \"c\"}], 't': (1, 2)})]",
        '[f(s="]) [(\\"\'")]', "[f(s='''multi\nline ] string''', t=\"\"\"\"\"\")]", '[f(s="", t=\'\')]',
        "[f(x=y)]", "[f(1)]", "[1, 2, 3] are numbers", "[]", "Sure: [f()]", "[f(x=1)] trailing text",
        "[f(x=1), ", "[os.system(cmd='rm')]", "[f(**kw)]",
        '[translate(text="日本語 👩‍👩‍👧", e="e\u0301")]',
        "[f(x=1e999)]", "[f(x=-1.5, y=+2)]", "[f(x={1: 2})]", "[f(x=1) # comment ]\n, g()]", "[f(s='\\\\')]",
    ],
}
REQUIRED_SAMPLES = [
    '[{"name": "get_weather", "parameters": {"city": "Zürich 👩‍👩‍👧"}}]',
    ' [ {"name": "a", "parameters": {"s": "]}{[\\"\\\\"}} ,\n'
    '{"name": "b", "parameters": {"n": [1, {"m": null}]}} ] ',
]
ALL_SAMPLES = [(name, text) for name, texts in SAMPLES.items() for text in texts]


@pytest.mark.parametrize("name, text", ALL_SAMPLES)
def test_stream_matches_extract_for_every_single_split(name, text):
    parser = get_tool_parser(name)
    assert_stream_matches_extract(parser, text, [text])
    assert_stream_matches_extract(parser, text, list(text))
    for cut in range(1, len(text)):
        assert_stream_matches_extract(parser, text, [text[:cut], text[cut:]])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_stream_matches_extract_for_random_chunkings(data):
    name, text = data.draw(st.sampled_from(ALL_SAMPLES))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert_stream_matches_extract(get_tool_parser(name), text, split_at(text, cuts))


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_required_stream_matches_parse(data):
    text = data.draw(st.sampled_from(REQUIRED_SAMPLES))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert run_stream(RequiredCallsStreamer(), split_at(text, cuts)) == ("", parse_required_calls(text))


# generated calls: every format reads back exactly what was written, chunked at random

IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=8)
CALLS = st.lists(st.tuples(IDENT, st.dictionaries(IDENT, JSON_VALUES, max_size=3)), min_size=1, max_size=3)


def render(name: str, calls, prefix: str, ascii_json: bool) -> str:
    if name == "hermes":
        return prefix + "".join(
            "<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=ascii_json)
            + "\n</tool_call>\n"
            for n, a in calls)
    if name == "llama3_json":
        return "<|python_tag|>" * ascii_json + "; ".join(
            json.dumps({"name": n, "parameters": a}, ensure_ascii=ascii_json) for n, a in calls)
    body = ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for n, a in calls)
    return f"<|python_start|>[{body}]<|python_end|>" if ascii_json else f"[{body}]"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(TOOL_PARSERS)), calls=CALLS, ascii_json=st.booleans(),
       prefix=st.text(max_size=10), data=st.data())
def test_generated_calls_round_trip(name, calls, ascii_json, prefix, data):
    if name != "hermes":
        prefix = ""
    text = render(name, calls, prefix, ascii_json)
    parser = get_tool_parser(name)
    expected_calls = [ParsedToolCall(n, json.dumps(a, ensure_ascii=False)) for n, a in calls]
    assert parser.extract(text) == ExtractedToolCalls(prefix.strip() or None, expected_calls)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert_stream_matches_extract(parser, text, split_at(text, cuts))
    required = json.dumps([{"name": n, "parameters": a} for n, a in calls], ensure_ascii=ascii_json)
    assert parse_required_calls(required) == expected_calls
    assert run_stream(RequiredCallsStreamer(), split_at(required, cuts)) == ("", expected_calls)


# adversarial outputs stitched from marker fragments: every parser stays consistent, and the
# required-array streamer raises exactly when parse_required_calls does

FRAGMENTS = st.sampled_from([
    "<tool_call>", "</tool_call>", "<tool", "_call>", "{", "}", "[", "]", "(", ")", '"', "'", "\\", ";", ",",
    " ", "\n", '{"name": "f", "arguments": {}}', '{"name": "g", "parameters": {"a": "é👋"}}', "f(x=1)",
    "<|python_tag|>", "<|python_start|>", "<|python_end|>", "'''", '"""', "#", "text", "x=", "1",
])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(FRAGMENTS, max_size=14), data=st.data())
def test_fragment_soup_streams_consistently(parts, data):
    text = "".join(parts)
    chunks = split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    for name in TOOL_PARSERS:
        assert_stream_matches_extract(get_tool_parser(name), text, chunks)
    try:
        expected = ("", parse_required_calls(text))
    except ValueError:
        expected = None
    try:
        streamed = run_stream(RequiredCallsStreamer(), chunks)
    except ValueError:
        streamed = None
    assert streamed == expected
