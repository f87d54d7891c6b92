"""Property test: random arrivals, prompt lengths, limits, aborts and stop strings over the fake runner.

Whatever hypothesis draws, every accepted request finishes exactly once with a finish reason
that its tokens justify, limits hold, text never shows a stop string, greedy outputs equal
the model's own greedy continuation (so slot moves never corrupt a cache), no slot leaks and
the queue drains.
"""
from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine_fakes import CharTokenizer, FakeRunner, RequestSpec, hashed_logits
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.types import FinishReason, QueueFullError, SamplingParams

MAX_MODEL_LEN = 40
EOS = 0
STOP_TOKEN = 5
TOK = CharTokenizer()


@st.composite
def specs(draw):
    prompt_len = draw(st.integers(1, MAX_MODEL_LEN - 1))
    max_tokens = draw(st.one_of(st.none(), st.integers(1, 20)))
    params = SamplingParams(
        n=draw(st.sampled_from([1, 1, 2])),
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, min(3, max_tokens or 3))),
        temperature=draw(st.sampled_from([0.0, 0.0, 1.0])),
        seed=draw(st.one_of(st.none(), st.integers(0, 100))),
        stop=tuple(draw(st.lists(st.sampled_from(["e", "ab", "b a", "zz", "k", "c\n"]), max_size=2))),
        stop_token_ids=draw(st.sampled_from([(), (STOP_TOKEN,)])),
        ignore_eos=draw(st.booleans()),
        include_stop_str_in_output=draw(st.booleans()))
    prompt = draw(st.lists(st.integers(1, 31), min_size=prompt_len, max_size=prompt_len))
    return RequestSpec(draw(st.integers(0, 12)), prompt, params,
                draw(st.one_of(st.none(), st.none(), st.integers(0, 8))))


class Observer:
    def __init__(self, budget):
        self.requests = []
        self.budget = budget

    def observe_step(self, stats):
        assert stats.num_slots_used <= stats.num_slots_total
        # the token budget: no step prefills more prompt tokens than max_num_batched_tokens
        assert sum(r.num_real_tokens for r in stats.runs if r.kind != "decode") <= self.budget

    def observe_request(self, stats):
        self.requests.append(stats)

    def observe_token_gap(self, seconds):
        assert seconds >= 0

    def observe_grammar_compile(self, kind, seconds):
        assert seconds >= 0


def greedy_prefix(runner, prompt, length):
    tokens = list(prompt)
    for _ in range(length):
        tokens.append(int(hashed_logits(tokens, runner.vocab_size).argmax()))
    return tokens[len(prompt):]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(specs(), min_size=1, max_size=10),
       max_num_seqs=st.integers(1, 4), max_queued=st.integers(1, 6),
       budget=st.sampled_from([3, 8, 16]), pack=st.sampled_from([1, 3]))
def test_engine_invariants(requests, max_num_seqs, max_queued, budget, pack):
    runner = FakeRunner(num_slots=4, max_model_len=MAX_MODEL_LEN, context_buckets=(8, 16),
                        kv_buckets=(16, 32, 40), pack=pack)
    observer = Observer(budget)
    engine = LLMEngine(runner, TOK, EngineConfig(max_num_seqs=max_num_seqs,
                                                 max_num_queued_reqs=max_queued,
                                                 max_num_batched_tokens=budget), observer)
    accepted: dict[str, RequestSpec] = {}
    outputs: dict[str, list] = {}
    aborted_at: dict[str, int] = {}
    finished_at: dict[str, int] = {}
    step = 0
    last_arrival = max(s.arrival for s in requests)
    while step <= last_arrival or engine.has_unfinished():
        for i, spec in enumerate(requests):
            rid = f"r{i}"
            if spec.arrival == step and spec.params.n <= max_num_seqs:
                try:
                    engine.add_request(rid, spec.prompt, spec.params)
                    accepted[rid] = spec
                except QueueFullError:
                    assert engine.num_waiting == max_queued
            if rid in accepted and spec.abort_after is not None \
                    and step == spec.arrival + spec.abort_after:
                engine.abort(rid)
                aborted_at.setdefault(rid, step)
        for out in engine.step():
            assert out.request_id not in finished_at, "output after the final one"
            outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                finished_at[out.request_id] = step
        engine.kv.check()
        step += 1
        assert step < 2_000, "engine does not drain"

    assert engine.kv.num_used == 0 and engine.kv.num_reserved == 0
    assert engine.num_waiting == 0 and engine.num_running == 0
    assert set(finished_at) == set(accepted)
    assert sorted(r.request_id for r in observer.requests) == sorted(accepted)
    for rid, spec in accepted.items():
        check_request(runner, spec, outputs[rid], rid in aborted_at)


def check_request(runner, spec, outs, was_aborted):
    params = spec.params
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    for index in range(params.n):
        choice = [c for o in outs for c in o.outputs if c.index == index]
        tokens = [t for c in choice for t in c.token_ids]
        text = "".join(c.text for c in choice)
        reasons = [c.finish_reason for c in choice if c.finish_reason is not None]
        assert len(reasons) == 1 and choice[-1].finish_reason is reasons[0]
        reason, stop_reason = reasons[0], choice[-1].stop_reason
        event(f"finish {reason.value}" + (" (stop string)" if isinstance(stop_reason, str) else ""))
        assert choice[-1].num_generated_tokens == len(tokens)
        assert len(tokens) <= (params.max_tokens or MAX_MODEL_LEN)
        assert len(spec.prompt) + len(tokens) <= MAX_MODEL_LEN
        stoppers = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
        assert not stoppers & set(tokens[:params.min_tokens])
        assert not stoppers & set(tokens[:-1])
        if reason is FinishReason.ABORT:
            assert was_aborted
        elif reason is FinishReason.LENGTH:
            assert len(tokens) == params.max_tokens or len(spec.prompt) + len(tokens) == MAX_MODEL_LEN
        else:
            assert len(tokens) > params.min_tokens
            assert tokens[-1] in stoppers or stop_reason in params.stop
        if not params.include_stop_str_in_output and params.min_tokens == 0:
            # (as in vLLM, text of the first min_tokens tokens is never searched)
            assert not any(s in text for s in params.stop)
        full = TOK.decode(tokens[:-1] if tokens and tokens[-1] in stoppers
                          and not params.include_stop_str_in_output else tokens)
        assert full.startswith(text)
        if isinstance(stop_reason, str):
            rest = full[len(text):]
            assert (text.endswith(stop_reason) if params.include_stop_str_in_output
                    else rest.startswith(stop_reason))
        elif reason is not FinishReason.ABORT:
            assert text == full
        if (params.temperature == 0.0 and params.min_tokens == 0 and tokens):
            assert tokens == greedy_prefix(runner, spec.prompt, len(tokens))
