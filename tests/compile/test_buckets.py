"""Bucket planning and the padding-waste bucket suggester."""
from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest

from compile.buckets import padding_waste, plan_graphs, smallest_fitting, suggest_buckets
from compile.config import CompileConfig, ConfigError

ROOT = Path(__file__).resolve().parents[2]


def chunk_names(cfg: CompileConfig) -> list[str]:
    return [g.name for g in plan_graphs(cfg) if g.kind == "prefill_chunk"]


def test_plan_has_one_graph_per_bucket_and_a_chunk_graph_only_when_needed():
    cfg = CompileConfig(checkpoint="x", context_buckets=(16, 64), batch_buckets=(1, 2, 4), kv_buckets=(32, 128),
                        max_num_seqs=4, max_model_len=128)
    names = [g.name for g in plan_graphs(cfg)]
    # cpu: packed prefills (prompts per call = tokens // 16, at most max_num_seqs), the chunk graphs, decodes.
    # chunk_len 64 is the small chunk already, so one chunk size; its past spans are the KV buckets >= 64.
    assert names[:3] == ["prefill_packed_s16_r1", "prefill_packed_s64_r4", "prefill_chunk_s64_p128"]
    assert len(names) == 3 + 3 * 2 and len(set(names)) == len(names)
    neuron = CompileConfig(**{**cfg.to_dict(), "target": "neuron", "neuron_target": "inf2"})
    assert [g.name for g in plan_graphs(neuron)][:3] == ["prefill_s16", "prefill_s64", "prefill_chunk_s64_p128"]
    # every prompt fits one prefill: chunk graphs only for the rest of a prompt after a prefix-cache hit
    short = dict(checkpoint="x", context_buckets=(16, 128), batch_buckets=(1,), kv_buckets=(128,),
                 max_num_seqs=1, max_model_len=128)
    assert chunk_names(CompileConfig(**short, prefix_cache_rows=0)) == []
    assert not CompileConfig(**short, prefix_cache_rows=0).needs_chunk_graph
    assert chunk_names(CompileConfig(**short)) == ["prefill_chunk_s64_p128", "prefill_chunk_s128_p128"]
    assert chunk_names(CompileConfig(**short, prefix_cache_rows=0, target="neuron", neuron_target="inf2")) == []
    assert chunk_names(CompileConfig(**short, prefix_cache_rows=1, target="neuron", neuron_target="inf2")) == [
        "prefill_chunk_s128_p128"]  # neuron's small chunk (128) is chunk_len here: one size
    # both targets chunk a long prompt at the largest bucket up to 512 (a bounded decode stall; the engine's
    # default token budget cuts a longer prompt there anyway), so a long prompt needs chunk graphs with or
    # without the prefix cache; neuron's have one past span, max_model_len
    long = dict(checkpoint="x", context_buckets=(256, 512, 1024), batch_buckets=(1,), kv_buckets=(512, 1024),
                max_num_seqs=1, max_model_len=1024)
    for rows in (0, 8):
        assert chunk_names(CompileConfig(**long, prefix_cache_rows=rows)) == [
            f"prefill_chunk_s{s}_p{p}" for s in (64, 128, 256, 512) for p in (512, 1024)]
        assert chunk_names(CompileConfig(**long, prefix_cache_rows=rows, target="neuron", neuron_target="inf2")) == [
            "prefill_chunk_s128_p1024", "prefill_chunk_s512_p1024"]


