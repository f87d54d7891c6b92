"""Synthetic prompts whose token length is controlled, and the length distributions to draw from.

Prompts are built from WORDS: common English words that are each one token (with their leading
space) in GPT-2-style BPE vocabularies such as SmolLM2's and Llama's, so a prompt of N words is
about N prompt tokens (exactly N with the SmolLM2 tokenizer; the chat template adds its own).

Length specs (`parse_length_spec`), used by the locustfile and the benchmark:

    128                      fixed length 128 (same as fixed:128)
    fixed:128
    uniform:32:512           uniform integer in [32, 512]
    lognormal:median=128,sigma=1.0,min=4,max=1536
    chat                     long-tailed preset shaped like chat traffic (lognormal, see CHAT_PRESET)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is was for on that with as by at from his her they this which or had are
    not but be have an were their one all been more has when who will would there can other into
    its first some time these two new may only over also after many such most them then than about
    years made so could where any between through during used both under three well being even out
    what while later year work back world city part called life she since up number each before
    known because people state very school same however several long found until high own around
    day large days often home small war early much another game group name good end man second
    order family those show four place house best system few great way did just how line area set
    down local left national form take country public land water party old give hand point real
    fact case make said right head eye light power book word side food money story music art film
    team girl boy love door room road car king river sea tree child friend night morning voice body
    face mind heart field town market table window paper study plan health season island garden
    forest village summer winter spring letter answer question reason moment nature history church
    company office report change price level value energy color student teacher doctor animal bird
    fish horse stone gold silver glass cloud rain snow wind fire earth star moon sun sky mountain
    valley ocean beach bridge tower castle palace farm kitchen bread cheese apple orange sugar salt
    coffee pencil picture camera phone computer engine machine train plane ship boat wheel chair
    bed floor wall roof clock hour minute week month dream idea rule law peace truth chance choice
    course focus image model style theory skill sense
    """.split()
)

# Shaped like chat traffic (LMSYS-Chat / ShareGPT prompts: median around a hundred tokens, a long
# tail of pasted documents). Capped so prompt + a typical max_tokens fits max_model_len 2048.
CHAT_PRESET = "lognormal:median=128,sigma=1.0,min=4,max=1536"


@dataclass(frozen=True)
class FixedLength:
    length: int

    def sample(self, rng: random.Random) -> int:
        return self.length

    @property
    def max_length(self) -> int:
        return self.length


@dataclass(frozen=True)
class UniformLength:
    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    @property
    def max_length(self) -> int:
        return self.high


@dataclass(frozen=True)
class LognormalLength:
    """exp(N(ln(median), sigma)), rounded and clipped to [min_length, max_length]."""

    median: float
    sigma: float
    min_length: int
    max_length: int

    def sample(self, rng: random.Random) -> int:
        value = round(rng.lognormvariate(math.log(self.median), self.sigma))
        return min(max(value, self.min_length), self.max_length)


LengthDistribution = FixedLength | UniformLength | LognormalLength


def parse_length_spec(spec: str) -> LengthDistribution:
    """Parse a length spec (see the module docstring); raises ValueError with the spec on error."""
    text = spec.strip().lower()
    if text == "chat":
        text = CHAT_PRESET
    kind, _, rest = text.partition(":")
    try:
        if kind.isdigit():
            dist: LengthDistribution = FixedLength(int(kind))
        elif kind == "fixed":
            dist = FixedLength(int(rest))
        elif kind == "uniform":
            low, high = (int(x) for x in rest.split(":"))
            dist = UniformLength(low, high)
        elif kind == "lognormal":
            fields = dict(item.split("=", 1) for item in rest.split(",") if item)
            unknown = set(fields) - {"median", "sigma", "min", "max"}
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
            dist = LognormalLength(
                median=float(fields["median"]),
                sigma=float(fields.get("sigma", 1.0)),
                min_length=int(fields.get("min", 1)),
                max_length=int(fields.get("max", 2048)),
            )
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"bad length spec {spec!r} ({e}); expected N, fixed:N, uniform:LO:HI, "
            "lognormal:median=M,sigma=S,min=A,max=B or chat"
        ) from None
    _check(dist, spec)
    return dist


def _check(dist: LengthDistribution, spec: str) -> None:
    if isinstance(dist, FixedLength):
        ok = dist.length >= 1
    elif isinstance(dist, UniformLength):
        ok = 1 <= dist.low <= dist.high
    else:
        ok = dist.median > 0 and dist.sigma >= 0 and 1 <= dist.min_length <= dist.max_length
    if not ok:
        raise ValueError(f"bad length spec {spec!r}: lengths must be >= 1 and ordered low <= high")


def make_prompt(rng: random.Random, num_words: int) -> str:
    """`num_words` random words from WORDS, space-separated (about num_words tokens)."""
    return " ".join(rng.choices(WORDS, k=num_words))


class PromptSampler:
    """Draws (prompt, max_tokens) pairs from a seeded generator; one per locust user or bench run."""

    def __init__(self, prompt_len: LengthDistribution, output_len: LengthDistribution, seed: int):
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.rng = random.Random(seed)

    def sample(self) -> tuple[str, int, int]:
        """Returns (prompt text, prompt length in words, max_tokens)."""
        num_words = self.prompt_len.sample(self.rng)
        return make_prompt(self.rng, num_words), num_words, self.output_len.sample(self.rng)
