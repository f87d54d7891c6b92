"""Statistics of the serving benchmark: percentiles, TPOT, ITL, goodput, arrivals, config parsing."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from loadtest.bench.config import (
    BenchConfig, normalize_base_url, parse_concurrency, parse_goodput, parse_rates, parse_target,
)
from loadtest.bench.dataset import length_range, sample_random_requests
from loadtest.bench.metrics import RequestRecord, compute_metrics, is_good, percentile, summarize_ms
from loadtest.bench.runner import arrival_offsets
from loadtest.openai_api import RequestTiming


def timing(ttft: float, latency: float, tokens: int, itls: list[float] | None = None, ok: bool = True,
           prompt_tokens: int | None = 10) -> RequestTiming:
    return RequestTiming(ok=ok, error=None if ok else "boom", ttft=ttft, latency=latency, itls=itls or [],
                         token_times=[ttft + sum((itls or [])[:i]) for i in range(tokens)],
                         output_tokens=tokens, prompt_tokens=prompt_tokens, tokens_from_usage=True)


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 7, 13) ** 2)])
@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None
    assert summarize_ms([], [50, 99]) == {"mean": None, "median": None, "std": None, "p50": None, "p99": None}


def test_summarize_is_in_milliseconds_with_population_std() -> None:
    out = summarize_ms([0.010, 0.020, 0.030, 0.040], [50, 99.9])
    assert out["mean"] == pytest.approx(25.0)
    assert out["median"] == pytest.approx(25.0)
    assert out["std"] == pytest.approx(statistics.pstdev([10, 20, 30, 40]))
    assert out["p99.9"] == pytest.approx(float(np.percentile([10, 20, 30, 40], 99.9)))


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    assert timing(0.2, 1.2, 11).tpot == pytest.approx((1.2 - 0.2) / 10)
    assert timing(0.2, 0.2, 1).tpot is None  # one token: no decode time
    assert RequestTiming(ok=True, ttft=None, latency=1.0, output_tokens=5).tpot is None


def test_goodput_needs_every_slo_met() -> None:
    t = timing(0.100, 1.000, 10)  # TPOT 100 ms
    assert is_good(t, {"ttft": 100, "tpot": 100, "e2el": 1000})  # limits are inclusive
    assert not is_good(t, {"ttft": 99})
    assert not is_good(t, {"tpot": 99})
    assert not is_good(t, {"e2el": 999})
    assert is_good(timing(0.05, 0.05, 1), {"tpot": 0})  # one token counts as TPOT 0, like vLLM
    assert not is_good(timing(0.01, 0.01, 5, ok=False), {"ttft": 1000})


def test_compute_metrics_on_hand_built_requests() -> None:
    records = [
        RequestRecord(timing(0.1, 0.5, 5, [0.1] * 4), 0.0, 10, 5),
        RequestRecord(timing(0.3, 1.1, 3, [0.4, 0.4], prompt_tokens=None), 0.2, 12, 3),
        RequestRecord(timing(0.2, 0.2, 1), 0.4, 10, 1),
        RequestRecord(RequestTiming(ok=False, error="HTTP 500: x", latency=0.05), 0.5, 10, 5),
    ]
    m = compute_metrics(records, duration_s=2.0, percentiles=[50, 99], goodput_ms={"ttft": 250})
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_output_tokens"] == 9
    assert m["total_input_tokens"] == 10 + 12 + 10  # prompt_len stands in when usage has no prompt_tokens
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx((32 + 9) / 2)
    assert m["request_goodput"] == pytest.approx(2 / 2.0)  # TTFT 100 and 200 ms meet 250; 300 does not
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx((100.0 + 400.0) / 2)  # the one-token request has no TPOT
    assert m["median_itl_ms"] == pytest.approx(100.0)  # gaps pooled: 0.1 x4, 0.4 x2
    assert m["p99_itl_ms"] == pytest.approx(float(np.percentile([100] * 4 + [400] * 2, 99)))
    assert m["mean_e2el_ms"] == pytest.approx((500 + 1100 + 200) / 3)
    assert m["errors"] == {"HTTP 500: x": 1}
    assert m["peak_output_throughput"] == 8.0  # tokens in second 0; the last one lands at 1.3 s


def test_no_goodput_without_slos_and_no_tpot_unstreamed() -> None:
    m = compute_metrics([RequestRecord(timing(0.5, 0.5, 4), 0, 1, 4)], 1.0, streamed=False)
    assert m["request_goodput"] is None
    assert m["mean_tpot_ms"] is None and m["mean_itl_ms"] is None
    assert m["mean_ttft_ms"] == pytest.approx(500.0)


def test_poisson_arrivals_have_the_requested_rate() -> None:
    offsets = arrival_offsets(4000, request_rate=20.0, burstiness=1.0, seed=1)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 20, rel=0.1)  # exponential: std equals the mean
    bursty = np.diff(arrival_offsets(4000, 20.0, burstiness=0.25, seed=1))
    assert bursty.mean() == pytest.approx(1 / 20, rel=0.15)
    assert bursty.std() > 1.5 * gaps.std()  # gamma shape 0.25: coefficient of variation 2
    assert arrival_offsets(5, math.inf, 1.0, 0) == [0.0] * 5
    assert arrival_offsets(50, 5.0, 1.0, 7) == arrival_offsets(50, 5.0, 1.0, 7)


def test_random_dataset_is_seeded_and_within_the_range() -> None:
    assert length_range(100, 0.25) == (75, 125)
    a = sample_random_requests(50, 100, 20, range_ratio=0.25, seed=3)
    assert a == sample_random_requests(50, 100, 20, range_ratio=0.25, seed=3)
    assert a != sample_random_requests(50, 100, 20, range_ratio=0.25, seed=4)
    assert all(75 <= r.prompt_len <= 125 and 15 <= r.output_len <= 25 for r in a)
    assert all(len(r.prompt.split()) == r.prompt_len for r in a)
    assert len({r.prompt.split()[0:8].__repr__() for r in a}) > 40  # prompts do not share prefixes


def test_config_parsing_and_validation() -> None:
    assert parse_concurrency("1, 4,16") == (1, 4, 16)
    assert parse_concurrency("inf") == (None,)
    assert parse_rates("2,inf") == (2.0, math.inf)
    assert parse_goodput(["ttft:500", "TPOT:50", "e2el:2000.5"]) == {"ttft": 500, "tpot": 50, "e2el": 2000.5}
    for bad in (["ttft"], ["itl:5"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    t = parse_target("kiln=http://127.0.0.1:8000/v1/")
    assert (t.name, t.base_url, t.model) == ("kiln", "http://127.0.0.1:8000", None)
    assert normalize_base_url("http://h:1/") == "http://h:1"
    with pytest.raises(ValueError):
        parse_target("http://127.0.0.1:8000")
    with pytest.raises(ValueError):
        BenchConfig(concurrencies=(1, 2), request_rates=(1.0, 2.0))
    with pytest.raises(ValueError):
        BenchConfig(endpoint="embeddings")
    assert BenchConfig(concurrencies=(1, 4)).sweep_axis == "concurrency"
    assert BenchConfig(request_rates=(1.0, 2.0)).sweep_axis == "request_rate"
    assert BenchConfig(request_rates=(3.0,)).sweep_axis == "request_rate"