def test_chunk_graphs_cover_every_chunk_size_and_past_span():
    """One prefill_chunk graph per (chunk size, past span): sizes are the target's small chunks and chunk_len
    (or --chunk-buckets), spans the KV buckets from chunk_len up (neuron: max_model_len alone), so every
    start_pos < max_model_len has one."""
    base = dict(checkpoint="x", context_buckets=(128, 256, 512, 1024), batch_buckets=(1, 2),
                kv_buckets=(128, 256, 512, 1024), max_num_seqs=2, max_model_len=1024)
    cpu = CompileConfig(**base)
    assert (cpu.chunk_len, cpu.chunk_sizes, cpu.chunk_pasts) == (512, (64, 128, 256, 512), (512, 1024))
    assert chunk_names(cpu) == [f"prefill_chunk_s{s}_p{p}" for s in (64, 128, 256, 512) for p in (512, 1024)]
    neuron = CompileConfig(**base, target="neuron", neuron_target="inf2")
    # neuron: the same chunk_len, and one past span (max_model_len): every graph there is a neuronx-cc compile
    assert (neuron.chunk_len, neuron.chunk_sizes, neuron.chunk_pasts) == (512, (128, 512), (1024,))
    explicit = CompileConfig(**base, chunk_buckets=(32, 256))
    assert (explicit.chunk_len, explicit.chunk_sizes, explicit.chunk_pasts) == (256, (32, 256), (256, 512, 1024))
    assert len(chunk_names(explicit)) == 2 * 3
    for cfg in (cpu, neuron, explicit):
        assert cfg.chunk_pasts[-1] == cfg.max_model_len  # a chunk may start anywhere before the end
    assert CompileConfig(**base, target="neuron", neuron_target="inf2", chunk_buckets=(512,)).chunk_sizes == (512,)


def test_cache_rows_are_the_sequence_slots_then_the_prefix_cache_rows():
    base = dict(checkpoint="x", context_buckets=(16, 64), batch_buckets=(1, 2, 4), kv_buckets=(32, 128),
                max_num_seqs=4, max_model_len=128)
    assert CompileConfig(**base).num_cache_rows == 4 + 8  # the dataclass default; the CLI's is per target
    assert CompileConfig(**base, prefix_cache_rows=0).num_cache_rows == 4
    assert CompileConfig(**base, prefix_cache_rows=3).to_dict()["prefix_cache_rows"] == 3
    assert CompileConfig(**base, prefix_cache_rows=3).key_dict() != CompileConfig(**base).key_dict()


@pytest.mark.parametrize("bad", [
    dict(context_buckets=(64, 16)), dict(kv_buckets=(32, 64)), dict(batch_buckets=(1, 2)),
    dict(dtype="float16"), dict(target="tpu"), dict(tp_degree=2), dict(prefix_cache_rows=-1),
    dict(chunk_buckets=()), dict(chunk_buckets=(64, 16)), dict(chunk_buckets=(16, 16)), dict(chunk_buckets=(0, 16)),
    dict(chunk_buckets=(16, 128)),
])
def test_invalid_configs_raise(bad):
    base = dict(checkpoint="x", context_buckets=(16, 64), batch_buckets=(1, 2, 4), kv_buckets=(32, 128),
                max_num_seqs=4, max_model_len=128)
    with pytest.raises(ConfigError):
        CompileConfig(**{**base, **bad})


def brute_force(lengths, k, max_len):
    candidates = sorted(set(lengths) - {max_len})
    best = None
    for r in range(0, k):
        for combo in itertools.combinations(candidates, r):
            buckets = sorted(combo) + [max_len]
            w = padding_waste(lengths, buckets)
            if best is None or w < best[1] - 1e-12:
                best = (buckets, w)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_suggestion_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(40)]
    for k in (1, 2, 3):
        buckets, waste = suggest_buckets(lengths, k, 512)
        assert buckets[-1] == 512 and len(buckets) <= k
        assert waste == pytest.approx(brute_force(lengths, k, 512)[1])
        assert all(smallest_fitting(buckets, n) >= n for n in lengths)


def test_suggest_cli_prints_each_set_with_its_waste(tmp_path):
    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(str(n) for n in [10] * 50 + [100] * 30 + [900] * 5))
    proc = subprocess.run([sys.executable, "-m", "compile", "--suggest-buckets", str(f), "--num-buckets", "3",
                           "--max-model-len", "1024"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].split()[-1] == "10,100,1024"
    # computed 50*10 + 30*100 + 5*1024 = 8620 positions for 8000 real tokens
    assert lines[-1].split()[1] == f"{620 / 8620:.1%}"
