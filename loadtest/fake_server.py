"""A tiny OpenAI-compatible server that streams synthetic tokens at a set pace.

For trying the load tools without a model, and for their tests: it proves they speak plain
OpenAI, not only Kiln. Standard library only; threads, one per connection; 127.0.0.1 by default.

    python -m loadtest.fake_server --port 8001 --ttft-ms 50 --itl-ms 10

Each request waits ttft, then emits max_tokens tokens ("tok0 tok1 ..."), itl apart. Without
`ignore_eos` it stops early after `eos_after` tokens when that is set. Every `fail_every`-th
request answers HTTP 500. `usage=False` leaves usage out, as some servers do.

With `prefix_cache_block` B > 0 it also models a prefix cache, the way vLLM's works, with words
as tokens: a prompt's leading whole blocks of B words that an earlier request's prompt or reply
already covered count as cached, reported as usage.prompt_tokens_details.cached_tokens. So the
count is deterministic: a shared system prompt is cached for every request after the first, a
multiturn turn finds the whole previous turn (prompt and reply) cached. Timing does not change.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class FakeBehavior:
    model: str = "fake-model"
    ttft_s: float = 0.02
    itl_s: float = 0.005
    eos_after: int | None = None
    fail_every: int = 0
    usage: bool = True
    prefix_cache_block: int = 0  # > 0: report cached_tokens of a prefix cache with blocks of this many words


class FakeOpenAIServer:
    """Start with `with FakeOpenAIServer(FakeBehavior(...)) as server:`; `server.base_url`."""

    def __init__(self, behavior: FakeBehavior = FakeBehavior(), host: str = "127.0.0.1", port: int = 0):
        self.behavior = behavior
        self.bodies: list[dict[str, Any]] = []  # every request body received, in order
        self._lock = threading.Lock()
        self._count = 0
        self._blocks: set[int] = set()  # chained hashes of the cached word blocks
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, body: dict[str, Any]) -> int:
        """Store the body and return this request's 1-based number."""
        with self._lock:
            self.bodies.append(body)
            self._count += 1
            return self._count

    def cached_prefix(self, words: list[str]) -> int:
        """How many leading words are in cached blocks; then caches the prompt's own blocks."""
        hashes = _block_hashes(words, self.behavior.prefix_cache_block)
        with self._lock:
            hits = next((i for i, h in enumerate(hashes) if h not in self._blocks), len(hashes))
            self._blocks.update(hashes)
        return hits * self.behavior.prefix_cache_block

    def cache(self, words: list[str]) -> None:
        """Caches the blocks of a prompt and its reply (as a server keeps the blocks it generated)."""
        hashes = _block_hashes(words, self.behavior.prefix_cache_block)
        with self._lock:
            self._blocks.update(hashes)


def _block_hashes(words: list[str], block: int) -> list[int]:
    """One hash per whole block, each over the block and all before it (vLLM's block hashes)."""
    out: list[int] = []
    for i in range(block, len(words) + 1, block) if block > 0 else ():
        out.append(hash((out[-1] if out else None, tuple(words[i - block:i]))))
    return out


def _prompt_words(body: dict[str, Any]) -> list[str]:
    """The prompt as words (the fake server's tokens): chat messages' contents in order."""
    if "messages" in body:
        return [w for m in body["messages"] for w in str(m.get("content", "")).split()]
    prompt = body.get("prompt", "")
    return prompt.split() if isinstance(prompt, str) else [str(t) for t in prompt]


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    b = server.behavior

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # NOTE: without TCP_NODELAY small SSE writes can sit ~40 ms in Nagle's buffer.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in ("/health", "/ready"):
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": b.model, "object": "model"}]})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                return self._json(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            number = server.record(body)
            if b.fail_every and number % b.fail_every == 0:
                return self._json(500, {"error": {"message": "injected failure", "type": "server_error"}})
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            n = max_tokens if body.get("ignore_eos") or b.eos_after is None else min(max_tokens, b.eos_after)
            words = _prompt_words(body)
            usage: dict[str, Any] = {"prompt_tokens": len(words), "completion_tokens": n,
                                     "total_tokens": len(words) + n}
            if b.prefix_cache_block > 0:
                usage["prompt_tokens_details"] = {"cached_tokens": server.cached_prefix(words)}
            if body.get("stream"):
                include_usage = b.usage and (body.get("stream_options") or {}).get("include_usage")
                self._stream(chat, n, usage if include_usage else None)
            else:
                time.sleep(b.ttft_s + b.itl_s * max(n - 1, 0))
                text = "".join(f" tok{i}" for i in range(n))
                choice = {"index": 0, "finish_reason": "length" if n == max_tokens else "stop"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                obj = {"id": f"fake-{number}", "object": "chat.completion" if chat else "text_completion",
                       "created": int(time.time()), "model": b.model, "choices": [choice]}
                if b.usage:
                    obj["usage"] = usage
                self._json(200, obj)
            if b.prefix_cache_block > 0:
                server.cache(words + [f"tok{i}" for i in range(n)])

        def _stream(self, chat: bool, n: int, usage: dict[str, int] | None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            kind = "chat.completion.chunk" if chat else "text_completion"
            base = {"id": "fake", "object": kind, "created": int(time.time()), "model": b.model}

            def choice(text: str, finish: str | None) -> dict[str, Any]:
                if chat:
                    return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                return {"index": 0, "text": text, "finish_reason": finish}

            if chat:  # like OpenAI: a first chunk with the role and no content
                self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            time.sleep(b.ttft_s)
            for i in range(n):
                if i:
                    time.sleep(b.itl_s)
                self._event({**base, "choices": [choice(f" tok{i}", None)]})
            self._event({**base, "choices": [choice("", "length")]})
            if usage is not None:
                self._event({**base, "choices": [], "usage": usage})
            self._write(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def _event(self, obj: dict[str, Any]) -> None:
            self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def _write(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.fake_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--eos-after", type=int, default=None)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--prefix-cache-block", type=int, default=0,
                   help="report usage.prompt_tokens_details.cached_tokens of a prefix cache with blocks of N words")
    args = p.parse_args(argv)
    behavior = FakeBehavior(args.model, args.ttft_ms / 1000, args.itl_ms / 1000, args.eos_after, args.fail_every,
                            prefix_cache_block=args.prefix_cache_block)
    server = FakeOpenAIServer(behavior, args.host, args.port)
    print(f"fake OpenAI server on {server.base_url} (model {args.model})", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
