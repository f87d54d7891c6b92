"""NeuronRunner against the double: loading, core claiming, host checks, and eager parity with the cpu target.

The parity tests run the neuron bucket graphs *eagerly on CPU* (the double's trace returns the module
itself): same logits and greedy tokens as the cpu target prove that the in-graph cache update
(out-of-place scatter, padding rows parked at the never-read last position, chunked prefill reading
the slot back, the hand-over of the cache between graphs) is right. They say nothing about neuronx-cc.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from compile.buckets import GraphSpec
from compile.manifest import ArtifactError, Manifest
from compile.model import ModelConfig
from compile.neuron import toolchain
from compile.neuron.graphs import MODEL_BUILDER, NeuronBucketGraph
from neuron import neuron_double
from neuron.conftest import build_neuron
from server.runner.artifact import NEURON_HINT, verify_artifact
from server.runner.cpu_runner import CpuRunner
from server.runner.neuron_runner import NeuronRunner, claim_cores


@pytest.fixture
def tp1_artifact(neuron_double_installed, tiny_llama_dir, neuron_settings, tmp_path):
    return build_neuron(tiny_llama_dir, tmp_path / "neuron", neuron_settings)


def open_runner(path):
    return NeuronRunner(Manifest.read(path), path)


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def drive(runner) -> list[torch.Tensor]:
    """A mixed workload: two prompts in different buckets, batched decode, a chunked long prompt,
    a decode batch with a padding row, then compaction (copy_slot) and more decode."""
    v, outs = runner.vocab_size, []

    def step(out):
        outs.append(out.logits)
        return out.logits.argmax(-1).tolist()

    (ta,) = step(runner.prefill(0, prompt(10, 1, v), 0))
    (tb,) = step(runner.prefill(1, prompt(40, 2, v), 0))
    toks, pos = [ta, tb], [10, 40]
    for _ in range(3):
        toks, pos = step(runner.decode(toks, pos)), [p + 1 for p in pos]
    long = prompt(90, 3, v)
    step(runner.prefill(2, long[:64], 0))
    (tc,) = step(runner.prefill(2, long[64:], 64))
    toks, pos = toks + [tc], pos + [90]
    for _ in range(3):  # 3 rows -> batch bucket 4: one padding row
        toks, pos = step(runner.decode(toks, pos)), [p + 1 for p in pos]
    runner.copy_slot(2, 0, pos[2])  # slot 0 finished: move slot 2 into it
    toks, pos = [toks[2], toks[1]], [pos[2], pos[1]]
    for _ in range(3):
        toks, pos = step(runner.decode(toks, pos)), [p + 1 for p in pos]
    return outs


def fill_context(runner) -> list[torch.Tensor]:
    """A prompt up to the last position: the final chunk's padding would run past max_model_len."""
    v, last = runner.vocab_size, runner.max_model_len - 1
    ids = prompt(last, 4, v)
    chunk = runner.context_buckets[-1]
    cuts = [0, chunk, last - 27, last]  # the last chunk starts late: its padded rows would pass the end
    assert cuts[2] + chunk > runner.max_model_len
    outs = [runner.prefill(3, ids[a:b], a).logits for a, b in zip(cuts, cuts[1:])]
    outs.append(runner.decode([outs[-1].argmax().item()] * 4, [3, 3, 3, last]).logits[3:])
    return outs


def assert_same(neuron_outs, cpu_outs):
    assert len(neuron_outs) == len(cpu_outs)
    for i, (a, b) in enumerate(zip(neuron_outs, cpu_outs)):
        assert a.shape == b.shape, i
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"greedy tokens differ at step {i}"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"logits differ at step {i}")


