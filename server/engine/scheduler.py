"""Continuous-batching policy: FCFS admission into KV slots, a per-step prefill token budget,
decode every step.

No torch here: the scheduler sees the runner only as numbers. One step's plan is a
SchedulerOutput, which the runner executes whole (runner.execute):

1. `copies`: compaction moves recorded since the last step (kv_cache.py), run first, in order;
2. `decode`: every decoding sequence, slots 0..d-1;
3. `prefills`: prompt chunks, in arrival order; a chunk that completes its prompt is followed by
   copies of the slot into its request's other choices (`fork_slots`, for n > 1).

Rules:
- Prefill tokens per step are bounded by `max_num_batched_tokens` (vLLM's flag of that name;
  here decode rows are not counted, they run in their own graph). Whole prompts are packed into
  the budget in arrival order. The step's first prompt always advances: if it is longer than the
  budget it is cut, and its rest continues in later steps as chunks of at most `chunk_len` tokens
  that attend to the slot's past. A later prompt that does not fit waits for the next step rather
  than being cut (a cut leaves a short remainder that would run padded to a whole chunk graph).
  So a running stream never waits behind more than one budget's worth of prefill between two
  tokens, and the oldest waiting prompt advances every step.
- Only the step's first prompt is ever cut, so at most one sequence is mid-prefill at a step
  boundary and it always finishes before the next one starts (see kv_cache.py's layout).
- A request with n choices is admitted only when n slots are free: choice 0 prefills, the
  others are reserved and receive its cache by copy once its last chunk has run.
- Prefix cache (prefix_cache.py): at admission the longest cached prefix of the prompt is copied
  into the new slot (a copy appended to this step's `copies`, after those recorded before it) and
  only the rest is prefilled, as a chunk after it; only the rest counts against the budget. A
  prompt's K/V go to a store row once its last chunk has run (store_prompts), and a sequence that
  finishes with stop or length leaves its outputs' K/V too (a copy recorded before the compaction
  copies that may reuse its slot). Store copies run at the head of the next step, so a request
  admitted in the same step as the prompt completes cannot match it yet.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

from server.engine.config import EngineConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.prefix_cache import PrefixCache, PrefixHit
from server.engine.request import Request, Sequence, SequenceStatus
from server.engine.structured import TokenMasks
from server.engine.types import FinishReason, QueueFullError, SamplingRow, SlotCopy


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

    @property
    def fork_slots(self) -> list[int]:
        return [child.slot for child in self.forks]


@dataclass
class DecodeBatch:
    seqs: list[Sequence] = field(default_factory=list)   # seqs[i] sits in slot i
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """One step for runner.execute. `sampling_rows` (filled by the engine) has one row per
    sequence that samples this step: the decode rows, then for each chunk that completes its
    prompt its sequence and its forks. `released` names sequences that finished since the last
    step (the runner drops their sampler state). `token_masks`: the allowed tokens of the rows
    under a structured-output constraint (structured.TokenMasks), applied before sampling."""

    copies: list[SlotCopy]
    decode: DecodeBatch
    prefills: list[PrefillChunk]
    sampling_rows: list[SamplingRow] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    logprobs_mode: str = "raw"
    token_masks: Optional[TokenMasks] = None

    @property
    def is_empty(self) -> bool:
        return not self.copies and not self.decode.seqs and not self.prefills

    def sampled_seqs(self) -> list[Sequence]:
        """The sequences sampling_rows stand for, in the same order."""
        seqs = list(self.decode.seqs)
        for chunk in self.prefills:
            if chunk.is_last:
                seqs += [chunk.seq, *chunk.forks]
        return seqs

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.prefills)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, chunk_len: int,
                 prefix: Optional[PrefixCache] = None):
        assert config.is_resolved, "resolve the EngineConfig against the runner first"
        self.prefix = prefix or PrefixCache(first_slot=kv.num_slots, num_rows=0)
        self.max_num_queued_reqs = config.max_num_queued_reqs
        self.token_budget = config.max_num_batched_tokens
        self.chunk_len = chunk_len      # tokens of a later chunk (runner.chunk_len)
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
        copies = self.kv.take_copies()
        decode = DecodeBatch()
        for seq in self.kv.decoding():
            decode.seqs.append(seq)
            decode.token_ids.append(seq.last_token_id)
            decode.positions.append(seq.num_computed_tokens)
            seq.num_computed_tokens += 1
        budget = self.token_budget
        prefills: list[PrefillChunk] = []
        while budget > 0:
            seq = self.prefilling
            if seq is None:
                if not self.waiting or not self.kv.can_allocate(self.waiting[0].n):
                    break
                request = self.waiting[0]
                hit = self.prefix.lookup(request.prompt_token_ids)
                if prefills and request.num_prompt_tokens - (hit.length if hit else 0) > budget:
                    break   # whole prompts only after the first (see the module docstring)
                seq = self._admit(self.waiting.popleft(), hit, copies)
            limit = budget if seq.num_computed_tokens == 0 else min(budget, self.chunk_len)
            chunk = self._next_chunk(seq, limit)
            budget -= len(chunk.token_ids)
            prefills.append(chunk)
        return SchedulerOutput(copies=copies, decode=decode, prefills=prefills)

    def store_prompts(self, prefills: Seq[PrefillChunk]) -> None:
        """After a step ran: keep the K/V of the prompts it completed in the prefix cache, so requests
        admitted from the next step on find them (the sequence's finish stores its outputs too)."""
        for chunk in prefills:
            seq = chunk.seq
            if chunk.is_last and seq.slot is not None and seq.finish_reason is not FinishReason.ERROR:
                self._store(seq.prompt_token_ids, seq.slot)

    def finish(self, seqs: Seq[Sequence]) -> None:
        """Free the slots of finished sequences (their status already says FINISHED), keeping the K/V of
        those that ended normally in the prefix cache."""
        for seq in seqs:
            if seq.slot is not None and seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                # positions < num_computed_tokens are in the cache: the prompt, then every output but the last
                self._store((seq.prompt_token_ids + seq.output_token_ids)[:seq.num_computed_tokens], seq.slot)
        self.kv.free(seqs)
        for seq in seqs:
            request = seq.request
            if request.is_finished:
                self.running.pop(request.request_id, None)

    def _store(self, tokens: list[int], slot: int) -> None:
        # recorded now, run at the head of the next plan: after this step's graphs wrote the K/V, before
        # any compaction copy recorded later moves another sequence into the slot
        if copy := self.prefix.store(tokens, slot):
            self.kv.record_copy(copy)

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

    def _admit(self, request: Request, hit: Optional[PrefixHit], copies: list[SlotCopy]) -> Sequence:
        head = request.seqs[0]
        self.kv.allocate(head, num_reserved=request.n - 1)
        head.status = SequenceStatus.PREFILLING
        if self.prefix.enabled:
            self.prefix.record_query(request.num_prompt_tokens, hit)
        if hit is not None:
            copies.append(SlotCopy(hit.slot, head.slot, hit.length))
            head.num_computed_tokens = request.num_cached_tokens = hit.length
        request.times.scheduled = time.monotonic()
        self.running[request.request_id] = request
        self.prefilling = head
        return head

    def _next_chunk(self, seq: Sequence, budget: int) -> PrefillChunk:
        start = seq.num_computed_tokens
        end = min(start + budget, seq.num_prompt_tokens)
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
