"""LLMEngine end to end over the fake runner (and, for batch invariance, the tiny real artifact)."""
from __future__ import annotations

import pytest

from engine_fakes import CharTokenizer, FakeRunner, hashed_logits, scripted_logits
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.types import (FinishReason, QueueFullError, RequestTooLongError, SamplingParams, SamplingParamsError,
                                 StepStats)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def make_engine(runner=None, observer=None, **config):
    return LLMEngine(runner or FakeRunner(), CharTokenizer(), EngineConfig(**config), observer)


def reference_greedy(runner, prompt, max_tokens, eos=0):
    tokens, out = list(prompt), []
    while True:
        token = int(hashed_logits(tokens, runner.vocab_size).argmax())
        out.append(token)
        tokens.append(token)
        if token == eos or len(out) == max_tokens or len(tokens) >= runner.max_model_len:
            return out


def toks(n, start=1):
    """n valid token ids of the fake vocab (1..31, never eos)."""
    return [(start + i - 1) % 31 + 1 for i in range(n)]


def run_to_end(engine, arrivals=None, aborts=None):
    """Step until idle, adding requests at the given steps; return {id: [outputs]}."""
    arrivals, aborts = dict(arrivals or {}), dict(aborts or {})
    outputs: dict[str, list] = {}
    step = 0
    while arrivals or engine.has_unfinished():
        for rid, prompt, params in arrivals.pop(step, []):
            engine.add_request(rid, prompt, params)
        for rid in aborts.pop(step, []):
            engine.abort(rid)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 10_000
    return outputs


def test_greedy_outputs_do_not_depend_on_the_batch():
    runner = FakeRunner(num_slots=4, max_model_len=64)
    engine = make_engine(runner)
    prompts = [toks(n, start=n) for n in (3, 20, 7, 40, 1, 16, 33)]
    max_tokens = [12, 5, 30, 9, 3, 24, 11]
    arrivals = {}
    for i, (prompt, mt) in enumerate(zip(prompts, max_tokens)):
        arrivals.setdefault(i % 3, []).append(
            (f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=mt)))
    outputs = run_to_end(engine, arrivals)
    for i, (prompt, mt) in enumerate(zip(prompts, max_tokens)):
        ids = [t for out in outputs[f"r{i}"] for c in out.outputs for t in c.token_ids]
        assert ids == reference_greedy(runner, prompt, mt), f"r{i}"
        assert [o.finished for o in outputs[f"r{i}"]].count(True) == 1
    assert engine.kv.num_used == 0 and engine.kv.num_reserved == 0


def test_generate_returns_accumulated_outputs_in_prompt_order():
    engine = make_engine()
    outs = engine.generate(["abc", [5, 6, 7, 8]], GREEDY)
    assert [o.prompt_token_ids for o in outs] == [[1, 2, 3], [5, 6, 7, 8]]
    for out in outs:
        c = out.outputs[0]
        assert out.finished and c.finish_reason is not None
        assert c.text == CharTokenizer().decode(c.token_ids)
        assert c.num_generated_tokens == len(c.token_ids)


def test_generate_with_more_prompts_than_the_queue_holds():
    engine = make_engine(max_num_queued_reqs=2)
    outs = engine.generate([[i + 1] for i in range(9)], SamplingParams(temperature=0.0, max_tokens=3))
    assert len(outs) == 9 and all(o.finished for o in outs)


def scripted_engine(script, **config):
    runner = FakeRunner(vocab_size=32, logits_fn=scripted_logits(script, 32))
    return make_engine(runner, **config), runner


TOK = CharTokenizer()


