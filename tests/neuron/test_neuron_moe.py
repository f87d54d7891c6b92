"""Mixtral / Qwen3-MoE on the neuron graph path, against the double.

Each MoE layer's experts are three [E, I, H] stacks split over tp on the intermediate dim (dim 1, NxD's
tensor-parallel attributes on plain parameters, what shard_checkpoint slices by), the router replicated;
a Qwen3-MoE dense layer (mlp_only_layers) keeps its column/row-parallel MLP. At tp 1 the double runs the
NxDModel's tags eagerly, so its greedy tokens must be transformers' own (test_neuron_runner.py explains what
that does and does not prove). Compared with transformers directly, not with a cpu artifact: building one
costs more than the rest of this file."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from compile.checkpoint import load_checkpoint
from compile.config import CompileConfig
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron.builder import tags
from compile.neuron.plan import hbm_per_core, sharded
from neuron.conftest import build_neuron
from neuron.test_neuron_runner import open_runner
from tiny_models import TINY_ARTIFACT_SETTINGS, greedy_through_runner, hf_reference, make_tiny_checkpoint

STACKS = ("gate_proj", "up_proj", "down_proj_t")


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """Qwen3-MoE, 4 experts top 2, layer 1 dense (mlp_only_layers): both kinds of feed-forward in one model."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3moe"), smollm2_tokenizer_dir, "qwen3moe",
                                mlp_only_layers=[1])


