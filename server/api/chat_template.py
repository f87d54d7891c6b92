"""Messages (and tools) -> prompt text, through the tokenizer's own chat template.

A template that renders tools (its source mentions `tools`, as transformers' tool-use templates
do) gets them through `apply_chat_template(tools=...)`, and tool calls and results as messages.
A template without a tool section gets the documented fallback instead (docs/tools.md): the tool
parser's instructions as (the start of) the system message, earlier calls written in the parser's
own syntax as assistant text, and tool results as user turns inside <tool_response> tags, so any
chat model can be asked to call tools and its answer parsed back.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from server.api import errors
from server.api.tool_parsers import ToolParser


class ChatRenderer:
    def __init__(self, tokenizer: Any, tool_parser: Optional[ToolParser]):
        self.tokenizer = tokenizer
        self.tool_parser = tool_parser
        template = getattr(tokenizer, "chat_template", None)
        self.has_template = bool(template)
        self.template_has_tools = isinstance(template, str) and "tools" in template

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
               continue_final_message: bool, tools: Optional[list[dict[str, Any]]] = None,
               template_kwargs: Optional[dict[str, Any]] = None) -> str:
        """The prompt text; a 400 naming `messages` when the template cannot render them."""
        if not self.has_template:
            raise errors.bad_request("This model has no chat template; use /v1/completions.", param="messages")
        kwargs = dict(template_kwargs or {})
        if tools and self.template_has_tools:
            kwargs["tools"] = tools
        elif tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            messages = self._fallback(messages, tools or [])
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja2 errors and transformers' ValueErrors
            raise errors.bad_request(f"Cannot apply the chat template: {e}", param="messages") from None

    def _fallback(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tools, tool calls and tool results as plain system/assistant/user text."""
        parser = self.tool_parser
        out: list[dict[str, Any]] = []
        for message in messages:
            role, content = message["role"], message.get("content") or ""
            if message.get("tool_calls"):
                calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
                written = parser.format_calls(calls) if parser is not None else json.dumps(
                    [{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)
                content = f"{content}\n{written}".strip()
                out.append({"role": "assistant", "content": content})
            elif role == "tool":
                out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
            else:
                out.append({"role": role, "content": content})
        if tools:
            instructions = (parser.fallback_instructions(tools) if parser is not None
                            else _plain_instructions(tools))
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
            else:
                out.insert(0, {"role": "system", "content": instructions})
        return out


def _plain_instructions(tools: list[dict[str, Any]]) -> str:
    """Without a tool parser (auto tool choice off) the tools are still described: a required or
    named tool_choice makes the model answer with a call under a grammar."""
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return f"You can call these functions:\n{listing}"
