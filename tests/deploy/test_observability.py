"""What an operator sees: the Grafana dashboard, the PrometheusRule alerts, the InferencePool.

Every PromQL expression (dashboard panels and variables, alerts) and every metric name given to
the endpoint picker must name only series that server/metrics.py exports. The two custom kinds are
checked against offline JSON Schemas written down from their CRDs (tests/deploy/schemas/); no
cluster and no network are needed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.config import ServerConfig
from server.metrics import Metrics

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
REPO = HERE.parents[1]
DASHBOARD = REPO / "deploy" / "helm" / "kiln" / "dashboards" / "kiln.json"

ON = ("serviceMonitor.enabled=true", "prometheusRule.enabled=true", "grafana.dashboard.enabled=true",
      "inferencePool.enabled=true")
# Series Prometheus itself makes, which alerts may use besides the server's own.
PROMETHEUS_SERIES = {"up"}


# ---- PromQL helpers ------------------------------------------------------------------------

def exported_series() -> set[str]:
    """Every series name the server's /metrics can carry.

    A labelled metric has no sample until it is observed, so the names are derived from each
    family's type as prometheus_client writes them (counter: _total, _created; histogram:
    _bucket, _sum, _count, _created), plus whatever metric_names() reports.
    """
    metrics = Metrics("m")
    names = set(metrics.metric_names())
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    for fam in metrics.registry.collect():
        names |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan", "atan2"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {} or by/on clauses), durations or numbers."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery windows
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, rest = m.group(0), e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def test_promql_helper_finds_metric_names():
    expr = ('histogram_quantile(0.99, sum by (le, model_name) (rate(kiln:a_bucket{model_name=~"$m",x="y z"}'
            '[$__rate_interval]))) / (sum(rate(b_total[5m] offset 1h)) or vector(0)) > 1e3 unless on (pod) up')
    assert promql_metrics(expr) == {"kiln:a_bucket", "b_total", "up"}
    assert balanced(expr) and not balanced("sum(rate(x[5m])")
    exported = exported_series()
    assert {"kiln:request_success_total", "kiln:time_to_first_token_seconds_bucket",
            "kiln:num_requests_waiting"} <= exported


# ---- Grafana dashboard ---------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def test_dashboard_is_a_grafana_dashboard():
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}
        assert p["title"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), f"panel {p['title']!r}: targets need unique refIds"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()


def test_dashboard_queries_name_only_exported_metrics():
    exported = exported_series()
    for expr in dashboard_exprs():
        assert balanced(expr), expr
        names = promql_metrics(expr)
        assert names, f"no metric in {expr}"
        assert names <= exported, f"{expr} names {names - exported}, not exported by server/metrics.py"
        for selector in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{([^}]*)\}", expr):
            assert 'model_name=~"$model_name"' in selector, f"{expr}: every series is filtered by $model_name"
        assert not re.search(r"kiln:[A-Za-z0-9_:]+(?![\w:{])", re.sub(r"\{[^}]*\}", "{}", expr)), (
            f"{expr}: a kiln series without the $model_name filter")
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"])
            assert m and promql_metrics(m.group(1)) <= exported and m.group(2) == v["name"]


def test_dashboard_covers_what_an_operator_asks():
    exprs = "\n".join(dashboard_exprs())
    for series in ("kiln:request_success_total", "kiln:num_requests_rejected_total",
                   "kiln:time_to_first_token_seconds_bucket", "kiln:inter_token_latency_seconds_bucket",
                   "kiln:e2e_request_latency_seconds_bucket", "kiln:generation_tokens_total",
                   "kiln:prompt_tokens_total", "kiln:num_requests_waiting", "kiln:num_requests_running",
                   "kiln:kv_cache_usage_perc", "kiln:padding_waste_ratio", "kiln:graph_execution_seconds_bucket",
                   "kiln:structured_output_requests_total", "kiln:structured_output_mask_seconds_bucket"):
        assert series in exprs, f"the dashboard does not show {series}"
    for q in ("0.5", "0.9", "0.99"):
        for h in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
            assert re.search(rf"histogram_quantile\({q}, sum by \(le\) \(rate\(kiln:{h}_seconds_bucket", exprs)
    assert "by (finished_reason)" in exprs and "by (reason)" in exprs
    assert re.search(r"by \(le, kind, bucket\) \(rate\(kiln:graph_execution_seconds_bucket", exprs)


def test_dashboard_has_one_copy():
    uid = dashboard()["uid"]
    copies = [p for p in (REPO / "deploy").rglob("*.json")
              if p.name != "values.schema.json" and f'"{uid}"' in p.read_text()]
    assert copies == [DASHBOARD]


def dashboard_configmap(chart, sets=(), set_json=()):
    objs = chart.render("cpu", ("grafana.dashboard.enabled=true", *sets), set_json)
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    return cm


def test_dashboard_configmap_for_the_grafana_sidecar(chart):
    cm = dashboard_configmap(chart)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "namespace" not in cm["metadata"] and "annotations" not in cm["metadata"]
    assert json.loads(cm["data"]["kiln.json"]) == dashboard()
    assert len(cm["data"]["kiln.json"].encode()) < 256 * 1024, "stay far below the 1 MiB ConfigMap limit"
    cm = dashboard_configmap(chart, ("grafana.dashboard.label=dash", "grafana.dashboard.labelValue=kiln",
                                     "grafana.dashboard.namespace=monitoring"),
                             ('grafana.dashboard.annotations={"grafana_folder":"LLM"}',))
    assert cm["metadata"]["labels"]["dash"] == "kiln" and "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}


# ---- PrometheusRule ------------------------------------------------------------------------

def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def prometheus_rule(chart, sets=(), set_json=()):
    return chart.only(chart.render("cpu", ("serviceMonitor.enabled=true", "prometheusRule.enabled=true", *sets),
                                   set_json), "PrometheusRule")


def alerts(rule) -> dict[str, dict]:
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


ALERTS = {"KilnTargetDown", "KilnMetricsAbsent", "KilnEngineStalled", "KilnAbortsHigh", "KilnQueueSaturated",
          "KilnTimeToFirstTokenHigh", "KilnErrorRatioHigh"}


def test_prometheus_rule_validates_against_the_crd_schema(chart):
    validator = jsonschema.Draft7Validator(schema("prometheusrule-monitoring.coreos.com-v1.json"))
    validator.check_schema(validator.schema)
    for sets in ((), ("prometheusRule.selector=job=\"kiln\"",)):
        rule = prometheus_rule(chart, sets, ('prometheusRule.labels={"release":"kps"}',))
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(rule)]
        assert not errors, errors
        assert rule["metadata"]["labels"]["release"] == "kps"
    bad = prometheus_rule(chart)
    bad["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert not validator.is_valid(bad), "the offline schema must catch a bad duration"


def test_alerts_name_only_exported_metrics_of_this_release(chart):
    exported = exported_series() | PROMETHEUS_SERIES
    rule = prometheus_rule(chart)
    assert set(alerts(rule)) == ALERTS
    for name, a in alerts(rule).items():
        expr = a["expr"]
        assert balanced(expr), f"{name}: {expr}"
        names = promql_metrics(expr)
        assert names and names <= exported, f"{name}: {names - exported} not exported by server/metrics.py"
        selectors = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{([^}]*)\}", expr)
        assert len(selectors) == len(re.findall(r"\bkiln:|\bup\b", expr)), f"{name}: a series without selector"
        for s in selectors:
            assert s.startswith(f'namespace="{chart.namespace}",service="t-kiln"'), f"{name}: {s}"
        assert a["labels"]["severity"] in {"critical", "warning"}
        assert a["annotations"]["summary"] and a["annotations"]["description"]


def test_alert_selector_matches_the_service_monitor_targets(chart):
    """The default selector uses the labels Prometheus Operator gives the ServiceMonitor's targets."""
    objs = chart.render("cpu", ON)
    svc, sm = chart.only(objs, "Service"), chart.only(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert "jobLabel" not in sm["spec"]  # so job = service = the Service's name
    expr = alerts(chart.only(objs, "PrometheusRule"))["KilnTargetDown"]["expr"]
    assert f'service="{svc["metadata"]["name"]}"' in expr
    assert "serviceMonitor.enabled" in chart.render_error("cpu", ("prometheusRule.enabled=true",))
    custom = chart.only(chart.render("cpu", ("prometheusRule.enabled=true", 'prometheusRule.selector=job="kiln"')),
                        "PrometheusRule")
    assert all('job="kiln"' in a["expr"] and "namespace=" not in a["expr"] for a in alerts(custom).values())


def test_alert_thresholds_durations_and_labels_come_from_values(chart):
    rule = prometheus_rule(chart, (
        "prometheusRule.rateWindow=10m", "prometheusRule.minRequestRate=2",
        "prometheusRule.alerts.ttftHigh.seconds=3.5", "prometheusRule.alerts.ttftHigh.quantile=0.9",
        "prometheusRule.alerts.ttftHigh.for=15m", "prometheusRule.alerts.errorRatioHigh.ratio=0.2",
        "prometheusRule.alerts.abortsHigh.ratio=0.3", "prometheusRule.alerts.targetDown.severity=page",
        "prometheusRule.alerts.metricsAbsent.enabled=false"), ('prometheusRule.alertLabels={"team":"ml"}',))
    a = alerts(rule)
    assert "KilnMetricsAbsent" not in a and len(a) == len(ALERTS) - 1
    ttft = a["KilnTimeToFirstTokenHigh"]
    assert ttft["expr"].startswith("histogram_quantile(0.9, ") and ttft["expr"].endswith("> 3.5")
    assert ttft["for"] == "15m" and "[10m]" in ttft["expr"]
    assert "> 0.2)" in a["KilnErrorRatioHigh"]["expr"] and "> 2)" in a["KilnErrorRatioHigh"]["expr"]
    assert "> 0.3)" in a["KilnAbortsHigh"]["expr"]
    assert a["KilnTargetDown"]["labels"] == {"severity": "page", "team": "ml"}
    assert all(x["labels"]["team"] == "ml" for x in a.values())
    assert "[10m]" in a["KilnEngineStalled"]["expr"]


@pytest.mark.parametrize("sets,set_json,bound", [
    ((), (), ServerConfig().max_num_queued_reqs),
    (("server.maxNumQueuedReqs=100",), (), 100),
    ((), ('server.extraConfig={"KILN_MAX_NUM_QUEUED_REQS":"40"}',), 40),
])
def test_queue_alert_follows_the_server_queue_bound(chart, sets, set_json, bound):
    expr = alerts(prometheus_rule(chart, sets, set_json))["KilnQueueSaturated"]["expr"]
    (threshold,) = re.findall(r"kiln:num_requests_waiting\{[^}]*\}\) >= ([0-9.]+)", expr)
    assert float(threshold) == pytest.approx(0.8 * bound)
    assert 'reason="queue_full"' in expr


def test_default_queue_bound_is_the_servers():
    text = (REPO / "deploy" / "helm" / "kiln" / "templates" / "_helpers.tpl").read_text()
    (default,) = re.findall(r'define "kiln.defaultMaxNumQueuedReqs" -}}\s*(\d+)', text)
    assert int(default) == ServerConfig().max_num_queued_reqs


# ---- InferencePool -------------------------------------------------------------------------

def test_inference_pool_validates_and_selects_the_kiln_pods(chart):
    validator = jsonschema.Draft7Validator(schema("inferencepool-inference.networking.k8s.io-v1.json"))
    validator.check_schema(validator.schema)
    objs = chart.render("inf2", ("inferencePool.enabled=true",))
    pool, dep = chart.only(objs, "InferencePool"), chart.only(objs, "Deployment")
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(pool)]
    assert not errors, errors
    spec = pool["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (http,) = [p for p in chart.server(objs)["ports"] if p["name"] == "http"]
    assert spec["targetPorts"] == [{"number": http["containerPort"]}]
    assert spec["endpointPickerRef"] == {"kind": "Service", "name": "t-kiln-epp", "port": {"number": 9002},
                                         "failureMode": "FailClose"}
    custom = chart.only(chart.render("inf2", (
        "inferencePool.enabled=true", "inferencePool.endpointPicker.serviceName=shared-epp",
        "inferencePool.endpointPicker.port=9102", "inferencePool.endpointPicker.failureMode=FailOpen")),
        "InferencePool")
    assert custom["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "shared-epp",
                                                   "port": {"number": 9102}, "failureMode": "FailOpen"}
    assert validator.is_valid(custom)
    broken = json.loads(json.dumps(pool))
    del broken["spec"]["endpointPickerRef"]["port"]
    assert not validator.is_valid(broken), "the offline schema must carry the CRD's port rule"


def test_endpoint_picker_config_reads_kiln_metrics(chart):
    objs = chart.render("inf2", ("inferencePool.enabled=true",))
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "t-kiln-epp-config"]
    config = yaml.safe_load(cm["data"]["kiln-epp.yaml"])
    assert config["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p["type"]: p for p in config["plugins"]}
    assert set(plugins) == {"queue-scorer", "kv-cache-utilization-scorer", "metrics-data-source",
                            "core-metrics-extractor"}
    assert plugins["metrics-data-source"]["parameters"] == {"scheme": "http", "path": "/metrics"}
    params = plugins["core-metrics-extractor"]["parameters"]
    (engine,) = params["engineConfigs"]
    assert params["defaultEngine"] == engine["name"] == "kiln"
    assert engine == {"name": "kiln", "queuedRequestsSpec": "kiln:num_requests_waiting",
                      "runningRequestsSpec": "kiln:num_requests_running",
                      "kvUsageSpec": "kiln:kv_cache_usage_perc", "loraSpec": "", "cacheInfoSpec": ""}
    exported = exported_series()
    for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        assert engine[key].split("{")[0] in exported
    (profile,) = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} == {"queue-scorer", "kv-cache-utilization-scorer"}