@pytest.mark.parametrize("tp", [1, 2])
def test_moe_compiles_at_tp_1_and_2_with_experts_split_on_the_intermediate_dim(neuron_double_installed,
                                                                                tiny_moe_dir, tmp_path, tp):
    rec = neuron_double_installed
    out = build_neuron(tiny_moe_dir, tmp_path / "a", TINY_ARTIFACT_SETTINGS, tp_degree=tp)
    model = ModelConfig.from_dict(Manifest.read(out).model)
    assert (model.architecture, model.num_experts, model.num_experts_per_tok, model.dense_layers) == (
        "Qwen3MoeForCausalLM", 4, 2, (1,))
    cfg = CompileConfig(checkpoint=str(tiny_moe_dir), target="neuron", neuron_target="inf2", tp_degree=tp,
                        **TINY_ARTIFACT_SETTINGS)
    traces = rec.of("ModelBuilder.trace")
    assert [t["tag"] for t in traces] == [s.name for s in tags(cfg)]
    if tp == 1:  # the double ran every tag: logits out, both caches reassigned
        assert all(t["state_written"] == ["cache_k", "cache_v"] for t in traces)
    (builder,) = rec.of("neuronx_distributed.ModelBuilder")
    params = {n: list(p.shape) for n, p in builder["model"].named_parameters()}
    inter, hidden = model.moe_intermediate_size, model.hidden_size
    for stack in STACKS:
        assert params[f"model.layers.0.mlp.experts.{stack}"] == [4, inter // tp, hidden]
    assert params["model.layers.0.mlp.gate.weight"] == [4, hidden]
    assert "model.layers.0.mlp.gate_proj.weight" not in params and "model.layers.1.mlp.experts.up_proj" not in params
    assert params["model.layers.1.mlp.gate_proj.weight"] == [model.intermediate_size // tp, hidden]
    assert not sharded("model.layers.0.mlp.gate.weight") and sharded("model.layers.0.mlp.experts.down_proj_t")
    stored = load_checkpoint(str(tiny_moe_dir), torch.float32).weights
    for rank in range(tp):
        path = out / ("weights/model.safetensors" if tp == 1 else f"weights/tp_rank_{rank:02d}.safetensors")
        with safe_open(str(path), "pt") as f:
            router = "model.layers.0.mlp.gate.weight"
            assert torch.equal(f.get_tensor(router), stored[router]), rank  # replicated whole
            for stack in STACKS:
                name = f"model.layers.0.mlp.experts.{stack}"
                assert torch.equal(f.get_tensor(name), stored[name].chunk(tp, dim=1)[rank]), (rank, name)
    runner = open_runner(out)  # the double's set_weights checks every rank's keys against the traced module
    assert runner.decode([1, 2, 3], [5, 6, 7]).logits.shape == (3, runner.vocab_size)
    if tp == 1:
        assert_greedy_matches_transformers(runner, tiny_moe_dir)
    est = hbm_per_core(cfg, model)  # what each rank holds is what the dry run's estimate counts
    for rank in range(tp):
        held = rec.device.by_core[rank]
        assert (held["weights"], held["state"]) == (est.weights_bytes, est.kv_bytes), rank


def assert_greedy_matches_transformers(runner, ckpt):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    for length in (7, 70):  # one bucket, and a chunked prompt past the largest one
        prompt = torch.randint(0, runner.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
        prompt = prompt.tolist()
        ours, our_logits = greedy_through_runner(runner, prompt, 12)
        ref, ref_logits = hf_reference(hf, prompt, 12)
        assert ours == ref, length
        torch.testing.assert_close(our_logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_mixtral_tp1_greedy_matches_transformers(neuron_double_installed, smollm2_tokenizer_dir, tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "hf", smollm2_tokenizer_dir, "mixtral")
    assert_greedy_matches_transformers(open_runner(build_neuron(ckpt, tmp_path / "neuron", TINY_ARTIFACT_SETTINGS)),
                                       ckpt)


MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
                "rope_theta": 1e6, "max_position_embeddings": 32768, "sliding_window": None,
                "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def test_mixtral_8x7b_dry_run_estimate_is_the_hand_count_in_the_docs(tmp_path, capsys):
    """docs/neuron.md's by-hand figures for Mixtral-8x7B on trn1 at tp 8 (config.json only, no weights)."""
    import json

    from compile.__main__ import main
    from compile.neuron.plan import read_model_config
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    args = ["--checkpoint", str(tmp_path), "--target", "neuron", "--neuron-target", "trn1", "--tp-degree", "8",
            "--max-num-seqs", "8", "--max-model-len", "4096"]
    assert main(args + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    per_layer = (2 * 4096 * 4096 // 8 * 2 + 2 * 1024 * 4096 // 8 * 2 + 3 * 8 * 14336 // 8 * 4096 * 2 + 8 * 4096 * 2
                 + 2 * 4096 * 2)
    weights = 32000 * 4096 * 2 + 32000 * 4096 // 8 * 2 + 32 * per_layer + 4096 * 2 + 64 * 4
    assert weights == 11_907_375_360 and f"{weights / 2 ** 30:.3f}" == "11.090"
    model = read_model_config(str(tmp_path))
    assert (model.num_experts, model.moe_intermediate_size, model.norm_topk_prob) == (8, 14336, True)
    assert "8 experts top 2 of intermediate 14336 in 32 layers" in text
    assert "weights, once per rank, shared by every graph: 11.090 GiB" in text
    assert "KV state, once, shared by every graph: 2 x 32x12x1x4096x128 x 2 B = 0.750 GiB" in text
    assert "ffn = experts x (2 expert intermediate/tp + hidden + 1) = 61448" in text
    assert "total: 15.386 GiB of 16 GiB: fits" in text


def test_moe_rank_slices_sum_to_the_whole_layer():
    """What tp ranks compute: each rank's experts on its slice of the intermediate dim (the stacks chunked on
    dim 1, as shard_checkpoint does) give partial outputs whose sum (the one all-reduce) is the whole MoE layer.
    The double cannot run collectives, so this checks the arithmetic the all-reduce completes."""
    from compile.model import Weights, moe, weight_names
    from compile.neuron.graphs import local_config, weight_shapes
    cfg = ModelConfig(architecture="MixtralForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                      rope_type="default", rope_attention_scaling=1.0, attention_bias=False, tie_word_embeddings=True,
                      sliding_window=None, max_position_embeddings=64, bos_token_id=None, eos_token_ids=(),
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(s, generator=g) for n, s in weight_shapes(cfg).items()}
    names = weight_names(cfg)
    h = torch.randn(5, 32, generator=g)
    whole = moe(Weights(cfg, [full[n] for n in names]), 0, h)
    tp, parts = 4, []
    for rank in range(tp):
        local = {n: (t.chunk(tp, dim=1)[rank] if ".mlp.experts." in n else t) for n, t in full.items()}
        parts.append(moe(Weights(local_config(cfg, tp), [local[n] for n in names]), 0, h))
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-5)
