"""Open an artifact for serving: verify it, load the tokenizer, build the runner for its target."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compile.manifest import ArtifactError, Manifest

NEURON_HINT = ("target neuron needs torch-neuronx and neuronx-distributed on a Neuron host (AWS Neuron package "
               "index, or a Neuron deep-learning-container image)")


@dataclass
class LoadedArtifact:
    path: Path
    manifest: Manifest
    runner: Any        # server.runner.interface.ModelRunner
    tokenizer: Any     # transformers PreTrainedTokenizerBase


def check_target(manifest: Manifest, path: Path) -> None:
    from compile.model import CPU_ONEDNN, GRAPH_VARIANTS, PORTABLE
    if manifest.target not in ("cpu", "neuron"):
        raise ArtifactError(f"{path / 'manifest.json'}: target expected cpu or neuron, found {manifest.target!r}")
    variant = manifest.graph_variant
    if variant not in GRAPH_VARIANTS or (manifest.target != "cpu" and variant != PORTABLE):
        raise ArtifactError(f"{path / 'manifest.json'}: graph_variant {variant!r} is not one this Kiln runs "
                            f"for target {manifest.target!r}; recompile the artifact")
    if manifest.target == "cpu":
        import torch
        built, here = manifest.versions.get("torch", "?"), torch.__version__
        if built.split(".")[:2] != here.split(".")[:2]:
            raise ArtifactError(f"{path / 'manifest.json'}: graphs exported with torch {built}, "
                                f"this host has torch {here}; recompile the artifact here")
        if variant == CPU_ONEDNN:
            from compile.cpu_kernels import onednn_problem
            if problem := onednn_problem(getattr(torch, manifest.dtype)):
                raise ArtifactError(f"{path / 'manifest.json'}: graphs compiled with --cpu-kernels {CPU_ONEDNN}, "
                                    f"but {problem}; recompile with --cpu-kernels portable")
    else:
        from server.runner import neuron_runner
        neuron_runner.check_host(manifest, path)


def verify_artifact(path: Path | str, checksums: bool = True) -> Manifest:
    """Format version, target usable on this host, sizes and checksums; raises ArtifactError."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact folder")
    manifest = Manifest.read(path)
    manifest.check_graph_abi(path)
    check_target(manifest, path)
    manifest.verify_files(path, checksums=checksums)
    return manifest


def load_artifact(path: Path | str, checksums: bool = True) -> LoadedArtifact:
    from transformers import AutoTokenizer
    path = Path(path)
    manifest = verify_artifact(path, checksums=checksums)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path / 'tokenizer'}: cannot load tokenizer ({e})") from None
    if manifest.target == "neuron":
        from server.runner.neuron_runner import NeuronRunner as Runner
    else:
        from server.runner.cpu_runner import CpuRunner as Runner
    return LoadedArtifact(path=path, manifest=manifest, runner=Runner(manifest, path), tokenizer=tokenizer)
