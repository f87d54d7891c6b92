"""The bench's datasets, all word-list prompts of a set token length, reproducible from a seed.

- random: distinct prompts, like vLLM's `--dataset-name random` (no shared prefix).
- shared-prefix: one long system prompt that every request shares, then a short distinct user
  turn: the best case of a prefix cache (the prefix is computed once).
- multiturn: chat sessions whose every turn resends the whole history; the sessions' messages
  are drawn here, the assistant turns are the server's replies (see multiturn.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loadtest.openai_api import Messages
from loadtest.prompts import WORDS, make_prompt

if TYPE_CHECKING:
    from loadtest.bench.config import BenchConfig


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # intended prompt tokens (the server's usage.prompt_tokens wins when it sends one)
    output_len: int  # max_tokens
    system: str | None = None  # shared-prefix: the system prompt sent before `prompt`

    def payload(self, endpoint: str) -> str | Messages:
        """What build_body sends: [system, user] messages to chat; to completions the system text
        and the prompt joined by a space (word-list tokens keep their boundaries, so the shared
        prefix encodes to the same tokens in every request)."""
        if self.system is None:
            return self.prompt
        if endpoint == "chat":
            return [{"role": "system", "content": self.system}, {"role": "user", "content": self.prompt}]
        return f"{self.system} {self.prompt}"


@dataclass(frozen=True)
class ChatSession:
    """One multiturn conversation: an optional system prompt, then one user message per turn.

    user_lens and output_lens are the intended tokens of each user turn and each turn's max_tokens.
    """

    system: str | None
    system_len: int
    users: tuple[str, ...]
    user_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    @property
    def turns(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class Workload:
    """What one sweep point sends: independent requests, or (multiturn) chat sessions."""

    requests: tuple[BenchRequest, ...] = ()
    sessions: tuple[ChatSession, ...] = ()

    @property
    def num_requests(self) -> int:
        return len(self.requests) + sum(s.turns for s in self.sessions)


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """[L*(1-r), L*(1+r)] as integers, at least 1 (vLLM's --random-range-ratio)."""
    return max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio)))


def sample_random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> list[BenchRequest]:
    """`num_prompts` distinct prompts (no shared prefix), reproducible from `seed`.

    Without a tokenizer a prompt of N words from WORDS is about N tokens (exactly N with
    GPT-2-style BPE such as SmolLM2's). With a Hugging Face tokenizer, each prompt is cut or
    extended to exactly N tokens under it.
    """
    rng = random.Random(seed)
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    requests = []
    for _ in range(num_prompts):
        n_in, n_out = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
        requests.append(BenchRequest(_text(rng, n_in, tokenizer), n_in, n_out))
    return requests


def sample_shared_prefix_requests(
    num_prompts: int,
    prefix_len: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    tokenizer: Any | None = None,
    point: int = 0,
) -> list[BenchRequest]:
    """`num_prompts` requests that share one system prompt of `prefix_len` tokens, each with its
    own user turn of about `input_len` tokens (range_ratio applies to the user turn and max_tokens).

    The prefix depends on `seed` only, the user turns on `seed` and `point` (the sweep point's
    index): every point finds the prefix as the previous point left it, but never a whole prompt
    it has already seen, which a prefix cache would answer almost for free.
    """
    prefix = _text(_rng(seed, "shared-prefix", "prefix"), prefix_len, tokenizer)
    rng = _rng(seed, "shared-prefix", "users", point)
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    requests = []
    for _ in range(num_prompts):
        n_in, n_out = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
        requests.append(BenchRequest(_text(rng, n_in, tokenizer), prefix_len + n_in, n_out, system=prefix))
    return requests


def sample_sessions(
    num_sessions: int,
    turns: int,
    system_len: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    tokenizer: Any | None = None,
    point: int = 0,
) -> list[ChatSession]:
    """`num_sessions` conversations of `turns` user messages of about `input_len` tokens, each
    with its own system prompt of `system_len` tokens (0: none).

    System prompts are distinct, so turn 1 is a cold prefill and the TTFT of later turns shows
    what reusing the history saves. Sessions depend on `seed` and `point` (the sweep point's
    index), so no point replays a conversation that an earlier point left in the cache.
    """
    rng = _rng(seed, "multiturn", point)
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    sessions = []
    for _ in range(num_sessions):
        system = _text(rng, system_len, tokenizer) if system_len > 0 else None
        user_lens = tuple(rng.randint(in_lo, in_hi) for _ in range(turns))
        output_lens = tuple(rng.randint(out_lo, out_hi) for _ in range(turns))
        users = tuple(_text(rng, n, tokenizer) for n in user_lens)
        sessions.append(ChatSession(system, system_len if system else 0, users, user_lens, output_lens))
    return sessions


def _rng(seed: int, *parts: object) -> random.Random:
    """A generator per (seed, purpose): one purpose's draws never shift another's.
    NOTE: str seeds are hashed with SHA-512, so this is the same on every run and platform."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _text(rng: random.Random, num_tokens: int, tokenizer: Any | None) -> str:
    prompt = make_prompt(rng, num_tokens)
    return fit_to_tokens(tokenizer, prompt, num_tokens, rng) if tokenizer is not None else prompt


def fit_to_tokens(tokenizer: Any, prompt: str, num_tokens: int, rng: random.Random) -> str:
    """Cut or extend `prompt` so that it encodes to `num_tokens` tokens (before special tokens)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    while len(ids) < num_tokens:
        prompt += " " + " ".join(rng.choices(WORDS, k=num_tokens - len(ids)))
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    return tokenizer.decode(ids[:num_tokens])


def load_tokenizer(path: str) -> Any:
    """A local Hugging Face tokenizer folder (nothing is downloaded)."""
    from transformers import AutoTokenizer  # NOTE: lazy: only --tokenizer needs transformers

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


RANDOM_POINT_SEED_STEP = 7919


def build_workloads(cfg: BenchConfig, tokenizer: Any | None = None) -> list[Workload]:
    """One Workload per sweep point of `cfg`, for its dataset.

    Every point draws prompts of its own (random: from seed + RANDOM_POINT_SEED_STEP x point, so the first point
    sends what vLLM's client sends for --seed; shared-prefix and multiturn: fresh user turns, see
    sample_shared_prefix_requests and sample_sessions): a server with a prefix cache must not find a
    later point's prompts cached from an earlier one.
    """
    if cfg.dataset == "random":
        return [Workload(requests=tuple(sample_random_requests(
                    cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.range_ratio,
                    cfg.seed + RANDOM_POINT_SEED_STEP * i, tokenizer)))
                for i in range(len(cfg.points))]
    if cfg.dataset == "shared-prefix":
        return [Workload(requests=tuple(sample_shared_prefix_requests(
                    cfg.num_prompts, cfg.prefix_len, cfg.input_len, cfg.output_len, cfg.range_ratio, cfg.seed,
                    tokenizer, point=i)))
                for i in range(len(cfg.points))]
    return [Workload(sessions=tuple(sample_sessions(
                cfg.num_sessions, cfg.turns, cfg.prefix_len, cfg.input_len, cfg.output_len, cfg.range_ratio,
                cfg.seed, tokenizer, point=i)))
            for i in range(len(cfg.points))]


def warmup_request(cfg: BenchConfig) -> BenchRequest:
    """The initial test request: a short prompt of its own, so that it leaves nothing of the dataset
    in a prefix cache."""
    return BenchRequest(make_prompt(_rng(cfg.seed, "warmup"), 16), 16, min(16, cfg.output_len))
