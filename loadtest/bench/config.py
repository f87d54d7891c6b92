"""BenchConfig: one frozen, validated description of a benchmark run, built once in __main__."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench.cost import Price

SLO_METRICS = ("ttft", "tpot", "e2el")
DATASETS = ("random", "shared-prefix", "multiturn")


@dataclass(frozen=True)
class Target:
    """One server to benchmark. model=None: ask the server's /v1/models and take the first."""

    name: str
    base_url: str
    model: str | None = None


@dataclass(frozen=True)
class SweepPoint:
    """concurrency None: no client-side limit; request_rate inf: send all requests at once."""

    concurrency: int | None
    request_rate: float


@dataclass(frozen=True)
class BenchConfig:
    """dataset: random (distinct prompts), shared-prefix (a system prompt of prefix_len tokens
    shared by all requests, then input_len of user turn) or multiturn (num_sessions chat
    sessions of `turns` turns of input_len tokens, each with a system prompt of prefix_len
    tokens; at a point of concurrency c, c clients run one session at a time each)."""

    endpoint: str = "completions"
    stream: bool = True
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    num_prompts: int = 100
    concurrencies: tuple[int | None, ...] = (None,)
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    goodput_ms: dict[str, float] = field(default_factory=dict)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    timeout_s: float = 600.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    warmup: bool = True
    result_dir: Path | None = None
    save_detailed: bool = False
    price: Price | None = None  # hourly instance price: adds cost per million tokens to results
    write_vllm: bool = True  # with result_dir: also one `vllm bench serve --save-result` file per point
    dataset: str = "random"
    prefix_len: int = 0  # shared-prefix: the shared system prompt; multiturn: each session's (0: none)
    turns: int = 5  # multiturn: user turns per session
    num_sessions: int = 1  # multiturn: sessions per sweep point

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"--endpoint must be completions or chat, got {self.endpoint!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "shared-prefix" and self.prefix_len < 1:
            raise ValueError("--prefix-len must be >= 1 with --dataset shared-prefix")
        if self.dataset == "multiturn":
            if self.endpoint != "chat":
                raise ValueError("--dataset multiturn needs --endpoint chat (a conversation is a list of messages)")
            if self.prefix_len < 0 or self.turns < 1 or self.num_sessions < 1:
                raise ValueError("--prefix-len must be >= 0, --turns and --num-sessions >= 1")
        if self.input_len < 1 or self.output_len < 1 or self.num_prompts < 1:
            raise ValueError("--input-len, --output-len and --num-prompts must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.burstiness <= 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if any(c is not None and c < 1 for c in self.concurrencies):
            raise ValueError("--concurrency values must be >= 1 (or inf for no limit)")
        if any(r <= 0 for r in self.request_rates):
            raise ValueError("--request-rate values must be > 0 (or inf)")
        if len(self.concurrencies) > 1 and len(self.request_rates) > 1:
            raise ValueError("sweep either --concurrency or --request-rate, not both")
        if not all(0 < p < 100 for p in self.percentiles):
            raise ValueError("--metric-percentiles must be in (0, 100)")
        if self.timeout_s <= 0:
            raise ValueError("--timeout must be > 0")

    @property
    def sweep_axis(self) -> str:
        """'request_rate' when the rate varies (or is the only thing set), else 'concurrency'."""
        if len(self.request_rates) > 1:
            return "request_rate"
        if len(self.concurrencies) == 1 and self.concurrencies[0] is None and math.isfinite(self.request_rates[0]):
            return "request_rate"
        return "concurrency"

    @property
    def requests_per_point(self) -> int:
        """Requests each sweep point sends (multiturn: every turn of every session)."""
        return self.num_sessions * self.turns if self.dataset == "multiturn" else self.num_prompts

    @property
    def points(self) -> list[SweepPoint]:
        return [SweepPoint(c, r) for c in self.concurrencies for r in self.request_rates]


def parse_concurrency(text: str) -> tuple[int | None, ...]:
    """'1,4,16' -> (1, 4, 16); 'inf' -> (None,)."""
    values = tuple(None if item.strip().lower() in ("inf", "none") else int(item) for item in _items(text))
    if not values:
        raise ValueError("empty --concurrency")
    return values


def parse_rates(text: str) -> tuple[float, ...]:
    """'1,2.5,inf' -> (1.0, 2.5, inf)."""
    values = tuple(float(item) for item in _items(text))
    if not values:
        raise ValueError("empty --request-rate")
    return values


def parse_goodput(items: list[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad --goodput item {item!r}; expected KEY:MS with KEY in {', '.join(SLO_METRICS)}")
        ms = float(value)
        if ms < 0:
            raise ValueError(f"bad --goodput item {item!r}: the SLO must be >= 0 ms")
        slos[name] = ms
    return slos


def parse_target(text: str) -> Target:
    """'kiln=http://127.0.0.1:8000' -> Target('kiln', 'http://127.0.0.1:8000')."""
    name, sep, url = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not url.startswith(("http://", "https://")):
        raise ValueError(f"bad --target {text!r}; expected NAME=http://HOST:PORT (NAME: letters, digits, _ . -)")
    return Target(name, normalize_base_url(url))


def normalize_base_url(url: str) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000' (routes are joined as /v1/...)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
