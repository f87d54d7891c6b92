"""deploy/docker: what the Dockerfiles COPY exists, and the ENTRYPOINT is this project's CLI.

No Docker engine here, so the images are never built; these checks catch the usual breakages
(a moved file, a renamed module, a root user) without one.
"""
from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.neuron")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def ignored(name: str, path: str) -> bool:
    """Whether BuildKit's <Dockerfile>.dockerignore (last match wins) leaves `path` out."""
    result = False
    for pattern in (DOCKER / f"{name}.dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").replace("**/", "")
        parts = Path(path).parts
        if any(fnmatch.fnmatch("/".join(parts[:i + 1]), pattern) or fnmatch.fnmatch(parts[i], pattern)
               for i in range(len(parts))):
            result = not negate
    return result


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_source_exists_and_reaches_the_context(name):
    copies = [args for op, args in instructions(name) if op == "COPY" and "--from=" not in args]
    assert copies
    for args in copies:
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"{name}: COPY {src}: no such file in the build context (repo root)"
            assert not ignored(name, src), f"{name}: COPY {src} is excluded by {name}.dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root_with_the_server_entrypoint(name):
    ops = instructions(name)
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [json.loads(args) for op, args in ops if op == "ENTRYPOINT"]
    assert entrypoint == ["python", "-m", "server"]
    assert ("EXPOSE", "8000") in ops


def test_base_images():
    cpu = [args for op, args in instructions("Dockerfile.cpu") if op == "FROM"]
    assert all(a.split()[0] == "python:3.11-slim" for a in cpu)
    neuron = dict(a.split("=", 1) for op, a in instructions("Dockerfile.neuron") if op == "ARG" and "=" in a)
    (base,) = [args for op, args in instructions("Dockerfile.neuron") if op == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: neuron[m.group(1)], base)
    assert image.startswith("public.ecr.aws/neuron/pytorch-inference-neuronx:")
    assert "NEURON_RT_VISIBLE_CORES=" not in (DOCKER / "Dockerfile.neuron").read_text()


def test_entrypoint_module_is_a_real_cli():
    if not (REPO / "server" / "__main__.py").exists():
        pytest.skip("server/__main__.py does not exist yet, so `python -m server --help` cannot run")
    proc = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--artifact" in proc.stdout and "--drain-timeout" in proc.stdout
