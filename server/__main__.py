"""`python -m server`: load (or first compile) an artifact and serve it over the OpenAI API."""
from __future__ import annotations

import logging
import subprocess
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from compile.manifest import MANIFEST_NAME, ArtifactError, Manifest
from server.config import DEFAULT_MODEL, ServerConfig, build_parser, config_from_args
from server.logs import configure_logging

logger = logging.getLogger("kiln.server")

# After the drain, how long uvicorn waits for connections still open before cancelling them.
GRACEFUL_SHUTDOWN_SECONDS = 5


class StartupError(RuntimeError):
    """A one-line reason the server cannot start (printed as `error: ...`, exit 1)."""


def ensure_default_artifact(cache_dir: Path) -> Path:
    """`<cache_dir>/<default model>`, compiled by `python -m compile` the first time."""
    from server.runner.artifact import verify_artifact
    out = cache_dir / DEFAULT_MODEL
    cmd = [sys.executable, "-m", "compile", "--checkpoint", DEFAULT_MODEL, "--target", "cpu", "--out", str(out)]
    if (out / MANIFEST_NAME).is_file():
        try:
            verify_artifact(out, checksums=False)  # load_artifact verifies checksums right after
            return out
        except ArtifactError as e:  # e.g. built by another Kiln or torch version: our cache, rebuild it
            logger.warning("cached default artifact is unusable (%s); recompiling", e)
            cmd.append("--force")
    logger.info("no --artifact given: compiling %s for cpu into %s (once): %s", DEFAULT_MODEL, out, " ".join(cmd))
    cache_dir.mkdir(parents=True, exist_ok=True)
    returncode = subprocess.run(cmd).returncode        # inherits stdout/stderr: the progress bar shows
    if returncode != 0:
        raise StartupError(f"compiling the default model failed (exit {returncode}): {' '.join(cmd)}")
    return out


def default_model_name(manifest: Manifest, artifact: Path) -> str:
    """The checkpoint's name as given to compile (its last path part), else the folder's."""
    checkpoint = str(manifest.source.get("checkpoint") or "").rstrip("/")
    name = Path(checkpoint).name.removesuffix(".gguf") if checkpoint else ""
    return name or artifact.resolve().name


def build_app(config: ServerConfig):
    """Load the artifact and wire metrics, engine and app (the engine loop is the caller's to run,
    after runner.warmup()); returns (app, engine, runner). Raises ArtifactError / StartupError."""
    from server.runner.artifact import load_artifact
    artifact = config.artifact or ensure_default_artifact(config.cache_dir)
    loaded = load_artifact(artifact)

    from server.api.app import create_app
    from server.api.serving import ModelInfo, ServingOptions
    from server.engine.async_engine import AsyncEngine
    from server.engine.config import EngineConfig
    from server.metrics import Metrics
    name = config.served_model_name or default_model_name(loaded.manifest, artifact)
    metrics = Metrics(name)
    try:
        engine_config = EngineConfig(max_num_seqs=config.max_num_seqs, max_num_queued_reqs=config.max_num_queued_reqs,
                                     max_num_batched_tokens=config.max_num_batched_tokens,
                                     enable_prefix_caching=config.enable_prefix_caching)
        engine = AsyncEngine(loaded.runner, loaded.tokenizer, engine_config, observer=metrics, own_thread=False,
                             step_timeout=config.step_timeout or None)
    except ValueError as e:
        raise StartupError(f"{e} (artifact {artifact})") from None
    model = ModelInfo(name=name, max_model_len=engine.config.max_model_len, vocab_size=loaded.runner.vocab_size,
                      root=str(artifact))
    logger.info("serving %s from %s (%s, %s; max_num_seqs=%d, max_model_len=%d, max_num_batched_tokens=%s, "
                "max_num_queued_reqs=%d, prefix cache rows=%d)", name, artifact, loaded.manifest.target,
                loaded.manifest.dtype, engine.config.max_num_seqs, engine.config.max_model_len,
                config.max_num_batched_tokens or "timed at warm-up", engine.config.max_num_queued_reqs,
                engine.prefix_cache_rows)
    options = ServingOptions(strict_request_fields=config.strict_request_fields,
                             enable_auto_tool_choice=config.enable_auto_tool_choice,
                             tool_call_parser=config.tool_call_parser)
    app = create_app(engine, loaded.tokenizer, model, metrics, api_key=config.api_key,
                     allowed_origins=config.allowed_origins, options=options, docs=not config.disable_fastapi_docs)
    return app, engine, loaded.runner


def time_token_budget(engine, runner) -> None:
    """The default max_num_batched_tokens, capped by this host's measured prefill speed (EngineConfig's
    timed_token_budget), set before the engine's first step; the cache is left as warm-up left it."""
    from server.engine.config import STEP_PREFILL_TARGET_S, timed_token_budget
    timings: dict[int, float] = {}

    def seconds_for(tokens: int) -> float:
        timings[tokens] = runner.prefill(0, [0] * tokens).run.seconds
        return timings[tokens]

    budget = timed_token_budget(seconds_for, runner.context_buckets)
    runner.clear_cache()
    engine.set_token_budget(budget)
    logger.info("max_num_batched_tokens=%d: the largest prefill bucket up to 512 tokens within %.1f s here (%s)",
                budget, STEP_PREFILL_TARGET_S,
                ", ".join(f"{t} tokens {s * 1e3:.0f} ms" for t, s in sorted(timings.items())))


def main(argv: Optional[list[str]] = None) -> int:
    """Straight-line start-up: the main thread loads the artifact and builds the engine, starts
    the HTTP server on a helper thread (so /health answers at once), warms every graph up, then
    runs the engine loop until the HTTP server has shut down.

    NOTE: the graphs run on the main thread because, measured on the 2-core dev machine (torch 2.13,
    2 OpenMP threads), the same SmolLM2 decode graph took 27 ms there and 42 ms on any other thread."""
    config = config_from_args(argv, parser=build_parser())
    configure_logging(config.log_format)
    try:
        app, engine, runner = build_app(config)
    except (ArtifactError, StartupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    import uvicorn

    from server.api.lifecycle import DrainingServer
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                               lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    server = DrainingServer(uv_config, app.state.server, config.drain_timeout)
    # uvicorn runs on a helper thread, so its signal handling is ours.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    http = threading.Thread(target=server.run, name="kiln-http")
    http.start()
    try:
        logger.info("warming up every bucket graph")
        runner.warmup()
        if config.max_num_batched_tokens is None:
            time_token_budget(engine, runner)
    except Exception as e:  # noqa: BLE001 - reported by /health and /ready, then the server exits
        engine.fail(e)
    else:
        engine.run(keep_going=http.is_alive)
    http.join()
    return 1 if app.state.server.startup_error else 0


if __name__ == "__main__":
    sys.exit(main())
