"""Prefix caching on the real tiny artifact (float32): a conversation resent turn after turn, and a
shared system prompt, give the same tokens with the cache as without it, while most of each prompt
comes from the cache (its K/V copied from a store row, the rest run on a chunk graph)."""
from __future__ import annotations

import pytest

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.types import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_artifact):
    from server.runner.artifact import load_artifact
    return load_artifact(tiny_artifact)


def conversation(loaded, enable: bool, params: SamplingParams, turns: int = 4):
    """Each turn resends the whole history (prompt, the model's reply, a new user line)."""
    from server.runner.sampler import Sampler
    loaded.runner.clear_cache()
    loaded.runner.sampler = Sampler()   # seeded generators of an earlier engine's last request
    engine = LLMEngine(loaded.runner, loaded.tokenizer, EngineConfig(enable_prefix_caching=enable))
    tok = loaded.tokenizer
    prompt = tok.encode("You are a helpful assistant. Answer briefly and stay on topic.\nUser: hello there")
    replies, cached = [], []
    for turn in range(turns):
        (out,) = engine.generate([prompt], params)
        replies.append([c.token_ids for c in out.outputs])
        cached.append(out.num_cached_tokens)
        prompt = prompt + out.outputs[0].token_ids + tok.encode(f"\nUser: and turn {turn + 2}?")
    runs = [r.kind for r in engine.last_step_stats.runs] if engine.last_step_stats else []
    return replies, cached, runs


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True, n=2),
], ids=["greedy", "seeded-n2"])
def test_a_conversation_gives_the_same_tokens_with_and_without_the_cache(loaded, params):
    assert loaded.runner.prefix_cache_rows > 0
    with_cache, cached, _ = conversation(loaded, True, params)
    without, no_cache, _ = conversation(loaded, False, params)
    assert with_cache == without
    assert no_cache == [0, 0, 0, 0]
    assert cached[0] == 0 and all(c > 20 for c in cached[1:])


def test_a_shared_system_prompt_is_prefilled_once(loaded, monkeypatch):
    loaded.runner.clear_cache()
    tok = loaded.tokenizer
    system = tok.encode("System: you answer questions about the weather in one short sentence. " * 2)
    prompts = [system + tok.encode(f"User: question number {i}?") for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    cold = LLMEngine(loaded.runner, loaded.tokenizer, EngineConfig(enable_prefix_caching=False))
    want = [o.outputs[0].token_ids for o in cold.generate(prompts, params)]
    loaded.runner.clear_cache()
    warm = LLMEngine(loaded.runner, loaded.tokenizer, EngineConfig())
    first = warm.generate(prompts[:1], params)[0]
    calls, run_prefill = [], loaded.runner.run_prefill
    monkeypatch.setattr(loaded.runner, "run_prefill", lambda chunks: calls.append(chunks) or run_prefill(chunks))
    rest = warm.generate(prompts[1:], params)
    if loaded.runner.ragged:  # the three rests after the cached system prompt run in one call
        assert [[c.start_pos >= len(system) for c in call] for call in calls] == [[True, True, True]]
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == want
    assert first.num_cached_tokens == 0
    assert all(o.num_cached_tokens >= len(system) for o in rest)
    stats = warm.scheduler.prefix.snapshot()
    assert stats.hits == sum(o.num_cached_tokens for o in rest)
    assert stats.queries == sum(map(len, prompts))
