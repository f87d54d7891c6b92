"""manifest.json: the only contract between `compile` (writer) and `server` (reader).

Kept free of build code and torch so the server (and the Helm tests) can read it cheaply.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
# The graphs' calling convention (inputs, outputs, KV cache layout). Bump it whenever
# compile/model.py changes what a bucket graph takes or returns: an artifact built for another
# ABI would pass its checksums and then fail (or compute garbage) at warm-up.
GRAPH_ABI = 5
MANIFEST_NAME = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact that must not be served; the message is one line naming the file and the difference."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    format_version: int
    model: dict[str, Any]             # compile.model.ModelConfig.to_dict()
    target: str                       # "cpu" | "neuron"
    dtype: str
    tp_degree: int
    buckets: dict[str, list[int]]     # context, batch, kv
    max_num_seqs: int
    max_model_len: int
    graphs: list[dict[str, Any]]      # GraphSpec.to_dict() + "file"
    weights: list[str]                # weight files, relative
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "size"}
    source: dict[str, Any]            # checkpoint name, sha256
    versions: dict[str, Any]          # torch, transformers, kiln, compiler...
    compile_key: str                  # hash of source + compile config; equal key = same artifact
    timings: dict[str, float] = field(default_factory=dict)
    neuron: dict[str, Any] = field(default_factory=dict)  # neuron target, lnc, compiler args
    graph_variant: str = "portable"   # compile.model.GRAPH_VARIANTS: the weight list the graphs take
    prefix_cache_rows: int = 0        # KV rows past max_num_seqs for the prefix cache (0: none)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, artifact_dir: Path) -> "Manifest":
        path = Path(artifact_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (not a Kiln artifact, or an unfinished compile)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: unreadable JSON ({e})") from None
        found = raw.get("format_version") if isinstance(raw, dict) else None
        if found != FORMAT_VERSION:
            raise ArtifactError(f"{path}: format_version expected {FORMAT_VERSION}, found {found}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ArtifactError(f"{path}: malformed manifest ({e})") from None

    def check_graph_abi(self, artifact_dir: Path) -> None:
        found = self.versions.get("graph_abi")
        if found != GRAPH_ABI:
            raise ArtifactError(f"{Path(artifact_dir) / MANIFEST_NAME}: graph_abi expected {GRAPH_ABI}, found {found} "
                                f"(built by another Kiln version); recompile the artifact")

    def verify_files(self, artifact_dir: Path, checksums: bool = True) -> None:
        """Every listed file exists with its size and (optionally) sha256; nothing is unlisted."""
        root = Path(artifact_dir)
        for rel, meta in sorted(self.files.items()):
            path = root / rel
            if not path.is_file():
                raise ArtifactError(f"{path}: missing (listed in {MANIFEST_NAME})")
            size = path.stat().st_size
            if size != meta["size"]:
                raise ArtifactError(f"{path}: size expected {meta['size']} bytes, found {size}")
            if checksums:
                found = sha256_file(path)
                if found != meta["sha256"]:
                    raise ArtifactError(f"{path}: sha256 expected {meta['sha256'][:16]}..., found {found[:16]}...")
        listed = {str(Path(r)) for r in self.files} | {MANIFEST_NAME}
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root))
            if path.is_file() and rel not in listed:
                raise ArtifactError(f"{path}: not listed in {MANIFEST_NAME} (unexpected file in the artifact)")


def list_files(artifact_dir: Path) -> dict[str, dict[str, Any]]:
    root = Path(artifact_dir)
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def verify_contract(path: Path | str, checksums: bool = True) -> Manifest:
    """What the artifact contract promises, whatever the host: format and graph ABI, a known target and
    graph variant, graph entries that name their shapes, every file with its size (and sha256).
    Whether this host can run it is each target runner's own check (server/runner/artifact.py)."""
    from compile.buckets import GraphSpec
    from compile.config import TARGETS
    from compile.model import GRAPH_VARIANTS, PORTABLE
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact folder")
    manifest = Manifest.read(path)
    manifest.check_graph_abi(path)
    where = path / MANIFEST_NAME
    if manifest.target not in TARGETS:
        raise ArtifactError(f"{where}: target expected one of {', '.join(TARGETS)}, found {manifest.target!r}")
    variant = manifest.graph_variant
    if variant not in GRAPH_VARIANTS or (manifest.target != "cpu" and variant != PORTABLE):
        raise ArtifactError(f"{where}: graph_variant {variant!r} is not one this Kiln runs "
                            f"for target {manifest.target!r}; recompile the artifact")
    for graph in manifest.graphs:
        try:
            GraphSpec.from_dict(graph)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed graph entry {graph!r} ({e})") from None
    manifest.verify_files(path, checksums=checksums)
    return manifest
