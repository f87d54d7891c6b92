"""What every tool-call parser produces, and the small scanners they share.

A parser turns a model's raw output into OpenAI `tool_calls` plus the remaining `content`,
both for the whole output (`extract`) and piece by piece while it streams (`streamer`).
Streaming cannot take back what it sent, so each format's rules are chosen so that the
streamed pieces always add up to `extract(full_text)` (tests/server/test_tool_parsers.py
checks this over random chunkings).
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Optional


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str      # JSON text of an object: json.dumps(args, ensure_ascii=False)


@dataclass
class ExtractedToolCalls:
    content: Optional[str]          # text outside the calls; None when empty/whitespace-only
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass
class StreamDelta:
    content: str = ""                                                # send now as delta.content
    tool_calls: list[ParsedToolCall] = field(default_factory=list)   # calls completed by this feed


class ToolCallStreamer(ABC):
    """Per-response state: fed the generated text piece by piece."""

    @abstractmethod
    def feed(self, text: str) -> StreamDelta:
        """The next piece of generated text."""

    @abstractmethod
    def finish(self) -> StreamDelta:
        """End of output: flush what was held back."""


class ToolParser(ABC):
    """One model family's tool-call syntax (named as vLLM's --tool-call-parser names it)."""

    name: ClassVar[str]

    @abstractmethod
    def extract(self, text: str) -> ExtractedToolCalls:
        """The whole output at once."""

    @abstractmethod
    def streamer(self) -> ToolCallStreamer:
        """A fresh streamer for one response."""

    @abstractmethod
    def fallback_instructions(self, tools: list[dict]) -> str:
        """System text teaching this syntax, for chat templates that have no tool section."""

    @abstractmethod
    def format_calls(self, calls: list[tuple[str, dict]]) -> str:
        """Earlier calls (name, arguments) written in this syntax, for the same templates: what
        extract() reads back as those calls."""


# --- helpers shared by the parsers ----------------------------------------------------------

def content_or_none(text: str) -> Optional[str]:
    return text if text.strip() else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str) -> Any:
    """json.loads without NaN/Infinity, which json.dumps would write back as invalid JSON."""
    return json.loads(text, parse_constant=_reject_constant)


def make_call(name: Any, args: Any) -> Optional[ParsedToolCall]:
    """A call from a name and an arguments object (or its JSON text); None if either is unusable."""
    if not isinstance(name, str) or not name:
        return None
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = loads_strict(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    try:
        arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
        # lone surrogates (from "\ud800" escapes) would fail later, when the response is encoded
        name.encode("utf-8"), arguments.encode("utf-8")
    except (ValueError, RecursionError):     # UnicodeEncodeError is a ValueError
        return None
    return ParsedToolCall(name, arguments)


def call_from_object(obj: Any, arg_keys: Iterable[str]) -> Optional[ParsedToolCall]:
    """{"name": ..., <arg key>: {...}} -> call; a missing arguments key means no arguments."""
    if not isinstance(obj, dict):
        return None
    args = next((obj[k] for k in arg_keys if k in obj), None)
    return make_call(obj.get("name"), args)


def call_from_json(text: str, arg_keys: Iterable[str]) -> Optional[ParsedToolCall]:
    try:
        obj = loads_strict(text)
    except (ValueError, RecursionError):
        return None
    return call_from_object(obj, arg_keys)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker` (held back)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


WAIT, CALLS, CONTENT = "wait", "calls", "content"


def classify_start(text: str, tag: str, opener: str) -> tuple[str, int]:
    """For formats where the output either is calls or is content, decided at its start.

    Whitespace, an optional `tag`, whitespace, then `opener` means calls (index of the
    opener returned); anything else means content; WAIT while the text so far can't tell.
    """
    i = skip_ws(text, 0)
    if i == len(text):
        return WAIT, i
    if text.startswith(tag, i):
        i = skip_ws(text, i + len(tag))
        if i == len(text):
            return WAIT, i
    elif tag.startswith(text[i:]):
        return WAIT, i
    return (CALLS, i) if text[i] == opener else (CONTENT, i)


class BracketScanner:
    """Finds where the bracketed value opening at the first character fed closes.

    Fed piecewise; skips brackets inside strings (JSON's, or Python's with triple quotes,
    escapes and comments when `python`). Only finds the end; the parsers judge the text.
    """

    _OPEN, _CLOSE = "([{", ")]}"

    def __init__(self, python: bool = False):
        self.python = python
        self.text = ""
        self._pos = 0
        self._depth = 0
        self._quote = ""        # the closing quote while inside a string ('"', "'", '"""', ...)
        self._comment = False
        self.end: Optional[int] = None

    def feed(self, piece: str) -> Optional[int]:
        """Index in `self.text` just past the closing bracket, once it has arrived."""
        self.text += piece
        if self.end is None:
            self.end = self._scan()
        return self.end

    def _scan(self) -> Optional[int]:
        text, n = self.text, len(self.text)
        i = self._pos
        while i < n:
            ch = text[i]
            if self._comment:
                self._comment = ch != "\n"
            elif self._quote:
                if ch == "\\":
                    if i + 1 == n:
                        break                   # the escaped character has not arrived yet
                    i += 1
                elif text.startswith(self._quote, i):
                    i += len(self._quote) - 1
                    self._quote = ""
                elif len(self._quote) == 3 and ch == self._quote[0] and self._quote.startswith(text[i:]):
                    break                       # maybe the start of the closing triple quote
            elif ch == '"' or (self.python and ch == "'"):
                if self.python and text.startswith(ch * 3, i):
                    self._quote = ch * 3
                    i += 2
                elif self.python and (ch * 3).startswith(text[i:]):
                    break                       # '"' or '""' at the end: maybe a triple quote
                else:
                    self._quote = ch
            elif self.python and ch == "#":
                self._comment = True
            elif ch in self._OPEN:
                self._depth += 1
            elif ch in self._CLOSE:
                self._depth -= 1
                if self._depth <= 0:
                    self._pos = i + 1
                    return i + 1
            i += 1
        self._pos = i
        return None


