"""neuron target: the backend compile/export.py calls for --target neuron (and --dry-run on any target).

`python -m compile --target neuron --neuron-target inf2|trn1|trn2 --tp-degree N`:
- tp = 1: torch_neuronx.trace per bucket (compile/neuron/trace.py)
- tp > 1: NxD Core ModelBuilder, one tag per bucket, checkpoint sharded per rank (compile/neuron/parallel.py)
torch-neuronx and neuronx-distributed are imported lazily, only when a graph is really compiled,
so everything else here (plan, flags, manifest section) works on any machine.
"""
from __future__ import annotations

from pathlib import Path

from compile.buckets import GraphSpec
from compile.config import CompileConfig, ConfigError
from compile.neuron import flags, toolchain
from compile.neuron.graphs import MODEL_BUILDER, TRACE
from compile.neuron.plan import describe_plan  # noqa: F401  (the --dry-run entry, compile/__main__.py)


def require_toolchain() -> None:
    """Raise ConfigError (one line: what to install, where) when torch-neuronx is not importable."""
    missing = toolchain.missing_toolchain()
    if missing:
        raise ConfigError(missing)


def toolchain_versions() -> dict[str, str]:
    """neuronx-cc, torch-neuronx (and neuronx-distributed when installed) for manifest.versions."""
    found = toolchain.toolchain_versions()
    nxd = toolchain.installed_version(toolchain.NXD)
    if nxd:
        found[toolchain.NXD] = nxd
    return found


def keeps_full_weights(cfg: CompileConfig) -> bool:
    """tp = 1 binds weights/model.safetensors; tp > 1 stores only the per-rank shards."""
    return cfg.tp_degree == 1


def write_weights(cfg: CompileConfig, ckpt, tmp_dir: Path) -> list[str]:
    """Validate the TP plan against the model, then (tp > 1) write one shard per rank."""
    flags.check_tp(cfg, ckpt.config)
    if cfg.tp_degree == 1:
        return []
    missing = toolchain.missing_toolchain(cfg.tp_degree)
    if missing:
        raise ConfigError(missing)
    from compile.neuron.parallel import write_rank_weights
    return write_rank_weights(cfg, ckpt.config, ckpt.weights, Path(tmp_dir))


def compile_graph(spec: GraphSpec, cfg: CompileConfig, ckpt, weights_list, graphs_dir: Path,
                  variant: str = "portable") -> str:
    """One bucket; returns its file name in graphs/. The weights never enter a graph (weights_list unused);
    neuron graphs are always the portable variant (variant unused)."""
    if cfg.tp_degree == 1:
        from compile.neuron.trace import compile_graph as compile_one
    else:
        from compile.neuron.parallel import compile_graph as compile_one
    return compile_one(spec, cfg, ckpt.config, Path(graphs_dir))


def manifest_section(cfg: CompileConfig) -> dict:
    """manifest.json["neuron"]: everything the server checks or needs beyond the common fields."""
    versions = toolchain_versions()
    section = {
        "neuron_target": cfg.neuron_target, "lnc": flags.LNC[cfg.neuron_target], "tp_degree": cfg.tp_degree,
        "neuronx_cc": versions[toolchain.COMPILER], "torch_neuronx": versions[toolchain.TORCH_NEURONX],
        "tracer": TRACE if cfg.tp_degree == 1 else MODEL_BUILDER,
        "compiler_args": {kind: flags.compiler_args(kind, cfg.neuron_target)
                          for kind in ("prefill", "prefill_chunk", "decode")},
        "hbm_per_core_gib": flags.HBM_PER_CORE_GIB[cfg.neuron_target],
    }
    if cfg.tp_degree > 1:
        from compile.neuron.parallel import NXD_MODEL_FILE, rank_weights_file
        section["neuronx_distributed"] = versions.get(toolchain.NXD, "unknown")
        section["nxd_model"] = f"graphs/{NXD_MODEL_FILE}"
        section["rank_weights"] = [rank_weights_file(r) for r in range(cfg.tp_degree)]
    return section


__all__ = ["compile_graph", "describe_plan", "keeps_full_weights", "manifest_section",
           "require_toolchain", "toolchain_versions", "write_weights"]
