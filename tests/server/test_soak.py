"""A bounded soak (slow suite): a few minutes of random traffic with disconnects against a real server,
then the server must be idle and whole (loadtest/soak.py; run that for hours by hand)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from loadtest.soak import check_idle, rss_bytes, soak
from server_harness import ServerProcess

pytestmark = pytest.mark.slow
DURATION_S = 60
WARM_S = 15
RSS_GROWTH_BOUND = 64 * 2**20     # after warm-up: caches are full, what grows now is a leak


def test_soak_leaves_the_server_idle_and_whole(tiny_artifact, tmp_path):
    server = ServerProcess(tiny_artifact, tmp_path, "--served-model-name", "tiny").wait_ready()
    try:
        rss = {}
        stats = asyncio.run(soak(server.url, DURATION_S, concurrency=8, seed=1,
                                 on_warm=lambda: rss.setdefault("warm", rss_bytes(server.proc.pid)),
                                 warm_after=WARM_S))
        metrics = check_idle(server.url)
        growth = rss_bytes(server.proc.pid) - rss["warm"]
        assert not stats.errors, stats
        assert stats.completed > 60 and stats.abandoned > 5, stats
        assert metrics["kiln:num_requests_running"] == 0 and metrics["kiln:num_requests_waiting"] == 0
        assert metrics["kiln:kv_cache_usage_perc"] == 0                  # every slot free
        assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / 2**20:.1f} MiB after warm-up"
        assert httpx.get(f"{server.url}/health").status_code == 200
        out = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                         timeout=30)
        assert out.status_code == 200
        print(f"soak: {stats}, RSS growth after warm-up {growth / 2**20:.1f} MiB")
    finally:
        server.stop()
