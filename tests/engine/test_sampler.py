"""server/runner/sampler.py: per-row params, seeds independent of the batch, vLLM semantics."""
from __future__ import annotations

import math

import pytest
import torch

from server.engine.types import SamplingParams, SamplingRow
from server.runner.sampler import Sampler

V = 50


def logits_batch(rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def row(params=None, prompt=(1, 2, 3), output=(), key="r#0", banned=()):
    """A row; a seeded params' row draws from the generator the sampler keeps under `key`."""
    params = params or SamplingParams()
    return SamplingRow(key, params, list(prompt), list(output), params.seed, tuple(banned))


def test_greedy_temperature_zero_and_top_k_one_take_the_argmax():
    logits = logits_batch()
    expected = logits.argmax(dim=-1).tolist()
    sampler = Sampler()
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1),
                   SamplingParams(temperature=1e-7)):
        assert sampler.sample(logits, [row(params)] * 4).token_ids == expected


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_with_any_non_finite_logit_fail_and_the_others_sample(temperature):
    logits = logits_batch(rows=5)
    logits[1, 7], logits[2, 0], logits[3, V - 1] = float("inf"), float("-inf"), float("nan")
    out = Sampler(seed=0).sample(logits, [row(SamplingParams(temperature=temperature), key=f"r#{i}")
                                          for i in range(5)])
    assert out.failed_rows == [1, 2, 3]
    assert all(0 <= t < V for t in out.token_ids)
    if temperature == 0.0:
        assert [out.token_ids[i] for i in (0, 4)] == logits[[0, 4]].argmax(dim=-1).tolist()


def test_does_not_modify_the_runner_logits():
    logits = logits_batch()
    before = logits.clone()
    Sampler().sample(logits, [row(SamplingParams(temperature=0.5, top_p=0.5,
                                                 repetition_penalty=1.5))] * 4)
    assert torch.equal(logits, before)


def seeded_draws(position, batch_rows, seed=1234, steps=6):
    """Draw `steps` tokens for one seeded row placed at `position` among unseeded ones."""
    sampler = Sampler(seed=99)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.01, seed=seed)
    tokens = []
    for step in range(steps):
        logits = logits_batch(batch_rows, seed=100 + step)
        target = logits_batch(1, seed=step)[0]
        logits[position] = target
        rows = [row(SamplingParams(temperature=1.3), key=f"other#{i}") for i in range(batch_rows)]
        rows[position] = row(params, key="seeded#0")
        tokens.append(sampler.sample(logits, rows).token_ids[position])
    return tokens


def test_seeded_row_reproduces_whatever_its_batch_position_and_neighbours():
    alone = seeded_draws(0, 1)
    assert seeded_draws(0, 5) == alone
    assert seeded_draws(3, 5) == alone
    assert seeded_draws(1, 2) == alone
    assert seeded_draws(0, 1, seed=4321) != alone


def test_seeded_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)] + [-1e9] * (V - 2)])
    sampler = Sampler()
    draws = [sampler.sample(logits, [row(SamplingParams(seed=0))]).token_ids[0] for _ in range(2000)]
    assert set(draws) <= {0, 1}
    assert 0.70 < draws.count(1) / len(draws) < 0.80   # p = 0.75


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.arange(V, dtype=torch.float32).unsqueeze(0) * 0.5   # best token is V-1
    sampler = Sampler(seed=0)
    cases = [(SamplingParams(top_k=3), set(range(V - 3, V))),
             # softmax of 0.5-spaced logits: the top token has p ~ 0.39, top two ~ 0.63
             (SamplingParams(top_p=0.5), {V - 1, V - 2}),
             # min_p 0.5: keep tokens with p >= 0.5 * p_max, i.e. within log(2) of the best
             (SamplingParams(min_p=0.5), {V - 1, V - 2})]
    for params, allowed in cases:
        seen = {sampler.sample(logits, [row(params)]).token_ids[0] for _ in range(300)}
        assert seen == allowed, params


