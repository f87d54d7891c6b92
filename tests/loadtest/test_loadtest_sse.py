"""SSE decoding, stream timing and request bodies shared by the locustfile and the bench."""

from __future__ import annotations

import json

import pytest

from loadtest.openai_api import SSEDecoder, StreamRecorder, build_body, choice_text, timing_from_body


def events(lines: list[str]) -> list[str]:
    decoder = SSEDecoder()
    out = [d for line in lines if (d := decoder.feed(line)) is not None]
    if (tail := decoder.flush()) is not None:
        out.append(tail)
    return out


def test_sse_framing() -> None:
    lines = [": keep-alive comment", "event: message", "data: {\"a\": 1}", "", "data:no-space", "\r",
             "data: line one", "data: line two", "", "", "id: 7", "data: [DONE]"]
    assert events(lines) == ['{"a": 1}', "no-space", "line one\nline two", "[DONE]"]


def completion_chunk(text: str) -> str:
    return "data: " + json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": text}]})


def chat_chunk(delta: dict) -> str:
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]})


def feed(recorder: StreamRecorder, timed_lines: list[tuple[float, str]]) -> None:
    for now, line in timed_lines:
        recorder.feed_line(line, now)
        recorder.feed_line("", now)


def test_stream_timing_with_usage() -> None:
    rec = StreamRecorder(start=100.0)
    feed(rec, [(100.5, completion_chunk("a")), (100.6, completion_chunk("")), (100.7, completion_chunk("b")),
               (101.0, completion_chunk("c")),
               (101.1, "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})),
               (101.1, "data: [DONE]")])
    t = rec.finish(101.2)
    assert t.ok and t.error is None
    assert t.ttft == pytest.approx(0.5)
    assert t.itls == pytest.approx([0.2, 0.3])  # the empty chunk is not a token
    assert t.latency == pytest.approx(1.2)
    assert (t.output_tokens, t.prompt_tokens, t.tokens_from_usage) == (4, 9, True)  # usage wins over 3 chunks
    assert t.tpot == pytest.approx((1.2 - 0.5) / 3)
    assert t.token_times == pytest.approx([0.5, 0.7, 1.0])


def test_chat_role_chunk_is_not_the_first_token_and_chunks_count_without_usage() -> None:
    rec = StreamRecorder(start=0.0)
    feed(rec, [(0.1, chat_chunk({"role": "assistant", "content": ""})), (0.4, chat_chunk({"content": "Hi"})),
               (0.5, chat_chunk({"content": " there"})), (0.6, chat_chunk({})), (0.6, "data: [DONE]")])
    t = rec.finish(0.7)
    assert t.ttft == pytest.approx(0.4)
    assert (t.output_tokens, t.tokens_from_usage, t.prompt_tokens) == (2, False, None)
    assert t.num_chars == len("Hi there")


def test_error_event_and_bad_data_fail_the_request() -> None:
    rec = StreamRecorder(start=0.0)
    feed(rec, [(0.1, completion_chunk("a")), (0.2, 'data: {"error": {"message": "engine died"}}')])
    t = rec.finish(0.3)
    assert not t.ok and "engine died" in t.error
    rec = StreamRecorder(start=0.0)
    feed(rec, [(0.1, "data: {not json")])
    assert not rec.finish(0.2).ok
    broken = StreamRecorder(start=0.0)
    assert broken.finish(1.0, error="stream broken: reset").error == "stream broken: reset"


def test_stream_without_trailing_blank_line_still_counts_the_last_event() -> None:
    rec = StreamRecorder(start=0.0)
    rec.feed_line(completion_chunk("a"), 0.1)
    t = rec.finish(0.2)
    assert t.ttft == pytest.approx(0.2) and t.output_tokens == 1  # the event is complete only at the end


def test_unstreamed_bodies() -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    t = timing_from_body(body, 1.0, 3.0)
    assert t.ok and t.ttft == t.latency == pytest.approx(2.0)
    assert (t.output_tokens, t.prompt_tokens) == (3, 5)
    assert not timing_from_body({"error": {"message": "bad"}}, 0, 1).ok
    assert not timing_from_body({"choices": []}, 0, 1).ok
    assert choice_text({"choices": [{"text": "x"}]}) == "x"
    assert choice_text({"choices": [{"delta": {"reasoning_content": "r"}}]}) == "r"


def test_request_bodies() -> None:
    body = build_body("chat", "m", "hello", 7, stream=True, temperature=0.0, ignore_eos=True, extra={"top_p": 0.9})
    assert body == {"model": "m", "max_tokens": 7, "temperature": 0.0,
                    "messages": [{"role": "user", "content": "hello"}], "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "top_p": 0.9}
    plain = build_body("completions", "m", "hello", 7, stream=False, temperature=1.0)
    assert plain == {"model": "m", "max_tokens": 7, "temperature": 1.0, "prompt": "hello"}
    with pytest.raises(ValueError):
        build_body("embeddings", "m", "x", 1, stream=False, temperature=0)
