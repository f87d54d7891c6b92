"""Fixtures for the Helm chart and Dockerfile tests: a pinned helm and cached renders."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kiln"
INSTALL_HELM = REPO / "deploy" / "helm" / "install-helm.sh"
NAMESPACE = "kiln-test"
RELEASE = "t"

# Profile name -> values files, as a user would pass them with -f.
PROFILES = {
    "default": (),
    "cpu": (CHART / "values-cpu.yaml",),
    "inf2": (CHART / "values-inf2.yaml",),
}


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the pinned helm, installed by deploy/helm/install-helm.sh (as CI does)."""
    proc = subprocess.run(["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"deploy/helm/install-helm.sh failed: {proc.stderr.strip()}", pytrace=False)
    return proc.stdout.strip().splitlines()[-1]


class Chart:
    """Runs helm on deploy/helm/kiln; renders are cached (the chart does not change in a session).

    NOTE: helpers live here and reach tests through the `chart` fixture, so the tests import
    nothing from this directory (no clash with other conftest.py files or import modes).
    """

    dir = CHART
    repo = REPO
    namespace = NAMESPACE
    release = RELEASE
    profiles = PROFILES

    def __init__(self, helm: str):
        self.helm = helm

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.helm, *args], capture_output=True, text=True, timeout=120)

    @staticmethod
    def _args(profile: str, sets: tuple[str, ...], set_json: tuple[str, ...]) -> list[str]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        for f in PROFILES[profile]:
            args += ["-f", str(f)]
        for s in sets:
            args += ["--set", s]
        for s in set_json:
            args += ["--set-json", s]
        return args

    @lru_cache(maxsize=None)
    def render(self, profile: str = "default", sets: tuple[str, ...] = (),
               set_json: tuple[str, ...] = ()) -> tuple[dict, ...]:
        """Every rendered object (dicts); fails the test if helm template fails."""
        proc = self.run(*self._args(profile, sets, set_json))
        assert proc.returncode == 0, f"helm template {profile} {sets} {set_json} failed:\n{proc.stderr}"
        return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)

    def render_error(self, profile: str = "default", sets: tuple[str, ...] = (),
                     set_json: tuple[str, ...] = ()) -> str:
        """helm template must fail; returns its stderr."""
        proc = self.run(*self._args(profile, sets, set_json))
        assert proc.returncode != 0, f"helm template {profile} {sets} {set_json} should have failed"
        return proc.stderr

    @staticmethod
    def only(objs, kind: str) -> dict:
        found = [o for o in objs if o["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    @classmethod
    def pod_spec(cls, objs) -> dict:
        return cls.only(objs, "Deployment")["spec"]["template"]["spec"]

    @classmethod
    def server(cls, objs) -> dict:
        return next(c for c in cls.pod_spec(objs)["containers"] if c["name"] == "server")

    def notes(self, profile: str = "default", sets: tuple[str, ...] = ()) -> str:
        args = ["install", RELEASE, str(CHART), "--dry-run", "--namespace", NAMESPACE]
        for f in PROFILES[profile]:
            args += ["-f", str(f)]
        for s in sets:
            args += ["--set", s]
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("NOTES:", 1)[1]


@pytest.fixture(scope="session")
def chart(helm: str) -> Chart:
    return Chart(helm)

