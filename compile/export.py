"""Build an artifact folder: tokenizer, weights stored once, one graph per bucket, manifest.

The folder is written under a temporary name beside the destination and renamed into place at
the end, so an interrupted compile never leaves something that looks like a valid artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from compile import __version__
from compile.buckets import plan_graphs
from compile.checkpoint import load_checkpoint, source_sha256
from compile.config import CompileConfig
from compile.manifest import FORMAT_VERSION, GRAPH_ABI, MANIFEST_NAME, ArtifactError, Manifest, list_files
from compile.model import CPU_ONEDNN, PACKED_KERNEL_MAX_TOKENS, PORTABLE, kernels_problem
from compile.quantize import quantize_checkpoint

WEIGHTS_FILE = "weights/model.safetensors"


@dataclass
class BuildResult:
    out: Path
    up_to_date: bool
    manifest: Manifest
    graph_rows: list[tuple[str, int, float]] = field(default_factory=list)  # name, bytes, seconds
    weights_bytes: int = 0
    artifact_bytes: int = 0


def compile_key(cfg: CompileConfig, source_sha256: str) -> str:
    import torch
    toolchain = {}
    if cfg.target == "neuron":  # a new neuronx-cc / torch-neuronx means a recompile (docs/neuron.md)
        from compile import neuron_target
        toolchain = {"neuron": neuron_target.toolchain_versions()}
    blob = json.dumps({"config": cfg.key_dict(), "source": source_sha256,
                       "kiln": __version__, "graph_abi": GRAPH_ABI, "torch": torch.__version__,
                       "format": FORMAT_VERSION, **toolchain},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def existing_artifact(out: Path, key: str) -> Manifest | None:
    """The manifest of a valid artifact at `out` built from the same inputs, else None."""
    try:
        manifest = Manifest.read(out)
        if manifest.compile_key != key:
            return None
        manifest.verify_files(out)
        return manifest
    except ArtifactError:
        return None


def versions(cfg: CompileConfig) -> dict:
    import torch
    import transformers
    found = {"kiln": __version__, "graph_abi": GRAPH_ABI, "torch": torch.__version__,
             "transformers": transformers.__version__}
    if cfg.target == "neuron":
        from compile import neuron_target
        found.update(neuron_target.toolchain_versions())
    return found


def build_artifact(cfg: CompileConfig, out: Path, force: bool = False, progress: bool = True) -> BuildResult:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from compile.dtypes import torch_dtype

    out = Path(out).resolve()
    source = source_sha256(cfg.checkpoint)  # hashed once: the compile key and the manifest
    key = compile_key(cfg, source)
    found = existing_artifact(out, key)
    if found is not None and not force:
        return BuildResult(out=out, up_to_date=True, manifest=found)
    if out.exists() and not force:
        what = "an artifact built from other inputs" if (out / MANIFEST_NAME).exists() else "not a valid artifact"
        raise ArtifactError(f"{out}: already exists and is {what}; pass --force to replace it")

    dtype = torch_dtype(cfg.dtype)
    ckpt = quantize_checkpoint(load_checkpoint(cfg.checkpoint, dtype, cfg.max_model_len), cfg.quantization)
    if cfg.target == "neuron":
        from compile import neuron_target
        backend = neuron_target
    else:
        from compile import cpu_target as backend
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "graphs").mkdir(parents=True)
    (tmp / "weights").mkdir()
    try:
        ckpt.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        variant = PORTABLE
        if cfg.target == "cpu":
            from compile.cpu_kernels import graph_weights, resolve_variant
            variant = resolve_variant(cfg.cpu_kernels, dtype)
            if variant == CPU_ONEDNN and (why := kernels_problem()):
                # the graphs still work (op-by-op decode attention), only slower: say so, do not fail
                print(f"note: {why}; the graphs use op-by-op attention and norms", file=sys.stderr)
            tensors = graph_weights(ckpt.config, ckpt.weights, variant)
        else:
            tensors = []  # neuron graphs carry no weights and are traced from the module tree
        extra_weight_files = backend.write_weights(cfg, ckpt, tmp)
        # NOTE: a tp > 1 neuron artifact stores only its per-rank shards (the weights once, not twice).
        full_weights = [WEIGHTS_FILE] if backend.keeps_full_weights(cfg) else []
        if full_weights:
            save_file(ckpt.weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        graphs, timings, rows = [], {}, []
        # cpu graphs that call Kiln's kernels take resumed prompts in their packed prefills (prefill_ragged)
        ragged = PACKED_KERNEL_MAX_TOKENS if variant == CPU_ONEDNN and not kernels_problem() else 0
        specs = plan_graphs(cfg, ragged_max_tokens=ragged)
        bar = tqdm(specs, desc="compiling buckets", unit="graph", disable=not progress)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            start = time.perf_counter()
            file_name = backend.compile_graph(spec, cfg, ckpt, tensors, tmp / "graphs", variant)
            seconds = time.perf_counter() - start
            graphs.append(spec.to_dict() | {"file": f"graphs/{file_name}"})
            timings[spec.name] = round(seconds, 3)
            rows.append((spec.name, (tmp / "graphs" / file_name).stat().st_size, seconds))
        bar.close()
        manifest = Manifest(
            format_version=FORMAT_VERSION, model=ckpt.config.to_dict(), target=cfg.target, dtype=cfg.dtype,
            tp_degree=cfg.tp_degree,
            buckets={"context": list(cfg.context_buckets), "batch": list(cfg.batch_buckets), "kv": list(cfg.kv_buckets)},
            max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len, graphs=graphs,
            weights=[*full_weights, *extra_weight_files], files=list_files(tmp),
            source={"checkpoint": cfg.checkpoint, "sha256": source},
            versions=versions(cfg), compile_key=key, timings=timings,
            neuron=backend.manifest_section(cfg),
            graph_variant=variant, prefix_cache_rows=cfg.prefix_cache_rows)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weights_bytes = sum(t.numel() * t.element_size() for t in ckpt.weights.values())
    artifact_bytes = sum(f["size"] for f in manifest.files.values())
    return BuildResult(out=out, up_to_date=False, manifest=manifest, graph_rows=rows,
                       weights_bytes=weights_bytes, artifact_bytes=artifact_bytes)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one is removed only after the rename."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
