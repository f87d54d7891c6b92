"""OpenAI request models (pydantic) and their conversion to the engine's SamplingParams.

Unknown fields are kept (pydantic `extra="allow"`) and reported by `unknown_fields`: the server
logs and ignores them, as vLLM does (clients written against vLLM send vendor extras), or, with
--strict-request-fields, answers 400 naming the field (OpenAI's own "Unrecognized request
argument supplied"). Fields OpenAI defines that Kiln does not implement are declared and
rejected with a clear 400 unless their value is harmless (e.g. `functions: []`). An explicit
null means "the default", as in OpenAI's API. Response shapes are at the end of the file.

Bad input is a 400 before any work: every request model first walks the raw JSON once
(`check_json_input`): a string or key that is not valid Unicode (Python's json accepts lone
surrogates such as "\\udcff"), a non-finite number (Python's json accepts NaN, Infinity and 1e999)
or nesting deeper than MAX_JSON_DEPTH is a 400 naming its path, whatever the field (unknown
extras too). Arrays have limits (MAX_PROMPTS, MAX_MESSAGES, ...; docs/api.md lists them).
"""
from __future__ import annotations

import functools
import json
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from server.api.errors import format_path, printable
from server.engine.types import SamplingParams, StructuredOutputsParams

MAX_LOGPROBS = 20
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
INT32_MAX = 2**31 - 1           # counts (max_tokens, top_k, ...) and token ids: anything above is absurd
# limits on what one request may carry (docs/api.md); OpenAI's where it has one
MAX_N = 128                     # OpenAI
MAX_PROMPTS = 4096              # strings or token-id lists in one completion request
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 4096        # per message
MAX_STOP = 32                   # OpenAI allows 4 for its own models; vLLM has no limit
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 16384          # OpenAI allows 300; vLLM none: clients ban many tokens through it
MAX_TEMPERATURE = 100.0         # OpenAI caps it at 2, vLLM not at all; far above 10 sampling is uniform
MAX_TOOLS = 128                 # OpenAI
MAX_REPETITION_PENALTY = 100.0  # vLLM has none; float32 must stay finite
MIN_REPETITION_PENALTY = 0.01
MAX_JSON_DEPTH = 64             # nesting of the request body (a JSON schema's levels count twice)

Prompt = Union[str, list[str], list[int], list[list[int]]]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

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


def _bad_unicode(text: str) -> Optional[str]:
    """Why `text` cannot be UTF-8 (a lone surrogate, which Python's json lets through), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate U+{ord(text[e.start]):04X} at index {e.start}"
    return None


def check_json_input(data: Any) -> None:
    """Walk a request's raw JSON once, iteratively (no recursion, however deep it is), and raise
    FieldError naming the path of the first string or object key that is not valid Unicode, the
    first non-finite number, or a container nested deeper than MAX_JSON_DEPTH (named by its
    top-level field)."""
    _check_scalar(data, ())
    stack: list[tuple[Any, tuple, int]] = [(data, (), 1)] if type(data) in (dict, list) else []
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            where = format_path(path[:1])
            raise FieldError(where, f"{where or 'the request body'} is nested more than {MAX_JSON_DEPTH} "
                             "levels deep")
        children = []
        # NOTE: the loop is written for speed (a 4 MiB body holds 2M token ids): the common cases
        # (ints, ASCII strings) cost one type check, paths are built only for containers and errors.
        for key, item in (value.items() if type(value) is dict else enumerate(value)):
            if type(key) is str and not key.isascii() and (why := _bad_unicode(key)) is not None:
                # escaped here: pydantic formats the error (and its message) before errors.py sees it
                where = format_path(path + (printable(key),))
                raise FieldError(where, f"{where}: the key is not valid Unicode ({why}); text must be "
                                 "encodable as UTF-8", code="invalid_unicode")
            kind = type(item)
            if kind is dict or kind is list:
                children.append((item, path + (key,), depth + 1))
            elif not (kind is int or (kind is str and item.isascii()) or (kind is float and math.isfinite(item))
                      or item is None or kind is bool):
                _check_scalar(item, path + (key,))
        stack.extend(reversed(children))     # depth first, in document order


def _check_scalar(value: Any, path: tuple) -> None:
    if isinstance(value, str) and (why := _bad_unicode(value)) is not None:
        where = format_path(path)
        raise FieldError(where, f"{where or 'the request body'} is not valid Unicode ({why}); text must be "
                         "encodable as UTF-8", code="invalid_unicode")
    if isinstance(value, float) and not math.isfinite(value):
        where = format_path(path)
        raise FieldError(where, f"{where or 'the request body'} must be a finite number, got {value} "
                         "(NaN and Infinity are not JSON)")


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Paths of the fields a request carried that no model declares (`messages[0].foo`)."""
    found = [prefix + name for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, OpenAIBaseModel):
                found += unknown_fields(item, f"{prefix}{name}{'' if i is None else f'[{i}]'}.")
    return found


