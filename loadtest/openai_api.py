"""OpenAI API request bodies, SSE decoding and per-request timing, shared by locust and the bench.

Timing definitions (the same as `vllm bench serve`, with one difference noted):
- TTFT: request sent -> first chunk that carries text. NOTE: vLLM's client also counts a chat
  chunk that only carries `role` (no content) as the first token; we skip chunks with no text,
  so a server that sends the role chunk early does not look faster than it is.
- ITL: gaps between successive text-carrying chunks (one chunk is usually one token).
- E2EL: request sent -> end of the response.
- TPOT: (E2EL - TTFT) / (output_tokens - 1), for output_tokens > 1.
- output tokens: `usage.completion_tokens` (we ask for it with stream_options.include_usage);
  when the server sends no usage, the number of text-carrying chunks.
- cached prompt tokens: `usage.prompt_tokens_details.cached_tokens` (OpenAI's field, which Kiln
  and vLLM with prefix caching send); None when the server does not send it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]
ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def build_body(
    endpoint: str,
    model: str,
    prompt: str | Messages,
    max_tokens: int,
    *,
    stream: bool,
    temperature: float,
    ignore_eos: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of one completions or chat request. `ignore_eos` is vLLM's extra field.

    `prompt` is the text (sent as one user message to chat), or for chat a whole conversation
    (a list of {"role", "content"} messages: a system prompt, earlier turns).
    """
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    elif endpoint == "completions":
        if not isinstance(prompt, str):
            raise ValueError("a list of messages needs the chat endpoint")
        body["prompt"] = prompt
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINT_PATHS)}")
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


def choice_text(obj: dict[str, Any]) -> str:
    """Text of choices[0] in a completions/chat response or stream chunk ('' if none)."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    part = choice.get("delta") or choice.get("message") or {}
    return part.get("content") or part.get("reasoning_content") or ""


def error_message(obj: Any) -> str | None:
    """The message of an OpenAI-style error object, or None when `obj` is not one."""
    if not isinstance(obj, dict) or "error" not in obj:
        return None
    err = obj["error"]
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


class SSEDecoder:
    """Turns the lines of a text/event-stream into the `data` payload of each event.

    Follows the SSE framing rules that matter here: `data:` lines of one event are joined with
    newlines, the event ends at a blank line, comment lines (':') and other fields are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Feed one line (without its newline); returns the event's data when the event ends."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The pending event's data at end of stream (None when there is none)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


@dataclass
class RequestTiming:
    """What one request measured. Times are seconds; token_times are offsets from the start."""

    ok: bool
    error: str | None = None
    ttft: float | None = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server served from its prefix cache
    tokens_from_usage: bool = False
    num_chars: int = 0

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output_tokens - 1); None with fewer than 2 tokens or no TTFT."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


class StreamRecorder:
    """Accumulates one streamed response; call feed_line per line, then finish().

    keep_text: also keep the generated text (`.text`), e.g. to send it back as the assistant's turn.
    """

    def __init__(self, start: float, keep_text: bool = False) -> None:
        self.start = start
        self.decoder = SSEDecoder()
        self.timing = RequestTiming(ok=True)
        self.done = False
        self._last: float | None = None
        self._usage: dict[str, Any] | None = None
        self._parts: list[str] | None = [] if keep_text else None

    @property
    def text(self) -> str | None:
        """The text so far (None unless keep_text)."""
        return None if self._parts is None else "".join(self._parts)

    def feed_line(self, line: str, now: float) -> None:
        data = self.decoder.feed(line)
        if data is not None:
            self._on_data(data, now)

    def _on_data(self, data: str, now: float) -> None:
        if self.done or self.timing.error:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            self.timing.error = f"bad SSE data: {data[:200]!r}"
            return
        if message := error_message(obj):
            self.timing.error = f"error event: {message}"
            return
        if isinstance(obj.get("usage"), dict):
            self._usage = obj["usage"]
        text = choice_text(obj)
        if not text:
            return
        t = self.timing
        if t.ttft is None:
            t.ttft = now - self.start
        else:
            t.itls.append(now - self._last)
        self._last = now
        t.token_times.append(now - self.start)
        t.num_chars += len(text)
        if self._parts is not None:
            self._parts.append(text)

    def finish(self, now: float, error: str | None = None) -> RequestTiming:
        tail = self.decoder.flush()
        if tail is not None:
            self._on_data(tail, now)
        t = self.timing
        t.latency = now - self.start
        t.error = t.error or error
        t.ok = t.error is None
        _apply_usage(t, self._usage, fallback_tokens=len(t.token_times))
        return t


def timing_from_body(obj: Any, start: float, now: float) -> RequestTiming:
    """Timing of a non-streamed response: TTFT is the whole latency (no tokens seen earlier)."""
    latency = now - start
    if message := error_message(obj):
        return RequestTiming(ok=False, error=message, latency=latency)
    if not isinstance(obj, dict) or not obj.get("choices"):
        return RequestTiming(ok=False, error=f"no choices in response: {str(obj)[:200]}", latency=latency)
    text = choice_text(obj)
    t = RequestTiming(ok=True, ttft=latency, latency=latency, num_chars=len(text))
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
    _apply_usage(t, usage, fallback_tokens=len(text.split()))
    return t


def _apply_usage(t: RequestTiming, usage: dict[str, Any] | None, fallback_tokens: int) -> None:
    completion = (usage or {}).get("completion_tokens")
    if isinstance(completion, int):
        t.output_tokens, t.tokens_from_usage = completion, True
    else:
        t.output_tokens = fallback_tokens
    prompt = (usage or {}).get("prompt_tokens")
    if isinstance(prompt, int):
        t.prompt_tokens = prompt
    details = (usage or {}).get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, int) and not isinstance(cached, bool):
        t.cached_tokens = cached
