"""Neuron bucket graphs: compile.model's prefill/decode plus the KV cache update *inside* the graph.

On CPU the runner writes the new K/V into the cache outside the graph (compile/model.py). On Neuron
the cache must stay on the device, so each graph takes the whole cache as state, writes the new K/V
into it with out-of-place ops only (torch.scatter / torch.index_select: no scatter_, index_copy_
or other in-place op on state, NEURON.md §1.3) and hands the new cache back:

- torch_neuronx.trace (tp = 1): the cache is an nn.Parameter on the module and the graph returns
  (logits, cache_k, cache_v); input_output_aliases maps the two parameters to outputs 1 and 2
  (the T5 tutorial's pattern).
- ModelBuilder (tp > 1): the cache is a buffer that forward *reassigns* (self.cache_k = new);
  ModelBuilder detects the mutation and aliases it. The graph returns the logits only.

The model math is never copied: TreeWeights feeds the module's parameters (or, for tp > 1,
neuronx-distributed's parallel layers) to compile.model through Weights.linear.

Slot discipline (server/runner/interface.py): decode rows are slots 0..B-1. Writes for padding rows
and padded prompt positions go to position max_len-1, which is never read: a decode at position p
reads cached keys < p <= max_len-1 and a chunk reads keys < its start, so the last position is only
ever written (by the token that ends the sequence). That keeps every shape static and every index
in range without a scratch column.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from compile.buckets import GraphSpec
from compile.model import ModelConfig, Weights, decode, prefill, weight_names

TRACE, MODEL_BUILDER = "torch_neuronx.trace", "ModelBuilder"
COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every stored tensor, from the config alone (the dry run never loads weights)."""
    hidden, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                 "self_attn.q_proj.weight": (q_out, hidden), "self_attn.q_proj.bias": (q_out,),
                 "self_attn.k_proj.weight": (kv_out, hidden), "self_attn.k_proj.bias": (kv_out,),
                 "self_attn.v_proj.weight": (kv_out, hidden), "self_attn.v_proj.bias": (kv_out,),
                 "self_attn.o_proj.weight": (hidden, q_out), "mlp.gate_proj.weight": (cfg.intermediate_size, hidden),
                 "mlp.up_proj.weight": (cfg.intermediate_size, hidden), "mlp.down_proj.weight": (hidden, cfg.intermediate_size)}
    fixed = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "rope.inv_freq": (cfg.head_dim // 2,),
             "model.norm.weight": (hidden,), "lm_head.weight": (cfg.vocab_size, hidden)}
    shapes = {}
    for name in weight_names(cfg):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
        else:
            shapes[name] = fixed[name]
    return shapes


