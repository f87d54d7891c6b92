"""LLMEngine: the continuous-batching step, single-threaded (AsyncEngine runs its loop).

step() = apply aborts -> schedule -> runner.execute(plan) -> update, as in nano-vllm and vLLM v1:
the runner runs the plan's slot copies and graphs and samples behind its own interface (so a
device can sample where the logits are), and returns token ids, logprobs and the bucket runs.
The update appends each token, applies the stop rules (stop.py), frees finished slots and
emits delta outputs, with StepStats/RequestStats for the observer. Rows under a structured-output
constraint get their token masks computed while the graphs run (structured.py). No torch here.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Optional, Protocol, Sequence as Seq

from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import KVCacheManager
from server.engine.prefix_cache import PrefixCache
from server.engine.request import Request, Sequence
from server.engine.scheduler import Scheduler
from server.engine.stop import banned_token_ids, check_stop
from server.engine.structured import StructuredOutputManager
from server.engine.types import (BucketRun, ExecuteOutput, FinishReason, RequestOutput,
                                 RequestStats, RequestTooLongError, SamplingParams,
                                 SamplingParamsError, SamplingRow, StepStats)


logger = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Implemented by server.metrics.Metrics."""

    def observe_step(self, stats: StepStats) -> None: ...
    def observe_request(self, stats: RequestStats) -> None: ...
    def observe_token_gap(self, seconds: float) -> None: ...
    def observe_grammar_compile(self, kind: str, seconds: float) -> None: ...


def sequence_key(seq: Sequence) -> str:
    return f"{seq.request.request_id}#{seq.index}"


