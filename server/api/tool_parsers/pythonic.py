"""Llama 3.2 / Llama 4 pythonic tool calls: `[get_weather(city="Paris"), get_time()]`.

The list is parsed with `ast` (never evaluated): each element must be a call of a plain name
with keyword arguments whose values are literals (str, int, float, bool, None, and lists,
tuples and dicts of them). Optionally wrapped in `<|python_start|>`...`<|python_end|>`.
Rules (the same in `extract` and the streamer): the output is calls only if, after
whitespace and the optional tag, it starts with `[` and that list is all valid calls;
otherwise the whole output is content. Text after the list's `]` is dropped (the calls have
been streamed when it closed).
"""
from __future__ import annotations

import ast
import json
from typing import Any, Optional

from server.api.tool_parsers.base import (
    CALLS, BracketScanner, ExtractedToolCalls, FirstCharStreamer, ParsedToolCall, StreamDelta,
    ToolCallStreamer, ToolParser, classify_start, content_or_none, finite_number, make_call,
)

PYTHON_START = "<|python_start|>"


class _NotLiteral(ValueError):
    pass


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (bool, str)) or finite_number(value):
            return value
    elif (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
          and isinstance(node.operand, ast.Constant) and not isinstance(node.operand.value, bool)
          and finite_number(node.operand.value)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    elif isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    elif isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise _NotLiteral("dict keys must be strings")
            out[key.value] = _literal(value)
        return out
    raise _NotLiteral(f"not a literal: {type(node).__name__}")


def parse_call_list(source: str) -> Optional[list[ParsedToolCall]]:
    """`[f(a=1), g()]` -> calls; None unless it is a non-empty list of literal-argument calls."""
    try:
        tree = ast.parse(source.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
                return None
            if any(kw.arg is None for kw in node.keywords):      # **kwargs
                return None
            call = make_call(node.func.id, {kw.arg: _literal(kw.value) for kw in node.keywords})
            if call is None:
                return None
            calls.append(call)
        return calls
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def format_calls(self, calls: list[tuple[str, dict]]) -> str:
        def call(name: str, args: dict) -> str:
            return f"{name}({', '.join(f'{k}={_py_literal(v)}' for k, v in args.items())})"
        return "[" + ", ".join(call(name, args) for name, args in calls) + "]"

    def extract(self, text: str) -> ExtractedToolCalls:
        kind, i = classify_start(text, PYTHON_START, "[")
        if kind == CALLS:
            end = BracketScanner(python=True).feed(text[i:])
            calls = parse_call_list(text[i:i + end]) if end is not None else None
            if calls:
                return ExtractedToolCalls(None, calls)
        return ExtractedToolCalls(content_or_none(text), [])

    def streamer(self) -> ToolCallStreamer:
        return PythonicStreamer()

    def fallback_instructions(self, tools: list[dict]) -> str:
        return (
            "You are an expert in composing functions. You are given a question and a set of "
            "possible functions. Based on the question, you will need to make one or more "
            "function/tool calls to achieve the purpose. If none of the functions is needed, "
            "answer the question directly in plain text.\n\n"
            "If you decide to invoke any of the function(s), you MUST put it in the format of "
            "[func_name1(params_name1=params_value1, params_name2=params_value2...), "
            "func_name2(params)]\n"
            "You SHOULD NOT include any other text in the response when you call functions.\n\n"
            "Here is a list of functions in JSON format that you can invoke.\n\n"
            + json.dumps(tools, ensure_ascii=False, indent=4)
        )


class PythonicStreamer(FirstCharStreamer):
    """Plain text streams as soon as its first character shows it is not a call list; the
    calls are sent together when the list closes."""

    tag, opener = PYTHON_START, "["

    def __init__(self) -> None:
        super().__init__()           # modes: start | call | plain | done
        self._scanner = BracketScanner(python=True)

    def _feed_calls(self, text: str, out: StreamDelta) -> None:
        end = self._scanner.feed(text)
        if end is None:
            return
        calls = parse_call_list(self._scanner.text[:end])
        if not calls:
            self._give_up(out)
            return
        self._mode, out.tool_calls, self._ncalls = "done", calls, len(calls)


def _py_literal(value: Any) -> str:
    """A JSON value as the Python literal the parser reads back (true -> True, null -> None)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    return repr(value)
