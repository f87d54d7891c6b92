"""Weight-only int8 (`--quantization int8`): symmetric, one scale per output channel.

Which tensors: the decoder's linear projections (q/k/v/o, gate/up/down), about 80% of SmolLM2's bytes
and over 95% of a 7B model's. The embedding (a row lookup) and lm_head (the logits every sampler reads;
tied to the embedding in most small models) stay in the artifact's dtype, as NxD Inference's and vLLM's
weight-only schemes leave them by default.

Stored form, the same on both targets (NxD Core's quantized parallel layers read it as is, with
quantization_type "per_channel_symmetric"): `<proj>.weight` int8 [out, in] and `<proj>.scale` float32
[out, 1], with weight ~= int8 * scale. A projection's output is dequantised after the matmul,
y = (x @ int8^T) * scale, which equals x @ (int8 * scale)^T up to rounding (compile/model.py Weights.linear).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # torch is imported where tensors are made: compile.config reads this module's names
    import torch

NONE, INT8 = "none", "int8"
QUANTIZATIONS = (NONE, INT8)
# The projections that are quantised (compile/model.py's names after "model.layers.N.").
QUANTIZED_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SCALE_SUFFIX = ".scale"
INT8_MAX = 127  # symmetric: -127..127 (-128 unused, so negating a weight never overflows)


def is_quantized_projection(name: str) -> bool:
    """True for a layer projection's name without its suffix, e.g. "model.layers.3.mlp.up_proj"."""
    parts = name.split(".", 3)
    return len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in QUANTIZED_PROJECTIONS


def is_quantized_weight(name: str) -> bool:
    """True for a quantised projection's weight tensor, e.g. "model.layers.3.mlp.up_proj.weight"."""
    return name.endswith(".weight") and is_quantized_projection(name.removesuffix(".weight"))


def quantize_tensor(weight: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """[out, in] float -> (int8 [out, in], float32 scale [out, 1]) with weight ~= int8 * scale.

    The scale is the row's largest magnitude / 127, computed in float32; an all-zero row gets scale 1
    (its int8 row is zero either way, and no division by zero)."""
    import torch
    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_weights(model, weights: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """The checkpoint's weights (compile.model.weight_names of the unquantised config) with every
    quantised projection's weight replaced by its int8 tensor and its scale added."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if is_quantized_weight(name):
            q, scale = quantize_tensor(tensor)
            out[name] = q
            out[name.removesuffix(".weight") + SCALE_SUFFIX] = scale
        else:
            out[name] = tensor
    return out


def quantized_config(model, quantization: str):
    """The ModelConfig the graphs are built for: the checkpoint's, with its weight format."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    return replace(model, quantization=None if quantization == NONE else quantization)


def quantize_checkpoint(ckpt, quantization: str):
    """A compile.checkpoint.Checkpoint in the weight format `quantization` (itself for "none")."""
    if quantization == NONE:
        return ckpt
    return replace(ckpt, config=quantized_config(ckpt.config, quantization),
                   weights=quantize_weights(ckpt.config, ckpt.weights))
