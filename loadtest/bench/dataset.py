"""The random dataset: prompts of a set token length from a seed, like vLLM's `--dataset-name random`."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from loadtest.prompts import WORDS, make_prompt


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # intended prompt tokens (the server's usage.prompt_tokens wins when it sends one)
    output_len: int  # max_tokens


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
        prompt = make_prompt(rng, n_in)
        if tokenizer is not None:
            prompt = fit_to_tokens(tokenizer, prompt, n_in, rng)
        requests.append(BenchRequest(prompt, n_in, n_out))
    return requests


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
