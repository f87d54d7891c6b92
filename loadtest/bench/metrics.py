"""Statistics of one benchmark run, defined as in `vllm bench serve`.

- TTFT and E2EL: over successful requests. TPOT: (E2EL - TTFT) / (output_tokens - 1) over
  successful requests with more than one output token. ITL: every gap of every successful request.
- Percentiles interpolate linearly between order statistics (numpy's default); std is the
  population standard deviation. All latencies are reported in milliseconds.
- Goodput: successful requests that meet every given SLO, per second of benchmark duration. A
  request with one output token has TPOT 0 for this purpose (as in vLLM).
- Prefix cache: total_cached_tokens sums usage.prompt_tokens_details.cached_tokens; the hit ratio
  is that over the prompt tokens of the same requests (those whose server reported it). Both are
  null when no request reported it.
- Multiturn: the same TTFT statistics per turn number (ttft_by_turn), since turn k resends k-1
  turns of history: with a prefix cache its TTFT should stay near turn 1's, without it grows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.openai_api import RequestTiming

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """One request of a run: its timing, when it was sent (seconds after the run began), its intent.

    queue_time: seconds it waited for the client's concurrency limit between being due and being
    sent (vLLM's client_queue_time). text: the generated text, kept only with --save-detailed.
    """

    timing: RequestTiming
    start_offset: float
    prompt_len: int
    output_len: int
    queue_time: float = 0.0
    text: str | None = None
    session: int | None = None  # multiturn: the session's index in the sweep point's workload
    turn: int | None = None  # multiturn: 1 for the first user turn


def _prompt_tokens(record: RequestRecord) -> int:
    t = record.timing
    return t.prompt_tokens if t.prompt_tokens is not None else record.prompt_len


def cache_metrics(ok: Sequence[RequestRecord]) -> dict[str, Any]:
    """total_cached_tokens, prefix_cache_hit_ratio and cached_tokens_from_usage (how many
    requests reported cached tokens) of successful requests; see the module docstring."""
    reported = [r for r in ok if r.timing.cached_tokens is not None]
    cached = sum(r.timing.cached_tokens or 0 for r in reported)
    prompt = sum(_prompt_tokens(r) for r in reported)
    return {
        "total_cached_tokens": cached if reported else None,
        "prefix_cache_hit_ratio": (cached / prompt if prompt else 0.0) if reported else None,
        "cached_tokens_from_usage": len(reported),
    }


def ttft_by_turn(records: Sequence[RequestRecord], percentiles: Sequence[float] = (50, 90, 99)) -> list[dict[str, Any]]:
    """Per turn number of multiturn records: requests, mean prompt tokens, cache use and TTFT stats (ms)."""
    out = []
    for turn in sorted({r.turn for r in records if r.turn is not None}):
        rs = [r for r in records if r.turn == turn]
        ok = [r for r in rs if r.timing.ok]
        entry: dict[str, Any] = {
            "turn": turn,
            "completed": len(ok),
            "failed": len(rs) - len(ok),
            "mean_input_tokens": sum(_prompt_tokens(r) for r in ok) / len(ok) if ok else None,
            **cache_metrics(ok),
        }
        ttfts = [r.timing.ttft if r.timing.ttft is not None else r.timing.latency for r in ok]
        for stat, value in summarize_ms(ttfts, percentiles).items():
            entry[f"{stat}_ttft_ms"] = value
        out.append(entry)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def percentile_key(q: float) -> str:
    """50 -> 'p50', 99.9 -> 'p99.9' (vLLM's naming)."""
    return f"p{int(q)}" if float(q).is_integer() else f"p{q}"


def summarize_ms(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std and the given percentiles of seconds, in milliseconds."""
    if not values_s:
        out: dict[str, float | None] = {"mean": None, "median": None, "std": None}
        out.update({percentile_key(q): None for q in percentiles})
        return out
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms)
    out = {"mean": mean, "median": percentile(ms, 50), "std": math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))}
    out.update({percentile_key(q): percentile(ms, q) for q in percentiles})
    return out


def is_good(timing: RequestTiming, slos_ms: Mapping[str, float]) -> bool:
    """Whether a successful request meets every SLO (ttft/tpot/e2el, in ms)."""
    if not timing.ok:
        return False
    values = {
        "ttft": timing.ttft if timing.ttft is not None else timing.latency,
        "tpot": timing.tpot or 0.0,
        "e2el": timing.latency,
    }
    return all(values[name] * 1000.0 <= slo for name, slo in slos_ms.items())


def peak_output_throughput(records: Sequence[RequestRecord]) -> float:
    """Most output tokens seen within any one-second window bucket (tok/s), from chunk arrivals."""
    buckets: Counter[int] = Counter()
    for r in records:
        if r.timing.ok:
            for t in r.timing.token_times:
                buckets[int(r.start_offset + t)] += 1
    return float(max(buckets.values(), default=0))


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = (50, 90, 99),
    goodput_ms: Mapping[str, float] | None = None,
    streamed: bool = True,
) -> dict[str, Any]:
    """The result dict of one run (keys follow vLLM's result JSON where one exists)."""
    ok = [r for r in records if r.timing.ok]
    failed = [r for r in records if not r.timing.ok]
    timings = [r.timing for r in ok]
    input_tokens = sum(_prompt_tokens(r) for r in ok)
    output_tokens = sum(t.output_tokens for t in timings)
    dur = max(duration_s, 1e-9)
    series = {
        "ttft": [t.ttft if t.ttft is not None else t.latency for t in timings],
        "tpot": [t.tpot for t in timings if t.tpot is not None] if streamed else [],
        "itl": [gap for t in timings for gap in t.itls] if streamed else [],
        "e2el": [t.latency for t in timings],
    }
    result: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "duration": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / dur,
        "request_goodput": sum(is_good(t, goodput_ms) for t in timings) / dur if goodput_ms else None,
        "output_throughput": output_tokens / dur,
        "total_token_throughput": (input_tokens + output_tokens) / dur,
        "peak_output_throughput": peak_output_throughput(ok) if streamed else None,
        "output_tokens_from_usage": sum(t.tokens_from_usage for t in timings),
        **cache_metrics(ok),
        "errors": dict(Counter(r.timing.error for r in failed).most_common(5)),
    }
    for name in LATENCY_METRICS:
        for stat, value in summarize_ms(series[name], percentiles).items():
            result[f"{stat}_{name}_ms"] = value
    if any(r.turn is not None for r in records):
        result["ttft_by_turn"] = ttft_by_turn(records, percentiles)
    return result
