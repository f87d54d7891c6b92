"""deploy/helm/kiln: lint, render, Kubernetes schema validation, values schema and docs."""
from __future__ import annotations

import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

KUBE_VERSIONS = ("1.29", "1.33")
# Kinds from CRDs: kubernetes-validate has no schema for them (test_observability.py checks the
# PrometheusRule and the InferencePool against offline copies of their CRD schemas).
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject", "PrometheusRule", "InferencePool"}

# (profile, --set, --set-json): the profiles as shipped, then every switch turned on somewhere.
SCENARIOS = {
    "default": ("default", (), ()),
    "cpu": ("cpu", (), ()),
    "inf2": ("inf2", (), ()),
    "inf2-hpa-monitor": ("inf2", (
        "autoscaling.enabled=true", "serviceMonitor.enabled=true", "server.apiKey.secretName=kiln-key",
        "schedulerName=my-scheduler", "neuron.tpDegree=2", "server.servedModelName=smol",
        "server.maxNumSeqs=8", "server.maxNumQueuedReqs=64", "priorityClassName=high"), ()),
    "inf2-keda-devices": ("inf2", (
        "autoscaling.enabled=true", "autoscaling.mode=keda", "neuron.resource=neuron",
        "neuron.tpDegree=8", "autoscaling.keda.serverAddress=http://prometheus-operated.monitoring:9090",
        "autoscaling.keda.authenticationRef=prom-auth"), ()),
    "cpu-url": ("cpu", (
        "artifact.source=url", "artifact.url.url=https://example.com/smollm2-cpu.tar.gz",
        "artifact.subPath=smollm2-cpu", "podDisruptionBudget.minAvailable=1"), ()),
    "cpu-pvc": ("cpu", ("artifact.source=pvc", "artifact.pvc.claimName=kiln-artifacts",
                        "service.type=LoadBalancer"), ()),
    "cpu-s3-extras": ("cpu", ("artifact.source=s3", "artifact.s3.uri=s3://bucket/kiln/a/"), (
        'server.extraEnv=[{"name":"KILN_EXTRA","value":"1"}]',
        'server.extraConfig={"KILN_API_KEY_FILE":"/x"}',
        'artifact.s3.extraArgs=["--region","us-east-1"]',
        'topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone",'
        '"whenUnsatisfiable":"ScheduleAnyway","labelSelector":{"matchLabels":{"app.kubernetes.io/name":"kiln"}}}]',
        'affinity={"podAntiAffinity":{"preferredDuringSchedulingIgnoredDuringExecution":[{"weight":1,'
        '"podAffinityTerm":{"topologyKey":"kubernetes.io/hostname","labelSelector":{"matchLabels":'
        '{"app.kubernetes.io/name":"kiln"}}}}]}}')),
    "cpu-observability": ("cpu", (
        "serviceMonitor.enabled=true", "prometheusRule.enabled=true", "grafana.dashboard.enabled=true",
        "grafana.dashboard.namespace=monitoring", "inferencePool.enabled=true",
        "inferencePool.endpointPicker.failureMode=FailOpen"), (
        'prometheusRule.alertLabels={"team":"ml"}', 'grafana.dashboard.annotations={"grafana_folder":"LLM"}')),
}


def render(chart, name):
    profile, sets, set_json = SCENARIOS[name]
    return chart.render(profile, sets, set_json)


@pytest.mark.parametrize("profile", ["default", "cpu", "inf2"])
def test_helm_lint_strict(chart, profile):
    args = ["lint", str(chart.dir), "--strict"]
    for f in chart.profiles[profile]:
        args += ["-f", str(f)]
    proc = chart.run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_objects_validate_against_kubernetes_strict(chart, name, kube):
    objs = render(chart, name)
    assert {o["kind"] for o in objs} >= {"Deployment", "Service", "ConfigMap", "ServiceAccount"}
    for obj in objs:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            got = kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {kube}: {e.message} at "
                        f"{'/'.join(map(str, e.path))}", pytrace=False)
        assert got == kube, f"kubernetes-validate {kubernetes_validate.__version__} has no {kube} schemas"


def test_custom_resources_render_only_when_switched_on(chart):
    for name in ("default", "cpu", "inf2"):
        assert not {o["kind"] for o in render(chart, name)} & (CUSTOM_KINDS | {"HorizontalPodAutoscaler"})
        assert [o["metadata"]["name"] for o in render(chart, name) if o["kind"] == "ConfigMap"] == ["t-kiln"]
    hpa_kinds = {o["kind"] for o in render(chart, "inf2-hpa-monitor")}
    assert {"ServiceMonitor", "HorizontalPodAutoscaler"} <= hpa_kinds and "ScaledObject" not in hpa_kinds
    keda_kinds = {o["kind"] for o in render(chart, "inf2-keda-devices")}
    assert "ScaledObject" in keda_kinds and "HorizontalPodAutoscaler" not in keda_kinds
    assert "replicas" not in chart.only(render(chart, "inf2-keda-devices"), "Deployment")["spec"]


