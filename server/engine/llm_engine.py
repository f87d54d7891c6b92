"""LLMEngine: the continuous-batching step, single-threaded (AsyncEngine runs it on a thread).

step() = apply aborts -> schedule -> run the bucket graphs -> sample -> update (stop checks,
detokenize, free slots) -> delta outputs, with StepStats/RequestStats for the observer.
"""
from __future__ import annotations

import itertools
import time
from typing import Optional, Protocol, Sequence as Seq

import torch

from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import KVCacheManager
from server.engine.request import Request, Sequence
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.types import (BucketRun, FinishReason, RequestOutput,
                                 RequestStats, RequestTooLongError, SamplingParams, StepStats)
from server.runner.sampler import Sampler, SamplerOutput, SamplingRow, make_generator


class EngineObserver(Protocol):
    """Implemented by server.metrics.Metrics."""

    def observe_step(self, stats: StepStats) -> None: ...
    def observe_request(self, stats: RequestStats) -> None: ...
    def observe_token_gap(self, seconds: float) -> None: ...


class LLMEngine:
    def __init__(self, runner, tokenizer, config: Optional[EngineConfig] = None,
                 observer: Optional[EngineObserver] = None):
        self.config = (config or EngineConfig()).resolve(runner)
        self.runner = runner
        self.tokenizer = tokenizer
        self.observer = observer
        self.eos_token_ids = tuple(runner.eos_token_ids) or _tokenizer_eos(tokenizer)
        self.kv = KVCacheManager(self.config.max_num_seqs, runner.copy_slot)
        self.scheduler = Scheduler(self.config, runner.context_buckets, self.kv)
        self.sampler = Sampler(self.config.logprobs_mode)
        self.last_step_stats: Optional[StepStats] = None
        self._requests: dict[str, Request] = {}
        self._pending_aborts: list[str] = []
        self._generate_ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ValueError / RequestTooLongError for a request this engine can never run.
        Reads only the config, so other threads may call it while the engine steps."""
        params.validate()
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) + 1 > self.config.max_model_len:
            raise RequestTooLongError(len(prompt_token_ids), self.config.max_model_len)

    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: SamplingParams) -> None:
        """Queue a request (raises ValueError, RequestTooLongError or QueueFullError)."""
        self.check_request(prompt_token_ids, params)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        generators = None
        if params.seed is not None:   # vLLM: choice i of a seeded request uses seed + i
            generators = [make_generator(params.seed + i) for i in range(params.n)]
        request = Request(request_id, list(prompt_token_ids), params, time.monotonic(), generators)
        for seq in request.seqs:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
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
        outputs = self._apply_aborts()
        plan = self.scheduler.schedule()
        runs, seqs, logits = self._execute(plan)
        if seqs:
            sampled = self.sampler.sample(logits, [self._sampling_row(s) for s in seqs])
            outputs += self._update(seqs, sampled)
        if runs or outputs:
            self._observe_step(runs, start)
        return outputs

    def _execute(self, plan: SchedulerOutput):
        runs: list[BucketRun] = []
        seqs: list[Sequence] = []
        logits = []
        if plan.decode.seqs:
            out = self.runner.decode(plan.decode.token_ids, plan.decode.positions)
            runs.append(out.run)
            seqs += plan.decode.seqs
            logits.append(out.logits)
        for chunk in plan.prefills:
            out = self.runner.prefill(chunk.slot, chunk.token_ids, chunk.start_pos)
            runs.append(out.run)
            for child in chunk.forks:
                self.runner.copy_slot(chunk.slot, child.slot, chunk.end_pos)
            if chunk.is_last:
                group = [chunk.seq, *chunk.forks]
                seqs += group
                logits.append(out.logits.expand(len(group), -1))
        return runs, seqs, (torch.cat(logits) if logits else None)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        banned: tuple[int, ...] = ()
        if seq.num_output_tokens < params.min_tokens:
            banned = params.stop_token_ids + (() if params.ignore_eos else self.eos_token_ids)
        return SamplingRow(params, seq.prompt_token_ids, seq.output_token_ids, seq.generator,
                           banned)

    def _update(self, seqs: list[Sequence], sampled: SamplerOutput) -> list[RequestOutput]:
        now = time.monotonic()
        for seq, token_id, logprob in zip(seqs, sampled.token_ids, sampled.logprobs):
            self._append_token(seq, token_id, logprob, now)
        self.scheduler.finish([seq for seq in seqs if seq.is_finished])
        groups: dict[str, list[Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.request.request_id, []).append(seq)
        return [self._output(group[0].request, group, now) for group in groups.values()]

    def _append_token(self, seq: Sequence, token_id: int, logprob, now: float) -> None:
        request, params = seq.request, seq.params
        if request.times.first_token is None:
            request.times.first_token = now
        if seq.last_token_time is not None and self.observer is not None:
            self.observer.observe_token_gap(now - seq.last_token_time)
        seq.last_token_time = now
        seq.append_token(token_id, logprob)
        # min_tokens: eos and stop ids are masked until then; stop strings wait as well.
        may_stop = seq.num_output_tokens > params.min_tokens
        is_eos = may_stop and not params.ignore_eos and token_id in self.eos_token_ids
        is_stop_id = may_stop and token_id in params.stop_token_ids
        stop_str = seq.detokenizer.update(
            token_id, skip_text=(is_eos or is_stop_id) and not params.include_stop_str_in_output)
        if is_eos:
            seq.finish(FinishReason.STOP)
        elif is_stop_id:
            seq.finish(FinishReason.STOP, token_id)
        elif stop_str is not None:
            seq.finish(FinishReason.STOP, stop_str)
        elif ((params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
              or seq.num_tokens >= self.config.max_model_len):
            seq.finish(FinishReason.LENGTH)

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
            outputs.append(self._output(request, live, now))
        return outputs

    def _output(self, request: Request, seqs: list[Sequence], now: float) -> RequestOutput:
        if request.is_finished and request.request_id in self._requests:
            request.times.finished = now
            del self._requests[request.request_id]
            if self.observer is not None:
                self.observer.observe_request(request.stats())
        return request.make_output(seqs)

    def _observe_step(self, runs: list[BucketRun], start: float) -> None:
        self.last_step_stats = StepStats(
            runs=runs, num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_slots_used=self.kv.num_used + self.kv.num_reserved,
            num_slots_total=self.kv.num_slots, step_seconds=time.monotonic() - start)
        if self.observer is not None:
            self.observer.observe_step(self.last_step_stats)

    # ---- offline use ----------------------------------------------------------------------
    def generate(self, prompts: Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order, accumulated (not deltas).
        Outputs of requests added by other callers during the call are dropped."""
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
