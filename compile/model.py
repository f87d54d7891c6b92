"""The one model definition: Llama-family decoders with static shapes and an explicit KV cache.

Covers LlamaForCausalLM (SmolLM2, TinyLlama, Llama 2/3 with rope scaling), MistralForCausalLM
(sliding window), Qwen2ForCausalLM (qkv bias, tied or untied embeddings), Qwen3ForCausalLM
(per-head RMSNorm on q and k before rope, head_dim from the config, no qkv bias), Gemma2ForCausalLM and
Gemma3ForCausalLM (text): RMSNorm scaling by (1 + weight), GeGLU, norms before and after the attention and the
MLP, embeddings times sqrt(hidden), a query scale of its own, tanh soft-capping of attention scores and final
logits (Gemma 2), sliding-window and global layers mixed, and a second rope base for the sliding layers (Gemma 3),
Phi3ForCausalLM (fused qkv_proj / gate_up_proj in the checkpoint, split into q/k/v and gate/up at load by
compile/checkpoint.py; rope on the first rotary_dim of each head only; LongRoPE's factors baked into
rope.inv_freq at load), and the mixture-of-experts MixtralForCausalLM and Qwen3MoeForCausalLM (`moe`: softmax
router, top-k, every expert computed and the unselected ones weighted zero, so shapes never depend on routing).

Everything is a pure function of (weights, inputs): weights are passed in, never captured, so
a traced bucket graph carries no weights and every graph binds the same stored tensors.
Nothing here branches on tensor values and every shape is fixed by the bucket: the same code is
traced by torch.export (cpu) and torch-neuronx (neuron). It uses only PyTorch 2.x APIs that
exist in 2.9 (torch-neuronx is frozen there).

Cache layout: k_cache and v_cache are both [L, slots, kv_heads, max_len, head_dim] (NxD
Inference's). Graphs *return* the new K/V of the positions they computed and the caller writes
them into the cache: on CPU a graph that mutates its cache input makes torch copy the whole cache
per call (docs/benchmarks.md, "Design measurements").

Graph variants: PORTABLE graphs take the HF-named weights and use only plain aten ops (the neuron
target, and any CPU). CPU_ONEDNN graphs, the cpu target's default where oneDNN is available, take
q/k/v and gate/up fused into one matrix each and every projection prepacked for oneDNN
(compile/cpu_kernels.py builds that list at load time from the same stored weights): a decode
step is bound by reading the weights, and packed, fused matmuls read them 1.3-1.5x faster. They
also call Kiln's own C++ kernels where the host can build them (compile/kernels: decode attention read
from the cache in place up to each row's length, a packed prefill's attention over each prompt's own tokens or,
in a ragged prefill, also over the cached positions a resumed prompt continues, RMSNorm in one pass, rope,
int8 weights times a few rows);
without them, decode attention appends the new token's K/V to short spans (appended_attention) where
PORTABLE graphs never copy the span (split_attention).
"""
from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from compile.quantize import SCALE_SUFFIX, is_quantized_projection

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                           "Qwen3MoeForCausalLM")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # hidden_act: SwiGLU (Llama, Qwen) or GeGLU with tanh GELU (Gemma)
# A MoE layer's expert stacks, each [experts, moe_intermediate, hidden] (down_proj_t is HF's down_proj
# transposed: input-major, so all three split over tp on dim 1, the one dim NxD shards of a 3-D weight).
EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj_t")
PORTABLE, CPU_ONEDNN = "portable", "cpu-onednn"
GRAPH_VARIANTS = (PORTABLE, CPU_ONEDNN)
MASK_VALUE = -1e30  # finite, so a fully masked row cannot produce NaN
# appended_attention copies each layer's span: up to this size that beats split_attention; past it
# the copies cost more than they save (SmolLM2 at batch 16: 4x slower at span 2048, equal at 1024;
# at batch 32: 78 against 95 ms at span 384 (4.5 MiB), 120 against 112 ms at span 512 (6 MiB)).
APPEND_MAX_SPAN_BYTES = 5 << 20
# cpu-onednn int8 projections: an int8 kernel (Kiln's kiln::int8_linear, else torch's _weight_int8pack_mm) reads
# half the bytes but has no bf16 dot products behind it. Measured on the 2-core dev machine (SmolLM2's 120
# projections, cold weights, ms per pass; bf16 packed / torch's int8 kernel / int8 cast to bf16 then matmul): 1 row
# 19.2 / 12.1 / 26.3, 4 rows 16.1 / 16.4 / 27.7, 16 rows 19.2 / 38.4 / 34.5, 32 rows 31.6 / 66.2 / 46.2, 512 rows
# 335 / 911 / 364 (docs/quantization.md). Kiln's kernel, side by side with bf16 and torch's: 1 row 4.2 against
# 10.3 and 7.4, 4 rows 8.1 / 9.4 / 10.4, 8 rows 18.2 / 11.5 / 21.4 (2026-12-01).
INT8_KERNEL_MAX_ROWS = 8
PACKED_ATTENTION_BLOCK = 128  # query block of a packed prefill's attention (block_causal_attention)
# Packed prefill graphs up to this many tokens use Kiln's packed-attention kernel (float32 FMAs, each token over its
# own prompt only) instead of SDPA's blocks (bf16 dot products over whole blocks, prompts crossing). SmolLM2 on the
# dev machine, whole call: 3 x 150 tokens 344 against 420 ms; one 500-token prompt 466 against 425 ms. Larger graphs
# only run when --max-num-batched-tokens is raised, for long prompts, where the blocks win.
PACKED_KERNEL_MAX_TOKENS = 512


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_attention_scaling: float
    attention_bias: bool
    tie_word_embeddings: bool
    sliding_window: Optional[int]
    max_position_embeddings: int
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]
    # Qwen3: an RMSNorm over each head's q and k (self_attn.q_norm / k_norm, [head_dim]) before rope.
    # NOTE: defaulted, so a manifest written before the field existed still reads (as False).
    qk_norm: bool = False
    # Gemma 2/3 (every field defaulted to the Llama behaviour, so older manifests still read):
    hidden_act: str = "silu"                 # the MLP's gate activation (ACTIVATIONS)
    # RMSNorm scales by (1 + weight), in float32 before the one cast to the dtype, as transformers' GemmaRMSNorm
    # (the stored weight is the checkpoint's own; adding 1 at load would round 1 + w to bf16)
    norm_add_one: bool = False
    embedding_multiplier: float = 1.0       # embeddings times this (sqrt(hidden)), the factor rounded to the dtype
    # norms around both sublayers: post_attention_layernorm on the attention's output, pre_feedforward_layernorm
    # before and post_feedforward_layernorm after the MLP (post_attention_layernorm is then no pre-MLP norm)
    sandwich_norms: bool = False
    query_pre_attn_scalar: Optional[float] = None  # scores scaled by its -1/2 power instead of head_dim's
    attn_logit_softcapping: Optional[float] = None   # scores -> tanh(scores / cap) * cap before the mask
    final_logit_softcapping: Optional[float] = None  # logits -> tanh(logits / cap) * cap, in float32
    # Layers that ignore sliding_window (attend to the whole past); empty: the window (if any) is every layer's.
    full_attention_layers: tuple[int, ...] = ()
    # Gemma 3: the sliding layers' rope base (rope.local_inv_freq, default rope); None: one rope for every layer
    rope_local_base_freq: Optional[float] = None
    # Weight format of the decoder's projections: None (the dtype) or "int8" (compile/quantize.py: int8
    # weights with a float32 scale per output channel). Defaulted, as qk_norm.
    quantization: Optional[str] = None
    # Mixture of experts (Mixtral, Qwen3-MoE); num_experts 0 = a dense model. Each MoE layer has a router
    # (mlp.gate.weight [experts, hidden]) and expert stacks (EXPERT_STACKS) of moe_intermediate_size;
    # dense_layers (Qwen3-MoE's mlp_only_layers / decoder_sparse_step) keep a dense MLP of intermediate_size.
    # norm_topk_prob: the top-k weights renormalised to sum to 1 (Mixtral always; Qwen3-MoE by its config).
    # NOTE: defaulted, so a manifest written before these fields existed still reads (as a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    dense_layers: tuple[int, ...] = ()
    # Phi-3: rope turns only the first int(head_dim * partial_rotary_factor) dims of each head (rotary_dim),
    # the rest pass through, as transformers' apply_rotary_pos_emb does. Defaulted like qk_norm.
    partial_rotary_factor: float = 1.0
    # LongRoPE (rope_type "longrope"): which factor set rope.inv_freq holds, "short" or "long", chosen once
    # at compile time from --max-model-len (compile/checkpoint.py rope_inv_freq); None for other rope types.
    longrope_factors: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["full_attention_layers"] = list(self.full_attention_layers)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Raises ValueError (one line) for a field this Kiln does not know: a manifest written by a newer
        one (a new model family or weight format), which these graphs could not run."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model config field(s) {', '.join(unknown)} unknown to this Kiln (written by a newer "
                             f"version?); upgrade Kiln or recompile the artifact")
        return cls(**{**d, "eos_token_ids": tuple(d["eos_token_ids"]),
                      "full_attention_layers": tuple(d.get("full_attention_layers", ())),
                      "dense_layers": tuple(d.get("dense_layers", ()))})

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5  # as transformers' Gemma attention computes it
        return 1.0 / math.sqrt(self.head_dim)

    def layer_window(self, i: int) -> Optional[int]:
        """Layer i's sliding window (None: it attends to the whole past)."""
        return None if i in self.full_attention_layers else self.sliding_window

    def layer_rope(self, i: int) -> str:
        """The inv_freq tensor layer i's rope uses: Gemma 3's sliding layers have a base of their own."""
        local = self.rope_local_base_freq is not None and self.layer_window(i) is not None
        return "rope.local_inv_freq" if local else "rope.inv_freq"

    @property
    def layer_windows(self) -> tuple[Optional[int], ...]:
        """The distinct windows of the layers, in layer order (one mask is built per window)."""
        return tuple(dict.fromkeys(self.layer_window(i) for i in range(self.num_layers)))

    @property
    def layer_ropes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.layer_rope(i) for i in range(self.num_layers)))

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rope turns (transformers' int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers


def projection_names(cfg: ModelConfig, name: str, bias: bool = False) -> list[str]:
    """One projection's tensors: its weight, its int8 scale (quantized configs), its bias."""
    names = [name + ".weight"]
    if cfg.quantization and is_quantized_projection(name):
        names.append(name + SCALE_SUFFIX)
    return names + [name + ".bias"] if bias else names


def mlp_weight_names(cfg: ModelConfig, i: int) -> list[str]:
    """Layer i's feed-forward tensors (PORTABLE): a router and expert stacks, or a dense MLP (gate, up, down;
    int8 scales after their weights)."""
    p = f"model.layers.{i}.mlp."
    if cfg.is_moe_layer(i):
        return [p + "gate.weight"] + [p + f"experts.{stack}" for stack in EXPERT_STACKS]
    return [n for proj in ("gate_proj", "up_proj", "down_proj") for n in projection_names(cfg, p + proj)]


def weight_names(cfg: ModelConfig) -> list[str]:
    """Every tensor the graphs take, in the fixed order they are passed (HF names; int8 scales after
    their weights)."""
    names = ["model.embed_tokens.weight", *rope_names(cfg)]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj"):
            names += projection_names(cfg, p + f"self_attn.{proj}", cfg.attention_bias)
        if cfg.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += projection_names(cfg, p + "self_attn.o_proj") + [p + "post_attention_layernorm.weight",
                                                                   *feedforward_norms(cfg, p)]
        names += mlp_weight_names(cfg, i)
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def rope_names(cfg: ModelConfig) -> list[str]:
    return ["rope.inv_freq"] + (["rope.local_inv_freq"] if cfg.rope_local_base_freq is not None else [])


def feedforward_norms(cfg: ModelConfig, prefix: str) -> list[str]:
    if not cfg.sandwich_norms:
        return []
    return [prefix + "pre_feedforward_layernorm.weight", prefix + "post_feedforward_layernorm.weight"]


def graph_weight_names(cfg: ModelConfig, variant: str = PORTABLE) -> list[str]:
    """The tensors a graph of this variant takes, in order. CPU_ONEDNN fuses q/k/v into qkv_proj and
    gate/up into gate_up_proj (int8 configs: their scales too), q_norm/k_norm (qk_norm) into qk_norm
    [heads + kv heads, head_dim] (each head's row of its norm weight), and always has its own lm_head
    (a packed copy when embeddings are tied)."""
    if variant == PORTABLE:
        return weight_names(cfg)
    if variant != CPU_ONEDNN:
        raise ValueError(f"unknown graph variant {variant!r} (known: {', '.join(GRAPH_VARIANTS)})")
    names = ["model.embed_tokens.weight", *rope_names(cfg)]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"] + _fused_names(cfg, p + "self_attn.qkv_proj", cfg.attention_bias)
        if cfg.qk_norm:
            names.append(p + "self_attn.qk_norm.weight")
        names += projection_names(cfg, p + "self_attn.o_proj") + [p + "post_attention_layernorm.weight",
                                                                   *feedforward_norms(cfg, p)]
        if cfg.is_moe_layer(i):  # router and expert stacks as stored (plain matmuls, never packed)
            names += mlp_weight_names(cfg, i)
        else:
            names += _fused_names(cfg, p + "mlp.gate_up_proj") + projection_names(cfg, p + "mlp.down_proj")
    return names + ["model.norm.weight", "lm_head.weight"]


def _fused_names(cfg: ModelConfig, name: str, bias: bool = False) -> list[str]:
    """A fused projection (qkv_proj, gate_up_proj): quantized when the projections it fuses are."""
    names = [name + ".weight"] + ([name + SCALE_SUFFIX] if cfg.quantization else [])
    return names + [name + ".bias"] if bias else names


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # NOTE: [0.0], not []: torch.export cannot serialise an empty scalar list (unused with "none").
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [0.0], "")


