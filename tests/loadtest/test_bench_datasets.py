"""The prefix-caching datasets of the bench (shared-prefix, multiturn): their builders, the
per-turn report, cached-token accounting, and both run end to end against the fake server,
whose word-block prefix cache makes the cached token counts exact."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import pytest

from loadtest.bench.__main__ import build_config, build_parser, main
from loadtest.bench.config import BenchConfig, SweepPoint, Target
from loadtest.bench.dataset import (build_workloads, fit_to_tokens, sample_random_requests, sample_sessions,
                                    sample_shared_prefix_requests, warmup_request)
from loadtest.bench.metrics import RequestRecord, cache_metrics, compute_metrics, ttft_by_turn
from loadtest.bench.multiturn import run_sessions
from loadtest.bench.report import format_result, markdown_report
from loadtest.bench.runner import arrival_offsets, run_target
from loadtest.bench.vllm_result import vllm_keys, vllm_result
from loadtest.openai_api import RequestTiming, StreamRecorder, build_body, timing_from_body


def words(text: str) -> int:
    return len(text.split())


# --- shared-prefix -------------------------------------------------------------------------


def test_shared_prefix_lengths_and_one_prefix_for_all() -> None:
    reqs = sample_shared_prefix_requests(8, prefix_len=120, input_len=30, output_len=16, seed=3)
    assert len(reqs) == 8
    assert {r.system for r in reqs} == {reqs[0].system} and words(reqs[0].system) == 120
    assert all(words(r.prompt) == 30 and r.prompt_len == 150 and r.output_len == 16 for r in reqs)
    assert len({r.prompt for r in reqs}) == 8  # distinct user turns


def test_shared_prefix_payloads_put_the_prefix_first() -> None:
    (req,) = sample_shared_prefix_requests(1, prefix_len=40, input_len=5, output_len=4)
    assert req.payload("chat") == [{"role": "system", "content": req.system}, {"role": "user", "content": req.prompt}]
    text = req.payload("completions")
    assert text.startswith(req.system + " ") and text.endswith(req.prompt) and words(text) == 45
    body = build_body("chat", "m", req.payload("chat"), 4, stream=True, temperature=0.0)
    assert body["messages"][0]["role"] == "system" and "prompt" not in body
    assert build_body("completions", "m", text, 4, stream=False, temperature=0.0)["prompt"] == text
    with pytest.raises(ValueError, match="chat endpoint"):
        build_body("completions", "m", req.payload("chat"), 4, stream=False, temperature=0.0)


def test_shared_prefix_is_reproducible_and_new_users_per_point() -> None:
    a = sample_shared_prefix_requests(4, 50, 10, 8, seed=1)
    assert a == sample_shared_prefix_requests(4, 50, 10, 8, seed=1)
    other = sample_shared_prefix_requests(4, 50, 10, 8, seed=2)
    assert other[0].system != a[0].system and other[0].prompt != a[0].prompt
    later = sample_shared_prefix_requests(4, 50, 10, 8, seed=1, point=1)
    assert later[0].system == a[0].system  # the cache keeps its prefix from point to point ...
    assert not {r.prompt for r in later} & {r.prompt for r in a}  # ... but never sees a whole prompt again


def test_shared_prefix_range_ratio_varies_the_user_turn_only() -> None:
    reqs = sample_shared_prefix_requests(40, 60, 20, 10, range_ratio=0.5, seed=0)
    assert all(words(r.system) == 60 for r in reqs)
    assert all(10 <= words(r.prompt) <= 30 and r.prompt_len == 60 + words(r.prompt) for r in reqs)
    assert all(5 <= r.output_len <= 15 for r in reqs) and len({words(r.prompt) for r in reqs}) > 1


class WordTokenizer:
    """A stand-in Hugging Face tokenizer: one token per word, so fit_to_tokens' cut is visible."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


def test_builders_fit_texts_to_the_tokenizer() -> None:
    tok = WordTokenizer()
    (req,) = sample_shared_prefix_requests(1, 30, 7, 4, tokenizer=tok)
    assert len(tok.encode(req.system)) == 30 and len(tok.encode(req.prompt)) == 7
    (session,) = sample_sessions(1, 2, 12, 9, 4, tokenizer=tok)
    assert len(tok.encode(session.system)) == 12 and [len(tok.encode(u)) for u in session.users] == [9, 9]
    assert fit_to_tokens(tok, "a b", 4, random.Random(0)).split()[:2] == ["a", "b"]