def test_load_binds_weights_once_per_graph_and_moves_each_to_a_core(tp1_artifact, neuron_double_installed):
    rec = neuron_double_installed
    runner = open_runner(tp1_artifact)
    manifest = Manifest.read(tp1_artifact)
    loads = rec.of("torch.jit.load")
    assert sorted(l["path"] for l in loads) == sorted(str(tp1_artifact / g["file"]) for g in manifest.graphs)
    binds = rec.of("torch_neuronx.replace_weights")
    moves = rec.of("torch_neuronx.move_trace_to_device")
    graphs = list(runner.graphs.graphs.values())
    assert [b["trace"] for b in binds] == graphs and [m["trace"] for m in moves] == graphs
    assert all(b["weights"] is binds[0]["weights"] for b in binds)  # one shared host copy
    assert binds[0]["keys"] == sorted(runner.graphs.weights)
    assert all(m["device_id"] == 0 for m in moves)
    assert runner.cores == "NEURON_RT_NUM_CORES=1"
    rec.calls.clear()
    runner.warmup()  # every bucket once
    called = {c["trace"] for c in rec.of("torch_neuronx.replace_weights")}
    assert len(called) <= len(graphs)  # hand-overs only: weights are never re-bound
    assert all(c["keys"] == ["cache_k", "cache_v"] for c in rec.of("torch_neuronx.replace_weights"))


def test_tp1_runner_matches_cpu_target(tp1_artifact, tiny_artifact):
    cpu = CpuRunner(Manifest.read(tiny_artifact), tiny_artifact)
    assert_same(drive(open_runner(tp1_artifact)), drive(cpu))


def test_prompt_filling_the_whole_context_matches_cpu_target(tp1_artifact, tiny_artifact):
    cpu = CpuRunner(Manifest.read(tiny_artifact), tiny_artifact)
    assert_same(fill_context(open_runner(tp1_artifact)), fill_context(cpu))


class EagerModelBuilderGraphs:
    """What an NxDModel does with one module traced at many tags, run eagerly at world size 1:
    every tag shares the module's cache buffers, which forward reassigns."""

    def __init__(self, path):
        from safetensors.torch import load_file

        from compile.neuron.parallel import full_checkpoint
        manifest = Manifest.read(path)
        model = ModelConfig.from_dict(manifest.model)
        self.specs = {g["name"]: GraphSpec(g["kind"], g["seq_len"], g["batch"], g["kv_len"]) for g in manifest.graphs}
        with neuron_double.NxDParallelState(world_size=1, tensor_model_parallel_size=1):
            self.module = NeuronBucketGraph(model, next(iter(self.specs.values())), manifest.max_num_seqs,
                                            manifest.max_model_len, torch.float32, 1, MODEL_BUILDER)
        for name, tensor in full_checkpoint(model, load_file(str(path / manifest.weights[0]))).items():
            neuron_double.set_tensor(self.module, name, tensor)

    def run(self, name, *inputs):
        self.module.spec = self.specs[name]
        return self.module(*inputs)

    def copy_slot(self, src, dst, length):
        k, v = self.module.cache_k.clone(), self.module.cache_v.clone()
        k[:, dst, :, :, :length] = k[:, src, :, :, :length]
        v[:, dst, :, :length] = v[:, src, :, :length]
        self.module.cache_k, self.module.cache_v = k, v


def test_model_builder_graph_with_parallel_layers_matches_cpu_target(tp1_artifact, tiny_artifact):
    runner = open_runner(tp1_artifact)
    runner.graphs = EagerModelBuilderGraphs(tp1_artifact)
    assert isinstance(runner.graphs.module.lm_head, neuron_double.ColumnParallelLinear)
    cpu = CpuRunner(Manifest.read(tiny_artifact), tiny_artifact)
    assert_same(drive(runner), drive(cpu))


