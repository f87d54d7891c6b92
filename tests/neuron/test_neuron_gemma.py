"""Gemma 2 and Gemma 3 (text) on the neuron graph path, against the double.

Every norm (four per layer, Gemma 3's q/k norms, the final one) and Gemma 3's second rope (rope.local_inv_freq,
float32) are replicated on every rank, never sharded; the projections shard as for Llama. At tp 1 the double
runs the NxDModel's tags eagerly, so Gemma 2's logits (attention and final soft-capping, sliding and global
layers alternating, the window shorter than the prompts) must be the cpu target's (test_neuron_runner.py
explains what that does and does not prove)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compile.config import CompileConfig
from compile.export import build_artifact
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron.plan import hbm_per_core, sharded
from neuron.conftest import build_neuron
from neuron.test_neuron_runner import assert_same, drive, fill_context, open_runner
from server.runner.cpu_runner import CpuRunner
from tiny_models import TINY_ARTIFACT_SETTINGS, make_tiny_checkpoint

GEMMA3_LAYERS = dict(layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def tiny_gemma_dirs(tmp_path_factory, smollm2_tokenizer_dir):
    return {"gemma2": make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gemma2"), smollm2_tokenizer_dir, "gemma2"),
            "gemma3": make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gemma3"), smollm2_tokenizer_dir, "gemma3",
                                           **GEMMA3_LAYERS)}


def test_gemma3_shards_at_tp_2_with_replicated_norms_and_ropes(neuron_double_installed, tiny_gemma_dirs, tmp_path):
    """Gemma 3 holds every replicated tensor Gemma 2 does (four norms a layer), and q/k norms and a second rope."""
    arch, tp = "gemma3", 2
    rec, folder = neuron_double_installed, tiny_gemma_dirs[arch]
    out = build_neuron(folder, tmp_path / "a", TINY_ARTIFACT_SETTINGS, tp_degree=tp)
    model = ModelConfig.from_dict(Manifest.read(out).model)
    assert (model.sandwich_norms, model.norm_add_one, model.full_attention_layers) == (True, True, (1,))
    assert model.qk_norm == (arch == "gemma3") and (model.rope_local_base_freq is not None) == (arch == "gemma3")
    (builder,) = rec.of("neuronx_distributed.ModelBuilder")
    params = dict(builder["model"].named_parameters())
    replicated = {n for n in params if n.endswith("norm.weight") or n.startswith("rope.")}
    per_layer = 4 + (2 if arch == "gemma3" else 0)
    assert len(replicated) == model.num_layers * per_layer + 1 + (2 if arch == "gemma3" else 1)
    assert not any(sharded(n) for n in replicated)  # the HBM estimate counts them whole on every rank
    assert all(params[n].dtype == torch.float32 for n in replicated if n.startswith("rope."))
    stored = load_file(str(folder / "model.safetensors"))
    for rank in range(tp):
        with safe_open(str(out / f"weights/tp_rank_{rank:02d}.safetensors"), "pt") as f:
            for name in replicated - {"rope.inv_freq", "rope.local_inv_freq"}:  # whole, the checkpoint's own
                assert torch.equal(f.get_tensor(name), stored[name]), (rank, name)
            if arch == "gemma3":  # the sliding layers' base 10000, the global layers' 1e6 (Gemma3TextConfig's)
                assert f.get_tensor("rope.local_inv_freq")[1] > f.get_tensor("rope.inv_freq")[1]
            gate = f.get_tensor("model.layers.1.mlp.gate_proj.weight")
            assert torch.equal(gate, stored["model.layers.1.mlp.gate_proj.weight"].chunk(tp)[rank])
    runner = open_runner(out)  # the double's set_weights checks every rank's keys against the traced module
    assert runner.decode([1, 2, 3], [5, 6, 7]).logits.shape == (3, runner.vocab_size)
    cfg = CompileConfig(checkpoint=str(folder), target="neuron", neuron_target="inf2", tp_degree=tp,
                        **TINY_ARTIFACT_SETTINGS)
    est = hbm_per_core(cfg, model)
    for rank in range(tp):
        held = rec.device.by_core[rank]
        assert (held["weights"], held["state"]) == (est.weights_bytes, est.kv_bytes), rank


def test_gemma2_tp1_runner_matches_cpu_target(neuron_double_installed, tiny_gemma_dirs, tmp_path):
    folder = tiny_gemma_dirs["gemma2"]
    neuron = build_neuron(folder, tmp_path / "neuron", TINY_ARTIFACT_SETTINGS)
    cpu_out = tmp_path / "cpu"
    build_artifact(CompileConfig(checkpoint=str(folder), target="cpu", **TINY_ARTIFACT_SETTINGS), cpu_out,
                   progress=False)
    cpu = lambda: CpuRunner(Manifest.read(cpu_out), cpu_out)  # noqa: E731
    assert_same(drive(open_runner(neuron)), drive(cpu()))
    assert_same(fill_context(open_runner(neuron)), fill_context(cpu()))
