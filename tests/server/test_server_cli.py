"""`python -m server`: flags and their KILN_* twins, --help, start-up errors, the default model."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import server.__main__ as server_main
from compile.manifest import GRAPH_ABI
from server.config import ServerConfig, config_from_args, env_name
from server_harness import REPO_ROOT

FLAGS = ["--artifact", "--host", "--port", "--api-key", "--served-model-name", "--max-num-seqs",
         "--max-num-queued-reqs", "--allowed-origins", "--drain-timeout", "--log-format", "--cache-dir"]


def test_defaults():
    config = config_from_args([], environ={})
    assert config == ServerConfig()
    assert (config.host, config.port, config.drain_timeout, config.log_format) == ("0.0.0.0", 8000, 30.0, "text")
    assert config.cache_dir == Path.home() / ".cache" / "kiln" and config.artifact is None


def test_flag_beats_env_beats_default():
    env = {"KILN_PORT": "9001", "KILN_API_KEY": "from-env", "KILN_DRAIN_TIMEOUT": "2.5",
           "KILN_ALLOWED_ORIGINS": '["https://a", "https://b"]', "KILN_ARTIFACT": "~/art"}
    config = config_from_args(["--port", "9002"], environ=env)
    assert config.port == 9002 and config.api_key == "from-env" and config.drain_timeout == 2.5
    assert config.allowed_origins == ("https://a", "https://b")
    assert config.artifact == Path.home() / "art"
    assert config_from_args(["--allowed-origins", "https://x, https://y"], environ={}).allowed_origins == (
        "https://x", "https://y")


def test_every_flag_has_an_env_twin():
    for flag in FLAGS:
        assert env_name(flag) == "KILN_" + flag[2:].replace("-", "_").upper()
    values = {"--artifact": "a", "--host": "h", "--port": "1", "--api-key": "k", "--served-model-name": "m",
              "--max-num-seqs": "2", "--max-num-queued-reqs": "3", "--allowed-origins": "*",
              "--drain-timeout": "4", "--log-format": "json", "--cache-dir": "c"}
    from_env = config_from_args([], environ={env_name(f): v for f, v in values.items()})
    from_flags = config_from_args([x for f, v in values.items() for x in (f, v)], environ={})
    assert from_env == from_flags


@pytest.mark.parametrize("argv, env", [
    (["--port", "0"], {}),
    (["--port", "http"], {}),
    (["--max-num-seqs", "0"], {}),
    (["--max-num-queued-reqs", "0"], {}),
    (["--drain-timeout", "-1"], {}),
    (["--log-format", "xml"], {}),
    ([], {"KILN_LOG_FORMAT": "xml"}),
    ([], {"KILN_PORT": "eighty"}),
    ([], {"KILN_ALLOWED_ORIGINS": "[1, 2]"}),
    (["--tool-call-parser", "mistral"], {}),
    ([], {"KILN_ENABLE_AUTO_TOOL_CHOICE": "maybe"}),
])
def test_bad_values_exit_2_naming_the_flag(argv, env, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(argv, environ=env)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and (any(f in err for f in FLAGS) or any(k in err for k in env))


def test_switches_and_their_env_twins():
    assert config_from_args([], environ={}).enable_auto_tool_choice
    off = config_from_args(["--no-enable-auto-tool-choice", "--strict-request-fields", "--tool-call-parser",
                            "pythonic", "--disable-fastapi-docs"], environ={})
    assert (off.enable_auto_tool_choice, off.strict_request_fields, off.tool_call_parser, off.disable_fastapi_docs) == (
        False, True, "pythonic", True)
    env = {"KILN_ENABLE_AUTO_TOOL_CHOICE": "false", "KILN_STRICT_REQUEST_FIELDS": "1", "KILN_TOOL_CALL_PARSER": "pythonic",
           "KILN_DISABLE_FASTAPI_DOCS": "true"}
    assert config_from_args([], environ=env) == off
    assert config_from_args(["--enable-auto-tool-choice"], environ=env).enable_auto_tool_choice


def test_help_reads_well():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in FLAGS:
        assert flag in out.stdout and env_name(flag) in out.stdout
    assert "smollm2-135m-instruct" in out.stdout and "SIGTERM" in out.stdout


def run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_missing_artifact_is_a_one_line_error(tmp_path):
    out = run_server("--artifact", str(tmp_path / "nowhere"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such artifact folder"]


def test_corrupt_artifact_is_a_one_line_error(tiny_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    with open(copy / "tokenizer" / "tokenizer.json", "ab") as f:
        f.write(b" ")
    out = run_server("--artifact", str(copy))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tokenizer.json" in lines[0]
    assert "expected" in lines[0] and "found" in lines[0]


def test_max_num_seqs_above_the_compiled_slots_is_an_error(tiny_artifact):
    out = run_server("--artifact", str(tiny_artifact), "--max-num-seqs", "64")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: max_num_seqs=64 exceeds")


def test_default_model_is_compiled_once(tmp_path, monkeypatch, tiny_artifact):
    import shutil
    calls = []

    def fake_run(cmd):  # stands in for `python -m compile`: writes a valid artifact
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tiny_artifact, out)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(server_main.subprocess, "run", fake_run)
    cache = tmp_path / "cache"
    first = server_main.ensure_default_artifact(cache)
    second = server_main.ensure_default_artifact(cache)
    assert first == second == cache / "smollm2-135m-instruct"
    compile_cmd = [sys.executable, "-m", "compile", "--checkpoint", "smollm2-135m-instruct", "--target", "cpu",
                   "--out", str(first)]
    assert calls == [compile_cmd]
    # a cached artifact from another Kiln (graph ABI) is rebuilt, not served or refused
    manifest = first / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"graph_abi": {GRAPH_ABI}', '"graph_abi": 1'))
    assert server_main.ensure_default_artifact(cache) == first
    assert calls == [compile_cmd, compile_cmd + ["--force"]]


def test_failed_default_compile_is_a_startup_error(tmp_path, monkeypatch):
    monkeypatch.setattr(server_main.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 2))
    with pytest.raises(server_main.StartupError, match="exit 2"):
        server_main.ensure_default_artifact(tmp_path)


def test_default_model_name():
    from compile.manifest import Manifest
    def manifest(checkpoint):
        return Manifest(format_version=1, model={}, target="cpu", dtype="float32", tp_degree=1, buckets={},
                        max_num_seqs=1, max_model_len=2, graphs=[], weights=[], files={},
                        source={"checkpoint": checkpoint}, versions={}, compile_key="")
    art = Path("/srv/artifacts/smol")
    assert server_main.default_model_name(manifest("smollm2-135m-instruct"), art) == "smollm2-135m-instruct"
    assert server_main.default_model_name(manifest("/ckpt/SmolLM2-135M/"), art) == "SmolLM2-135M"
    assert server_main.default_model_name(manifest("/m/model.Q4.gguf"), art) == "model.Q4"
    assert server_main.default_model_name(manifest(""), art) == "smol"
