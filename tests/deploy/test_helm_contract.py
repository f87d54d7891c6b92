"""The chart against the server's real contract: routes, port, flags, metrics, drain, Neuron."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from pathlib import Path
from unittest import mock

import pytest

from server.config import ServerConfig, config_from_args, env_name
from server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
PROFILES = ("default", "cpu", "inf2")
NEURON_KEYS = ("aws.amazon.com/neuron", "aws.amazon.com/neuroncore")


def contract_http() -> tuple[int, set[tuple[str, str]]]:
    """Port and (method, path) routes declared in docs/CONTRACTS.md ## HTTP."""
    text = (REPO / "docs" / "CONTRACTS.md").read_text()
    http = text.split("## HTTP", 1)[1].split("\n## ", 1)[0]
    port = int(re.search(r"Port (\d+)", http).group(1))
    return port, set(re.findall(r"`(GET|POST) (/[^`\s]*)`", http))


def app_client():
    """A test client of the real FastAPI app, or None while server/api/app.py does not exist.

    NOTE: the lifespan (warm-up, engine loop) never runs: TestClient is not entered. Routes are
    probed over HTTP rather than read from app.routes, whose shape varies across FastAPI versions.
    """
    if not (REPO / "server" / "api" / "app.py").exists():
        return None
    from fastapi.testclient import TestClient

    module = importlib.import_module("server.api.app")
    factory = next((getattr(module, n) for n in ("create_app", "build_app", "make_app")
                    if callable(getattr(module, n, None))), None)
    if factory is None:
        pytest.fail("server/api/app.py has no create_app/build_app/make_app factory")
    params = inspect.signature(factory).parameters.values()
    app = factory(**{p.name: mock.MagicMock() for p in params if p.default is p.empty
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)})
    return TestClient(app, raise_server_exceptions=False)


def served(client, path: str) -> bool:
    """Whether the app has a GET route at `path` (any answer but 404/405, even a 503)."""
    return client.get(path).status_code not in (404, 405)


def close_seconds() -> float:
    """How long the server itself waits for open connections after the drain (0 if it says nothing)."""
    if not (REPO / "server" / "__main__.py").exists():
        return 0.0
    return float(getattr(importlib.import_module("server.__main__"), "GRACEFUL_SHUTDOWN_SECONDS", 0))


