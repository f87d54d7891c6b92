"""Prefix cache on static slots: K/V of finished sequences kept in store rows for later prompts
that start with the same tokens (a repeated system prompt, a chat resending its history).

The runner's cache has `num_slots` rows for running sequences and `num_rows` more past them
(compile --prefix-cache-rows); this class decides what those store rows hold. No torch, no K/V:
it keeps each row's token ids and asks for slot copies, which the scheduler puts in the plan.

- store(tokens, slot): a sequence that finished (stop or length) leaves the K/V of `tokens` (its
  prompt and the outputs already in the cache) in `slot`. They go to a store row by one copy:
  over a row they extend (turn k+1 of a chat replaces turn k's row), else into a free row, else
  over the least recently used one. Nothing is copied when a row already holds them all.
- lookup(prompt): the longest common prefix with any row, capped one token short of the
  prompt (its last token must run to give logits), and used only from MIN_HIT_TOKENS up: a
  shorter hit saves little and moves the prompt off the packed prefill onto a chunk graph.
  A hit copies the row's first `length` positions into the new sequence's slot, and the
  prompt's rest prefills as a chunk after them.

Exactness: K/V at position p depend only on tokens 0..p, so equal tokens give equal K/V (the
same weights and graphs computed them), and the matched part is compared token for token: no
hash can collide. Safety comes from order: every copy of a plan runs in order before its graphs
(interface.py), a store copy is recorded when its sequence finishes (before the compaction
copy that may reuse its slot), and a hit copy is placed after every copy recorded before it, so
a row is never read before it is written nor after it was overwritten.

NOTE: matching compares each row's ids with numpy (rows x prompt tokens, a few microseconds for
dozens of rows); vLLM's chained block hashes pay off with thousands of blocks, not with a few
rows. Counters are in tokens, as vLLM's prefix_cache_queries / prefix_cache_hits are.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from server.engine.types import PrefixCacheStats, SlotCopy

# Fewer matching tokens than this are not reused (see the module docstring).
MIN_HIT_TOKENS = 16


@dataclass(frozen=True)
class PrefixHit:
    row: int       # store row index
    slot: int      # its cache row
    length: int    # positions to copy (and not prefill)


class PrefixCache:
    def __init__(self, first_slot: int, num_rows: int, min_hit_tokens: int = MIN_HIT_TOKENS):
        self.first_slot = first_slot
        self.num_rows = num_rows
        self.min_hit_tokens = min_hit_tokens
        self._tokens: list[Optional[np.ndarray]] = [None] * num_rows
        self._last_used = [0] * num_rows
        self._clock = 0
        self.stats = PrefixCacheStats()
        self._reported = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.num_rows > 0

    def slot(self, row: int) -> int:
        return self.first_slot + row

    # ---- reads ------------------------------------------------------------------------------
    def lookup(self, prompt: Sequence[int]) -> Optional[PrefixHit]:
        """The longest usable cached prefix of `prompt`, or None. Changes nothing."""
        if not self.enabled or len(prompt) <= self.min_hit_tokens:
            return None
        ids = np.asarray(prompt, dtype=np.int64)
        row, length = self._longest_match(ids)
        length = min(length, len(ids) - 1)
        if row is None or length < self.min_hit_tokens:
            return None
        return PrefixHit(row, self.slot(row), length)

    def record_query(self, num_prompt_tokens: int, hit: Optional[PrefixHit]) -> None:
        """Count one admitted prompt (and its hit, which makes its row the most recently used)."""
        self.stats.queries += num_prompt_tokens
        if hit is not None:
            self.stats.hits += hit.length
            self._touch(hit.row)

    # ---- writes -----------------------------------------------------------------------------
    def store(self, tokens: Sequence[int], slot: int) -> Optional[SlotCopy]:
        """Keep the K/V of `tokens` (positions 0..len-1 of cache row `slot`); the copy that does it, or
        None when nothing needs copying."""
        if not self.enabled or len(tokens) < self.min_hit_tokens:
            return None
        ids = np.asarray(tokens, dtype=np.int64)
        row, length = self._longest_match(ids)
        if row is not None and length == len(ids):
            self._touch(row)              # already held (in full, or as the start of a longer row)
            return None
        if row is None or length != len(self._tokens[row]):
            row = self._free_row()        # the best row is not a prefix of these tokens: keep it
        self._tokens[row] = ids
        self._touch(row)
        self.stats.stores += 1
        return SlotCopy(slot, self.slot(row), len(ids))

    def clear(self) -> None:
        self._tokens = [None] * self.num_rows

    # ---- state --------------------------------------------------------------------------------
    def snapshot(self) -> PrefixCacheStats:
        """Counters so far and the rows and tokens held now."""
        held = [t for t in self._tokens if t is not None]
        return dataclasses.replace(self.stats, rows_used=len(held), rows_total=self.num_rows,
                                   tokens_cached=sum(len(t) for t in held))

    def take_delta(self) -> PrefixCacheStats:
        """What changed since the previous call: counters as increments, rows and tokens as they are now
        (StepStats, for the metrics)."""
        now, before = self.snapshot(), self._reported
        self._reported = now
        return dataclasses.replace(now, queries=now.queries - before.queries, hits=now.hits - before.hits,
                                   stores=now.stores - before.stores, evictions=now.evictions - before.evictions)

    def rows(self) -> list[Optional[tuple[int, ...]]]:
        """Each row's token ids (tests and debugging)."""
        return [None if t is None else tuple(int(x) for x in t) for t in self._tokens]

    def _longest_match(self, ids: np.ndarray) -> tuple[Optional[int], int]:
        best_row, best = None, 0
        for row, held in enumerate(self._tokens):
            if held is None:
                continue
            n = min(len(held), len(ids))
            same = held[:n] == ids[:n]
            length = n if same.all() else int(np.argmin(same))
            if length == 0:
                continue
            # ties go to the shorter row: it is the one that longer tokens extend (store replaces it)
            if length > best or (length == best and len(held) < len(self._tokens[best_row])):
                best_row, best = row, length
        return best_row, best

    def _free_row(self) -> int:
        for row, held in enumerate(self._tokens):
            if held is None:
                return row
        row = min(range(self.num_rows), key=self._last_used.__getitem__)
        self.stats.evictions += 1
        return row

    def _touch(self, row: int) -> None:
        self._clock += 1
        self._last_used[row] = self._clock
