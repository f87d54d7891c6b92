"""CLI of the serving benchmark.

    python -m loadtest.bench [run] --base-url http://127.0.0.1:8000 [--model NAME] [options]
    python -m loadtest.bench compare --target kiln=http://127.0.0.1:8000 --target llamacpp=http://127.0.0.1:8001
    python -m loadtest.bench plot RESULT_DIR        # redraw plots and table from *-sweep.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench.config import (
    DATASETS, BenchConfig, Target, normalize_base_url, parse_concurrency, parse_goodput, parse_rates, parse_target,
)
from loadtest.bench.cost import DEFAULT_PRICES, resolve_price
from loadtest.bench.dataset import build_workloads, load_tokenizer
from loadtest.bench.metrics import RequestRecord
from loadtest.bench.report import format_result, markdown_report, safe_name, write_json
from loadtest.bench.runner import BenchError, run_target
from loadtest.bench.vllm_result import VLLM_VERSION, vllm_result, write_vllm_result

DEFAULT_CONCURRENCY = "1,4,16,32"
# Per dataset, the defaults of --endpoint, --input-len and --prefix-len: the caching datasets are
# chat traffic with short user turns, sized so that a 5-turn history fits max_model_len 2048.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "random": {"endpoint": "completions", "input_len": 256, "prefix_len": 0},
    "shared-prefix": {"endpoint": "chat", "input_len": 50, "prefix_len": 1000},
    "multiturn": {"endpoint": "chat", "input_len": 50, "prefix_len": 100},
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name to send (default: the first id of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default=None,
                   help="default: completions for random, chat for shared-prefix and multiturn")
    p.add_argument("--no-stream", action="store_true", help="non-streamed requests (TTFT = E2EL; no TPOT/ITL)")
    p.add_argument("--dataset", "--dataset-name", dest="dataset_name", choices=DATASETS, default="random",
                   help="random: distinct prompts; shared-prefix: one --prefix-len system prompt shared by all "
                        "requests + a distinct --input-len user turn; multiturn: chat sessions resending their "
                        "history for --turns turns")
    p.add_argument("--input-len", "--random-input-len", type=int, default=None,
                   help="prompt tokens; with shared-prefix and multiturn, of each user turn "
                        "(default 256; 50 with shared-prefix and multiturn)")
    p.add_argument("--prefix-len", type=int, default=None,
                   help="system prompt tokens: shared by every request with shared-prefix (default 1000); "
                        "each multiturn session's own (default 100; 0: none)")
    p.add_argument("--turns", type=int, default=5, help="multiturn: user turns per session")
    p.add_argument("--num-sessions", type=int, default=None,
                   help="multiturn: sessions per sweep point (default: the largest --concurrency, so that at "
                        "that point every client runs one session; with no limit, --num-prompts / --turns)")
    p.add_argument("--output-len", "--random-output-len", type=int, default=128, help="max_tokens")
    p.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)]")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per sweep point (not multiturn)")
    p.add_argument("--concurrency", "--max-concurrency", default=None,
                   help=f"client concurrency limit(s), comma-separated; 'inf' for none "
                        f"(default {DEFAULT_CONCURRENCY}, or inf with --request-rate)")
    p.add_argument("--request-rate", default="inf", help="request rate(s) in req/s, comma-separated; inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (vLLM extra field) to get exactly max_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer token (default $OPENAI_API_KEY)")
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer folder: make prompts exactly --input-len tokens")
    p.add_argument("--no-warmup", action="store_true", help="skip the initial test request")
    p.add_argument("--result-dir", type=Path, default=None, help="write JSON, PNG plots and a markdown table here")
    p.add_argument("--save-detailed", action="store_true",
                   help="keep per-request timings in the JSON (and the generated texts in the vLLM-format file)")
    p.add_argument("--no-vllm-result", action="store_true",
                   help=f"with --result-dir, do not also write one `vllm bench serve --save-result` JSON "
                        f"(vLLM {VLLM_VERSION}'s keys and file name) per sweep point")
    p.add_argument("--instance-type", metavar="NAME",
                   help=f"price the run: adds $ per million output and input tokens at the measured throughput, "
                        f"from the hourly price of NAME in the price table ({DEFAULT_PRICES.name}: us-east-1 "
                        f"On-Demand; e.g. inf2.xlarge, trn1.2xlarge, c7i.xlarge)")
    p.add_argument("--cost-per-hour", type=float, metavar="USD",
                   help="hourly price in USD to use instead of the table's (with or without --instance-type)")
    p.add_argument("--prices", type=Path, metavar="FILE",
                   help=f"price table to use instead of loadtest/bench/{DEFAULT_PRICES.name} (same JSON shape)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="benchmark one server")
    run.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    run.add_argument("--label", default="server", help="name of this target in files and plots")
    _add_common(run)
    compare = sub.add_parser("compare", help="the same sweep against several servers, one after another")
    compare.add_argument("--target", action="append", required=True, metavar="NAME=URL", help="repeat per server")
    _add_common(compare)
    plot = sub.add_parser("plot", help="redraw plots and comparison.md from the *-sweep.json in a folder")
    plot.add_argument("result_dir", type=Path)
    plot.add_argument("--metric-percentiles", default="50,90,99")
    return parser


def build_config(args: argparse.Namespace) -> BenchConfig:
    rates = parse_rates(args.request_rate)
    default_conc = "inf" if any(math.isfinite(r) for r in rates) else DEFAULT_CONCURRENCY
    concurrencies = parse_concurrency(args.concurrency or default_conc)
    defaults = DATASET_DEFAULTS[args.dataset_name]
    if args.dataset_name == "random" and args.prefix_len:
        raise ValueError("--prefix-len needs --dataset shared-prefix or multiturn")
    return BenchConfig(
        endpoint=args.endpoint or defaults["endpoint"], stream=not args.no_stream,
        input_len=_given(args.input_len, defaults["input_len"]), output_len=args.output_len,
        range_ratio=args.range_ratio, num_prompts=args.num_prompts,
        dataset=args.dataset_name, prefix_len=_given(args.prefix_len, defaults["prefix_len"]), turns=args.turns,
        num_sessions=_given(args.num_sessions, _default_sessions(concurrencies, args.num_prompts, args.turns)),
        concurrencies=concurrencies, request_rates=rates,
        burstiness=args.burstiness, seed=args.seed, ignore_eos=args.ignore_eos, temperature=args.temperature,
        goodput_ms=parse_goodput(args.goodput), percentiles=_percentiles(args.metric_percentiles),
        timeout_s=args.timeout, api_key=args.api_key, extra_body=_extra_body(args.extra_body),
        tokenizer=args.tokenizer, warmup=not args.no_warmup, result_dir=args.result_dir,
        save_detailed=args.save_detailed, write_vllm=not args.no_vllm_result,
        price=resolve_price(args.instance_type, args.cost_per_hour, args.prices),
    )


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _default_sessions(concurrencies: Sequence[int | None], num_prompts: int, turns: int) -> int:
    """The largest client limit (each client runs one session at a time), or with no limit
    enough sessions for about --num-prompts requests."""
    finite = [c for c in concurrencies if c is not None]
    return max(finite) if finite else max(1, math.ceil(num_prompts / max(turns, 1)))


def _percentiles(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _extra_body(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--extra-body must be a JSON object")
    return value


async def bench(targets: list[Target], cfg: BenchConfig, compare: bool) -> dict[str, list[dict[str, Any]]]:
    """Run every target in turn, print each point, write files; returns results by target name."""
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    workloads = build_workloads(cfg, tokenizer)
    results: dict[str, list[dict[str, Any]]] = {}

    def point_done(result: dict[str, Any], records: Sequence[RequestRecord]) -> None:
        print(format_result(result, cfg.percentiles), flush=True)
        if cfg.result_dir and cfg.write_vllm:
            vres = vllm_result(result, records, cfg.percentiles, cfg.tokenizer, cfg.save_detailed)
            print(f"wrote {write_vllm_result(vres, cfg.result_dir)} (vllm bench serve format)", flush=True)

    for target in targets:
        print(f"benchmarking {target.name} at {target.base_url} ...", flush=True)
        results[target.name] = await run_target(target, cfg, workloads, on_records=point_done)
        if cfg.result_dir:
            write_json(results[target.name], cfg.result_dir, target.name)
    if cfg.result_dir:
        write_outputs(results, cfg.sweep_axis, cfg.percentiles, cfg.result_dir, "comparison" if compare else None)
    return results


def write_outputs(results: dict[str, list[dict[str, Any]]], axis: str, percentiles: tuple[float, ...],
                  out_dir: Path, prefix: str | None) -> None:
    """Plots (PREFIX-*.png) and a markdown page (PREFIX.md); PREFIX defaults to the one target's name."""
    from loadtest.bench.plots import plot_all  # NOTE: lazy: matplotlib is slow to import

    prefix = prefix or safe_name(next(iter(results)))
    images = plot_all(results, axis, percentiles, out_dir, prefix)
    page = markdown_report(results, percentiles, [p.name for p in images])
    (out_dir / f"{prefix}.md").write_text(page)
    print(f"wrote {out_dir / (prefix + '.md')} and {', '.join(p.name for p in images)}")


