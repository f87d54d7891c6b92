"""Locust users that speak the OpenAI API to Kiln or any OpenAI-compatible server.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 2 -t 2m \
        --csv reports/kiln --html reports/kiln.html

Each task sends one chat or completions request, streamed or not (--chat-ratio, --stream-ratio),
with a prompt and max_tokens drawn from length specs (--prompt-len, --max-tokens; see
loadtest/prompts.py). Streamed replies also add their own rows to the stats, next to the
request rows, with the route as name: TTFT (ms), TPOT (ms, per request), ITL (ms, one per token
gap) and TOKENS (output tokens per request: its "response time" columns are token counts).
With --csv PREFIX, PREFIX_llm.csv sums them up per route, output tokens per second included.
Every option has a LOCUST_* environment twin; see loadtest/README.md.
"""

from __future__ import annotations

import csv
import itertools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task

try:
    from loadtest.openai_api import ENDPOINT_PATHS, RequestTiming, StreamRecorder, build_body, timing_from_body
except ImportError:  # run as `locust -f loadtest/locustfile.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtest.openai_api import ENDPOINT_PATHS, RequestTiming, StreamRecorder, build_body, timing_from_body
from loadtest.prompts import LengthDistribution, PromptSampler, parse_length_spec

logger = logging.getLogger(__name__)
PSEUDO_TYPES = ("TTFT", "TPOT", "ITL", "TOKENS")


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    def add(flag: str, **kwargs: Any) -> None:
        parser.add_argument(flag, env_var="LOCUST_" + flag[2:].upper().replace("-", "_"), **kwargs)

    add("--model", default="", help="model name to send (default: first id of GET /v1/models)")
    add("--chat-ratio", type=float, default=0.5, help="share of requests to /v1/chat/completions (rest: completions)")
    add("--stream-ratio", type=float, default=0.8, help="share of streamed requests")
    add("--prompt-len", default="chat", help="prompt length spec in tokens: N, uniform:LO:HI, lognormal:..., chat")
    add("--max-tokens", default="64", help="max_tokens length spec (same forms as --prompt-len)")
    add("--ignore-eos", action="store_true", default=False, help="send ignore_eos so replies run to max_tokens")
    add("--temperature", type=float, default=0.7)
    add("--prompt-seed", type=int, default=0, help="seed of the prompt generator (user i uses seed + i)")
    add("--think-time", type=float, default=0.0, help="seconds a user waits between requests")
    add("--request-timeout", type=float, default=600.0, help="seconds per request")
    add("--api-key", default="", is_secret=True, help="Bearer token")


