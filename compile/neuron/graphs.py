"""Neuron bucket graphs: compile.model's prefill/decode plus the KV cache update *inside* the graph.

On CPU the runner writes the new K/V into the cache outside the graph (compile/model.py). On Neuron
the cache stays on the device as ModelBuilder *state*: two buffers (cache_k, cache_v) of ONE module
that every tag is traced from, so all buckets read and write the same device memory (docs/neuron.md).
forward *reassigns* the buffers with out-of-place ops (torch.index_put, torch.index_copy:
never scatter_/index_copy_ or another in-place op, docs/neuron.md); ModelBuilder detects the
reassignment and aliases the state, so no cache ever goes back to the host. Each graph returns its
logits only.

K/V writes follow NxD Inference (docs/neuron.md): index_put with int32 index tensors of shape
[L, KV, S] (prefill) or [L, B, KV] (decode), one index per written head_dim row. Fully expanded
scatter indices over L x KV x max_len x head_dim make slow DMA code and very long compiles.

The model math is never copied: TreeWeights feeds the module's parameters and neuronx-distributed's
parallel layers to compile.model through Weights.linear, with finite additive masks.

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
from compile.model import EXPERT_STACKS, ModelConfig, Weights, decode, prefill, weight_names
from compile.quantize import QUANTIZED_PROJECTIONS, SCALE_SUFFIX

MODEL_BUILDER = "ModelBuilder"
COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
# MoE layers: every expert split over tp on its intermediate dim, as a dense MLP is (gate/up column-parallel,
# down row-parallel): the three [E, I, H] stacks are plain parameters carrying NxD's tensor-parallel
# attributes (partition_dim 1), so shard_checkpoint slices dim 1; the router (mlp.gate) is replicated, and
# one all-reduce per layer sums the experts' partial outputs (compile/model.py moe, TreeWeights.reduce).
EXPERT_PARALLEL = tuple(f"mlp.experts.{stack}" for stack in EXPERT_STACKS)
EXPERT_PARTITION_DIM = 1
# The device-side slot copy (compaction, n > 1 forks): one more tag of the same NxDModel.
COPY_SLOT = GraphSpec("copy_slot")
INDEX_DTYPE = torch.int32  # NxD Inference's index dtype for K/V writes


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every stored tensor, from the config alone (the dry run never loads weights)."""
    hidden, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                 # sandwich_norms (Gemma): replicated like every norm
                 "pre_feedforward_layernorm.weight": (hidden,), "post_feedforward_layernorm.weight": (hidden,),
                 "self_attn.q_proj.weight": (q_out, hidden), "self_attn.q_proj.bias": (q_out,),
                 "self_attn.k_proj.weight": (kv_out, hidden), "self_attn.k_proj.bias": (kv_out,),
                 "self_attn.v_proj.weight": (kv_out, hidden), "self_attn.v_proj.bias": (kv_out,),
                 # qk_norm: one [head_dim] weight for every head, replicated on every rank (never sharded)
                 "self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,),
                 "self_attn.o_proj.weight": (hidden, q_out), "mlp.gate_proj.weight": (cfg.intermediate_size, hidden),
                 "mlp.up_proj.weight": (cfg.intermediate_size, hidden), "mlp.down_proj.weight": (hidden, cfg.intermediate_size),
                 # MoE: the router [E, hidden] replicated, each expert stack [E, moe_intermediate, hidden]
                 "mlp.gate.weight": (cfg.num_experts, hidden),
                 **{stack: (cfg.num_experts, cfg.moe_intermediate_size, hidden) for stack in EXPERT_PARALLEL}}
    if cfg.quantization:  # compile/quantize.py: one float32 scale per output channel
        per_layer.update({name.replace(".weight", SCALE_SUFFIX): (shape[0], 1) for name, shape in per_layer.items()
                          if name.endswith(".weight") and name.rsplit(".", 1)[0] in QUANTIZED_PROJECTIONS})
    fixed = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "rope.inv_freq": (cfg.rotary_dim // 2,),
             "rope.local_inv_freq": (cfg.rotary_dim // 2,),  # Gemma 3's sliding layers
             "model.norm.weight": (hidden,), "lm_head.weight": (cfg.vocab_size, hidden)}
    shapes = {}
    for name in weight_names(cfg):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
        else:
            shapes[name] = fixed[name]
    return shapes


def local_config(cfg: ModelConfig, tp_degree: int) -> ModelConfig:
    """The per-rank view: each rank holds num_heads/tp query heads and num_kv_heads/tp KV heads (and
    moe_intermediate_size/tp of every expert)."""
    return replace(cfg, num_heads=cfg.num_heads // tp_degree, num_kv_heads=cfg.num_kv_heads // tp_degree,
                   moe_intermediate_size=cfg.moe_intermediate_size // tp_degree)


def cache_shapes(cfg: ModelConfig, num_slots: int, max_len: int, tp_degree: int = 1) -> tuple[tuple, tuple]:
    """k and v [L, slots, kv_heads, max_len, head_dim] (kv_heads per rank): the layout compile/model.py's
    spans use, so a graph slices, never transposes."""
    kv = cfg.num_kv_heads // tp_degree
    shape = (cfg.num_layers, num_slots, kv, max_len, cfg.head_dim)
    return shape, shape


def _iota(n: int, device: torch.device, *view: int) -> torch.Tensor:
    return torch.arange(n, dtype=INDEX_DTYPE, device=device).view(*view)


def write_prefill_kv(cache: torch.Tensor, new: torch.Tensor, slot: torch.Tensor, start_pos: torch.Tensor,
                     last_index: torch.Tensor) -> torch.Tensor:
    """cache [L, N, KV, P, D] with one chunk new [L, KV, S, D] of one slot written out of place.

    Row i lands at start_pos + i for i <= last_index; padded rows land at P - 1 (never read).
    Index tensors broadcast to [L, KV, S] int32: one index per written head_dim row."""
    layers, _, kv, max_len, _ = cache.shape
    s, dev = new.shape[2], cache.device
    offsets = _iota(s, dev, s)
    start, last = start_pos.to(INDEX_DTYPE), last_index.to(INDEX_DTYPE)
    positions = torch.where(offsets <= last, start + offsets, torch.full_like(offsets, max_len - 1))
    index = (_iota(layers, dev, layers, 1, 1), slot.to(INDEX_DTYPE).view(1, 1, 1),
             _iota(kv, dev, 1, kv, 1), positions.view(1, 1, s))
    return torch.index_put(cache, index, new)


def write_decode_kv(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cache [L, N, KV, P, D] with new [L, B, KV, D] (rows are slots 0..B-1) written at positions [B].
    Index tensors broadcast to [L, B, KV] int32."""
    layers, b, kv = new.shape[:3]
    dev = cache.device
    index = (_iota(layers, dev, layers, 1, 1), _iota(b, dev, 1, b, 1), _iota(kv, dev, 1, 1, kv),
             positions.to(INDEX_DTYPE).view(1, b, 1))
    return torch.index_put(cache, index, new)


def copy_slot_kv(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """cache [L, N, KV, P, D] with positions < length of slot src copied into slot dst (the rest of
    dst kept); src, dst, length [1]. Gather and scatter indices are one slot id each."""
    max_len, dev = cache.shape[3], cache.device
    src_row = torch.index_select(cache, 1, src.view(1))                   # [L, 1, KV, P, D]
    dst_row = torch.index_select(cache, 1, dst.view(1))
    keep = _iota(max_len, dev, 1, 1, 1, max_len, 1) < length.to(INDEX_DTYPE)
    return torch.index_copy(cache, 1, dst.view(1), torch.where(keep, src_row, dst_row))


def quantized_layer_classes(quantization: str) -> tuple[type, type, dict]:
    """NxD Core's weight-only quantized parallel layers for compile/quantize.py's format: int8 `weight`
    [out, in] and float32 `scale` [out, 1] per output channel, sharded with the weight (column-parallel)
    or replicated (row-parallel: its output channels are not split); the output is dequantised after
    the matmul, as Weights.linear does on cpu."""
    from neuronx_distributed.quantization.quantization_layers import QuantizedColumnParallel, QuantizedRowParallel
    if quantization != "int8":
        raise ValueError(f"no neuron layers for quantization {quantization!r}")
    extra = dict(quantization_type="per_channel_symmetric", quantized_dtype=torch.int8,
                 quantization_per_channel_axis=0, scale_dtype=torch.float32)
    return QuantizedColumnParallel, QuantizedRowParallel, extra


class TreeWeights(Weights):
    """compile.model's Weights over a module tree whose state_dict keys are the HF names."""

    finite_masks = True  # device graphs: no -inf anywhere (compile/model.py additive_mask)

    def __init__(self, cfg: ModelConfig, root: nn.Module, layers: dict[str, nn.Module], tp_degree: int = 1):
        self.cfg = cfg
        self._by_name = dict(root.named_parameters())
        self._layers = layers
        self.tp_degree = tp_degree

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """MoE experts' partial sums over this rank's intermediate slice: one all-reduce over tp (NxD's own,
        the one RowParallelLinear makes)."""
        if self.tp_degree == 1:
            return x
        from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region
        return reduce_from_tensor_model_parallel_region(x)

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
    """Shape and dtype without the bytes: one element of storage, expanded. Weights never enter a
    graph (set_weights binds them at load), so tracing needs only their shapes."""
    return torch.zeros((), dtype=dtype).expand(shape)


class NeuronBucketGraph(nn.Module):
    """The one module every tag of the NxDModel is traced from; `spec` (a Python attribute, set
    before each ModelBuilder.trace) picks the computation, so all tags share weights and state.

    forward(a, b, c=None, d=None), by spec.kind:
      prefill / prefill_chunk: input_ids [S], start_pos [1], last_index [1], slot [1] -> logits [1, V]
      decode:                  input_ids [B], positions [B] (rows are slots 0..B-1)  -> logits [B, V]
      copy_slot:               src [1], dst [1], length [1]                        -> length [1]
    NOTE: the scalars are [1], not 0-dim: torch-xla specialises 0-dim inputs on their values (the
    XLA check saw one compile per distinct slot), and a trace must never bake in its example values.
    """

    def __init__(self, cfg: ModelConfig, spec: GraphSpec, num_slots: int, max_len: int, dtype: torch.dtype,
                 tp_degree: int = 1):
        super().__init__()
        self.full_cfg, self.cfg, self.spec = cfg, local_config(cfg, tp_degree), spec
        self.tp_degree = tp_degree
        self.parallel: dict[str, nn.Module] = {}
        shapes = weight_shapes(cfg)
        self._add_parallel_layers(cfg, dtype)
        for name in weight_names(cfg):
            if any(name.startswith(prefix + ".") for prefix in self.parallel):
                continue
            *path, leaf = name.split(".")
            t_dtype = torch.float32 if name.startswith("rope.") else dtype
            shape = shapes[name]
            expert_stack = name.endswith(EXPERT_PARALLEL)
            if expert_stack:  # this rank's slice of the intermediate dim
                shape = shape[:EXPERT_PARTITION_DIM] + (shape[EXPERT_PARTITION_DIM] // tp_degree,) + shape[2:]
            param = nn.Parameter(stub(shape, t_dtype), requires_grad=False)
            if expert_stack:  # NxD's set_tensor_model_parallel_attributes: what shard_checkpoint slices by
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, EXPERT_PARTITION_DIM, 1
            _child(self, path).register_parameter(leaf, param)
        k_shape, v_shape = cache_shapes(cfg, num_slots, max_len, tp_degree)
        # NOTE: non-persistent, so the cache is state, not a weight: set_weights never sees it.
        self.register_buffer("cache_k", torch.zeros(k_shape, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(v_shape, dtype=dtype), persistent=False)

    def _add_parallel_layers(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        """Call inside NxDParallelState (every tp, 1 included): the layers size themselves from it.
        int8 configs take NxD Core's quantized layers (quantized_layer_classes) for the projections."""
        from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear
        column, row, extra = ColumnParallelLinear, RowParallelLinear, {}
        if cfg.quantization:
            column, row, extra = quantized_layer_classes(cfg.quantization)
        shapes = weight_shapes(cfg)
        for i in range(cfg.num_layers):
            for proj in COLUMN_PARALLEL + ROW_PARALLEL:
                if proj.startswith("mlp.") and cfg.is_moe_layer(i):
                    continue  # experts: sharded stacks (EXPERT_PARALLEL), not parallel layers
                name = f"model.layers.{i}.{proj}"
                out_size, in_size = shapes[name + ".weight"]
                if proj in ROW_PARALLEL:
                    layer = row(in_size, out_size, bias=False, input_is_parallel=True, dtype=dtype, **extra)
                else:
                    bias = cfg.attention_bias and proj.startswith("self_attn")
                    layer = column(in_size, out_size, bias=bias, gather_output=False, dtype=dtype, **extra)
                *path, leaf = name.split(".")
                _child(self, path).add_module(leaf, layer)
                self.parallel[name] = layer
        self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, bias=False, gather_output=True, dtype=dtype)
        self.parallel["lm_head"] = self.lm_head

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: Optional[torch.Tensor] = None,
                d: Optional[torch.Tensor] = None) -> torch.Tensor:
        spec = self.spec
        if spec.kind == "copy_slot":
            self.cache_k = copy_slot_kv(self.cache_k, a, b, c)  # reassignment: ModelBuilder aliases it
            self.cache_v = copy_slot_kv(self.cache_v, a, b, c)
            return c + 0  # NOTE: a graph needs an output; an input echoed as is may be folded away
        w = TreeWeights(self.cfg, self, self.parallel, self.tp_degree)
        if spec.kind == "decode":
            input_ids, positions = a, b
            k_span = self.cache_k[:, :spec.batch, :, :spec.kv_len]                     # [L, B, KV, K, D]
            v_span = self.cache_v[:, :spec.batch, :, :spec.kv_len]
            logits, new_k, new_v = decode(w, input_ids, positions, k_span, v_span)   # new [L, B, KV, D]
            self.cache_k = write_decode_kv(self.cache_k, new_k, positions)
            self.cache_v = write_decode_kv(self.cache_v, new_v, positions)
            return logits
        input_ids, start_pos, last_index, slot = a, b, c, d
        past = ()
        if spec.kind == "prefill_chunk":  # slice the span first: the gather moves one slot's span only
            past = (torch.index_select(self.cache_k[:, :, :, :spec.kv_len], 1, slot.view(1))[:, 0],
                    torch.index_select(self.cache_v[:, :, :, :spec.kv_len], 1, slot.view(1))[:, 0])
        logits, new_k, new_v = prefill(w, input_ids, start_pos, last_index, *past)  # new [L, KV, S, D]
        self.cache_k = write_prefill_kv(self.cache_k, new_k, slot, start_pos, last_index)
        self.cache_v = write_prefill_kv(self.cache_v, new_v, slot, start_pos, last_index)
        return logits


def example_inputs(spec: GraphSpec) -> tuple[torch.Tensor, ...]:
    """Positional example inputs with exactly the bucket's shapes (int64, as compile/model.py uses)."""
    i64 = torch.int64
    if spec.kind == "decode":
        return torch.zeros(spec.batch, dtype=i64), torch.zeros(spec.batch, dtype=i64)
    if spec.kind == "copy_slot":
        return tuple(torch.zeros(1, dtype=i64) for _ in range(3))
    return (torch.zeros(spec.seq_len, dtype=i64),) + tuple(torch.zeros(1, dtype=i64) for _ in range(3))
