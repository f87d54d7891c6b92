"""Tool-call output parsers, named as vLLM's `--tool-call-parser` names them.

`get_tool_parser(name)` gives the parser for a model family's call syntax; `required`
handles `tool_choice: "required"`, whose output is a schema-constrained JSON array.
"""
from __future__ import annotations

from server.api.tool_parsers.base import (
    ExtractedToolCalls, ParsedToolCall, StreamDelta, ToolCallStreamer, ToolParser,
)
from server.api.tool_parsers.hermes import HermesToolParser
from server.api.tool_parsers.llama3_json import Llama3JsonToolParser
from server.api.tool_parsers.pythonic import PythonicToolParser
from server.api.tool_parsers.required import (
    RequiredCallsStreamer, parse_required_calls, required_calls_schema,
)

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, PythonicToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known parsers: "
                         f"{', '.join(sorted(TOOL_PARSERS))}") from None


__all__ = [
    "TOOL_PARSERS", "get_tool_parser",
    "ExtractedToolCalls", "ParsedToolCall", "StreamDelta", "ToolCallStreamer", "ToolParser",
    "HermesToolParser", "Llama3JsonToolParser", "PythonicToolParser",
    "RequiredCallsStreamer", "parse_required_calls", "required_calls_schema",
]