@dataclass(frozen=True)
class LoadOptions:
    model: str
    chat_ratio: float
    stream_ratio: float
    prompt_len: LengthDistribution
    max_tokens: LengthDistribution
    ignore_eos: bool
    temperature: float
    prompt_seed: int
    think_time: float
    request_timeout: float
    api_key: str

    @classmethod
    def from_parsed(cls, opts: Any) -> LoadOptions:
        """Build from locust's parsed options; raises ValueError naming the bad option."""
        for name in ("chat_ratio", "stream_ratio"):
            if not 0.0 <= getattr(opts, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be within [0, 1]")
        if opts.think_time < 0 or opts.request_timeout <= 0:
            raise ValueError("--think-time must be >= 0 and --request-timeout > 0")
        return cls(
            opts.model, opts.chat_ratio, opts.stream_ratio, parse_length_spec(opts.prompt_len),
            parse_length_spec(opts.max_tokens), bool(opts.ignore_eos), opts.temperature, opts.prompt_seed,
            opts.think_time, opts.request_timeout, opts.api_key,
        )


@events.init.add_listener
def check_options(environment: Any, **_: Any) -> None:
    if environment.parsed_options is not None:
        try:
            LoadOptions.from_parsed(environment.parsed_options)
        except ValueError as e:
            logger.error("%s", e)
            sys.exit(2)


_user_numbers = itertools.count()  # NOTE: gives user i the seed prompt_seed + i: reproducible prompts


class OpenAIUser(HttpUser):
    host = "http://127.0.0.1:8000"

    def wait_time(self) -> float:
        return self.options.think_time

    def on_start(self) -> None:
        self.options = LoadOptions.from_parsed(self.environment.parsed_options)
        seed = self.options.prompt_seed + next(_user_numbers)
        self.sampler = PromptSampler(self.options.prompt_len, self.options.max_tokens, seed)
        if self.options.api_key:
            self.client.headers["Authorization"] = f"Bearer {self.options.api_key}"
        self.model = self.options.model or self._discover_model()

    def _discover_model(self) -> str:
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
            try:
                return resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                resp.failure(f"no model in /v1/models (HTTP {resp.status_code}); pass --model")
                return "default"

    @task
    def generate(self) -> None:
        opts, rng = self.options, self.sampler.rng
        endpoint = "chat" if rng.random() < opts.chat_ratio else "completions"
        stream = rng.random() < opts.stream_ratio
        prompt, _, max_tokens = self.sampler.sample()
        body = build_body(endpoint, self.model, prompt, max_tokens, stream=stream,
                          temperature=opts.temperature, ignore_eos=opts.ignore_eos)
        path = ENDPOINT_PATHS[endpoint]
        start = time.perf_counter()
        with self.client.post(path, json=body, stream=stream, name=f"{path} stream" if stream else path,
                              catch_response=True, timeout=opts.request_timeout) as resp:
            timing = self._read(resp, start, stream)
            # NOTE: for a stream locust timed only the headers; report the whole response instead.
            resp.request_meta["response_time"] = timing.latency * 1000.0
            resp.request_meta["response_length"] = timing.num_chars
            if timing.ok:
                resp.success()
            else:
                resp.failure(timing.error)
        if timing.ok:
            self._report(path, timing, stream)

    def _read(self, resp: Any, start: float, stream: bool) -> RequestTiming:
        if resp.status_code != 200:
            detail = getattr(resp, "error", None) or (resp.text or "")[:200]
            return RequestTiming(ok=False, error=f"HTTP {resp.status_code}: {detail}",
                                 latency=time.perf_counter() - start)
        if not stream:
            try:
                return timing_from_body(resp.json(), start, time.perf_counter())
            except ValueError as e:
                return RequestTiming(ok=False, error=f"bad JSON: {e}", latency=time.perf_counter() - start)
        recorder = StreamRecorder(start)
        try:
            for line in resp.iter_lines():
                recorder.feed_line(line.decode("utf-8", "replace"), time.perf_counter())
        except Exception as e:  # noqa: BLE001 - any broken stream is a failed request, not a crash
            return recorder.finish(time.perf_counter(), error=f"stream broken: {type(e).__name__}: {e}")
        return recorder.finish(time.perf_counter())

    def _report(self, path: str, timing: RequestTiming, stream: bool) -> None:
        def fire(request_type: str, name: str, response_time: float, response_length: int) -> None:
            self.environment.events.request.fire(
                request_type=request_type, name=name, response_time=response_time,
                response_length=response_length, exception=None, context={},
            )

        if stream and timing.ttft is not None:
            fire(request_type="TTFT", name=path, response_time=timing.ttft * 1000.0, response_length=0)
            if timing.tpot is not None:
                fire(request_type="TPOT", name=path, response_time=timing.tpot * 1000.0, response_length=0)
            for gap in timing.itls:
                fire(request_type="ITL", name=path, response_time=gap * 1000.0, response_length=0)
        fire(request_type="TOKENS", name=path, response_time=timing.output_tokens,
             response_length=timing.output_tokens)


@events.test_stop.add_listener
def write_llm_summary(environment: Any, **_: Any) -> None:
    """Log, and with --csv write PREFIX_llm.csv: per route, tokens/s and TTFT/TPOT/ITL percentiles."""
    stats = environment.stats
    if not stats.total.num_requests or stats.total.last_request_timestamp is None:
        return
    duration = max(stats.total.last_request_timestamp - stats.total.start_time, 1e-9)
    rows = []
    for path in ENDPOINT_PATHS.values():
        tokens = stats.entries.get((path, "TOKENS"))
        if tokens is None or tokens.num_requests == 0:
            continue
        row: dict[str, Any] = {"Name": path, "Requests": tokens.num_requests,
                               "Output tokens": round(tokens.total_response_time),
                               "Output tokens/s": round(tokens.total_response_time / duration, 2)}
        for kind in ("TTFT", "TPOT", "ITL"):
            entry = stats.entries.get((path, kind))
            for q in (0.5, 0.9, 0.99):
                value = entry.get_response_time_percentile(q) if entry and entry.num_requests else None
                row[f"{kind} p{round(q * 100)} (ms)"] = value
        rows.append(row)
        logger.info("%s: %d requests, %.1f output tok/s, TTFT p50 %s ms, ITL p50 %s ms", path, row["Requests"],
                    row["Output tokens/s"], row["TTFT p50 (ms)"], row["ITL p50 (ms)"])
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix and rows:
        with open(f"{prefix}_llm.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
