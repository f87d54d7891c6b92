"""A recording test double of the documented neuronx-distributed (NxD Core ModelBuilder) surface.

Only names and signatures from shared/reference/NEURON.md and the NxD Core sources it cites
(ModelBuilder V2, NxDModel, NxDParallelState, shard_checkpoint, the parallel layers) are provided.
Each call is recorded in `Recorder.calls`. Where cheap, the double also *behaves* like the real thing:

- ModelBuilder.trace runs the module once at the example shapes (tracing runs Python once) and
  checks what the real tracer needs: state buffers reassigned, never changed in place, with their
  shape and dtype kept.
- NxDModel keeps the module (with stub weights) in its saved file; set_weights checks the keys and
  shapes against the traced module's state_dict; to_neuron allocates *device memory* per core:
  each rank's weights, the state buffers once, and an allowance per tag (`Device`).
- At world size 1 forward runs the module eagerly: every tag shares the one module's buffers, as
  every tag shares the state on a device. (The parallel layers cannot all-reduce in one process.)
- NxDParallelState without lnc_size fails off-device unless NEURON_PLATFORM_TARGET_OVERRIDE is set,
  as NxD asks the platform for its LNC.
"""
from __future__ import annotations

import contextlib
import io
import importlib.machinery
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

VERSIONS = {"neuronx-cc": "2.21.33363.0", "torch-neuronx": "2.9.0.2.12.1", "neuronx-distributed": "0.16.0"}
NEFF_BYTES = 1 << 20  # the double's device allocation for one tag's NEFF on one core


@dataclass
class Device:
    """Bytes resident on each NeuronCore (rank), by what they hold."""
    by_core: dict[int, dict[str, int]] = field(default_factory=dict)

    def allocate(self, core: int, what: str, nbytes: int) -> None:
        held = self.by_core.setdefault(core, {})
        held[what] = held.get(what, 0) + nbytes

    def resident(self, core: int) -> int:
        return sum(self.by_core.get(core, {}).values())


@dataclass
class Recorder:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tp: int = 1                   # the NxDParallelState in force
    execute_traces: bool = True   # run forward at trace time (world size 1 only; off for large shapes)
    device: Device = field(default_factory=Device)

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


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def stubbed(module: nn.Module) -> nn.Module:
    """A copy whose every parameter and buffer has its shape and dtype but one element of storage
    (pickled through torch.save, which keeps expanded views small; deepcopy would materialise them)."""
    saved = {n: t for n, t in list(module.named_parameters()) + list(module.named_buffers())}
    for name, t in saved.items():
        set_tensor(module, name, torch.zeros((), dtype=t.dtype).expand(t.shape))
    try:
        blob = io.BytesIO()
        torch.save(module, blob)
    finally:
        for name, t in saved.items():
            set_tensor(module, name, t)
    blob.seek(0)
    return torch.load(blob, weights_only=False)


# ---------------------------------------------------------------- neuronx_distributed

def get_platform_target() -> str:
    """NxD asks the platform what it is: the override first, else the device, which a CPU host lacks."""
    target = os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE")
    if not target:
        raise RuntimeError("cannot determine the platform target (logical NeuronCore size): no Neuron device "
                           "on this host and NEURON_PLATFORM_TARGET_OVERRIDE is not set")
    return target


