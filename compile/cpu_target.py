"""cpu target: torch.export of each bucket function, saved as a .pt2 program without weights.

Weights are graph *inputs* (see compile/model.py), so each .pt2 holds only the program; the
server binds the one stored safetensors copy at load time.
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import torch

from compile.buckets import GraphSpec
from compile.model import PORTABLE, DecodeGraph, ModelConfig, PrefillChunkGraph, PrefillGraph

# NOTE: .pt2 programs are mostly JSON; gzip makes each ~25x smaller, which keeps the artifact
# within a few percent of the weights' size even with dozens of buckets.
GRAPH_SUFFIX = ".pt2.gz"


def example_inputs(spec: GraphSpec, cfg: ModelConfig, dtype: torch.dtype) -> tuple:
    """Inputs (after the weights) with exactly the bucket's shapes and dtypes."""
    i64 = torch.int64
    if spec.kind == "decode":
        span = (cfg.num_layers, spec.batch, cfg.num_kv_heads, spec.kv_len, cfg.head_dim)
        return (torch.zeros(spec.batch, dtype=i64), torch.zeros(spec.batch, dtype=i64),
                torch.zeros(span, dtype=dtype), torch.zeros(span, dtype=dtype))
    ids, start, last = torch.zeros(spec.seq_len, dtype=i64), torch.tensor(0, dtype=i64), torch.tensor(0, dtype=i64)
    if spec.kind == "prefill":
        return ids, start, last
    past = (cfg.num_layers, cfg.num_kv_heads, spec.kv_len, cfg.head_dim)
    return ids, start, last, torch.zeros(past, dtype=dtype), torch.zeros(past, dtype=dtype)


def graph_module(spec: GraphSpec, cfg: ModelConfig, variant: str = PORTABLE) -> torch.nn.Module:
    return {"prefill": PrefillGraph, "prefill_chunk": PrefillChunkGraph,
            "decode": DecodeGraph}[spec.kind](cfg, variant)


def compile_graph(spec: GraphSpec, compile_cfg, ckpt, weights: list[torch.Tensor], out_dir: Path,
                  variant: str = PORTABLE) -> str:
    """Export one bucket graph into out_dir; returns the file name.

    (compile_cfg: CompileConfig, ckpt: Checkpoint; weights: compile.cpu_kernels.graph_weights for variant.)"""
    cfg: ModelConfig = ckpt.config
    dtype = weights[0].dtype
    args = (weights, *example_inputs(spec, cfg, dtype))
    with torch.no_grad():
        program = torch.export.export(graph_module(spec, cfg, variant), args, strict=False)
    # NOTE: an ExportedProgram keeps its example inputs, which here include the weights.
    program._example_inputs = None
    name = spec.name + GRAPH_SUFFIX
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    (out_dir / name).write_bytes(gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0))
    return name


class _MemoisedTypeHints:
    """The `typing` module as torch's export deserialiser sees it, with get_type_hints memoised.

    NOTE: torch.export.load resolves the type hints of the same few dozen schema dataclasses about
    30,000 times per SmolLM2 graph: half of a 1.8 s load, a minute of server start-up for 30 graphs.
    The schema classes never change, so their hints are computed once per process.
    """

    def __init__(self, module):
        self._module = module
        self._hints: dict = {}

    def get_type_hints(self, obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in self._hints:
            self._hints[key] = self._module.get_type_hints(obj, globalns, localns, include_extras)
        return self._hints[key]

    def __getattr__(self, name):
        return getattr(self._module, name)


def _memoise_export_type_hints() -> None:
    from torch._export.serde import serialize
    if not isinstance(getattr(serialize, "typing", None), (_MemoisedTypeHints, type(None))):
        serialize.typing = _MemoisedTypeHints(serialize.typing)


def load_graph(path: Path):
    """A callable with the bucket function's signature: (weights, *inputs) -> outputs."""
    _memoise_export_type_hints()
    module = torch.export.load(io.BytesIO(gzip.decompress(Path(path).read_bytes()))).module()
    # NOTE: the unlifted module re-flattens its inputs and checks all ~200 input shapes on every
    # call (1.8 ms of a 22 ms SmolLM2 decode step). Its hooks only serve nn.Module inputs and
    # those checks; the runner's inputs have the bucket's shapes by construction (BucketedRunner),
    # so the graph is called with flat positional tensors and no hooks.
    module._forward_pre_hooks.clear()
    module._forward_hooks.clear()
    module.graph._codegen = torch.fx.graph.CodeGen()
    module.recompile()
    return lambda weights, *inputs: module(*weights, *inputs)
