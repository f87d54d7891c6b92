"""POST /v1/chat/completions: messages (and tools) -> the chat template -> choices (JSON or SSE).

Tools: tool_choice "auto" parses calls out of the output with the server's tool parser;
"required" and a named function constrain the output with a JSON schema (structured outputs),
so even a small model answers with a valid call. tool_calls.py maps text to calls.
Streaming: each choice's first chunk carries the role together with its first content (as
vLLM sends it), so a client's time to first token is the time to the first generated token.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional

from fastapi import Request
from fastapi.responses import Response

from server.api import errors
from server.api.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                 ChatCompletionResponse, ChatLogProbs, ChatResponseMessage, ChatTokenLogprob,
                                 DeltaMessage, TopLogprob)
from server.api.serving import Generation, OpenAIServing, RequestTracker, clamp_logprob, new_id, sse
from server.api.tool_calls import ToolCallOutput, ToolCallStream
from server.api.tool_parsers import required_calls_schema
from server.engine.types import SamplingParams, StructuredOutputsParams, TokenLogprob


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        self.check_model(request.model)
        self.check_fields(request, raw_request)
        params, constraint_param = self._sampling_params(request)
        tool_output = self._tool_output(request)
        await self.check_structured(params, constraint_param)
        prompt = self.chat_renderer.render(
            request.template_messages(), add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tools=request.tool_dicts() if tool_output.mode != "none" else None,
            template_kwargs=request.chat_template_kwargs)
        prompt_ids = await self.encode(prompt, request.add_special_tokens)
        self.check_length(len(prompt_ids), params.max_tokens, "messages")
        request_id = new_id("chatcmpl")
        tracker = RequestTracker(raw_request, len(prompt_ids), params.n, request.stream)
        generation = self.start_generation(request_id, [prompt_ids], params)
        return await self.respond(request.stream, generation, tracker,
                                  lambda: self._stream(request, request_id, generation, tracker, tool_output),
                                  lambda: self._collect(request, request_id, generation, tracker, tool_output))

    def _sampling_params(self, request: ChatCompletionRequest) -> tuple[SamplingParams, Optional[str]]:
        """The request's SamplingParams, with the JSON schema a required or named tool_choice
        imposes; and the request field a constraint came from (for the 400 if it cannot compile)."""
        params = self.sampling_params(request)
        mode = request.effective_tool_choice
        if mode == "required":
            schema = required_calls_schema(request.tool_dicts(), request.parallel_tool_calls)
        elif mode == "named":
            tool = next(t for t in request.tools if t.function.name == request.tool_choice.function.name)
            schema = tool.function.parameters or {"type": "object", "properties": {}}
        else:
            spec = request.structured_spec
            return params, spec[0] if spec else None
        spec = StructuredOutputsParams(json=json.dumps(schema, ensure_ascii=False))
        return dataclasses.replace(params, structured_outputs=spec), "tools"

    def _tool_output(self, request: ChatCompletionRequest) -> ToolCallOutput:
        mode = request.effective_tool_choice
        if mode == "auto" and self.tool_parser is None:
            raise errors.bad_request('"auto" tool choice requires --enable-auto-tool-choice and '
                                     '--tool-call-parser to be set', param="tool_choice")
        name = request.tool_choice.function.name if mode == "named" else None
        return ToolCallOutput(mode, self.tool_parser if mode == "auto" else None, name)

    async def _collect(self, request: ChatCompletionRequest, request_id: str, generation: Generation,
                       tracker: RequestTracker, tool_output: ToolCallOutput) -> ChatCompletionResponse:
        async for _, out in generation.outputs():
            for c in out.outputs:
                tracker.add(c.index, c)
        choices = []
        for index, state in sorted(tracker.choices.items()):
            content, calls = tool_output.message("".join(state.text))
            finish = "tool_calls" if calls and state.finish_reason == "stop" else state.finish_reason
            choices.append(ChatChoice(
                index=index, message=ChatResponseMessage(content=content, tool_calls=calls),
                logprobs=self._logprobs(state.logprobs, request.top_logprobs) if request.logprobs else None,
                finish_reason=finish, stop_reason=state.stop_reason))
        return ChatCompletionResponse(id=request_id, created=int(time.time()), model=self.model.name,
                                      choices=choices, usage=tracker.usage(generation.num_cached_tokens))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, generation: Generation,
                      tracker: RequestTracker, tool_output: ToolCallOutput):
        created = int(time.time())
        streams: dict[int, ToolCallStream] = {}

        def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model.name,
                                           choices=choices, usage=usage))

        async for _, out in generation.outputs():
            for c in out.outputs:
                state = tracker.add(c.index, c)
                stream = streams.setdefault(c.index, tool_output.stream())
                content, calls = stream.feed(c.text)
                finish = state.finish_reason if c.finish_reason is not None else None
                if finish is not None:
                    more_content, more_calls = stream.finish()
                    content, calls = content + more_content, calls + more_calls
                    if stream.called and finish == "stop":
                        finish = "tool_calls"
                logprobs = (self._logprobs(c.logprobs, request.top_logprobs)
                            if request.logprobs and c.logprobs else None)
                if not (content or calls or logprobs or finish):
                    continue
                delta = DeltaMessage(role=None if state.sent_role else "assistant", content=content or None,
                                     tool_calls=calls or None)
                state.sent_role = True
                yield chunk([ChatChunkChoice(index=c.index, delta=delta, logprobs=logprobs, finish_reason=finish,
                                             stop_reason=state.stop_reason if finish else None)])
        if request.include_usage:
            yield chunk([], usage=tracker.usage(generation.num_cached_tokens))

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