def test_penalties_follow_vllm():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5] + [-50.0] * (V - 4)])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25, logprobs=V - 30)
    out = Sampler().sample(logits, [row(params, prompt=[0], output=[1, 2, 2])], "processed")
    # token 0 (prompt): 2/2 = 1.0; token 1: -2*2 - 0.5*1 - 0.25 = -4.75;
    # token 2: 1/2 - 0.5*2 - 0.25 = -0.75; token 3 untouched: 0.5
    expected = torch.tensor([1.0, -4.75, -0.75, 0.5] + [-50.0] * (V - 4))
    assert out.token_ids == [0]
    want = torch.log_softmax(expected, dim=-1)
    assert math.isclose(out.logprobs[0].logprob, want[0].item(), rel_tol=1e-5)


def test_banned_tokens_never_sampled():
    logits = torch.zeros(1, V)
    logits[0, 7] = 100.0
    out = Sampler().sample(logits, [row(SamplingParams(temperature=0.0), banned=(7, 999))])
    assert out.token_ids[0] != 7


def test_raw_logprobs_ignore_temperature_and_processed_ones_do_not():
    logits = logits_batch(1)
    params = SamplingParams(temperature=0.5, top_k=5, logprobs=3, seed=0)
    raw = Sampler().sample(logits, [row(params)], "raw").logprobs[0]
    processed = Sampler().sample(logits, [row(params)], "processed").logprobs[0]
    want = torch.log_softmax(logits[0], dim=-1)
    assert raw.token_id == processed.token_id
    assert math.isclose(raw.logprob, want[raw.token_id].item(), rel_tol=1e-5)
    top_ids = want.topk(3).indices.tolist()
    assert [t for t, _ in raw.top] == top_ids == [t for t, _ in processed.top]
    assert processed.logprob > raw.logprob    # sharper (T=0.5) and truncated to 5 tokens


def test_logprobs_zero_returns_only_the_sampled_token_and_mixed_batches_work():
    logits = logits_batch(3)
    rows = [row(SamplingParams(temperature=0.0, logprobs=0)), row(SamplingParams(temperature=0.0)),
            row(SamplingParams(temperature=0.0, logprobs=2))]
    out = Sampler().sample(logits, rows)
    assert out.logprobs[1] is None
    assert out.logprobs[0].top == [] and len(out.logprobs[2].top) == 2
    assert out.logprobs[2].top[0][0] == out.token_ids[2]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8),
                                    SamplingParams(temperature=0.8, top_p=0.3, top_k=7)])
def test_unseeded_rows_still_sample(params):
    logits = logits_batch(2)
    out = Sampler().sample(logits, [row(params), row(params)])
    assert all(0 <= t < V for t in out.token_ids)


def vllm_top_k_top_p(logits, k, p):
    """vLLM's apply_top_k_top_p (full sort), the reference."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    top_k_mask = logits_sort.gather(1, (logits_sort.size(1) - k).unsqueeze(1))
    logits_sort.masked_fill_(logits_sort < top_k_mask, -float("inf"))
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(1)
    top_p_mask[:, -1] = False
    logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)


@pytest.mark.parametrize("candidates", [8, 64, 4096])
def test_top_k_top_p_matches_vllm_full_sort(monkeypatch, candidates):
    from server.runner import sampler as sampler_module
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", candidates)
    vocab = 3000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, vocab, generator=g) * torch.tensor([0.5, 1, 2, 4, 8, 1, 3, 6]).unsqueeze(1)
    k = torch.tensor([vocab, 5, vocab, 40, vocab, 1000, 2, vocab])
    p = [0.9, 0.5, 0.99, 1.0, 0.3, 0.95, 1.0, 0.7]
    ours = sampler_module._apply_top_k_top_p(logits.clone(), k, p)
    want = vllm_top_k_top_p(logits.clone(), k, torch.tensor(p))
    assert torch.equal(ours.isinf(), want.isinf())
    assert torch.equal(ours[~ours.isinf()], logits[~ours.isinf()])


def test_a_released_key_starts_its_seeded_generator_again():
    logits = torch.zeros(1, V)
    params = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler()
    first = [sampler.sample(logits, [row(params)]).token_ids[0] for _ in range(8)]
    assert [sampler.sample(logits, [row(params)]).token_ids[0] for _ in range(8)] != first  # same stream goes on
    sampler.release(["r#0"])
    assert [sampler.sample(logits, [row(params)]).token_ids[0] for _ in range(8)] == first