class Weights:
    """Named view over the flat weight list a PORTABLE graph receives."""

    variant = PORTABLE
    # NOTE: True for device graphs (neuron): every mask is an explicit finite additive bias, never
    # SDPA's is_causal or a boolean mask, which lower to -inf and risk NaNs in bf16 on trn1 (docs/neuron.md).
    finite_masks = False
    kernels = False  # calls Kiln's own cpu kernels (compile/kernels): CPU_ONEDNN graphs, where they build

    def __init__(self, cfg: ModelConfig, tensors: list[torch.Tensor]):
        self.cfg = cfg
        self._by_name = dict(zip(graph_weight_names(cfg, self.variant), tensors))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._by_name[name]

    @property
    def lm_head(self) -> torch.Tensor:
        return self._by_name.get("lm_head.weight", self._by_name["model.embed_tokens.weight"])

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """One projection, e.g. name "model.layers.0.mlp.up_proj" or "lm_head".

        NOTE: the single place the model applies a weight matrix, so the neuron target can swap
        in neuronx-distributed's parallel layers for tensor parallelism (compile/neuron/graphs.py).
        """
        if name == "lm_head":
            return F.linear(x, self.lm_head)
        weight, bias = self._by_name[name + ".weight"], self._by_name.get(name + ".bias")
        scale = self._by_name.get(name + SCALE_SUFFIX)
        if scale is None:
            return F.linear(x, weight, bias)
        # int8 (compile/quantize.py): the matmul on the weight cast to the dtype, then each output channel's
        # float32 scale, as NxD Core's per-channel layers dequantise (scale_dequantize); a device fuses the
        # cast into the matmul.
        y = (F.linear(x, weight.to(x.dtype)).to(torch.float32) * scale.view(-1)).to(x.dtype)
        return y if bias is None else y + bias

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.cfg.norm_add_one:
            return rms_norm_add_one(x, self._by_name[name], self.cfg.rms_norm_eps)
        return rms_norm(x, self._by_name[name], self.cfg.rms_norm_eps)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over tensor-parallel ranks of a partial result (moe's experts): nothing on one rank.
        NOTE: the neuron target overrides it with NxD's all-reduce (compile/neuron/graphs.py)."""
        return x


class OneDNNWeights(Weights):
    """The CPU_ONEDNN view: fused projections, prepacked for oneDNN, and the fused RMSNorm kernel."""

    variant = CPU_ONEDNN

    def __init__(self, cfg: ModelConfig, tensors: list[torch.Tensor]):
        super().__init__(cfg, tensors)
        # NOTE: decided when a graph is traced; a host that cannot build them gets the op-by-op versions
        self.kernels = kernels_problem() is None

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight, bias = self._by_name[name + ".weight"], self._by_name.get(name + ".bias")
        scale = self._by_name.get(name + SCALE_SUFFIX)
        if scale is None:
            return onednn_linear(x, weight, bias)
        # int8 (scales [out] of x's dtype; cpu_kernels.py). The row count is the bucket's, fixed when the graph is
        # traced: few rows run an int8 kernel (Kiln's, else torch's weight-only one), more rows the weight cast to
        # the dtype for one oneDNN matmul, then the scales (INT8_KERNEL_MAX_ROWS says why).
        if x.shape[0] <= INT8_KERNEL_MAX_ROWS and self.kernels:  # compile/kernels/int8_linear.cpp
            y = torch.ops.kiln.int8_linear(x, weight, scale)
        elif x.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x, weight, scale)
        else:
            y = F.linear(x, weight.to(x.dtype)) * scale
        return y if bias is None else y + bias

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # NOTE: both paths round to the dtype once where HF rounds twice (the same in float32, at most one bf16
        # ulp apart in bfloat16). torch's F.rms_norm is one call but runs as eight ops on CPU; Kiln's kernel
        # (compile/kernels/rms_norm.cpp) is one pass.
        if self.kernels:
            return torch.ops.kiln.rms_norm(x, self._by_name[name], self.cfg.rms_norm_eps, self.cfg.norm_add_one)
        if self.cfg.norm_add_one:  # float32 throughout, one rounding at the end, as transformers' GemmaRMSNorm
            normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, self.cfg.rms_norm_eps)
            return (normed * (1.0 + self._by_name[name].to(torch.float32))).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), self._by_name[name], self.cfg.rms_norm_eps)


