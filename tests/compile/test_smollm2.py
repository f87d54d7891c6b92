"""SmolLM2-135M-Instruct (the real default model): parity with transformers and artifact size."""
from __future__ import annotations

import json

import pytest
import torch

from compile.config import CompileConfig
from compile.export import build_artifact
from server.runner.artifact import load_artifact
from tiny_models import greedy_through_runner, hf_reference, smollm2_gguf_path

pytestmark = pytest.mark.slow
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWrite a haiku about compilers.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2_float32(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "f32"
    cfg = CompileConfig(checkpoint="smollm2-135m-instruct", dtype="float32", context_buckets=(32,),
                        batch_buckets=(1, 2), kv_buckets=(64,), max_num_seqs=2, max_model_len=64)
    build_artifact(cfg, out, progress=False)
    return load_artifact(out)


def test_greedy_parity_with_transformers_gguf(smollm2_float32):
    from transformers import AutoModelForCausalLM
    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = smollm2_float32.tokenizer
    for text in PROMPTS:
        prompt = tok(text)["input_ids"]
        ours, our_logits = greedy_through_runner(smollm2_float32.runner, prompt, 32)
        ref, ref_logits = hf_reference(hf, prompt, 32)
        assert ours == ref, f"{text!r}: {tok.decode(ours)!r} != {tok.decode(ref)!r}"
        assert ((our_logits - ref_logits).abs().max() / ref_logits.abs().max()) < 1e-4


def test_bfloat16_artifact_is_at_most_115_percent_of_its_weights(tmp_path):
    # few graphs: each is tens of KiB beside 270 MB of weights, and a bf16 export is slow on hosts without
    # bf16 oneDNN (portable graphs)
    cfg = CompileConfig(checkpoint="smollm2-135m-instruct", dtype="bfloat16", context_buckets=(128,),
                        batch_buckets=(1, 2), kv_buckets=(256,), max_num_seqs=2, max_model_len=256)
    result = build_artifact(cfg, tmp_path / "bf16", progress=False)
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    weights = sum(f["size"] for rel, f in manifest["files"].items() if rel.startswith("weights/"))
    assert result.weights_bytes == pytest.approx(weights, rel=0.001)  # stored once, as bf16
    assert result.artifact_bytes <= 1.15 * result.weights_bytes, (result.artifact_bytes, result.weights_bytes)
