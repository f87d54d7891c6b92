"""The cpu target's graph variants: which one a machine can run, and the weight list each takes.

The artifact always stores the checkpoint's HF-named weights once. A CPU_ONEDNN graph takes them
fused (q/k/v, gate/up) and prepacked for oneDNN's matmul; that list is built here, both by
`compile` (to trace) and by the server at load time (packing is layout, not math: the same
kernel, bit for bit, reads the weights in the order it wants instead of reordering per call).
"""
from __future__ import annotations

from typing import Mapping

import torch

from compile.config import AUTO_DTYPE, ConfigError
from compile.model import CPU_ONEDNN, PORTABLE, ModelConfig, graph_weight_names, weight_names
from compile.quantize import SCALE_SUFFIX


def onednn_problem(dtype: torch.dtype) -> str | None:
    """Why this machine's torch cannot run CPU_ONEDNN graphs in dtype, or None if it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), w, None, "none", [0.0], "")
    except (RuntimeError, AttributeError) as e:
        return f"oneDNN cannot pack a {dtype} linear here ({str(e).splitlines()[0]})"
    if not torch.equal(y.float(), torch.full((2, 8), 8.0)):
        return f"oneDNN's packed {dtype} linear gave a wrong result here"
    return None


def resolve_dtype(requested: str, target: str) -> str:
    """auto -> bfloat16, except on a CPU whose oneDNN cannot run bf16 matmuls (an AVX2-only host):
    there a bf16 matmul is emulated, 6.5x slower than float32 at 448 x 576 x 1536 (measured on a 2-core
    AMD EPYC), and graphs could only be portable ones, so float32 is both faster and cpu-onednn."""
    if requested != AUTO_DTYPE:
        return requested
    if target != "cpu" or onednn_problem(torch.bfloat16) is None:
        return "bfloat16"
    return "float32"


def resolve_variant(requested: str, dtype: torch.dtype) -> str:
    """auto -> CPU_ONEDNN where it runs, else PORTABLE; an explicit CPU_ONEDNN that cannot run fails."""
    if requested == PORTABLE:
        return PORTABLE
    problem = onednn_problem(dtype)
    if requested == CPU_ONEDNN and problem:
        raise ConfigError(f"--cpu-kernels {CPU_ONEDNN}: {problem}; use --cpu-kernels {PORTABLE}")
    return PORTABLE if problem else CPU_ONEDNN


def pack(weight: torch.Tensor) -> torch.Tensor:
    # NOTE: the batch-size hint does not change the packed layout's speed at M = 1..2048 (measured).
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def graph_weights(cfg: ModelConfig, stored: Mapping[str, torch.Tensor], variant: str) -> list[torch.Tensor]:
    """The tensors a graph of `variant` takes, in graph_weight_names order, from the stored HF names."""
    if variant == PORTABLE:
        return [stored[n] for n in weight_names(cfg)]
    dtype = stored["model.embed_tokens.weight"].dtype
    out = []
    for name in graph_weight_names(cfg, variant):
        if name == "lm_head.weight":
            out.append(pack(stored.get(name, stored["model.embed_tokens.weight"])))
        elif ".qkv_proj." in name:
            out.append(_fused(stored, name, ("q_proj", "k_proj", "v_proj"), "qkv_proj", dtype))
        elif ".gate_up_proj." in name:
            out.append(_fused(stored, name, ("gate_proj", "up_proj"), "gate_up_proj", dtype))
        elif ".qk_norm." in name:
            out.append(_qk_norm(cfg, stored, name))
        else:
            out.append(_onednn_form(stored[name], name, dtype))
    return out


def _onednn_form(tensor: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor as a CPU_ONEDNN graph takes it: projection weights packed for oneDNN, except int8
    ones, which torch's int8 kernel (_weight_int8pack_mm) takes as they are stored; int8 scales [out, 1]
    float32 -> [out] in the activations' dtype, as that kernel wants them."""
    if name.endswith(SCALE_SUFFIX):
        return tensor.reshape(-1).to(dtype).contiguous()
    if name.endswith("proj.weight") and tensor.dtype != torch.int8:
        return pack(tensor)
    return tensor


def _fused(stored: Mapping[str, torch.Tensor], name: str, parts: tuple[str, ...], fused: str,
           dtype: torch.dtype) -> torch.Tensor:
    joined = torch.cat([stored[name.replace(fused, part)] for part in parts])
    return _onednn_form(joined, name, dtype) if not name.endswith(".bias") else joined  # biases stay plain


def _qk_norm(cfg: ModelConfig, stored: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """[heads + kv heads, head_dim]: q_norm's weight for each query head's row, then k_norm's for each KV
    head's, so one multiply scales the fused q/k rows (compile/model.py qkv)."""
    q, k = (stored[name.replace("qk_norm", part)] for part in ("q_norm", "k_norm"))
    return torch.cat((q.expand(cfg.num_heads, -1), k.expand(cfg.num_kv_heads, -1))).contiguous()
