"""A recording test double of the documented torch-neuronx and neuronx-distributed surface.

Only names and signatures from shared/reference/NEURON.md (and the SDK pages it cites: the
torch-neuronx trace/replace-weights/core-placement references, NxD Core's ModelBuilderV2 API
reference and api_guide's parallel layers) are provided. Each call is recorded in `Recorder.calls`.
Where cheap, the double also *behaves* like the real thing on CPU, eagerly:

- torch_neuronx.trace runs the function once at the example shapes (as tracing does) and returns a
  module that calls it eagerly; input_output_aliases are honoured (the aliased state keeps the
  output's value between calls, as it does on the device).
- replace_weights binds tensors by parameter name; shard_checkpoint really shards.
- The parallel layers compute at world size 1 only (no collectives in one process).

torch.jit.save/load are patched to pickle these eager modules (a real trace is a ScriptModule).
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

VERSIONS = {"neuronx-cc": "2.21.33363.0", "torch-neuronx": "2.9.0.2.12.1", "neuronx-distributed": "0.16.0"}


@dataclass
class Recorder:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tp: int = 1  # the NxDParallelState in force

    def record(self, api: str, **info) -> None:
        self.calls.append((api, info))

    def of(self, api: str) -> list[dict[str, Any]]:
        return [info for name, info in self.calls if name == api]


REC = Recorder()


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Rebind parameter or buffer `name` (dotted) of `module` to `value`."""
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        setattr(owner, leaf, value)


def shapes(tensors) -> list[list[int]]:
    return [list(t.shape) for t in tensors]


# ---------------------------------------------------------------- torch_neuronx

class FakeTrace(nn.Module):
    """Stands for the ScriptModule torch_neuronx.trace returns: calls the traced module eagerly."""

    def __init__(self, module: nn.Module, aliases: dict[str, int]):
        super().__init__()
        self.module = module
        self.alias_names = aliases

    def forward(self, *inputs):
        out = self.module(*inputs)
        for name, index in self.alias_names.items():
            set_tensor(self.module, name, out[index])
        return out


def trace(func, example_inputs, *_, input_output_aliases={}, compiler_workdir=None, compiler_args=None,  # noqa: B006
          partitioner_config=None, inline_weights_to_neff=True, cpu_backend=False):
    args = list(compiler_args) if isinstance(compiler_args, (list, tuple)) else str(compiler_args or "").split()
    if cpu_backend and "--target" not in args and not any(a.startswith("--target=") for a in args):
        raise ValueError("cpu_backend=True needs --target in compiler_args")  # as the docs require
    names = {id(p): n for n, p in func.named_parameters()}
    aliases = {names[id(p)]: i for p, i in input_output_aliases.items()}  # KeyError: not module state
    with torch.no_grad():
        out = func(*example_inputs)
    for name, index in aliases.items():
        state = func.get_parameter(name)
        assert out[index].shape == state.shape and out[index].dtype == state.dtype, (name, index)
    REC.record("torch_neuronx.trace", func=func, spec=getattr(func, "spec", None), input_shapes=shapes(example_inputs),
               input_dtypes=[t.dtype for t in example_inputs], aliases=aliases,
               output_shapes=shapes(out), compiler_workdir=compiler_workdir, compiler_args=args,
               partitioner_config=partitioner_config, inline_weights_to_neff=inline_weights_to_neff,
               cpu_backend=cpu_backend)
    return FakeTrace(func, aliases)


def move_trace_to_device(trace, device_id):
    REC.record("torch_neuronx.move_trace_to_device", trace=trace, device_id=device_id)


def replace_weights(model, weights):
    REC.record("torch_neuronx.replace_weights", trace=model, weights=weights, keys=sorted(weights))
    for name, value in weights.items():
        set_tensor(model.module, name, value)


def jit_save(obj, f, *args, **kwargs):
    REC.record("torch.jit.save", obj=obj, path=str(f))
    torch.save(obj, f)


def jit_load(f, *args, **kwargs):
    REC.record("torch.jit.load", path=str(f))
    return torch.load(f, weights_only=False)


# ---------------------------------------------------------------- neuronx_distributed

