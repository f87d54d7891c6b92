"""ServerConfig: the `python -m server` flags, each with a KILN_<FLAG> environment twin.

Precedence: command-line flag, then environment variable, then default. Built once in
`server.__main__` and validated there; components copy out the fields they use.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from server.engine.config import EngineConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
LOG_FORMATS = ("text", "json")

EPILOG = f"""environment:
  every flag has a twin KILN_<FLAG> (e.g. KILN_PORT=9000, KILN_API_KEY=...);
  a flag given on the command line wins over its environment variable.

examples:
  python -m server --artifact artifacts/smollm2
  python -m server                      # compiles {DEFAULT_MODEL} (cpu) into --cache-dir once
  KILN_API_KEY=secret python -m server --artifact a/ --max-num-queued-reqs 64 --log-format json

SIGTERM drains: /ready answers 503, new requests get 503, requests in flight may finish for
--drain-timeout seconds, then the process exits 0.
"""


class ConfigError(ValueError):
    """An invalid flag or environment value (one-line message)."""


def _origins(text: str) -> tuple[str, ...]:
    """'*', 'https://a,https://b' or a JSON list (vLLM's form)."""
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return tuple(values)
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _tool_parser(text: str) -> str:
    from server.api.tool_parsers import TOOL_PARSERS
    if text not in TOOL_PARSERS:
        raise argparse.ArgumentTypeError(f"unknown tool-call parser {text!r}; known: {', '.join(TOOL_PARSERS)}")
    return text


@dataclass(frozen=True)
class ServerConfig:
    artifact: Optional[Path] = None
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None
    max_num_seqs: Optional[int] = None          # None: every compiled KV slot
    max_num_queued_reqs: int = EngineConfig.max_num_queued_reqs
    max_num_batched_tokens: Optional[int] = None  # None: EngineConfig's default
    allowed_origins: tuple[str, ...] = ("*",)
    drain_timeout: float = 30.0
    step_timeout: float = 60.0                  # 0: no deadline
    log_format: str = "text"
    cache_dir: Path = Path("~/.cache/kiln").expanduser()
    enable_auto_tool_choice: bool = True
    tool_call_parser: str = "hermes"
    strict_request_fields: bool = False
    disable_fastapi_docs: bool = False
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_num_queued_reqs < 1:
            raise ConfigError(f"--max-num-queued-reqs must be at least 1, got {self.max_num_queued_reqs}")
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout must be non-negative, got {self.drain_timeout}")
        if self.step_timeout < 0:
            raise ConfigError(f"--step-timeout must be non-negative, got {self.step_timeout}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.api_key == "":
            raise ConfigError("--api-key must not be empty")


# (flag, type, metavar, help); defaults come from ServerConfig.
_FLAGS: list[tuple[str, Callable[[str], object], str, str]] = [
    ("--artifact", _path, "DIR", "compiled artifact folder to serve "
     f"(default: compile {DEFAULT_MODEL} for cpu into --cache-dir once, then serve it)"),
    ("--host", str, "HOST", "address to bind"),
    ("--port", int, "PORT", "port to bind"),
    ("--api-key", str, "KEY", "require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
     "(/health, /ready, /metrics and /version stay open)"),
    ("--served-model-name", str, "NAME", "model name in the API (default: the checkpoint name recorded "
     "in the artifact)"),
    ("--max-num-seqs", int, "N", "sequences decoded together, at most the artifact's compiled KV slots "
     "(default: all of them)"),
    ("--max-num-queued-reqs", int, "N", "requests allowed to wait for a slot; beyond it the server answers "
     "429 with Retry-After"),
    ("--max-num-batched-tokens", int, "N", "prompt tokens prefilled per step: a running stream waits behind at "
     "most this many between two tokens (default: the largest context bucket up to 512 whose prefill takes at "
     "most 0.4 s here, timed at start-up)"),
    ("--allowed-origins", _origins, "ORIGINS", "CORS origins: '*', a comma-separated list or a JSON list"),
    ("--drain-timeout", float, "SECONDS", "on SIGTERM, how long requests in flight may run before they "
     "are aborted"),
    ("--step-timeout", float, "SECONDS", "an engine step running longer than this declares the engine dead: live "
     "requests fail and /health answers 503 so the pod is restarted (vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S); "
     "0: no deadline"),
    ("--log-format", str, "FORMAT", f"log lines as {' or '.join(LOG_FORMATS)}"),
    ("--cache-dir", _path, "DIR", "where the default model is compiled when no --artifact is given"),
    ("--tool-call-parser", _tool_parser, "NAME", "how tool calls are read out of the output for tool_choice "
     "'auto': hermes, llama3_json or pythonic (docs/tools.md)"),
]

# (flag, help): on/off switches, each also as --no-<flag>; defaults come from ServerConfig.
_SWITCHES: list[tuple[str, str]] = [
    ("--enable-auto-tool-choice", "serve tool_choice 'auto' (the model decides; --tool-call-parser reads "
     "its calls); 'required' and named functions work either way"),
    ("--strict-request-fields", "answer 400 to unknown request fields (OpenAI's behaviour) instead of "
     "ignoring them with a logged warning (vLLM's)"),
    ("--disable-fastapi-docs", "do not serve /docs, /redoc and /openapi.json"),
    ("--enable-prefix-caching", "reuse the cached K/V of earlier requests for prompts that start with the same "
     "tokens (a repeated system prompt, a chat's history) in the artifact's prefix-cache rows (compile "
     "--prefix-cache-rows); outputs are the same either way"),
]


def env_name(flag: str) -> str:
    return "KILN_" + flag.lstrip("-").replace("-", "_").upper()


def _show_default(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return str(Path("~") / value.relative_to(Path.home()))
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a Kiln artifact over an OpenAI-compatible HTTP API:\n"
                    "  /v1/completions /v1/chat/completions /v1/models /tokenize /detokenize\n"
                    "  /health /ready /metrics /version")
    defaults = ServerConfig.__dataclass_fields__
    for flag, kind, metavar, help_text in _FLAGS:
        field = flag.lstrip("-").replace("-", "_")
        default = defaults[field].default
        extra = f" [env {env_name(flag)}" + ("]" if default is None else f"; default {_show_default(default)}]")
        choices = LOG_FORMATS if field == "log_format" else None
        parser.add_argument(flag, type=kind, metavar=metavar if choices is None else None, choices=choices,
                            default=None, help=help_text + extra)
    for flag, help_text in _SWITCHES:
        default = defaults[flag.lstrip("-").replace("-", "_")].default
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=f"{help_text} [env {env_name(flag)}; default {'on' if default else 'off'}]")
    return parser


def config_from_args(argv: Optional[list[str]] = None, environ: Optional[Mapping[str, str]] = None,
                     parser: Optional[argparse.ArgumentParser] = None) -> ServerConfig:
    """Parse flags, fill the gaps from KILN_* variables; bad values exit 2 via parser.error."""
    parser = parser or build_parser()
    environ = os.environ if environ is None else environ
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    flags = [(flag, kind) for flag, kind, _, _ in _FLAGS] + [(flag, _bool) for flag, _ in _SWITCHES]
    for flag, kind in flags:
        field = flag.lstrip("-").replace("-", "_")
        value = getattr(args, field)
        name = env_name(flag)
        if value is None and environ.get(name, "") != "":
            try:
                value = kind(environ[name])
            except (ValueError, argparse.ArgumentTypeError) as e:
                parser.error(f"{name}={environ[name]!r}: {e}")
        if value is not None:
            values[field] = value
    try:
        return ServerConfig(**values)
    except ConfigError as e:
        parser.error(str(e))
