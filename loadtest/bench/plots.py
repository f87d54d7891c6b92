"""PNG plots of a sweep: throughput and latency percentiles against concurrency or request rate;
for multiturn runs also TTFT against the turn number (the cost of resending a growing history)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # NOTE: headless: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from loadtest.bench.metrics import percentile_key  # noqa: E402
from loadtest.bench.report import dataset_summary, point_name  # noqa: E402
from loadtest.openai_api import ENDPOINT_PATHS  # noqa: E402

Results = Mapping[str, Sequence[Mapping[str, Any]]]
_LATENCY = (("ttft", "Time to first token"), ("tpot", "Time per output token"),
            ("itl", "Inter-token latency"), ("e2el", "End-to-end latency"))
_STYLES = ("-", "--", ":", "-.")


def _x(result: Mapping[str, Any], axis: str) -> float:
    if axis == "request_rate":
        return result["request_rate"] or float(result["num_prompts"])
    return result["concurrency"] or result["max_concurrent_requests"]


def _axis_label(axis: str) -> str:
    return "Request rate (req/s)" if axis == "request_rate" else "Concurrent requests (client limit)"


def _setup_x(ax: Any, xs: Sequence[float], axis: str) -> None:
    ax.set_xlabel(_axis_label(axis))
    ax.grid(True, which="major", alpha=0.4)
    if axis == "concurrency" and xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(xs)))
    ax.set_xticklabels([f"{x:g}" for x in sorted(set(xs))])


def plot_throughput(results: Results, axis: str, path: Path, title: str) -> Path:
    """Output tok/s (left) and request throughput with goodput (right), one line per target."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs_all: list[float] = []
    for i, (label, rs) in enumerate(results.items()):
        rs = sorted(rs, key=lambda r: _x(r, axis))
        xs = [_x(r, axis) for r in rs]
        xs_all += xs
        color = f"C{i}"
        left.plot(xs, [r["output_throughput"] for r in rs], "o-", color=color, label=f"{label} output")
        left.plot(xs, [r["total_token_throughput"] for r in rs], "s--", color=color, alpha=0.6,
                  label=f"{label} input+output")
        right.plot(xs, [r["request_throughput"] for r in rs], "o-", color=color, label=f"{label} requests")
        if any(r["request_goodput"] is not None for r in rs):
            right.plot(xs, [r["request_goodput"] for r in rs], "^:", color=color, label=f"{label} goodput")
    left.set_title("Token throughput")
    left.set_ylabel("Tokens per second")
    right.set_title("Request throughput")
    right.set_ylabel("Requests per second")
    for ax in (left, right):
        _setup_x(ax, xs_all, axis)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(results: Results, axis: str, percentiles: Sequence[float], path: Path, title: str) -> Path:
    """TTFT, TPOT, ITL and E2EL percentiles: colour = target, line style = percentile."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    keys = [percentile_key(q) for q in percentiles]
    xs_all: list[float] = []
    for ax, (metric, name) in zip(axes.flat, _LATENCY):
        for i, (label, rs) in enumerate(results.items()):
            rs = sorted(rs, key=lambda r: _x(r, axis))
            xs = [_x(r, axis) for r in rs]
            xs_all += xs
            for key, style in zip(keys, _STYLES):
                ys = [r[f"{key}_{metric}_ms"] for r in rs]
                if any(y is not None for y in ys):
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o",
                            markersize=3, color=f"C{i}")
        ax.set_title(name)
        ax.set_ylabel("Milliseconds")
        ax.set_ylim(bottom=0)
        _setup_x(ax, xs_all, axis)
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=label) for i, label in enumerate(results)]
    handles += [Line2D([], [], color="grey", ls=style, label=key) for key, style in zip(keys, _STYLES)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_by_turn(results: Results, percentiles: Sequence[float], path: Path, title: str) -> Path:
    """Multiturn: mean and percentile TTFT against the turn number, one panel per statistic and one
    line per (target, sweep point); plus the prefix cache hit ratio per turn when servers report it.
    Flat lines mean the history was not recomputed; lines rising with the turn mean it was."""
    stats = [("mean", "Mean TTFT")] + [(percentile_key(q), f"{percentile_key(q).upper()} TTFT") for q in percentiles]
    stats = stats[:4]
    cached = any(t["total_cached_tokens"] is not None
                 for rs in results.values() for r in rs for t in r.get("ttft_by_turn") or [])
    panels = len(stats) + cached
    cols = 2 if panels > 1 else 1
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    lines = [(label, r) for label, rs in results.items() for r in rs if r.get("ttft_by_turn")]
    for ax, (stat, name) in zip(axes.flat, stats):
        for i, (label, r) in enumerate(lines):
            turns = r["ttft_by_turn"]
            ys = [t[f"{stat}_ttft_ms"] for t in turns]
            ax.plot([t["turn"] for t in turns], [float("nan") if y is None else y for y in ys],
                    _STYLES[list(results).index(label) % len(_STYLES)], marker="o", markersize=3, color=f"C{i % 10}",
                    label=f"{label} {point_name(r)}")
        ax.set_title(name)
        ax.set_ylabel("Milliseconds")
        ax.set_ylim(bottom=0)
    if cached:
        ax = axes.flat[len(stats)]
        for i, (label, r) in enumerate(lines):
            turns = r["ttft_by_turn"]
            ys = [t["prefix_cache_hit_ratio"] for t in turns]
            ax.plot([t["turn"] for t in turns], [float("nan") if y is None else 100.0 * y for y in ys],
                    _STYLES[list(results).index(label) % len(_STYLES)], marker="o", markersize=3, color=f"C{i % 10}")
        ax.set_title("Prompt tokens served from the prefix cache")
        ax.set_ylabel("Percent")
        ax.set_ylim(0, 105)
    for ax in axes.flat[:panels]:
        ax.set_xlabel("Turn")
        ax.grid(True, which="major", alpha=0.4)
        turns_all = sorted({t["turn"] for _, r in lines for t in r["ttft_by_turn"]})
        ax.set_xticks(turns_all)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(handles) / 6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: Results, axis: str, percentiles: Sequence[float], out_dir: Path, prefix: str) -> list[Path]:
    """PREFIX-throughput.png and PREFIX-latency.png in out_dir; PREFIX-ttft-by-turn.png for multiturn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(r for rs in results.values() for r in rs)
    what = f"{ENDPOINT_PATHS[first['endpoint']]}, {dataset_summary(first)}"
    versus = f"vs {_axis_label(axis).lower()}\n{what}"
    paths = [
        plot_throughput(results, axis, out_dir / f"{prefix}-throughput.png", f"Throughput {versus}"),
        plot_latency(results, axis, percentiles, out_dir / f"{prefix}-latency.png", f"Latency percentiles {versus}"),
    ]
    if any(r.get("ttft_by_turn") for rs in results.values() for r in rs):
        paths.append(plot_ttft_by_turn(results, percentiles, out_dir / f"{prefix}-ttft-by-turn.png",
                                       f"Time to first token by turn\n{what}"))
    return paths
