"""Runs a neuron artifact's bucket graphs on NeuronCores (same contract as CpuRunner, interface.py).

The KV cache lives on the device, inside the graphs (compile/neuron/graphs.py): a graph receives
token ids, positions and a slot, updates the cache in place through input/output aliasing and
returns logits. What differs from CpuRunner is only where the cache is and how graphs are loaded:

- tp = 1 (torch_neuronx.trace): torch.jit.load per bucket, torch_neuronx.replace_weights with the
  one stored safetensors dict, torch_neuronx.move_trace_to_device; each graph owns its aliased cache
  state, so when the next call goes to another graph the latest cache is handed to it first
  (replace_weights with the cache tensors only). See docs/neuron.md for why and what it costs.
- tp > 1 (ModelBuilder): NxDModel.load, set_weights(per-rank shards), to_neuron; every bucket is a
  tag of one NxDModel sharing one set of cache buffers, called with forward(..., model_name=tag).

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

CACHE_KEYS = ("cache_k", "cache_v")


def check_host(manifest: Manifest, path: Path) -> None:
    """Refuse (ArtifactError, one line) an artifact this host cannot run: no torch-neuronx, another
    neuronx-cc / torch-neuronx version than it was compiled with, or another instance family."""
    from server.runner.artifact import NEURON_HINT
    where = Path(path) / "manifest.json"
    if not toolchain.importable("torch_neuronx"):
        raise ArtifactError(f"{where}: {NEURON_HINT}")
    section = manifest.neuron or {}
    for dist in (toolchain.COMPILER, toolchain.TORCH_NEURONX):
        built = manifest.versions.get(dist, "unknown")
        here = toolchain.installed_version(dist) or "not installed"
        if built != here:
            raise ArtifactError(f"{where}: {dist} expected {built} (the artifact was compiled with it), "
                                f"found {here} on this host; recompile the artifact here")
    if manifest.tp_degree > 1 and not toolchain.importable("neuronx_distributed"):
        raise ArtifactError(f"{where}: tp_degree {manifest.tp_degree} needs neuronx-distributed; {NEURON_HINT}")
    built_family, here_family = section.get("neuron_target"), toolchain.host_family()
    if here_family is not None and built_family != here_family:
        raise ArtifactError(f"{where}: instance family expected {built_family} (compiled with --neuron-target "
                            f"{built_family}), found {here_family}; recompile with --neuron-target {here_family}")


def count_cores(spec: str) -> int:
    """'3' -> 1, '0-3' -> 4 (NEURON_RT_VISIBLE_CORES: one index or an inclusive range)."""
    first, _, last = spec.strip().partition("-")
    return int(last) - int(first) + 1 if last else 1 if first.isdigit() else 0


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


class TracedGraphs:
    """tp = 1: one TorchScript module per bucket, weights bound once per graph, cache handed over."""

    def __init__(self, manifest: Manifest, path: Path):
        import torch_neuronx
        from safetensors.torch import load_file
        self._neuronx = torch_neuronx
        # NOTE: stored names are the traced module's parameter names, so the file binds as is.
        self.weights = load_file(str(path / manifest.weights[0]))
        self.graphs = {}
        for g in manifest.graphs:
            trace = torch.jit.load(str(path / g["file"]))
            torch_neuronx.replace_weights(trace, self.weights)
            torch_neuronx.move_trace_to_device(trace, 0)
            self.graphs[g["name"]] = trace
        self.version = 0                                   # bumps on every cache change
        self.seen = {name: 0 for name in self.graphs}      # cache version each graph's state holds
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None  # latest (cache_k, cache_v)

    def run(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        graph = self.graphs[name]
        if self.cache is not None and self.seen[name] != self.version:
            self._neuronx.replace_weights(graph, dict(zip(CACHE_KEYS, self.cache)))
        logits, cache_k, cache_v = graph(*inputs)
        self.version += 1
        self.cache, self.seen[name] = (cache_k, cache_v), self.version
        return logits

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if self.cache is None:
            return  # nothing written yet
        cache_k, cache_v = self.cache  # both [L, N, KV, P, D] (compile/model.py)
        cache_k[:, dst, :, :length] = cache_k[:, src, :, :length]
        cache_v[:, dst, :, :length] = cache_v[:, src, :, :length]
        self.version += 1


class NxdGraphs:
    """tp > 1: one NxDModel holding every bucket as a tag, over one set of cache buffers."""

    def __init__(self, manifest: Manifest, path: Path):
        from neuronx_distributed import NxDModel
        from safetensors.torch import load_file
        section = manifest.neuron
        self.tp_degree = manifest.tp_degree
        self.model = NxDModel.load(str(path / section["nxd_model"]))
        self.model.set_weights([load_file(str(path / f)) for f in section["rank_weights"]])
        self.model.to_neuron()

    def run(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.forward(*inputs, model_name=name)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        # NOTE: a host round trip of the cache per rank; a traced copy graph would avoid it.
        for rank in range(self.tp_degree):
            for key in CACHE_KEYS:
                t = self.model.read_from_neuron_buffer(key, rank)
                pos = t[:, :, :, :, :length] if key == "cache_k" else t[:, :, :, :length]
                pos[:, dst] = pos[:, src]
                self.model.write_to_neuron_buffer(t, key, rank)


class NeuronRunner(BucketedRunner):
    """ModelRunner for target neuron (see server/runner/interface.py for the contract)."""

    def __init__(self, manifest: Manifest, path: Path):
        path = Path(path)
        super().__init__(manifest)
        self.tp_degree = manifest.tp_degree
        self.cores = claim_cores(self.tp_degree)
        self.graphs = TracedGraphs(manifest, path) if self.tp_degree == 1 else NxdGraphs(manifest, path)

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> RunnerOutput:
        n = len(token_ids)
        kind, name, seq_len = self.prefill_graph(n, start_pos)
        # start_pos, last_index, slot as [1] tensors, the traced shapes (compile/neuron/graphs.py)
        scalars = tuple(torch.tensor([v], dtype=torch.int64) for v in (start_pos, n - 1, slot))
        ids = self.padded(token_ids, seq_len)
        logits, run = self.timed(kind, name, n, seq_len, lambda: self.graphs.run(name, ids, *scalars))
        return RunnerOutput(logits=logits, run=run)

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        n = len(token_ids)
        name, batch, _ = self.decode_graph(n, positions)
        # NOTE: padding rows write their K/V at the last position, which no graph ever reads
        # (compile/neuron/graphs.py), so slots n..batch-1 keep whatever they hold.
        ids = self.padded(token_ids, batch)
        pos = self.padded(positions, batch, fill=self.max_model_len - 1)
        logits, run = self.timed("decode", name, n, batch, lambda: self.graphs.run(name, ids, pos))
        return RunnerOutput(logits=logits[:n], run=run)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if src != dst and length > 0:
            with torch.inference_mode():  # the cache tensors came out of inference-mode calls
                self.graphs.copy_slot(src, dst, length)
