"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> choices (JSON or SSE)."""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from server.api.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                 ChatCompletionResponse, ChatLogProbs, ChatResponseMessage, ChatTokenLogprob,
                                 DeltaMessage, TopLogprob)
from server.api.serving import Generation, OpenAIServing, RequestTracker, clamp_logprob, new_id, sse
from server.engine.types import TokenLogprob


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        self.check_model(request.model)
        params = self.sampling_params(request)
        prompt = self.render_chat(request.template_messages(), request.add_generation_prompt,
                                  request.continue_final_message)
        prompt_ids = await self.encode(prompt, request.add_special_tokens)
        self.check_length(len(prompt_ids), params.max_tokens, "messages")
        request_id = new_id("chatcmpl")
        tracker = RequestTracker(raw_request, len(prompt_ids), params.n, request.stream)
        generation = self.start_generation(request_id, [prompt_ids], params)
        return await self.respond(request.stream, generation, tracker,
                                  lambda: self._stream(request, request_id, generation, tracker),
                                  lambda: self._collect(request, request_id, generation, tracker))

    async def _collect(self, request: ChatCompletionRequest, request_id: str, generation: Generation,
                       tracker: RequestTracker) -> ChatCompletionResponse:
        async for _, out in generation.outputs():
            for c in out.outputs:
                tracker.add(c.index, c)
        choices = [
            ChatChoice(index=index, message=ChatResponseMessage(content="".join(state.text)),
                       logprobs=self._logprobs(state.logprobs, request.top_logprobs) if request.logprobs else None,
                       finish_reason=state.finish_reason, stop_reason=state.stop_reason)
            for index, state in sorted(tracker.choices.items())]
        return ChatCompletionResponse(id=request_id, created=int(time.time()), model=self.model.name,
                                      choices=choices, usage=tracker.usage())

    async def _stream(self, request: ChatCompletionRequest, request_id: str, generation: Generation,
                      tracker: RequestTracker):
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model.name,
                                           choices=choices, usage=usage))

        # OpenAI's first chunk of each choice carries the role and empty content.
        for i in range(request.n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for _, out in generation.outputs():
            for c in out.outputs:
                state = tracker.add(c.index, c)
                logprobs = (self._logprobs(c.logprobs, request.top_logprobs)
                            if request.logprobs and c.logprobs else None)
                finish = state.finish_reason if c.finish_reason is not None else None
                if not (c.text or logprobs or finish):
                    continue
                yield chunk([ChatChunkChoice(
                    index=c.index, delta=DeltaMessage(content=c.text) if c.text else DeltaMessage(),
                    logprobs=logprobs, finish_reason=finish, stop_reason=state.stop_reason if finish else None)])
        if request.include_usage:
            yield chunk([], usage=tracker.usage())

    def _logprobs(self, logprobs: list[TokenLogprob], top_k: int | None) -> ChatLogProbs:
        content = []
        for lp in logprobs:
            token = self.token_str(lp.token_id)
            top = [TopLogprob(token=self.token_str(t), logprob=clamp_logprob(v),
                              bytes=list(self.token_str(t).encode()))
                   for t, v in lp.top[:top_k or 0]]
            content.append(ChatTokenLogprob(token=token, logprob=clamp_logprob(lp.logprob),
                                            bytes=list(token.encode()), top_logprobs=top))
        return ChatLogProbs(content=content)
