"""Llama 3.1/3.2 JSON tool calls: `<|python_tag|>{"name": ..., "parameters": {...}}; {...}`.

The output either is calls or is content, decided at its first non-whitespace character
(after an optional `<|python_tag|>`): `{` starts calls. Rules (the same in `extract` and the
streamer):
- if the first object is not a call (bad JSON, no "name", never closed) the whole output is
  content;
- calls continue while `;` and another `{` follow; whatever comes after the last call,
  including a later object that is not a call, is dropped (earlier calls have already been
  streamed and cannot be taken back); content is None once calls were found.
"""
from __future__ import annotations

import json
from typing import Optional

from server.api.tool_parsers.base import (
    CALLS, BracketScanner, ExtractedToolCalls, FirstCharStreamer, ParsedToolCall, StreamDelta,
    ToolCallStreamer, ToolParser, call_from_json, classify_start, content_or_none, skip_ws,
    tools_json_lines,
)

PYTHON_TAG = "<|python_tag|>"
_ARG_KEYS = ("parameters", "arguments")


def _parse(obj_text: str) -> Optional[ParsedToolCall]:
    return call_from_json(obj_text, _ARG_KEYS)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def format_calls(self, calls: list[tuple[str, dict]]) -> str:
        return "; ".join(json.dumps({"name": name, "parameters": args}, ensure_ascii=False) for name, args in calls)

    def extract(self, text: str) -> ExtractedToolCalls:
        kind, i = classify_start(text, PYTHON_TAG, "{")
        if kind != CALLS:
            return ExtractedToolCalls(content_or_none(text), [])
        calls: list[ParsedToolCall] = []
        while True:
            end = BracketScanner().feed(text[i:])
            call = _parse(text[i:i + end]) if end is not None else None
            if call is None:
                if not calls:
                    return ExtractedToolCalls(content_or_none(text), [])
                break
            calls.append(call)
            j = skip_ws(text, i + end)
            if not text.startswith(";", j):
                break
            j = skip_ws(text, j + 1)
            if not text.startswith("{", j):
                break
            i = j
        return ExtractedToolCalls(None, calls)

    def streamer(self) -> ToolCallStreamer:
        return Llama3JsonStreamer()

    def fallback_instructions(self, tools: list[dict]) -> str:
        return (
            "Given the following functions, please respond with a JSON for a function call with "
            "its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument '
            "name and its value}. Do not use variables. To call several functions, separate the "
            "JSON objects with ';'. If no function is needed, answer in plain text instead.\n\n"
            + tools_json_lines(tools, indent=4)
        )


class Llama3JsonStreamer(FirstCharStreamer):
    """Plain text streams as soon as its first character shows it is not a call; a call is
    sent when its braces balance."""

    tag, opener = PYTHON_TAG, "{"

    def __init__(self) -> None:
        super().__init__()           # modes: start | call | between | plain | done
        self._scanner = BracketScanner()
        self._semicolon = False     # between calls: ';' seen

    def _feed_calls(self, text: str, out: StreamDelta) -> None:
        self._consume(text, out)

    def _consume(self, text: str, out: StreamDelta) -> None:
        while text and self._mode in ("call", "between"):
            if self._mode == "call":
                end = self._scanner.feed(text)
                if end is None:
                    return
                obj_text, text = self._scanner.text[:end], self._scanner.text[end:]
                call = _parse(obj_text)
                if call is None:
                    self._give_up(out)
                    return
                out.tool_calls.append(call)
                self._ncalls += 1
                self._mode, self._semicolon = "between", False
                continue
            i = skip_ws(text, 0)
            if i == len(text):
                return
            if not self._semicolon and text[i] == ";":
                self._semicolon, text = True, text[i + 1:]
            elif self._semicolon and text[i] == "{":
                self._mode, self._scanner, text = "call", BracketScanner(), text[i:]
            else:
                self._mode = "done"
