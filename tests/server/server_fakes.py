"""FakeEngine: an EngineClient double for testing the HTTP layer without a model (vLLM style).

Choice i of a request emits one token per step from a fixed word list, chosen by the prompt,
i and the step, so outputs are deterministic and differ between choices. `gate` (an asyncio
Event created lazily on the server's loop) holds every stream before its first token. `script`
(text pieces) replaces the words: each choice emits one piece per step and stops after the last.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from server.engine.types import (CompletionOutput, FinishReason, QueueFullError, RequestOutput, SamplingParams,
                                 SamplingParamsError, TokenLogprob)

WORDS = " alpha beta gamma delta epsilon zeta eta theta iota kappa"


class FakeEngine:
    def __init__(self, tokenizer, max_num_seqs: int = 4, default_max_tokens: int = 8):
        self.tokenizer = tokenizer
        self.word_ids = tokenizer.encode(WORDS, add_special_tokens=False)
        self.max_num_seqs = max_num_seqs
        self.default_max_tokens = default_max_tokens
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.aborted: list[str] = []
        self.queue_full = False
        self.fail_add: Optional[Exception] = None      # raised by add_request
        self.fail_stream: Optional[Exception] = None   # raised by the stream after one token
        self.hold = False                              # streams wait for release() before their first token
        self._gate: Optional[asyncio.Event] = None
        self.started = False
        self.fail_start: Optional[Exception] = None    # raised by start()
        self.num_running = 0
        self.num_waiting = 0
        self._structured = None
        self.script: Optional[list[str]] = None       # every choice emits these text pieces, one per step

    async def start(self) -> None:
        if self.fail_start is not None:
            raise self.fail_start
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def is_alive(self) -> bool:
        return self.started

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if self.fail_add is not None:
            raise self.fail_add
        if self.queue_full:
            raise QueueFullError("the waiting queue is full (1 requests)")
        if params.n > self.max_num_seqs:
            raise SamplingParamsError("n", f"n={params.n} exceeds max_num_seqs={self.max_num_seqs}")
        self.requests[request_id] = (list(prompt_token_ids), params)
        return self._stream(request_id, list(prompt_token_ids), params)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def compile_grammar(self, spec) -> None:
        """The real compiler (so bad constraints get the real 400s); outputs are not constrained."""
        if self._structured is None:
            from server.engine.structured import StructuredOutputManager
            self._structured = StructuredOutputManager(self.tokenizer, len(self.tokenizer), [self.tokenizer.eos_token_id])
        self._structured.compile(spec)

    def release(self) -> None:
        self.hold = False
        if self._gate is not None:
            self._gate.set()

    def token(self, prompt: list[int], index: int, step: int) -> int:
        return self.word_ids[(sum(prompt) + 3 * index + step) % len(self.word_ids)]

    def expected_text(self, prompt: list[int], index: int, num_tokens: int) -> str:
        return self.tokenizer.decode([self.token(prompt, index, s) for s in range(num_tokens)])

    async def _stream(self, request_id: str, prompt: list[int], params: SamplingParams):
        if self.hold:
            self._gate = self._gate or asyncio.Event()
            await self._gate.wait()
        max_tokens = params.max_tokens or self.default_max_tokens
        script = self.script
        if script is not None:
            max_tokens = min(max_tokens, len(script))
        self.num_running += 1
        try:
            for step in range(max_tokens):
                await asyncio.sleep(0)
                if step == 1 and self.fail_stream is not None:
                    raise self.fail_stream
                aborted = request_id in self.aborted
                last = step == max_tokens - 1 or aborted
                outputs = []
                for i in range(params.n):
                    tok = self.token(prompt, i, step)
                    logprobs = None
                    if params.logprobs is not None:
                        top = [(tok, -0.25), (self.word_ids[0], -1.5), (self.word_ids[1], -2.5)]
                        logprobs = [TokenLogprob(tok, -0.25, top[:params.logprobs])]
                    reason = (FinishReason.ABORT if aborted else FinishReason.LENGTH) if last else None
                    if script is not None and last and not aborted and step == len(script) - 1:
                        reason = FinishReason.STOP
                    text = script[step] if script is not None else self.tokenizer.decode([tok])
                    outputs.append(CompletionOutput(
                        index=i, text="" if aborted else text,
                        token_ids=[] if aborted else [tok], logprobs=logprobs, finish_reason=reason,
                        num_generated_tokens=step + (0 if aborted else 1)))
                yield RequestOutput(request_id, prompt, outputs, finished=last)
                if last:
                    return
        finally:
            self.num_running -= 1
