"""Continuous-batching policy: FCFS admission into KV slots, chunked prefill, decode every step.

No torch here: the scheduler sees bucket sizes only as numbers, so it is tested with a fake
runner. One step's plan is a SchedulerOutput: the decode batch (every decoding sequence,
slots 0..d-1) plus prefill chunks. Rules:

- A prompt is prefilled in chunks of `chunk_size` (the largest context bucket within the
  per-step prefill budget); one that fits a bucket runs as one chunk at the smallest bucket
  that fits. Chunks are charged to the budget at their padded (bucket) size.
- While sequences are decoding, at most `max_prefills_while_decoding` chunks join a step, so
  a decode never waits behind more than that (inter-token latency) and the oldest waiting
  prompt advances every step (time to first token). With nothing decoding, prefills fill
  the budget.
- Prefills run strictly in arrival order, so at most one sequence is mid-prefill at a step
  boundary and it always finishes before the next one starts (see kv_cache.py's layout).
- A request with n choices is admitted only when n slots are free: choice 0 prefills,
  the others are reserved and receive its cache by copy_slot when its last chunk has run.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

from compile.buckets import prefill_length
from server.engine.config import EngineConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.request import Request, Sequence, SequenceStatus
from server.engine.types import QueueFullError


@dataclass
class PrefillChunk:
    seq: Sequence
    slot: int
    token_ids: list[int]
    start_pos: int
    is_last: bool                                        # the prompt is complete after it
    forks: list[Sequence] = field(default_factory=list)  # choices 1..n-1, copied after it ran

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class DecodeBatch:
    seqs: list[Sequence] = field(default_factory=list)   # seqs[i] sits in slot i
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    decode: DecodeBatch
    prefills: list[PrefillChunk]

    @property
    def is_empty(self) -> bool:
        return not self.decode.seqs and not self.prefills


class Scheduler:
    def __init__(self, config: EngineConfig, context_buckets: Seq[int], kv: KVCacheManager):
        assert config.is_resolved, "resolve the EngineConfig against the runner first"
        self.max_num_queued_reqs = config.max_num_queued_reqs
        self.max_prefill_tokens = config.max_prefill_tokens_per_step
        self.max_prefills_while_decoding = config.max_prefills_while_decoding
        self.context_buckets = sorted(context_buckets)
        fitting = [b for b in self.context_buckets if b <= self.max_prefill_tokens]
        self.chunk_size = fitting[-1]
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}   # requests holding (or reserving) slots
        self.prefilling: Optional[Sequence] = None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.max_num_queued_reqs:
            raise QueueFullError(f"the waiting queue is full ({self.max_num_queued_reqs} requests)")
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        decode = DecodeBatch()
        for seq in self.kv.decoding():
            decode.seqs.append(seq)
            decode.token_ids.append(seq.last_token_id)
            decode.positions.append(seq.num_computed_tokens)
            seq.num_computed_tokens += 1
        max_chunks = self.max_prefills_while_decoding if decode.seqs else None
        budget = self.max_prefill_tokens
        prefills: list[PrefillChunk] = []
        while max_chunks is None or len(prefills) < max_chunks:
            seq = self.prefilling
            if seq is None:
                if not self.waiting or not self._can_admit(self.waiting[0]):
                    break
                seq = self.waiting[0].seqs[0]
            start = seq.num_computed_tokens
            cost = prefill_length(self.context_buckets, min(self.chunk_size, seq.num_prompt_tokens - start), start)
            if prefills and cost > budget:
                break
            budget -= cost
            if seq is not self.prefilling:
                self._admit(self.waiting.popleft())
            prefills.append(self._next_chunk(seq))
        return SchedulerOutput(decode=decode, prefills=prefills)

    def finish(self, seqs: Seq[Sequence]) -> None:
        """Free the slots of finished sequences (their status already says FINISHED)."""
        self.kv.free(seqs)
        for seq in seqs:
            request = seq.request
            if request.is_finished:
                self.running.pop(request.request_id, None)

    def abort(self, request: Request) -> None:
        """Drop a request wherever it is: waiting, prefilling, or decoding."""
        if request.request_id not in self.running:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
            return
        head = request.seqs[0]
        if head.status is SequenceStatus.PREFILLING:
            self.kv.release_reserved(request.n - 1)
            if self.prefilling is head:
                self.prefilling = None
        self.kv.free([seq for seq in request.seqs if seq.slot is not None])
        self.running.pop(request.request_id, None)

    def _can_admit(self, request: Request) -> bool:
        return self.kv.can_allocate(request.n)

    def _admit(self, request: Request) -> None:
        head = request.seqs[0]
        self.kv.allocate(head, num_reserved=request.n - 1)
        head.status = SequenceStatus.PREFILLING
        request.times.scheduled = time.monotonic()
        self.running[request.request_id] = request
        self.prefilling = head

    def _next_chunk(self, seq: Sequence) -> PrefillChunk:
        start = seq.num_computed_tokens
        end = min(start + self.chunk_size, seq.num_prompt_tokens)
        chunk = PrefillChunk(seq=seq, slot=seq.slot, token_ids=seq.prompt_token_ids[start:end],
                             start_pos=start, is_last=end == seq.num_prompt_tokens)
        seq.num_computed_tokens = end
        if chunk.is_last:
            chunk.forks = seq.request.seqs[1:]
            self.kv.promote(seq, chunk.forks)
            for s in (seq, *chunk.forks):
                s.status = SequenceStatus.RUNNING
                s.num_computed_tokens = end
            self.prefilling = None
        return chunk