def env_of(chart, objs) -> dict[str, str]:
    """The server's environment as the pod sees it: ConfigMap (envFrom) then plain env values."""
    env = dict(chart.only(objs, "ConfigMap")["data"])
    env.update({e["name"]: e["value"] for e in chart.server(objs).get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("profile", PROFILES)
def test_probes_hit_real_routes_on_the_real_port(chart, profile):
    objs = chart.render(profile)
    server = chart.server(objs)
    port, routes = contract_http()
    client = app_client()
    assert ServerConfig().port == port
    (http,) = [p for p in server["ports"] if p["name"] == "http"]
    assert http["containerPort"] == port
    assert chart.only(objs, "Service")["spec"]["ports"][0]["targetPort"] == "http"
    expected = {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        assert server[probe]["httpGet"] == {"path": path, "port": "http"}
        assert ("GET", path) in routes, f"{probe} path {path} is not a GET route in docs/CONTRACTS.md"
        assert client is None or served(client, path), f"{probe} path {path} is not served by the app"
    assert ("GET", "/metrics") in routes and (client is None or served(client, "/metrics"))


def test_probes_checked_against_the_real_app():
    client = app_client()
    if client is None:
        pytest.skip("TODO(deploy): server/api/app.py not written yet; probes checked against docs/CONTRACTS.md")
    assert not served(client, "/no-such-route"), "served() must tell a missing route apart"


@pytest.mark.parametrize("profile", PROFILES)
def test_configmap_is_a_valid_server_config(chart, profile):
    """Every KILN_* the chart sets is a real flag twin, and the server parses them all."""
    objs = chart.render(profile)
    flags = {env_name("--" + f.name.replace("_", "-")) for f in dataclasses.fields(ServerConfig)}
    env = env_of(chart, objs)
    kiln_env = {k: v for k, v in env.items() if k.startswith("KILN_")}
    assert set(kiln_env) <= flags, f"not server flags: {set(kiln_env) - flags}"
    config = config_from_args([], environ=kiln_env)
    assert config.port == chart.server(objs)["ports"][0]["containerPort"]
    assert (config.artifact is None) == (profile != "inf2")  # default and cpu compile at start


@pytest.mark.parametrize("profile", PROFILES)
def test_drain_timeout_fits_in_grace_period(chart, profile):
    objs = chart.render(profile)
    config = config_from_args([], environ=env_of(chart, objs))
    pod = chart.pod_spec(objs)
    sleep = float(chart.server(objs)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert sleep > 0
    assert sleep + config.drain_timeout + close_seconds() < pod["terminationGracePeriodSeconds"]
    assert chart.only(objs, "Deployment")["spec"]["progressDeadlineSeconds"] > (
        chart.server(objs)["startupProbe"]["failureThreshold"] * chart.server(objs)["startupProbe"]["periodSeconds"])


def test_render_fails_exactly_when_grace_period_is_too_short(chart):
    budget = 5 + 30 + close_seconds()   # preStop sleep + drain + the server's connection close
    sets = ("preStopSleepSeconds=5", "server.drainTimeout=30")
    assert "terminationGracePeriodSeconds" in chart.render_error(
        "cpu", (*sets, f"terminationGracePeriodSeconds={int(budget)}"))
    chart.render("cpu", (*sets, f"terminationGracePeriodSeconds={int(budget) + 1}"))
    assert "terminationGracePeriodSeconds" in chart.render_error("cpu", ("server.drainTimeout=120",))


@pytest.mark.parametrize("profile", ["default", "cpu"])
def test_no_neuron_resources_without_neuron(chart, profile):
    objs = chart.render(profile)
    server, pod = chart.server(objs), chart.pod_spec(objs)
    for section in ("requests", "limits"):
        assert not set(server["resources"].get(section, {})) & set(NEURON_KEYS)
    assert "affinity" not in pod and "tolerations" not in pod
    assert chart.server(objs)["image"].endswith("-cpu")


@pytest.mark.parametrize("tp", [1, 2, 8, 24, 32])
@pytest.mark.parametrize("resource", ["neuroncore", "neuron"])
def test_neuron_resources_match_tp_degree(chart, tp, resource):
    objs = chart.render("inf2", (f"neuron.tpDegree={tp}", f"neuron.resource={resource}"))
    res = chart.server(objs)["resources"]
    expected = {f"aws.amazon.com/{resource}": tp if resource == "neuroncore" else math.ceil(tp / 2)}
    for section in ("requests", "limits"):
        assert {k: v for k, v in res[section].items() if k in NEURON_KEYS} == expected


def test_neuron_placement_and_runtime_env(chart):
    objs = chart.render("inf2")
    pod, server = chart.pod_spec(objs), chart.server(objs)
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expr,) = term["matchExpressions"]
    assert expr["key"] == "node.kubernetes.io/instance-type" and expr["operator"] == "In"
    assert all(t.startswith(("inf2.", "trn1.", "trn1n.")) for t in expr["values"])
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert server["image"].endswith("-neuron")
    everything = repr(objs)
    assert "NEURON_RT_VISIBLE_CORES" not in everything and "NEURON_RT_NUM_CORES" not in everything


def test_compile_at_start_is_refused_on_neuron(chart):
    err = chart.render_error("inf2", ("artifact.source=compile",))
    assert "CPU only" in err


@pytest.mark.parametrize("sets,missing", [
    (("artifact.source=s3",), "artifact.s3.uri"),
    (("artifact.source=url",), "artifact.url.url"),
    (("artifact.source=pvc",), "artifact.pvc.claimName"),
    (("autoscaling.enabled=true", "autoscaling.mode=keda"), "serverAddress"),
])
def test_required_settings_fail_the_render(chart, sets, missing):
    assert missing in chart.render_error("cpu", sets)


@pytest.mark.parametrize("source,sets", [
    ("s3", ("artifact.s3.uri=s3://kiln-bucket/p/",)),
    ("url", ("artifact.url.url=https://example.com/a.tar.gz", "artifact.subPath=a")),
    ("pvc", ("artifact.pvc.claimName=arts",)),
])
def test_artifact_modes_feed_the_server_read_only(chart, source, sets):
    objs = chart.render("inf2", (f"artifact.source={source}", *sets))
    pod, server = chart.pod_spec(objs), chart.server(objs)
    artifact = config_from_args([], environ=env_of(chart, objs)).artifact
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "artifacts"]
    assert mount["readOnly"] is True and str(artifact).startswith(mount["mountPath"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "artifacts"]
    init = pod.get("initContainers", [])
    if source == "pvc":
        assert volume["persistentVolumeClaim"] == {"claimName": "arts", "readOnly": True} and not init
    else:
        assert "emptyDir" in volume
        (fetch,) = init
        assert {"name": "artifacts", "mountPath": "/artifacts"} in fetch["volumeMounts"]
        assert ("aws" if source == "s3" else "curl") in " ".join(fetch["command"])


@pytest.mark.parametrize("profile", PROFILES)
def test_security_context_and_writable_dirs(chart, profile):
    objs = chart.render(profile, ("artifact.source=s3", "artifact.s3.uri=s3://kiln-bucket/p/"))
    pod = chart.pod_spec(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"] + pod.get("initContainers", []):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in chart.server(objs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = config_from_args([], environ=env_of(chart, objs))
    for path in ("/tmp", "/dev/shm", str(config.cache_dir)):
        assert "emptyDir" in volumes[mounts[path]], f"{path} must be a writable emptyDir"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def _promql_metrics(query: str) -> set[str]:
    return set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{", query))


def test_autoscalers_read_a_metric_the_server_exports(chart):
    exported = Metrics("x").metric_names()
    hpa = chart.only(chart.render("inf2", ("autoscaling.enabled=true",)), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] in exported
    so = chart.only(chart.render("inf2", ("autoscaling.enabled=true", "autoscaling.mode=keda",
                                          "autoscaling.keda.serverAddress=http://p:9090")), "ScaledObject")
    query = so["spec"]["triggers"][0]["metadata"]["query"]
    names = _promql_metrics(query)
    assert names and names <= exported, f"{query} names {names - exported}, not exported by the server"
    assert metric["pods"]["metric"]["name"] in names, "HPA and KEDA must scale on the same series"
    assert f'namespace="{chart.namespace}"' in query


def test_notes_tell_how_to_reach_the_api(chart):
    notes = chart.notes("inf2")
    assert "port-forward svc/" in notes and "/v1/chat/completions" in notes and "/v1/models" in notes
    assert "LoadBalancer" not in notes
    assert "loadBalancer.ingress" in chart.notes("cpu", ("service.type=LoadBalancer",))
