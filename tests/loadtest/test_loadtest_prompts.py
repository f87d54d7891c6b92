"""Prompt length distributions, prompt text and locust load shapes."""

from __future__ import annotations

import random

import pytest

from loadtest.prompts import (
    WORDS, FixedLength, LognormalLength, PromptSampler, UniformLength, make_prompt, parse_length_spec,
)
from loadtest.stages import Stage, parse_duration, parse_stages, stage_at


def test_length_specs() -> None:
    assert parse_length_spec("128") == FixedLength(128)
    assert parse_length_spec(" fixed:64 ") == FixedLength(64)
    assert parse_length_spec("uniform:8:32") == UniformLength(8, 32)
    assert parse_length_spec("lognormal:median=100,sigma=0.5,min=2,max=900") == LognormalLength(100, 0.5, 2, 900)
    chat = parse_length_spec("chat")
    assert isinstance(chat, LognormalLength) and chat.max_length <= 2048
    for bad in ("", "zero:1", "uniform:9:3", "fixed:0", "lognormal:sigma=1", "lognormal:median=5,mode=3", "uniform:1"):
        with pytest.raises(ValueError):
            parse_length_spec(bad)


def test_lognormal_is_long_tailed_and_clipped() -> None:
    dist = LognormalLength(median=100, sigma=1.0, min_length=4, max_length=1500)
    rng = random.Random(0)
    xs = sorted(dist.sample(rng) for _ in range(5000))
    median, p99 = xs[len(xs) // 2], xs[int(len(xs) * 0.99)]
    assert 85 <= median <= 115
    assert p99 > 5 * median  # the long tail
    assert xs[0] >= 4 and xs[-1] <= 1500
    assert all(8 <= UniformLength(8, 12).sample(rng) <= 12 for _ in range(100))


def test_prompt_sampler_is_reproducible() -> None:
    a = PromptSampler(UniformLength(5, 50), FixedLength(16), seed=42)
    b = PromptSampler(UniformLength(5, 50), FixedLength(16), seed=42)
    draws = [a.sample() for _ in range(20)]
    assert draws == [b.sample() for _ in range(20)]
    assert all(len(prompt.split()) == n and max_tokens == 16 for prompt, n, max_tokens in draws)
    assert set(make_prompt(random.Random(1), 200).split()) <= set(WORDS)


def test_each_word_is_one_token_for_smollm2(request: pytest.FixtureRequest) -> None:
    try:
        tokenizer_dir = request.getfixturevalue("smollm2_tokenizer_dir")
    except LookupError:
        pytest.skip("no smollm2_tokenizer_dir fixture")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert all(len(tok.encode(" " + w, add_special_tokens=False).ids) == 1 for w in WORDS)
    prompt = make_prompt(random.Random(0), 300)
    assert len(tok.encode(prompt, add_special_tokens=False).ids) == 300


def test_stages() -> None:
    assert parse_duration("90") == 90 and parse_duration("2m") == 120 and parse_duration("1.5h") == 5400
    stages = parse_stages("30s:1, 1m:8:2")
    assert stages == [Stage(30, 1, 1.0), Stage(60, 8, 2.0)]
    assert stage_at(stages, 0) == stages[0] and stage_at(stages, 29.9) == stages[0]
    assert stage_at(stages, 30) == stages[1] and stage_at(stages, 90) is None
    for bad in ("", "30s", "x:1", "10s:-1", "10s:1:0"):
        with pytest.raises(ValueError):
            parse_stages(bad)
