"""Weight-only int8 (--quantization int8): what is stored, and how far it moves the logits.

Greedy tokens of an int8 artifact may differ from the unquantised one's, so the claims are bounds: on
the tiny float32 model, teacher-forced logits within a small relative error and perplexity within 1%;
on SmolLM2 (slow), perplexity over a fixed English text within 2% of the unquantized model (benchmarks/bench_int8.py
prints the same numbers)."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from compile.config import CompileConfig, ConfigError
from compile.export import build_artifact
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.quantize import INT8_MAX, QUANTIZED_PROJECTIONS, is_quantized_projection, quantize_tensor
from server.runner.artifact import load_artifact
from tiny_models import TINY_ARTIFACT_SETTINGS

# The shared artifact's buckets at batch 1 (what the logit tests run), no prefix-cache rows: fewer graphs.
INT8_SETTINGS = dict(TINY_ARTIFACT_SETTINGS, batch_buckets=(1,), max_num_seqs=1, prefix_cache_rows=0)


def test_quantize_tensor_is_symmetric_per_output_channel():
    w = torch.randn(6, 40) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 5.0, 1.0])[:, None]
    w[5, 7] = -4.0  # a row whose largest magnitude is negative
    q, scale = quantize_tensor(w)
    assert (q.dtype, scale.dtype, tuple(scale.shape)) == (torch.int8, torch.float32, (6, 1))
    assert int(q.abs().max()) == INT8_MAX and int(q.min()) >= -INT8_MAX
    assert q[5, 7] == -INT8_MAX  # each row's largest magnitude maps to +-127 exactly
    assert torch.all((q.float() * scale - w).abs() <= scale / 2 + 1e-6)  # rounding, never clipping
    assert torch.equal(q[3], torch.zeros(40, dtype=torch.int8)) and scale[3] == 1.0  # a zero row, no 0/0


def test_only_layer_projections_are_quantized():
    assert all(is_quantized_projection(f"model.layers.11.{p}") for p in QUANTIZED_PROJECTIONS)
    for name in ("lm_head", "model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.self_attn.q_norm",
                 "model.layers.0.self_attn.qkv_proj", "layers.0.self_attn.q_proj"):
        assert not is_quantized_projection(name), name


def test_unknown_quantization_is_one_line_error():
    with pytest.raises(ConfigError, match=r"^--quantization must be one of none, int8, got 'int4'$"):
        CompileConfig(checkpoint="x", quantization="int4")


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory, tiny_llama_dir) -> dict:
    """The shared tiny checkpoint compiled int8, once per cpu graph variant (auto is cpu-onednn here)."""
    out = {}
    for kernels in ("auto", "portable"):
        out[kernels] = tmp_path_factory.mktemp("int8") / kernels
        build_artifact(CompileConfig(checkpoint=str(tiny_llama_dir), quantization="int8", cpu_kernels=kernels,
                                     **INT8_SETTINGS), out[kernels], progress=False)
    return out


def test_int8_artifact_stores_int8_projections_and_float32_scales(int8_artifacts, tiny_artifact):
    int8_artifact = int8_artifacts["auto"]
    manifest = Manifest.read(int8_artifact)
    model = ModelConfig.from_dict(manifest.model)
    assert model.quantization == "int8"
    assert Manifest.read(tiny_artifact).model.get("quantization") is None
    with safe_open(str(int8_artifact / manifest.weights[0]), "pt") as f:
        names = set(f.keys())
        for i in range(model.num_layers):
            for proj in QUANTIZED_PROJECTIONS:
                name = f"model.layers.{i}.{proj}"
                weight, scale = f.get_tensor(name + ".weight"), f.get_tensor(name + ".scale")
                assert (weight.dtype, scale.dtype, scale.shape[1]) == (torch.int8, torch.float32, 1), name
                assert scale.shape[0] == weight.shape[0]
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # stays in the dtype
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.float32
    assert "lm_head.weight" not in names  # tied: the embedding, unquantised


def teacher_forced_logits(runner, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Logits predicting tokens[prompt_len:], from a prefill of the prompt (chunked past the largest
    context bucket) then one decode step per token fed: [len(tokens) - prompt_len, vocab]."""
    pos, rows = 0, []
    while pos < prompt_len:
        piece = tokens[pos:min(prompt_len, pos + (runner.context_buckets[-1] if pos == 0 else runner.chunk_len))]
        out = runner.prefill(0, piece, pos)
        pos += len(piece)
    rows.append(out.logits[0])
    for t in tokens[prompt_len:-1]:
        rows.append(runner.decode([t], [pos]).logits[0])
        pos += 1
    return torch.stack(rows)


def perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    return math.exp(float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))))


def test_int8_logits_and_perplexity_stay_close_to_float32(int8_artifacts, tiny_artifact):
    # 70 prompt tokens (past the 64-token context bucket, so a chunk graph runs), then 30 decode steps
    # across KV buckets; random tokens, so the perplexities are high, but they must stay close.
    ref_runner = load_artifact(tiny_artifact).runner
    tokens = torch.randint(0, ref_runner.vocab_size, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = teacher_forced_logits(ref_runner, tokens, 70)
    targets = tokens[70:]
    got = {}
    for kernels, path in int8_artifacts.items():
        got[kernels] = teacher_forced_logits(load_artifact(path).runner, tokens, 70)
        rel = float((got[kernels] - ref).abs().max() / ref.abs().max())
        assert 0 < rel < 0.02, (kernels, rel)  # int8 moves the logits, but by little
        assert perplexity(got[kernels], targets) == pytest.approx(perplexity(ref, targets), rel=0.01), kernels
    # torch's int8 kernel (cpu-onednn) and the dequantise-after-matmul math (portable, as on neuron) agree
    assert torch.allclose(got["auto"], got["portable"], rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.slow
def test_smollm2_int8_perplexity_within_2_percent_of_the_unquantized_model():
    from benchmarks.bench_int8 import FIXED_TEXT, smollm2_perplexities
    from compile.cpu_kernels import onednn_problem, resolve_dtype
    from compile.dtypes import torch_dtype
    # what the default compile picks here: bfloat16, or float32 on an AVX2-only host (bf16 emulated, slow)
    dtype = resolve_dtype("auto", "cpu")
    ppl = smollm2_perplexities(FIXED_TEXT, dtype=dtype)
    onednn = onednn_problem(torch_dtype(dtype)) is None
    expected = {"int8-portable"} | ({"int8-cpu-onednn"} if onednn else set())
    assert {k for k in ppl if k.startswith("int8-")} == expected, ppl
    for label in expected:
        assert ppl[label] == pytest.approx(ppl[dtype], rel=0.02), (label, ppl)
    assert 1.0 < ppl[dtype] < 100.0, ppl  # a trained model on English text, not noise
