"""NeuronRunner against the double: loading, core claiming, host checks, and eager parity with the cpu target.

The parity tests run the NxDModel's tags *eagerly on CPU* (at world size 1 the double's NxDModel runs
the one traced module, its buffers shared by every tag as the state is on a device): the same logits
and greedy tokens as the cpu target prove that the in-graph cache update (index_put writes, padding
rows parked at the never-read last position, chunked prefill reading the slot back, the device-side
slot copy) is right. They say nothing about neuronx-cc.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from compile.manifest import ArtifactError, Manifest
from compile.model import ModelConfig
from compile.neuron import toolchain
from neuron import neuron_double
from neuron.conftest import build_neuron
from server.runner.artifact import verify_artifact
from server.runner.neuron_runner import NEURON_HINT
from server.runner.cpu_runner import CpuRunner
from server.runner.neuron_runner import NeuronRunner, claim_cores, count_cores


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


def test_load_is_one_nxd_model_with_the_weights_bound_once(tp1_artifact, neuron_double_installed):
    rec = neuron_double_installed
    rec.calls.clear()
    runner = open_runner(tp1_artifact)
    assert [name for name, _ in rec.calls] == ["NxDModel.load", "NxDModel.set_weights", "NxDModel.to_neuron"]
    assert rec.of("NxDModel.load")[0]["path"] == str(tp1_artifact / "graphs/nxd_model.pt")
    (weights,) = rec.of("NxDModel.set_weights")[0]["sharded_checkpoint"]  # one rank; keys checked by the double
    model = ModelConfig.from_dict(Manifest.read(tp1_artifact).model)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]  # tied: no second host copy
    assert model.tie_word_embeddings
    assert runner.cores == "NEURON_RT_NUM_CORES=1"
    rec.calls.clear()
    runner.warmup()  # every tag once, the copy tag included; weights never bound again
    called = {c["model_name"] for c in rec.of("NxDModel.forward")}
    assert called == {g["name"] for g in Manifest.read(tp1_artifact).graphs} | {"copy_slot"}
    assert not rec.of("NxDModel.set_weights")


def test_tp1_runner_matches_cpu_target(tp1_artifact, tiny_artifact):
    cpu = CpuRunner(Manifest.read(tiny_artifact), tiny_artifact)
    assert_same(drive(open_runner(tp1_artifact)), drive(cpu))


def test_prompt_filling_the_whole_context_matches_cpu_target(tp1_artifact, tiny_artifact):
    cpu = CpuRunner(Manifest.read(tiny_artifact), tiny_artifact)
    assert_same(fill_context(open_runner(tp1_artifact)), fill_context(cpu))


def test_copy_slot_on_the_device_copies_only_the_first_positions(tp1_artifact, neuron_double_installed):
    """length < head_dim: the copy is along positions, not head_dim (both caches are [L, N, KV, P, D])."""
    runner = open_runner(tp1_artifact)
    v = runner.vocab_size
    runner.prefill(1, prompt(12, 5, v), 0)
    runner.prefill(0, prompt(30, 6, v), 0)
    state = runner.graphs.model.module
    before_k, before_v = state.cache_k.clone(), state.cache_v.clone()
    length = 5
    assert length < runner.model.head_dim
    neuron_double_installed.calls.clear()
    runner.copy_slot(1, 0, length)
    (call,) = neuron_double_installed.of("NxDModel.forward")  # one device call, no host round trip
    assert call["model_name"] == "copy_slot" and call["input_shapes"] == [[1], [1], [1]]
    for before, after in ((before_k, state.cache_k), (before_v, state.cache_v)):
        assert torch.equal(after[:, 0, :, :length], before[:, 1, :, :length])
        assert torch.equal(after[:, 0, :, length:], before[:, 0, :, length:])  # the rest of slot 0 kept
        assert torch.equal(after[:, 1:], before[:, 1:])                        # other slots untouched
        assert not torch.equal(after[:, 0, :, :length], before[:, 0, :, :length])


def test_device_memory_is_weights_once_and_kv_once(tp1_artifact, neuron_double_installed):
    """Whatever the number of buckets: each rank's weights once, the KV state once, a NEFF per tag."""
    from compile.config import CompileConfig
    from compile.neuron.plan import hbm_per_core
    manifest = Manifest.read(tp1_artifact)
    open_runner(tp1_artifact)
    settings = dict(dtype=manifest.dtype, context_buckets=tuple(manifest.buckets["context"]),
                    batch_buckets=tuple(manifest.buckets["batch"]), kv_buckets=tuple(manifest.buckets["kv"]),
                    max_num_seqs=manifest.max_num_seqs, max_model_len=manifest.max_model_len)
    est = hbm_per_core(CompileConfig(checkpoint="x", target="neuron", neuron_target="inf2", **settings),
                       ModelConfig.from_dict(manifest.model))
    held = neuron_double_installed.device.by_core
    assert set(held) == {0}
    assert held[0] == {"weights": est.weights_bytes, "state": est.kv_bytes,
                       "neff": neuron_double.NEFF_BYTES * len(est.graphs)}


