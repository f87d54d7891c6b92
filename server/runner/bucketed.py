"""What every target's runner shares: the graphs of the manifest (by GraphSpec), picking the one
that fits a call, padding inputs to it, timing it, and warming every graph up."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from compile.buckets import GraphSpec, smallest_fitting
from compile.manifest import Manifest
from compile.model import ModelConfig
from server.engine.types import BucketRun
from server.runner.executor import PlanExecutor
from server.runner.interface import RunnerOutput


@dataclass
class Chunk:
    """A prefill call's unit outside a plan (warm-up, tests, benchmarks): what PrefillChunk has."""

    slot: int
    token_ids: list[int]
    start_pos: int = 0
    is_last: bool = True
    fork_slots: tuple[int, ...] = ()

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


class BucketedRunner(PlanExecutor):
    def __init__(self, manifest: Manifest):
        super().__init__()
        self.model = ModelConfig.from_dict(manifest.model)
        self.num_slots = manifest.max_num_seqs
        self.max_model_len = manifest.max_model_len
        self.vocab_size = self.model.vocab_size
        self.context_buckets = tuple(manifest.buckets["context"])
        self.batch_buckets = tuple(manifest.buckets["batch"])
        self.kv_buckets = tuple(manifest.buckets["kv"])
        self.eos_token_ids = tuple(self.model.eos_token_ids)
        self.specs = [GraphSpec.from_dict(g) for g in manifest.graphs]
        self.chunk_specs = sorted(self.of_kind("prefill_chunk"), key=lambda s: (s.seq_len, s.kv_len))
        # cpu: packed prefills that also take prompts resuming after their slot's cached positions
        self.ragged = sorted(self.of_kind("prefill_ragged"), key=lambda s: s.seq_len)
        resumable = self.chunk_specs + self.ragged
        # tokens a later chunk of a long prompt may have (the scheduler cuts long prompts to it)
        self.chunk_len = max((s.seq_len for s in resumable), default=self.context_buckets[-1])
        # KV rows past num_slots that the prefix cache stores finished sequences in (cache rows
        # num_slots .. num_slots + prefix_cache_rows - 1); none without graphs to resume a prompt.
        self.prefix_cache_rows = manifest.prefix_cache_rows if resumable else 0

    def of_kind(self, kind: str) -> list[GraphSpec]:
        return [s for s in self.specs if s.kind == kind]

    @property
    def num_cache_rows(self) -> int:
        return self.num_slots + self.prefix_cache_rows

    def prefill_spec(self, n: int, start_pos: int) -> GraphSpec:
        """The one-prompt graph for n prompt tokens starting at start_pos (a chunk graph, with the smallest
        chunk and then the smallest past span that hold them, when start_pos > 0)."""
        if start_pos > 0:
            fitting = [s for s in self.chunk_specs if s.seq_len >= n and s.kv_len >= start_pos]
            if not fitting or start_pos + n > self.max_model_len:
                raise ValueError(f"a chunk of {n} tokens at {start_pos} does not fit the chunk graphs")
            return fitting[0]
        fitting = [s for s in self.of_kind("prefill") if s.seq_len >= n]
        if not fitting:
            raise ValueError(f"a prefill of {n} tokens does not fit the buckets")
        return min(fitting, key=lambda s: s.seq_len)

    def decode_spec(self, n: int, positions: Sequence[int]) -> GraphSpec:
        """The decode graph for n sequences at these positions."""
        return GraphSpec("decode", batch=smallest_fitting(self.batch_buckets, n),
                         kv_len=smallest_fitting(self.kv_buckets, max(max(positions), 1)))

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

    def run_chunk(self, spec: GraphSpec, chunk) -> RunnerOutput:
        """One chunk with start_pos > 0 on the chunk graph `spec` (prefill_spec picks it when serving)."""
        raise NotImplementedError

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int = 0) -> RunnerOutput:
        """One prompt chunk alone: logits [1, V] of its last token."""
        return self.run_prefill([Chunk(slot, list(token_ids), start_pos)])

    def warmup_calls(self, spec: GraphSpec) -> None:
        """Run `spec`'s graph once with inputs of its shape."""
        if spec.kind == "prefill":
            self.prefill(0, [0] * spec.seq_len)
        elif spec.kind == "prefill_chunk":
            self.run_chunk(spec, Chunk(0, [0] * spec.seq_len, min(spec.kv_len, self.max_model_len - spec.seq_len)))
        elif spec.kind == "decode":
            self.decode([0] * spec.batch, [min(spec.kv_len, self.max_model_len - 1)] * spec.batch)

    def warmup(self) -> None:
        """Run every graph once (first calls pay one-off costs; docs/neuron.md), then clear the cache."""
        for spec in self.specs:
            self.warmup_calls(spec)
        self.clear_cache()

    def clear_cache(self) -> None:
        """Leave the KV cache as if nothing ran (what warm-up wrote is garbage)."""
