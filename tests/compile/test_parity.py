"""Token-for-token parity with Hugging Face transformers, through a compiled artifact."""
from __future__ import annotations

import pytest
import torch

import compile.model
from compile.config import CompileConfig
from compile.export import build_artifact
from server.runner.artifact import load_artifact
from tiny_models import greedy_through_runner, hf_reference, make_tiny_checkpoint

PARITY_SETTINGS = dict(dtype="float32", context_buckets=(16, 64), batch_buckets=(1, 2), kv_buckets=(32, 64, 128),
                       max_num_seqs=2, max_model_len=128)
# Lengths on both sides of each context bucket edge, and past the largest one (chunked prefill).
PROMPT_LENGTHS = (5, 16, 17, 64, 65, 90)
NEW_TOKENS = 24  # decode crosses the 32 and 64 KV bucket edges for most prompts

LLAMA3_ROPE = dict(tie_word_embeddings=False, rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
# (architecture, config overrides, --cpu-kernels): auto is cpu-onednn wherever oneDNN packs float32.
# "-split" compiles cpu-onednn decode graphs with the attention that long spans use.
VARIANTS = {
    "llama": ("llama", {}, "auto"),
    "llama-split": ("llama", {}, "auto"),
    "llama-portable": ("llama", {}, "portable"),
    "llama3-rope-untied": ("llama", LLAMA3_ROPE, "auto"),
    "mistral-sliding-window": ("mistral", dict(sliding_window=24), "auto"),
    "qwen2-bias-tied": ("qwen2", {}, "auto"),
    "qwen2-bias-untied-portable": ("qwen2", dict(tie_word_embeddings=False), "portable"),
    "qwen2-bias-untied": ("qwen2", dict(tie_word_embeddings=False), "auto"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory, smollm2_tokenizer_dir):
    from transformers import AutoModelForCausalLM
    arch, overrides, kernels = VARIANTS[request.param]
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), smollm2_tokenizer_dir, arch, **overrides)
    out = tmp_path_factory.mktemp("art") / request.param
    with pytest.MonkeyPatch.context() as patch:
        if request.param.endswith("-split"):
            patch.setattr(compile.model, "APPEND_MAX_SPAN_BYTES", 0)
        build_artifact(CompileConfig(checkpoint=str(ckpt), cpu_kernels=kernels, **PARITY_SETTINGS), out, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    return load_artifact(out).runner, hf


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_greedy_tokens_and_logits_match_transformers(variant, length):
    runner, hf = variant
    prompt = torch.randint(0, runner.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    ours, our_logits = greedy_through_runner(runner, prompt, NEW_TOKENS)
    ref, ref_logits = hf_reference(hf, prompt, NEW_TOKENS)
    assert ours == ref
    rel = (our_logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 1e-4, f"float32 logits differ by {rel:.2e} relative"


def test_batched_decode_rows_equal_single_rows(tiny_artifact):
    """Each row of a padded decode batch equals the same row decoded alone (float32)."""
    runner = load_artifact(tiny_artifact).runner
    prompts = [[11, 12, 13], list(range(100, 140)), [7] * 20]
    firsts = []
    for slot, p in enumerate(prompts):
        firsts.append(int(runner.prefill(slot, p, 0).logits[0].argmax()))
    batched = runner.decode(firsts, [len(p) for p in prompts]).logits
    for slot, p in enumerate(prompts):
        runner.copy_slot(slot, 3, len(p))
        runner.copy_slot(3, 0, len(p))
        alone = runner.decode([firsts[slot]], [len(p)]).logits[0]
        assert int(alone.argmax()) == int(batched[slot].argmax())
        torch.testing.assert_close(alone, batched[slot], rtol=1e-4, atol=1e-5)
        for s, q in enumerate(prompts):  # restore the slots the single run overwrote
            runner.prefill(s, q, 0)