def test_stop_string_across_tokens_in_the_engine():
    prompt = tuple(TOK.encode("q"))
    continuation = TOK.encode("xy") + [CHAR_AB := 28] + TOK.encode("cde")   # "xy" "ab" "c" ...
    assert CHAR_AB == TOK.encode("a")[0] + 27
    engine, _ = scripted_engine({prompt: continuation})
    out = engine.generate([list(prompt)], SamplingParams(temperature=0.0, stop=("bc",)))[0].outputs[0]
    assert out.text == "xya" and out.finish_reason is FinishReason.STOP and out.stop_reason == "bc"
    # "ab" arrives: its "b" may start "bc" and is held back; "c" completes the stop string.
    engine.add_request("s", list(prompt), SamplingParams(temperature=0.0, stop=("bc",)))
    texts = [o.outputs[0].text for o in run_to_end(engine)["s"]]
    assert texts == ["x", "y", "a", ""]


def test_eos_stop_token_ids_ignore_eos_and_min_tokens():
    prompt = tuple(TOK.encode("q"))
    engine, _ = scripted_engine({prompt: TOK.encode("hello")})   # then eos (0) forever
    run = lambda **kw: engine.generate([list(prompt)], SamplingParams(temperature=0.0, **kw))[0].outputs[0]
    out = run()
    assert (out.text, out.finish_reason, out.stop_reason) == ("hello", FinishReason.STOP, None)
    assert out.token_ids[-1] == 0
    out = run(stop_token_ids=(TOK.encode("l")[0],))
    assert (out.text, out.stop_reason) == ("he", TOK.encode("l")[0])
    out = run(stop_token_ids=(TOK.encode("l")[0],), include_stop_str_in_output=True)
    assert out.text == "hel"
    out = run(ignore_eos=True, max_tokens=8)
    assert out.finish_reason is FinishReason.LENGTH and out.token_ids[5:] == [0, 0, 0]
    # min_tokens masks eos: the scripted model's next choice is then token 1 ("a")
    out = run(min_tokens=7, max_tokens=9)
    assert out.token_ids[:7] == TOK.encode("hello") + [1, 1] and 0 not in out.token_ids[:7]


