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
    assert lines[0].startswith("error: --target neuron needs torch-neuronx, neuronx-cc and neuronx-distributed")
    assert "AWS Neuron package index" in lines[0] and "pytorch-inference-neuronx" in lines[0]
    assert not out.exists()


def test_dry_run_prints_the_whole_plan_without_weights(tiny_llama_dir, capsys, monkeypatch):
    import compile.checkpoint
    monkeypatch.setattr(compile.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["--checkpoint", str(tiny_llama_dir), "--target", "neuron", "--neuron-target", "trn1",
                 "--dry-run", *TINY]) == 0
    text = capsys.readouterr().out
    assert "tp 1, LNC 1" in text and "tracer NxD Core ModelBuilder (one NxDModel" in text
    assert "save_weights=False" in text and "bound once by set_weights from weights/model.safetensors" in text
    # the KV state: 4 sequence slots, then the prefix cache's store rows (neuron's CLI default: 4)
    assert "cache_k [2,8,2,128,16] and cache_v [2,8,2,128,16]" in text and "never returned to the host" in text
    assert "[layers, slots (4 sequences + 4 prefix-cache rows), kv heads, positions, head_dim]" in text
    # 2 prefills, one chunk graph (chunk_len 64: neuron's small chunk, 128, is above it; neuron's one past
    # span, max_model_len), 3 x 3 decodes, and the copy_slot tag
    assert "graphs (13):" in text
    assert "prefill_s16 " in text and "in: input_ids[16] start_pos[1] last_index[1] slot[1]" in text
    assert "prefill_chunk_s64_p128 " in text and "prefill_chunk_s64_p64" not in text
    assert "in: src[1] dst[1] length[1]" in text
    decode = next(line for line in text.splitlines() if line.strip().startswith("decode_b4_k64"))
    assert decode.endswith("in: input_ids[4] positions[4]  out: logits[4,256]") or "out: logits[4," in decode
    assert "--target trn1" in text and "-O1" in text and "-O2" in text and "--enable-saturate-infinity" in text
    assert "HBM per NeuronCore (estimate" in text and "of 16 GiB: fits" in text
    assert "KV state, once, shared by every graph: 2 x 2x8x2x128x16 x 2 B" in text
    assert "(4 sequence slots + 4 prefix-cache rows; each row 0.0 MiB)" in text
    assert "neuronx-cc jobs at once:" in text


def test_dry_run_tp2_shows_sharding_and_buffer_aliasing(tiny_llama_dir, capsys):
    assert main(["--checkpoint", str(tiny_llama_dir), "--target", "neuron", "--neuron-target", "trn2",
                 "--tp-degree", "2", "--dry-run", *TINY]) == 0
    text = capsys.readouterr().out
    assert "tracer NxD Core ModelBuilder" in text and "LNC 2" in text
    assert "from 2 weights/tp_rank_XX.safetensors, sharded once per rank" in text
    assert "cache_k [2,8,1,128,16]" in text and "buffers reassigned in forward" in text  # 4 slots + 4 store rows
    assert "of 24 GiB" in text and "projections and lm_head split over tp" in text


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
    row = 2 * model.num_layers * model.num_kv_heads * 128 * model.head_dim * 2  # K and V of one cache row
    kv_one = (4 + 4) * row  # 4 sequence slots + neuron's default 4 prefix-cache rows
    assert one.kv_bytes == kv_one and two.kv_bytes == kv_one // 2
    for rows in (0, 3):  # each store row costs one row of KV, nothing else
        est = hbm_per_core(CompileConfig(**base, prefix_cache_rows=rows), model)
        assert est.kv_bytes == (4 + rows) * row and est.weights_bytes == one.weights_bytes
    embed = model.vocab_size * model.hidden_size * 2
    # tp 2: the replicated embedding stays whole, the (tied, so separately held) lm_head is split
    assert embed < two.weights_bytes < one.weights_bytes - embed // 2 + 1
    assert one.capacity_gib == 16 and one.fits
    # one allowance per graph (4 buckets + the copy tag), beside weights and KV counted once
    assert [g.name for g in one.graphs] == ["prefill_s16", "prefill_chunk_s16_p128", "decode_b1_k128",
                                           "decode_b4_k128", "copy_slot"]
    assert one.total_gib * 2 ** 30 == one.weights_bytes + one.kv_bytes + sum(g.total_bytes for g in one.graphs)
    # hand-checkable: prefill_s16 scratch = 4 B x (16 x (2 hidden + 2 intermediate + heads x 16) + vocab)
    per_row = 2 * model.hidden_size + 2 * model.intermediate_size + model.num_heads * 16
    assert one.graphs[0].scratch_bytes == 4 * (16 * per_row + model.vocab_size)


