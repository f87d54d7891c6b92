"""The prefix cache on the neuron target, against the recording double.

The KV state has max_num_seqs sequence slots, then prefix_cache_rows store rows; only the copy_slot tag
touches a store row (a finished sequence's slot copied in, a hit copied back out into a new sequence's
slot), and the rest of the prompt runs on a prefill_chunk graph at start_pos = the hit's length. At world
size 1 the double runs the one traced module eagerly (tests/neuron/test_neuron_runner.py), so a resumed
prompt's logits can be compared with the same prompt prefilled from scratch.
"""
from __future__ import annotations

import pytest
import torch

from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron.plan import hbm_per_core
from neuron.conftest import build_neuron
from server.engine.scheduler import DecodeBatch, SchedulerOutput
from server.engine.types import SamplingParams, SamplingRow, SlotCopy
from server.runner.bucketed import BucketedRunner, Chunk
from server.runner.neuron_runner import NeuronRunner

STORE_ROWS = 2
CHUNKS = (16, 64)  # a small chunk for the tail after a hit, and chunk_len (the largest context bucket)


@pytest.fixture
def prefix_artifact(neuron_double_installed, tiny_llama_dir, neuron_settings, tmp_path):
    """The tiny neuron artifact (4 slots, max_model_len 128, KV buckets 32/64/128) with 2 store rows and
    chunk graphs of 16 and 64 tokens over neuron's one past span, 128."""
    return build_neuron(tiny_llama_dir, tmp_path / "neuron", neuron_settings, prefix_cache_rows=STORE_ROWS,
                        chunk_buckets=CHUNKS)


def open_runner(path) -> NeuronRunner:
    return NeuronRunner(Manifest.read(path), path)


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_from_scratch(runner, slot: int, ids: list[int]) -> torch.Tensor:
    """The prompt without the prefix cache: the first chunk on a prefill graph, the rest on chunk graphs."""
    step = runner.context_buckets[-1]
    for start in range(0, len(ids), step):
        logits = runner.prefill(slot, ids[start:start + step], start).logits
    return logits


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """The tolerance of the cpu/neuron parity tests (tests/neuron/test_neuron_runner.py)."""
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_state_and_plan_hold_the_store_rows_and_one_chunk_graph_per_size(prefix_artifact,
                                                                         neuron_double_installed):
    manifest = Manifest.read(prefix_artifact)
    runner = open_runner(prefix_artifact)
    assert manifest.prefix_cache_rows == runner.prefix_cache_rows == STORE_ROWS
    assert runner.num_cache_rows == manifest.max_num_seqs + STORE_ROWS == 6
    state = runner.graphs.model.module
    model = runner.model
    assert list(state.cache_k.shape) == [model.num_layers, 6, model.num_kv_heads, 128, model.head_dim]
    # neuron compiles one past span, max_model_len (cpu has several: tests/compile/test_artifact.py)
    assert [s.name for s in runner.chunk_specs] == ["prefill_chunk_s16_p128", "prefill_chunk_s64_p128"]
    # the device holds the state once, store rows included, as the dry run's estimate says
    from compile.config import CompileConfig
    settings = dict(dtype=manifest.dtype, context_buckets=tuple(manifest.buckets["context"]),
                    batch_buckets=tuple(manifest.buckets["batch"]), kv_buckets=tuple(manifest.buckets["kv"]),
                    max_num_seqs=manifest.max_num_seqs, max_model_len=manifest.max_model_len)
    est = hbm_per_core(CompileConfig(checkpoint="x", target="neuron", neuron_target="inf2",
                                     prefix_cache_rows=STORE_ROWS, chunk_buckets=CHUNKS, **settings),
                       ModelConfig.from_dict(manifest.model))
    row = 2 * model.num_layers * model.num_kv_heads * 128 * model.head_dim * 4  # K and V of one row, float32
    assert neuron_double_installed.device.by_core[0]["state"] == est.kv_bytes == 6 * row


@pytest.mark.parametrize("n,start,expect", [
    (10, 30, "prefill_chunk_s16_p128"),   # a short tail after a hit: the small chunk
    (16, 64, "prefill_chunk_s16_p128"),
    (16, 112, "prefill_chunk_s16_p128"),  # ends exactly at max_model_len
    (17, 30, "prefill_chunk_s64_p128"),   # too long for the small chunk
    (40, 80, "prefill_chunk_s64_p128"),
    (10, 0, "prefill_s16"),               # a whole prompt: a prefill graph, never a chunk graph
    (17, 0, "prefill_s64"),
])
def test_prefill_spec_picks_the_smallest_chunk(prefix_artifact, n, start, expect):
    runner = BucketedRunner(Manifest.read(prefix_artifact))  # picking needs the manifest only
    assert runner.prefill_spec(n, start).name == expect


@pytest.mark.parametrize("n,start", [(65, 10), (20, 110), (1, 128)])
def test_prefill_spec_refuses_a_chunk_no_graph_holds(prefix_artifact, n, start):
    runner = BucketedRunner(Manifest.read(prefix_artifact))
    with pytest.raises(ValueError, match="does not fit the chunk graphs"):
        runner.prefill_spec(n, start)


