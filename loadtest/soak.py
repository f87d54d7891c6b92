"""Soak: random traffic against a running server for a while, then check it is whole.

    python -m loadtest.soak --base-url http://127.0.0.1:8000 --duration 3600 --concurrency 16 [--pid PID]

Each client loops: a random prompt (completions or chat), n in 1-3, random max_tokens, stop strings,
sometimes a JSON schema or a regex, streamed or not; about one request in five is abandoned at a
random point (the client disconnects mid-stream or before the answer). Afterwards the server must be
idle and whole: no request running or waiting, every KV slot free (`kiln:kv_cache_usage_perc` 0),
/health 200, a fresh request served; with --pid, the server's resident memory is sampled after a
warm-up minute (or a tenth of the run) and at the end, and its growth is reported.
The slow test suite runs a few minutes of it (tests/server/test_soak.py); run it for hours here.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.prompts import make_prompt

STOPS = ["\n\n", ".", " the", "ash"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "size"]}


@dataclass
class SoakStats:
    sent: int = 0
    completed: int = 0
    abandoned: int = 0
    errors: dict[str, int] = field(default_factory=dict)    # "status code" or exception name -> count

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape(base_url: str) -> dict[str, float]:
    """Unlabelled view of /metrics: sample name -> value (summed over labels)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def random_body(rng: random.Random, model: str, max_model_len: int) -> tuple[str, dict]:
    prompt = make_prompt(rng, rng.randint(1, 25))
    limit = min(64, max_model_len // 4)       # a prompt and its answer fit the smallest test model
    body: dict = {"model": model, "n": rng.choice([1, 1, 1, 2, 3]), "temperature": rng.choice([0, 0.7, 1.0]),
                  "max_tokens": rng.randint(1, limit), "stream": rng.random() < 0.6}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 1000)
    if rng.random() < 0.1:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
        body["max_tokens"] = limit
    elif rng.random() < 0.05:
        body["structured_outputs"] = {"regex": r"[a-z]{2,8}( [a-z]{2,8}){0,3}"}
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def one_request(client: httpx.AsyncClient, rng: random.Random, model: str, max_model_len: int,
                      stats: SoakStats) -> None:
    path, body = random_body(rng, model, max_model_len)
    abandon_after: Optional[int] = rng.randint(0, 6) if rng.random() < 0.2 else None
    stats.sent += 1
    try:
        if body["stream"]:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    stats.error(str(response.status_code))
                    return
                events = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"error"' in line[:20]:
                        stats.error("sse_error")
                    events += line.startswith("data:")
                    if abandon_after is not None and events > abandon_after:
                        stats.abandoned += 1
                        return                     # leaving the block closes the connection
        elif abandon_after is not None:
            task = asyncio.ensure_future(client.post(path, json=body))
            await asyncio.sleep(rng.random() * 0.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stats.abandoned += 1
            return
        else:
            response = await client.post(path, json=body)
            if response.status_code != 200:
                stats.error(str(response.status_code))
                return
        stats.completed += 1
    except httpx.HTTPError as e:
        stats.error(type(e).__name__)


async def soak(base_url: str, duration: float, concurrency: int, seed: int = 0,
               on_warm: Optional[callable] = None, warm_after: Optional[float] = None) -> SoakStats:
    models = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"]
    model, max_model_len = models[0]["id"], models[0].get("max_model_len") or 2048
    stats = SoakStats()
    deadline = time.monotonic() + duration
    warm_at = time.monotonic() + (warm_after if warm_after is not None else min(60.0, duration / 10))

    async def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            while time.monotonic() < deadline:
                await one_request(client, rng, model, max_model_len, stats)

    async def warm_watch() -> None:
        await asyncio.sleep(max(0.0, warm_at - time.monotonic()))
        if on_warm is not None:
            on_warm()

    watcher = asyncio.create_task(warm_watch())
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    watcher.cancel()
    return stats


def check_idle(base_url: str, timeout: float = 60.0) -> dict[str, float]:
    """Wait until the server reports nothing running or waiting and no slot in use; the final scrape."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(base_url)
        idle = (metrics.get("kiln:num_requests_running", 0) == 0 and metrics.get("kiln:num_requests_waiting", 0) == 0
                and metrics.get("kiln:kv_cache_usage_perc", 0) == 0)
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pid", type=int, help="the server's process id, to report its memory growth")
    args = p.parse_args(argv)
    base = args.base_url.rstrip("/")
    rss: dict[str, int] = {}

    def warm() -> None:
        if args.pid:
            rss["warm"] = rss_bytes(args.pid)

    stats = asyncio.run(soak(base, args.duration, args.concurrency, args.seed, on_warm=warm))
    metrics = check_idle(base)
    running, waiting = metrics.get("kiln:num_requests_running", 0), metrics.get("kiln:num_requests_waiting", 0)
    slots = metrics.get("kiln:kv_cache_usage_perc", 0)
    health = httpx.get(f"{base}/health", timeout=10).status_code
    report = {"sent": stats.sent, "completed": stats.completed, "abandoned": stats.abandoned, "errors": stats.errors,
              "running_after": running, "waiting_after": waiting, "kv_cache_usage_after": slots, "health": health}
    if args.pid and "warm" in rss:
        report["rss_growth_mib"] = round((rss_bytes(args.pid) - rss["warm"]) / 2**20, 1)
    print(json.dumps(report, indent=2))
    whole = running == 0 and waiting == 0 and slots == 0 and health == 200 and not stats.errors
    return 0 if whole else 1


if __name__ == "__main__":
    sys.exit(main())
