"""The contract between the engine (scheduler) and whatever runs the bucket graphs.

The engine never touches the KV cache or graphs; it asks the runner for these four things.
Slot discipline (why decode takes no slot list): the cache is `num_slots` rows; a decode
batch of n sequences is always slots 0..n-1, so the graph reads a *view* of the cache with
no gather copy (see docs/benchmarks.md, "Design measurements"). When a sequence in the
middle finishes, the scheduler moves the last one into its slot with `copy_slot`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from server.engine.types import BucketRun


@dataclass
class RunnerOutput:
    logits: "object"   # torch.FloatTensor [num_rows, vocab_size], float32, padding rows removed
    run: BucketRun


class ModelRunner(Protocol):
    num_slots: int                      # KV cache rows (>= max_num_seqs)
    max_model_len: int                  # positions per slot
    vocab_size: int
    context_buckets: tuple[int, ...]    # prefill lengths, ascending
    batch_buckets: tuple[int, ...]      # decode batch sizes, ascending
    kv_buckets: tuple[int, ...]         # decode attention spans, ascending
    eos_token_ids: tuple[int, ...]

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> RunnerOutput:
        """Write K/V of `token_ids` at positions [start_pos, start_pos+len) of `slot` and return
        logits [1, V] of the last token. With start_pos == 0, len(token_ids) <= max(context_buckets);
        with start_pos > 0 (a later chunk of a long prompt), len(token_ids) <= max(context_buckets)
        and the chunk attends to the slot's cached positions [0, start_pos)."""

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        """One token for each of slots 0..n-1 (n = len(token_ids) <= max(batch_buckets)):
        token i sits at position positions[i] (== number of tokens already cached in slot i).
        Writes its K/V there and returns logits [n, V]."""

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot `src` into slot `dst`
        (compaction after a finish, and sharing a prefilled prompt between n > 1 choices)."""
