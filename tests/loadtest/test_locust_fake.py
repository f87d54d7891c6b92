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
    assert not any("turn" in name for _, name in stats)  # MultiTurnChatUser only runs when named
    with open(tmp_path / "fake_llm.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert float(rows["/v1/completions"]["Output tokens/s"]) > 0
    assert (tmp_path / "fake.html").stat().st_size > 0


def test_multiturn_user_resends_its_history_and_reports_turns(fake_server, run_locust, tmp_path: Path) -> None:
    server = fake_server(ttft_s=0.01, itl_s=0.002, prefix_cache_block=16)
    stats = run_locust(server.base_url, tmp_path / "multi", 4, 2, "MultiTurnChatUser", "--turns", "3",
                       "--turn-len", "10", "--system-prompt-len", "20", "--max-tokens", "6", "--ignore-eos",
                       "--stream-ratio", "0.5")
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    chat = "/v1/chat/completions"
    for turn in (1, 2, 3):
        sent = sum(int(stats[("POST", f"{chat} turn {turn}{suffix}")]["Request Count"])
                   for suffix in ("", " stream") if ("POST", f"{chat} turn {turn}{suffix}") in stats)
        assert sent > 0
        assert int(stats[("CACHED", f"{chat} turn {turn}")]["Request Count"]) == sent
    assert ("POST", "/v1/completions") not in stats  # only chat sessions ran
    # every body is one session's history: system, then user/assistant pairs, then the new user turn
    for body in server.bodies:
        roles = [m["role"] for m in body["messages"]]
        turn = (len(roles) - 1) // 2 + 1
        assert roles == ["system"] + ["user", "assistant"] * (turn - 1) + ["user"] and turn <= 3
        assert all(m["content"] == " tok0 tok1 tok2 tok3 tok4 tok5" for m in body["messages"][2::2])
    assert {len(b["messages"]) for b in server.bodies} == {2, 4, 6}
    with open(tmp_path / "multi_llm.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    # prompts of 30, 46, 62 words; cached: 0, then the whole 16-word blocks of the previous prompt + reply
    # NOTE: locust rewrites _stats.csv once a second, so compare the summary with itself, not with it
    sent = [int(rows[f"{chat} turn {turn}"]["Requests"]) for turn in (1, 2, 3)]
    assert sent[0] >= sent[1] >= sent[2] >= sent[0] - 2  # each of the 2 users goes 1, 2, 3, 1, ...
    assert [int(rows[f"{chat} turn {t}"]["Prompt tokens"]) for t in (1, 2, 3)] == [n * w for n, w in
                                                                                  zip(sent, (30, 46, 62))]
    assert float(rows[f"{chat} turn 1"]["Cache hit ratio"]) == 0
    assert float(rows[f"{chat} turn 2"]["Cache hit ratio"]) == round(32 / 46, 4)
    assert float(rows[f"{chat} turn 3"]["Cache hit ratio"]) == round(48 / 62, 4)
    assert float(rows[f"{chat} turn 2"]["TTFT p50 (ms)"]) >= 10
