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

Two user classes: OpenAIUser (the above; what runs when no class is named) and MultiTurnChatUser
(chat sessions that resend their whole history every turn and start over after --turns turns;
name it to run it: `locust -f loadtest/locustfile.py MultiTurnChatUser ...`, or both classes to
mix them). Its requests are named per turn ("/v1/chat/completions turn 3"), and so is an extra
TTFT row, so the stats show what a growing history costs, turn by turn. When the server reports
usage.prompt_tokens_details.cached_tokens, a CACHED row per route (and per turn) counts cached
prompt tokens ("response time") over prompt tokens ("response length").
"""

from __future__ import annotations

import csv
import itertools
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task

try:
    from loadtest.openai_api import (
        ENDPOINT_PATHS, RequestTiming, StreamRecorder, build_body, choice_text, timing_from_body,
    )
except ImportError:  # run as `locust -f loadtest/locustfile.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtest.openai_api import (
        ENDPOINT_PATHS, RequestTiming, StreamRecorder, build_body, choice_text, timing_from_body,
    )
from loadtest.prompts import FixedLength, LengthDistribution, PromptSampler, make_prompt, parse_length_spec

logger = logging.getLogger(__name__)
PSEUDO_TYPES = ("TTFT", "TPOT", "ITL", "TOKENS", "CACHED")
CHAT_PATH = ENDPOINT_PATHS["chat"]


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
    add("--turns", type=int, default=5, help="MultiTurnChatUser: turns per session before it starts a new one")
    add("--turn-len", default="50", help="MultiTurnChatUser: user turn length spec in tokens")
    add("--system-prompt-len", default="100",
        help="MultiTurnChatUser: length spec of each session's system prompt (0: none)")


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
    turns: int = 5
    turn_len: LengthDistribution = FixedLength(50)
    system_prompt_len: LengthDistribution | None = FixedLength(100)  # None: no system prompt

    @classmethod
    def from_parsed(cls, opts: Any) -> LoadOptions:
        """Build from locust's parsed options; raises ValueError naming the bad option."""
        for name in ("chat_ratio", "stream_ratio"):
            if not 0.0 <= getattr(opts, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be within [0, 1]")
        if opts.think_time < 0 or opts.request_timeout <= 0:
            raise ValueError("--think-time must be >= 0 and --request-timeout > 0")
        if opts.turns < 1:
            raise ValueError("--turns must be >= 1")
        no_system = opts.system_prompt_len.strip() in ("0", "fixed:0")
        return cls(
            opts.model, opts.chat_ratio, opts.stream_ratio, parse_length_spec(opts.prompt_len),
            parse_length_spec(opts.max_tokens), bool(opts.ignore_eos), opts.temperature, opts.prompt_seed,
            opts.think_time, opts.request_timeout, opts.api_key, opts.turns, parse_length_spec(opts.turn_len),
            None if no_system else parse_length_spec(opts.system_prompt_len),
        )


@events.init.add_listener
def check_options(environment: Any, **_: Any) -> None:
    if environment.parsed_options is not None:
        try:
            LoadOptions.from_parsed(environment.parsed_options)
        except ValueError as e:
            logger.error("%s", e)
            sys.exit(2)


@events.init.add_listener
def default_user_classes(environment: Any, **_: Any) -> None:
    """With no User class named on the command line, run OpenAIUser alone (as before
    MultiTurnChatUser existed) rather than locust's default of every class in the file."""
    opts = environment.parsed_options
    if opts is None or getattr(opts, "user_classes", None) or getattr(opts, "class_picker", False):
        return  # classes named, or picked in the web UI
    environment.user_classes[:] = [u for u in environment.user_classes if not getattr(u, "opt_in", False)]


_user_numbers = itertools.count()  # NOTE: gives user i the seed prompt_seed + i: reproducible prompts


class _OpenAIBase(HttpUser):
    """What both users share: options, model discovery, reading a response, the pseudo rows."""

    abstract = True
    host = "http://127.0.0.1:8000"

    def wait_time(self) -> float:
        return self.options.think_time

    def on_start(self) -> None:
        self.options = LoadOptions.from_parsed(self.environment.parsed_options)
        self.seed = self.options.prompt_seed + next(_user_numbers)
        self.sampler = PromptSampler(self.options.prompt_len, self.options.max_tokens, self.seed)
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

    def _send(self, endpoint: str, body: dict[str, Any], name: str,
              keep_text: bool = False) -> tuple[RequestTiming, str | None]:
        """POST one request as a stats row called `name`; returns its timing and, with keep_text, its text."""
        path, stream = ENDPOINT_PATHS[endpoint], bool(body.get("stream"))
        start = time.perf_counter()
        with self.client.post(path, json=body, stream=stream, name=f"{name} stream" if stream else name,
                              catch_response=True, timeout=self.options.request_timeout) as resp:
            timing, text = self._read(resp, start, stream, keep_text)
            # NOTE: for a stream locust timed only the headers; report the whole response instead.
            resp.request_meta["response_time"] = timing.latency * 1000.0
            resp.request_meta["response_length"] = timing.num_chars
            if timing.ok:
                resp.success()
            else:
                resp.failure(timing.error)
        return timing, text

    def _read(self, resp: Any, start: float, stream: bool, keep_text: bool) -> tuple[RequestTiming, str | None]:
        if resp.status_code != 200:
            detail = getattr(resp, "error", None) or (resp.text or "")[:200]
            return RequestTiming(ok=False, error=f"HTTP {resp.status_code}: {detail}",
                                 latency=time.perf_counter() - start), None
        if not stream:
            try:
                obj = resp.json()
                return timing_from_body(obj, start, time.perf_counter()), choice_text(obj) if keep_text else None
            except ValueError as e:
                return RequestTiming(ok=False, error=f"bad JSON: {e}", latency=time.perf_counter() - start), None
        recorder = StreamRecorder(start, keep_text=keep_text)
        try:
            for line in resp.iter_lines():
                recorder.feed_line(line.decode("utf-8", "replace"), time.perf_counter())
        except Exception as e:  # noqa: BLE001 - any broken stream is a failed request, not a crash
            return recorder.finish(time.perf_counter(), error=f"stream broken: {type(e).__name__}: {e}"), None
        return recorder.finish(time.perf_counter()), recorder.text

    def _fire(self, request_type: str, name: str, response_time: float, response_length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=response_time,
            response_length=response_length, exception=None, context={},
        )

    def _report(self, path: str, timing: RequestTiming, stream: bool) -> None:
        if stream and timing.ttft is not None:
            self._fire("TTFT", path, timing.ttft * 1000.0)
            if timing.tpot is not None:
                self._fire("TPOT", path, timing.tpot * 1000.0)
            for gap in timing.itls:
                self._fire("ITL", path, gap * 1000.0)
        self._fire("TOKENS", path, timing.output_tokens, timing.output_tokens)
        self._report_cache(path, timing)

    def _report_cache(self, name: str, timing: RequestTiming) -> None:
        if timing.cached_tokens is not None and timing.prompt_tokens is not None:
            self._fire("CACHED", name, timing.cached_tokens, timing.prompt_tokens)


class OpenAIUser(_OpenAIBase):
    """One independent chat or completions request per task (--chat-ratio, --stream-ratio)."""

    @task
    def generate(self) -> None:
        opts, rng = self.options, self.sampler.rng
        endpoint = "chat" if rng.random() < opts.chat_ratio else "completions"
        stream = rng.random() < opts.stream_ratio
        prompt, _, max_tokens = self.sampler.sample()
        body = build_body(endpoint, self.model, prompt, max_tokens, stream=stream,
                          temperature=opts.temperature, ignore_eos=opts.ignore_eos)
        path = ENDPOINT_PATHS[endpoint]
        timing, _ = self._send(endpoint, body, path)
        if timing.ok:
            self._report(path, timing, stream)


class MultiTurnChatUser(_OpenAIBase):
    """A chat session per user: each task sends the next user turn (--turn-len tokens) with the
    whole conversation so far (system prompt, earlier user turns and the server's replies), the
    way chat front ends do; after --turns turns, or a failed turn, it starts a new session with
    a new system prompt. Streamed with probability --stream-ratio; max_tokens from --max-tokens.

    Run it by naming it: `locust -f loadtest/locustfile.py MultiTurnChatUser ...`.
    """

    opt_in = True  # NOTE: not run unless named; see default_user_classes

    def on_start(self) -> None:
        super().on_start()
        self.sampler = PromptSampler(self.options.turn_len, self.options.max_tokens, self.seed)
        self.new_session()

    def new_session(self) -> None:
        system_len = self.options.system_prompt_len
        rng = self.sampler.rng
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": make_prompt(rng, system_len.sample(rng))}] if system_len else [])
        self.turn = 0

    @task
    def chat_turn(self) -> None:
        opts = self.options
        stream = self.sampler.rng.random() < opts.stream_ratio
        user, _, max_tokens = self.sampler.sample()
        self.turn += 1
        self.messages.append({"role": "user", "content": user})
        body = build_body("chat", self.model, self.messages, max_tokens, stream=stream,
                          temperature=opts.temperature, ignore_eos=opts.ignore_eos)
        name = f"{CHAT_PATH} turn {self.turn}"
        timing, text = self._send("chat", body, name, keep_text=True)
        if timing.ok:
            self._report(CHAT_PATH, timing, stream)
            if stream and timing.ttft is not None:
                self._fire("TTFT", name, timing.ttft * 1000.0)
            self._report_cache(name, timing)
            self.messages.append({"role": "assistant", "content": text or ""})
        if not timing.ok or self.turn >= opts.turns:
            self.new_session()


@events.test_stop.add_listener
def write_llm_summary(environment: Any, **_: Any) -> None:
    """Log, and with --csv write PREFIX_llm.csv: per route, tokens/s and TTFT/TPOT/ITL percentiles;
    then per MultiTurnChatUser turn, TTFT percentiles; cache columns when the server reported them."""
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
        row.update(_percentile_columns(stats, path, ("TTFT", "TPOT", "ITL")))
        row.update(_cache_columns(stats, path))
        rows.append(row)
        logger.info("%s: %d requests, %.1f output tok/s, TTFT p50 %s ms, ITL p50 %s ms", path, row["Requests"],
                    row["Output tokens/s"], row["TTFT p50 (ms)"], row["ITL p50 (ms)"])
    turns = sorted({(int(m.group(1)), m.group(0)) for name, kind in stats.entries
                    if kind == "POST" and (m := re.match(re.escape(CHAT_PATH) + r" turn (\d+)", name))})
    for turn, name in turns:
        sent = sum(e.num_requests for n in (name, f"{name} stream") if (e := stats.entries.get((n, "POST"))))
        row = {"Name": name, "Requests": sent,
               **_percentile_columns(stats, name, ("TTFT",)), **_cache_columns(stats, name)}
        rows.append(row)
        logger.info("turn %d: TTFT p50 %s ms, p99 %s ms", turn, row["TTFT p50 (ms)"], row["TTFT p99 (ms)"])
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix and rows:
        with open(f"{prefix}_llm.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows(rows)


def _percentile_columns(stats: Any, name: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    row = {}
    for kind in kinds:
        entry = stats.entries.get((name, kind))
        for q in (0.5, 0.9, 0.99):
            value = entry.get_response_time_percentile(q) if entry and entry.num_requests else None
            row[f"{kind} p{round(q * 100)} (ms)"] = value
    return row


def _cache_columns(stats: Any, name: str) -> dict[str, Any]:
    """Prompt tokens, cached prompt tokens and their ratio (the CACHED rows), when the server reported them."""
    entry = stats.entries.get((name, "CACHED"))
    if entry is None or not entry.num_requests:
        return {}
    prompt, cached = entry.total_content_length, round(entry.total_response_time)
    return {"Prompt tokens": prompt, "Cached prompt tokens": cached,
            "Cache hit ratio": round(cached / prompt, 4) if prompt else 0.0}