def test_service_monitor_structure(chart):
    objs = render(chart, "inf2-hpa-monitor")
    sm, svc = chart.only(objs, "ServiceMonitor"), chart.only(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"]
    spec = sm["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "podTargetLabels"}
    labels = svc["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), "selector must match the Service"
    assert spec["namespaceSelector"] == {"matchNames": [chart.namespace]}
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert spec["endpoints"], "endpoints are required"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", ep["interval"])


def test_scaled_object_structure(chart):
    objs = render(chart, "inf2-keda-devices")
    so, dep = chart.only(objs, "ScaledObject"), chart.only(objs, "Deployment")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "advanced", "triggers", "fallback", "idleReplicaCount"}
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": dep["metadata"]["name"]}
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]) <= {"scaleUp", "scaleDown"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert set(meta) == {"serverAddress", "query", "threshold"}
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert float(meta["threshold"]) > 0
    assert trigger["authenticationRef"] == {"name": "prom-auth"}


def test_hpa_targets_the_deployment(chart):
    objs = render(chart, "inf2-hpa-monitor")
    hpa, dep = chart.only(objs, "HorizontalPodAutoscaler"), chart.only(objs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "replicas" not in dep["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"


def test_selectors_and_labels_are_shared(chart):
    objs = render(chart, "inf2-hpa-monitor")
    dep, svc, pdb = (chart.only(objs, k) for k in ("Deployment", "Service", "PodDisruptionBudget"))
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == chart.release
        assert obj["metadata"]["labels"]["helm.sh/chart"].startswith("kiln-")


# ---- values.yaml, values.schema.json -------------------------------------------------------

def _schema(chart):
    return json.loads((chart.dir / "values.schema.json").read_text())


def _values(chart, profile="default"):
    values = yaml.safe_load((chart.dir / "values.yaml").read_text())
    for f in chart.profiles[profile]:
        _merge(values, yaml.safe_load(f.read_text()))
    return values


def _merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


@pytest.mark.parametrize("profile", ["default", "cpu", "inf2"])
def test_schema_accepts_shipped_values(chart, profile):
    schema = _schema(chart)
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(_values(chart, profile))


def test_schema_closes_every_chart_owned_object(chart):
    """Objects with declared properties reject unknown keys; the open ones are Kubernetes types."""
    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
            for k, sub in node["properties"].items():
                walk(sub, f"{path}.{k}".lstrip("."))
    walk(_schema(chart), "")


def test_every_value_is_in_the_schema(chart):
    def walk(values, node, path):
        for k, v in values.items():
            assert k in node.get("properties", {}), f"{path}{k} missing from values.schema.json"
            sub = node["properties"][k]
            if isinstance(v, dict) and "properties" in sub:
                walk(v, sub, f"{path}{k}.")
    walk(_values(chart), _schema(chart), "")


def test_every_value_is_documented(chart):
    """Each key has a `# --` comment above it, groups other keys, or sits in a documented value."""
    lines = (chart.dir / "values.yaml").read_text().splitlines()
    keys = []  # (indent, key, documented)
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if m:
            prev = next((p for p in reversed(lines[:i]) if p.strip()), "")
            keys.append((len(m.group(1)), m.group(2), prev.strip().startswith("# --")))
    undocumented, stack = [], []  # stack: (indent, documented) of the enclosing keys
    for n, (indent, key, documented) in enumerate(keys):
        while stack and stack[-1][0] >= indent:
            stack.pop()
        groups = n + 1 < len(keys) and keys[n + 1][0] > indent
        if not (documented or groups or any(d for _, d in stack)):
            undocumented.append(key)
        stack.append((indent, documented))
    assert not undocumented, f"values without a '# --' comment: {undocumented}"


@pytest.mark.parametrize("sets,message", [
    (("bogus=1",), "additional properties 'bogus' not allowed"),
    (("server.drainTimeoutSeconds=1",), "additional properties 'drainTimeoutSeconds' not allowed"),
    (("neuron.tpDegree=two",), "want integer"),
    (("neuron.tpDegree=3",), "tpDegree"),
    (("replicaCount=many",), "want integer"),
    (("neuron.enabled=yes",), "want boolean"),
    (("artifact.source=ftp",), "source"),
    (("artifact.subPath=../etc",), "subPath"),
    (("autoscaling.mode=cpu",), "mode"),
])
def test_schema_rejects_bad_values(chart, sets, message):
    assert message in chart.render_error("default", sets)


def test_schema_rejects_visible_cores_override(chart):
    err = chart.render_error("inf2", (), ('server.extraEnv=[{"name":"NEURON_RT_VISIBLE_CORES","value":"0-1"}]',))
    assert "extraEnv" in err


def test_readme_documents_every_value(chart):
    lines = (chart.dir / "values.yaml").read_text().splitlines()
    readme = (chart.dir / "README.md").read_text()
    stack, missing = [], []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        while stack and stack[-1][0] >= len(m.group(1)):
            stack.pop()
        stack.append((len(m.group(1)), m.group(2)))
        documented = next((p for p in reversed(lines[:i]) if p.strip()), "").strip().startswith("# --")
        path = ".".join(k for _, k in stack)
        if documented and f"`{path}`" not in readme:
            missing.append(path)
    assert not missing, f"deploy/helm/kiln/README.md does not list: {missing}"
