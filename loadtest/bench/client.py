"""One async HTTP client per target, and the function that sends one request and times it."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from loadtest.openai_api import ENDPOINT_PATHS, RequestTiming, StreamRecorder, choice_text, timing_from_body


def make_client(base_url: str, api_key: str | None, timeout_s: float, max_connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # NOTE: proxies from the environment would swallow loopback traffic; only honour them elsewhere.
    loopback = urlsplit(base_url).hostname in ("127.0.0.1", "localhost", "::1")
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        trust_env=not loopback,
    )


async def discover_model(client: httpx.AsyncClient) -> str:
    """The first model id of GET /v1/models; raises RuntimeError with the reason."""
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as e:
        url = client.base_url.join("/v1/models")
        raise RuntimeError(f"could not read a model from {url} ({e}); pass --model") from None


async def send_request(client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]) -> RequestTiming:
    """POST one completions/chat request, streamed when body['stream'], and time it."""
    timing, _ = await send_request_text(client, endpoint, body, keep_text=False)
    return timing


async def send_request_text(
    client: httpx.AsyncClient, endpoint: str, body: dict[str, Any], keep_text: bool = True
) -> tuple[RequestTiming, str | None]:
    """send_request, also returning the generated text when keep_text (else None)."""
    path = ENDPOINT_PATHS[endpoint]
    start = time.perf_counter()
    try:
        if body.get("stream"):
            recorder = StreamRecorder(start, keep_text=keep_text)
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    return _http_error(resp.status_code, text, start), None
                async for line in resp.aiter_lines():
                    recorder.feed_line(line, time.perf_counter())
            timing = recorder.finish(time.perf_counter())
            return timing, recorder.text
        resp = await client.post(path, json=body)
        now = time.perf_counter()
        if resp.status_code != 200:
            return _http_error(resp.status_code, resp.text, start), None
        obj = resp.json()
        timing = timing_from_body(obj, start, now)
        return timing, (choice_text(obj) if keep_text and timing.ok else None)
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as e:
        message = str(e) or type(e).__name__
        error = RequestTiming(ok=False, error=f"{type(e).__name__}: {message}", latency=time.perf_counter() - start)
        return error, None


def _http_error(status: int, text: str, start: float) -> RequestTiming:
    try:
        detail = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = text[:200]
    return RequestTiming(ok=False, error=f"HTTP {status}: {detail}", latency=time.perf_counter() - start)
