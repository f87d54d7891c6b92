"""Runs the cpu target's bucket graphs over one shared weight copy and a preallocated KV cache."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from compile.buckets import smallest_fitting
from compile.manifest import Manifest
from compile.model import ModelConfig, weight_names
from server.engine.types import BucketRun
from server.runner.interface import RunnerOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CpuRunner:
    """ModelRunner for target cpu (see server/runner/interface.py for the contract)."""

    def __init__(self, manifest: Manifest, path: Path):
        from safetensors.torch import load_file

        from compile.cpu_target import load_graph
        self.model = ModelConfig.from_dict(manifest.model)
        stored = load_file(str(path / manifest.weights[0]))
        self.weights = [stored[n] for n in weight_names(self.model)]
        self.graphs = {g["name"]: load_graph(path / g["file"]) for g in manifest.graphs}
        self.num_slots = manifest.max_num_seqs
        self.max_model_len = manifest.max_model_len
        self.vocab_size = self.model.vocab_size
        self.context_buckets = tuple(manifest.buckets["context"])
        self.batch_buckets = tuple(manifest.buckets["batch"])
        self.kv_buckets = tuple(manifest.buckets["kv"])
        self.eos_token_ids = tuple(self.model.eos_token_ids)
        m = self.model
        dtype = DTYPES[manifest.dtype]
        # keys transposed ([.., head_dim, max_len]): see compile/model.py
        self.k_cache = torch.zeros(m.num_layers, self.num_slots, m.num_kv_heads, m.head_dim, self.max_model_len,
                                   dtype=dtype)
        self.v_cache = torch.zeros(m.num_layers, self.num_slots, m.num_kv_heads, self.max_model_len, m.head_dim,
                                   dtype=dtype)

    def _run(self, kind: str, name: str, real: int, computed: int, *inputs):
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = self.graphs[name](self.weights, *inputs)
        seconds = time.perf_counter() - start
        return outputs, BucketRun(kind, name, real, computed - real, seconds)

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> RunnerOutput:
        n = len(token_ids)
        if not 0 < n <= self.context_buckets[-1] or start_pos + n > self.max_model_len:
            raise ValueError(f"prefill of {n} tokens at {start_pos} does not fit the buckets")
        if start_pos == 0:
            seq_len = smallest_fitting(self.context_buckets, n)
            kind, name, extra = "prefill", f"prefill_s{seq_len}", ()
        else:
            seq_len = self.context_buckets[-1]
            kind, name = "prefill_chunk", f"prefill_chunk_s{seq_len}_p{self.max_model_len}"
            extra = (self.k_cache[:, slot], self.v_cache[:, slot])
        ids = torch.zeros(seq_len, dtype=torch.int64)
        ids[:n] = torch.as_tensor(token_ids, dtype=torch.int64)
        (logits, new_k, new_v), run = self._run(
            kind, name, n, seq_len, ids, torch.tensor(start_pos), torch.tensor(n - 1), *extra)
        self.k_cache[:, slot, :, :, start_pos:start_pos + n] = new_k[:, :, :n].transpose(2, 3)
        self.v_cache[:, slot, :, start_pos:start_pos + n] = new_v[:, :, :n]
        return RunnerOutput(logits=logits, run=run)

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        n = len(token_ids)
        batch = smallest_fitting(self.batch_buckets, n)
        span = smallest_fitting(self.kv_buckets, max(max(positions), 1))
        ids = torch.zeros(batch, dtype=torch.int64)
        pos = torch.zeros(batch, dtype=torch.int64)
        ids[:n] = torch.as_tensor(token_ids, dtype=torch.int64)
        pos[:n] = torch.as_tensor(positions, dtype=torch.int64)
        # NOTE: slots 0..batch-1 as a view: no gather copy of the cache (DESIGN.md).
        k_span = self.k_cache[:, :batch, :, :, :span]
        v_span = self.v_cache[:, :batch, :, :span]
        (logits, new_k, new_v), run = self._run(
            "decode", f"decode_b{batch}_k{span}", n, batch, ids, pos, k_span, v_span)
        rows, at = torch.arange(n), pos[:n]
        self.k_cache[:, rows, :, :, at] = new_k[:, :n].permute(1, 0, 2, 3)
        self.v_cache[:, rows, :, at] = new_v[:, :n].permute(1, 0, 2, 3)
        return RunnerOutput(logits=logits[:n], run=run)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if src != dst and length > 0:
            self.k_cache[:, dst, :, :, :length] = self.k_cache[:, src, :, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def warmup(self) -> None:
        """Run every bucket graph once (first calls pay one-off allocation costs)."""
        for s in self.context_buckets:
            self.prefill(0, [0] * s, 0)
        if self.max_model_len > self.context_buckets[-1]:
            self.prefill(0, [0], self.max_model_len - 1)
        for b in self.batch_buckets:
            for k in self.kv_buckets:
                self.decode([0] * b, [min(k, self.max_model_len - 1)] * b)
        self.k_cache.zero_()
        self.v_cache.zero_()
