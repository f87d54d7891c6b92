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


def test_plan_has_one_graph_per_bucket_and_a_chunk_graph_only_when_needed():
    cfg = CompileConfig(checkpoint="x", context_buckets=(16, 64), batch_buckets=(1, 2, 4), kv_buckets=(32, 128),
                        max_num_seqs=4, max_model_len=128)
    names = [g.name for g in plan_graphs(cfg)]
    # cpu: packed prefills (prompts per call = tokens // 16, at most max_num_seqs), a chunk graph, decodes
    assert names[:3] == ["prefill_packed_s16_r1", "prefill_packed_s64_r4", "prefill_chunk_s64_p128"]
    assert len(names) == 3 + 3 * 2 and len(set(names)) == len(names)
    neuron = CompileConfig(**{**cfg.to_dict(), "target": "neuron", "neuron_target": "inf2"})
    assert [g.name for g in plan_graphs(neuron)][:3] == ["prefill_s16", "prefill_s64", "prefill_chunk_s64_p128"]
    cfg2 = CompileConfig(checkpoint="x", context_buckets=(16, 128), batch_buckets=(1,), kv_buckets=(128,),
                         max_num_seqs=1, max_model_len=128)
    assert not any(g.kind == "prefill_chunk" for g in plan_graphs(cfg2))
    # cpu chunks a long prompt at the largest bucket up to 512 (a bounded decode stall), neuron at the largest
    long = dict(checkpoint="x", context_buckets=(256, 512, 1024), batch_buckets=(1,), kv_buckets=(1024,),
                max_num_seqs=1, max_model_len=1024)
    assert [g.name for g in plan_graphs(CompileConfig(**long)) if g.kind == "prefill_chunk"] == [
        "prefill_chunk_s512_p1024"]
    assert not any(g.kind == "prefill_chunk" for g in plan_graphs(
        CompileConfig(**long, target="neuron", neuron_target="inf2")))


@pytest.mark.parametrize("bad", [
    dict(context_buckets=(64, 16)), dict(kv_buckets=(32, 64)), dict(batch_buckets=(1, 2)),
    dict(dtype="float16"), dict(target="tpu"), dict(tp_degree=2),
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
