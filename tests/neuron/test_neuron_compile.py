"""The neuron compile path against the recording double: what is traced, how, and what is written."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

from compile.buckets import GraphSpec, plan_graphs
from compile.config import CompileConfig, ConfigError
from compile.export import build_artifact
from compile.manifest import Manifest
from compile.model import ModelConfig
from compile.neuron import flags, toolchain, workers
from compile.neuron.builder import tags
from neuron import neuron_double
from neuron.conftest import build_neuron
from neuron.neuron_double import VERSIONS


def compile_cfg(checkpoint, settings, **neuron) -> CompileConfig:
    return CompileConfig(checkpoint=str(checkpoint), target="neuron", **{"neuron_target": "inf2", **neuron}, **settings)


def input_shapes(spec: GraphSpec) -> list[list[int]]:
    if spec.kind == "decode":
        return [[spec.batch], [spec.batch]]
    if spec.kind == "copy_slot":
        return [[1], [1], [1]]
    return [[spec.seq_len], [1], [1], [1]]  # input_ids, start_pos, last_index, slot: [1], never 0-dim


@pytest.mark.parametrize("tp", [1, 2])
def test_every_tp_builds_one_nxd_model_with_a_tag_per_bucket_over_shared_state(
        neuron_double_installed, tiny_llama_dir, neuron_settings, tmp_path, tp):
    rec = neuron_double_installed
    out = build_neuron(tiny_llama_dir, tmp_path / "a", neuron_settings, tp_degree=tp)
    manifest = Manifest.read(out)
    model = ModelConfig.from_dict(manifest.model)
    cfg = compile_cfg(tiny_llama_dir, neuron_settings, tp_degree=tp)
    specs = tags(cfg)
    assert specs == plan_graphs(cfg) + [GraphSpec("copy_slot")]
    assert not rec.of("torch_neuronx.trace")  # never one ScriptModule per bucket
    states = rec.of("neuronx_distributed.NxDParallelState")
    assert states and all(s == {"world_size": tp, "tensor_model_parallel_size": tp, "lnc_size": 1} for s in states)
    assert len(rec.of("neuronx_distributed.ModelBuilder")) == 1  # one module for every tag
    traces = rec.of("ModelBuilder.trace")
    assert [t["tag"] for t in traces] == [s.name for s in specs]
    assert [t["spec"] for t in traces] == specs  # each tag traced the graph it is named after
    # the chunk graph: chunk_len 64 (neuron's small chunk, 128, is not below it) at neuron's one past span
    assert [s.name for s in specs if s.kind == "prefill_chunk"] == ["prefill_chunk_s64_p128"]
    # the KV state's rows: the sequence slots, then the prefix cache's store rows (only copy_slot touches them)
    rows = cfg.num_cache_rows
    assert rows == neuron_settings["max_num_seqs"] + cfg.prefix_cache_rows and cfg.prefix_cache_rows > 0
    assert manifest.prefix_cache_rows == cfg.prefix_cache_rows
    max_len = neuron_settings["max_model_len"]
    local = [model.num_layers, rows, model.num_kv_heads // tp, max_len, model.head_dim]
    for spec, t in zip(specs, traces):
        assert t["tp"] == tp and t["input_shapes"] == input_shapes(spec)
        assert all(d == torch.int64 for d in t["input_dtypes"])
        assert t["buffers"] == {"cache_k": local, "cache_v": local}  # the KV state as buffers, per rank
        if tp == 1:  # the double ran the trace: logits only out, both caches reassigned (never in place)
            rows = {"decode": spec.batch, "copy_slot": 1}.get(spec.kind, 1)
            width = 1 if spec.kind == "copy_slot" else model.vocab_size
            assert t["output_shapes"] == ([[1]] if spec.kind == "copy_slot" else [[rows, width]])
            assert t["state_written"] == ["cache_k", "cache_v"]
    (compiled,) = rec.of("ModelBuilder.compile")
    assert set(compiled["compiler_args"]) == {s.name for s in specs}
    for spec in specs:
        args = compiled["compiler_args"][spec.name].split()
        assert args[:2] == ["--target", "inf2"]
        assert ("-O2" if spec.kind == "decode" else "-O1") in args
    assert isinstance(compiled["max_workers"], int) and 1 <= compiled["max_workers"] <= len(specs)
    assert compiled["platform_target"] == "inf2" and "NEURON_PLATFORM_TARGET_OVERRIDE" not in os.environ
    (saved,) = rec.of("NxDModel.save")
    assert saved["save_weights"] is False and saved["path"].endswith("/graphs/nxd_model.pt")
    assert manifest.neuron["nxd_model"] == "graphs/nxd_model.pt" and manifest.neuron["tracer"] == "ModelBuilder"
    assert manifest.neuron["copy_slot_tag"] == "copy_slot"
    record = json.loads((out / manifest.graphs[-1]["file"]).read_text())
    assert record["compiled_in"] == "graphs/nxd_model.pt" and "-O2" in record["compiler_args"]
    # the graphs hold no weights: together far smaller than one copy of the weights
    weights_size = sum(manifest.files[w]["size"] for w in manifest.weights)
    graphs_size = sum(f["size"] for name, f in manifest.files.items() if name.startswith("graphs/"))
    assert graphs_size < weights_size / 4


def test_tp1_stores_the_weights_once_and_tp2_one_shard_per_rank(neuron_double_installed, tiny_llama_dir,
                                                               neuron_settings, tmp_path):
    rec = neuron_double_installed
    one = Manifest.read(build_neuron(tiny_llama_dir, tmp_path / "one", neuron_settings))
    assert one.weights == ["weights/model.safetensors"] and one.neuron["rank_weights"] == []
    assert not rec.of("neuronx_distributed.shard_checkpoint")
    out = build_neuron(tiny_llama_dir, tmp_path / "two", neuron_settings, tp_degree=2)
    manifest = Manifest.read(out)
    model = ModelConfig.from_dict(manifest.model)
    shards = rec.of("neuronx_distributed.shard_checkpoint")
    assert [(s["start_rank"], s["end_rank"]) for s in shards] == [(0, 0), (1, 1)]
    assert manifest.weights == manifest.neuron["rank_weights"] == ["weights/tp_rank_00.safetensors",
                                                                   "weights/tp_rank_01.safetensors"]
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


def test_manifest_records_toolchain_sdk_target_lnc_and_tp(neuron_double_installed, tiny_llama_dir,
                                                          neuron_settings, tmp_path):
    manifest = Manifest.read(build_neuron(tiny_llama_dir, tmp_path / "a", neuron_settings, neuron_target="trn2"))
    assert manifest.target == "neuron" and manifest.tp_degree == 1
    for dist in ("neuronx-cc", "torch-neuronx", "neuronx-distributed"):
        assert manifest.versions[dist] == VERSIONS[dist]
    n = manifest.neuron
    assert (n["neuron_target"], n["lnc"], n["tp_degree"]) == ("trn2", 2, 1)
    assert (n["neuron_sdk"], n["neuron_sdk_supported"]) == ("2.28", "2.27-2.31")  # torch-neuronx 2.9.0.2.12.*
    assert toolchain.sdk_of("2.9.0.2.15.32035") == "2.31" and toolchain.sdk_of("2.9.0.2.16.1") == "unknown"
    assert (n["neuronx_cc"], n["torch_neuronx"]) == (VERSIONS["neuronx-cc"], VERSIONS["torch-neuronx"])
    assert n["neuronx_distributed"] == VERSIONS["neuronx-distributed"]
    assert "--lnc=2" in n["compiler_args"]["decode"] and "-O2" in n["compiler_args"]["decode"]
    assert "-O1" in n["compiler_args"]["prefill"] and "-O1" in n["compiler_args"]["copy_slot"]


def test_compile_passes_lnc_and_the_platform_target_so_no_device_is_asked(neuron_double_installed, tiny_llama_dir,
                                                                          neuron_settings, tmp_path):
    """Off-device, NxDParallelState without lnc_size asks the platform, and fails (the double too)."""
    rec = neuron_double_installed
    with pytest.raises(RuntimeError, match="logical NeuronCore"):
        neuron_double.NxDParallelState(world_size=2, tensor_model_parallel_size=2)
    with pytest.raises(RuntimeError, match="platform target"), \
            neuron_double.NxDParallelState(world_size=2, tensor_model_parallel_size=2, lnc_size=1):
        pass
    build_neuron(tiny_llama_dir, tmp_path / "a", neuron_settings, neuron_target="trn1", tp_degree=2)
    assert {s["lnc_size"] for s in rec.of("neuronx_distributed.NxDParallelState")[1:]} == {1}
    assert rec.of("ModelBuilder.compile")[0]["platform_target"] == "trn1"
    assert "NEURON_PLATFORM_TARGET_OVERRIDE" not in os.environ  # restored after the compile


def test_compile_workers_flag_and_memory_aware_default(neuron_double_installed, tiny_llama_dir,
                                                       neuron_settings, tmp_path):
    rec = neuron_double_installed
    build_neuron(tiny_llama_dir, tmp_path / "a", neuron_settings, neuron_compile_workers=3)
    assert rec.of("ModelBuilder.compile")[0]["max_workers"] == 3
    gib = 2 ** 30
    # 8B at tp 8: ~2 GiB of weights per rank -> 8 GiB per job; 30 GiB free -> 3 jobs, not 31
    assert workers.default_workers(31, 2 * gib, available=30 * gib, cpus=64) == 3
    assert workers.default_workers(31, 0, available=1 * gib, cpus=64) == 1      # never 0
    assert workers.default_workers(4, 0, available=512 * gib, cpus=64) == 4     # at most one per graph
    assert workers.default_workers(31, 0, available=512 * gib, cpus=2) == 2     # at most one per CPU
    with pytest.raises(ConfigError, match="--neuron-compile-workers must be at least 1"):
        compile_cfg(tiny_llama_dir, neuron_settings, neuron_compile_workers=0)
    # how a compile runs is not what it makes: same compile key
    assert (compile_cfg(tiny_llama_dir, neuron_settings, neuron_compile_workers=3).key_dict()
            == compile_cfg(tiny_llama_dir, neuron_settings).key_dict())


class IndexRecorder(TorchDispatchMode):
    """Every scatter/gather-like aten op with its index operands' sizes and dtypes; every SDPA call;
    every op whose float output holds -inf."""

    SCATTERS = ("scatter", "index_put", "index_copy", "index_select", "gather")

    def __init__(self):
        super().__init__()
        self.indexing: list[tuple[str, int, torch.dtype]] = []
        self.sdpa: list[str] = []
        self.neg_inf: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if any(name.startswith(s) for s in self.SCATTERS):
            operands = list(args[1:]) + list(kwargs.values())
            flat = [t for a in operands for t in (a if isinstance(a, (list, tuple)) else [a])]
            for t in flat:
                if isinstance(t, torch.Tensor) and not t.is_floating_point():
                    self.indexing.append((name, t.numel(), t.dtype))
        if "scaled_dot_product" in name:
            self.sdpa.append(name)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and torch.isneginf(out).any():
            self.neg_inf.append(name)
        return out


def traced_module(checkpoint, settings, spec):
    from compile.neuron.builder import build_module, parallel_state, platform_target
    from compile.neuron.plan import read_model_config
    cfg = compile_cfg(checkpoint, settings)
    model = read_model_config(str(checkpoint))
    with platform_target(cfg), parallel_state(cfg):
        return build_module(cfg, model, spec).eval(), model


@pytest.mark.parametrize("spec", [GraphSpec("prefill", seq_len=16), GraphSpec("prefill_chunk", seq_len=64, kv_len=128),
                                  GraphSpec("decode", batch=4, kv_len=64), GraphSpec("copy_slot")],
                         ids=lambda s: s.name)
def test_kv_writes_use_small_int32_indices_and_masks_are_finite(neuron_double_installed, tiny_llama_dir,
                                                                neuron_settings, spec):
    """NxD Inference's prefill write: index_put on int32 [B, KV, S] indices, never expanded scatter
    indices over L x KV x max_len x head_dim (NEURON.md §12); attention masks are finite biases."""
    from compile.neuron.graphs import example_inputs
    module, model = traced_module(tiny_llama_dir, neuron_settings, spec)
    with torch.no_grad(), IndexRecorder() as seen:
        module(*example_inputs(spec))
    layers, kv, d = model.num_layers, model.num_kv_heads, model.head_dim
    rows = {"decode": spec.batch, "copy_slot": 1}.get(spec.kind, spec.seq_len)
    own_kv = layers * kv * rows * d * (neuron_settings["max_model_len"] if spec.kind == "copy_slot" else 1)
    writes = [(n, size, dt) for n, size, dt in seen.indexing if not n.startswith(("index_select", "embedding"))]
    assert writes, seen.indexing
    for name, size, dtype in writes:
        assert size <= own_kv // d or spec.kind == "copy_slot" and size == 1, (name, size, own_kv)
        assert not name.startswith("scatter"), name
    assert all(dt == torch.int32 for n, _, dt in writes if n.startswith("index_put")), writes
    assert all(size <= 1 for n, size, _ in seen.indexing if n.startswith("index_select")), seen.indexing
    # masks are finite biases and the attention is spelled out: SDPA's lowering compares against -inf
    assert not seen.sdpa and not seen.neg_inf, (seen.sdpa, seen.neg_inf)


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


def test_compiler_flags_per_graph_kind_and_target():
    assert flags.compiler_args("prefill", "trn1")[-1] == "-O1"
    assert flags.compiler_args("prefill_chunk", "trn1")[-1] == "-O1"
    assert flags.compiler_args("decode", "trn1")[-1] == "-O2"
    assert flags.compiler_args("decode", "trn2")[:2] == ["--target", "trn2"] and "--lnc=2" in flags.compiler_args("decode", "trn2")
    assert "'--tensorizer-options=--enable-ccop-compute-overlap" in flags.compiler_args_str("decode", "inf2")
    # NxDI: pipeline tiling factor 1 for token generation, 2 for context encoding
    assert "--cc-pipeline-tiling-factor=1" in flags.compiler_args_str("decode", "inf2")
    assert "--cc-pipeline-tiling-factor=2" in flags.compiler_args_str("prefill", "inf2")
    # explicit arguments drop NxD's default --enable-saturate-infinity: Kiln passes it on trn1
    assert "--enable-saturate-infinity" in flags.compiler_args("decode", "trn1")
    assert "--enable-saturate-infinity" in flags.compiler_args("prefill", "trn1")
    assert "--enable-saturate-infinity" not in flags.compiler_args("decode", "inf2")


def test_torch_neuronx_of_an_older_sdk_is_refused(monkeypatch):
    from compile import neuron_target
    neuron_double.install(monkeypatch)
    neuron_target.require_toolchain()  # 2.9.x: supported
    found = dict(VERSIONS, **{"torch-neuronx": "2.8.0.2.10.1"})
    monkeypatch.setattr(toolchain, "installed_version", found.get)
    with pytest.raises(ConfigError) as err:
        neuron_target.require_toolchain()
    assert "torch-neuronx 2.8.0.2.10.1 is not for PyTorch 2.9" in str(err.value) and "2.27-2.31" in str(err.value)
    monkeypatch.setitem(__import__("sys").modules, "neuronx_distributed", None)
    with pytest.raises(ConfigError, match="needs neuronx-distributed"):
        neuron_target.require_toolchain()


def test_dockerfile_docs_and_error_hint_name_one_supported_dlc():
    """The DLC image of deploy/docker/Dockerfile.neuron, docs/neuron.md and the toolchain hint agree,
    and its SDK is inside the supported range."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    dockerfile = (root / "deploy/docker/Dockerfile.neuron").read_text()
    (image,) = re.findall(r"ARG NEURON_DLC=\S+/(pytorch-inference-neuronx:\S+)", dockerfile)
    assert image == toolchain.DLC_IMAGE
    assert toolchain.DLC_IMAGE in (root / "docs/neuron.md").read_text()
    assert toolchain.DLC_IMAGE in toolchain.TOOLCHAIN_HINT
    sdk = re.search(r"sdk(\d+\.\d+)", image).group(1)
    low, high = toolchain.SUPPORTED_SDK.split("-")
    assert tuple(map(int, low.split("."))) <= tuple(map(int, sdk.split("."))) <= tuple(map(int, high.split(".")))
    assert image.startswith(f"pytorch-inference-neuronx:{toolchain.TORCH_NEURONX_SERIES}.")
