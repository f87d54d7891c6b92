"""Every tp degree, 1 included: NxD Core ModelBuilder, one NxDModel, one tag per bucket.

This is what NxD Inference does (docs/neuron.md). One module (compile/neuron/graphs.py) is built
inside NxDParallelState and traced once per bucket, plus a `copy_slot` tag; ModelBuilder shares its
weights and its state buffers (the KV cache) between every tag, so on the device there is one copy
of the weights per rank and one KV cache, whatever the number of buckets. The bucket a trace records
is chosen by the module's `spec` attribute, set before each trace call (tracing runs Python once).
NOTE: never one torch_neuronx.trace module per bucket: each would own its weights and its cache on
the device (30 buckets x (weights + KV)), and return its aliased cache to the host on every call.

Artifact layout: graphs/nxd_model.pt holds every tag (NxDModel.save(..., save_weights=False));
graphs/<bucket>.json records each tag's inputs and compiler arguments (the manifest's per-bucket
file). Weights: tp = 1 binds weights/model.safetensors as rank 0 (stored once, as on cpu); tp > 1
stores weights/tp_rank_XX.safetensors, one shard per rank, and no unsharded copy.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from compile.buckets import GraphSpec, plan_graphs
from compile.config import CompileConfig
from compile.dtypes import torch_dtype
from compile.model import ModelConfig
from compile.neuron import flags, workers
from compile.neuron.graphs import COPY_SLOT, NeuronBucketGraph, example_inputs

NXD_MODEL_FILE = "nxd_model.pt"
# NxD Inference sets this while compiling off-device, so NxD never asks the platform what it is.
PLATFORM_OVERRIDE = "NEURON_PLATFORM_TARGET_OVERRIDE"


def rank_weights_file(rank: int) -> str:
    return f"weights/tp_rank_{rank:02d}.safetensors"


def tags(cfg: CompileConfig) -> list[GraphSpec]:
    """Every tag of the NxDModel: the buckets, then the device-side slot copy."""
    return plan_graphs(cfg) + [COPY_SLOT]


def parallel_state(cfg: CompileConfig):
    """NxDParallelState for this compile. lnc_size is passed explicitly: without it NxD asks the
    platform for its LNC, which fails on a host without Neuron devices (docs/neuron.md)."""
    from neuronx_distributed import NxDParallelState
    return NxDParallelState(world_size=cfg.tp_degree, tensor_model_parallel_size=cfg.tp_degree,
                            lnc_size=flags.LNC[cfg.neuron_target])


@contextlib.contextmanager
def platform_target(cfg: CompileConfig) -> Iterator[None]:
    """NEURON_PLATFORM_TARGET_OVERRIDE=<neuron target> for the duration of a compile, then restored."""
    saved = os.environ.get(PLATFORM_OVERRIDE)
    os.environ[PLATFORM_OVERRIDE] = cfg.neuron_target
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PLATFORM_OVERRIDE, None)
        else:
            os.environ[PLATFORM_OVERRIDE] = saved


def build_module(cfg: CompileConfig, model: ModelConfig, spec: GraphSpec) -> NeuronBucketGraph:
    """Call inside parallel_state(cfg): the parallel layers size themselves from it."""
    return NeuronBucketGraph(model, spec, cfg.num_cache_rows, cfg.max_model_len, torch_dtype(cfg.dtype),
                             cfg.tp_degree)


def full_checkpoint(model: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's state_dict keys are the HF names; a tied lm_head is the embedding under its own
    name (the same host tensor; at tp > 1 shard_checkpoint splits it like any ColumnParallelLinear)."""
    checkpoint = dict(weights)
    if model.tie_word_embeddings:
        checkpoint["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return checkpoint


def write_rank_weights(cfg: CompileConfig, model: ModelConfig, weights: dict[str, torch.Tensor],
                       artifact_dir: Path) -> list[str]:
    """tp > 1: shard_checkpoint once per rank, each rank's dict saved once; returns the relative paths."""
    from neuronx_distributed import shard_checkpoint
    from safetensors.torch import save_file
    checkpoint = full_checkpoint(model, weights)
    files = []
    with platform_target(cfg), parallel_state(cfg):
        module = build_module(cfg, model, plan_graphs(cfg)[0])
        for rank in range(cfg.tp_degree):
            (shard,) = shard_checkpoint(checkpoint, module, start_rank=rank, end_rank=rank)
            rel = rank_weights_file(rank)
            save_file({k: v.contiguous().clone() for k, v in shard.items()}, str(artifact_dir / rel),
                      metadata={"format": "pt", "tp_rank": str(rank), "tp_degree": str(cfg.tp_degree)})
            files.append(rel)
            del shard
    return files


def bucket_record(spec: GraphSpec, cfg: CompileConfig) -> dict:
    return {"tag": spec.name, "kind": spec.kind, "compiled_in": f"graphs/{NXD_MODEL_FILE}",
            "inputs": [list(t.shape) for t in example_inputs(spec)],
            "compiler_args": flags.compiler_args_str(spec.kind, cfg.neuron_target)}


def write_record(spec: GraphSpec, cfg: CompileConfig, out_dir: Path) -> str:
    name = spec.name + ".json"
    (out_dir / name).write_text(json.dumps(bucket_record(spec, cfg), indent=2) + "\n")
    return name


def compile_graph(spec: GraphSpec, cfg: CompileConfig, model: ModelConfig, out_dir: Path) -> str:
    """Write this bucket's record; the last bucket also writes the copy tag's record, traces every
    tag and compiles the NxDModel."""
    name = write_record(spec, cfg, out_dir)
    if spec == plan_graphs(cfg)[-1]:
        write_record(COPY_SLOT, cfg, out_dir)
        build_nxd_model(tags(cfg), cfg, model, out_dir / NXD_MODEL_FILE)
    return name


def compile_workers(cfg: CompileConfig, model: ModelConfig) -> int:
    """--neuron-compile-workers, else the memory-aware default (compile/neuron/workers.py)."""
    if cfg.neuron_compile_workers:
        return cfg.neuron_compile_workers
    from compile.neuron.plan import hbm_per_core
    return workers.default_workers(len(tags(cfg)), hbm_per_core(cfg, model).weights_bytes)


def build_nxd_model(specs: list[GraphSpec], cfg: CompileConfig, model: ModelConfig, path: Path) -> None:
    from neuronx_distributed import ModelBuilder
    workdir = Path(tempfile.gettempdir()) / "kiln-neuron" / path.parent.parent.name
    with torch.no_grad(), platform_target(cfg), parallel_state(cfg):
        module = build_module(cfg, model, specs[0]).eval()
        builder = ModelBuilder(module)
        for spec in specs:
            module.spec = spec
            builder.trace(args=example_inputs(spec), tag=spec.name)
        nxd_model = builder.compile(compiler_workdir=str(workdir), max_workers=compile_workers(cfg, model),
                                    compiler_args={s.name: flags.compiler_args_str(s.kind, cfg.neuron_target)
                                                   for s in specs})
    nxd_model.save(str(path), save_weights=False)