def test_length_stop_at_max_model_len():
    runner = FakeRunner(max_model_len=24)
    engine = make_engine(runner)
    out = engine.generate([list(range(1, 21))], SamplingParams(max_tokens=None, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason is FinishReason.LENGTH
    assert len(out.outputs[0].token_ids) == 4
    out = engine.generate([list(range(1, 24))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 1


def test_bad_requests_are_refused_by_the_one_admission_check():
    engine = make_engine(FakeRunner(max_model_len=24), max_num_queued_reqs=1)
    with pytest.raises(RequestTooLongError):
        engine.check_request(list(range(1, 25)), GREEDY)
    with pytest.raises(ValueError, match="n=5"):
        engine.check_request([1], SamplingParams(n=5))
    with pytest.raises(ValueError, match="token ids"):
        engine.check_request([1, 999], GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        engine.check_request([], GREEDY)
    with pytest.raises(RequestTooLongError):      # generate checks every prompt before queueing any
        engine.generate([[1], list(range(1, 25))], GREEDY)
    assert engine.num_waiting == 0
    engine.add_request("a", [1], GREEDY)
    with pytest.raises(ValueError, match="in use"):
        engine.add_request("a", [1], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("b", [1], GREEDY)


@pytest.mark.parametrize("field,kwargs", [("top_p", {"top_p": 0.0}), ("n", {"n": 0}),
                                          ("min_tokens", {"min_tokens": 5, "max_tokens": 2}),
                                          ("stop", {"stop": ("",)}), ("logprobs", {"logprobs": 21})])
def test_sampling_params_check_themselves_and_name_the_field(field, kwargs):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field)


def test_abort_frees_the_slot_at_the_next_step():
    engine = make_engine(max_num_seqs=2)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outputs = run_to_end(engine, arrivals={0: [("a", [1, 2], params), ("b", [3], params),
                                               ("c", [4], params)]},
                         aborts={3: ["a", "c"], 4: ["a", "unknown"]})
    final_a = outputs["a"][-1]
    assert final_a.finished and final_a.outputs[0].finish_reason is FinishReason.ABORT
    assert sum(len(c.token_ids) for o in outputs["a"] for c in o.outputs) == 3
    assert outputs["c"] == [outputs["c"][0]] and outputs["c"][0].outputs[0].token_ids == []
    assert outputs["b"][-1].outputs[0].finish_reason is FinishReason.LENGTH
    assert engine.kv.num_used == 0


def test_n_choices_share_one_prefill_and_match_seeded_single_requests():
    runner = FakeRunner()
    engine = make_engine(runner)
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    out = engine.generate([list(range(1, 21))], params)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    prefills = [c for c in runner.calls if c[0] == "prefill"]
    assert len(prefills) == 2                      # 20 tokens: chunks of 16 + 4, once
    assert ("copy", 0, 1, 20) in runner.calls
    singles = [engine.generate([list(range(1, 21))],
                               SamplingParams(temperature=1.0, seed=7 + i, max_tokens=10,
                                              ignore_eos=True))[0].outputs[0].token_ids
               for i in range(2)]
    assert [c.token_ids for c in out.outputs] == singles
    assert singles[0] != singles[1]


def test_seeded_sampling_is_reproducible_across_runs_and_batch_mixes():
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=123, max_tokens=15, ignore_eos=True)
    alone = make_engine().generate([[3, 1, 4]], params)[0].outputs[0].token_ids
    again = make_engine().generate([[3, 1, 4]], params)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=9)
    engine = make_engine()
    outputs = run_to_end(engine, arrivals={
        0: [("n1", [9, 9], noise)], 1: [("n2", toks(29), noise)],
        2: [("seeded", [3, 1, 4], params), ("n3", [5], noise)]})
    mixed = [t for o in outputs["seeded"] for c in o.outputs for t in c.token_ids]
    assert alone == again == mixed


class RecordingObserver:
    def __init__(self):
        self.steps: list[StepStats] = []
        self.requests = []
        self.gaps = []

    def observe_step(self, stats):
        self.steps.append(stats)

    def observe_request(self, stats):
        self.requests.append(stats)

    def observe_token_gap(self, seconds):
        self.gaps.append(seconds)

    def observe_grammar_compile(self, kind, seconds):
        assert seconds >= 0


def test_observer_gets_step_request_and_token_gap_accounting():
    observer = RecordingObserver()
    engine = make_engine(observer=observer)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.generate([[1, 2, 3], toks(20)], [params, SamplingParams(
        n=2, temperature=0.0, max_tokens=4, ignore_eos=True)])
    assert [r.num_generation_tokens for r in observer.requests] == [6, 8] or \
        sorted(r.num_generation_tokens for r in observer.requests) == [6, 8]
    assert all(r.times.first_token and r.times.finished and r.times.scheduled
               for r in observer.requests)
    assert len(observer.gaps) == (6 - 1) + 2 * (4 - 1)
    kinds = [run.kind for s in observer.steps for run in s.runs]
    assert kinds.count("prefill") == 2 and kinds.count("prefill_chunk") == 1
    assert all(s.num_slots_total == 4 and 0 <= s.num_slots_used <= 4 for s in observer.steps)
    assert observer.steps[-1].num_running == 0


def test_metrics_accepts_the_engine_stats():
    from server.metrics import Metrics
    metrics = Metrics("fake")
    engine = make_engine(observer=metrics)
    engine.generate(["abc"], GREEDY)
    assert "kiln:time_to_first_token_seconds_count" in metrics.metric_names()


def test_logprobs_are_streamed_with_tokens():
    engine = make_engine()
    out = engine.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2,
                                                  ignore_eos=True))[0].outputs[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in out.logprobs)


def test_batch_invariance_on_the_tiny_artifact(tiny_artifact):
    from server.runner.artifact import load_artifact
    loaded = load_artifact(tiny_artifact)
    engine = LLMEngine(loaded.runner, loaded.tokenizer, EngineConfig())
    tok = loaded.tokenizer
    target = tok.encode("The quick brown fox jumps over the lazy dog.")
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = engine.generate([target], params)[0].outputs[0].token_ids
    others = [(tok.encode("Hello there, general Kenobi " * k), SamplingParams(
        temperature=0.0, max_tokens=3 + 5 * k, ignore_eos=True)) for k in range(1, 7)]
    long_prompt = tok.encode("Once upon a time " * 20)[:100]     # > 64: chunked prefill
    arrivals = {0: [("o0", *others[0]), ("o1", *others[1])],
                2: [("target", target, params), ("long", long_prompt, others[2][1])],
                4: [("o3", *others[3])], 7: [("o4", *others[4]), ("o5", *others[5])]}
    outputs = run_to_end(engine, arrivals)
    mixed = [t for o in outputs["target"] for c in o.outputs for t in c.token_ids]
    assert mixed == alone


def test_temperature_zero_and_top_k_one_are_greedy_in_the_engine():
    runner = FakeRunner()
    prompt = toks(9, start=4)
    want = reference_greedy(runner, prompt, 12)
    for params in (SamplingParams(temperature=0.0, max_tokens=12),
                   SamplingParams(temperature=1.5, top_k=1, max_tokens=12)):
        out = make_engine(runner).generate([prompt], params)[0].outputs[0]
        assert out.token_ids == want


def test_the_engine_package_imports_without_torch():
    """The engine is bookkeeping only: torch stays behind the runner (server/runner)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "import server.engine.llm_engine, server.engine.async_engine, server.engine.scheduler, server.engine.stop\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_non_finite_logits_fail_only_that_sequence_and_free_its_slot():
    poison = (9, 9, 9)

    def logits(tokens):
        out = hashed_logits(tokens, 32)
        if tuple(tokens[:3]) == poison and len(tokens) > 4:
            out[3] = float("nan")           # from its second generated token on
        return out

    engine = make_engine(FakeRunner(logits_fn=logits))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = engine.generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    bad, good = engine.generate([list(poison) + [4], [1, 2, 3]], params)
    assert bad.outputs[0].finish_reason is FinishReason.ERROR and len(bad.outputs[0].token_ids) == 1
    assert good.outputs[0].token_ids == alone and good.outputs[0].finish_reason is FinishReason.LENGTH
    assert engine.kv.num_used == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("seconds_per_token, expected, timed_buckets", [
    (0.0005, 512, [64, 128, 192, 256, 512]),  # 512 tokens in 0.26 s (the AMX Xeon): the untimed default
    (0.0026, 128, [64, 128, 192]),            # 128 in 0.33 s, 192 in 0.50 s (the AVX2 EPYC): stops at 192
    (0.01, 64, [64]),                         # even the smallest bucket is over the target: still the budget
])
def test_timed_token_budget_is_the_largest_bucket_within_the_target(seconds_per_token, expected, timed_buckets):
    from server.engine.config import STEP_PREFILL_TARGET_S, timed_token_budget
    timed = []

    def seconds_for(tokens):
        timed.append(tokens)
        return tokens * seconds_per_token

    assert STEP_PREFILL_TARGET_S == 0.4
    assert timed_token_budget(seconds_for, (64, 128, 192, 256, 512, 1024, 2048)) == expected
    assert timed == timed_buckets       # smallest first, never past 512, none after the first over the target


def test_set_token_budget_bounds_every_later_step():
    engine = make_engine(max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="max_num_batched_tokens=17 exceeds the largest context bucket 16"):
        engine.set_token_budget(17)
    with pytest.raises(ValueError, match="must be a positive integer, got 0"):
        engine.set_token_budget(0)
    assert engine.config.max_num_batched_tokens == 16 and engine.scheduler.token_budget == 16   # unchanged
    engine.set_token_budget(8)
    assert engine.config.max_num_batched_tokens == 8
    for i in range(3):
        engine.add_request(f"r{i}", toks(14, start=i + 1), GREEDY)
    while engine.has_unfinished():
        engine.step()
        prefilled = sum(r.num_real_tokens for r in engine.last_step_stats.runs if r.kind.startswith("prefill"))
        assert prefilled <= 8
