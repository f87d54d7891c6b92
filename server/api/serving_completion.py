"""POST /v1/completions: prompts (texts or token ids) -> choices, as JSON or SSE chunks.

Choice i of prompt p has index p * n + i (vLLM's and OpenAI's order).
"""
from __future__ import annotations

import time
from typing import Optional

from fastapi import Request
from fastapi.responses import Response

from server.api import errors
from server.api.protocol import CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse
from server.api.serving import (ChoiceState, Generation, OpenAIServing, RequestTracker, clamp_logprob, new_id,
                                sse)
from server.engine.types import TokenLogprob


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        self.check_model(request.model)
        self.check_fields(request, raw_request)
        params = self.sampling_params(request)
        texts, prompts = await self._prompts(request)
        for ids in prompts:
            self.check_length(len(ids), params.max_tokens, "prompt")
        spec = request.structured_spec
        await self.check_structured(params, spec[0] if spec else None)
        request_id = new_id("cmpl")
        tracker = RequestTracker(raw_request, sum(map(len, prompts)), params.n, request.stream)
        generation = self.start_generation(request_id, prompts, params)
        echo = texts if request.echo else None
        return await self.respond(request.stream, generation, tracker,
                                  lambda: self._stream(request, request_id, generation, tracker, echo),
                                  lambda: self._collect(request, request_id, generation, tracker, echo))

    async def _prompts(self, request: CompletionRequest) -> tuple[list[str], list[list[int]]]:
        """(prompt texts, prompt token ids), one per prompt."""
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        texts, prompts = [], []
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                texts.append(item)
                prompts.append(await self.encode(item, request.add_special_tokens))
            else:
                self.check_token_ids(item, "prompt")
                texts.append(self.tokenizer.decode(item) if request.echo else "")
                prompts.append(list(item))
            if not prompts[-1]:
                raise errors.bad_request(f"prompt {i} is empty after tokenization", param="prompt")
        return texts, prompts

    async def _collect(self, request: CompletionRequest, request_id: str, generation: Generation,
                       tracker: RequestTracker, echo: Optional[list[str]]) -> CompletionResponse:
        async for p, out in generation.outputs():
            for c in out.outputs:
                tracker.add(p * request.n + c.index, c)
        choices = []
        for index in sorted(tracker.choices):
            state: ChoiceState = tracker.choices[index]
            prefix = echo[index // request.n] if echo else ""
            logprobs = self._logprobs(state.logprobs, 0) if request.logprobs is not None else None
            choices.append(CompletionChoice(index=index, text=prefix + "".join(state.text), logprobs=logprobs,
                                            finish_reason=state.finish_reason, stop_reason=state.stop_reason))
        return CompletionResponse(id=request_id, created=int(time.time()), model=self.model.name,
                                  choices=choices, usage=tracker.usage(generation.num_cached_tokens))

    async def _stream(self, request: CompletionRequest, request_id: str, generation: Generation,
                      tracker: RequestTracker, echo: Optional[list[str]]):
        created, offsets = int(time.time()), {}
        async for p, out in generation.outputs():
            for c in out.outputs:
                index = p * request.n + c.index
                first = index not in tracker.choices
                state = tracker.add(index, c)
                text = (echo[p] if echo and first else "") + c.text
                logprobs = None
                if request.logprobs is not None and c.logprobs:
                    logprobs = self._logprobs(c.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(map(len, logprobs.tokens))
                finish = state.finish_reason if c.finish_reason is not None else None
                if not (text or logprobs or finish):
                    continue
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish,
                                          stop_reason=state.stop_reason if finish else None)
                yield sse(CompletionResponse(id=request_id, created=created, model=self.model.name,
                                             choices=[choice]))
        if request.include_usage:
            yield sse(CompletionResponse(id=request_id, created=created, model=self.model.name,
                                         choices=[], usage=tracker.usage(generation.num_cached_tokens)))

    def _logprobs(self, logprobs: list[TokenLogprob], offset: int) -> CompletionLogProbs:
        result = CompletionLogProbs()
        for lp in logprobs:
            token = self.token_str(lp.token_id)
            top = {self.token_str(t): clamp_logprob(v) for t, v in lp.top}
            top.setdefault(token, clamp_logprob(lp.logprob))   # vLLM: the sampled token is always listed
            result.tokens.append(token)
            result.token_logprobs.append(clamp_logprob(lp.logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(token)
        return result