def test_dry_run_of_a_llama_8b_shaped_config_at_tp_1_2_8(tmp_path, capsys):
    """Llama-3.1-8B's shape (config.json only): does not fit one inf2 core, fits at tp 8."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    totals = {}
    for tp, rows in ((1, None), (2, None), (8, None), (1, "0"), (8, "0")):
        assert main(["--checkpoint", str(tmp_path), "--target", "neuron", "--neuron-target", "inf2", "--tp-degree",
                     str(tp), "--max-num-seqs", "8", "--max-model-len", "4096", "--dry-run"]
                    + (["--prefix-cache-rows", rows] if rows else [])) == 0
        text = capsys.readouterr().out
        weights = float(text.split("weights, once per rank, shared by every graph: ")[1].split(" GiB")[0])
        kv_line = text.split("KV state, once, shared by every graph: ")[1].split("\n")[0]
        kv = float(kv_line.split("= ")[1].split(" GiB")[0])
        totals[tp, rows] = (weights, kv, "fits" in text.split("total: ")[1].split("\n")[0])
        store = 4 if rows is None else 0  # neuron's CLI default: 4 prefix-cache rows
        assert kv_line.endswith(f"(8 sequence slots + {store} prefix-cache rows; each row {512 // tp:.1f} MiB)")
        assert f"2 x 32x{8 + store}x{8 // tp}x4096x128 x 2 B" in kv_line
    # 8.03B parameters in bf16 = 14.96 GiB at tp 1; KV per row 2 x 32 x 8 x 4096 x 128 x 2 B = 0.5 GiB:
    # 8 sequence slots = 4 GiB, plus 4 prefix-cache rows = 6 GiB
    assert totals[1, None] == (14.958, 6.0, False) and totals[1, "0"] == (14.958, 4.0, False)
    assert totals[8, None][1] == 0.75 and totals[8, None][2] and totals[8, None][0] < 14.958 / 4
    assert totals[8, "0"][1] == 0.5 and totals[2, None][1] == 3.0


def test_dry_run_of_a_phi3_mini_128k_shaped_config_at_tp_8(tmp_path, capsys):
    """Phi-3-mini-128k-instruct's shape (config.json only; LongRoPE factors of the right length, values made up),
    by hand: the fused qkv_proj / gate_up_proj are counted as the q/k/v and gate/up they are split into, each
    split over tp like Llama's; rope.inv_freq is head_dim / 2 = 48 float32 (one factor set: the one chosen)."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                                "long_factor": [2.0] * 48},
        "sliding_window": 262144, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 32000, "pad_token_id": 32000}))
    assert main(["--checkpoint", str(tmp_path), "--target", "neuron", "--neuron-target", "inf2", "--tp-degree", "8",
                 "--max-num-seqs", "8", "--max-model-len", "4096", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert ("(Phi3ForCausalLM, 32 layers, 32 heads, 32 KV heads, head_dim 96, hidden 3072, intermediate 8192, "
            "vocab 32064)") in text
    # per layer, split over 8: q, k, v, o 3072x3072 (32 KV heads), gate/up/down 8192x3072
    split = (4 * 3072 * 3072 + 3 * 8192 * 3072) // 8                     # 14,155,776
    whole = 2 * 3072                                                       # two layer norms
    params = 32064 * 3072 + 32064 * 3072 // 8 + 3072 + 32 * (split + whole)  # embedding, lm_head / 8, final norm
    by_hand = 2 * params + 4 * 48  # bf16, and rope.inv_freq (head_dim / 2) in float32: 1,127,995,584 B
    model = read_model_config(str(tmp_path))
    cfg = CompileConfig(checkpoint=str(tmp_path), target="neuron", neuron_target="inf2", tp_degree=8, max_num_seqs=8,
                        max_model_len=4096, batch_buckets=(8,), kv_buckets=(4096,))  # buckets: no bearing on weights
    assert hbm_per_core(cfg, model).weights_bytes == by_hand == 1_127_995_584
    assert f"weights, once per rank, shared by every graph: {by_hand / 2 ** 30:.3f} GiB" in text  # 1.051 GiB
    # KV per rank: 8 sequence slots + 4 prefix-cache rows, 4 of 32 KV heads: 2 x 32x12x4x4096x96 x 2 B = 2.25 GiB
    assert "2 x 32x12x4x4096x96 x 2 B = 2.250 GiB (8 sequence slots + 4 prefix-cache rows; each row 192.0 MiB)" in text
    assert "of 16 GiB: fits" in text.split("total: ")[1].split("\n")[0]


def test_dry_run_of_a_qwen3_8b_shaped_config_at_tp_8(tmp_path, capsys):
    """Qwen3-8B's shape (config.json only), by hand: at tp 8 each rank holds the projections and the (untied)
    lm_head / 8, and the embedding, the norms (q_norm/k_norm too: [head_dim] each) and rope whole."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 36,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645}))
    assert main(["--checkpoint", str(tmp_path), "--target", "neuron", "--neuron-target", "inf2", "--tp-degree", "8",
                 "--max-num-seqs", "8", "--max-model-len", "4096", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert ("(Qwen3ForCausalLM, 36 layers, 32 heads, 8 KV heads, head_dim 128, hidden 4096, intermediate 12288, "
            "vocab 151936)") in text
    # per layer, split over 8: q and o 4096x4096, k and v 1024x4096, gate/up/down 12288x4096
    split = (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 12288 * 4096) // 8   # 24,117,248
    whole = 2 * 4096 + 2 * 128                                              # two layer norms, q_norm, k_norm
    params = 151936 * 4096 + 151936 * 4096 // 8 + 4096 + 36 * (split + whole)  # embedding, lm_head / 8, final norm
    by_hand = 2 * params + 4 * 64  # bf16, and rope.inv_freq (head_dim / 2) in float32: 3,137,300,736 B
    model = read_model_config(str(tmp_path))
    cfg = CompileConfig(checkpoint=str(tmp_path), target="neuron", neuron_target="inf2", tp_degree=8, max_num_seqs=8,
                        max_model_len=4096, batch_buckets=(8,), kv_buckets=(4096,))  # buckets: no bearing on weights
    assert hbm_per_core(cfg, model).weights_bytes == by_hand == 3_137_300_736
    assert f"weights, once per rank, shared by every graph: {by_hand / 2 ** 30:.3f} GiB" in text  # 2.922 GiB
    # KV per rank: 8 sequence slots + 4 prefix-cache rows, 1 of 8 KV heads: 2 x 36x12x1x4096x128 x 2 B = 0.844 GiB
    assert "2 x 36x12x1x4096x128 x 2 B = 0.844 GiB (8 sequence slots + 4 prefix-cache rows; each row 72.0 MiB)" in text
    assert "of 16 GiB: fits" in text.split("total: ")[1].split("\n")[0]


def test_dry_run_of_a_gemma_2_9b_config_at_tp_8(tmp_path, capsys):
    """Gemma-2-9B's config.json, by hand (docs/neuron.md works it through): at tp 8 each rank holds the projections
    and lm_head / 8 (tied in the checkpoint, but the device's lm_head is a weight of its own), and the embedding,
    the four norms per layer and rope whole. Sliding layers keep every position too (no ring buffer)."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
        "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 256000,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1}))
    assert main(["--checkpoint", str(tmp_path), "--target", "neuron", "--neuron-target", "inf2", "--tp-degree", "8",
                 "--max-num-seqs", "8", "--max-model-len", "8192", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert ("(Gemma2ForCausalLM, 42 layers, 16 heads, 8 KV heads, head_dim 256, hidden 3584, intermediate 14336, "
            "vocab 256000)") in text
    # per layer, split over 8: q 4096x3584, k and v 2048x3584, o 3584x4096, gate/up/down 14336x3584
    split = (2 * 4096 * 3584 + 2 * 2048 * 3584 + 3 * 14336 * 3584) // 8   # 24,772,608
    whole = 4 * 3584                                                      # input, post-attention, pre/post-FF norms
    params = 256000 * 3584 + 256000 * 3584 // 8 + 3584 + 42 * (split + whole)  # embedding, lm_head / 8, final norm
    by_hand = 2 * params + 4 * 128  # bf16, and rope.inv_freq (head_dim / 2) in float32: 4,146,494,976 B
    assert by_hand == 4_146_494_976
    assert f"weights, once per rank, shared by every graph: {by_hand / 2 ** 30:.3f} GiB" in text  # 3.862 GiB
    # KV per rank: 8 sequence slots + 4 prefix-cache rows, 1 of 8 KV heads: 2 x 42x12x1x8192x256 x 2 B = 3.938 GiB
    assert "2 x 42x12x1x8192x256 x 2 B = 3.938 GiB (8 sequence slots + 4 prefix-cache rows; each row 336.0 MiB)" in text
    assert "total: 11.414 GiB of 16 GiB: fits" in text
