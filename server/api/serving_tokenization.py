"""POST /tokenize and /detokenize, in vLLM's shapes."""
from __future__ import annotations

from fastapi import Request

from server.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.api.serving import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, request: TokenizeRequest, raw_request: Request) -> TokenizeResponse:
        self.check_model(request.model)
        self.check_fields(request, raw_request)
        if request.messages is not None:
            text = self.chat_renderer.render(
                request.template_messages(), add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message, tools=request.tool_dicts(),
                template_kwargs=request.chat_template_kwargs)
            add_special = bool(request.add_special_tokens)
        else:
            text = request.prompt
            add_special = request.add_special_tokens is not False
        ids = await self.encode(text, add_special)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.model.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest, raw_request: Request) -> DetokenizeResponse:
        self.check_model(request.model)
        self.check_fields(request, raw_request)
        self.check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))
