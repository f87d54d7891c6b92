"""Qwen3 (per-head q/k RMSNorm, head_dim from the config, no qkv bias) on the neuron graph path, against the double.

The q_norm/k_norm weights are one [head_dim] vector each, the same for every head: replicated on every
rank, never sharded. At tp 1 the double runs the NxDModel's tags eagerly, so its logits must be the cpu
target's (test_neuron_runner.py explains what that does and does not prove)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compile.config import CompileConfig
from compile.export import build_artifact
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron.builder import tags
from compile.neuron.plan import hbm_per_core, sharded
from neuron.conftest import build_neuron
from neuron.test_neuron_runner import assert_same, drive, fill_context, open_runner
from server.runner.cpu_runner import CpuRunner
from tiny_models import TINY_ARTIFACT_SETTINGS, make_tiny_checkpoint

HEAD_DIM = 32  # hidden 64 / 4 heads is 16: q_proj is [128, 64], o_proj [64, 128]


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory, smollm2_tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"), smollm2_tokenizer_dir, "qwen3",
                                head_dim=HEAD_DIM, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def qwen3_cpu_artifact(tmp_path_factory, tiny_qwen3_dir):
    out = tmp_path_factory.mktemp("qwen3_cpu") / "a"
    build_artifact(CompileConfig(checkpoint=str(tiny_qwen3_dir), target="cpu", **TINY_ARTIFACT_SETTINGS), out,
                   progress=False)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_qwen3_compiles_at_tp_1_and_2_with_replicated_qk_norms(neuron_double_installed, tiny_qwen3_dir, tmp_path, tp):
    rec = neuron_double_installed
    out = build_neuron(tiny_qwen3_dir, tmp_path / "a", TINY_ARTIFACT_SETTINGS, tp_degree=tp)
    manifest = Manifest.read(out)
    model = ModelConfig.from_dict(manifest.model)
    assert (model.architecture, model.qk_norm, model.head_dim, model.attention_bias) == (
        "Qwen3ForCausalLM", True, HEAD_DIM, False)
    cfg = CompileConfig(checkpoint=str(tiny_qwen3_dir), target="neuron", neuron_target="inf2", tp_degree=tp,
                        **TINY_ARTIFACT_SETTINGS)
    traces = rec.of("ModelBuilder.trace")
    assert [t["tag"] for t in traces] == [s.name for s in tags(cfg)]
    local = [model.num_layers, cfg.num_cache_rows, model.num_kv_heads // tp, cfg.max_model_len, HEAD_DIM]
    for spec, t in zip(tags(cfg), traces):
        assert t["tp"] == tp and t["buffers"] == {"cache_k": local, "cache_v": local}
        if tp == 1:  # the double ran it: logits out, both caches reassigned
            assert t["state_written"] == ["cache_k", "cache_v"]
            if spec.kind != "copy_slot":
                assert t["output_shapes"][0][-1] == model.vocab_size
    (builder,) = rec.of("neuronx_distributed.ModelBuilder")
    norms = {n: list(p.shape) for n, p in builder["model"].named_parameters() if n.endswith(("q_norm.weight",
                                                                                              "k_norm.weight"))}
    assert norms == {f"model.layers.{i}.self_attn.{q}_norm.weight": [HEAD_DIM] for i in range(2) for q in "qk"}
    assert not any(sharded(n) for n in norms)  # the HBM estimate counts them whole on every rank
    if tp == 1:
        assert manifest.weights == ["weights/model.safetensors"]
        return
    stored = load_file(str(tiny_qwen3_dir / "model.safetensors"))
    q_out = model.num_heads * HEAD_DIM
    for rank in range(tp):
        with safe_open(str(out / f"weights/tp_rank_{rank:02d}.safetensors"), "pt") as f:
            for name in norms:  # replicated: every rank holds the whole vector, the checkpoint's own
                assert torch.equal(f.get_tensor(name), stored[name]), (rank, name)
            q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
            assert list(q.shape) == [q_out // tp, model.hidden_size]
            assert torch.equal(q, stored["model.layers.0.self_attn.q_proj.weight"].chunk(tp)[rank])
            assert list(f.get_slice("model.layers.1.self_attn.o_proj.weight").get_shape()) == [model.hidden_size,
                                                                                               q_out // tp]
            assert "model.layers.0.self_attn.q_proj.bias" not in f.keys()
    runner = open_runner(out)  # the double's set_weights checks every rank's keys against the traced module
    assert runner.decode([1, 2, 3], [5, 6, 7]).logits.shape == (3, runner.vocab_size)
    # what each rank holds (the norms whole) is what the dry run's estimate counts
    est = hbm_per_core(cfg, model)
    for rank in range(tp):
        held = rec.device.by_core[rank]
        assert (held["weights"], held["state"]) == (est.weights_bytes, est.kv_bytes), rank


def test_qwen3_tp1_runner_matches_cpu_target(neuron_double_installed, tiny_qwen3_dir, qwen3_cpu_artifact, tmp_path):
    neuron = build_neuron(tiny_qwen3_dir, tmp_path / "neuron", TINY_ARTIFACT_SETTINGS)
    cpu = lambda: CpuRunner(Manifest.read(qwen3_cpu_artifact), qwen3_cpu_artifact)  # noqa: E731
    assert_same(drive(open_runner(neuron)), drive(cpu()))
    assert_same(fill_context(open_runner(neuron)), fill_context(cpu()))