def _unsupported(name: str, value: Any, harmless: bool) -> Any:
    if not harmless:
        raise FieldError(None, f"'{name}' is not supported by this server", code="unsupported_parameter")
    return value


def _normalize_prompt(value: Any) -> Prompt:
    if isinstance(value, list) and value and not isinstance(value[0], (int, bool)) and len(value) > MAX_PROMPTS:
        raise FieldError(None, f"at most {MAX_PROMPTS} prompts may be given in one request, got {len(value)}",
                         code="array_above_max_length")

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


class RequestModel(OpenAIBaseModel):
    """A request body: its raw JSON is checked whole before any field (check_json_input)."""

    @model_validator(mode="before")
    @classmethod
    def _check_json_input(cls, data: Any) -> Any:
        check_json_input(data)
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None   # OpenAI-only padding; ignored


def _schema_text(value: Union[str, dict[str, Any]], param: str) -> str:
    """A JSON schema as compact text (the grammar cache's key). NOTE: keys keep their order: the
    output lists properties in the schema's order, which is what the client asked for."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise FieldError(param, f"the schema is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise FieldError(param, "a JSON schema must be a JSON object")
    return json.dumps(value, ensure_ascii=False)


class JsonSchemaFormat(OpenAIBaseModel):
    name: str = "response"
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _check_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise FieldError("json_schema", "response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputsRequest(OpenAIBaseModel):
    """vLLM's `structured_outputs` field: exactly one constraint."""

    json_: Optional[Union[str, dict[str, Any]]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


class _GenerationRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None     # at most MAX_STOP (checked below)
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    # vLLM's extras
    top_k: int = Field(0, ge=-1, le=INT32_MAX)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[TokenId]] = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_* fields
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None    # ignored: one backend (llguidance)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=MAX_LOGIT_BIAS)
    service_tier: Optional[str] = None           # ignored
    store: Optional[bool] = None                 # ignored
    metadata: Optional[dict[str, str]] = None    # ignored

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise FieldError(None, f"at most {MAX_STOP} stop sequences may be given, got {len(stops)}",
                             code="array_above_max_length")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (v or {}).items():
            digits = key.strip()
            if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self) -> "_GenerationRequest":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise FieldError("min_tokens", "min_tokens must not exceed max_tokens")
        if self.seed is not None and self.seed + self.n - 1 > UINT64_MAX:
            raise FieldError("seed", f"seed + n - 1 must not exceed {UINT64_MAX} (choice i uses seed + i)")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @functools.cached_property
    def structured_spec(self) -> Optional[tuple[str, StructuredOutputsParams]]:
        """(the request field it came from, the constraint), or None: at most one may be given. Cached: a
        chat request's tool check, its SamplingParams and the serving layer's 400 all read it, and a JSON
        schema is serialised to make it."""
        specs: list[tuple[str, StructuredOutputsParams]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema":
            specs.append(("response_format", StructuredOutputsParams(
                json=_schema_text(fmt.json_schema.json_schema, "response_format"))))
        elif fmt is not None and fmt.type == "json_object":
            specs.append(("response_format", StructuredOutputsParams(json_object=True)))
        so = self.structured_outputs
        if so is not None:
            given = {"json": so.json_ is not None, "regex": so.regex is not None,
                     "choice": so.choice is not None, "grammar": so.grammar is not None,
                     "json_object": bool(so.json_object)}
            if sum(given.values()) != 1:
                raise FieldError("structured_outputs", "structured_outputs takes exactly one of json, regex, "
                                 "choice, grammar or json_object")
            specs.append(("structured_outputs", self._spec("structured_outputs", so.json_, so.regex, so.choice,
                                                           so.grammar, bool(so.json_object))))
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(self, name) is not None:
                kind = name.removeprefix("guided_")
                specs.append((name, self._spec(name, **{f"{kind}_" if kind == "json" else kind: getattr(self, name)})))
        if len(specs) > 1:
            raise FieldError(specs[1][0], f"only one structured-output constraint may be given "
                             f"({specs[0][0]} and {specs[1][0]} both are)", code="invalid_value")
        return specs[0] if specs else None

    @staticmethod
    def _spec(param: str, json_: Any = None, regex: Optional[str] = None, choice: Optional[list[str]] = None,
              grammar: Optional[str] = None, json_object: bool = False) -> StructuredOutputsParams:
        if choice is not None and (not choice or not all(choice)):
            raise FieldError(param, "choice must be a non-empty list of non-empty strings")
        for value, what in ((regex, "regex"), (grammar, "grammar")):
            if value is not None and not value.strip():
                raise FieldError(param, f"the {what} must not be empty")
        return StructuredOutputsParams(
            json=None if json_ is None else _schema_text(json_, param), regex=regex,
            choice=None if choice is None else tuple(choice), grammar=grammar, json_object=json_object)

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        spec = self.structured_spec
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            structured_outputs=spec[1] if spec else None, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens)


