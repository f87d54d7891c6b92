"""A chat choice's generated text -> (content, tool calls), whole or as stream deltas.

How depends on the request's tool_choice (ChatCompletionRequest.effective_tool_choice):
- none: the text is the content.
- auto: the server's tool parser (--tool-call-parser) finds calls in the text, if any.
- required: the text was generated under required_calls_schema (a JSON array of
  {"name", "parameters"} objects), so it parses as the calls themselves (vLLM's shape).
- named: the text was generated under the function's parameters schema: it is the arguments.
"""
from __future__ import annotations

import uuid
from typing import Optional

from server.api.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ResponseToolCall
from server.api.tool_parsers import (ParsedToolCall, RequiredCallsStreamer, StreamDelta, ToolParser,
                                     parse_required_calls)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallOutput:
    """The tool-call handling of one request (each choice gets its own stream)."""

    def __init__(self, mode: str, parser: Optional[ToolParser] = None, function_name: Optional[str] = None):
        assert mode in ("none", "auto", "required", "named"), mode
        assert mode != "auto" or parser is not None, "auto tool choice needs a parser"
        assert mode != "named" or function_name, "a named tool choice needs the function's name"
        self.mode, self.parser, self.function_name = mode, parser, function_name

    def message(self, text: str) -> tuple[Optional[str], list[ResponseToolCall]]:
        """(content, tool calls) of a finished choice; text that does not parse stays content."""
        if self.mode == "named":
            return None, [_response_call(ParsedToolCall(self.function_name, text))]
        if self.mode == "required":
            try:
                calls = parse_required_calls(text)
            except ValueError:
                return text, []
            return None, [_response_call(c) for c in calls]
        if self.mode == "auto":
            extracted = self.parser.extract(text)
            if extracted.tools_called:
                return extracted.content, [_response_call(c) for c in extracted.tool_calls]
        return text, []

    def stream(self) -> "ToolCallStream":
        return ToolCallStream(self)


class ToolCallStream:
    """One choice's text deltas -> (content delta, tool-call deltas), in OpenAI's delta shape: each
    call's first delta carries its index, id, type and name; a named call's arguments then stream
    as they are generated, a parsed call's arrive whole when the call is complete."""

    def __init__(self, output: ToolCallOutput):
        self.mode = output.mode
        self.function_name = output.function_name
        self.num_calls = 0
        self._text: list[str] = []     # required mode: what was fed, for output that is not calls
        self._streamer = None
        if output.mode == "auto":
            self._streamer = output.parser.streamer()
        elif output.mode == "required":
            self._streamer = RequiredCallsStreamer()

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            return "", self._named(text)
        if not text:
            return "", []
        self._text.append(text)
        return self._advance(lambda: self._streamer.feed(text))

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        if self._streamer is None:
            return "", []
        return self._advance(self._streamer.finish)

    def _advance(self, step) -> tuple[str, list[DeltaToolCall]]:
        """NOTE: a required-mode array cut short (max_tokens) raises; what was not sent as calls
        then goes out as content, as the whole response would carry it."""
        try:
            return self._deltas(step())
        except ValueError:
            self.mode, self._streamer = "none", None
            return ("" if self.called else "".join(self._text)), []

    def _named(self, text: str) -> list[DeltaToolCall]:
        if self.num_calls == 0:
            self.num_calls = 1
            return [DeltaToolCall(index=0, id=new_call_id(), type="function",
                                  function=DeltaFunctionCall(name=self.function_name, arguments=text))]
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))] if text else []

    def _deltas(self, delta: StreamDelta) -> tuple[str, list[DeltaToolCall]]:
        calls = []
        for call in delta.tool_calls:
            calls.append(DeltaToolCall(index=self.num_calls, id=new_call_id(), type="function",
                                       function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
            self.num_calls += 1
        return delta.content, calls


def _response_call(call: ParsedToolCall) -> ResponseToolCall:
    return ResponseToolCall(id=new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
