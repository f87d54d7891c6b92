"""tp > 1: NxD Core ModelBuilder, one traced tag per bucket, one NxDModel, weights sharded per rank.

Why one module for all tags: ModelBuilder shares the weights and the state buffers (the KV cache)
of every tag it traces from the same module, so prefill and decode buckets read and write one
cache on the device. The bucket a trace records is chosen by the module's `spec` attribute, set
before each ModelBuilder.trace call (tracing runs Python once, so the choice is frozen per tag).

Artifact layout: graphs/nxd_model.pt holds every bucket (NxDModel.save(..., save_weights=False));
graphs/<bucket>.json records each tag's inputs and compiler arguments (the manifest's per-bucket
file); weights/tp_rank_XX.safetensors hold each rank's shard, written once per rank.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from compile.buckets import GraphSpec, plan_graphs
from compile.config import CompileConfig
from compile.model import ModelConfig
from compile.neuron import flags
from compile.neuron.graphs import MODEL_BUILDER, NeuronBucketGraph, example_inputs

NXD_MODEL_FILE = "nxd_model.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rank_weights_file(rank: int) -> str:
    return f"weights/tp_rank_{rank:02d}.safetensors"


def build_module(cfg: CompileConfig, model: ModelConfig, spec: GraphSpec) -> NeuronBucketGraph:
    """Call inside NxDParallelState: the parallel layers size themselves from it."""
    return NeuronBucketGraph(model, spec, cfg.max_num_seqs, cfg.max_model_len, DTYPES[cfg.dtype],
                             cfg.tp_degree, MODEL_BUILDER)


def full_checkpoint(model: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's state_dict keys are the HF names; a tied lm_head gets its own copy to shard."""
    checkpoint = dict(weights)
    if model.tie_word_embeddings:
        checkpoint["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    return checkpoint


def write_rank_weights(cfg: CompileConfig, model: ModelConfig, weights: dict[str, torch.Tensor],
                       artifact_dir: Path) -> list[str]:
    """shard_checkpoint once per rank, each rank's dict saved once; returns the relative paths."""
    from neuronx_distributed import NxDParallelState, shard_checkpoint
    from safetensors.torch import save_file
    tp = cfg.tp_degree
    checkpoint = full_checkpoint(model, weights)
    files = []
    with NxDParallelState(world_size=tp, tensor_model_parallel_size=tp):
        module = build_module(cfg, model, plan_graphs(cfg)[0])
        for rank in range(tp):
            (shard,) = shard_checkpoint(checkpoint, module, start_rank=rank, end_rank=rank)
            rel = rank_weights_file(rank)
            save_file({k: v.contiguous().clone() for k, v in shard.items()}, str(artifact_dir / rel),
                      metadata={"format": "pt", "tp_rank": str(rank), "tp_degree": str(tp)})
            files.append(rel)
            del shard
    return files


def bucket_record(spec: GraphSpec, cfg: CompileConfig) -> dict:
    return {"tag": spec.name, "kind": spec.kind, "compiled_in": f"graphs/{NXD_MODEL_FILE}",
            "inputs": [list(t.shape) for t in example_inputs(spec)],
            "compiler_args": flags.compiler_args_str(spec.kind, cfg.neuron_target)}


def compile_graph(spec: GraphSpec, cfg: CompileConfig, model: ModelConfig, out_dir: Path) -> str:
    """Write this bucket's record; the last bucket traces every tag and compiles the NxDModel."""
    name = spec.name + ".json"
    (out_dir / name).write_text(json.dumps(bucket_record(spec, cfg), indent=2) + "\n")
    specs = plan_graphs(cfg)
    if spec == specs[-1]:
        build_nxd_model(specs, cfg, model, out_dir / NXD_MODEL_FILE)
    return name


def build_nxd_model(specs: list[GraphSpec], cfg: CompileConfig, model: ModelConfig, path: Path) -> None:
    from neuronx_distributed import ModelBuilder, NxDParallelState
    tp = cfg.tp_degree
    workdir = Path(tempfile.gettempdir()) / "kiln-neuron" / path.parent.parent.name
    with torch.no_grad(), NxDParallelState(world_size=tp, tensor_model_parallel_size=tp):
        module = build_module(cfg, model, specs[0]).eval()
        builder = ModelBuilder(module)
        for spec in specs:
            module.spec = spec
            builder.trace(args=example_inputs(spec), tag=spec.name)
        nxd_model = builder.compile(compiler_workdir=str(workdir),
                                    compiler_args={s.name: flags.compiler_args_str(s.kind, cfg.neuron_target)
                                                   for s in specs})
    nxd_model.save(str(path), save_weights=False)