class CompletionRequest(_GenerationRequest):
    prompt: Prompt
    max_tokens: Optional[int] = Field(16, ge=1, le=INT32_MAX)
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


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str = "{}"        # JSON text, as OpenAI sends it


class ToolCall(OpenAIBaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(OpenAIBaseModel):
    class Function(OpenAIBaseModel):
        name: str

    type: Literal["function"] = "function"
    function: Function


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant turns that called tools
    tool_call_id: Optional[str] = None           # role "tool": the call this answers
    refusal: Optional[str] = None                # harmless (echoed back assistant messages)
    annotations: Optional[list[Any]] = None      # harmless
    reasoning_content: Optional[str] = None      # vLLM's echoed reasoning: ignored
    function_call: Optional[Any] = None
    audio: Optional[Any] = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > MAX_CONTENT_PARTS:
                raise FieldError(None, f"at most {MAX_CONTENT_PARTS} content parts may be given, got {len(v)}",
                                 code="array_above_max_length")
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise FieldError(None, f"only text content parts are supported, got {kind!r}",
                                     code="unsupported_parameter")
        return v

    @field_validator("function_call", "audio")
    @classmethod
    def _check_unsupported(cls, v: Any, info) -> Any:
        return _unsupported(info.field_name, v, harmless=not v)

    @model_validator(mode="after")
    def _check_content(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise FieldError("content", "content is required (an assistant message may give tool_calls instead)")
        if self.tool_calls and self.role != "assistant":
            raise FieldError("tool_calls", "only assistant messages carry tool_calls")
        for call in self.tool_calls or ():
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise FieldError("tool_calls", f"the arguments of tool call {call.function.name!r} "
                                 "must be a JSON object")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content or [])

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it ('developer' is OpenAI's new 'system'; tool call
        arguments as objects, as transformers' templates take them)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text()}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True           # vLLM extras
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # OpenAI fields Kiln does not implement: harmless values only
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    modalities: Optional[list[str]] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    web_search_options: Optional[Any] = None

    @field_validator("functions", "function_call", "audio", "prediction", "reasoning_effort", "web_search_options")
    @classmethod
    def _check_unsupported(cls, v: Any, info) -> Any:
        return _unsupported(info.field_name, v, harmless=not v)

    @field_validator("modalities")
    @classmethod
    def _check_modalities(cls, v: Any) -> Any:
        return _unsupported("modalities", v, harmless=v is None or set(v) <= {"text"})

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_template_kwargs(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        reserved = {"messages", "tools", "tokenize", "add_generation_prompt", "continue_final_message",
                    "chat_template", "return_dict", "return_tensors"} & set(v or {})
        if reserved:
            raise ValueError(f"chat_template_kwargs must not set {', '.join(sorted(reserved))} "
                             "(they are request fields of their own)")
        return v

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.add_generation_prompt and self.continue_final_message:
            raise FieldError("continue_final_message",
                             "add_generation_prompt and continue_final_message cannot both be true")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> "ChatCompletionRequest":
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tool function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise FieldError("tool_choice", "tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise FieldError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not "
                             f"among the tools ({', '.join(names)})")
        if self.effective_tool_choice in ("required", "named") and self.structured_spec is not None:
            raise FieldError("tool_choice", "a required or named tool_choice cannot be combined with "
                             "response_format or another structured-output constraint")
        return self

    @property
    def effective_tool_choice(self) -> str:
        """'none', 'auto', 'required' or 'named' (OpenAI: 'auto' when tools are given, else 'none')."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named"
        return choice or ("auto" if self.tools else "none")

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(self.max_completion_tokens or self.max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_dict() for m in self.messages]

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as transformers' apply_chat_template takes them (OpenAI's JSON)."""
        return [tool.model_dump(exclude_none=True, by_alias=True) for tool in self.tools or ()]


class TokenizeRequest(RequestModel):
    """vLLM's /tokenize: either `prompt` (completion form) or `messages` (chat form)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: Optional[bool] = None    # default: True for prompt, False for messages
    return_token_strs: bool = False
    tools: Optional[list[Tool]] = Field(None, max_length=MAX_TOOLS)
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _check_one_form(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt or messages")
        return self

    template_messages = ChatCompletionRequest.template_messages
    tool_dicts = ChatCompletionRequest.tool_dicts
    _check_template_kwargs = ChatCompletionRequest._check_template_kwargs


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: list[int]


# ---- responses (extra fields allowed: they are ours, never parsed from clients) ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0   # prompt tokens taken from the prefix cache (OpenAI's and vLLM's field)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


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


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)


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


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None

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
