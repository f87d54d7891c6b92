"""Request and Sequence: the engine's per-request state.

A Request owns its prompt ids, params and timestamps; each of its n choices is a Sequence,
which owns its output ids, status, KV slot, counters and detokenizer. No torch here: a seeded
sequence's random generator lives with the runner's sampler (SamplingRow.key).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

from server.engine.types import (CompletionOutput, FinishReason, RequestOutput, RequestStats,
                                 RequestTimes, SamplingParams, TokenLogprob)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"          # no slot yet (or a reserved one, for choice >= 1 of n)
    PREFILLING = "prefilling"    # holds a slot; the prompt is (partly) in the cache
    RUNNING = "running"          # decoding one token per step
    FINISHED = "finished"


class Sequence:
    """One choice of a request. `num_computed_tokens` counts positions already in the KV cache."""

    def __init__(self, request: "Request", index: int):
        self.request = request
        self.index = index
        self.output_token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.status = SequenceStatus.WAITING
        self.slot: Optional[int] = None
        self.num_computed_tokens = 0
        self.finish_reason: Optional[FinishReason] = None
        self.stop_reason: Optional[str | int] = None
        self.detokenizer: Any = None
        self.grammar: Any = None     # structured outputs: llguidance's LLMatcher (structured.py)
        self.last_token_time: Optional[float] = None
        self.num_sent_tokens = 0     # output ids already handed out as deltas

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
                f"slot={self.slot}, computed={self.num_computed_tokens}, out={self.num_output_tokens})")

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: Optional[TokenLogprob]) -> None:
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)

    def finish(self, reason: FinishReason, stop_reason: Optional[str | int] = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def take_delta(self) -> CompletionOutput:
        """What this choice produced since the previous call (text held back by the
        detokenizer stays back until it is safe or the choice finishes)."""
        start, self.num_sent_tokens = self.num_sent_tokens, len(self.output_token_ids)
        text = self.detokenizer.get_delta(self.is_finished) if self.detokenizer else ""
        logprobs = self.logprobs[start:] if self.params.logprobs is not None else None
        return CompletionOutput(
            index=self.index, text=text, token_ids=self.output_token_ids[start:],
            logprobs=logprobs, finish_reason=self.finish_reason,
            num_generated_tokens=len(self.output_token_ids), stop_reason=self.stop_reason)


class Request:
    """A prompt with its params and n choices (`seqs`); seqs[0] is the one that prefills."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival: float):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.times = RequestTimes(arrival=arrival)
        self.seqs = [Sequence(self, i) for i in range(params.n)]
        self.num_cached_tokens = 0   # prompt tokens copied from the prefix cache at admission

    def __repr__(self) -> str:
        return f"Request({self.request_id}, prompt={len(self.prompt_token_ids)}, n={self.n})"

    @property
    def n(self) -> int:
        return len(self.seqs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def make_output(self, seqs: list[Sequence]) -> RequestOutput:
        """A delta output for the given choices (those that produced something this step)."""
        return RequestOutput(request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                             outputs=[seq.take_delta() for seq in seqs],
                             finished=self.is_finished,
                             times=dataclasses.replace(self.times),
                             num_cached_tokens=self.num_cached_tokens)

    def stats(self) -> RequestStats:
        reason = self.seqs[0].finish_reason or FinishReason.ABORT
        return RequestStats(
            request_id=self.request_id, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=sum(seq.num_output_tokens for seq in self.seqs),
            finish_reason=reason, times=self.times, n=self.n)
