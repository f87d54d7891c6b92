"""Text, JSON and markdown output of benchmark results."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.bench.cost import currency_symbol
from loadtest.bench.metrics import percentile_key
from loadtest.openai_api import ENDPOINT_PATHS

_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def point_name(result: Mapping[str, Any]) -> str:
    """'c4-rinf' (concurrency 4, all at once), 'cinf-r2.5' (no limit, 2.5 req/s)."""
    conc, rate = result["concurrency"], result["request_rate"]
    return f"c{conc or 'inf'}-r{'inf' if rate is None else format(rate, 'g')}"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_result(result: Mapping[str, Any], percentiles: Sequence[float]) -> str:
    """The block `vllm bench serve` prints, for one sweep point."""
    rate = result["request_rate"]
    head = (f" {result['label']} | concurrency {result['concurrency'] or 'unlimited'} | "
            f"rate {rate if rate else 'inf'} req/s ")
    lines = [f"{head:=^60}"]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name:<44}{_fmt(value):>16}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    row("Maximum request concurrency:", result["concurrency"] or "unlimited")
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if result["request_goodput"] is not None:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Peak output token throughput (tok/s):", result["peak_output_throughput"])
    row("Peak concurrent requests:", result["max_concurrent_requests"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    if result.get("total_cached_tokens") is not None:
        lines.append(f"{'Prefix cache':-^60}")
        row("Cached prompt tokens:", result["total_cached_tokens"])
        row("Prefix cache hit ratio (%):", 100.0 * result["prefix_cache_hit_ratio"])
        if result["cached_tokens_from_usage"] < result["completed"]:
            row("Requests that reported cached tokens:", result["cached_tokens_from_usage"])
    if "cost_per_hour" in result:
        sym = currency_symbol(result["currency"])
        lines.append(f"{'Cost at the measured throughput':-^60}")
        lines.append(f"{result['instance_type'] or 'instance'} at {sym}{result['cost_per_hour']:g}/hour "
                     f"({result['price_source']})")
        row(f"Cost per 1M output tokens ({sym.strip()}):", _money(result["cost_per_million_output_tokens"]))
        row(f"Cost per 1M input tokens ({sym.strip()}):", _money(result["cost_per_million_input_tokens"]))
    for metric, title in _TITLES.items():
        lines.append(f"{title:-^60}")
        name = metric.upper()
        row(f"Mean {name} (ms):", result[f"mean_{metric}_ms"])
        row(f"Median {name} (ms):", result[f"median_{metric}_ms"])
        for q in percentiles:
            if q == 50:
                continue  # the median, printed above
            key = percentile_key(q)
            row(f"{key.upper()} {name} (ms):", result[f"{key}_{metric}_ms"])
    if result.get("ttft_by_turn"):
        lines += format_ttft_by_turn(result["ttft_by_turn"], percentiles)
    for error, count in result["errors"].items():
        lines.append(f"error x{count}: {error}")
    lines.append("=" * 60)
    return "\n".join(lines)


def _turn_columns(percentiles: Sequence[float]) -> list[tuple[str, str]]:
    """(header, key) of the per-turn TTFT statistics: mean, then the percentiles (p50 is the median)."""
    return [("mean", "mean_ttft_ms"), *((percentile_key(q), f"{percentile_key(q)}_ttft_ms") for q in percentiles)]


def format_ttft_by_turn(by_turn: Sequence[Mapping[str, Any]], percentiles: Sequence[float]) -> list[str]:
    """The console table of TTFT per multiturn turn (and the prompt tokens and cache hits behind it)."""
    cols = _turn_columns(percentiles)
    cached = any(t["total_cached_tokens"] is not None for t in by_turn)
    lines = [f"{'TTFT by turn (ms)':-^60}"]
    head = f"{'turn':>4} {'ok':>4} {'prompt':>7}" + (f" {'hit%':>5}" if cached else "")
    lines.append(head + "".join(f" {name:>8}" for name, _ in cols))
    for t in by_turn:
        line = f"{t['turn']:>4} {t['completed']:>4} {_fmt(t['mean_input_tokens'], 0):>7}"
        if cached:
            ratio = t["prefix_cache_hit_ratio"]
            line += f" {_fmt(None if ratio is None else 100.0 * ratio, 0):>5}"
        lines.append(line + "".join(f" {_fmt(t[key], 1):>8}" for _, key in cols))
    return lines


def write_json(results: Sequence[Mapping[str, Any]], out_dir: Path, label: str) -> list[Path]:
    """One JSON per sweep point (LABEL-POINT.json) plus LABEL-sweep.json with all of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for result in results:
        path = out_dir / f"{safe_name(label)}-{point_name(result)}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        paths.append(path)
    sweep = out_dir / f"{safe_name(label)}-sweep.json"
    sweep.write_text(json.dumps(list(results), indent=2) + "\n")
    return [*paths, sweep]


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "run"


