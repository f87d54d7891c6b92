"""The neuron compile path against the recording double: what is traced, how, and what is written."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from compile.buckets import plan_graphs
from compile.config import CompileConfig, ConfigError
from compile.export import build_artifact
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron import flags
from neuron.conftest import build_neuron
from neuron.neuron_double import VERSIONS


def compile_cfg(checkpoint, settings, **neuron) -> CompileConfig:
    return CompileConfig(checkpoint=str(checkpoint), target="neuron", **{"neuron_target": "inf2", **neuron}, **settings)


def test_tp1_traces_each_bucket_once_with_weights_out_and_cache_aliased(
        neuron_double_installed, tiny_llama_dir, neuron_settings, tmp_path):
    rec = neuron_double_installed
    out = build_neuron(tiny_llama_dir, tmp_path / "a", neuron_settings)
    manifest = Manifest.read(out)
    model = ModelConfig.from_dict(manifest.model)
    specs = plan_graphs(compile_cfg(tiny_llama_dir, neuron_settings))
    traces = rec.of("torch_neuronx.trace")
    assert [t["spec"] for t in traces] == specs  # one trace per bucket, in plan order
    slots, max_len = neuron_settings["max_num_seqs"], neuron_settings["max_model_len"]
    k_cache = [model.num_layers, slots, model.num_kv_heads, max_len, model.head_dim]
    v_cache = [model.num_layers, slots, model.num_kv_heads, max_len, model.head_dim]
    for spec, t in zip(specs, traces):
        if spec.kind == "decode":
            assert t["input_shapes"] == [[spec.batch], [spec.batch]]
            assert t["output_shapes"][0] == [spec.batch, model.vocab_size]
        else:  # input_ids, start_pos, last_index, slot: [1], never 0-dim (see graphs.py)
            assert t["input_shapes"] == [[spec.seq_len], [1], [1], [1]]
            assert t["output_shapes"][0] == [1, model.vocab_size]
        assert t["inline_weights_to_neff"] is False and t["cpu_backend"] is True
        args = t["compiler_args"]
        assert args[args.index("--target") + 1] == "inf2"
        assert {"--auto-cast=none", "--model-type=transformer", "--lnc=1"} <= set(args)
        assert any(a.startswith("--tensorizer-options=--enable-ccop-compute-overlap") for a in args)
        want, other = ("-O2", "-O1") if spec.kind == "decode" else ("-O1", "-O2")
        assert want in args and other not in args
        # the cache inputs (module state) alias the cache outputs, which have the cache's shape
        assert t["aliases"] == {"cache_k": 1, "cache_v": 2}
        assert t["output_shapes"][1:] == [k_cache, v_cache]
    saves = rec.of("torch.jit.save")
    assert sorted(s["path"].rsplit("/", 1)[1] for s in saves) == sorted(f"{s.name}.pt" for s in specs)
    assert all("/graphs/" in s["path"] for s in saves)
    assert [g["file"] for g in manifest.graphs] == [f"graphs/{s.name}.pt" for s in specs]
    # graphs carry stubs, not weights: together far smaller than one copy of the weights
    weights_size = manifest.files["weights/model.safetensors"]["size"]
    graphs_size = sum(f["size"] for name, f in manifest.files.items() if name.startswith("graphs/"))
    assert graphs_size < weights_size / 4


def test_tp1_manifest_records_toolchain_target_lnc_and_tp(neuron_double_installed, tiny_llama_dir,
                                                          neuron_settings, tmp_path):
    manifest = Manifest.read(build_neuron(tiny_llama_dir, tmp_path / "a", neuron_settings, neuron_target="trn2"))
    assert manifest.target == "neuron" and manifest.tp_degree == 1
    assert manifest.versions["neuronx-cc"] == VERSIONS["neuronx-cc"]
    assert manifest.versions["torch-neuronx"] == VERSIONS["torch-neuronx"]
    n = manifest.neuron
    assert (n["neuron_target"], n["lnc"], n["tp_degree"]) == ("trn2", 2, 1)
    assert (n["neuronx_cc"], n["torch_neuronx"]) == (VERSIONS["neuronx-cc"], VERSIONS["torch-neuronx"])
    assert "--lnc=2" in n["compiler_args"]["decode"] and "-O2" in n["compiler_args"]["decode"]
    assert "-O1" in n["compiler_args"]["prefill"]
    assert manifest.weights == ["weights/model.safetensors"]


def test_tp2_one_model_builder_tag_per_bucket_and_one_shard_per_rank(
        neuron_double_installed, tiny_llama_dir, neuron_settings, tmp_path):
    rec = neuron_double_installed
    out = build_neuron(tiny_llama_dir, tmp_path / "a", neuron_settings, tp_degree=2)
    manifest = Manifest.read(out)
    model = ModelConfig.from_dict(manifest.model)
    specs = plan_graphs(compile_cfg(tiny_llama_dir, neuron_settings, tp_degree=2))
    states = rec.of("neuronx_distributed.NxDParallelState")
    assert states and all(s == {"world_size": 2, "tensor_model_parallel_size": 2} for s in states)
    assert len(rec.of("neuronx_distributed.ModelBuilder")) == 1
    traces = rec.of("ModelBuilder.trace")
    assert [t["tag"] for t in traces] == [s.name for s in specs]
    assert [t["spec"] for t in traces] == specs  # each tag traced the bucket it is named after
    slots, max_len = neuron_settings["max_num_seqs"], neuron_settings["max_model_len"]
    local_k = [model.num_layers, slots, model.num_kv_heads // 2, max_len, model.head_dim]
    local_v = [model.num_layers, slots, model.num_kv_heads // 2, max_len, model.head_dim]
    for spec, t in zip(specs, traces):
        assert t["tp"] == 2
        assert t["input_shapes"] == ([[spec.batch], [spec.batch]] if spec.kind == "decode" else [[spec.seq_len], [1], [1], [1]])
        assert t["buffers"] == {"cache_k": local_k, "cache_v": local_v}  # cache as buffers, per rank
    (compiled,) = rec.of("ModelBuilder.compile")
    assert set(compiled["compiler_args"]) == {s.name for s in specs}
    for spec in specs:
        args = compiled["compiler_args"][spec.name].split()
        assert args[:2] == ["--target", "inf2"]
        assert ("-O2" if spec.kind == "decode" else "-O1") in args
    (saved,) = rec.of("NxDModel.save")
    assert saved["save_weights"] is False and saved["path"].endswith("/graphs/nxd_model.pt")
    # sharded once per rank, each rank written once, and no unsharded copy beside them
    shards = rec.of("neuronx_distributed.shard_checkpoint")
    assert [(s["start_rank"], s["end_rank"]) for s in shards] == [(0, 0), (1, 1)]
    assert manifest.weights == ["weights/tp_rank_00.safetensors", "weights/tp_rank_01.safetensors"]
    assert "weights/model.safetensors" not in manifest.files
    hidden, q_out = model.hidden_size, model.num_heads * model.head_dim
    kv_out, inter = model.num_kv_heads * model.head_dim, model.intermediate_size
    expected = {"model.layers.0.self_attn.q_proj.weight": [q_out // 2, hidden],
                "model.layers.0.self_attn.k_proj.weight": [kv_out // 2, hidden],
                "model.layers.0.self_attn.o_proj.weight": [hidden, q_out // 2],
                "model.layers.1.mlp.up_proj.weight": [inter // 2, hidden],
                "model.layers.1.mlp.down_proj.weight": [hidden, inter // 2],
                "lm_head.weight": [model.vocab_size // 2, hidden],
                "model.embed_tokens.weight": [model.vocab_size, hidden],
                "model.norm.weight": [hidden]}
    for rank in range(2):
        with safe_open(str(out / f"weights/tp_rank_{rank:02d}.safetensors"), "pt") as f:
            assert f.metadata()["tp_rank"] == str(rank)
            for name, shape in expected.items():
                assert list(f.get_slice(name).get_shape()) == shape, (rank, name)
    record = json.loads((out / manifest.graphs[-1]["file"]).read_text())
    assert record["compiled_in"] == "graphs/nxd_model.pt" and "-O2" in record["compiler_args"]
    assert manifest.neuron["nxd_model"] == "graphs/nxd_model.pt"
    assert manifest.versions["neuronx-distributed"] == VERSIONS["neuronx-distributed"]


@pytest.mark.parametrize("target,tp,expect", [
    ("inf2", 3, "--tp-degree 3 is not supported on inf2 (supported: 1, 2, 4, 8, 24)"),
    ("trn1", 4, "--tp-degree 4 is not supported on trn1 (supported: 1, 2, 8, 16, 32)"),
    ("inf2", 4, "--tp-degree 4 does not divide the model's KV heads (2)"),
    ("inf2", 8, "--tp-degree 8 does not divide the model's attention heads (4)"),
])
def test_unsupported_or_indivisible_tp_is_refused_in_one_line(tiny_llama_dir, neuron_settings, tmp_path, target, tp, expect):
    cfg = compile_cfg(tiny_llama_dir, neuron_settings, neuron_target=target, tp_degree=tp)
    with pytest.raises(ConfigError) as err:
        build_artifact(cfg, tmp_path / "a", progress=False)
    assert str(err.value).startswith(expect) and "\n" not in str(err.value)
    assert not (tmp_path / "a").exists()


def test_compiler_flags_per_graph_kind():
    assert flags.compiler_args("prefill", "trn1")[-1] == "-O1"
    assert flags.compiler_args("prefill_chunk", "trn1")[-1] == "-O1"
    assert flags.compiler_args("decode", "trn1")[-1] == "-O2"
    assert flags.compiler_args("decode", "trn2")[:2] == ["--target", "trn2"] and "--lnc=2" in flags.compiler_args("decode", "trn2")
    assert "'--tensorizer-options=--enable-ccop-compute-overlap" in flags.compiler_args_str("decode", "inf2")