# --- multiturn sessions --------------------------------------------------------------------


def test_sessions_lengths_distinct_systems_and_reproducible() -> None:
    sessions = sample_sessions(5, turns=4, system_len=25, input_len=12, output_len=9, seed=7)
    assert len(sessions) == 5 and all(s.turns == 4 for s in sessions)
    assert len({s.system for s in sessions}) == 5 and all(words(s.system) == 25 == s.system_len for s in sessions)
    assert all(s.user_lens == (12,) * 4 and s.output_lens == (9,) * 4 for s in sessions)
    assert all([words(u) for u in s.users] == [12] * 4 for s in sessions)
    assert sessions == sample_sessions(5, 4, 25, 12, 9, seed=7)
    assert sessions != sample_sessions(5, 4, 25, 12, 9, seed=8)
    assert not {s.system for s in sample_sessions(5, 4, 25, 12, 9, seed=7, point=1)} & {s.system for s in sessions}
    (bare,) = sample_sessions(1, 2, 0, 5, 5)
    assert bare.system is None and bare.system_len == 0


def test_build_workloads_per_dataset() -> None:
    random_ = build_workloads(BenchConfig(num_prompts=3, input_len=5, output_len=4, concurrencies=(1, 2)))
    assert len(random_) == 2 and random_[0].num_requests == random_[1].num_requests == 3
    # each point's own prompts (a prefix cache must not find them from an earlier point); the first is --seed's
    assert not {r.prompt for r in random_[0].requests} & {r.prompt for r in random_[1].requests}
    assert random_[0].requests == tuple(sample_random_requests(3, 5, 4, seed=0))
    shared = build_workloads(BenchConfig(dataset="shared-prefix", endpoint="chat", prefix_len=20, num_prompts=3,
                                         input_len=5, output_len=4, concurrencies=(1, 2)))
    assert shared[0].requests[0].system == shared[1].requests[0].system and shared[0] != shared[1]
    cfg = BenchConfig(dataset="multiturn", endpoint="chat", prefix_len=10, turns=3, num_sessions=4, input_len=5,
                      output_len=4, concurrencies=(2,))
    (multi,) = build_workloads(cfg)
    assert len(multi.sessions) == 4 and multi.num_requests == 12 == cfg.requests_per_point
    warm = warmup_request(cfg)
    assert warm.output_len == 4 and all(warm.prompt not in (s.system, *s.users) for s in multi.sessions)


def test_multiturn_history_grows_with_the_servers_replies(fake_server) -> None:
    server = fake_server(ttft_s=0.002, itl_s=0.0005)
    for stream in (True, False):
        server.bodies.clear()
        cfg = BenchConfig(dataset="multiturn", endpoint="chat", stream=stream, prefix_len=6, turns=3, num_sessions=2,
                          input_len=4, output_len=3, ignore_eos=True, concurrencies=(2,))
        sessions = sample_sessions(2, 3, 6, 4, 3, seed=0)

        async def go() -> tuple[list[RequestRecord], float, int]:
            from loadtest.bench.client import make_client
            async with make_client(server.base_url, None, 30, 4) as client:
                return await run_sessions(client, "fake-model", cfg, sessions, SweepPoint(2, float("inf")),
                                          arrival_offsets(2, float("inf"), 1.0, 0))

        records, _, peak = asyncio.run(go())
        assert peak <= 2 and len(records) == 6 and all(r.timing.ok for r in records)
        reply = {"role": "assistant", "content": " tok0 tok1 tok2"}  # what the fake server generated
        for s in sessions:
            mine = [b["messages"] for b in server.bodies if b["messages"][0]["content"] == s.system]
            assert [len(m) for m in mine] == [2, 4, 6]  # system + (user, reply) * (k - 1) + user
            for k, messages in enumerate(mine, start=1):
                assert messages[0] == {"role": "system", "content": s.system}
                assert messages[1::2] == [{"role": "user", "content": u} for u in s.users[:k]]
                assert messages[2::2] == [reply] * (k - 1)
        assert sorted((r.session, r.turn) for r in records) == [(i, k) for i in range(2) for k in (1, 2, 3)]
        by_key = {(r.session, r.turn): r for r in records}
        assert [by_key[(0, k)].prompt_len for k in (1, 2, 3)] == [10, 17, 24]  # 6 + 4k + 3(k-1)
        assert all(by_key[(i, k)].timing.prompt_tokens == by_key[(i, k)].prompt_len for i, k in by_key)