def tools_json_lines(tools: list[dict], indent: Optional[int] = None) -> str:
    return "\n".join(json.dumps(tool, ensure_ascii=False, indent=indent) for tool in tools)


def finite_number(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


class FirstCharStreamer(ToolCallStreamer):
    """A streamer for syntaxes decided at the output's first non-whitespace character (after an
    optional `tag`): anything but `opener` streams on as plain content at once; otherwise the
    subclass's `_feed_calls` reads the calls. Until the first call is out, everything fed is kept,
    to go out as content if the calls fail to parse."""

    tag: ClassVar[str]
    opener: ClassVar[str]

    def __init__(self) -> None:
        self._mode = "start"        # start | plain | done, or the subclass's own call modes
        self._raw = ""
        self._ncalls = 0

    def feed(self, text: str) -> StreamDelta:
        out = StreamDelta()
        if self._mode == "plain":
            out.content = text
            return out
        if self._mode == "done":
            return out
        if self._ncalls == 0:
            self._raw += text
        if self._mode == "start":
            kind, i = classify_start(self._raw, self.tag, self.opener)
            if kind == WAIT:
                return out
            if kind == CONTENT:
                self._mode, out.content = "plain", self._raw
                return out
            self._mode, text = "call", self._raw[i:]
        self._feed_calls(text, out)
        return out

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self._ncalls == 0 and self._mode not in ("plain", "done"):
            out.content = self._raw
        self._mode = "done"
        return out

    def _give_up(self, out: StreamDelta) -> None:
        """The calls do not parse: all of it is content if no call went out, else the rest is dropped."""
        if self._ncalls == 0:
            self._mode, out.content = "plain", self._raw
        else:
            self._mode = "done"

    @abstractmethod
    def _feed_calls(self, text: str, out: StreamDelta) -> None:
        """Text of (or after) the calls; append complete calls to out.tool_calls."""

