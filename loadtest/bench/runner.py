"""Send the dataset to one target at each sweep point and collect the results."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import httpx

from loadtest.bench.client import discover_model, make_client, send_request, send_request_text
from loadtest.bench.config import BenchConfig, SweepPoint, Target
from loadtest.bench.cost import cost_fields
from loadtest.bench.dataset import BenchRequest, Workload, warmup_request
from loadtest.bench.metrics import RequestRecord, compute_metrics
from loadtest.bench.multiturn import run_sessions
from loadtest.openai_api import build_body


class BenchError(RuntimeError):
    """The target cannot be benchmarked (unreachable, no model, initial request failed)."""


def arrival_offsets(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """When each request is due, in seconds after the start (vLLM's gamma arrivals).

    Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate; burstiness 1 is a
    Poisson process, below 1 burstier, above 1 more regular. An infinite rate sends all at once.
    """
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.gammavariate(burstiness, scale)
    return offsets


async def _due(offsets: Sequence[float], start: float) -> AsyncIterator[int]:
    for i, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i


async def run_point(
    client: httpx.AsyncClient, model: str, cfg: BenchConfig, requests: Sequence[BenchRequest], point: SweepPoint
) -> tuple[list[RequestRecord], float, int]:
    """Run the whole dataset at one point; returns (records, duration_s, max requests in flight)."""
    limit = asyncio.Semaphore(point.concurrency) if point.concurrency else None
    in_flight = peak = 0

    async def one(req: BenchRequest, start: float, due: float) -> RequestRecord:
        nonlocal in_flight, peak
        async with limit if limit else contextlib.nullcontext():
            in_flight += 1
            peak = max(peak, in_flight)
            now = time.perf_counter()
            timing, text = await send_request_text(client, cfg.endpoint, _body(cfg, model, req),
                                                   keep_text=cfg.save_detailed)
            in_flight -= 1
            return RequestRecord(timing, now - start, req.prompt_len, req.output_len, queue_time=now - due, text=text)

    offsets = arrival_offsets(len(requests), point.request_rate, cfg.burstiness, cfg.seed)
    start = time.perf_counter()
    tasks = [asyncio.create_task(one(requests[i], start, time.perf_counter())) async for i in _due(offsets, start)]
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - start, peak


def _body(cfg: BenchConfig, model: str, req: BenchRequest, max_tokens: int | None = None) -> dict[str, Any]:
    return build_body(
        cfg.endpoint, model, req.payload(cfg.endpoint), max_tokens or req.output_len, stream=cfg.stream,
        temperature=cfg.temperature, ignore_eos=cfg.ignore_eos, extra=cfg.extra_body,
    )


async def run_workload(
    client: httpx.AsyncClient, model: str, cfg: BenchConfig, workload: Workload, point: SweepPoint
) -> tuple[list[RequestRecord], float, int]:
    """run_point for independent requests, multiturn.run_sessions for chat sessions."""
    if workload.sessions:
        offsets = arrival_offsets(len(workload.sessions), point.request_rate, cfg.burstiness, cfg.seed)
        return await run_sessions(client, model, cfg, workload.sessions, point, offsets)
    return await run_point(client, model, cfg, workload.requests, point)


async def run_target(
    target: Target,
    cfg: BenchConfig,
    workloads: Sequence[Workload] | Sequence[BenchRequest],
    on_point: Callable[[dict[str, Any]], None] | None = None,
    on_records: Callable[[dict[str, Any], Sequence[RequestRecord]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every sweep point against one target, in order; one result dict per point.

    workloads: one per sweep point (dataset.build_workloads), or a list of requests that every
    point sends. on_point(result) and then on_records(result, records) are called as each point
    finishes.
    """
    per_point = _per_point(cfg, workloads)
    widest = max((p.concurrency or w.num_requests for p, w in zip(cfg.points, per_point)), default=1)
    async with make_client(target.base_url, cfg.api_key, cfg.timeout_s, max(widest, 1)) as client:
        try:
            model = target.model or await discover_model(client)
        except RuntimeError as e:
            raise BenchError(f"{target.name}: {e}") from None
        if cfg.warmup:
            first = warmup_request(cfg)
            timing = await send_request(client, cfg.endpoint, _body(cfg, model, first, min(16, first.output_len)))
            if not timing.ok:
                raise BenchError(f"{target.name}: initial test request to {target.base_url} failed: {timing.error}")
        results = []
        for point, workload in zip(cfg.points, per_point):
            records, duration, peak = await run_workload(client, model, cfg, workload, point)
            metrics = compute_metrics(records, duration, cfg.percentiles, cfg.goodput_ms, cfg.stream)
            metrics["max_concurrent_requests"] = peak
            result = _result(target, model, cfg, point, metrics, records)
            results.append(result)
            if on_point:
                on_point(result)
            if on_records:
                on_records(result, records)
    return results


def _per_point(cfg: BenchConfig, workloads: Sequence[Workload] | Sequence[BenchRequest]) -> list[Workload]:
    if all(isinstance(w, BenchRequest) for w in workloads):
        return [Workload(requests=tuple(workloads))] * len(cfg.points)  # type: ignore[arg-type]
    if len(workloads) != len(cfg.points):
        raise ValueError(f"{len(workloads)} workloads for {len(cfg.points)} sweep points")
    return list(workloads)  # type: ignore[arg-type]


def _result(
    target: Target, model: str, cfg: BenchConfig, point: SweepPoint, metrics: dict[str, Any],
    records: Sequence[RequestRecord],
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "label": target.name,
        "base_url": target.base_url,
        "model": model,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "endpoint": cfg.endpoint,
        "stream": cfg.stream,
        "sweep_axis": cfg.sweep_axis,
        "concurrency": point.concurrency,  # null: no client-side limit
        "request_rate": point.request_rate if math.isfinite(point.request_rate) else None,  # null: inf
        "burstiness": cfg.burstiness,
        "num_prompts": cfg.requests_per_point,
        "dataset": cfg.dataset,
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
        "range_ratio": cfg.range_ratio,
        "ignore_eos": cfg.ignore_eos,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "goodput_slos_ms": dict(cfg.goodput_ms),
        **_dataset_fields(cfg),
        **metrics,
    }
    result.update(cost_fields(cfg.price, result))
    if cfg.save_detailed:
        result["requests"] = [
            {"start_offset": r.start_offset, "queue_time": r.queue_time, "prompt_len": r.prompt_len,
             "output_len": r.output_len, **({"session": r.session, "turn": r.turn} if r.turn is not None else {}),
             **{k: v for k, v in asdict(r.timing).items() if k != "token_times"}}
            for r in records
        ]
    return result


def _dataset_fields(cfg: BenchConfig) -> dict[str, Any]:
    """The settings of the caching datasets (none for random, whose results keep their old keys)."""
    if cfg.dataset == "shared-prefix":
        return {"prefix_len": cfg.prefix_len}
    if cfg.dataset == "multiturn":
        return {"prefix_len": cfg.prefix_len, "num_sessions": cfg.num_sessions, "turns": cfg.turns}
    return {}
