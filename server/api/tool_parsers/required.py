"""`tool_choice: "required"`: output constrained to a JSON array of calls (vLLM's shape).

Guided decoding makes the model write `[{"name": <tool name>, "parameters": {...}}, ...]`;
this module builds that schema and reads the array back, whole or as it streams. Output that
breaks the shape anyway (e.g. cut off by max_tokens) raises ValueError.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from server.api.tool_parsers.base import (
    BracketScanner, ParsedToolCall, StreamDelta, ToolCallStreamer, call_from_object, loads_strict,
)

_ARG_KEYS = ("parameters", "arguments")


def required_calls_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema vLLM guides `tool_choice: "required"` with.

    Each tool's `$defs` move to the top, where the `$ref`s inside its parameters point.
    """
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        function = tool["function"]
        params = copy.deepcopy(function.get("parameters")) or {"type": "object", "properties": {}}
        for def_name, def_schema in params.pop("$defs", {}).items():
            if defs.get(def_name, def_schema) != def_schema:
                raise ValueError(f"tools define '$defs/{def_name}' differently")
            defs[def_name] = def_schema
        variants.append({
            "properties": {"name": {"type": "string", "enum": [function["name"]]}, "parameters": params},
            "required": ["name", "parameters"],
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _call(item: Any, index: int) -> ParsedToolCall:
    call = call_from_object(item, _ARG_KEYS)
    if call is None:
        raise ValueError(f"tool call {index} is not an object with a \"name\" and \"parameters\" object")
    return call


def parse_required_calls(text: str) -> list[ParsedToolCall]:
    try:
        data = loads_strict(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"tool calls are not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError("tool calls must be a non-empty JSON array")
    return [_call(item, i) for i, item in enumerate(data)]


class RequiredCallsStreamer(ToolCallStreamer):
    """Sends each array element as soon as its object closes; never sends content.

    Raises ValueError where parse_required_calls would; calls from earlier feeds stay sent.
    """

    def __init__(self) -> None:
        self._expect = "["          # the characters allowed next, after whitespace ("end": none)
        self._scanner: Optional[BracketScanner] = None
        self._ncalls = 0

    def feed(self, text: str) -> StreamDelta:
        out = StreamDelta()
        while text:
            if self._scanner is not None:
                end = self._scanner.feed(text)
                if end is None:
                    return out
                obj_text, text = self._scanner.text[:end], self._scanner.text[end:]
                self._scanner = None
                try:
                    item = loads_strict(obj_text)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"tool call {self._ncalls} is not valid JSON: {e}") from None
                out.tool_calls.append(_call(item, self._ncalls))
                self._ncalls += 1
                self._expect = ",]"
                continue
            stripped = text.lstrip()
            if not stripped:
                return out
            ch, text = stripped[0], stripped[1:]
            if self._expect == "end" or ch not in self._expect:
                raise ValueError(f"unexpected {ch!r} in the tool-call array")
            if ch == "[":
                self._expect = "{"
            elif ch == ",":
                self._expect = "{"
            elif ch == "]":
                self._expect = "end"
            else:                                       # "{": an element starts
                self._scanner, text = BracketScanner(), ch + text
        return out

    def finish(self) -> StreamDelta:
        if self._expect != "end":
            raise ValueError("the tool-call array is incomplete")
        return StreamDelta()
