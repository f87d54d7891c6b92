"""Phi-3 (fused qkv_proj / gate_up_proj in the checkpoint, partial rotary, LongRoPE) on the neuron graph path,
against the double.

The fused projections are split into q/k/v and gate/up at load (compile/checkpoint.py), so tp sharding splits
each of them column-parallel like Llama's: rank r holds rows r/tp of q, of k and of v, not rows r/tp of the
fused matrix (which would mix q with k). rope.inv_freq holds rotary_dim / 2 frequencies (the long factors
here: max_model_len 128 > original 64), replicated. At tp 1 the double runs the tags eagerly, so the logits
must be the cpu target's (test_neuron_runner.py explains what that does and does not prove)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from compile.checkpoint import load_checkpoint
from compile.config import CompileConfig
from compile.export import build_artifact
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron.builder import tags, write_rank_weights
from compile.neuron.plan import hbm_per_core
from neuron.conftest import build_neuron
from neuron.test_neuron_runner import assert_same, drive, open_runner
from server.runner.cpu_runner import CpuRunner
from tiny_models import TINY_ARTIFACT_SETTINGS, make_tiny_checkpoint, phi3_longrope

ROTARY = 8  # head_dim 16 x partial 0.5
# One graph per kind (bucket edges are test_neuron_runner.py's business): drive's prompts, decode batches of up
# to 4 rows and a chunk, at a third of the tiny artifact's graphs.
SETTINGS = dict(TINY_ARTIFACT_SETTINGS, context_buckets=(64,), batch_buckets=(4,), kv_buckets=(128,),
                prefix_cache_rows=0)


def test_phi3_on_the_neuron_path(neuron_double_installed, smollm2_tokenizer_dir, tmp_path):
    """tp 1: the traced module's rope holds rotary_dim / 2 frequencies, the device holds what the dry run
    estimates, and the logits are the cpu target's; tp 2: each rank's q, k, v, gate and up are its rows of
    that part of the fused checkpoint tensor."""
    rec = neuron_double_installed
    ckpt = make_tiny_checkpoint(tmp_path / "phi3", smollm2_tokenizer_dir, "phi3", tie_word_embeddings=False,
                                **phi3_longrope(64, 0.5, ROTARY // 2))
    neuron = build_neuron(ckpt, tmp_path / "neuron", SETTINGS)
    model = ModelConfig.from_dict(Manifest.read(neuron).model)
    assert (model.architecture, model.rotary_dim, model.rope_type, model.longrope_factors) == (
        "Phi3ForCausalLM", ROTARY, "longrope", "long")
    cfg = CompileConfig(checkpoint=str(ckpt), target="neuron", neuron_target="inf2", **SETTINGS)
    assert [t["tag"] for t in rec.of("ModelBuilder.trace")] == [s.name for s in tags(cfg)]
    (builder,) = rec.of("neuronx_distributed.ModelBuilder")
    assert list(dict(builder["model"].named_parameters())["rope.inv_freq"].shape) == [ROTARY // 2]
    cpu_out = tmp_path / "cpu"
    build_artifact(CompileConfig(checkpoint=str(ckpt), target="cpu", **SETTINGS), cpu_out, progress=False)
    assert_same(drive(open_runner(neuron)), drive(CpuRunner(Manifest.read(cpu_out), cpu_out)))
    est = hbm_per_core(cfg, model)
    assert (rec.device.by_core[0]["weights"], rec.device.by_core[0]["state"]) == (est.weights_bytes, est.kv_bytes)

    tp = 2
    (tmp_path / "weights").mkdir()
    files = write_rank_weights(CompileConfig(checkpoint=str(ckpt), target="neuron", neuron_target="inf2",
                                             tp_degree=tp, **SETTINGS),
                               model, load_checkpoint(str(ckpt), torch.float32, 128).weights, tmp_path)
    stored = load_file(str(ckpt / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" not in stored  # the checkpoint has only the fused ones
    d, inter = model.head_dim, model.intermediate_size
    rope = load_file(str(neuron / "weights/model.safetensors"))["rope.inv_freq"]
    for rank, rel in enumerate(files):
        shard = load_file(str(tmp_path / rel))
        assert not any("qkv_proj" in n or "gate_up_proj" in n for n in shard)
        for i in range(model.num_layers):
            p = f"model.layers.{i}."
            q, k, v = stored[p + "self_attn.qkv_proj.weight"].split([4 * d, 2 * d, 2 * d])
            gate, up = stored[p + "mlp.gate_up_proj.weight"].split([inter, inter])
            for name, whole in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                                ("mlp.gate_proj", gate), ("mlp.up_proj", up)):
                assert torch.equal(shard[p + name + ".weight"], whole.chunk(tp)[rank]), (rank, name)
        assert torch.equal(shard["rope.inv_freq"], rope)  # replicated