class NxDParallelState(contextlib.AbstractContextManager):
    def __init__(self, world_size, tensor_model_parallel_size):
        REC.record("neuronx_distributed.NxDParallelState", world_size=world_size,
                   tensor_model_parallel_size=tensor_model_parallel_size)
        self.tp, self.saved = tensor_model_parallel_size, REC.tp

    def __enter__(self):
        REC.tp = self.tp
        return self

    def __exit__(self, *exc):
        REC.tp = self.saved
        return False


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size, output_size, bias=True, gather_output=True, sequence_parallel_enabled=False,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.tp, self.gather_output = REC.tp, gather_output
        self.weight = nn.Parameter(torch.zeros(output_size // self.tp, input_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size // self.tp, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x):
        assert x.dim() == 3, "NxD parallel layers take [batch, seq, hidden]"
        if self.tp > 1 and self.gather_output:
            raise RuntimeError("the double cannot all-gather across ranks")
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, input_size, output_size, bias=True, input_is_parallel=False, sequence_parallel_enabled=False,
                 dtype=torch.float32, device=False):
        super().__init__()
        self.tp = REC.tp
        self.weight = nn.Parameter(torch.zeros(output_size, input_size // self.tp, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x):
        assert x.dim() == 3, "NxD parallel layers take [batch, seq, hidden]"
        if self.tp > 1:
            raise RuntimeError("the double cannot all-reduce across ranks")
        return F.linear(x, self.weight, self.bias)


def shard_checkpoint(checkpoint, model, start_rank=None, end_rank=None, load_on_device=False, serialize_path=None):
    tp = REC.tp
    start = 0 if start_rank is None else start_rank
    end = tp - 1 if end_rank is None else end_rank
    REC.record("neuronx_distributed.shard_checkpoint", start_rank=start_rank, end_rank=end_rank,
               load_on_device=load_on_device, serialize_path=serialize_path, tp=tp)
    out = []
    for rank in range(start, end + 1):
        shard = {}
        for name in model.state_dict():
            full = checkpoint[name]  # KeyError: "must contain all model parameters"
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            dim = 0 if isinstance(owner, ColumnParallelLinear) else (
                1 if isinstance(owner, RowParallelLinear) and name.endswith("weight") else None)
            shard[name] = full.chunk(tp, dim)[rank] if dim is not None else full
        out.append(shard)
    return out


class ModelBuilder:
    def __init__(self, model):
        REC.record("neuronx_distributed.ModelBuilder", model=model)
        self.model, self.tags = model, []

    def trace(self, args=None, kwargs=None, tag=None, spmd=True):
        args = args if isinstance(args, tuple) else (args,)
        model = self.model
        REC.record("ModelBuilder.trace", tag=tag, spec=getattr(model, "spec", None), input_shapes=shapes(args),
                   buffers={n: list(b.shape) for n, b in model.named_buffers()}, spmd=spmd, tp=REC.tp)
        rows = args[0].shape[0] if model.spec.kind == "decode" else 1
        self.tags.append({"tag": tag, "rows": rows, "vocab": model.full_cfg.vocab_size,
                          "buffers": {n: list(b.shape) for n, b in model.named_buffers()}})
        return self

    def compile(self, priority_model_key=None, compiler_workdir=None, compiler_args=None, max_workers=None):
        REC.record("ModelBuilder.compile", priority_model_key=priority_model_key, compiler_workdir=compiler_workdir,
                   compiler_args=compiler_args, max_workers=max_workers, tp=REC.tp)
        return NxDModel(world_size=REC.tp, tags=self.tags)


class NxDModel(nn.Module):
    def __init__(self, world_size, start_rank=None, local_ranks_size=None, state_initializer=None,
                 layout_transformer=None, tags=()):
        super().__init__()
        self.world_size, self.tags, self.loaded = world_size, {t["tag"]: t for t in tags}, False

    def save(self, path_to_save, save_weights=False):
        REC.record("NxDModel.save", path=path_to_save, save_weights=save_weights)
        Path(path_to_save).write_text(json.dumps({"world_size": self.world_size, "tags": list(self.tags.values())}))

    @classmethod
    def load(cls, path_to_model, start_rank=None, local_ranks_size=None):
        REC.record("NxDModel.load", path=path_to_model, start_rank=start_rank, local_ranks_size=local_ranks_size)
        saved = json.loads(Path(path_to_model).read_text())
        return cls(saved["world_size"], tags=saved["tags"])

    def set_weights(self, sharded_checkpoint):
        assert not self.loaded, "set_weights after to_neuron raises ValueError"
        REC.record("NxDModel.set_weights", sharded_checkpoint=sharded_checkpoint)

    def to_neuron(self):
        REC.record("NxDModel.to_neuron")
        self.loaded = True

    def forward(self, *args, model_name: Optional[str] = None, forward_mode="default", **kwargs):
        assert self.loaded, "forward before to_neuron raises RuntimeError"
        REC.record("NxDModel.forward", model_name=model_name, input_shapes=shapes(args), forward_mode=forward_mode)
        tag = self.tags[model_name]
        return torch.zeros(tag["rows"], tag["vocab"])

    def read_from_neuron_buffer(self, buffer_key, rank):
        REC.record("NxDModel.read_from_neuron_buffer", buffer_key=buffer_key, rank=rank)
        return torch.zeros(next(iter(self.tags.values()))["buffers"][buffer_key])

    def write_to_neuron_buffer(self, tensor, buffer_key, rank):
        REC.record("NxDModel.write_to_neuron_buffer", shape=list(tensor.shape), buffer_key=buffer_key, rank=rank)


# ---------------------------------------------------------------- installing it

def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


def install(monkeypatch, with_nxd: bool = True) -> Recorder:
    """Put the double in sys.modules, patch torch.jit.save/load and the installed versions."""
    from compile.neuron import toolchain
    REC.calls.clear()
    REC.tp = 1
    monkeypatch.setitem(sys.modules, "torch_neuronx", module(
        "torch_neuronx", trace=trace, move_trace_to_device=move_trace_to_device, replace_weights=replace_weights))
    if with_nxd:
        layers = module("neuronx_distributed.parallel_layers", ColumnParallelLinear=ColumnParallelLinear,
                        RowParallelLinear=RowParallelLinear)
        monkeypatch.setitem(sys.modules, "neuronx_distributed", module(
            "neuronx_distributed", ModelBuilder=ModelBuilder, NxDModel=NxDModel, NxDParallelState=NxDParallelState,
            shard_checkpoint=shard_checkpoint, parallel_layers=layers))
        monkeypatch.setitem(sys.modules, "neuronx_distributed.parallel_layers", layers)
    else:
        monkeypatch.setitem(sys.modules, "neuronx_distributed", None)
    monkeypatch.setattr(torch.jit, "save", jit_save)
    monkeypatch.setattr(torch.jit, "load", jit_load)
    monkeypatch.setattr(toolchain, "installed_version", VERSIONS.get)
    monkeypatch.setenv("KILN_NEURON_INSTANCE_TYPE", "inf2.xlarge")
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    monkeypatch.delenv("NEURON_RT_NUM_CORES", raising=False)
    return REC
