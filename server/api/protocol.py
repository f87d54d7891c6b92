"""OpenAI request models (pydantic) and their conversion to the engine's SamplingParams.

Requests forbid unknown fields (OpenAI's own "Unrecognized request argument supplied"),
so a typo never silently changes behaviour. Fields OpenAI defines that Kiln does not
implement are declared and rejected with a clear 400 unless their value is harmless
(e.g. `tools: []`, `response_format: {"type": "text"}`, `logit_bias: {}`). An explicit
null means "the default", as in OpenAI's API. Response shapes are at the end of the file.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from server.engine.types import SamplingParams

MAX_LOGPROBS = 20
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

Prompt = Union[str, list[str], list[int], list[list[int]]]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class FieldError(ValueError):
    """A check that names its field and error code (errors.py puts both in the 400).

    `param` is relative to where pydantic reports the error: a model validator names the
    field, a field validator leaves it None (the field is already the error's location)."""

    def __init__(self, param: Optional[str], message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def _unsupported(name: str, value: Any, harmless: bool) -> Any:
    if not harmless:
        raise FieldError(None, f"'{name}' is not supported by this server", code="unsupported_parameter")
    return value


def _normalize_prompt(value: Any) -> Prompt:
    def is_ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if is_ids(value):
            return value
        if all(is_ids(v) for v in value):
            return value
    raise ValueError("must be a non-empty string, list of strings, list of token ids "
                     "or list of token id lists")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None   # OpenAI-only padding; ignored


class _GenerationRequest(OpenAIBaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    # vLLM's extras
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    # OpenAI fields: harmless when empty, otherwise a 400
    logit_bias: Optional[dict[str, float]] = None
    service_tier: Optional[str] = None           # ignored
    store: Optional[bool] = None                 # ignored
    metadata: Optional[dict[str, str]] = None    # ignored

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: Any) -> Any:
        return _unsupported("logit_bias", v, harmless=not v)

    @model_validator(mode="after")
    def _check_stream_options(self) -> "_GenerationRequest":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise FieldError("min_tokens", "min_tokens must not exceed max_tokens")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output)


class CompletionRequest(_GenerationRequest):
    prompt: Prompt
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True              # vLLM extra
    best_of: Optional[int] = None                # only best_of == n
    suffix: Optional[str] = None                 # unsupported

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Prompt:
        return _normalize_prompt(v)

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, v: Any) -> Any:
        return _unsupported("suffix", v, harmless=not v)

    @model_validator(mode="after")
    def _check_best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "best_of is not supported (only best_of == n)", "unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise FieldError("echo", "echo with logprobs is not supported (prompt logprobs are not computed)",
                             "unsupported_parameter")
        return self

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None
    refusal: Optional[str] = None                # harmless (echoed back assistant messages)
    annotations: Optional[list[Any]] = None      # harmless
    tool_calls: Optional[list[Any]] = None       # tools are not supported
    function_call: Optional[Any] = None
    audio: Optional[Any] = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise FieldError(None, f"only text content parts are supported, got {kind!r}",
                                     code="unsupported_parameter")
        return v

    @field_validator("tool_calls", "function_call", "audio")
    @classmethod
    def _check_unsupported(cls, v: Any, info) -> Any:
        return _unsupported(info.field_name, v, harmless=not v)

    @model_validator(mode="after")
    def _check_content(self) -> "ChatMessage":
        if self.content is None:
            raise FieldError("content", "content is required")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content or [])


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True           # vLLM extras
    continue_final_message: bool = False
    add_special_tokens: bool = False
    # OpenAI fields Kiln does not implement: harmless values only
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    web_search_options: Optional[Any] = None

    @field_validator("tools", "functions", "function_call", "audio", "prediction",
                     "reasoning_effort", "web_search_options")
    @classmethod
    def _check_unsupported(cls, v: Any, info) -> Any:
        return _unsupported(info.field_name, v, harmless=not v)

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, v: Any) -> Any:
        return _unsupported("tool_choice", v, harmless=v in (None, "none"))

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, v: Any) -> Any:
        if v and v.get("type") != "text":
            raise FieldError(None, f"response_format type {v.get('type')!r} is not supported (only 'text')",
                             code="unsupported_parameter")
        return v

    @field_validator("modalities")
    @classmethod
    def _check_modalities(cls, v: Any) -> Any:
        return _unsupported("modalities", v, harmless=v is None or set(v) <= {"text"})

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.add_generation_prompt and self.continue_final_message:
            raise FieldError("continue_final_message",
                             "add_generation_prompt and continue_final_message cannot both be true")
        return self

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(self.max_completion_tokens or self.max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them ('developer' is OpenAI's new 'system')."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's /tokenize: either `prompt` (completion form) or `messages` (chat form)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: Optional[bool] = None    # default: True for prompt, False for messages
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _check_one_form(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt or messages")
        return self

    template_messages = ChatCompletionRequest.template_messages


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[int]


# ---- responses (extra fields allowed: they are ours, never parsed from clients) ----

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None   # vLLM extra: the matched stop string / token id


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):  # OpenAI sends only the fields a delta carries
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(BaseModel):
    prompt: str
