"""The stop rules, in one place: when a sequence may stop, and why it stopped.

- min_tokens: until a sequence has that many output tokens, eos and its stop token ids are banned
  from sampling (banned_token_ids) and stop strings do not count (vLLM's rule).
- eos (unless ignore_eos) and stop token ids end it with "stop"; the token's text stays out of the
  output unless include_stop_str_in_output.
- A stop string ends it with "stop" and the text is cut there (the detokenizer finds it).
- max_tokens, or max_model_len positions, end it with "length".
- A structured-output grammar that is complete (nothing may follow) ends it with "stop": its mask
  would allow only eos, so stopping at once saves a step.
"""
from __future__ import annotations

import logging
from typing import Optional

from server.engine.request import Sequence
from server.engine.types import FinishReason

logger = logging.getLogger(__name__)


def banned_token_ids(seq: Sequence, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
    """Token ids the sampler must not pick for `seq`'s next token."""
    params = seq.params
    if seq.num_output_tokens >= params.min_tokens:
        return ()
    return params.stop_token_ids + (() if params.ignore_eos else eos_token_ids)


def check_stop(seq: Sequence, token_id: int, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
    """Append `token_id` (already sampled) to `seq`'s text and finish `seq` if a rule says so."""
    params = seq.params
    # the token just appended counts: it may stop only once min_tokens tokens precede it
    may_stop = seq.num_output_tokens > params.min_tokens
    is_eos = may_stop and not params.ignore_eos and token_id in eos_token_ids
    is_stop_id = may_stop and token_id in params.stop_token_ids
    hide = (is_eos or is_stop_id) and not params.include_stop_str_in_output
    stop_str: Optional[str] = None
    if seq.detokenizer is not None:
        new_chars = seq.detokenizer.update(token_id, skip_text=hide)
        if may_stop and new_chars:
            stop_str = seq.detokenizer.find_stop(new_chars)
    grammar_done = seq.grammar is not None and _advance_grammar(seq, token_id)
    if is_eos:
        seq.finish(FinishReason.STOP)
    elif is_stop_id:
        seq.finish(FinishReason.STOP, token_id)
    elif stop_str is not None:
        seq.finish(FinishReason.STOP, stop_str)
    elif grammar_done:
        seq.finish(FinishReason.STOP)
    elif ((params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
          or seq.num_tokens >= max_model_len):
        seq.finish(FinishReason.LENGTH)


def _advance_grammar(seq: Sequence, token_id: int) -> bool:
    """Feed the token to the sequence's grammar; True when the grammar is complete."""
    if not seq.grammar.consume_token(token_id):
        # the mask allowed only tokens the grammar takes, so this is a bug, not bad input
        logger.error("structured output of %s#%d rejected token %d: %s", seq.request.request_id,
                     seq.index, token_id, seq.grammar.get_error())
        return True
    return seq.grammar.is_stopped()