def test_tp2_runner_loads_one_nxd_model_with_per_rank_weights(neuron_double_installed, tiny_llama_dir,
                                                               neuron_settings, tmp_path):
    rec = neuron_double_installed
    path = build_neuron(tiny_llama_dir, tmp_path / "tp2", neuron_settings, tp_degree=2)
    rec.calls.clear()
    runner = open_runner(path)
    assert runner.cores == "NEURON_RT_NUM_CORES=2"
    (load,) = rec.of("NxDModel.load")
    assert load["path"] == str(path / "graphs/nxd_model.pt")
    (weights,) = rec.of("NxDModel.set_weights")
    shards = weights["sharded_checkpoint"]
    assert len(shards) == 2 and shards[0]["model.layers.0.self_attn.q_proj.weight"].shape[0] == 32
    assert [name for name, _ in rec.calls] == ["NxDModel.load", "NxDModel.set_weights", "NxDModel.to_neuron"]
    runner.warmup()
    called = [c["model_name"] for c in rec.of("NxDModel.forward")]
    assert set(called) == {g["name"] for g in Manifest.read(path).graphs}
    out = runner.decode([1, 2, 3], [5, 6, 7])
    assert out.logits.shape == (3, runner.vocab_size) and out.run.bucket == "decode_b4_k32"
    assert rec.of("NxDModel.forward")[-1]["input_shapes"] == [[4], [4]]
    runner.copy_slot(1, 0, 6)
    reads = rec.of("NxDModel.read_from_neuron_buffer")
    writes = rec.of("NxDModel.write_to_neuron_buffer")
    assert {(r["buffer_key"], r["rank"]) for r in reads} == {(k, r) for k in ("cache_k", "cache_v") for r in (0, 1)}
    assert len(writes) == 4


def test_visible_cores_are_respected_or_refused(monkeypatch):
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "4-7")
    assert claim_cores(4) == "NEURON_RT_VISIBLE_CORES=4-7"
    with pytest.raises(ArtifactError, match="gives 4 NeuronCore"):
        claim_cores(8)
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES")
    monkeypatch.setenv("NEURON_RT_NUM_CORES", "2")
    assert claim_cores(2) == "NEURON_RT_NUM_CORES=2"
    monkeypatch.delenv("NEURON_RT_NUM_CORES")
    assert claim_cores(8) == "NEURON_RT_NUM_CORES=8"  # unset: ask for 8 free cores, name none
    assert os.environ["NEURON_RT_NUM_CORES"] == "8" and "NEURON_RT_VISIBLE_CORES" not in os.environ


def refused(path) -> str:
    with pytest.raises(ArtifactError) as err:
        verify_artifact(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_host_check_refuses_other_compiler_or_torch_neuronx_version(tp1_artifact, monkeypatch):
    verify_artifact(tp1_artifact)  # same versions, same family: fine
    found = dict(neuron_double.VERSIONS, **{"neuronx-cc": "2.22.0.0"})
    monkeypatch.setattr(toolchain, "installed_version", found.get)
    message = refused(tp1_artifact)
    assert f"neuronx-cc expected {neuron_double.VERSIONS['neuronx-cc']}" in message and "found 2.22.0.0" in message
    found = dict(neuron_double.VERSIONS, **{"torch-neuronx": "2.9.0.2.13.0"})
    monkeypatch.setattr(toolchain, "installed_version", found.get)
    assert "torch-neuronx expected" in refused(tp1_artifact)


def test_host_check_refuses_other_instance_family(tp1_artifact, monkeypatch):
    monkeypatch.setenv("KILN_NEURON_INSTANCE_TYPE", "trn1.32xlarge")
    message = refused(tp1_artifact)
    assert "instance family expected inf2" in message and "found trn1" in message
    monkeypatch.setenv("KILN_NEURON_INSTANCE_TYPE", "inf2.48xlarge")
    verify_artifact(tp1_artifact)
    monkeypatch.delenv("KILN_NEURON_INSTANCE_TYPE")
    monkeypatch.setattr(toolchain, "DMI_PRODUCT_NAME", tp1_artifact / "no-such-file")
    verify_artifact(tp1_artifact)  # family unknown: not refused on a guess


def test_host_without_torch_neuronx_gets_the_one_line_hint(tp1_artifact, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_neuronx")
    assert NEURON_HINT in refused(tp1_artifact)
