"""The locustfile against the fake OpenAI-compatible server: every request kind and the pseudo rows."""

from __future__ import annotations

import csv
from pathlib import Path


def test_locustfile_reports_ttft_itl_and_tokens(fake_server, run_locust, tmp_path: Path) -> None:
    server = fake_server(ttft_s=0.02, itl_s=0.004)
    stats = run_locust(server.base_url, tmp_path / "fake", 4, 3, "--prompt-len", "uniform:4:16",
                       "--max-tokens", "6", "--chat-ratio", "0.5", "--stream-ratio", "0.5", "--ignore-eos")
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert int(stats[("POST", path)]["Request Count"]) > 0
        streamed = int(stats[("POST", f"{path} stream")]["Request Count"])
        assert streamed > 0
        assert int(stats[("TTFT", path)]["Request Count"]) == streamed
        assert float(stats[("TTFT", path)]["Median Response Time"]) >= 20
        assert int(stats[("ITL", path)]["Request Count"]) == 5 * streamed  # 6 tokens, 5 gaps
        assert float(stats[("TOKENS", path)]["Average Response Time"]) == 6  # ignore_eos: always max_tokens
    assert all(body["ignore_eos"] for body in server.bodies)
    with open(tmp_path / "fake_llm.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert float(rows["/v1/completions"]["Output tokens/s"]) > 0
    assert (tmp_path / "fake.html").stat().st_size > 0