def replot(result_dir: Path, percentiles: tuple[float, ...]) -> None:
    sweeps = sorted(result_dir.glob("*-sweep.json"))
    if not sweeps:
        raise ValueError(f"no *-sweep.json in {result_dir}")
    results = {json.loads(p.read_text())[0]["label"]: json.loads(p.read_text()) for p in sweeps}
    axis = next(iter(results.values()))[0].get("sweep_axis", "concurrency")
    write_outputs(results, axis, percentiles, result_dir, "comparison" if len(results) > 1 else None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "compare", "plot", "-h", "--help"):
        argv.insert(0, "run")  # `python -m loadtest.bench --base-url ...` means run
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "plot":
            replot(args.result_dir, _percentiles(args.metric_percentiles))
            return 0
        cfg = build_config(args)
        if args.command == "run":
            targets = [Target(safe_name(args.label), normalize_base_url(args.base_url), args.model)]
        else:
            targets = [parse_target(t) for t in args.target]
            targets = [Target(t.name, t.base_url, args.model) for t in targets]
            if len({t.name for t in targets}) != len(targets):
                raise ValueError("--target names must be distinct")
        results = asyncio.run(bench(targets, cfg, compare=args.command == "compare"))
    except (ValueError, BenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, BenchError) else 2
    failed = sum(r["failed"] for rs in results.values() for r in rs)
    return 1 if failed and not any(r["completed"] for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
