"""`python -m compile` for the neuron target on a machine without the Neuron toolchain."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compile.__main__ import main
from compile.config import CompileConfig
from compile.model import ModelConfig
from compile.neuron.plan import hbm_per_core, read_model_config
from compile.neuron.toolchain import importable

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--context-buckets", "16,64", "--batch-buckets", "1,2,4", "--kv-buckets", "32,64,128",
        "--max-num-seqs", "4", "--max-model-len", "128"]


@pytest.mark.skipif(importable("torch_neuronx"), reason="this host has torch-neuronx")
def test_target_neuron_without_toolchain_exits_nonzero_with_one_line(tiny_llama_dir, tmp_path):
    out = tmp_path / "a"
    proc = subprocess.run([sys.executable, "-m", "compile", "--checkpoint", str(tiny_llama_dir), "--target", "neuron",
                           "--neuron-target", "inf2", "--out", str(out), "--quiet", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --target neuron needs torch-neuronx and neuronx-cc")
    assert "AWS Neuron package index" in lines[0] and "pytorch-inference-neuronx" in lines[0]
    assert not out.exists()


def test_dry_run_prints_the_whole_plan_without_weights(tiny_llama_dir, capsys, monkeypatch):
    import compile.checkpoint
    monkeypatch.setattr(compile.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["--checkpoint", str(tiny_llama_dir), "--target", "neuron", "--neuron-target", "trn1",
                 "--dry-run", *TINY]) == 0
    text = capsys.readouterr().out
    assert "tp 1, LNC 1" in text and "torch_neuronx.trace per bucket" in text
    assert "inline_weights_to_neff=False" in text
    assert "cache_k [2,4,2,128,16] and cache_v [2,4,2,128,16]" in text
    assert "graphs (12):" in text
    assert "prefill_s16 " in text and "in: input_ids[16] start_pos[1] last_index[1] slot[1]" in text
    assert "prefill_chunk_s64_p128" in text
    decode = next(line for line in text.splitlines() if line.strip().startswith("decode_b4_k64"))
    assert "in: input_ids[4] positions[4]" in decode and "aliases: cache_k->output 1, cache_v->output 2" in decode
    assert "--target trn1" in text and "-O1" in text and "-O2" in text
    assert "HBM per NeuronCore (estimate)" in text and "of 16 GiB: fits" in text


def test_dry_run_tp2_shows_sharding_and_buffer_aliasing(tiny_llama_dir, capsys):
    assert main(["--checkpoint", str(tiny_llama_dir), "--target", "neuron", "--neuron-target", "trn2",
                 "--tp-degree", "2", "--dry-run", *TINY]) == 0
    text = capsys.readouterr().out
    assert "ModelBuilder (one tag per bucket, one NxDModel)" in text and "LNC 2" in text
    assert "sharded once per rank into 2 weights/tp_rank_XX.safetensors" in text
    assert "cache_k [2,4,1,128,16]" in text and "buffers reassigned in forward" in text
    assert "of 24 GiB" in text


def test_dry_run_refuses_an_indivisible_tp_in_one_line(tiny_llama_dir, capsys):
    assert main(["--checkpoint", str(tiny_llama_dir), "--target", "neuron", "--neuron-target", "inf2",
                 "--tp-degree", "8", "--dry-run", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "does not divide the model's attention heads (4)" in err


def test_dry_run_of_the_cpu_target(tiny_llama_dir, capsys):
    assert main(["--checkpoint", str(tiny_llama_dir), "--dry-run", *TINY]) == 0
    text = capsys.readouterr().out
    assert "target: cpu" in text and "k_span[2,4,2,64,16] v_span[2,4,2,64,16]" in text
    assert "past_k[2,2,128,16] past_v[2,2,128,16]" in text and "compiler arguments" not in text


def test_hbm_estimate_counts_sharded_weights_and_per_rank_cache(tiny_llama_dir):
    model: ModelConfig = read_model_config(str(tiny_llama_dir))
    base = dict(checkpoint=str(tiny_llama_dir), target="neuron", neuron_target="inf2", dtype="bfloat16",
                context_buckets=(16,), batch_buckets=(1, 4), kv_buckets=(128,), max_num_seqs=4, max_model_len=128)
    one, two = hbm_per_core(CompileConfig(**base), model), hbm_per_core(CompileConfig(**base, tp_degree=2), model)
    kv_one = 2 * model.num_layers * 4 * model.num_kv_heads * 128 * model.head_dim * 2
    assert one.kv_bytes == kv_one and two.kv_bytes == kv_one // 2
    embed = model.vocab_size * model.hidden_size * 2
    # tp 2: the replicated embedding stays whole, the (tied, so separately stored) lm_head is split
    assert two.weights_bytes > one.weights_bytes // 2 and two.weights_bytes < one.weights_bytes + embed
    assert one.capacity_gib == 16 and one.fits
