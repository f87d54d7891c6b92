"""Run multiturn chat sessions at one sweep point: each turn resends the whole conversation.

A session is a client that talks to the server the way a chat UI does: turn k sends the system
prompt, user_1, assistant_1, ..., user_k, where each assistant message is the text the server
actually returned for that turn (so the history is what a prefix cache saw being generated).
At concurrency c, c clients each run one session at a time, back to back, and take the next
session when theirs ends; with --request-rate, sessions (not turns) arrive at that rate. A failed
turn ends its session: there is no reply to continue the history with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import httpx

from loadtest.bench.client import send_request_text
from loadtest.bench.config import BenchConfig, SweepPoint
from loadtest.bench.dataset import ChatSession
from loadtest.bench.metrics import RequestRecord
from loadtest.openai_api import Messages, build_body


def first_messages(session: ChatSession) -> Messages:
    """The history before turn 1: the system prompt, when the session has one."""
    return [{"role": "system", "content": session.system}] if session.system is not None else []


def turn_body(cfg: BenchConfig, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
    return build_body("chat", model, messages, max_tokens, stream=cfg.stream, temperature=cfg.temperature,
                      ignore_eos=cfg.ignore_eos, extra=cfg.extra_body)


async def run_sessions(
    client: httpx.AsyncClient, model: str, cfg: BenchConfig, sessions: Sequence[ChatSession], point: SweepPoint,
    offsets: Sequence[float],
) -> tuple[list[RequestRecord], float, int]:
    """Every session of the point; returns (records in send order, duration_s, max requests in flight).

    offsets[i] is when session i is due (seconds after the start; see runner.arrival_offsets).
    """
    limit = asyncio.Semaphore(point.concurrency) if point.concurrency else None
    records: list[RequestRecord] = []
    in_flight = peak = 0

    async def one(index: int, session: ChatSession, start: float, due: float) -> None:
        nonlocal in_flight, peak
        async with limit if limit else contextlib.nullcontext():
            messages = first_messages(session)
            history_len = session.system_len  # intended prompt tokens so far (no chat template)
            for turn, (user, user_len, max_tokens) in enumerate(
                    zip(session.users, session.user_lens, session.output_lens), start=1):
                messages.append({"role": "user", "content": user})
                history_len += user_len
                in_flight += 1
                peak = max(peak, in_flight)
                now = time.perf_counter()
                timing, text = await send_request_text(client, "chat", turn_body(cfg, model, messages, max_tokens),
                                                       keep_text=True)
                in_flight -= 1
                records.append(RequestRecord(
                    timing, now - start, history_len, max_tokens, queue_time=now - due if turn == 1 else 0.0,
                    text=text if cfg.save_detailed else None, session=index, turn=turn))
                if not timing.ok:
                    return
                messages.append({"role": "assistant", "content": text or ""})
                history_len += timing.output_tokens

    start = time.perf_counter()
    tasks = []
    for i, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, sessions[i], start, time.perf_counter())))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    return sorted(records, key=lambda r: r.start_offset), duration, peak
