"""CI smoke run: a real Kiln server on 127.0.0.1 serving the tiny artifact, under locust and the bench."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.bench.config import BenchConfig, Target
from loadtest.bench.dataset import build_workloads, sample_random_requests
from loadtest.bench.runner import run_target

READY_TIMEOUT_S = 180
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kiln_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m server --artifact tiny --port P` in a subprocess; yields its base URL once /ready is 200."""
    if not (REPO_ROOT / "server" / "__main__.py").exists():
        pytest.skip("the Kiln server (server/__main__.py) does not exist yet")
    port = free_port()
    log_path = tmp_path_factory.mktemp("kiln_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--artifact", str(tiny_artifact), "--host", "127.0.0.1",
             "--port", str(port)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode} before /ready:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base_url}/ready", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_locust_smoke_against_kiln(kiln_server: str, run_locust, tmp_path: Path) -> None:
    # NOTE: the tiny artifact has max_model_len 128: short prompts, and the chat template's own tokens fit.
    stats = run_locust(kiln_server, tmp_path / "kiln", 20, 3, "--prompt-len", "uniform:4:24",
                       "--max-tokens", "uniform:4:12", "--chat-ratio", "0.5", "--stream-ratio", "0.7")
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, (tmp_path / "kiln_failures.csv").read_text()
    assert int(total["Request Count"]) > 0 and float(total["Requests/s"]) > 0
    streamed = [row for (kind, name), row in stats.items() if kind == "POST" and name.endswith(" stream")]
    assert streamed and all(float(row["Requests/s"]) > 0 for row in streamed)
    ttft = [row for (kind, _), row in stats.items() if kind == "TTFT"]
    assert ttft and sum(int(row["Request Count"]) for row in ttft) > 0
    tokens = [row for (kind, _), row in stats.items() if kind == "TOKENS"]
    assert tokens and all(float(row["Average Response Time"]) > 0 for row in tokens)


def test_bench_against_kiln_with_ignore_eos(kiln_server: str) -> None:
    cfg = BenchConfig(input_len=16, output_len=8, num_prompts=4, concurrencies=(2,), ignore_eos=True)
    requests = sample_random_requests(cfg.num_prompts, cfg.input_len, cfg.output_len, seed=0)
    (result,) = asyncio.run(run_target(Target("kiln", kiln_server), cfg, requests))
    assert (result["completed"], result["failed"]) == (4, 0), result["errors"]
    assert result["total_output_tokens"] == 4 * 8  # ignore_eos honoured, counted from usage
    assert result["output_tokens_from_usage"] == 4
    assert result["total_input_tokens"] == 4 * 16  # each word is one SmolLM2 token
    assert result["median_ttft_ms"] > 0 and result["median_tpot_ms"] > 0


def test_multiturn_bench_against_kiln(kiln_server: str) -> None:
    # 3 turns of history (system 8 + 3 x 6 user + 2 x 4 reply tokens, plus the template) fit max_model_len 128
    cfg = BenchConfig(dataset="multiturn", endpoint="chat", prefix_len=8, input_len=6, output_len=4, turns=3,
                      num_sessions=2, concurrencies=(2,), ignore_eos=True)
    (result,) = asyncio.run(run_target(Target("kiln", kiln_server), cfg, build_workloads(cfg)))
    assert (result["completed"], result["failed"]) == (6, 0), result["errors"]
    turns = result["ttft_by_turn"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["completed"] == 2 for t in turns)
    prompts = [t["mean_input_tokens"] for t in turns]
    assert prompts[0] < prompts[1] < prompts[2]  # the server saw the history grow, its replies included
    if result["total_cached_tokens"] is not None:  # Kiln reports usage.prompt_tokens_details.cached_tokens
        assert 0 <= result["prefix_cache_hit_ratio"] <= 1
