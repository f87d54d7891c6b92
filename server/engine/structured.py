"""Structured outputs with llguidance: grammars compiled once, a matcher per sequence, token masks.

- `compile(spec)` turns a StructuredOutputsParams into llguidance's grammar and checks it against
  the tokenizer. Results (and errors) are cached by the spec, so the same schema arriving again
  costs a dict lookup. The front door (AsyncEngine.add_request) compiles, so a bad grammar is a
  400 before anything is queued.
- Each constrained sequence owns an `LLMatcher` (choices of n > 1 each their own), advanced by
  every token it samples (stop.py); when the grammar is complete the sequence stops.
- Each step, `start_masks` computes the allowed-token bitmask of every constrained row on a
  worker thread while the runner runs the step's graphs (llguidance drops the GIL), and the
  sampler waits for it just before sampling: the mask costs the step little more than its apply.

NOTE: why llguidance rather than xgrammar: both are what vLLM uses; llguidance's wheel has no
dependencies, while xgrammar pulls triton (hundreds of MB) onto hosts with no GPU.
llguidance and numpy only: no torch here (the engine package stays torch-free).
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np

from server.engine.types import SamplingParamsError, StructuredOutputsParams

GRAMMAR_CACHE_SIZE = 512


class GrammarError(SamplingParamsError):
    """The constraint cannot be compiled (invalid schema, unsupported feature, bad regex)."""

    def __init__(self, message: str):
        super().__init__("structured_outputs", message)


class TokenMasks:
    """The allowed-token bitmask of some rows of a step: `rows` index the plan's sampling rows;
    `result()` is an int32 array [len(rows), ceil(V / 32)], bit j of word w allowing token 32w + j."""

    def __init__(self, rows: list[int], matchers: list[Any], words: int):
        self.rows = rows
        self.seconds = 0.0        # time the worker spent computing them
        self._matchers = matchers
        self._words = words
        self._future: Optional[Future] = None

    def start(self, worker: ThreadPoolExecutor) -> "TokenMasks":
        self._future = worker.submit(self._compute)
        return self

    def result(self) -> np.ndarray:
        return self._future.result()

    def _compute(self) -> np.ndarray:
        start = time.perf_counter()
        out = np.empty((len(self._matchers), self._words), dtype=np.int32)
        for row, matcher in zip(out, self._matchers):
            matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        self.seconds = time.perf_counter() - start
        return out


def unpack_mask(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """[R, W] int32 bitmask -> [R, vocab_size] bool (True: allowed)."""
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size].astype(bool)


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 on_compile: Optional[Callable[[str, float], None]] = None):
        """tokenizer: a Hugging Face fast tokenizer (its llguidance twin is built on first use:
        about 0.4 s for a 49k vocabulary). on_compile(kind, seconds) reports each cache miss."""
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._on_compile = on_compile
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._cache: OrderedDict[StructuredOutputsParams, str | GrammarError] = OrderedDict()
        self._worker: Optional[ThreadPoolExecutor] = None

    @property
    def words(self) -> int:
        return (self.vocab_size + 31) // 32

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf
                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None)
                except ValueError as e:
                    raise GrammarError(f"structured outputs need a fast tokenizer: {e}") from None
            return self._ll_tokenizer

    # ---- grammars ---------------------------------------------------------------------------------
    def compile(self, spec: StructuredOutputsParams) -> str:
        """llguidance's grammar for `spec`, cached; raises GrammarError with the reason."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
        if cached is None:
            start = time.perf_counter()
            cached = self._compile(spec)
            if self._on_compile is not None:
                self._on_compile(spec.kind, time.perf_counter() - start)
            with self._lock:
                self._cache[spec] = cached
                while len(self._cache) > GRAMMAR_CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(cached, GrammarError):
            raise GrammarError(str(cached))
        return cached

    def _compile(self, spec: StructuredOutputsParams) -> str | GrammarError:
        import llguidance
        from llguidance import LLMatcher
        tokenizer = self._tokenizer()
        options = {"whitespace_flexible": spec.whitespace_flexible}
        try:
            if spec.json is not None:
                grammar = LLMatcher.grammar_from_json_schema(_json_text(spec.json), defaults=options)
            elif spec.json_object:
                grammar = LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=options)
            elif spec.regex is not None:
                grammar = LLMatcher.grammar_from_regex(spec.regex)
            elif spec.choice is not None:
                grammar = llguidance.grammar_from("choice", list(spec.choice))
            else:
                grammar = llguidance.grammar_from("grammar", spec.grammar)
        except (ValueError, TypeError) as e:
            return GrammarError(f"invalid {spec.kind} constraint: {e}")
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            return GrammarError(f"invalid {spec.kind} constraint: {_one_line(messages[0])}")
        # NOTE: llguidance warns (and would ignore) schema keywords it does not enforce, such as
        # unknown formats; a constraint that is not enforced is refused, naming the feature.
        if messages:
            return GrammarError(f"unsupported {spec.kind} feature: {_one_line(messages[0])}")
        return grammar

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher for one sequence (the grammar must compile)."""
        from llguidance import LLMatcher
        return LLMatcher(self._tokenizer(), self.compile(spec), log_level=0)

    # ---- masks ------------------------------------------------------------------------------------
    def start_masks(self, matchers: Sequence[Any]) -> Optional[TokenMasks]:
        """Begin computing the bitmask of the rows whose matcher is not None (None: no such row).
        The matchers must not advance until result() returns (the engine samples first)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="kiln-grammar")
        return TokenMasks(rows, [matchers[i] for i in rows], self.words).start(self._worker)


def _json_text(schema: str) -> str:
    """The schema with `additionalProperties: false` wherever an object schema lists its properties and
    says nothing of others. NOTE: xgrammar's strict mode, vLLM's default: without it a small model
    pads objects with invented keys and rarely finishes; a schema that wants them says so."""
    return json.dumps(_close_objects(json.loads(schema)), ensure_ascii=False)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
            "propertyNames", "unevaluatedItems", "unevaluatedProperties")


def _close_objects(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _close_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_close_objects(sub) for sub in out[key]]
    for key in _SCHEMAS:
        if key in out:
            out[key] = ([_close_objects(sub) for sub in out[key]] if isinstance(out[key], list)
                        else _close_objects(out[key]))
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(message.split()) or "unknown error"
    return text if len(text) <= limit else text[:limit - 3] + "..."
