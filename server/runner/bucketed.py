"""What every target's runner shares: the bucket shapes from the manifest, picking the graph
that fits a call, padding inputs to it, timing it, and warming every bucket up."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from compile.buckets import prefill_length, smallest_fitting
from compile.manifest import Manifest
from compile.model import ModelConfig
from server.engine.types import BucketRun


class BucketedRunner:
    def __init__(self, manifest: Manifest):
        self.model = ModelConfig.from_dict(manifest.model)
        self.num_slots = manifest.max_num_seqs
        self.max_model_len = manifest.max_model_len
        self.vocab_size = self.model.vocab_size
        self.context_buckets = tuple(manifest.buckets["context"])
        self.batch_buckets = tuple(manifest.buckets["batch"])
        self.kv_buckets = tuple(manifest.buckets["kv"])
        self.eos_token_ids = tuple(self.model.eos_token_ids)

    def prefill_graph(self, n: int, start_pos: int) -> tuple[str, str, int]:
        """(kind, graph name, padded length) for n prompt tokens starting at start_pos."""
        if not 0 < n <= self.context_buckets[-1] or start_pos + n > self.max_model_len:
            raise ValueError(f"prefill of {n} tokens at {start_pos} does not fit the buckets")
        seq_len = prefill_length(self.context_buckets, n, start_pos)
        if start_pos == 0:
            return "prefill", f"prefill_s{seq_len}", seq_len
        return "prefill_chunk", f"prefill_chunk_s{seq_len}_p{self.max_model_len}", seq_len

    def decode_graph(self, n: int, positions: Sequence[int]) -> tuple[str, int, int]:
        """(graph name, padded batch, KV span) for n sequences at these positions."""
        batch = smallest_fitting(self.batch_buckets, n)
        span = smallest_fitting(self.kv_buckets, max(max(positions), 1))
        return f"decode_b{batch}_k{span}", batch, span

    @staticmethod
    def padded(values: Sequence[int], length: int, fill: int = 0) -> torch.Tensor:
        out = torch.full((length,), fill, dtype=torch.int64)
        out[:len(values)] = torch.as_tensor(values, dtype=torch.int64)
        return out

    @staticmethod
    def timed(kind: str, name: str, real: int, computed: int, call: Callable[[], object]):
        """Run one graph call under inference mode; returns (its outputs, BucketRun)."""
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = call()
        return outputs, BucketRun(kind, name, real, computed - real, time.perf_counter() - start)

    def warmup(self) -> None:
        """Run every bucket graph once (first calls pay one-off costs; docs/neuron.md)."""
        for s in self.context_buckets:
            self.prefill(0, [0] * s, 0)
        if self.max_model_len > self.context_buckets[-1]:
            self.prefill(0, [0], self.max_model_len - 1)
        for b in self.batch_buckets:
            for k in self.kv_buckets:
                self.decode([0] * b, [min(k, self.max_model_len - 1)] * b)
