"""tp = 1: one torch_neuronx.trace per bucket, compiled off-device, saved with torch.jit.save.

The weights are module parameters (named exactly as in weights/model.safetensors) kept out of the
NEFF with inline_weights_to_neff=False; the runner binds the stored file with
torch_neuronx.replace_weights. The module is traced with *stub* parameters (right shape and dtype,
one element of storage) because the values never reach a weight-separated NEFF: whatever the saved
TorchScript keeps of its separated weights is then a stub, not a copy of the model per bucket.
NOTE: how torch-neuronx serializes separated weights is not documented (NEURON.md §11); the
compile summary's artifact/weights ratio shows at once if a graph still carries a full copy.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from compile.buckets import GraphSpec
from compile.config import CompileConfig
from compile.model import ModelConfig
from compile.neuron import flags
from compile.neuron.graphs import TRACE, NeuronBucketGraph, example_inputs, input_output_aliases

GRAPH_SUFFIX = ".pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_module(spec: GraphSpec, cfg: CompileConfig, model: ModelConfig) -> NeuronBucketGraph:
    return NeuronBucketGraph(model, spec, cfg.max_num_seqs, cfg.max_model_len, DTYPES[cfg.dtype], 1, TRACE)


def trace_kwargs(spec: GraphSpec, cfg: CompileConfig, module: NeuronBucketGraph, workdir: Path) -> dict:
    """Everything torch_neuronx.trace gets besides (func, example_inputs); also shown by --dry-run."""
    return dict(input_output_aliases=input_output_aliases(module), compiler_workdir=str(workdir),
                compiler_args=flags.compiler_args(spec.kind, cfg.neuron_target),
                inline_weights_to_neff=False, cpu_backend=True)


def compile_graph(spec: GraphSpec, cfg: CompileConfig, model: ModelConfig, out_dir: Path) -> str:
    import torch_neuronx
    module = build_module(spec, cfg, model).eval()
    # NOTE: compiler intermediates stay outside the artifact (and are kept, for their logs).
    workdir = Path(tempfile.gettempdir()) / "kiln-neuron" / out_dir.parent.name / spec.name
    with torch.no_grad():
        traced = torch_neuronx.trace(module, example_inputs(spec), **trace_kwargs(spec, cfg, module, workdir))
    name = spec.name + GRAPH_SUFFIX
    torch.jit.save(traced, str(out_dir / name))
    return name
