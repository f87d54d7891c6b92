"""Scheduler + KV slot policy with hand-built requests and no model (vLLM's scheduler-test style)."""
from __future__ import annotations

import pytest

from server.engine.config import EngineConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.request import Request, SequenceStatus
from server.engine.scheduler import Scheduler
from server.engine.types import FinishReason, QueueFullError, SamplingParams, SlotCopy


def make_scheduler(num_slots=4, chunk_len=16, max_model_len=64, **config):
    kv = KVCacheManager(num_slots)
    cfg = EngineConfig(max_num_seqs=num_slots, max_model_len=max_model_len,
                       max_num_batched_tokens=config.pop("budget", 16), **config)
    return Scheduler(cfg, kv, chunk_len), kv


def make_request(rid, prompt_len, n=1):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(n=n), arrival=0.0)


def sample_all(out):
    """Pretend the runner ran and every sequence that got logits sampled a token."""
    for seq in out.decode.seqs:
        seq.append_token(1, None)
    for chunk in out.prefills:
        if chunk.is_last:
            for seq in (chunk.seq, *chunk.forks):
                seq.append_token(1, None)


def finish(sched, *seqs):
    for seq in seqs:
        seq.finish(FinishReason.LENGTH)
    sched.finish(list(seqs))


def test_fcfs_admission_into_free_slots():
    sched, kv = make_scheduler(num_slots=2, budget=16)
    reqs = [make_request(f"r{i}", 4) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert [c.seq.request.request_id for c in out.prefills] == ["r0", "r1"]
    assert [c.slot for c in out.prefills] == [0, 1]
    assert sched.num_waiting == 1 and sched.num_running == 2
    sample_all(out)
    finish(sched, reqs[0].seqs[0])          # frees slot 0; r1 moves down into it
    assert reqs[1].seqs[0].slot == 0
    out = sched.schedule()
    assert [s.request.request_id for s in out.decode.seqs] == ["r1"]
    assert [c.seq.request.request_id for c in out.prefills] == ["r2"] and out.prefills[0].slot == 1
    kv.check()


def test_queue_bound_raises_queue_full():
    sched, _ = make_scheduler(max_num_queued_reqs=2)
    sched.add(make_request("a", 4))
    sched.add(make_request("b", 4))
    with pytest.raises(QueueFullError):
        sched.add(make_request("c", 4))


def test_long_prompt_is_cut_at_the_budget_then_chunked_at_chunk_len():
    sched, kv = make_scheduler(chunk_len=8, budget=16)
    req = make_request("long", 40)
    sched.add(req)
    steps = [[(c.start_pos, len(c.token_ids), c.is_last) for c in sched.schedule().prefills] for _ in range(3)]
    assert steps == [[(0, 16, False)], [(16, 8, False), (24, 8, False)], [(32, 8, True)]]
    assert req.seqs[0].status is SequenceStatus.RUNNING and kv.num_decoding == 1


def test_whole_prompts_are_packed_into_the_budget_and_only_the_first_is_ever_cut():
    sched, _ = make_scheduler(num_slots=4, budget=16)
    for rid, n in (("a", 5), ("b", 6), ("c", 7), ("d", 2)):
        sched.add(make_request(rid, n))
    out = sched.schedule()
    # 5 + 6 fit; "c" (7) would need a cut, so it waits for the next step rather than split in two
    assert [(c.seq.request.request_id, len(c.token_ids)) for c in out.prefills] == [("a", 5), ("b", 6)]
    assert out.num_prefill_tokens <= 16 and sched.prefilling is None
    sample_all(out)
    out = sched.schedule()
    assert [(c.seq.request.request_id, len(c.token_ids)) for c in out.prefills] == [("c", 7), ("d", 2)]
    assert len(out.decode.seqs) == 2                   # decode runs every step alongside


def test_oldest_prompt_advances_every_step_while_others_decode():
    sched, _ = make_scheduler(num_slots=4, chunk_len=16, budget=8)
    first = make_request("first", 4)
    sched.add(first)
    sample_all(sched.schedule())
    long = make_request("long", 20)
    sched.add(long)
    sched.add(make_request("short", 3))
    starts = []
    for step in range(3):
        out = sched.schedule()
        assert len(out.decode.seqs) >= 1                  # the running stream decodes every step
        assert out.num_prefill_tokens <= 8                # behind at most one budget of prefill
        assert out.prefills[0].seq.request is long or long.seqs[0].num_computed_tokens == 20
        starts.append(out.prefills[0].start_pos)
        sample_all(out)
    assert starts == [0, 8, 16]                           # 8 + 8 + 4: the oldest prompt always advanced


def test_n_choices_admitted_together_and_forked_after_prefill():
    sched, kv = make_scheduler(num_slots=3)
    sched.add(make_request("single", 4))
    sample_all(sched.schedule())
    sched.add(make_request("pair", 20, n=2))       # 2 chunks (16 + 4)
    sched.add(make_request("third", 4))
    out = sched.schedule()
    assert [c.seq.request.request_id for c in out.prefills] == ["pair"]
    assert kv.num_reserved == 1 and kv.num_free == 0
    out2 = sched.schedule()
    chunk = out2.prefills[0]
    assert chunk.is_last and [s.slot for s in chunk.forks] == [2]
    assert [s.slot for s in kv.decoding()] == [0, 1, 2] and kv.num_reserved == 0
    assert sched.num_waiting == 1                  # "third" waits for a free slot
    kv.check()


def test_n_choices_wait_until_enough_slots_are_free():
    sched, kv = make_scheduler(num_slots=2)
    sched.add(make_request("one", 4))
    sample_all(sched.schedule())
    sched.add(make_request("pair", 4, n=2))
    assert sched.schedule().prefills == []
    assert sched.num_waiting == 1


def test_compaction_moves_last_decoder_and_the_prefilling_sequence_as_plan_copies():
    sched, kv = make_scheduler(num_slots=4, budget=16)
    reqs = [make_request(f"d{i}", 5) for i in range(3)]
    for r in reqs:
        sched.add(r)
    sample_all(sched.schedule())                     # 5 + 5 fit in 16; the third waits (no cut)
    sample_all(sched.schedule())
    assert [s.request.request_id for s in kv.decoding()] == ["d0", "d1", "d2"]
    long = make_request("long", 40)
    sched.add(long)
    out = sched.schedule()                           # decode 3 + first chunk of "long" at slot 3
    sample_all(out)
    assert long.seqs[0].slot == 3 and long.seqs[0].num_computed_tokens == 16
    finish(sched, reqs[0].seqs[0])                   # hole at slot 0
    d2 = reqs[2].seqs[0]
    assert d2.slot == 0 and long.seqs[0].slot == 2
    kv.check()
    out = sched.schedule()
    # the moves reach the runner at the head of the next plan, in the order they must run
    assert out.copies == [SlotCopy(2, 0, d2.num_computed_tokens - 1), SlotCopy(3, 2, 16)]
    assert [s.slot for s in out.decode.seqs] == [0, 1]
    assert out.prefills[0].slot == 2 and out.prefills[0].start_pos == 16
    assert sched.schedule().copies == []


def test_abort_while_prefilling_releases_slot_and_reservation():
    sched, kv = make_scheduler(num_slots=3, budget=16)
    req = make_request("pair", 40, n=2)
    sched.add(req)
    sched.schedule()
    assert kv.num_used == 1 and kv.num_reserved == 1
    sched.abort(req)
    assert kv.num_used == 0 and kv.num_reserved == 0 and sched.prefilling is None
    assert not sched.has_work()


def test_abort_waiting_request():
    sched, _ = make_scheduler(num_slots=1)
    a, b = make_request("a", 4), make_request("b", 4)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.abort(b)
    assert sched.num_waiting == 0 and sched.num_running == 1


def test_config_validation_against_runner():
    from engine_fakes import FakeRunner
    runner = FakeRunner(num_slots=4, batch_buckets=(1, 2, 4))
    assert EngineConfig().resolve(runner).max_num_seqs == 4
    with pytest.raises(ValueError, match="KV slots"):
        EngineConfig(max_num_seqs=8).resolve(runner)
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(max_model_len=1000).resolve(runner)
    assert EngineConfig().resolve(runner).max_num_batched_tokens == 16   # the largest bucket up to 512
    with pytest.raises(ValueError, match="largest context bucket"):
        EngineConfig(max_num_batched_tokens=17).resolve(runner)
    with pytest.raises(ValueError, match="max_num_queued_reqs"):
        EngineConfig(max_num_queued_reqs=0)