def local_config(cfg: ModelConfig, tp_degree: int) -> ModelConfig:
    """The per-rank view: each rank holds num_heads/tp query heads and num_kv_heads/tp KV heads."""
    return replace(cfg, num_heads=cfg.num_heads // tp_degree, num_kv_heads=cfg.num_kv_heads // tp_degree)


K_POS, V_POS = 3, 3  # the position axis of each cache


def cache_shapes(cfg: ModelConfig, num_slots: int, max_len: int, tp_degree: int = 1) -> tuple[tuple, tuple]:
    """k and v [L, slots, kv_heads, max_len, head_dim] (kv_heads per rank): the layout compile/model.py's
    spans use, so a graph slices, never transposes."""
    kv = cfg.num_kv_heads // tp_degree
    shape = (cfg.num_layers, num_slots, kv, max_len, cfg.head_dim)
    return shape, shape


def write_prefill_kv(cache: torch.Tensor, new: torch.Tensor, slot: torch.Tensor, start_pos: torch.Tensor,
                     last_index: torch.Tensor, pos_dim: int) -> torch.Tensor:
    """Write one chunk into one slot, out of place.

    cache [L, N, ...] with positions on axis pos_dim; new [L, ...]: one slot's layout with the
    chunk's S positions on axis pos_dim - 1. Row i lands at start_pos + i for i <= last_index;
    padded rows land at max_len - 1 (never read). Static shapes, indices always in range.
    """
    s, max_len = new.shape[pos_dim - 1], cache.shape[pos_dim]
    offsets = torch.arange(s, dtype=torch.int64, device=cache.device)
    positions = torch.where(offsets <= last_index, start_pos + offsets, torch.full_like(offsets, max_len - 1))
    src = new.unsqueeze(1)                                              # [L, 1, ...]
    at = [1] * cache.dim()
    at[pos_dim] = s
    row = torch.index_select(cache, 1, slot.view(1))                    # [L, 1, ...], positions max_len
    row = torch.scatter(row, pos_dim, positions.view(at).expand(src.shape), src)
    return torch.scatter(cache, 1, slot.view([1] * cache.dim()).expand(row.shape), row)


def write_decode_kv(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, pos_dim: int) -> torch.Tensor:
    """cache [L, N, ...] with new [L, B, ...] (slots 0..B-1, no position axis) written at positions [B]."""
    src = new.unsqueeze(pos_dim)
    at = [1] * cache.dim()
    at[1] = new.shape[1]
    return torch.scatter(cache, pos_dim, positions.view(at).expand(src.shape), src)


class TreeWeights(Weights):
    """compile.model's Weights over a module tree whose state_dict keys are the HF names."""

    def __init__(self, cfg: ModelConfig, root: nn.Module, layers: dict[str, nn.Module]):
        self.cfg = cfg
        self._by_name = dict(root.named_parameters())
        self._layers = layers

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        layer = self._layers.get(name)
        if layer is None:
            return super().linear(x, name)
        return layer(x[None])[0]  # NxD's parallel layers are written for [batch, seq, hidden] inputs


def _child(root: nn.Module, path: list[str]) -> nn.Module:
    node = root
    for part in path:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    return node


def stub(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Shape and dtype without the bytes: one element of storage, expanded (see trace.py)."""
    return torch.zeros((), dtype=dtype).expand(shape)


class NeuronBucketGraph(nn.Module):
    """One module for every bucket kind; `spec` (a Python attribute) picks the computation at trace time.

    forward(input_ids, positions, last_index=None, slot=None):
      prefill / prefill_chunk: input_ids [S], positions [1] (start position), last_index [1], slot [1]
      decode:                  input_ids [B], positions [B] (rows are slots 0..B-1)
    NOTE: the scalars are [1], not 0-dim: torch-xla specialises 0-dim inputs on their values (the
    XLA check saw one compile per distinct slot), and a trace must never bake in its example values.
    Returns (logits, cache_k, cache_v) for torch_neuronx.trace, logits for ModelBuilder.
    """

    def __init__(self, cfg: ModelConfig, spec: GraphSpec, num_slots: int, max_len: int, dtype: torch.dtype,
                 tp_degree: int = 1, tracer: str = TRACE):
        super().__init__()
        self.full_cfg, self.cfg, self.spec, self.tracer = cfg, local_config(cfg, tp_degree), spec, tracer
        self.parallel: dict[str, nn.Module] = {}
        shapes = weight_shapes(cfg)
        if tracer == MODEL_BUILDER:
            self._add_parallel_layers(cfg, dtype)
        for name in weight_names(cfg):
            if any(name.startswith(prefix + ".") for prefix in self.parallel):
                continue
            *path, leaf = name.split(".")
            t_dtype = torch.float32 if name == "rope.inv_freq" else dtype
            _child(self, path).register_parameter(leaf, nn.Parameter(stub(shapes[name], t_dtype), requires_grad=False))
        k_shape, v_shape = cache_shapes(cfg, num_slots, max_len, tp_degree)
        if tracer == TRACE:
            self.cache_k = nn.Parameter(stub(k_shape, dtype), requires_grad=False)
            self.cache_v = nn.Parameter(stub(v_shape, dtype), requires_grad=False)
        else:
            self.register_buffer("cache_k", torch.zeros(k_shape, dtype=dtype), persistent=False)
            self.register_buffer("cache_v", torch.zeros(v_shape, dtype=dtype), persistent=False)

    def _add_parallel_layers(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear
        shapes = weight_shapes(cfg)
        for i in range(cfg.num_layers):
            for proj in COLUMN_PARALLEL + ROW_PARALLEL:
                name = f"model.layers.{i}.{proj}"
                out_size, in_size = shapes[name + ".weight"]
                if proj in ROW_PARALLEL:
                    layer = RowParallelLinear(in_size, out_size, bias=False, input_is_parallel=True, dtype=dtype)
                else:
                    bias = cfg.attention_bias and proj.startswith("self_attn")
                    layer = ColumnParallelLinear(in_size, out_size, bias=bias, gather_output=False, dtype=dtype)
                *path, leaf = name.split(".")
                _child(self, path).add_module(leaf, layer)
                self.parallel[name] = layer
        self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, bias=False, gather_output=True, dtype=dtype)
        self.parallel["lm_head"] = self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                last_index: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None):
        w = TreeWeights(self.cfg, self, self.parallel)
        spec = self.spec
        if spec.kind == "decode":
            k_span = self.cache_k[:, :spec.batch, :, :spec.kv_len]                     # [L, B, KV, K, D]
            v_span = self.cache_v[:, :spec.batch, :, :spec.kv_len]
            logits, new_k, new_v = decode(w, input_ids, positions, k_span, v_span)   # new [L, B, KV, D]
            cache_k = write_decode_kv(self.cache_k, new_k, positions, K_POS)
            cache_v = write_decode_kv(self.cache_v, new_v, positions, V_POS)
        else:
            past = ()
            if spec.kind == "prefill_chunk":
                past = (torch.index_select(self.cache_k, 1, slot.view(1))[:, 0, :, :spec.kv_len],
                        torch.index_select(self.cache_v, 1, slot.view(1))[:, 0, :, :spec.kv_len])
            logits, new_k, new_v = prefill(w, input_ids, positions, last_index, *past)  # new [L, KV, S, D]
            cache_k = write_prefill_kv(self.cache_k, new_k, slot, positions, last_index, K_POS)
            cache_v = write_prefill_kv(self.cache_v, new_v, slot, positions, last_index, V_POS)
        if self.tracer == TRACE:
            return logits, cache_k, cache_v
        self.cache_k = cache_k  # reassignment, not an in-place op: ModelBuilder aliases the buffer
        self.cache_v = cache_v
        return logits


def example_inputs(spec: GraphSpec) -> tuple[torch.Tensor, ...]:
    """Positional example inputs with exactly the bucket's shapes (int64, as compile/model.py uses)."""
    i64 = torch.int64
    if spec.kind == "decode":
        return torch.zeros(spec.batch, dtype=i64), torch.zeros(spec.batch, dtype=i64)
    return (torch.zeros(spec.seq_len, dtype=i64),) + tuple(torch.zeros(1, dtype=i64) for _ in range(3))


def input_output_aliases(module: NeuronBucketGraph) -> dict:
    """torch_neuronx.trace aliases: each cache parameter -> the output index carrying its new value."""
    return {module.cache_k: 1, module.cache_v: 2}
