"""The prefix cache: what a store row holds, what a lookup finds, and (property test) that an engine
reusing cached prefixes gives every request exactly the tokens it gives without the cache."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine_fakes import CharTokenizer, FakeRunner, RequestSpec
from server.engine.config import EngineConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.llm_engine import LLMEngine
from server.engine.prefix_cache import PrefixCache
from server.engine.scheduler import Scheduler
from server.engine.types import FinishReason, SamplingParams, SlotCopy

TOK = CharTokenizer()


# ---- PrefixCache alone ------------------------------------------------------------------------

def test_lookup_finds_the_longest_common_prefix_one_token_short_of_the_prompt():
    cache = PrefixCache(first_slot=4, num_rows=2, min_hit_tokens=3)
    assert cache.store(list(range(10)), slot=0) == SlotCopy(0, 4, 10)
    assert cache.store([1, 2, 3, 4, 5], slot=1) == SlotCopy(1, 5, 5)
    hit = cache.lookup(list(range(7)) + [99, 98])
    assert (hit.row, hit.slot, hit.length) == (0, 4, 7)
    assert cache.lookup(list(range(10))).length == 9          # the last prompt token must run
    assert cache.lookup([1, 2, 3, 4, 5, 6]).slot == 5
    assert cache.lookup([0, 1, 9, 9, 9]) is None               # 2 tokens: below min_hit_tokens
    assert cache.lookup([7, 7, 7, 7]) is None


def test_store_extends_a_row_it_continues_and_skips_what_is_held():
    cache = PrefixCache(first_slot=8, num_rows=3, min_hit_tokens=2)
    turn1 = [5, 6, 7, 8]
    turn2 = turn1 + [9, 10, 11]
    assert cache.store(turn1, slot=0) == SlotCopy(0, 8, 4)
    assert cache.store(turn2, slot=1) == SlotCopy(1, 8, 7)     # the chat's next turn replaces its row
    assert cache.store(turn1, slot=2) is None                   # already held as the start of a row
    assert cache.store([5, 6, 1, 1], slot=3) == SlotCopy(3, 9, 4)  # shares a prefix only: a new row
    assert cache.rows() == [tuple(turn2), (5, 6, 1, 1), None]
    snap = cache.snapshot()
    assert (snap.stores, snap.evictions, snap.rows_used, snap.tokens_cached) == (3, 0, 2, 11)


def test_a_full_store_evicts_the_least_recently_used_row():
    cache = PrefixCache(first_slot=2, num_rows=2, min_hit_tokens=2)
    a, b, c = [1, 1, 1], [2, 2, 2], [3, 3, 3]
    cache.store(a, 0)
    cache.store(b, 1)
    cache.record_query(4, cache.lookup(a + [0]))               # a hit makes a recent again
    assert cache.store(c, 0) == SlotCopy(0, 3, 3)              # b was the least recently used
    assert cache.rows() == [tuple(a), tuple(c)]
    assert cache.lookup(b + [0]) is None                        # an evicted row is never matched
    delta = cache.take_delta()
    assert (delta.queries, delta.hits, delta.stores, delta.evictions) == (4, 3, 3, 1)
    assert cache.take_delta().stores == 0                       # increments, not totals


def test_a_disabled_cache_finds_and_stores_nothing():
    cache = PrefixCache(first_slot=4, num_rows=0)
    assert not cache.enabled
    assert cache.store(list(range(40)), 0) is None
    assert cache.lookup(list(range(40))) is None


# ---- the scheduler's plan ---------------------------------------------------------------------

def make_scheduler(num_slots=3, rows=2, budget=64, chunk_len=16):
    cfg = EngineConfig(max_num_seqs=num_slots, max_model_len=64, max_num_batched_tokens=budget)
    cfg = cfg.resolve(FakeRunner(num_slots=num_slots, max_model_len=64, context_buckets=(16, 64),
                                 batch_buckets=(1, 2, 4)))
    kv = KVCacheManager(num_slots)
    return Scheduler(cfg, kv, chunk_len, PrefixCache(num_slots, rows, min_hit_tokens=4)), kv


def add(sched, rid, prompt, n=1):
    from server.engine.request import Request
    request = Request(rid, list(prompt), SamplingParams(n=n, max_tokens=4), 0.0)
    sched.add(request)
    return request


def finish(sched, seqs, reason=FinishReason.STOP):
    for seq in seqs:
        seq.finish(reason)
    sched.finish(seqs)


def test_a_hit_copies_the_row_after_the_compaction_copies_and_prefills_only_the_rest():
    sched, kv = make_scheduler()
    system = list(range(1, 21))
    a = add(sched, "a", system + [30, 31])
    add(sched, "b", [40] * 8)
    plan = sched.schedule()                                      # both prefill whole
    assert [len(c.token_ids) for c in plan.prefills] == [22, 8]
    a.seqs[0].output_token_ids.append(7)
    finish(sched, [a.seqs[0]])                                   # a ends: stored, then b moves into slot 0
    assert kv.take_copies() == [SlotCopy(0, 3, 22), SlotCopy(1, 0, 8)]
    kv.record_copy(SlotCopy(0, 3, 22))                           # (put back for the next plan)
    kv.record_copy(SlotCopy(1, 0, 8))
    c = add(sched, "c", system + [50, 51, 52])
    plan = sched.schedule()
    assert plan.copies == [SlotCopy(0, 3, 22), SlotCopy(1, 0, 8), SlotCopy(3, 1, 20)]
    (chunk,) = plan.prefills
    assert (chunk.slot, chunk.start_pos, chunk.token_ids, chunk.is_last) == (1, 20, [50, 51, 52], True)
    assert c.num_cached_tokens == 20
    assert (sched.prefix.stats.queries, sched.prefix.stats.hits) == (22 + 8 + 23, 20)


def test_only_the_uncached_rest_counts_against_the_budget():
    sched, kv = make_scheduler(budget=16)
    system = list(range(1, 21))
    a = add(sched, "a", system + [30])
    sched.schedule()
    sched.schedule()                                             # 21 tokens: cut at 16, then 5
    finish(sched, [a.seqs[0]])
    add(sched, "x", [60] * 10)
    add(sched, "y", system + [70, 71, 72])                       # 23 tokens, 3 of them uncached
    plan = sched.schedule()
    assert [(c.start_pos, len(c.token_ids)) for c in plan.prefills] == [(0, 10), (20, 3)]


def test_a_completed_prompt_is_stored_after_its_step_and_found_from_the_next_one():
    sched, kv = make_scheduler(budget=24)
    system = list(range(1, 21))
    a = add(sched, "a", system + [30, 31])
    b = add(sched, "b", system + [40, 41])
    plan = sched.schedule()                      # a fills the budget; b (23 tokens, none cached yet) waits
    assert [c.seq.request for c in plan.prefills] == [a]
    sched.store_prompts(plan.prefills)           # after the step ran: a's prompt goes to a store row
    assert kv.take_copies() == [SlotCopy(0, 3, 22)]
    kv.record_copy(SlotCopy(0, 3, 22))
    plan = sched.schedule()                      # a decodes; b copies 20 cached tokens after the store copy
    assert plan.copies == [SlotCopy(0, 3, 22), SlotCopy(3, 1, 20)]
    assert [(c.start_pos, c.token_ids) for c in plan.prefills] == [(20, [40, 41])]
    assert b.num_cached_tokens == 20


def test_aborted_and_failed_sequences_leave_nothing_in_the_cache():
    sched, kv = make_scheduler()
    a = add(sched, "a", list(range(1, 30)))
    sched.schedule()
    sched.schedule()
    finish(sched, [a.seqs[0]], FinishReason.ERROR)
    b = add(sched, "b", list(range(1, 30)))
    sched.schedule()
    sched.abort(b)
    assert sched.prefix.rows() == [None, None]
    assert all(c.dst < 3 for c in kv.take_copies())


# ---- property test: cached and uncached engines agree -------------------------------------------

MAX_MODEL_LEN = 40
BASES = [[(7 * i + 3 * j) % 31 + 1 for j in range(30)] for i in range(3)]


@st.composite
def specs(draw):
    base = draw(st.sampled_from(BASES))
    shared = draw(st.integers(0, 28))
    tail = draw(st.lists(st.integers(1, 31), min_size=1 if shared else 2, max_size=8))
    prompt = (base[:shared] + tail)[:MAX_MODEL_LEN - 2]
    max_tokens = draw(st.integers(1, 10))
    params = SamplingParams(n=draw(st.sampled_from([1, 1, 2])), max_tokens=max_tokens,
                            temperature=draw(st.sampled_from([0.0, 1.0])),
                            seed=draw(st.one_of(st.none(), st.integers(0, 100))),
                            ignore_eos=draw(st.booleans()))
    return RequestSpec(draw(st.integers(0, 10)), prompt, params,
                       draw(st.one_of(st.none(), st.none(), st.integers(0, 6))))


def run(requests, rows: int, budget: int, follow_ups: bool):
    """Run the requests (and, with follow_ups, for every finished one a next turn that resends its
    prompt and output plus two tokens); returns per request the tokens of each choice and the runner."""
    runner = FakeRunner(num_slots=4, max_model_len=MAX_MODEL_LEN, context_buckets=(8, 16), kv_buckets=(16, 32, 40),
                        pack=2, prefix_cache_rows=rows)
    engine = LLMEngine(runner, TOK, EngineConfig(max_num_batched_tokens=budget, enable_prefix_caching=rows > 0))
    engine.scheduler.prefix.min_hit_tokens = 4
    pending = {f"r{i}": s for i, s in enumerate(requests)}
    added: dict[str, RequestSpec] = {}
    tokens: dict[str, dict[int, list[int]]] = {}
    cached: dict[str, int] = {}
    step = 0
    while pending or engine.has_unfinished():
        for rid, spec in list(pending.items()):
            if spec.arrival <= step:
                engine.add_request(rid, spec.prompt, spec.params)
                added[rid] = pending.pop(rid)
        for rid, spec in added.items():
            if spec.abort_after is not None and step == spec.arrival + spec.abort_after:
                engine.abort(rid)
        for out in engine.step():
            for c in out.outputs:
                tokens.setdefault(out.request_id, {}).setdefault(c.index, []).extend(c.token_ids)
            cached[out.request_id] = out.num_cached_tokens
            spec = requests[int(out.request_id[1:].split("-")[0])]
            if (out.finished and follow_ups and "-" not in out.request_id and spec.abort_after is None
                    and len(spec.prompt) + len(tokens[out.request_id][0]) + 2 < MAX_MODEL_LEN - 1):
                prompt = spec.prompt + tokens[out.request_id][0] + [11, 12]
                params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
                pending[out.request_id + "-next"] = RequestSpec(step + 1, prompt, params, None)
        engine.kv.check()
        check_store_rows(engine, runner)
        step += 1
        assert step < 2_000, "engine does not drain"
    engine.step()   # the last stores' copies run at the head of a step
    assert engine.kv.num_used == 0 and engine.kv.num_reserved == 0
    return tokens, cached, engine, runner


def check_store_rows(engine, runner) -> None:
    """Between steps, every store row a lookup could match holds exactly the K/V (here: tokens) its ids claim;
    a row whose store copy is still pending runs that copy before any hit of the next step reads it."""
    prefix = engine.scheduler.prefix
    pending = {c.dst for c in engine.kv._pending_copies}
    for row, held in enumerate(prefix.rows()):
        if held is not None and prefix.slot(row) not in pending:
            assert tuple(runner.cache[prefix.slot(row)][:len(held)]) == held, (row, held)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(specs(), min_size=1, max_size=8), rows=st.integers(1, 3),
       budget=st.sampled_from([8, 16]))
def test_cached_engine_gives_the_tokens_of_the_uncached_one(requests, rows, budget):
    import copy
    with_cache, cached, engine, runner = run(copy.deepcopy(requests), rows, budget, follow_ups=True)
    without, no_cached, _, _ = run(copy.deepcopy(requests), 0, budget, follow_ups=True)
    assert not any(no_cached.values())
    hits = sum(cached.values())
    event("hits" if hits else "no hits")
    for rid, choices in with_cache.items():
        base = requests[int(rid[1:].split("-")[0])]   # a follow-up turn resends its base's output
        deterministic = base.params.temperature == 0.0 or base.params.seed is not None
        if rid in without and deterministic and base.abort_after is None:
            assert choices == without[rid], rid
    # every store row holds exactly the tokens whose K/V it claims (an evicted row is gone for good)
    prefix = engine.scheduler.prefix
    for row, held in enumerate(prefix.rows()):
        if held is not None:
            assert tuple(runner.cache[prefix.slot(row)][:len(held)]) == held
    stats = prefix.snapshot()
    assert stats.hits == sum(cached.values()) and stats.hits <= stats.queries


@pytest.mark.parametrize("rows", [0, 2])
def test_a_conversation_resent_turn_after_turn_hits_the_cache(rows):
    runner = FakeRunner(num_slots=2, max_model_len=64, context_buckets=(8, 16), kv_buckets=(16, 32, 64),
                        prefix_cache_rows=rows)
    engine = LLMEngine(runner, TOK, EngineConfig(enable_prefix_caching=True))
    prompt = list(range(1, 21))
    outs, cached = [], []
    for turn in range(3):
        (out,) = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        outs.append(out.outputs[0].token_ids)
        cached.append(out.num_cached_tokens)
        prompt = prompt + out.outputs[0].token_ids + [3, 4]
    if rows:
        # turn k resends turn k-1's prompt and output: all of it but the last output token is cached
        assert cached == [0, 20 + 4, 20 + 5 + 2 + 4]
    else:
        assert cached == [0, 0, 0]