def markdown_table(results_by_target: Mapping[str, Sequence[Mapping[str, Any]]], percentiles: Sequence[float]) -> str:
    """One row per (target, sweep point): throughput, median and tail latencies, failures."""
    tail = percentile_key(max(percentiles))
    priced = [r for rs in results_by_target.values() for r in rs if "cost_per_hour" in r]
    sym = currency_symbol(priced[0]["currency"]).strip() if priced else "$"
    cached = any(r.get("total_cached_tokens") is not None for rs in results_by_target.values() for r in rs)
    header = ["target", "concurrency", "rate (req/s)", "ok", "failed", "req/s", "output tok/s", "total tok/s",
              "goodput (req/s)", "TTFT p50 (ms)", f"TTFT {tail}", "TPOT p50 (ms)", f"TPOT {tail}",
              "ITL p50 (ms)", f"ITL {tail}", "E2EL p50 (ms)", f"E2EL {tail}"]
    if cached:
        header += ["cached tok", "cache hit %"]
    if priced:
        header += ["instance", f"{sym}/hour", f"{sym}/1M output tok", f"{sym}/1M input tok"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, results in results_by_target.items():
        for r in results:
            cells = [label, r["concurrency"] or "unlimited", r["request_rate"] or "inf", r["completed"], r["failed"],
                     r["request_throughput"], r["output_throughput"], r["total_token_throughput"],
                     r["request_goodput"]]
            for metric in ("ttft", "tpot", "itl", "e2el"):
                cells += [r[f"median_{metric}_ms"], r[f"{tail}_{metric}_ms"]]
            if cached:
                ratio = r.get("prefix_cache_hit_ratio")
                cells += [r.get("total_cached_tokens"), None if ratio is None else 100.0 * ratio]
            if priced:
                hourly = f"{r['cost_per_hour']:g}" if "cost_per_hour" in r else "n/a"
                cells += [r.get("instance_type") or "-", hourly, _money(r.get("cost_per_million_output_tokens")),
                          _money(r.get("cost_per_million_input_tokens"))]
            lines.append("| " + " | ".join(_fmt(c, 1) for c in cells) + " |")
    return "\n".join(lines)


def markdown_report(
    results_by_target: Mapping[str, Sequence[Mapping[str, Any]]], percentiles: Sequence[float], images: Sequence[str]
) -> str:
    """A markdown page: the settings, the table, the plots."""
    first = next((rs[0] for rs in results_by_target.values() if rs), None)
    lines = ["# Serving benchmark", ""]
    if first:
        lines += [
            f"- date: {first['date']}; endpoint: {ENDPOINT_PATHS[first['endpoint']]} "
            f"({'streamed' if first['stream'] else 'not streamed'})",
            f"- {dataset_summary(first)} (range ratio {first['range_ratio']}), ignore_eos {first['ignore_eos']}, "
            f"temperature {first['temperature']}, seed {first['seed']}",
            f"- goodput SLOs (ms): {first['goodput_slos_ms'] or 'none'}",
            *_price_lines(results_by_target),
            "- targets: " + ", ".join(
                f"{k} = {v[0]['base_url']} ({v[0]['model']})" for k, v in results_by_target.items() if v),
            "",
        ]
    lines += [markdown_table(results_by_target, percentiles), ""]
    if any(r.get("ttft_by_turn") for rs in results_by_target.values() for r in rs):
        lines += ["## TTFT by turn", "", markdown_turn_table(results_by_target, percentiles), ""]
    lines += [f"![{Path(image).stem}]({image})" for image in images]
    return "\n".join(lines) + "\n"


def dataset_summary(result: Mapping[str, Any]) -> str:
    """'random dataset: 100 prompts per point, input 256 / output 128 tokens' and the like."""
    dataset = result.get("dataset", "random")
    if dataset == "shared-prefix":
        return (f"shared-prefix dataset: {result['num_prompts']} prompts per point, a {result['prefix_len']}-token "
                f"system prompt shared by all + a {result['input_len']}-token user turn / output "
                f"{result['output_len']} tokens")
    if dataset == "multiturn":
        system = f"a {result['prefix_len']}-token system prompt, " if result["prefix_len"] else ""
        return (f"multiturn dataset: {result['num_sessions']} sessions x {result['turns']} turns per point, "
                f"{system}user turns of {result['input_len']} / output {result['output_len']} tokens")
    return (f"random dataset: {result['num_prompts']} prompts per point, input {result['input_len']} / output "
            f"{result['output_len']} tokens")


def markdown_turn_table(results_by_target: Mapping[str, Sequence[Mapping[str, Any]]],
                        percentiles: Sequence[float]) -> str:
    """One row per (target, sweep point, turn): mean prompt tokens, cache hits, TTFT statistics."""
    cols = _turn_columns(percentiles)
    header = ["target", "concurrency", "rate (req/s)", "turn", "ok", "failed", "mean prompt tok", "cache hit %",
              *(f"TTFT {name} (ms)" for name, _ in cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, results in results_by_target.items():
        for r in results:
            for t in r.get("ttft_by_turn") or []:
                ratio = t["prefix_cache_hit_ratio"]
                cells = [label, r["concurrency"] or "unlimited", r["request_rate"] or "inf", t["turn"], t["completed"],
                         t["failed"], t["mean_input_tokens"], None if ratio is None else 100.0 * ratio,
                         *(t[key] for _, key in cols)]
                lines.append("| " + " | ".join(_fmt(c, 1) for c in cells) + " |")
    return "\n".join(lines)


def _money(value: float | None) -> str:
    """Costs per million tokens span $0.001 to $1000: four significant digits."""
    return "n/a" if value is None else f"{value:.4g}"


def _price_lines(results_by_target: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The markdown page's note on the cost columns (none when the run was not priced)."""
    prices = {(r.get("instance_type"), r["cost_per_hour"], r["currency"], r["price_source"])
              for rs in results_by_target.values() for r in rs if "cost_per_hour" in r}
    if not prices:
        return []
    lines = ["- cost: " + "; ".join(f"{name or 'instance'} at {currency_symbol(cur)}{cost:g}/hour ({source})"
                                    for name, cost, cur, source in sorted(prices, key=str))]
    lines.append("  - per 1M output tokens = cost per hour / (output tok/s x 3600) x 1e6; per 1M input tokens the "
                 "same with input tok/s over the same duration. Each charges the whole hour to one kind of "
                 "token: the two do not add up.")
    return lines
