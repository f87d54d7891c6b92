"""Open an artifact for serving: the contract (compile.manifest.verify_contract), then the target
runner's own host check, the tokenizer, and the runner."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compile.manifest import ArtifactError, Manifest, verify_contract


@dataclass
class LoadedArtifact:
    path: Path
    manifest: Manifest
    runner: Any        # server.runner.interface.ModelRunner
    tokenizer: Any     # transformers PreTrainedTokenizerBase


def _runner_module(manifest: Manifest):
    if manifest.target == "neuron":
        from server.runner import neuron_runner as module
    else:
        from server.runner import cpu_runner as module
    return module


def verify_artifact(path: Path | str, checksums: bool = True) -> Manifest:
    """The contract, and that this host can run the artifact's target; raises ArtifactError."""
    manifest = verify_contract(path, checksums=checksums)
    from compile.model import ModelConfig
    try:
        ModelConfig.from_dict(manifest.model)
    except (ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"{Path(path) / 'manifest.json'}: {e}") from None
    _runner_module(manifest).check_host(manifest, Path(path))
    return manifest


def load_artifact(path: Path | str, checksums: bool = True) -> LoadedArtifact:
    from transformers import AutoTokenizer
    path = Path(path)
    manifest = verify_artifact(path, checksums=checksums)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path / 'tokenizer'}: cannot load tokenizer ({e})") from None
    module = _runner_module(manifest)
    runner = (module.NeuronRunner if manifest.target == "neuron" else module.CpuRunner)(manifest, path)
    return LoadedArtifact(path=path, manifest=manifest, runner=runner, tokenizer=tokenizer)
