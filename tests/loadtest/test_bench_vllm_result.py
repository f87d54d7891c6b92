"""The `vllm bench serve --save-result`-shaped file the bench writes per sweep point.

The fixture lists are the keys of result files that vLLM 0.32.0's own client wrote (they sit
beside the list); the bench's file must have exactly those keys, in that order, and the same
numbers as the bench's own report of the same run.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from loadtest.bench.__main__ import main
from loadtest.bench.vllm_result import VLLM_VERSION, vllm_file_name, vllm_keys

FIXTURES = Path(__file__).parent / "fixtures"
VLLM_KEYS = json.loads((FIXTURES / f"vllm_{VLLM_VERSION}_result_keys.json").read_text())
METRIC_KEYS = [k for k in VLLM_KEYS["keys"] if k.endswith("_ms")]
SHARED_KEYS = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
               "request_goodput", "output_throughput", "total_token_throughput", *METRIC_KEYS]


def _vllm_file(out: Path, pattern: str) -> dict:
    (path,) = [p for p in out.iterdir() if re.fullmatch(pattern, p.name)]
    return json.loads(path.read_text())


def test_the_fixture_lists_are_what_vllm_wrote() -> None:
    plain = json.loads((FIXTURES / "vllm-0.32.0" / "openai-infqps-concurrency2-fake-model-20261130-230620.json")
                       .read_text())
    detailed = json.loads((FIXTURES / "vllm-0.32.0" / "kiln-50.0qps-fake-model-20261130-230634.json").read_text())
    assert list(plain) == VLLM_KEYS["keys"] and list(detailed) == VLLM_KEYS["detailed_keys"]
    assert vllm_keys((50, 90, 99)) == VLLM_KEYS["keys"]
    assert vllm_keys((50, 90, 99), detailed=True) == VLLM_KEYS["detailed_keys"]
    # vLLM's own file names for these two runs, from their settings
    assert vllm_file_name(plain) == "openai-infqps-concurrency2-fake-model-20261130-230620.json"
    assert vllm_file_name(detailed) == "kiln-50.0qps-fake-model-20261130-230634.json"


def test_a_vllm_shaped_file_per_point_that_agrees_with_the_report(fake_server, tmp_path: Path) -> None:
    server = fake_server(ttft_s=0.01, itl_s=0.002)
    out = tmp_path / "results"
    code = main(["--base-url", server.base_url, "--num-prompts", "6", "--input-len", "8", "--output-len", "5",
                 "--concurrency", "1,3", "--ignore-eos", "--result-dir", str(out)])
    assert code == 0
    for conc in (1, 3):
        kiln = json.loads((out / f"server-c{conc}-rinf.json").read_text())
        vres = _vllm_file(out, rf"server-infqps-concurrency{conc}-fake-model-\d{{8}}-\d{{6}}\.json")
        assert list(vres) == VLLM_KEYS["keys"]
        for key in SHARED_KEYS:
            assert vres[key] == kiln[key], key
        assert vres["date"] == datetime.fromisoformat(kiln["date"]).astimezone().strftime("%Y%m%d-%H%M%S")
        assert (vres["backend"], vres["endpoint_type"], vres["label"]) == ("openai", "openai", "server")
        assert (vres["model_id"], vres["num_prompts"], vres["burstiness"]) == ("fake-model", 6, 1.0)
        assert (vres["request_rate"], vres["max_concurrency"], vres["rtfx"]) == ("inf", conc, 0.0)
        assert vres["tokenizer_id"] is None  # word-list prompts: no tokenizer
        assert len(vres["latencies"]) == len(vres["queue_times"]) == 6
        assert sum(vres["latencies"]) / 6 * 1000 == pytest.approx(kiln["mean_e2el_ms"])
        assert all(q >= 0 for q in vres["queue_times"])
        # vLLM counts requests active in a one-second bucket: never fewer than in flight at once
        assert vres["max_concurrent_requests"] >= kiln["max_concurrent_requests"]
        assert 0 < vres["max_output_tokens_per_s"] <= kiln["total_output_tokens"]
    serial = _vllm_file(out, r"server-infqps-concurrency1-.*\.json")
    assert max(serial["queue_times"]) > 0.01  # requests 2..6 waited for the one slot


def test_detailed_chat_at_a_request_rate_with_a_failure(fake_server, tmp_path: Path) -> None:
    server = fake_server(ttft_s=0.01, itl_s=0.002, fail_every=4)  # the warm-up is request 1
    out = tmp_path / "results"
    code = main(["run", "--base-url", server.base_url, "--label", "kiln", "--endpoint", "chat", "--num-prompts", "6",
                 "--input-len", "8", "--output-len", "4", "--request-rate", "50", "--ignore-eos",
                 "--save-detailed", "--result-dir", str(out)])
    assert code == 0
    kiln = json.loads((out / "kiln-cinf-r50.json").read_text())
    vres = _vllm_file(out, r"kiln-50\.0qps-fake-model-\d{8}-\d{6}\.json")
    assert list(vres) == VLLM_KEYS["detailed_keys"]
    for key in SHARED_KEYS:
        assert vres[key] == kiln[key], key
    assert (vres["backend"], vres["request_rate"], vres["max_concurrency"]) == ("openai-chat", 50.0, None)
    assert (kiln["completed"], kiln["failed"]) == (5, 1)
    assert sum(vres["output_lens"]) == kiln["total_output_tokens"] == 5 * 4
    ok = [e == "" for e in vres["errors"]]
    assert ok.count(False) == 1 and vres["errors"][ok.index(False)] == "HTTP 500: injected failure"
    assert sum(n for n, good in zip(vres["input_lens"], ok) if good) == kiln["total_input_tokens"]
    failed = ok.index(False)
    assert (vres["output_lens"][failed], vres["ttfts"][failed], vres["latencies"][failed]) == (0, 0.0, 0.0)
    assert vres["itls"][failed] == [] and vres["generated_texts"][failed] == ""
    assert [t for t, good in zip(vres["generated_texts"], ok) if good] == [" tok0 tok1 tok2 tok3"] * 5
    ttfts = [t for t, good in zip(vres["ttfts"], ok) if good]
    assert sum(ttfts) / 5 * 1000 == pytest.approx(kiln["mean_ttft_ms"])
    itls = [gap for gaps in vres["itls"] for gap in gaps]
    assert len(itls) == 5 * 3 and sum(itls) / len(itls) * 1000 == pytest.approx(kiln["mean_itl_ms"])
    assert vres["start_times"] == sorted(vres["start_times"]) and vres["start_times"][0] >= 0


def test_no_vllm_result(fake_server, tmp_path: Path) -> None:
    server = fake_server()
    out = tmp_path / "results"
    assert main(["--base-url", server.base_url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                 "--concurrency", "2", "--no-vllm-result", "--result-dir", str(out)]) == 0
    assert not [p for p in out.iterdir() if "qps" in p.name]


def test_file_names_follow_vllm() -> None:
    base = {"label": None, "backend": "openai", "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "date": "20260101-120000", "max_concurrency": None}
    assert vllm_file_name({**base, "request_rate": 2}) == "openai-2.0qps-SmolLM2-135M-Instruct-20260101-120000.json"
    assert (vllm_file_name({**base, "label": "kiln", "request_rate": "inf", "max_concurrency": 4})
            == "kiln-infqps-concurrency4-SmolLM2-135M-Instruct-20260101-120000.json")
