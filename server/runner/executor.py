"""runner.execute(plan), shared by every runner: slot copies, decode, prefill, then sampling.

A runner provides the primitives (copy_slot, decode, and run_prefill for a group of chunks that
one graph call takes); how chunks are grouped is the runner's own choice (prefill_groups: one
per call by default, packed on the cpu target), and so is whether the decode rows run in a decode
graph or ride the first prefill call as one-token chunks (fused_decode: cpu ragged graphs). Rows of
logits are gathered in the order of plan.sampling_rows: decode rows, then each completed prompt for
its sequence and its forks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from server.engine.types import BucketRun, ExecuteOutput
from server.runner.interface import RunnerOutput
from server.runner.sampler import Sampler


class PlanExecutor:
    def __init__(self) -> None:
        self.sampler = Sampler()

    # ---- primitives a runner provides -------------------------------------------------------
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        raise NotImplementedError

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        raise NotImplementedError

    def run_prefill(self, chunks: Sequence) -> RunnerOutput:
        """Prefill these chunks (objects with slot, token_ids, start_pos) in one graph call;
        logits [len(chunks), V], row i for the last token of chunk i."""
        raise NotImplementedError

    def prefill_groups(self, chunks: Sequence) -> list[list]:
        """How the step's chunks map onto graph calls (in order)."""
        return [[chunk] for chunk in chunks]

    def fused_decode(self, decode, group: Sequence) -> Optional[list]:
        """The step's decode rows as one-token chunks ahead of its first prefill group, to run as one call
        where the runner can and it costs less than a decode call of their own; None: apart (the default)."""
        return None

    # ---- the step -----------------------------------------------------------------------------
    def execute(self, plan) -> ExecuteOutput:
        runs: list[BucketRun] = []
        logits: list[torch.Tensor] = []
        with torch.inference_mode():
            for copy in plan.copies:
                self.copy_slot(copy.src, copy.dst, copy.length)
            groups = self.prefill_groups(plan.prefills)
            fused = self.fused_decode(plan.decode, groups[0]) if plan.decode.seqs and groups else None
            if fused is not None:  # decode rows first: their logits rows come first, as sampling_rows has them
                groups[0] = fused
            elif plan.decode.seqs:
                out = self.decode(plan.decode.token_ids, plan.decode.positions)
                runs.append(out.run)
                logits.append(out.logits)
            for group in groups:
                out = self.run_prefill(group)
                runs.append(out.run)
                for row, chunk in enumerate(group):
                    if not chunk.is_last:
                        continue
                    for dst in chunk.fork_slots:
                        self.copy_slot(chunk.slot, dst, chunk.end_pos)
                    logits.append(out.logits[row:row + 1].expand(1 + len(chunk.fork_slots), -1))
        self.sampler.release(plan.released)
        if not plan.sampling_rows:
            return ExecuteOutput([], [], runs)
        sampled = self.sampler.sample(torch.cat(logits), plan.sampling_rows, plan.logprobs_mode,
                                      plan.token_masks)
        return ExecuteOutput(sampled.token_ids, sampled.logprobs, runs, sampled.failed_rows)
