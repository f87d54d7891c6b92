"""The benchmark end to end against the fake OpenAI-compatible server (not Kiln) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loadtest.bench.__main__ import main
from loadtest.bench.config import BenchConfig, Target
from loadtest.bench.dataset import sample_random_requests
from loadtest.bench.runner import BenchError, run_target


def run(server_url: str, cfg: BenchConfig, num: int = 6, model: str | None = None) -> list[dict]:
    requests = sample_random_requests(num, cfg.input_len, cfg.output_len, seed=cfg.seed)
    return asyncio.run(run_target(Target("fake", server_url, model), cfg, requests))


def test_streamed_completions_measure_the_server_pace(fake_server) -> None:
    server = fake_server(ttft_s=0.03, itl_s=0.01, eos_after=3)
    cfg = BenchConfig(input_len=12, output_len=6, num_prompts=6, concurrencies=(1, 3), ignore_eos=True,
                      goodput_ms={"ttft": 10_000, "tpot": 10_000})
    results = run(server.base_url, cfg)
    assert [r["concurrency"] for r in results] == [1, 3]
    for r in results:
        assert (r["completed"], r["failed"]) == (6, 0)
        assert r["total_output_tokens"] == 6 * 6  # ignore_eos reached the server: no early stop at 3
        assert r["output_tokens_from_usage"] == 6
        assert r["total_input_tokens"] == 6 * 12
        assert r["model"] == "fake-model"  # discovered from /v1/models
        assert 30 <= r["median_ttft_ms"] < 1000
        assert 10 <= r["median_tpot_ms"] < 200 and 10 <= r["median_itl_ms"] < 200
        assert r["median_e2el_ms"] >= 30 + 5 * 10
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])
        assert r["max_concurrent_requests"] <= r["concurrency"]
    assert results[1]["max_concurrent_requests"] == 3
    assert results[1]["request_throughput"] > results[0]["request_throughput"]
    sent = server.bodies[-1]
    assert sent["stream"] and sent["stream_options"] == {"include_usage": True} and sent["ignore_eos"] is True
    assert sent["max_tokens"] == 6 and sent["temperature"] == 0.0
    assert server.bodies[0]["max_tokens"] == 6  # the warm-up request, capped at 16 tokens


def test_chat_without_usage_counts_chunks_and_honours_eos(fake_server) -> None:
    server = fake_server(usage=False, eos_after=2)
    cfg = BenchConfig(endpoint="chat", input_len=8, output_len=5, num_prompts=4, concurrencies=(2,))
    (r,) = run(server.base_url, cfg, num=4)
    assert (r["completed"], r["failed"]) == (4, 0)
    assert r["total_output_tokens"] == 4 * 2 and r["output_tokens_from_usage"] == 0
    assert r["total_input_tokens"] == 4 * 8  # falls back to the intended prompt length
    assert "messages" in server.bodies[-1] and "ignore_eos" not in server.bodies[-1]


def test_failed_requests_are_counted_not_fatal(fake_server) -> None:
    server = fake_server(fail_every=3)
    cfg = BenchConfig(input_len=4, output_len=3, num_prompts=6, concurrencies=(2,), warmup=False)
    (r,) = run(server.base_url, cfg, model="fake-model")
    assert (r["completed"], r["failed"]) == (4, 2)
    assert r["errors"] == {"HTTP 500: injected failure": 2}


def test_unstreamed_requests(fake_server) -> None:
    server = fake_server()
    cfg = BenchConfig(input_len=4, output_len=3, num_prompts=3, concurrencies=(3,), stream=False)
    (r,) = run(server.base_url, cfg, num=3)
    assert r["completed"] == 3 and r["total_output_tokens"] == 9
    assert r["mean_tpot_ms"] is None and r["mean_ttft_ms"] == pytest.approx(r["mean_e2el_ms"])
    assert "stream" not in server.bodies[-1]


def test_a_target_that_fails_the_first_request_is_an_error(fake_server) -> None:
    server = fake_server(fail_every=1)
    with pytest.raises(BenchError, match="initial test request"):
        run(server.base_url, BenchConfig(input_len=4, output_len=2, num_prompts=2))


def test_cli_compare_writes_json_plots_and_table(fake_server, tmp_path: Path) -> None:
    fast, slow = fake_server(ttft_s=0.005, itl_s=0.001), fake_server(ttft_s=0.02, itl_s=0.004)
    out = tmp_path / "results"
    code = main(["compare", "--target", f"fast={fast.base_url}", "--target", f"slow={slow.base_url}/v1",
                 "--num-prompts", "4", "--input-len", "8", "--output-len", "4", "--concurrency", "1,2",
                 "--goodput", "ttft:1000", "--result-dir", str(out)])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    for label in ("fast", "slow"):
        assert {f"{label}-c1-rinf.json", f"{label}-c2-rinf.json", f"{label}-sweep.json"} <= names
    assert {"comparison.md", "comparison-throughput.png", "comparison-latency.png"} <= names
    assert (out / "comparison-latency.png").read_bytes()[:4] == b"\x89PNG"
    point = json.loads((out / "slow-c2-rinf.json").read_text())
    assert point["concurrency"] == 2 and point["completed"] == 4 and point["base_url"] == slow.base_url
    table = (out / "comparison.md").read_text()
    assert table.count("| fast |") == 2 and table.count("| slow |") == 2
    assert main(["plot", str(out)]) == 0


def test_cli_rejects_bad_arguments(capsys) -> None:
    assert main(["--base-url", "http://127.0.0.1:9", "--goodput", "latency:5"]) == 2
    assert main(["compare", "--target", "a=http://127.0.0.1:9", "--target", "a=http://127.0.0.1:10"]) == 2
    assert "error:" in capsys.readouterr().err
