"""Incremental detokenization (UTF-8 safe) and stop strings (through the engine's one stop check,
server/engine/stop.py), with the real SmolLM2 byte-level BPE."""
from __future__ import annotations

import pytest

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import Request
from server.engine.stop import check_stop
from server.engine.types import FinishReason, SamplingParams

PROMPT = "Say something:"


def stream(tokenizer, text, prompt=PROMPT, **params):
    """Feed `text`'s tokens one by one; return (deltas, stop string or None, final text)."""
    ids = tokenizer.encode(text)
    params = SamplingParams(max_tokens=None, **params)
    seq = Request("r", tokenizer.encode(prompt), params, arrival=0.0).seqs[0]
    seq.detokenizer = detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), params)
    deltas, stop = [], None
    for i, token_id in enumerate(ids):
        seq.append_token(token_id, None)
        check_stop(seq, token_id, eos_token_ids=(), max_model_len=10_000)
        if seq.is_finished:
            assert seq.finish_reason is FinishReason.STOP
            stop = seq.stop_reason
        finished = stop is not None or i == len(ids) - 1
        deltas.append(detok.get_delta(finished))
        if stop is not None:
            break
    return deltas, stop, detok.output_text


@pytest.mark.parametrize("text", ["héllo 😀 世界 ok", "Price: 100€ 🎉 done", "日本語のテキスト"])
def test_multibyte_characters_split_over_tokens_are_never_emitted_broken(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    assert any("\ufffd" in smollm2_tokenizer.decode([i]) for i in ids), "no split character"
    deltas, stop, full = stream(smollm2_tokenizer, text)
    assert stop is None
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == full == text
    assert "" in deltas                     # something was held back until its last byte came


def test_stop_string_spanning_a_token_boundary_is_cut_and_never_leaks(smollm2_tokenizer):
    deltas, stop, full = stream(smollm2_tokenizer, "Hello world, how are you?", stop=("o wor",))
    assert stop == "o wor"
    assert "".join(deltas) == full == "Hell"
    assert deltas[0] == "Hell"              # the trailing "o" may start "o wor": held back


def test_include_stop_str_in_output(smollm2_tokenizer):
    deltas, stop, full = stream(smollm2_tokenizer, "Hello world, how are you?",
                                stop=("o wor",), include_stop_str_in_output=True)
    assert stop == "o wor" and "".join(deltas) == full == "Hello wor"


def test_held_back_prefix_is_released_when_the_stop_string_does_not_follow(smollm2_tokenizer):
    deltas, stop, full = stream(smollm2_tokenizer, "Hello world, how are you?",
                                stop=("world!", "you."))
    assert stop is None and "".join(deltas) == full == "Hello world, how are you?"
    assert deltas[1] == " "                 # "world" could still become "world!"
    assert deltas[2] == "world,"


def test_stop_string_made_of_a_split_emoji(smollm2_tokenizer):
    deltas, stop, full = stream(smollm2_tokenizer, "Price: 100€ 🎉 done", stop=("🎉",))
    assert stop == "🎉" and "".join(deltas) == full == "Price: 100€ "


def test_earliest_of_several_stop_strings_wins(smollm2_tokenizer):
    _, stop, full = stream(smollm2_tokenizer, "Hello world, how are you?", stop=(", how", "world"))
    assert stop == "world" and full == "Hello "


def test_stop_strings_wait_for_min_tokens(smollm2_tokenizer):
    # "Hello" is token 1: with min_tokens=1 it cannot stop; the later "you" can.
    _, stop, full = stream(smollm2_tokenizer, "Hello world, how are you?", stop=("Hello", "you"),
                           min_tokens=1)
    assert stop == "you" and full == "Hello world, how are "


def test_stop_token_text_can_be_skipped(smollm2_tokenizer):
    detok = IncrementalDetokenizer(smollm2_tokenizer, [1, 2], SamplingParams())
    for token_id in smollm2_tokenizer.encode("Hi there"):
        detok.update(token_id)
    detok.update(smollm2_tokenizer.encode(".")[0], skip_text=True)
    assert detok.get_delta(True) == "Hi there"