def test_endpoint_picker_metric_names_are_configurable(chart):
    objs = chart.render("inf2", ("inferencePool.enabled=true",
                                 "inferencePool.metrics.queuedRequests=kiln:num_requests_waiting{model_name=\"a\"}"))
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-epp-config")]
    (engine,) = yaml.safe_load(cm["data"]["kiln-epp.yaml"])["plugins"][3]["parameters"]["engineConfigs"]
    assert engine["queuedRequestsSpec"] == 'kiln:num_requests_waiting{model_name="a"}'


# ---- values, lint, docs --------------------------------------------------------------------

@pytest.mark.parametrize("sets,message", [
    (("prometheusRule.alerts.ttftHigh.quantile=1.5",), "quantile"),
    (("prometheusRule.alerts.targetDown.for=5 minutes",), "for"),
    (("prometheusRule.alerts.errorRatioHigh.ratio=0",), "ratio"),
    (("prometheusRule.selector={job=\"x\"}",), "selector"),
    (("inferencePool.endpointPicker.failureMode=Open",), "failureMode"),
    (("inferencePool.endpointPicker.port=0",), "port"),
    (("grafana.dashboard.labelValue=not valid",), "labelValue"),
    (("grafana.dashboard.bogus=1",), "additional properties 'bogus' not allowed"),
])
def test_schema_rejects_bad_observability_values(chart, sets, message):
    assert message in chart.render_error("cpu", sets)


def test_helm_lint_strict_with_everything_on(chart):
    args = ["lint", str(chart.dir), "--strict"]
    for s in ON:
        args += ["--set", s]
    proc = chart.run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docs_explain_each_alert_and_link_the_dashboard():
    deploy = (REPO / "docs" / "deploy.md").read_text()
    for name in ALERTS:
        assert name in deploy, f"docs/deploy.md does not explain {name}"
    for word in ("grafana.dashboard.enabled", "prometheusRule.enabled", "inferencePool.enabled",
                 "inference.networking.k8s.io/v1"):
        assert word in deploy
    assert "deploy/helm/kiln/dashboards/kiln.json" in (REPO / "docs" / "metrics.md").read_text()


def test_notes_name_the_endpoint_picker_the_chart_does_not_run(chart):
    assert "endpoint picker" not in chart.notes("cpu")
    notes = chart.notes("cpu", ("inferencePool.enabled=true", "inferencePool.endpointPicker.serviceName=epp"))
    assert "epp:9002" in notes and "t-kiln-epp-config" in notes
