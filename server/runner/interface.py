"""The contract between the engine and whatever runs the bucket graphs.

The engine never touches the KV cache, the graphs or torch; each step it hands the runner one
plan (server.engine.scheduler.SchedulerOutput) and gets back the sampled tokens:

    execute(plan) -> ExecuteOutput(token_ids, logprobs, runs)

runs, in this order: the plan's slot copies; one decode graph for slots 0..d-1 (on cpu ragged graphs
the decode rows may instead ride the first prefill call, as one-token chunks); the prefill
chunks (a target may pack several prompts into one graph call), each chunk that completes a
prompt followed by copies of its slot into `fork_slots`; then the sampler over the logits of
plan.sampling_rows. Slot discipline (why decode takes no slot list): the cache is `num_slots`
rows (then the prefix cache's store rows, which only slot copies touch) and a decode batch of n
sequences is always slots 0..n-1, so the graph reads a *view* of
the cache with no gather copy (docs/benchmarks.md, "Design measurements").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.engine.types import BucketRun, ExecuteOutput


@dataclass
class RunnerOutput:
    """One graph call inside a runner: its logits and what it cost."""

    logits: "object"   # torch.FloatTensor [num_rows, vocab_size], float32, padding rows removed
    run: BucketRun


class ModelRunner(Protocol):
    num_slots: int                      # KV cache rows (>= max_num_seqs)
    max_model_len: int                  # positions per slot
    vocab_size: int
    context_buckets: tuple[int, ...]    # prefill lengths (tokens per call), ascending
    chunk_len: int                      # tokens of a later chunk of a long prompt (attends to the past)
    batch_buckets: tuple[int, ...]      # decode batch sizes, ascending
    kv_buckets: tuple[int, ...]         # decode attention spans, ascending
    eos_token_ids: tuple[int, ...]
    prefix_cache_rows: int              # cache rows num_slots.. kept for the prefix cache (0: none)

    def execute(self, plan) -> ExecuteOutput:
        """Run one SchedulerOutput (see the module docstring); returns one token per sampling row."""

    def warmup(self) -> None:
        """Run every graph once, before serving (first calls pay one-off costs), and leave the
        cache as if nothing ran."""