def test_a_failed_turn_ends_its_session(fake_server) -> None:
    server = fake_server(fail_every=2)
    cfg = BenchConfig(dataset="multiturn", endpoint="chat", prefix_len=0, turns=4, num_sessions=1, input_len=3,
                      output_len=2, concurrencies=(1,), warmup=False)
    (r,) = asyncio.run(run_target(Target("fake", server.base_url, "fake-model"), cfg, build_workloads(cfg)))
    assert (r["completed"], r["failed"], r["num_prompts"]) == (1, 1, 4)
    assert [(t["turn"], t["completed"], t["failed"]) for t in r["ttft_by_turn"]] == [(1, 1, 0), (2, 0, 1)]
    assert len(server.bodies) == 2
    assert [m["role"] for m in server.bodies[1]["messages"]] == ["user", "assistant", "user"]  # prefix_len 0


# --- cached tokens and the per-turn report -------------------------------------------------


def test_cached_tokens_are_read_from_usage() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}}
    body = {"choices": [{"text": "a b"}], "usage": usage}
    assert timing_from_body(body, 0.0, 1.0).cached_tokens == 64
    assert timing_from_body({"choices": [{"text": "a"}], "usage": {"prompt_tokens": 3}}, 0, 1).cached_tokens is None
    rec = StreamRecorder(0.0, keep_text=True)
    for data in ({"choices": [{"text": "x"}]}, {"choices": [{"text": "y"}]}, {"choices": [], "usage": usage}):
        rec.feed_line("data: " + json.dumps(data), 0.5)
        rec.feed_line("", 0.5)
    t = rec.finish(1.0)
    assert (t.cached_tokens, t.prompt_tokens, rec.text) == (64, 100, "xy")


def rec(ttft: float, turn: int | None, prompt: int = 100, cached: int | None = None, ok: bool = True) -> RequestRecord:
    timing = RequestTiming(ok=ok, error=None if ok else "boom", ttft=ttft, latency=ttft + 0.1, output_tokens=2,
                           token_times=[ttft, ttft + 0.1], itls=[0.1], prompt_tokens=prompt, cached_tokens=cached)
    return RequestRecord(timing, 0.0, prompt, 2, turn=turn, session=0 if turn else None)


def test_cache_metrics_over_the_requests_that_reported() -> None:
    assert cache_metrics([rec(0.1, None), rec(0.1, None)]) == {
        "total_cached_tokens": None, "prefix_cache_hit_ratio": None, "cached_tokens_from_usage": 0}
    out = cache_metrics([rec(0.1, None, 100, 50), rec(0.1, None, 300, 150), rec(0.1, None, 1000)])
    assert out == {"total_cached_tokens": 200, "prefix_cache_hit_ratio": 0.5, "cached_tokens_from_usage": 2}


def test_ttft_by_turn_statistics() -> None:
    records = [rec(0.1, 1, 100, 0), rec(0.3, 1, 100, 0), rec(0.2, 2, 200, 100), rec(0.4, 2, 200, 150),
               rec(0.9, 2, 200, ok=False), rec(0.5, 3, 300, 240)]
    turns = ttft_by_turn(records, (50, 90, 99))
    assert [t["turn"] for t in turns] == [1, 2, 3]
    one, two, three = turns
    assert (one["completed"], one["failed"], one["mean_input_tokens"]) == (2, 0, 100)
    assert one["mean_ttft_ms"] == pytest.approx(200) and one["p50_ttft_ms"] == pytest.approx(200)
    assert one["p90_ttft_ms"] == pytest.approx(280) and one["p99_ttft_ms"] == pytest.approx(298)
    assert (two["completed"], two["failed"], two["total_cached_tokens"]) == (2, 1, 250)
    assert two["prefix_cache_hit_ratio"] == pytest.approx(250 / 400) and two["mean_ttft_ms"] == pytest.approx(300)
    assert three["prefix_cache_hit_ratio"] == pytest.approx(0.8) and three["p99_ttft_ms"] == pytest.approx(500)
    result = compute_metrics(records, 1.0)
    assert result["ttft_by_turn"] == turns and result["total_cached_tokens"] == 490
    assert "ttft_by_turn" not in compute_metrics([rec(0.1, None)], 1.0)


