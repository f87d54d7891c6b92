"""Fixtures of the load-test tests: an in-process fake OpenAI server and a headless locust runner."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadtest.fake_server import FakeBehavior, FakeOpenAIServer

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeOpenAIServer]]:
    """Factory: fake_server(ttft_s=..., ...) starts a FakeOpenAIServer on 127.0.0.1, stopped after the test."""
    started: list[FakeOpenAIServer] = []

    def start(**behavior: object) -> FakeOpenAIServer:
        defaults = {"ttft_s": 0.01, "itl_s": 0.002}
        server = FakeOpenAIServer(FakeBehavior(**{**defaults, **behavior})).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _run_locust(host: str, out_prefix: Path, run_time_s: int, users: int, *extra: str) -> dict[tuple[str, str], dict]:
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-H", host, "-u", str(users), "-r", str(users), "-t", f"{run_time_s}s", "--stop-timeout", "30",
           "--csv", str(out_prefix), "--html", f"{out_prefix}.html", "--only-summary", "--exit-code-on-error", "1",
           *extra]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=run_time_s + 90)
    if proc.returncode != 0:
        raise AssertionError(f"locust exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(f"{out_prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


@pytest.fixture
def run_locust() -> Callable[..., dict[tuple[str, str], dict]]:
    """run_locust(host, out_prefix, run_time_s, users, *extra_args): locust headless in a subprocess
    (NOTE: never in-process: locust monkey-patches everything with gevent); returns the
    PREFIX_stats.csv rows keyed by (Type, Name)."""
    return _run_locust