def test_a_hit_resumed_from_a_store_row_matches_the_prompt_prefilled_whole(prefix_artifact, neuron_double_installed):
    """Engine-like plans: a finished sequence's slot is stored into a store row (copy_slot, dst >= max_num_seqs),
    its slot is reused, then a prompt that starts with the same tokens is copied back out of the row and its
    rest runs as a small chunk at start_pos = the hit's length: the same logits as the prompt from scratch."""
    rec = neuron_double_installed
    runner = open_runner(prefix_artifact)
    state = runner.graphs.model.module
    v, slots = runner.vocab_size, runner.num_slots
    store = slots  # the first store row: cache row max_num_seqs
    first = prompt(40, 11, v)
    runner.prefill(0, first, 0)  # prefill_s64: the sequence's K/V in slot 0

    def execute(copies, prefills=(), sampling_rows=()):
        plan = SchedulerOutput(copies=list(copies), decode=DecodeBatch(), prefills=list(prefills),
                               sampling_rows=list(sampling_rows))
        rec.calls.clear()
        out = runner.execute(plan)
        return out, [c["model_name"] for c in rec.of("NxDModel.forward")]

    # the sequence finished: its 40 positions go into the store row, one device call, nothing else touched
    before_k, before_v = state.cache_k.clone(), state.cache_v.clone()
    _, called = execute([SlotCopy(0, store, 40)])
    assert called == ["copy_slot"]
    for before, after in ((before_k, state.cache_k), (before_v, state.cache_v)):
        assert torch.equal(after[:, store, :, :40], before[:, 0, :, :40])
        assert not torch.equal(before[:, store, :, :40], before[:, 0, :, :40])
        assert torch.equal(after[:, :store], before[:, :store])          # the sequence slots
        assert torch.equal(after[:, store + 1:], before[:, store + 1:])  # the other store row
        assert torch.equal(after[:, store, :, 40:], before[:, store, :, 40:])
    stored_k = state.cache_k[:, store].clone()

    # slot 0 is reused and every slot decodes: the store row is never written by a graph
    runner.prefill(0, prompt(50, 12, v), 0)
    for slot in (1, 2, 3):
        runner.prefill(slot, prompt(20 + slot, 12 + slot, v), 0)
    runner.decode([1, 2, 3, 4], [50, 21, 22, 23])
    assert torch.equal(state.cache_k[:, store], stored_k)

    # a new prompt: the stored 32 tokens, then 8 of its own; the hit goes into slot 2 (which holds another prompt)
    hit, tail = 32, prompt(8, 13, v)
    ids = first[:hit] + tail
    greedy = SamplingRow(key="r", params=SamplingParams(temperature=0.0, max_tokens=1), prompt_token_ids=ids,
                         output_token_ids=[])
    out, called = execute([SlotCopy(store, 2, hit)], [Chunk(2, tail, hit)], [greedy])
    assert called == ["copy_slot", "prefill_chunk_s16_p128"]  # the copy before the chunk it feeds
    (run,) = out.runs
    assert (run.kind, run.bucket, run.num_real_tokens, run.num_padded_tokens) == (
        "prefill_chunk", "prefill_chunk_s16_p128", 8, 8)  # not 56 tokens of padding on the 64-token chunk
    copy_call = rec.of("NxDModel.forward")[0]
    assert copy_call["input_shapes"] == [[1], [1], [1]]
    assert torch.equal(state.cache_k[:, store], stored_k)  # reading a row leaves it as it was

    whole = prefill_from_scratch(runner, 3, ids)  # 40 tokens on prefill_s64, in another slot
    assert out.token_ids == [int(whole.argmax())]
    runner.copy_slot(store, 1, hit)
    assert_close(runner.prefill(1, tail, hit).logits, whole)
    # the K/V the chunk wrote after the copied positions equal the whole prompt's
    torch.testing.assert_close(state.cache_k[:, 1, :, :40], state.cache_k[:, 3, :, :40], rtol=1e-4, atol=1e-4)


def test_a_hit_past_the_first_span_resumes_on_the_longer_span(prefix_artifact):
    """A stored 100-token sequence (two chunks) resumed at 80: the small chunk over the 128-position span."""
    runner = open_runner(prefix_artifact)
    v, store = runner.vocab_size, runner.num_slots + 1  # the last store row
    first = prompt(100, 21, v)
    prefill_from_scratch(runner, 2, first)
    runner.copy_slot(2, store, 100)
    hit, tail = 80, prompt(12, 22, v)
    ids = first[:hit] + tail
    whole = prefill_from_scratch(runner, 0, ids)  # prefill_s64, then 28 tokens on prefill_chunk_s64_p128
    runner.copy_slot(store, 3, hit)
    out = runner.prefill(3, tail, hit)
    assert out.run.bucket == "prefill_chunk_s16_p128"
    assert_close(out.logits, whole)
