"""PNG plots of a sweep: throughput and latency percentiles against concurrency or request rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # NOTE: headless: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from loadtest.bench.metrics import percentile_key  # noqa: E402
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


def plot_all(results: Results, axis: str, percentiles: Sequence[float], out_dir: Path, prefix: str) -> list[Path]:
    """PREFIX-throughput.png and PREFIX-latency.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(r for rs in results.values() for r in rs)
    what = (f"{ENDPOINT_PATHS[first['endpoint']]}, input {first['input_len']} / output {first['output_len']} tokens, "
            f"{first['num_prompts']} prompts per point")
    versus = f"vs {_axis_label(axis).lower()}\n{what}"
    return [
        plot_throughput(results, axis, out_dir / f"{prefix}-throughput.png", f"Throughput {versus}"),
        plot_latency(results, axis, percentiles, out_dir / f"{prefix}-latency.png", f"Latency percentiles {versus}"),
    ]