def _multiturn_result(records: list[RequestRecord]) -> dict:
    result = {"label": "kiln", "base_url": "http://x", "model": "m", "date": "2026-12-01T00:00:00+00:00",
              "endpoint": "chat", "stream": True, "concurrency": 2, "request_rate": None, "burstiness": 1.0,
              "num_prompts": 6, "dataset": "multiturn", "prefix_len": 100, "num_sessions": 2, "turns": 3,
              "input_len": 50, "output_len": 8, "range_ratio": 0.0, "ignore_eos": True, "temperature": 0.0,
              "seed": 0, "goodput_slos_ms": {}, "max_concurrent_requests": 2, **compute_metrics(records, 1.0)}
    return result


def test_the_report_prints_cache_use_and_ttft_by_turn() -> None:
    records = [rec(0.1, 1, 150, 0), rec(0.3, 1, 150, 0), rec(0.2, 2, 200, 100), rec(0.4, 2, 200, 150)]
    result = _multiturn_result(records)
    text = format_result(result, (50, 90, 99))
    assert re.search(r"Cached prompt tokens:\s+250\n", text)
    assert re.search(r"Prefix cache hit ratio \(%\):\s+35\.71\n", text)  # 250 / 700
    assert "TTFT by turn" in text
    assert re.search(r"^\s+1\s+2\s+150\s+0\s+200\.0\s+200\.0\s+280\.0\s+298\.0$", text, re.M)
    assert re.search(r"^\s+2\s+2\s+200\s+62\s+300\.0\s+300\.0\s+380\.0\s+398\.0$", text, re.M)
    page = markdown_report({"kiln": [result]}, (50, 90, 99), [])
    assert "multiturn dataset: 2 sessions x 3 turns" in page and "## TTFT by turn" in page
    assert "| kiln | 2 | inf | 2 | 2 | 0 | 200.0 | 62.5 | 300.0 | 300.0 | 380.0 | 398.0 |" in page
    assert "| cached tok | cache hit % |" in page
    plain = format_result(_multiturn_result([rec(0.1, None)]), (50, 99))
    assert "Prefix cache" not in plain and "TTFT by turn" not in plain


def test_the_vllm_file_adds_ttft_by_turn_only_for_multiturn() -> None:
    records = [rec(0.1, 1), rec(0.2, 2)]
    result = _multiturn_result(records)
    vres = vllm_result(result, records, (50, 90, 99))
    assert list(vres) == [*vllm_keys((50, 90, 99)), "ttft_by_turn"] and vres["ttft_by_turn"] == result["ttft_by_turn"]
    del result["ttft_by_turn"]
    assert list(vllm_result(result, records, (50, 90, 99))) == vllm_keys((50, 90, 99))


# --- configuration -------------------------------------------------------------------------


def config(*argv: str) -> BenchConfig:
    return build_config(build_parser().parse_args(["run", "--base-url", "http://h", *argv]))


def test_dataset_defaults_and_checks() -> None:
    assert (config().endpoint, config().input_len, config().dataset) == ("completions", 256, "random")
    shared = config("--dataset", "shared-prefix")
    assert (shared.endpoint, shared.prefix_len, shared.input_len) == ("chat", 1000, 50)
    assert config("--dataset-name", "shared-prefix", "--endpoint", "completions").endpoint == "completions"
    multi = config("--dataset", "multiturn", "--concurrency", "1,8")
    assert (multi.endpoint, multi.prefix_len, multi.turns, multi.num_sessions) == ("chat", 100, 5, 8)
    assert multi.requests_per_point == 40
    assert config("--dataset", "multiturn", "--request-rate", "2", "--num-prompts", "12",
                  "--turns", "4").num_sessions == 3
    assert config("--dataset", "multiturn", "--num-sessions", "3", "--prefix-len", "0").prefix_len == 0
    with pytest.raises(ValueError, match="needs --endpoint chat"):
        config("--dataset", "multiturn", "--endpoint", "completions")
    with pytest.raises(ValueError, match="--prefix-len must be >= 1"):
        config("--dataset", "shared-prefix", "--prefix-len", "0")
    with pytest.raises(ValueError, match="--prefix-len needs"):
        config("--prefix-len", "10")
    with pytest.raises(ValueError, match="--turns"):
        config("--dataset", "multiturn", "--turns", "0")