def make_weights(cfg: ModelConfig, tensors: list[torch.Tensor], variant: str = PORTABLE) -> Weights:
    return OneDNNWeights(cfg, tensors) if variant == CPU_ONEDNN else Weights(cfg, tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm_add_one(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x normalised and scaled by (1 + weight), both in float32, then cast once."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.to(torch.float32))).to(x.dtype)


def rope_cos_sin(w: Weights, positions: torch.Tensor, dtype: torch.dtype, inv_freq: str = "rope.inv_freq"):
    """positions [...] int64 -> cos, sin [..., rotary_dim] (HF's formula, incl. attention scaling).
    inv_freq "rope.local_inv_freq": Gemma 3's sliding layers' default rope (no attention scaling)."""
    freqs = positions[..., None].to(torch.float32) * w[inv_freq].to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = w.cfg.rope_attention_scaling if inv_freq == "rope.inv_freq" else 1.0
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def layer_ropes(w: Weights, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple]:
    """cos, sin [..., 1, D] per inv_freq tensor the layers use (one for every family but Gemma 3)."""
    out = {}
    for name in w.cfg.layer_ropes:
        cos, sin = rope_cos_sin(w, positions, dtype, name)
        out[name] = cos[..., None, :], sin[..., None, :]
    return out


def embed(w: Weights, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings; Gemma's times sqrt(hidden), the factor first rounded to the dtype as transformers does."""
    table = w["model.embed_tokens.weight"]
    h = F.embedding(input_ids, table)
    if w.cfg.embedding_multiplier != 1.0:
        h = h * round_to_dtype(w.cfg.embedding_multiplier, table.dtype)
    return h


def round_to_dtype(x: float, dtype: torch.dtype) -> float:
    """x as a float32 and then as dtype (round to nearest even), in plain Python: a torch.tensor made here would
    become a constant of the exported graph."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if dtype == torch.bfloat16:
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    elif dtype == torch.float16:
        return float(struct.unpack("<e", struct.pack("<e", struct.unpack("<f", struct.pack("<I", bits))[0]))[0])
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """tanh(x / cap) * cap (Gemma 2's soft-capping); x unchanged when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D], cos/sin [..., R]: rope on the first R dims, the other D - R passed through (partial rotary;
    a static choice from the shapes)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def qkv(w: Weights, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """h [T, hidden] -> q [T, H, D], k [T, KV, D] (qk_norm, then rope applied), v [T, KV, D].

    qk_norm (Qwen3): each head's q and k RMS-normalised over head_dim, then rope, as transformers does."""
    cfg, t = w.cfg, h.shape[0]
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    p = f"model.layers.{i}.self_attn."
    if w.variant == CPU_ONEDNN:  # q/k/v fused into one projection
        y = w.linear(h, p + "qkv_proj").view(t, heads + 2 * kv, cfg.head_dim)
        qk = y[:, :heads + kv]
        if cfg.qk_norm and cfg.norm_add_one:  # Gemma 3: (1 + weight), float32 until one final cast
            normed = F.rms_norm(qk.to(torch.float32), (cfg.head_dim,), None, cfg.rms_norm_eps)
            qk = (normed * (1.0 + w[p + "qk_norm.weight"].to(torch.float32))).to(qk.dtype)
        elif cfg.qk_norm:  # one normalisation over q and k together, then each head's row of its weight
            qk = F.rms_norm(qk, (cfg.head_dim,), None, cfg.rms_norm_eps) * w[p + "qk_norm.weight"]
        if w.kernels and cos.shape[-1] == cfg.head_dim:  # one pass (compile/kernels/rope.cpp)
            qk = torch.ops.kiln.rope(qk, cos, sin)
        else:
            qk = apply_rope(qk, cos, sin)  # one rope over q and k together
        return qk[:, :heads], qk[:, heads:], y[:, heads + kv:]
    out = []
    for proj, n in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
        y = w.linear(h, p + proj)
        out.append(y.view(t, n, cfg.head_dim))
    q, k, v = out
    if cfg.qk_norm:
        q, k = w.norm(q, p + "q_norm.weight"), w.norm(k, p + "k_norm.weight")
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def activation(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
    return F.gelu(x, approximate="tanh") if cfg.hidden_act == "gelu_pytorch_tanh" else F.silu(x)


def mlp(w: Weights, i: int, h: torch.Tensor) -> torch.Tensor:
    p = f"model.layers.{i}.mlp."
    if w.variant == CPU_ONEDNN:  # gate/up fused into one projection
        gate_up = w.linear(h, p + "gate_up_proj")
        inter = w.cfg.intermediate_size
        return w.linear(activation(w.cfg, gate_up[:, :inter]) * gate_up[:, inter:], p + "down_proj")
    return w.linear(activation(w.cfg, w.linear(h, p + "gate_proj")) * w.linear(h, p + "up_proj"), p + "down_proj")


def feed_forward(w: Weights, i: int, h: torch.Tensor) -> torch.Tensor:
    return moe(w, i, h) if w.cfg.is_moe_layer(i) else mlp(w, i, h)


def moe(w: Weights, i: int, h: torch.Tensor) -> torch.Tensor:
    """A sparse MoE block as transformers computes it (Mixtral, Qwen3-MoE), with static shapes.

    h [T, hidden]: router logits [T, E]; softmax in float32; torch.topk (the same call transformers makes, so
    ties pick the same experts); the top-k weights renormalised when norm_topk_prob (Mixtral always), and
    cast to h's dtype before weighting for Qwen3-MoE (Mixtral weights in float32). Then EVERY expert runs on
    every token (batched matmuls over the [E, I, H] stacks) and the outputs are summed with a [T, E] weight
    matrix that is zero outside each token's top k: exact, no data-dependent shape, no gather or scatter.
    Costs E/k times a sparse dispatch's expert FLOPs (docs/neuron.md "Mixture of experts").
    The stacks may be one tp rank's slice of the intermediate dim: the sum is then partial, and w.reduce
    all-reduces it once per layer (after the combine, not once per expert).
    """
    cfg, p = w.cfg, f"model.layers.{i}.mlp."
    num_experts = cfg.num_experts
    # NOTE: F.linear on the stored router, never w.linear: the router is replicated and never packed.
    logits = F.linear(h, w[p + "gate.weight"])                                 # [T, E]
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    top, index = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)           # [T, k]
    if cfg.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    if cfg.architecture != "MixtralForCausalLM":
        top = top.to(h.dtype)  # Qwen3-MoE's router returns its weights in the hidden dtype
    # [T, E] weights: top-k indices are distinct, so each entry takes at most one nonzero term
    experts = torch.arange(num_experts, dtype=index.dtype, device=h.device)
    chosen = index[..., None] == experts                                       # [T, k, E]
    combine = torch.where(chosen, top[..., None], torch.zeros((), dtype=top.dtype, device=h.device)).sum(dim=1)
    x = h[None]                                                                # [1, T, H]
    gate = torch.matmul(x, w[p + "experts.gate_proj"].transpose(1, 2))        # [E, T, I]
    up = torch.matmul(x, w[p + "experts.up_proj"].transpose(1, 2))
    out = torch.matmul(F.silu(gate) * up, w[p + "experts.down_proj_t"])       # [E, T, H]
    y = (out * combine.transpose(0, 1)[:, :, None]).sum(dim=0).to(h.dtype)   # [T, H]
    return w.reduce(y)


def layer_residuals(w: Weights, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The layer's output from its input h and its attention's [rows, H*D] output: the o_proj and MLP residuals,
    with Gemma's norms on both sides of each sublayer when cfg.sandwich_norms."""
    p = f"model.layers.{i}."
    out = w.linear(attn, p + "self_attn.o_proj")
    if not w.cfg.sandwich_norms:
        h = h + out
        return h + feed_forward(w, i, w.norm(h, p + "post_attention_layernorm.weight"))
    h = h + w.norm(out, p + "post_attention_layernorm.weight")
    return h + w.norm(feed_forward(w, i, w.norm(h, p + "pre_feedforward_layernorm.weight")),
                      p + "post_feedforward_layernorm.weight")


_ALL_LAYERS = object()


def key_mask(cfg: ModelConfig, key_pos: torch.Tensor, query_pos: torch.Tensor, window=_ALL_LAYERS) -> torch.Tensor:
    """True where a query at query_pos may attend to a key at key_pos (causal, sliding window).
    window: a layer's (ModelConfig.layer_window, None = none); by default cfg.sliding_window."""
    window = cfg.sliding_window if window is _ALL_LAYERS else window
    allowed = key_pos <= query_pos
    if window is not None:
        allowed = allowed & (key_pos > query_pos - window)
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = may attend) -> 0 / MASK_VALUE bias of `dtype`: finite, so no -inf reaches a graph."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), MASK_VALUE, dtype=dtype, device=allowed.device))


def prefill_attention(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: Optional[torch.Tensor], scale: float, fused: bool = True) -> torch.Tensor:
    """q [H, S, D], k/v [KV, T, D], mask [S, T] bool (True = may attend) or an additive bias
    (additive_mask); None = causal, T == S -> [S, H*D].

    NOTE: fused = SDPA's fused CPU kernel. Materialising [H, S, T] float32 scores made the S=2048 prefill
    4x slower than eager transformers. K/V are expanded to H heads (cheap at prefill) rather than
    using enable_gqa, which not every lowering of the frozen torch 2.9 stack handles.
    Device graphs (fused=False) spell the attention out with a float32 softmax over scores plus the
    finite bias, as NxD Inference does: SDPA's math lowering compares scores against -inf. So does a
    model with attention soft-capping (Gemma 2; no SDPA kernel caps scores), there with a bool mask on CPU.
    """
    k = k.repeat_interleave(cfg.num_groups, dim=0)
    v = v.repeat_interleave(cfg.num_groups, dim=0)
    if fused:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                             scale=scale)[0]             # [H, S, D]
    else:
        scores = softcap(torch.matmul(q, k.transpose(-1, -2)).to(torch.float32) * scale, cfg.attn_logit_softcapping)
        if mask.dtype == torch.bool:
            scores = torch.where(mask, scores, torch.full((), MASK_VALUE, dtype=scores.dtype, device=scores.device))
        else:
            scores = scores + mask.to(torch.float32)
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [H, S, D]
    return out.transpose(0, 1).reshape(q.shape[1], cfg.num_heads * cfg.head_dim)


def block_causal_attention(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """prefill_attention (fused) for a mask under which no token attends to a later one (a packed
    prefill): query block j only scores keys [0, (j+1) * block), the rest being masked anyway.

    NOTE: a packed prefill's mask is block-diagonal and causal, but SDPA given a mask computes every
    entry: at 512 tokens the attention was 30% of the call. Blocks of 128 compute 10/16 of it."""
    s = q.shape[1]
    k = k.repeat_interleave(cfg.num_groups, dim=0)[None]   # [1, H, S, D], expanded once for every block
    v = v.repeat_interleave(cfg.num_groups, dim=0)[None]
    outs = []
    for start in range(0, s, block):
        end = min(start + block, s)
        outs.append(F.scaled_dot_product_attention(q[None, :, start:end], k[:, :, :end], v[:, :, :end],
                                                   attn_mask=mask[start:end, :end], scale=scale)[0])
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(s, cfg.num_heads * cfg.head_dim)


def final_logits(w: Weights, h: torch.Tensor) -> torch.Tensor:
    h = w.norm(h, "model.norm.weight")
    # NOTE: Gemma 2's cap is applied in float32 (transformers caps in the dtype; the same in float32).
    return softcap(w.linear(h, "lm_head").to(torch.float32), w.cfg.final_logit_softcapping)


def explicit_masks(w: Weights) -> bool:
    """Every attention gets a materialised mask and spells the scores out: device graphs, and soft-capping."""
    return w.finite_masks or w.cfg.attn_logit_softcapping is not None


def prefill(w: Weights, input_ids: torch.Tensor, start_pos: torch.Tensor, last_index: torch.Tensor,
            past_k: Optional[torch.Tensor] = None, past_v: Optional[torch.Tensor] = None):
    """Prefill one sequence's chunk.

    input_ids [S] (padded on the right), start_pos [] position of input_ids[0], last_index []
    index of the last real token in the chunk. past_k / past_v [L, KV, P, D]: the
    slot's cache (positions < start_pos are valid) for later chunks of a long prompt; None for a
    first chunk.
    Returns logits [1, V] float32 of the last real token, new_k/new_v [L, KV, S, D].
    """
    cfg = w.cfg
    s = input_ids.shape[0]
    # NOTE: index tensors made on the inputs' device: a traced graph (XLA, Neuron) cannot mix in CPU tensors.
    positions = start_pos + torch.arange(s, dtype=torch.int64, device=input_ids.device)
    ropes = layer_ropes(w, positions, w["model.embed_tokens.weight"].dtype)  # cos, sin [S, 1, D]
    masks = {}  # one per distinct layer window
    for window in cfg.layer_windows:
        mask = None  # plain causal: SDPA's is_causal
        if past_k is not None or window is not None or explicit_masks(w):
            mask = key_mask(cfg, positions[None, :], positions[:, None], window)  # [S, S]
        if past_k is not None:
            past_pos = torch.arange(past_k.shape[2], dtype=torch.int64, device=input_ids.device)
            past_mask = (past_pos[None, :] < start_pos) & key_mask(cfg, past_pos[None, :], positions[:, None], window)
            mask = torch.cat((past_mask, mask), dim=-1)                 # [S, P+S]
        if w.finite_masks:
            mask = additive_mask(mask, w["model.embed_tokens.weight"].dtype)
        masks[window] = mask
    return prefill_layers(w, input_ids, ropes, masks, last_index.view(1), past_k, past_v)


def prefill_layers(w: Weights, input_ids: torch.Tensor, ropes: dict[str, tuple], masks: dict,
                   last_indices: torch.Tensor,
                   past_k: Optional[torch.Tensor] = None, past_v: Optional[torch.Tensor] = None,
                   causal_block: int = 0, kernel_attention: Optional[Callable] = None):
    """The decoder over S prompt tokens (prefill, packed_prefill and ragged_prefill): logits [R, V] float32 at
    last_indices [R], new_k/new_v [L, KV, S, D]. With past_k/past_v the keys are the past then the new.
    ropes: cos, sin per inv_freq name (layer_ropes); masks: per layer window (ModelConfig.layer_window).
    causal_block > 0: the mask never lets a token see a later one (block_causal_attention).
    kernel_attention(i, q [S, H, D], k, v [S, KV, D]) -> [S, H*D]: layer i's attention by one of Kiln's kernels
    (packed_prefill, ragged_prefill), which need no mask."""
    cfg = w.cfg
    scale = cfg.attention_scale
    h = embed(w, input_ids)                                          # [S, hidden]
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
        cos, sin = ropes[cfg.layer_rope(i)]
        mask = masks.get(cfg.layer_window(i))
        x = w.norm(h, f"model.layers.{i}.input_layernorm.weight")
        q, k, v = qkv(w, i, x, cos, sin)
        if kernel_attention is not None:  # compile/kernels/decode_attention.cpp
            attn = kernel_attention(i, q, k, v)
        k, v = k.transpose(0, 1), v.transpose(0, 1)                 # [KV, S, D]
        new_k.append(k)
        new_v.append(v)
        if past_k is not None:
            k = torch.cat((past_k[i], k), dim=1)                    # [KV, P+S, D]
            v = torch.cat((past_v[i], v), dim=1)
        if kernel_attention is None and causal_block and not explicit_masks(w):
            attn = block_causal_attention(cfg, q.transpose(0, 1), k, v, mask, scale, causal_block)
        elif kernel_attention is None:
            attn = prefill_attention(cfg, q.transpose(0, 1), k, v, mask, scale, fused=not explicit_masks(w))
        h = layer_residuals(w, i, h, attn)
    logits = final_logits(w, h.index_select(0, last_indices))
    return logits, torch.stack(new_k), torch.stack(new_v)


def packed_prefill(w: Weights, input_ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor,
                   last_indices: torch.Tensor):
    """Prefill several whole prompts in one call, packed end to end (no padding between them).

    input_ids [T]: the prompts one after another, then padding; positions [T]: each token's position in
    its own prompt; segments [T]: which prompt a token belongs to (padding gets its own segment id, one
    no prompt uses); last_indices [R]: the index of each prompt's last token (unused rows repeat one).
    A token attends to the tokens of its own prompt at positions up to its own (and within the sliding
    window). Returns logits [R, V] float32 and new_k/new_v [L, KV, T, D] for the caller to write into
    each prompt's slot.

    NOTE: packing is what removes prefill padding: one prompt per call pads it to the next context
    bucket (a 150-token prompt at 256 computes 41% padding); several packed into one bucket pad once.
    """
    cfg = w.cfg
    ropes = layer_ropes(w, positions, w["model.embed_tokens.weight"].dtype)  # cos, sin [T, 1, D]
    if w.kernels and input_ids.shape[0] <= PACKED_KERNEL_MAX_TOKENS:  # the kernel needs no mask
        def attention(i, q, k, v):  # each token over its own prompt only
            return torch.ops.kiln.packed_attention(q, k, v, positions, segments, cfg.attention_scale,
                                                   cfg.layer_window(i) or 0, cfg.attn_logit_softcapping or 0.0)
        return prefill_layers(w, input_ids, ropes, {}, last_indices, kernel_attention=attention)
    same = segments[None, :] == segments[:, None]
    masks = {}
    for window in cfg.layer_windows:
        mask = same & key_mask(cfg, positions[None, :], positions[:, None], window)
        masks[window] = additive_mask(mask, w["model.embed_tokens.weight"].dtype) if w.finite_masks else mask
    return prefill_layers(w, input_ids, ropes, masks, last_indices, causal_block=PACKED_ATTENTION_BLOCK)


def ragged_prefill(w: Weights, input_ids: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor,
                   slots: torch.Tensor, last_indices: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """packed_prefill whose prompts may resume after positions already in their cache slot (Kiln's kernels only).

    input_ids [T]: segments one after another, then padding; each segment is a whole prompt or the rest of
    one: its tokens sit at positions start, start + 1, ... (positions [T]), and starts [T] / slots [T] give each
    token its segment's start and cache slot. A token attends to its slot's cached positions < start, then to
    its own segment's tokens up to itself (within the sliding window). Padding tokens: position 0, start 0.
    k_cache / v_cache: the runner's whole cache [L, rows, KV, positions, D], read in place (only positions
    < start of each segment's slot). Returns logits [R, V] float32 at last_indices [R] and new_k/new_v
    [L, KV, T, D] for the caller to write at each segment's positions of its slot.

    NOTE: several prefix-cache hits' rests (and a long prompt's next chunk) run as one call: their projections
    then run on 100s of rows at once, where one call each ran them on a few dozen rows at a tenth of the
    matrix units' speed (docs/benchmarks.md, "Issue 13")."""
    cfg = w.cfg
    ropes = layer_ropes(w, positions, w["model.embed_tokens.weight"].dtype)  # cos, sin [T, 1, D]

    def attention(i, q, k, v):
        return torch.ops.kiln.ragged_attention(q, k, v, positions, starts, slots, k_cache[i], v_cache[i],
                                               cfg.attention_scale, cfg.layer_window(i) or 0,
                                               cfg.attn_logit_softcapping or 0.0)
    return prefill_layers(w, input_ids, ropes, {}, last_indices, kernel_attention=attention)


def split_attention(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_span: torch.Tensor, v_span: torch.Tensor,
                    cached: torch.Tensor, scale: float, cap: Optional[float] = None) -> torch.Tensor:
    """PORTABLE decode attention: scores over the span and the new token's own score apart, one
    softmax over both. qg [B, KV, G, D], k/v [B, KV, D], spans [B, KV, K, D], cached [B, 1, 1, K] bool
    -> [B, KV, G, D]. The span is never copied (a graph on the device reads its cache in place).
    cap: attention soft-capping (Gemma 2), applied to the scores before the mask."""
    span = k_span.shape[2]
    # NOTE: K @ q^T, not q @ K^T: the span is the left operand with dense rows (6% faster on CPU).
    past = softcap(torch.matmul(k_span, qg.transpose(-1, -2)).transpose(-1, -2).to(torch.float32) * scale,
                   cap)  # [B, KV, G, K]
    # NOTE: where with a tensor, not masked_fill with a Python float: XLA makes that scalar an f64 input.
    past = torch.where(cached, past, torch.full((), MASK_VALUE, dtype=past.dtype, device=past.device))
    own = softcap((qg * k[:, :, None, :]).sum(-1, keepdim=True).to(torch.float32) * scale, cap)  # [B, KV, G, 1]
    probs = torch.softmax(torch.cat((past, own), dim=-1), dim=-1).to(v.dtype)
    return torch.matmul(probs[..., :span], v_span) + probs[..., span:] * v[:, :, None, :]


def appended_attention(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_span: torch.Tensor,
                       v_span: torch.Tensor, bias: torch.Tensor, scale: float,
                       cap: Optional[float] = None) -> torch.Tensor:
    """CPU_ONEDNN decode attention: the new token's K/V appended to the span, then one masked softmax
    between two batched matmuls, as transformers does. bias [B, 1, 1, K+1] float32 (0 or MASK_VALUE).

    NOTE: appending copies the span, which oneDNN's bf16 bmm does anyway (it takes only dense
    batches), and leaves half the ops of split_attention: 24.2 against 26.5 ms per SmolLM2 step at
    batch 16, span 256. Used up to APPEND_MAX_SPAN_BYTES of span per layer.
    """
    keys = torch.cat((k_span, k[:, :, None, :]), dim=2)            # [B, KV, K+1, D]
    values = torch.cat((v_span, v[:, :, None, :]), dim=2)
    scores = softcap(torch.matmul(qg, keys.transpose(-1, -2)).to(torch.float32) * scale, cap) + bias
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), values)


def kernels_problem() -> Optional[str]:
    """Why CPU_ONEDNN graphs cannot call Kiln's own cpu kernels here (None: they do; compile/kernels)."""
    from compile.kernels import problem
    return problem()


def decode(w: Weights, input_ids: torch.Tensor, positions: torch.Tensor,
           k_span: torch.Tensor, v_span: torch.Tensor):
    """One new token for each of B sequences.

    input_ids [B], positions [B] (= tokens already cached), k_span and v_span [L, B, KV, K, D]:
    the first K cached positions of the B slots (positions >= a row's position are ignored).
    Returns logits [B, V] float32 and new_k/new_v [L, B, KV, D] to be written at `positions`.
    """
    cfg = w.cfg
    b, span = input_ids.shape[0], k_span.shape[3]
    scale = cfg.attention_scale
    ropes = layer_ropes(w, positions, w["model.embed_tokens.weight"].dtype)  # cos, sin [B, 1, D]
    append = w.variant == CPU_ONEDNN and k_span[0].numel() * k_span.element_size() <= APPEND_MAX_SPAN_BYTES
    masks = {}  # one per distinct layer window (Kiln's decode-attention kernel takes positions instead)
    key_pos = None if w.kernels else torch.arange(span, dtype=torch.int64, device=input_ids.device)
    for window in () if w.kernels else cfg.layer_windows:
        cached = (key_pos[None, :] < positions[:, None]) & key_mask(cfg, key_pos[None, :], positions[:, None], window)
        cached = cached[:, None, None, :]                           # [B, 1, 1, K]
        if append:  # additive mask over the span and the new token appended after it
            own = torch.ones_like(cached[..., :1])
            cached = torch.where(torch.cat((cached, own), dim=-1), 0.0, MASK_VALUE)  # [B, 1, 1, K+1] float32
        masks[window] = cached
    h = embed(w, input_ids)                                          # [B, hidden]
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
        cos, sin = ropes[cfg.layer_rope(i)]
        x = w.norm(h, f"model.layers.{i}.input_layernorm.weight")
        q, k, v = qkv(w, i, x, cos, sin)                            # q [B, H, D], k/v [B, KV, D]
        new_k.append(k)
        new_v.append(v)
        qg = q.reshape(b, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
        if w.kernels:  # reads each row's cached positions in place (compile/kernels/decode_attention.cpp)
            attn = torch.ops.kiln.decode_attention(qg, k, v, k_span[i], v_span[i], positions, scale,
                                                   cfg.layer_window(i) or 0, cfg.attn_logit_softcapping or 0.0)
        else:
            attend = appended_attention if append else split_attention
            attn = attend(qg, k, v, k_span[i], v_span[i], masks[cfg.layer_window(i)], scale,
                          cfg.attn_logit_softcapping)
        h = layer_residuals(w, i, h, attn.reshape(b, cfg.num_heads * cfg.head_dim))
    return final_logits(w, h), torch.stack(new_k), torch.stack(new_v)


class PrefillGraph(torch.nn.Module):
    """Bucket function for tracing: weights are the first argument, never module state."""

    def __init__(self, cfg: ModelConfig, variant: str = PORTABLE):
        super().__init__()
        self.cfg = cfg
        self.variant = variant

    def forward(self, weights: list[torch.Tensor], input_ids, start_pos, last_index):
        return prefill(make_weights(self.cfg, weights, self.variant), input_ids, start_pos, last_index)


class PrefillChunkGraph(PrefillGraph):
    def forward(self, weights: list[torch.Tensor], input_ids, start_pos, last_index, past_k, past_v):
        return prefill(make_weights(self.cfg, weights, self.variant), input_ids, start_pos, last_index, past_k, past_v)


class PackedPrefillGraph(PrefillGraph):
    def forward(self, weights: list[torch.Tensor], input_ids, positions, segments, last_indices):
        return packed_prefill(make_weights(self.cfg, weights, self.variant), input_ids, positions, segments,
                              last_indices)


class RaggedPrefillGraph(PrefillGraph):
    def forward(self, weights: list[torch.Tensor], input_ids, positions, starts, slots, last_indices, k_cache,
                v_cache):
        return ragged_prefill(make_weights(self.cfg, weights, self.variant), input_ids, positions, starts, slots,
                              last_indices, k_cache, v_cache)


class DecodeGraph(PrefillGraph):
    def forward(self, weights: list[torch.Tensor], input_ids, positions, k_span, v_span):
        return decode(make_weights(self.cfg, weights, self.variant), input_ids, positions, k_span, v_span)
