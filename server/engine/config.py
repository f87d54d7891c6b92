"""EngineConfig: the engine's settings, validated once against the runner it drives."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

LOGPROBS_MODES = ("raw", "processed")
# NOTE: on the 2-core dev machine a 512-token prefill of SmolLM2 takes about 0.25 s: the longest a
# decode step can be held up. More tokens per step would not prefill faster (it is compute-bound).
DEFAULT_BATCHED_TOKENS = 512
# The server's default budget is also capped in time (timed_token_budget): CPUs differ 5x in prefill speed.
# NOTE: SmolLM2 on a 2-core AVX2-only EPYC (float32) prefills 128 tokens in 0.33 s and 512 in 1.3-1.9 s; a 512
# budget there held every stream for that long and, with a prefix cache, put 8 clients' rests in one 1.3 s call:
# a 128 budget cut the shared-prefix TTFT p50 from 1.96 to 1.0-1.1 s and ITL p99 in half, for 9% of the no-reuse
# throughput at 16 clients (docs/benchmarks.md, "AVX2 hosts").
STEP_PREFILL_TARGET_S = 0.4


def default_budget_buckets(context_buckets: Sequence[int]) -> list[int]:
    """The context buckets a default budget may be, ascending: those up to DEFAULT_BATCHED_TOKENS, else the
    smallest. Untimed (EngineConfig.resolve), the default is the largest of them."""
    return sorted(b for b in context_buckets if b <= DEFAULT_BATCHED_TOKENS) or [min(context_buckets)]


def timed_token_budget(seconds_for: Callable[[int], float], context_buckets: Sequence[int]) -> int:
    """The largest context bucket up to DEFAULT_BATCHED_TOKENS whose one-prompt prefill, timed by
    seconds_for(tokens), takes at most STEP_PREFILL_TARGET_S; the smallest bucket if none does. Buckets
    are timed smallest first, and the first one over the target ends the search."""
    candidates = default_budget_buckets(context_buckets)
    budget = candidates[0]
    for tokens in candidates:
        if seconds_for(tokens) > STEP_PREFILL_TARGET_S:
            break
        budget = tokens
    return budget


@dataclass(frozen=True)
class EngineConfig:
    """Continuous-batching limits. `None` means "take it from the runner" (see `resolve`).

    - max_num_seqs: sequences holding a KV slot at once (an n>1 request holds n);
      default min(runner.num_slots, largest batch bucket).
    - max_num_queued_reqs: bound on the waiting queue; add_request beyond it raises QueueFullError.
    - max_model_len: positions per sequence (prompt + output); default runner.max_model_len.
    - max_num_batched_tokens: prompt tokens prefilled in one step (vLLM's flag; decode rows are
      not counted, they run in a graph of their own). Waiting prompts are packed into it in
      arrival order and the last may be cut into chunks, so a running stream waits behind at
      most this many prefill tokens between two tokens (inter-token latency) and the oldest
      waiting prompt advances every step (time to first token). Default: the largest context
      bucket up to DEFAULT_BATCHED_TOKENS; at most the largest context bucket (one call's worth).
    - logprobs_mode: "raw" (log-softmax of the model's logits before penalties, temperature,
      top-k/top-p/min-p: vLLM v1's default `raw_logprobs`, what OpenAI reports) or "processed"
      (log-softmax of the distribution actually sampled from).
    - enable_prefix_caching: reuse cached K/V of earlier sequences for prompts that start with the
      same tokens (prefix_cache.py; vLLM's flag); needs the runner's prefix-cache rows.
    """

    max_num_seqs: Optional[int] = None
    max_num_queued_reqs: int = 256
    max_model_len: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    logprobs_mode: str = "raw"
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        positive = {
            "max_num_seqs": self.max_num_seqs,
            "max_num_queued_reqs": self.max_num_queued_reqs,
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"EngineConfig.logprobs_mode must be one of {LOGPROBS_MODES}, "
                             f"got {self.logprobs_mode!r}")

    def resolve(self, runner) -> "EngineConfig":
        """Fill the `None` fields from `runner` and check every limit against it."""
        if not runner.context_buckets or not runner.batch_buckets:
            raise ValueError("runner has no context or batch buckets")
        max_batch = max(runner.batch_buckets)
        max_num_seqs = self.max_num_seqs or min(runner.num_slots, max_batch)
        max_model_len = self.max_model_len or runner.max_model_len
        largest = max(runner.context_buckets)
        budget = self.max_num_batched_tokens or max(default_budget_buckets(runner.context_buckets))
        if max_num_seqs > runner.num_slots:
            raise ValueError(f"max_num_seqs={max_num_seqs} exceeds the runner's "
                             f"{runner.num_slots} KV slots")
        if max_num_seqs > max_batch:
            raise ValueError(f"max_num_seqs={max_num_seqs} exceeds the largest batch bucket "
                             f"{max_batch}")
        if max_model_len > runner.max_model_len:
            raise ValueError(f"max_model_len={max_model_len} exceeds the runner's "
                             f"{runner.max_model_len}")
        if max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if budget > largest:
            raise ValueError(f"max_num_batched_tokens={budget} exceeds the largest context bucket "
                             f"{largest} (the most one prefill call holds)")
        return dataclasses.replace(self, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                   max_num_batched_tokens=budget)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.max_num_seqs, self.max_model_len, self.max_num_batched_tokens)