# --- end to end against the fake server ----------------------------------------------------


def test_cli_shared_prefix_reports_the_cached_prefix(fake_server, tmp_path: Path) -> None:
    server = fake_server(prefix_cache_block=16)
    out = tmp_path / "shared"
    code = main(["--base-url", server.base_url, "--dataset", "shared-prefix", "--prefix-len", "64", "--input-len", "8",
                 "--output-len", "4", "--num-prompts", "6", "--concurrency", "2,3", "--ignore-eos",
                 "--result-dir", str(out)])
    assert code == 0
    first, second = (json.loads((out / f"server-c{c}-rinf.json").read_text()) for c in (2, 3))
    for r in (first, second):
        assert (r["completed"], r["dataset"], r["prefix_len"], r["endpoint"]) == (6, "shared-prefix", 64, "chat")
        assert r["total_input_tokens"] == 6 * 72 and r["cached_tokens_from_usage"] == 6
    # the prefix is 4 blocks of 16 words: every request but the very first finds it cached
    assert first["total_cached_tokens"] == 5 * 64 and first["prefix_cache_hit_ratio"] == pytest.approx(320 / 432)
    assert second["total_cached_tokens"] == 6 * 64  # the second point starts warm, with new user turns
    dataset_bodies = [b for b in server.bodies[1:]]  # [0] is the warm-up
    assert len(dataset_bodies) == 12
    assert len({b["messages"][0]["content"] for b in dataset_bodies}) == 1
    assert len({b["messages"][1]["content"] for b in dataset_bodies}) == 12
    assert all(words(b["messages"][0]["content"]) == 64 and b["messages"][0]["role"] == "system"
               for b in dataset_bodies)
    page = (out / "server.md").read_text()
    assert "shared-prefix dataset: 6 prompts per point, a 64-token system prompt" in page
    assert "| 320 | 74.1 |" in page
    vres = [json.loads(p.read_text()) for p in out.glob("server-infqps-*.json")]
    assert len(vres) == 2 and all(list(v) == vllm_keys((50, 90, 99)) for v in vres)


def test_cli_multiturn_reports_ttft_and_cache_by_turn(fake_server, tmp_path: Path) -> None:
    server = fake_server(ttft_s=0.01, itl_s=0.001, prefix_cache_block=16)
    out = tmp_path / "multi"
    code = main(["--base-url", server.base_url, "--dataset", "multiturn", "--prefix-len", "20", "--input-len", "10",
                 "--output-len", "6", "--turns", "3", "--num-sessions", "2", "--concurrency", "2", "--ignore-eos",
                 "--result-dir", str(out)])
    assert code == 0
    r = json.loads((out / "server-c2-rinf.json").read_text())
    assert (r["completed"], r["failed"], r["num_prompts"], r["num_sessions"], r["turns"]) == (6, 0, 6, 2, 3)
    assert r["max_concurrent_requests"] <= 2 and r["endpoint"] == "chat"
    turns = r["ttft_by_turn"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    # turn k's prompt: 20 + 10k + 6(k-1) words; cached: the whole blocks of the previous prompt + reply
    assert [t["mean_input_tokens"] for t in turns] == [30, 46, 62]
    assert [t["total_cached_tokens"] for t in turns] == [0, 2 * 32, 2 * 48]
    assert [t["prefix_cache_hit_ratio"] for t in turns] == pytest.approx([0, 32 / 46, 48 / 62])
    assert all(t["completed"] == 2 and t["median_ttft_ms"] >= 10 and t["p99_ttft_ms"] >= t["p50_ttft_ms"]
               for t in turns)
    assert r["total_input_tokens"] == 2 * 138 and r["total_cached_tokens"] == 160
    names = {p.name for p in out.iterdir()}
    assert {"server.md", "server-ttft-by-turn.png", "server-latency.png"} <= names
    assert (out / "server-ttft-by-turn.png").read_bytes()[:4] == b"\x89PNG"
    assert "## TTFT by turn" in (out / "server.md").read_text()
    (vpath,) = out.glob("server-infqps-concurrency2-*.json")
    vres = json.loads(vpath.read_text())
    assert list(vres)[-1] == "ttft_by_turn" and vres["ttft_by_turn"] == turns and vres["num_prompts"] == 6
    assert main(["plot", str(out)]) == 0  # the by-turn figure is redrawn from the sweep file
