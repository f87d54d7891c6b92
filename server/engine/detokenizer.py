"""Incremental detokenization and stop strings for one sequence (runs outside the model step).

Text: the prefix/read offsets of vLLM's `detokenize_incrementally` and TGI's `decode_token`.
Each new token decodes the window ids[prefix_offset:] and emits what it adds to the decode of
ids[prefix_offset:read_offset]; the window starts a few prompt tokens back so tokenizers whose
text depends on context (SentencePiece's leading space) decode as they would in full.
NOTE: a window that decodes to text ending in U+FFFD is an incomplete UTF-8 character (a
byte-level BPE token can carry part of one): nothing is emitted and the offsets stay, so the
next token decodes the whole character. Incomplete bytes left at the end are dropped.

Stop strings: searched only in the text a token added (plus len(stop) - 1 before it); on a
match the text is cut before the stop string (or after it with include_stop_str_in_output).
The earliest match wins when one token completes several. While streaming, the longest tail
of the text that could still become a stop string is held back, so a matched stop string's
text never leaks into an emitted delta; a finished sequence releases everything it kept.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

from server.engine.types import SamplingParams

PROMPT_CONTEXT_TOKENS = 5   # vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        # NOTE: only slow (Python) tokenizers honour spaces_between_special_tokens; fast ones join
        # special tokens without spaces whatever it says, so it is passed only when it differs.
        self._decode_kwargs = {} if params.spaces_between_special_tokens else {"spaces_between_special_tokens": False}
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in params.stop if s)
        self._include_stop = params.include_stop_str_in_output
        self._num_sent_chars = 0
        self.output_text = ""

    def update(self, token_id: int, skip_text: bool = False) -> int:
        """Add one generated token; returns how many characters of text it added. `skip_text`:
        a stop token whose text stays out of the output (server/engine/stop.py decides)."""
        if skip_text:
            return 0
        new_text = self._decode_next(token_id)
        self.output_text += new_text
        return len(new_text)

    def find_stop(self, num_new_chars: int) -> Optional[str]:
        """The stop string the last `num_new_chars` characters completed, if any (the earliest
        match); output_text is then cut before it (or after it with include_stop_str_in_output)."""
        if not self._stop:
            return None
        text = self.output_text
        best: Optional[tuple[int, str]] = None
        for stop in self._stop:
            index = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.output_text = text[:index + len(stop)] if self._include_stop else text[:index]
        return stop

    def get_delta(self, finished: bool) -> str:
        """Text not handed out yet, less the tail that may still turn into a stop string."""
        end = len(self.output_text) if finished else len(self.output_text) - self._held_back()
        if end <= self._num_sent_chars:
            return ""
        delta = self.output_text[self._num_sent_chars:end]
        self._num_sent_chars = end
        return delta

    def _decode_next(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        kwargs = self._decode_kwargs
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip, **kwargs)
        full_text = decode(self._ids[self._prefix_offset:], skip_special_tokens=skip, **kwargs)
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text, held = self.output_text, 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held
