"""Hermes 2 Pro / Qwen2.5 tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Rules (the same in `extract` and the streamer):
- content is the text before the first `<tool_call>`; text between and after the calls is
  dropped, as vLLM drops it;
- if the first call's JSON does not parse or lacks "name", the whole output is content
  (vLLM's behaviour); a later bad call is dropped instead, because the calls before it have
  already been streamed and cannot be taken back;
- a last `<tool_call>` left unclosed at the end of output is still a call if its JSON parses
  (models often stop at eos before the closing tag).
"""
from __future__ import annotations

import json
import re
from typing import Optional

from server.api.tool_parsers.base import (
    ExtractedToolCalls, ParsedToolCall, StreamDelta, ToolCallStreamer, ToolParser,
    call_from_json, content_or_none, partial_suffix, tools_json_lines,
)

START, END = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_ARG_KEYS = ("arguments",)


def _parse(body: str) -> Optional[ParsedToolCall]:
    return call_from_json(body.strip(), _ARG_KEYS)


class HermesToolParser(ToolParser):
    name = "hermes"

    def extract(self, text: str) -> ExtractedToolCalls:
        first = text.find(START)
        if first < 0:
            return ExtractedToolCalls(content_or_none(text), [])
        calls: list[ParsedToolCall] = []
        for match in _CALL_RE.finditer(text, first):
            body = match.group(1) if match.group(1) is not None else match.group(2)
            call = _parse(body)
            if call is not None:
                calls.append(call)
            elif not calls:
                return ExtractedToolCalls(text, [])
        return ExtractedToolCalls(text[:first].strip() or None, calls)

    def streamer(self) -> ToolCallStreamer:
        return HermesStreamer()

    def format_calls(self, calls: list[tuple[str, dict]]) -> str:
        return "\n".join(f"<tool_call>\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n</tool_call>"
                         for name, args in calls)

    def fallback_instructions(self, tools: list[dict]) -> str:
        return (
            "You are a function calling AI model. You are provided with function signatures "
            "within <tools></tools> XML tags. You may call one or more functions to assist with "
            "the user query. Don't make assumptions about what values to plug into functions. "
            "Here are the available tools:\n<tools>\n" + tools_json_lines(tools) + "\n</tools>\n"
            "If no function is needed, answer the user directly.\n"
            "For each function call return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )


class HermesStreamer(ToolCallStreamer):
    """Streams the text before the first call at once, holding back only a trailing partial
    `<tool_call>` and trailing whitespace (dropped if a call follows it)."""

    def __init__(self) -> None:
        self._mode = "content"      # content | call | after | plain
        self._pending = ""          # unsent text outside a call
        self._body = ""             # text of the open call
        self._searched = 0          # how much of _body has been searched for END
        self._lead_ws = ""          # whitespace dropped before the first call
        self._ncalls = 0

    def feed(self, text: str) -> StreamDelta:
        out = StreamDelta()
        self._consume(text, out)
        return out

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self._mode == "content":
            out.content, self._pending = self._pending, ""
        elif self._mode == "call":
            self._close_call(self._body, out, closed=False)
        self._mode = "after"
        return out

    def _consume(self, text: str, out: StreamDelta) -> None:
        while True:
            if self._mode == "plain":
                out.content += text
                return
            if self._mode == "call":
                self._body += text
                j = self._body.find(END, self._searched)
                if j < 0:
                    self._searched = max(0, len(self._body) - len(END) + 1)
                    return
                text = self._body[j + len(END):]
                self._close_call(self._body[:j], out, closed=True)
                continue
            self._pending += text
            i = self._pending.find(START)
            if i < 0:
                held = partial_suffix(self._pending, START)
                if self._mode == "content":
                    sendable = self._pending[:len(self._pending) - held].rstrip()
                    out.content += sendable
                    self._pending = self._pending[len(sendable):]
                else:                       # "after": text outside calls is dropped
                    self._pending = self._pending[len(self._pending) - held:]
                return
            if self._mode == "content":
                before = self._pending[:i]
                sendable = before.rstrip()
                out.content += sendable
                self._lead_ws = before[len(sendable):]
            text = self._pending[i + len(START):]
            self._pending, self._body, self._searched = "", "", 0
            self._mode = "call"

    def _close_call(self, body: str, out: StreamDelta, closed: bool) -> None:
        call = _parse(body)
        self._body, self._searched = "", 0
        if call is not None:
            out.tool_calls.append(call)
            self._ncalls += 1
            self._mode = "after"
        elif self._ncalls == 0:             # the first call is bad: the whole output is content
            out.content += self._lead_ws + START + body + (END if closed else "")
            self._mode = "plain"
        else:
            self._mode = "after"
