"""Typed contracts between the engine's layers and the HTTP side.

Nothing here imports torch: the scheduler and the API layer can be tested without it.
Streaming outputs carry *deltas* (new text and ids since the previous output of the
same choice); the blocking `LLMEngine.generate` returns the accumulated result.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional


class FinishReason(str, enum.Enum):
    STOP = "stop"      # eos, a stop string or a stop token id
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"    # aborted by the caller (client disconnect, shutdown)
    ERROR = "error"    # the model gave this sequence non-finite logits; the request fails


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the server answers 429/503 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine loop is not running (failed or shut down); the server answers 503."""


class RequestTooLongError(ValueError):
    """Prompt (plus at least one generated token) does not fit in max_model_len."""

    def __init__(self, num_prompt_tokens: int, max_model_len: int):
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {num_prompt_tokens} tokens"
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class SamplingParamsError(ValueError):
    """An invalid SamplingParams field; `field` names it (the OpenAI error's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on a request's output, as vLLM's `StructuredOutputsParams` names it: exactly
    one of a JSON schema (as JSON text), any JSON object, a regular expression, a list of
    choices, or a grammar (Lark, or GBNF as llama.cpp writes it). `whitespace_flexible`: JSON
    may hold any whitespace (vLLM's default); off, JSON comes compact, which keeps a small model
    from drifting into endless whitespace."""

    json: Optional[str] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    grammar: Optional[str] = None
    whitespace_flexible: bool = False

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs", "give exactly one of json, json_object, regex, "
                                      f"choice or grammar (got {', '.join(given) or 'none'})")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError("structured_outputs", "choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI fields plus vLLM's common extras)."""

    n: int = 1
    max_tokens: Optional[int] = 16          # None: until max_model_len
    min_tokens: int = 0
    temperature: float = 1.0               # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                         # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None         # None: off; k >= 0: sampled token + top-k alternatives
    include_stop_str_in_output: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    structured_outputs: Optional[StructuredOutputsParams] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SamplingParamsError (a ValueError naming the bad field). Runs on construction,
        so a SamplingParams that exists is a valid one."""
        checks = [
            ("n", self.n >= 1, "n must be at least 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "min_tokens must be non-negative"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must not exceed max_tokens"),
            ("temperature", self.temperature >= 0.0, "temperature must be non-negative"),
            ("top_p", 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "top_k must be -1, 0 (disabled) or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "repetition_penalty must be positive"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            ("logit_bias", all(isinstance(t, int) and t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias),
             "logit_bias maps non-negative token ids to biases in [-100, 100]"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SamplingParamsError(name, message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class CompletionOutput:
    """One choice of a request. In streamed outputs, text/token_ids/logprobs are deltas."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[FinishReason] = None
    num_generated_tokens: int = 0          # cumulative, for usage accounting
    stop_reason: Optional[str | int] = None  # the matched stop string or stop token id


@dataclass
class RequestTimes:
    """Monotonic timestamps (time.monotonic()) of one request's life."""

    arrival: float
    scheduled: Optional[float] = None      # first admitted to a slot
    first_token: Optional[float] = None
    finished: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    times: Optional[RequestTimes] = None
    num_cached_tokens: int = 0             # prompt tokens taken from the prefix cache, not prefilled


@dataclass(frozen=True)
class SlotCopy:
    """Copy the first `length` cached positions of KV slot `src` into slot `dst`."""

    src: int
    dst: int
    length: int


@dataclass
class SamplingRow:
    """What the sampler needs for one row of logits. `key` names the sequence: a seeded one
    (`seed` is not None) draws from its own generator, which the runner makes on first sight and
    keeps under that key until the plan releases it."""

    key: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: Optional[int] = None               # vLLM: choice i of a seeded request uses seed + i
    banned_token_ids: tuple[int, ...] = ()   # min_tokens: eos and stop ids until then


@dataclass
class ExecuteOutput:
    """What runner.execute(plan) returns: one sampled token (and its logprobs when asked)
    per row of plan.sampling_rows, and the graphs it ran. `failed_rows`: rows whose logits were
    not finite (NaN or inf from the model); their tokens are meaningless and must not be used."""

    token_ids: list[int]
    logprobs: list[Optional[TokenLogprob]]
    runs: list["BucketRun"]
    failed_rows: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class BucketRun:
    """One graph execution: what ran and what it cost."""

    kind: str                 # "prefill" | "prefill_chunk" | "decode"
    bucket: str               # e.g. "prefill_s128", "decode_b4_k512"
    num_real_tokens: int      # positions that carried a real token
    num_padded_tokens: int    # positions computed only to fill the bucket
    seconds: float


@dataclass
class PrefixCacheStats:
    """The prefix cache's counters (tokens, as vLLM counts them) and what it holds."""

    queries: int = 0          # prompt tokens of admitted requests, looked up
    hits: int = 0             # of them, tokens found cached (not prefilled)
    stores: int = 0           # sequences whose K/V went into a store row
    evictions: int = 0        # rows overwritten by an unrelated sequence (least recently used)
    rows_used: int = 0
    rows_total: int = 0
    tokens_cached: int = 0


@dataclass
class StepStats:
    """Accounting for one engine step (feeds Prometheus and the benchmarks)."""

    runs: list[BucketRun]
    num_running: int
    num_waiting: int
    num_slots_used: int
    num_slots_total: int
    step_seconds: float
    mask_seconds: Optional[float] = None   # token masks of structured outputs (None: none this step)
    prefix_cache: Optional[PrefixCacheStats] = None   # this step's increments, rows held now (None: off)

    @property
    def padding_waste(self) -> float:
        computed = sum(r.num_real_tokens + r.num_padded_tokens for r in self.runs)
        return sum(r.num_padded_tokens for r in self.runs) / computed if computed else 0.0


@dataclass
class RequestStats:
    """Emitted once when a request (all its n choices) finishes."""

    request_id: str
    num_prompt_tokens: int
    num_generation_tokens: int
    finish_reason: FinishReason
    times: RequestTimes
    n: int = 1
