"""Test doubles for the engine: a fake ModelRunner and a tiny character tokenizer.

FakeRunner keeps each slot's cached *tokens* and returns logits that are a deterministic
function of the slot's contents, so any wrong copy_slot, position or compaction changes the
generated text (or trips an assertion) instead of passing silently.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from server.engine.types import BucketRun, SamplingParams
from server.runner.executor import PlanExecutor
from server.runner.interface import RunnerOutput


def hashed_logits(tokens: Sequence[int], vocab_size: int) -> torch.Tensor:
    """[V] float32 logits depending on every token and its position (tuple hashes of ints
    are stable across runs)."""
    h = hash(tuple(tokens)) % 1_000_003
    v = torch.arange(vocab_size, dtype=torch.int64)
    return ((h * (v + 7) * 2_654_435_761 + v * 40_503) % 1_000).to(torch.float32) / 100.0


class FakeRunner(PlanExecutor):
    """Runs plans through the real execute() (copies, decode, prefill groups, sampler) over a
    cache of tokens. `pack`: prompts one prefill call may take (like the cpu runner's packing)."""

    def __init__(self, num_slots: int = 4, max_model_len: int = 64, vocab_size: int = 32,
                 context_buckets: tuple[int, ...] = (8, 16), batch_buckets: tuple[int, ...] = (1, 2, 4),
                 kv_buckets: tuple[int, ...] = (16, 32, 64), eos_token_ids: tuple[int, ...] = (0,),
                 logits_fn: Optional[Callable[[list[int]], torch.Tensor]] = None, pack: int = 1,
                 prefix_cache_rows: int = 0):
        super().__init__()
        self.pack = pack
        self.warmed_up = False
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.context_buckets = context_buckets
        self.chunk_len = context_buckets[-1]
        self.batch_buckets = batch_buckets
        self.kv_buckets = kv_buckets
        self.eos_token_ids = eos_token_ids
        self.logits_fn = logits_fn or (lambda tokens: hashed_logits(tokens, vocab_size))
        self.prefix_cache_rows = prefix_cache_rows
        self.cache: list[list[int]] = [[] for _ in range(num_slots + prefix_cache_rows)]
        self.calls: list[tuple] = []
        self.fail_on_decode = False

    def _bucket(self, buckets, n):
        return buckets[bisect.bisect_left(buckets, n)]

    def prefill_groups(self, chunks):
        groups = []
        for chunk in chunks:
            if groups and len(groups[-1]) < self.pack and chunk.start_pos == 0 and groups[-1][0].start_pos == 0:
                groups[-1].append(chunk)
            else:
                groups.append([chunk])
        return groups

    def run_prefill(self, chunks) -> RunnerOutput:
        rows = []
        total = sum(len(c.token_ids) for c in chunks)
        assert 0 < total <= self.context_buckets[-1], total
        for c in chunks:
            slot, token_ids, start_pos = c.slot, list(c.token_ids), c.start_pos
            n = len(token_ids)
            assert 0 <= slot < self.num_slots, slot
            assert n > 0 and start_pos + n <= self.max_model_len
            if start_pos == 0:
                self.cache[slot] = []
            assert len(self.cache[slot]) == start_pos, (slot, len(self.cache[slot]), start_pos)
            self.cache[slot].extend(token_ids)
            self.calls.append(("prefill", slot, start_pos, n))
            rows.append(self.logits_fn(self.cache[slot]))
        size = self._bucket(self.context_buckets, total)
        kind = "prefill" if chunks[0].start_pos == 0 else "prefill_chunk"
        run = BucketRun(kind, f"{kind}_s{size}", total, size - total, 0.0)
        return RunnerOutput(torch.stack(rows), run)

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int = 0) -> RunnerOutput:
        from server.runner.bucketed import Chunk
        return self.run_prefill([Chunk(slot, list(token_ids), start_pos)])

    def warmup(self) -> None:
        self.warmed_up = True

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        if self.fail_on_decode:
            raise RuntimeError("injected decode failure")
        n = len(token_ids)
        assert 0 < n <= self.batch_buckets[-1] and n == len(positions)
        for i in range(n):
            assert positions[i] < self.max_model_len
            assert len(self.cache[i]) == positions[i], (i, len(self.cache[i]), positions[i])
            self.cache[i].append(token_ids[i])
        self.calls.append(("decode", n))
        batch = self._bucket(self.batch_buckets, n)
        span = self._bucket(self.kv_buckets, max(max(positions), 1))
        run = BucketRun("decode", f"decode_b{batch}_k{span}", n, batch - n, 0.0)
        return RunnerOutput(torch.stack([self.logits_fn(self.cache[i]) for i in range(n)]), run)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        rows = self.num_slots + self.prefix_cache_rows
        assert src != dst and 0 <= src < rows and 0 <= dst < rows
        assert len(self.cache[src]) >= length, (src, len(self.cache[src]), length)
        self.cache[dst] = self.cache[src][:length]
        self.calls.append(("copy", src, dst, length))


@dataclass
class RequestSpec:
    """One request of a property test: when it arrives (step), its prompt and params, and after how many
    steps it is aborted (None: never)."""

    arrival: int
    prompt: list[int]
    params: SamplingParams
    abort_after: Optional[int]


def scripted_logits(script: dict[tuple[int, ...], list[int]], vocab_size: int, eos: int = 0):
    """Logits that make greedy decoding follow `script[prompt]` then emit eos."""
    def fn(tokens: list[int]) -> torch.Tensor:
        for prompt, continuation in script.items():
            k = len(prompt)
            if tuple(tokens[:k]) == prompt and tokens[k:] == continuation[:len(tokens) - k]:
                i = len(tokens) - k
                target = continuation[i] if i < len(continuation) else eos
                break
        else:
            target = eos
        logits = torch.zeros(vocab_size)
        logits[target] = 10.0
        return logits
    return fn


CHAR_VOCAB = ["<eos>"] + [chr(ord("a") + i) for i in range(26)] + [" ", "ab", "ba", "abc", "\n"]


class CharTokenizer:
    """Token i is CHAR_VOCAB[i]; id 0 is the (special) eos."""

    eos_token_id = 0

    def __len__(self) -> int:
        return len(CHAR_VOCAB)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if (t == 0 and skip_special_tokens) else CHAR_VOCAB[t] for t in token_ids)

    def encode(self, text: str) -> list[int]:
        return [CHAR_VOCAB.index(c) for c in text]
