"""neuron target: the backend compile/export.py calls for --target neuron (and --dry-run on any target).

`python -m compile --target neuron --neuron-target inf2|trn1|trn2 --tp-degree N`: at every tp
degree, 1 included, NxD Core ModelBuilder traces one tag per bucket into one NxDModel over one set
of weights and one KV state (compile/neuron/builder.py), as NxD Inference does.
torch-neuronx and neuronx-distributed are imported lazily, only when a graph is really compiled,
so everything else here (plan, flags, manifest section) works on any machine.
"""
from __future__ import annotations

from pathlib import Path

from compile.buckets import GraphSpec
from compile.config import CompileConfig, ConfigError
from compile.neuron import flags, toolchain
from compile.neuron.graphs import COPY_SLOT, MODEL_BUILDER
from compile.neuron.plan import describe_plan  # noqa: F401  (the --dry-run entry, compile/__main__.py)


def require_toolchain() -> None:
    """Raise ConfigError (one line: what to install, where) when torch-neuronx or neuronx-distributed
    is not importable, or torch-neuronx is not from a supported Neuron SDK."""
    missing = toolchain.missing_toolchain()
    if missing:
        raise ConfigError(missing)
    unsupported = toolchain.unsupported_torch_neuronx(toolchain.installed_version(toolchain.TORCH_NEURONX))
    if unsupported:
        raise ConfigError(unsupported)


def toolchain_versions() -> dict[str, str]:
    """neuronx-cc, torch-neuronx and neuronx-distributed, for manifest.versions and the compile key."""
    return toolchain.toolchain_versions()


def keeps_full_weights(cfg: CompileConfig) -> bool:
    """tp = 1 binds weights/model.safetensors as rank 0; tp > 1 stores only the per-rank shards."""
    return cfg.tp_degree == 1


def write_weights(cfg: CompileConfig, ckpt, tmp_dir: Path) -> list[str]:
    """Validate the TP plan against the model, then (tp > 1) write one shard per rank."""
    flags.check_tp(cfg, ckpt.config)
    if cfg.tp_degree == 1:
        return []
    from compile.neuron.builder import write_rank_weights
    return write_rank_weights(cfg, ckpt.config, ckpt.weights, Path(tmp_dir))


def compile_graph(spec: GraphSpec, cfg: CompileConfig, ckpt, weights_list, graphs_dir: Path,
                  variant: str = "portable") -> str:
    """One bucket; returns its file name in graphs/. The weights never enter a graph (weights_list unused);
    neuron graphs are always the portable variant (variant unused)."""
    from compile.neuron.builder import compile_graph as compile_one
    return compile_one(spec, cfg, ckpt.config, Path(graphs_dir))


def manifest_section(cfg: CompileConfig) -> dict:
    """manifest.json["neuron"]: everything the server checks or needs beyond the common fields."""
    from compile.neuron.builder import NXD_MODEL_FILE, rank_weights_file
    versions = toolchain_versions()
    return {
        "neuron_target": cfg.neuron_target, "lnc": flags.LNC[cfg.neuron_target], "tp_degree": cfg.tp_degree,
        "neuron_sdk": toolchain.sdk_of(versions[toolchain.TORCH_NEURONX]),
        "neuron_sdk_supported": toolchain.SUPPORTED_SDK,
        "neuronx_cc": versions[toolchain.COMPILER], "torch_neuronx": versions[toolchain.TORCH_NEURONX],
        "neuronx_distributed": versions[toolchain.NXD],
        "tracer": MODEL_BUILDER,
        "compiler_args": {kind: flags.compiler_args(kind, cfg.neuron_target)
                          for kind in ("prefill", "prefill_chunk", "decode", COPY_SLOT.kind)},
        "hbm_per_core_gib": flags.HBM_PER_CORE_GIB[cfg.neuron_target],
        "nxd_model": f"graphs/{NXD_MODEL_FILE}",
        "copy_slot_tag": COPY_SLOT.name,
        # tp = 1: the stored weights file is rank 0's checkpoint (manifest.weights)
        "rank_weights": [rank_weights_file(r) for r in range(cfg.tp_degree)] if cfg.tp_degree > 1 else [],
    }


__all__ = ["compile_graph", "describe_plan", "keeps_full_weights", "manifest_section",
           "require_toolchain", "toolchain_versions", "write_weights"]