@pytest.mark.slow
def test_smollm2_default_plan_holds_weights_once_and_kv_once(neuron_double_installed, tmp_path):
    """The SmolLM2 checkpoint with the default buckets and neuron's default prefix-cache rows (32 graphs and the
    copy tag): resident bytes on the core are its weights once and its KV state once (16 sequence slots and
    4 store rows, about 1.2 GiB together), not once per graph."""
    from compile.config import NEURON_PREFIX_CACHE_ROWS, CompileConfig
    from compile.export import build_artifact
    from compile.neuron.plan import hbm_per_core
    rec = neuron_double_installed
    rec.execute_traces = False  # shapes only: thirty full-size eager traces would take minutes
    cfg = CompileConfig(checkpoint="smollm2-135m-instruct", target="neuron", neuron_target="inf2")
    assert cfg.prefix_cache_rows == NEURON_PREFIX_CACHE_ROWS  # the target's default, as `python -m compile` makes
    build_artifact(cfg, tmp_path / "smollm2", progress=False)
    runner = open_runner(tmp_path / "smollm2")
    model = ModelConfig.from_dict(Manifest.read(tmp_path / "smollm2").model)
    est = hbm_per_core(cfg, model)
    # 5 prefills, chunks of 128 and 512 tokens over neuron's one past span (2048), 5 x 5 decodes, copy
    names = [g.name for g in est.graphs]
    assert len(names) == 5 + 2 + 25 + 1
    assert [n for n in names if n.startswith("prefill_chunk")] == ["prefill_chunk_s128_p2048",
                                                                   "prefill_chunk_s512_p2048"]
    assert (runner.num_slots, runner.prefix_cache_rows, runner.num_cache_rows) == (16, 4, 20)
    row = 2 * model.num_layers * model.num_kv_heads * cfg.max_model_len * model.head_dim * 2  # K and V, bf16
    assert est.kv_bytes == 20 * row  # 45 MiB a row
    held = rec.device.by_core[0]
    assert held["weights"] == est.weights_bytes and held["state"] == est.kv_bytes
    assert rec.device.resident(0) - held["neff"] == est.resident_bytes
    assert est.resident_bytes < 1.2 * 2 ** 30  # one graph's worth: 326 MB of weights + 944 MB of KV


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
    assert set(rec.device.by_core) == {0, 1}
    assert rec.device.by_core[0]["state"] == rec.device.by_core[1]["state"]  # each rank: its KV heads, once
    runner.warmup()
    called = [c["model_name"] for c in rec.of("NxDModel.forward")]
    assert set(called) == {g["name"] for g in Manifest.read(path).graphs} | {"copy_slot"}
    out = runner.decode([1, 2, 3], [5, 6, 7])
    assert out.logits.shape == (3, runner.vocab_size) and out.run.bucket == "decode_b4_k32"
    assert rec.of("NxDModel.forward")[-1]["input_shapes"] == [[4], [4]]
    runner.copy_slot(1, 0, 6)
    assert rec.of("NxDModel.forward")[-1]["model_name"] == "copy_slot"


@pytest.mark.parametrize("spec,count", [("3", 1), ("0-3", 4), ("2,3", 2), ("51,52", 2), ("0-1,4,6-7", 5),
                                        (" 2, 3 ", 2), ("1,1", 1), ("a", 0), ("3-1", 0), ("1-", 0), ("", 0)])
def test_visible_cores_parse_lists_and_ranges(spec, count):
    """NEURON_RT_VISIBLE_CORES as the Kubernetes device plugin sets it is a comma list (NEURON.md §12)."""
    assert count_cores(spec) == count


def test_visible_cores_from_the_device_plugin_are_accepted(monkeypatch):
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "2,3")
    assert claim_cores(2) == "NEURON_RT_VISIBLE_CORES=2,3"
    with pytest.raises(ArtifactError, match="gives 2 NeuronCore"):
        claim_cores(4)


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