class LLMEngine:
    def __init__(self, runner, tokenizer, config: Optional[EngineConfig] = None,
                 observer: Optional[EngineObserver] = None):
        self.config = (config or EngineConfig()).resolve(runner)
        self.runner = runner
        self.tokenizer = tokenizer
        self.observer = observer
        self.eos_token_ids = tuple(runner.eos_token_ids) or _tokenizer_eos(tokenizer)
        self.kv = KVCacheManager(self.config.max_num_seqs)
        rows = runner.prefix_cache_rows if self.config.enable_prefix_caching else 0
        self.scheduler = Scheduler(self.config, self.kv, runner.chunk_len,
                                   PrefixCache(first_slot=runner.num_slots, num_rows=rows))
        self.structured = StructuredOutputManager(
            tokenizer, runner.vocab_size, self.eos_token_ids,
            on_compile=observer.observe_grammar_compile if observer is not None else None)
        self.last_step_stats: Optional[StepStats] = None
        self._requests: dict[str, Request] = {}
        self._pending_aborts: list[str] = []
        self._released: list[str] = []     # finished sequences whose sampler state can go
        self._generate_ids = itertools.count()

    def set_token_budget(self, tokens: int) -> None:
        """A new max_num_batched_tokens, before the first step (the server's timed default), checked as
        EngineConfig checks one given at construction."""
        self.config = dataclasses.replace(self.config, max_num_batched_tokens=tokens).resolve(self.runner)
        self.scheduler.token_budget = tokens

    # ---- requests -------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ValueError / RequestTooLongError for a request this engine can never run (the
        SamplingParams checked themselves when made). The front doors call it (AsyncEngine's
        add_request, generate); the engine and scheduler then trust the request. Reads only the
        config, so other threads may call it while the engine steps."""
        if params.n > self.config.max_num_seqs:
            raise SamplingParamsError("n", f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) + 1 > self.config.max_model_len:
            raise RequestTooLongError(len(prompt_token_ids), self.config.max_model_len)
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise SamplingParamsError("logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab})")
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)   # GrammarError; cached after

    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: SamplingParams) -> None:
        """Queue a request that passed check_request (raises QueueFullError, or ValueError
        for an id in use)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, list(prompt_token_ids), params, time.monotonic())
        for seq in request.seqs:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
            if params.structured_outputs is not None:
                seq.grammar = self.structured.matcher(params.structured_outputs)
        self.scheduler.add(request)
        self._requests[request_id] = request

    def abort(self, request_id: str) -> None:
        """Takes effect at the next step, which returns the request's final (abort) output."""
        if request_id in self._requests:
            self._pending_aborts.append(request_id)

    def abort_all(self) -> None:
        self._pending_aborts.extend(self._requests)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        mask_seconds: Optional[float] = None
        outputs = self._apply_aborts()
        plan = self.scheduler.schedule()
        runs: list[BucketRun] = []
        if not plan.is_empty:
            seqs = plan.sampled_seqs()
            plan.sampling_rows = [self._sampling_row(seq) for seq in seqs]
            plan.released, self._released = self._released, []
            plan.logprobs_mode = self.config.logprobs_mode
            plan.token_masks = masks = self.structured.start_masks([seq.grammar for seq in seqs])
            try:
                result: ExecuteOutput = self.runner.execute(plan)
            finally:
                if masks is not None:
                    masks.result()        # the matchers advance only after the worker is done
            runs = result.runs
            outputs += self._update(plan, seqs, result)
            if masks is not None:
                mask_seconds = masks.seconds
        if runs or outputs:
            self._observe_step(runs, start, mask_seconds)
        return outputs

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        return SamplingRow(key=sequence_key(seq), params=params, prompt_token_ids=seq.prompt_token_ids,
                           output_token_ids=seq.output_token_ids,
                           seed=None if params.seed is None else params.seed + seq.index,
                           banned_token_ids=banned_token_ids(seq, self.eos_token_ids))

    def _update(self, plan, seqs: list[Sequence], result: ExecuteOutput) -> list[RequestOutput]:
        now = time.monotonic()
        failed = set(result.failed_rows)
        for row, (seq, token_id, logprob) in enumerate(zip(seqs, result.token_ids, result.logprobs, strict=True)):
            if row in failed:
                logger.error("non-finite logits for %s: the request fails", sequence_key(seq))
                seq.finish(FinishReason.ERROR)
                continue
            self._append_token(seq, token_id, logprob, now)
        self.scheduler.store_prompts(plan.prefills)
        finished = [seq for seq in seqs if seq.is_finished]
        self.scheduler.finish(finished)
        self._released += [sequence_key(seq) for seq in finished]
        groups: dict[str, list[Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.request.request_id, []).append(seq)
        return [self._output(group[0].request, group, now) for group in groups.values()]

    def _append_token(self, seq: Sequence, token_id: int, logprob, now: float) -> None:
        request = seq.request
        if request.times.first_token is None:
            request.times.first_token = now
        if seq.last_token_time is not None and self.observer is not None:
            self.observer.observe_token_gap(now - seq.last_token_time)
        seq.last_token_time = now
        seq.append_token(token_id, logprob)
        check_stop(seq, token_id, self.eos_token_ids, self.config.max_model_len)

    def _apply_aborts(self) -> list[RequestOutput]:
        aborts, self._pending_aborts = self._pending_aborts, []
        outputs = []
        now = time.monotonic()
        for request_id in aborts:
            request = self._requests.get(request_id)
            if request is None:
                continue
            live = [seq for seq in request.seqs if not seq.is_finished]
            self.scheduler.abort(request)
            for seq in live:
                seq.finish(FinishReason.ABORT)
            self._released += [sequence_key(seq) for seq in live]
            outputs.append(self._output(request, live, now))
        return outputs

    def _output(self, request: Request, seqs: list[Sequence], now: float) -> RequestOutput:
        if request.is_finished and request.request_id in self._requests:
            request.times.finished = now
            del self._requests[request.request_id]
            if self.observer is not None:
                self.observer.observe_request(request.stats())
        return request.make_output(seqs)

    def _observe_step(self, runs: list[BucketRun], start: float, mask_seconds: Optional[float]) -> None:
        self.last_step_stats = StepStats(
            runs=runs, num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_slots_used=self.kv.num_used + self.kv.num_reserved,
            num_slots_total=self.kv.num_slots, step_seconds=time.monotonic() - start,
            mask_seconds=mask_seconds,
            prefix_cache=self.scheduler.prefix.take_delta() if self.scheduler.prefix.enabled else None)
        if self.observer is not None:
            self.observer.observe_step(self.last_step_stats)

    # ---- offline use ----------------------------------------------------------------------
    def generate(self, prompts: Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order, accumulated (not deltas).
        Outputs of requests added by other callers during the call are dropped. This is the
        offline front door, so it checks every request before queueing any."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        pending = []
        for prompt, p in zip(prompts, params):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.check_request(ids, p)
            pending.append((f"generate-{next(self._generate_ids)}", ids, p))
        order = [request_id for request_id, _, _ in pending]
        results: dict[str, RequestOutput] = {}
        pending.reverse()
        while pending or any(r not in results or not results[r].finished for r in order):
            while pending and self.scheduler.num_waiting < self.config.max_num_queued_reqs:
                self.add_request(*pending.pop())
            for out in self.step():
                if out.request_id in results:
                    _merge(results[out.request_id], out)
                elif out.request_id in order:
                    results[out.request_id] = out
        return [results[r] for r in order]


def _merge(acc: RequestOutput, delta: RequestOutput) -> None:
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        if c.index not in by_index:
            acc.outputs.append(c)
            continue
        a = by_index[c.index]
        a.text += c.text
        a.token_ids = a.token_ids + c.token_ids
        if c.logprobs is not None:
            a.logprobs = (a.logprobs or []) + c.logprobs
        a.finish_reason, a.stop_reason = c.finish_reason, c.stop_reason
        a.num_generated_tokens = c.num_generated_tokens
    acc.outputs.sort(key=lambda c: c.index)
    acc.finished, acc.times = delta.finished, delta.times


def _tokenizer_eos(tokenizer) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return (eos,) if isinstance(eos, int) else ()
