"""--quantization int8 on the neuron graph path, against the double: NxD Core's quantized parallel layers.

The projections become QuantizedColumnParallel / QuantizedRowParallel (per-channel symmetric int8, float32
scales); each rank holds int8 shards of the weights, column-parallel scales split with their rows and
row-parallel scales whole. At tp 1 the double runs the tags eagerly, dequantising as NxD Core does
(scale_dequantize after the matmul), so its logits must be the cpu target's int8 graphs' (torch's int8
kernel where oneDNN runs, the same math as neuron's on portable graphs)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compile.config import CompileConfig
from compile.export import build_artifact
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron.graphs import COLUMN_PARALLEL, ROW_PARALLEL
from compile.neuron.plan import hbm_per_core, read_model_config
from compile.quantize import quantized_config
from neuron.conftest import build_neuron
from neuron.test_neuron_runner import assert_same, drive, open_runner
from server.runner.cpu_runner import CpuRunner
from tiny_models import TINY_ARTIFACT_SETTINGS

SETTINGS = dict(TINY_ARTIFACT_SETTINGS, quantization="int8")


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_uses_nxd_quantized_layers_and_shards_scales_with_their_outputs(neuron_double_installed, tiny_llama_dir,
                                                                            tmp_path, tp):
    rec = neuron_double_installed
    out = build_neuron(tiny_llama_dir, tmp_path / "a", SETTINGS, tp_degree=tp)
    model = ModelConfig.from_dict(Manifest.read(out).model)
    assert model.quantization == "int8"
    layers = rec.of("neuronx_distributed.quantization.QuantizedLayer")
    per_module = len(COLUMN_PARALLEL + ROW_PARALLEL) * model.num_layers
    assert len(layers) % per_module == 0 and layers  # one module built per compile step, each fully quantized
    assert {(q["quantization_type"], q["quantized_dtype"], q["quantization_per_channel_axis"], q["scale_dtype"])
            for q in layers} == {("per_channel_symmetric", torch.int8, 0, torch.float32)}
    (builder,) = rec.of("neuronx_distributed.ModelBuilder")
    params = dict(builder["model"].named_parameters())
    assert params["lm_head.weight"].dtype == torch.float32  # lm_head and the embedding stay in the dtype
    cfg = CompileConfig(checkpoint=str(tiny_llama_dir), target="neuron", neuron_target="inf2", tp_degree=tp, **SETTINGS)
    est = hbm_per_core(cfg, model)
    if tp == 1:
        stored = load_file(str(out / "weights/model.safetensors"))
        assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
        runner = open_runner(out)  # the double's set_weights checks names, shapes and int8 where int8 is expected
        assert rec.device.by_core[0]["weights"] == est.weights_bytes
        assert runner.decode([1, 2], [5, 6]).logits.shape == (2, runner.vocab_size)
        return
    for rank in range(tp):
        with safe_open(str(out / f"weights/tp_rank_{rank:02d}.safetensors"), "pt") as f:
            q, q_scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight"), f.get_tensor(
                "model.layers.0.self_attn.q_proj.scale")
            o, o_scale = f.get_tensor("model.layers.1.self_attn.o_proj.weight"), f.get_tensor(
                "model.layers.1.self_attn.o_proj.scale")
            assert (q.dtype, o.dtype, q_scale.dtype) == (torch.int8, torch.int8, torch.float32)
            assert list(q.shape) == [model.num_heads * model.head_dim // tp, model.hidden_size]
            assert list(q_scale.shape) == [model.num_heads * model.head_dim // tp, 1]   # split with its rows
            assert list(o.shape) == [model.hidden_size, model.num_heads * model.head_dim // tp]
            assert list(o_scale.shape) == [model.hidden_size, 1]                       # whole on every rank
    open_runner(out)  # keys and dtypes of every rank checked by the double's set_weights
    for rank in range(tp):  # what each rank holds is what the dry run counts
        assert (rec.device.by_core[rank]["weights"], rec.device.by_core[rank]["state"]) == (est.weights_bytes,
                                                                                          est.kv_bytes), rank


def test_int8_halves_the_projection_bytes_of_the_dry_run_estimate(tiny_llama_dir):
    model = read_model_config(str(tiny_llama_dir))
    base = CompileConfig(checkpoint=str(tiny_llama_dir), target="neuron", neuron_target="inf2", **TINY_ARTIFACT_SETTINGS)
    int8 = CompileConfig(checkpoint=str(tiny_llama_dir), target="neuron", neuron_target="inf2", **SETTINGS)
    b = hbm_per_core(base, model).weights_bytes
    q = hbm_per_core(int8, quantized_config(model, "int8")).weights_bytes
    # float32 projections (4 B) become int8 (1 B) plus a float32 scale per output channel
    h, i, kv = model.hidden_size, model.intermediate_size, model.num_kv_heads * model.head_dim
    q_out = model.num_heads * model.head_dim
    per_layer_elems = h * q_out + 2 * h * kv + q_out * h + 3 * h * i
    per_layer_rows = q_out + 2 * kv + h + 2 * i + h
    assert b - q == model.num_layers * (per_layer_elems * 3 - per_layer_rows * 4)


def test_int8_tp1_runner_matches_cpu_int8(neuron_double_installed, tiny_llama_dir, tmp_path):
    neuron = build_neuron(tiny_llama_dir, tmp_path / "neuron", SETTINGS)
    cpu_path = tmp_path / "cpu"
    build_artifact(CompileConfig(checkpoint=str(tiny_llama_dir), target="cpu", **SETTINGS),
                   cpu_path, progress=False)
    assert_same(drive(open_runner(neuron)), drive(CpuRunner(Manifest.read(cpu_path), cpu_path)))


def test_dry_run_of_a_llama_8b_shaped_config_int8_at_tp_2_by_hand(tmp_path, capsys):
    """Llama-3.1-8B's shape, int8 at tp 2: the projections one byte each and split over 2, a float32 scale per
    output channel (column-parallel split, row-parallel whole); the embedding (whole) and the untied lm_head
    (split) stay bf16. bf16 at tp 2 holds 7.97 GiB of weights and does not fit (test_neuron_cli.py)."""
    import json

    from compile.__main__ import main
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    assert main(["--checkpoint", str(tmp_path), "--target", "neuron", "--neuron-target", "inf2", "--tp-degree", "2",
                 "--max-num-seqs", "8", "--max-model-len", "4096", "--quantization", "int8", "--dry-run"]) == 0
    text = capsys.readouterr().out
    projections = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096             # q, o; k, v; gate, up, down
    column_scales, row_scales = 4096 + 2 * 1024 + 2 * 14336, 4096 + 4096             # q, k, v, gate, up; o, down
    per_layer = projections // 2 + 4 * (column_scales // 2 + row_scales) + 2 * 4096 * 2  # + two bf16 layer norms
    by_hand = 2 * 128256 * 4096 + 2 * 128256 * 4096 // 2 + 2 * 4096 + 4 * 64 + 32 * per_layer
    assert by_hand == 5_069_480_192  # 4.721 GiB
    assert f"weights, once per rank, shared by every graph: {by_hand / 2 ** 30:.3f} GiB" in text
    assert "projections int8 (1 B) with a float32 scale per output channel" in text
    assert "of 16 GiB: fits" in text.split("total: ")[1].split("\n")[0]
