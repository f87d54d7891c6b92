"""Runs the cpu target's bucket graphs over one shared weight copy and a preallocated KV cache."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from compile.manifest import Manifest
from server.runner.bucketed import BucketedRunner
from server.runner.interface import RunnerOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CpuRunner(BucketedRunner):
    """ModelRunner for target cpu (see server/runner/interface.py for the contract)."""

    def __init__(self, manifest: Manifest, path: Path):
        from safetensors.torch import load_file

        from compile.cpu_kernels import graph_weights
        from compile.cpu_target import load_graph
        super().__init__(manifest)
        dtype = DTYPES[manifest.dtype]
        # (the graph variant was checked against this host by server/runner/artifact.py)
        stored = load_file(str(path / manifest.weights[0]))
        self.weights = graph_weights(self.model, stored, manifest.graph_variant)
        del stored  # CPU_ONEDNN keeps packed copies; the plain ones they came from are freed
        self.graphs = {g["name"]: load_graph(path / g["file"]) for g in manifest.graphs}
        m = self.model
        # [L, slots, kv_heads, max_len, head_dim] for both: see compile/model.py
        shape = (m.num_layers, self.num_slots, m.num_kv_heads, self.max_model_len, m.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)

    def _run(self, kind: str, name: str, real: int, computed: int, *inputs):
        return self.timed(kind, name, real, computed, lambda: self.graphs[name](self.weights, *inputs))

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> RunnerOutput:
        n = len(token_ids)
        kind, name, seq_len = self.prefill_graph(n, start_pos)
        extra = (self.k_cache[:, slot], self.v_cache[:, slot]) if kind == "prefill_chunk" else ()
        (logits, new_k, new_v), run = self._run(
            kind, name, n, seq_len, self.padded(token_ids, seq_len), torch.tensor(start_pos), torch.tensor(n - 1),
            *extra)
        self.k_cache[:, slot, :, start_pos:start_pos + n] = new_k[:, :, :n]
        self.v_cache[:, slot, :, start_pos:start_pos + n] = new_v[:, :, :n]
        return RunnerOutput(logits=logits, run=run)

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        n = len(token_ids)
        name, batch, span = self.decode_graph(n, positions)
        pos = self.padded(positions, batch)
        # NOTE: slots 0..batch-1 as a view: no gather copy of the cache (docs/benchmarks.md).
        k_span = self.k_cache[:, :batch, :, :span]
        v_span = self.v_cache[:, :batch, :, :span]
        (logits, new_k, new_v), run = self._run("decode", name, n, batch, self.padded(token_ids, batch), pos,
                                                k_span, v_span)
        rows, at = torch.arange(n), pos[:n]
        self.k_cache[:, rows, :, at] = new_k[:, :n].permute(1, 0, 2, 3)
        self.v_cache[:, rows, :, at] = new_v[:, :n].permute(1, 0, 2, 3)
        return RunnerOutput(logits=logits[:n], run=run)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if src != dst and length > 0:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def warmup(self) -> None:
        super().warmup()
        self.k_cache.zero_()
        self.v_cache.zero_()
