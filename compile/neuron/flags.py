"""Neuron facts Kiln relies on (sources: docs/neuron.md) and the compiler arguments.

Everything here is plain data so --dry-run, the compile path and the tests agree on one copy.
"""
from __future__ import annotations

import shlex

from compile.config import CompileConfig, ConfigError
from compile.model import ModelConfig

# docs/neuron.md: Inf2 {1,2,4,8,24}, Trn1 {1,2,8,16,32} (NxDI api-guide).
# NOTE: docs/neuron.md lists no set for Trn2; Kiln accepts powers of two up to the 64 logical cores of a
# trn2.48xlarge at LNC=2 (§2). Unconfirmed: widen or narrow it once a Trn2 compile says otherwise.
SUPPORTED_TP = {"inf2": (1, 2, 4, 8, 24), "trn1": (1, 2, 8, 16, 32), "trn2": (1, 2, 4, 8, 16, 32, 64)}
# docs/neuron.md: NxDI uses LNC=1 on Inf2/Trn1 and LNC=2 (the default) on Trn2.
LNC = {"inf2": 1, "trn1": 1, "trn2": 2}
# docs/neuron.md: HBM per NeuronCore (Trn2 at LNC=2).
HBM_PER_CORE_GIB = {"inf2": 16, "trn1": 16, "trn2": 24}
# NxDI's decoder flags (docs/neuron.md; NxDI's model_wrapper.py): pipeline tiling factor 2 for
# context encoding, 1 for token generation.
def tensorizer_options(kind: str) -> str:
    tiling = 1 if kind == "decode" else 2
    return f"--enable-ccop-compute-overlap --cc-pipeline-tiling-factor={tiling} --vectorize-strided-dma"


# NxD's default flag set has --enable-saturate-infinity, and passing explicit arguments drops it; it
# matters on trn1 only, where compiler-introduced transposes can turn a large bf16 value into inf
# and then NaN (docs/neuron.md). Kiln's masks are finite too (compile/model.py additive_mask).
SATURATE_INFINITY_TARGETS = ("trn1",)


def opt_level(kind: str) -> str:
    """-O1 for context encoding (prefill) graphs, -O2 for token generation (decode) graphs."""
    return "-O2" if kind == "decode" else "-O1"


def compiler_args(kind: str, neuron_target: str) -> list[str]:
    """neuronx-cc arguments for one graph kind (one tag of ModelBuilder.compile). NxD adds neither
    --target nor --lnc itself, and drops its defaults once arguments are given (docs/neuron.md)."""
    args = ["--target", neuron_target, "--auto-cast=none", "--model-type=transformer",
            f"--tensorizer-options={tensorizer_options(kind)}", f"--lnc={LNC[neuron_target]}"]
    if neuron_target in SATURATE_INFINITY_TARGETS:
        args.append("--enable-saturate-infinity")
    return args + [opt_level(kind)]


def compiler_args_str(kind: str, neuron_target: str) -> str:
    """The same arguments as one shell-quoted string (ModelBuilder.compile takes str or {tag: str})."""
    return shlex.join(compiler_args(kind, neuron_target))


def check_tp(cfg: CompileConfig, model: ModelConfig) -> None:
    """Refuse a TP degree the target does not support or the model cannot be split by (one line)."""
    tp, target = cfg.tp_degree, cfg.neuron_target
    supported = SUPPORTED_TP[target]
    if tp not in supported:
        raise ConfigError(f"--tp-degree {tp} is not supported on {target} "
                          f"(supported: {', '.join(map(str, supported))})")
    sizes = [("attention heads", model.num_heads), ("KV heads", model.num_kv_heads), ("vocab size", model.vocab_size)]
    if any(not model.is_moe_layer(i) for i in range(model.num_layers)):  # some layer has a dense MLP
        sizes.insert(2, ("intermediate size", model.intermediate_size))
    if model.num_experts:  # every expert is split over tp on its intermediate dim
        sizes.insert(2, ("expert intermediate size", model.moe_intermediate_size))
    for what, n in sizes:
        if n % tp:
            raise ConfigError(f"--tp-degree {tp} does not divide the model's {what} ({n}); "
                              f"pick a degree that divides {model.num_heads} heads and {model.num_kv_heads} KV heads")