class NxDParallelState(contextlib.AbstractContextManager):
    """NxD Core's parallel_context.NxDParallelState: lnc_size=None asks the platform for its LNC, and
    entering (initialize_model_parallel) asks the platform for its hardware type either way."""

    def __init__(self, world_size=1, rank=0, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                 context_parallel_size=1, expert_model_parallel_size=1, lnc_size=None):
        REC.record("neuronx_distributed.NxDParallelState", world_size=world_size,
                   tensor_model_parallel_size=tensor_model_parallel_size, lnc_size=lnc_size)
        self.lnc_size = lnc_size if lnc_size is not None else (2 if get_platform_target() in ("trn2", "trn3") else 1)
        self.tp, self.saved = tensor_model_parallel_size, REC.tp

    def __enter__(self):
        get_platform_target()
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
                 dtype=torch.float32, device=None):
        super().__init__()
        self.tp = REC.tp
        self.weight = nn.Parameter(torch.zeros(output_size, input_size // self.tp, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x):
        assert x.dim() == 3, "NxD parallel layers take [batch, seq, hidden]"
        if self.tp > 1:
            raise RuntimeError("the double cannot all-reduce across ranks")
        return F.linear(x, self.weight, self.bias)


class QuantizedColumnParallel(nn.Module):
    """NxD Core's quantization_layers.QuantizedColumnParallel, weight-only per-channel: int8 `weight`
    [out/tp, in], float32 `scale` [out/tp, 1]; forward = scale_dequantize(x @ weight^T, scale^T)."""

    def __init__(self, input_size, output_size, bias=True, quantization_type="per_tensor_symmetric",
                 gather_output=True, dtype=torch.float32, quantized_dtype=torch.int8, device=None,
                 quantization_per_channel_axis=None, scale_dtype=torch.float32, **kwargs):
        super().__init__()
        REC.record("neuronx_distributed.quantization.QuantizedLayer", cls=type(self).__name__,
                   quantization_type=quantization_type, quantized_dtype=quantized_dtype,
                   quantization_per_channel_axis=quantization_per_channel_axis, scale_dtype=scale_dtype)
        self.tp, self.gather_output = REC.tp, gather_output
        rows, cols = self._weight_shape(input_size, output_size)
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=quantized_dtype), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(rows if self._scale_split else output_size, 1, dtype=scale_dtype),
                                  requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size // self.tp, dtype=dtype), requires_grad=False) if bias else None

    _scale_split = True

    def _weight_shape(self, input_size, output_size):
        return output_size // self.tp, input_size

    def forward(self, x):
        assert x.dim() == 3, "NxD parallel layers take [batch, seq, hidden]"
        if self.tp > 1:
            raise RuntimeError("the double cannot gather or reduce across ranks")
        out = F.linear(x, self.weight.to(x.dtype))
        out = (out.to(torch.float32) * self.scale.T).to(out.dtype)  # dequantize.scale_dequantize
        return out + self.bias if self.bias is not None else out


class QuantizedRowParallel(QuantizedColumnParallel):
    """Row-parallel: weight [out, in/tp]; the scale [out, 1] is not split (the outputs are not)."""

    _scale_split = False

    def __init__(self, input_size, output_size, bias=True, quantization_type="per_tensor_symmetric",
                 input_is_parallel=False, dtype=torch.float32, **kwargs):
        super().__init__(input_size, output_size, bias=bias, quantization_type=quantization_type,
                         gather_output=False, dtype=dtype, **kwargs)

    def _weight_shape(self, input_size, output_size):
        return output_size, input_size // self.tp


def reduce_from_tensor_model_parallel_region(x):
    """NxD's all-reduce over the tp group (parallel_layers.mappings): nothing to sum at world size 1."""
    if REC.tp > 1:
        raise RuntimeError("the double cannot all-reduce across ranks")
    return x


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
            if isinstance(owner, QuantizedRowParallel):
                dim = 1 if name.endswith("weight") else None
            elif isinstance(owner, (ColumnParallelLinear, QuantizedColumnParallel)):
                dim = 0
            else:
                dim = 1 if isinstance(owner, RowParallelLinear) and name.endswith("weight") else None
            param = model.state_dict(keep_vars=True)[name]
            if getattr(param, "tensor_model_parallel", False):  # NxD's get_sharded_model_dict: dims 0 and 1 only
                assert param.partition_dim in (0, 1) and param.partition_stride == 1, name
                dim = param.partition_dim
            shard[name] = full.chunk(tp, dim)[rank] if dim is not None else full
        out.append(shard)
    return out


def run_trace(model: nn.Module, args: tuple) -> dict[str, Any]:
    """Run forward once as tracing does; check the state rules; leave the module's state as it was."""
    before = dict(model.named_buffers())
    versions = {n: b._version for n, b in before.items()}
    with torch.no_grad():
        out = model(*args)
    written = []
    for name, old in before.items():
        new = dict(model.named_buffers())[name]
        assert old._version == versions[name], f"state {name} changed in place: the tracer would miss it"
        if new is not old:
            assert new.shape == old.shape and new.dtype == old.dtype, f"state {name} changed shape or dtype"
            written.append(name)
        set_tensor(model, name, old)
    return {"output_shapes": shapes(out if isinstance(out, (list, tuple)) else [out]), "state_written": written}


class ModelBuilder:
    def __init__(self, model):
        REC.record("neuronx_distributed.ModelBuilder", model=model)
        self.model, self.tags = model, []

    def trace(self, args=None, kwargs=None, tag=None, spmd=True):
        args = args if isinstance(args, tuple) else (args,)
        model = self.model
        buffers = {n: list(b.shape) for n, b in model.named_buffers()}
        ran = run_trace(model, args) if REC.execute_traces and REC.tp == 1 else {}  # no collectives here
        REC.record("ModelBuilder.trace", tag=tag, spec=model.spec, input_shapes=shapes(args),
                   input_dtypes=[t.dtype for t in args], buffers=buffers, spmd=spmd, tp=REC.tp, **ran)
        self.tags.append({"tag": tag, "spec": model.spec, "input_shapes": shapes(args)})
        return self

    def compile(self, priority_model_key=None, compiler_workdir=None, compiler_args=None, max_workers=None):
        REC.record("ModelBuilder.compile", priority_model_key=priority_model_key, compiler_workdir=compiler_workdir,
                   compiler_args=compiler_args, max_workers=max_workers, tp=REC.tp,
                   platform_target=os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE"))
        return NxDModel(world_size=REC.tp, tags=self.tags, module=stubbed(self.model))


class NxDModel(nn.Module):
    def __init__(self, world_size, start_rank=None, local_ranks_size=None, state_initializer=None,
                 layout_transformer=None, tags=(), module=None):
        super().__init__()
        self.world_size, self.tags, self.module, self.loaded = world_size, {t["tag"]: t for t in tags}, module, False
        self.rank_weights: list[dict[str, torch.Tensor]] = []

    def save(self, path_to_save, save_weights=False):
        REC.record("NxDModel.save", path=path_to_save, save_weights=save_weights)
        torch.save({"world_size": self.world_size, "tags": list(self.tags.values()), "module": self.module},
                   path_to_save)

    @classmethod
    def load(cls, path_to_model, start_rank=None, local_ranks_size=None):
        REC.record("NxDModel.load", path=path_to_model, start_rank=start_rank, local_ranks_size=local_ranks_size)
        saved = torch.load(path_to_model, weights_only=False)
        return cls(saved["world_size"], tags=saved["tags"], module=saved["module"])

    def set_weights(self, sharded_checkpoint):
        assert not self.loaded, "set_weights after to_neuron raises ValueError"
        REC.record("NxDModel.set_weights", sharded_checkpoint=sharded_checkpoint)
        assert len(sharded_checkpoint) == self.world_size, "one state dict per rank"
        expected = {n: t.shape for n, t in self.module.state_dict().items()}
        dtypes = {n: t.dtype for n, t in self.module.state_dict().items()}
        for rank, weights in enumerate(sharded_checkpoint):
            assert set(weights) == set(expected), (f"rank {rank}: missing {sorted(set(expected) - set(weights))}, "
                                                   f"unexpected {sorted(set(weights) - set(expected))}")
            if self.world_size == 1:
                for name, t in weights.items():
                    assert t.shape == expected[name], (name, t.shape, expected[name])
            for name, t in weights.items():  # int8 where an int8 layer expects it, and nowhere else
                assert (t.dtype == torch.int8) == (dtypes[name] == torch.int8), (name, t.dtype, dtypes[name])
        self.rank_weights = list(sharded_checkpoint)

    def to_neuron(self):
        REC.record("NxDModel.to_neuron")
        assert self.rank_weights, "to_neuron before set_weights"
        buffers = dict(self.module.named_buffers())
        for rank, weights in enumerate(self.rank_weights):
            REC.device.allocate(rank, "weights", sum(nbytes(t) for t in weights.values()))
            REC.device.allocate(rank, "state", sum(b.numel() * b.element_size() for b in buffers.values()))
            REC.device.allocate(rank, "neff", NEFF_BYTES * len(self.tags))
        if self.world_size == 1:  # bind the weights, zero the state: the module now runs as the device would
            for name, t in self.rank_weights[0].items():
                set_tensor(self.module, name, t)
            for name, b in buffers.items():
                set_tensor(self.module, name, torch.zeros(b.shape, dtype=b.dtype))
        self.loaded = True

    def forward(self, *args, model_name: Optional[str] = None, forward_mode="default", **kwargs):
        assert self.loaded, "forward before to_neuron raises RuntimeError"
        REC.record("NxDModel.forward", model_name=model_name, input_shapes=shapes(args),
                   input_dtypes=[t.dtype for t in args], forward_mode=forward_mode)
        tag = self.tags[model_name]
        assert shapes(args) == tag["input_shapes"], f"{model_name}: inputs {shapes(args)}, traced {tag['input_shapes']}"
        spec = tag["spec"]
        # 'default' mode returns the traced forward's own output (one tensor here), aliased state left out
        if self.world_size == 1:
            self.module.spec = spec
            with torch.no_grad():
                return self.module(*args)
        rows = {"decode": spec.batch, "copy_slot": 0}.get(spec.kind, 1)
        return torch.zeros(rows, self.module.full_cfg.vocab_size) if rows else args[2].clone()


# ---------------------------------------------------------------- installing it

def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


def install(monkeypatch, with_nxd: bool = True) -> Recorder:
    """Put the double in sys.modules, patch the installed versions, reset the recorder."""
    from compile.neuron import toolchain
    REC.calls.clear()
    REC.tp, REC.execute_traces, REC.device = 1, True, Device()
    # Kiln only checks that torch_neuronx is importable (its graphs are built through NxD Core).
    monkeypatch.setitem(sys.modules, "torch_neuronx", module("torch_neuronx"))
    if with_nxd:
        layers = module("neuronx_distributed.parallel_layers", ColumnParallelLinear=ColumnParallelLinear,
                        RowParallelLinear=RowParallelLinear)
        quantized = module("neuronx_distributed.quantization.quantization_layers",
                           QuantizedColumnParallel=QuantizedColumnParallel, QuantizedRowParallel=QuantizedRowParallel)
        monkeypatch.setitem(sys.modules, "neuronx_distributed.quantization", module(
            "neuronx_distributed.quantization", quantization_layers=quantized))
        monkeypatch.setitem(sys.modules, "neuronx_distributed.quantization.quantization_layers", quantized)
        monkeypatch.setitem(sys.modules, "neuronx_distributed", module(
            "neuronx_distributed", ModelBuilder=ModelBuilder, NxDModel=NxDModel, NxDParallelState=NxDParallelState,
            shard_checkpoint=shard_checkpoint, parallel_layers=layers))
        monkeypatch.setitem(sys.modules, "neuronx_distributed.parallel_layers", layers)
        mappings = module("neuronx_distributed.parallel_layers.mappings",
                          reduce_from_tensor_model_parallel_region=reduce_from_tensor_model_parallel_region)
        layers.mappings = mappings
        monkeypatch.setitem(sys.modules, "neuronx_distributed.parallel_layers.mappings", mappings)
    else:
        monkeypatch.setitem(sys.modules, "neuronx_distributed", None)
    monkeypatch.setattr(toolchain, "installed_version", VERSIONS.get)
    monkeypatch.setenv("KILN_NEURON_INSTANCE_TYPE", "inf2.xlarge")
    for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "NEURON_PLATFORM_TARGET_OVERRIDE"):
        monkeypatch.delenv(var, raising=False)
    return REC
