"""Runs a neuron artifact's graphs on NeuronCores (same contract as CpuRunner, interface.py).

The artifact holds ONE NxDModel (compile/neuron/builder.py) for every tp degree: a tag per bucket
and a copy_slot tag, over one set of weights (set_weights, once) and one KV state shared by every
tag. The cache lives on the device, inside the graphs (compile/neuron/graphs.py): a graph receives
token ids, positions and a slot, updates the state in place and returns logits only. Load is
NxDModel.load, set_weights(one state dict per rank), to_neuron; a call is
forward(*inputs, model_name=<tag>).

Nothing here has run on Neuron hardware; tests/neuron drive it against a recording double.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from compile.manifest import ArtifactError, Manifest
from compile.neuron import toolchain
from server.runner.bucketed import BucketedRunner
from server.runner.interface import RunnerOutput


NEURON_HINT = ("target neuron needs torch-neuronx and neuronx-distributed on a Neuron host (AWS Neuron package "
               "index, or a Neuron deep-learning-container image)")


def check_host(manifest: Manifest, path: Path) -> None:
    """Refuse (ArtifactError, one line) an artifact this host cannot run: no torch-neuronx or
    neuronx-distributed, another neuronx-cc / torch-neuronx / neuronx-distributed version than it was
    compiled with, or another instance family."""
    where = Path(path) / "manifest.json"
    for module in ("torch_neuronx", "neuronx_distributed"):
        if not toolchain.importable(module):
            raise ArtifactError(f"{where}: {NEURON_HINT} ({module} is not importable)")
    section = manifest.neuron or {}
    for dist in (toolchain.COMPILER, toolchain.TORCH_NEURONX, toolchain.NXD):
        built = manifest.versions.get(dist, "unknown")
        here = toolchain.installed_version(dist) or "not installed"
        if built != here:
            raise ArtifactError(f"{where}: {dist} expected {built} (the artifact was compiled with it), "
                                f"found {here} on this host; recompile the artifact here")
    built_family, here_family = section.get("neuron_target"), toolchain.host_family()
    if here_family is not None and built_family != here_family:
        raise ArtifactError(f"{where}: instance family expected {built_family} (compiled with --neuron-target "
                            f"{built_family}), found {here_family}; recompile with --neuron-target {here_family}")


def count_cores(spec: str) -> int:
    """Cores named by NEURON_RT_VISIBLE_CORES: '3' -> 1, '0-3' -> 4, '2,3' -> 2 (what the Kubernetes
    device plugin sets), '0-1,4,6-7' -> 5. Duplicates count once; anything unparsable -> 0."""
    cores: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            return 0
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            return 0
        cores.update(range(lo, hi + 1))
    return len(cores)


def claim_cores(tp_degree: int) -> str:
    """Respect NEURON_RT_VISIBLE_CORES (or NEURON_RT_NUM_CORES) when set; else set NEURON_RT_NUM_CORES=tp.

    Must run before the Neuron runtime starts: by default it grabs every core for this process.
    NOTE: the fallback asks for tp *free* cores rather than naming cores 0..tp-1: indices are
    instance-wide, so a fixed range would collide with a second replica on the same instance and
    with the cores a Kubernetes device plugin allocated (the Helm chart never sets the variable).
    """
    for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES"):
        value = os.environ.get(var)
        if value:
            found = count_cores(value) if var == "NEURON_RT_VISIBLE_CORES" else int(value)
            if found < tp_degree:
                raise ArtifactError(f"{var}={value} gives {found} NeuronCore(s), the artifact needs "
                                    f"tp_degree {tp_degree}; set {var} to a range of {tp_degree} cores")
            return f"{var}={value}"
    os.environ["NEURON_RT_NUM_CORES"] = str(tp_degree)
    return f"NEURON_RT_NUM_CORES={tp_degree}"


class NxdGraphs:
    """One NxDModel holding every bucket as a tag (plus the copy_slot tag), over one set of weights
    and one KV state on the device, for every tp degree."""

    def __init__(self, manifest: Manifest, path: Path):
        from neuronx_distributed import NxDModel
        section = manifest.neuron
        self.copy_tag = section["copy_slot_tag"]
        self.model = NxDModel.load(str(path / section["nxd_model"]))
        self.model.set_weights(rank_checkpoints(manifest, path))
        self.model.to_neuron()

    def run(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model.forward(*inputs, model_name=name)
        return out[0] if isinstance(out, (list, tuple)) else out  # the graph's one output: its logits

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """On the device: the copy_slot tag rewrites slot dst inside the shared state (no host copy)."""
        self.run(self.copy_tag, *(torch.tensor([v], dtype=torch.int64) for v in (src, dst, length)))


def rank_checkpoints(manifest: Manifest, path: Path) -> list[dict[str, torch.Tensor]]:
    """set_weights' argument: one state dict per rank, keyed by the traced module's names. tp = 1
    binds the stored checkpoint itself (a tied lm_head is the embedding under its own name)."""
    from safetensors.torch import load_file

    from compile.model import ModelConfig
    from compile.neuron.builder import full_checkpoint
    if manifest.tp_degree == 1:
        weights = load_file(str(path / manifest.weights[0]))
        return [full_checkpoint(ModelConfig.from_dict(manifest.model), weights)]
    return [load_file(str(path / f)) for f in manifest.neuron["rank_weights"]]


class NeuronRunner(BucketedRunner):
    """ModelRunner for target neuron (see server/runner/interface.py for the contract)."""

    def __init__(self, manifest: Manifest, path: Path):
        path = Path(path)
        super().__init__(manifest)
        self.tp_degree = manifest.tp_degree
        self.cores = claim_cores(self.tp_degree)
        self.graphs = NxdGraphs(manifest, path)

    def run_prefill(self, chunks: Sequence) -> RunnerOutput:
        """One prompt chunk per call (the neuron graphs take one sequence; see prefill_groups)."""
        (chunk,) = chunks
        return self.run_chunk(self.prefill_spec(len(chunk.token_ids), chunk.start_pos), chunk)

    def run_chunk(self, spec, chunk) -> RunnerOutput:
        """A whole prompt on its prefill graph, or a later chunk on a chunk graph (the graph slices the past
        span it reads from the shared state: compile/neuron/graphs.py)."""
        n, start = len(chunk.token_ids), chunk.start_pos
        # start_pos, last_index, slot as [1] tensors, the traced shapes (compile/neuron/graphs.py)
        scalars = tuple(torch.tensor([v], dtype=torch.int64) for v in (start, n - 1, chunk.slot))
        ids = self.padded(chunk.token_ids, spec.seq_len)
        logits, run = self.timed(spec.kind, spec.name, n, spec.seq_len,
                                 lambda: self.graphs.run(spec.name, ids, *scalars))
        return RunnerOutput(logits=logits, run=run)

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        n = len(token_ids)
        spec = self.decode_spec(n, positions)
        # NOTE: padding rows write their K/V at the last position, which no graph ever reads
        # (compile/neuron/graphs.py), so slots n..batch-1 keep whatever they hold.
        ids = self.padded(token_ids, spec.batch)
        pos = self.padded(positions, spec.batch, fill=self.max_model_len - 1)
        logits, run = self.timed("decode", spec.name, n, spec.batch, lambda: self.graphs.run(spec.name, ids, pos))
        return RunnerOutput(logits=logits[:n], run=run)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if src != dst and length > 0:
            with torch.inference_mode():
                self.graphs.copy_slot(src, dst, length)

    def warmup(self) -> None:
        super().warmup()                          # every bucket tag
        self.copy_slot(1 % self.num_slots, 0, 1)  # the copy tag too: nothing is first run while serving
