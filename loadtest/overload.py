"""Overload: offer more requests than the server sustains, and account for every one.

    python -m loadtest.overload --base-url http://127.0.0.1:8000 --rate 7 --duration 30 [--max-tokens 64]

Requests arrive as a Poisson process at --rate per second for --duration seconds, each a streamed
completion of a random prompt of 20-60 one-token words (loadtest.prompts) with `ignore_eos` and
--max-tokens. Every request must end one of two ways: accepted and completed (status 200, finish_reason "length", exactly max_tokens tokens), or
refused with 429 or 503 carrying Retry-After. Anything else (another status, a refusal without
Retry-After, a broken or short stream) is "lost" and the exit status is 1. Prints the counts, the
accepted requests' TTFT and latency percentiles, and the achieved throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from loadtest.prompts import make_prompt


@dataclass
class Outcome:
    completed: int = 0
    refused: dict[int, int] = field(default_factory=dict)     # status -> count (with Retry-After)
    lost: list[str] = field(default_factory=list)             # what went wrong, one entry per request
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0


async def one(client: httpx.AsyncClient, model: str, max_tokens: int, rng: random.Random, out: Outcome) -> None:
    body = {"model": model, "prompt": make_prompt(rng, rng.randint(20, 60)),
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first: Optional[float] = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code in (429, 503):
                await response.aread()
                if response.headers.get("retry-after"):
                    out.refused[response.status_code] = out.refused.get(response.status_code, 0) + 1
                else:
                    out.lost.append(f"{response.status_code} without Retry-After")
                return
            if response.status_code != 200:
                out.lost.append(f"status {response.status_code}: {(await response.aread())[:200]!r}")
                return
            finish, usage = None, None
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    out.lost.append(f"stream error {chunk['error'].get('code')}")
                    return
                for choice in chunk.get("choices", []):
                    if first is None and choice.get("text"):
                        first = time.monotonic()
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as e:
        out.lost.append(type(e).__name__)
        return
    generated = (usage or {}).get("completion_tokens")
    if finish != "length" or generated != max_tokens:
        out.lost.append(f"finish {finish!r} with {generated} tokens")
        return
    out.completed += 1
    out.tokens += generated
    out.latency.append(time.monotonic() - start)
    if first is not None:
        out.ttft.append(first - start)


async def offer(base_url: str, rate: float, duration: float, max_tokens: int, seed: int) -> tuple[Outcome, float, int]:
    model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    rng, out, tasks = random.Random(seed), Outcome(), []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.monotonic()
        while time.monotonic() - start < duration:
            tasks.append(asyncio.create_task(one(client, model, max_tokens, random.Random(rng.random()), out)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        return out, time.monotonic() - start, len(tasks)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.overload", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, required=True, help="offered requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out, elapsed, offered = asyncio.run(offer(args.base_url.rstrip("/"), args.rate, args.duration, args.max_tokens,
                                              args.seed))
    report = {
        "offered": offered, "offered_rate": round(offered / args.duration, 2), "completed": out.completed,
        "refused_with_retry_after": out.refused, "lost": len(out.lost), "lost_examples": out.lost[:5],
        "completed_per_s": round(out.completed / elapsed, 2), "output_tok_per_s": round(out.tokens / elapsed, 1),
        "ttft_p50_s": round(pct(out.ttft, 50), 2), "ttft_p99_s": round(pct(out.ttft, 99), 2),
        "latency_p50_s": round(pct(out.latency, 50), 2), "latency_p99_s": round(pct(out.latency, 99), 2),
        "elapsed_s": round(elapsed, 1)}
    print(json.dumps(report, indent=2))
    return 0 if not out.lost and out.completed + sum(out.refused.values()) == offered else 1


if __name__ == "__main__":
    sys.exit(main())
