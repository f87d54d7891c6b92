{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: every object carries kiln.labels; selectors use only kiln.selectorLabels. ------ */}}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{/* Server contract (docs/CONTRACTS.md): the port the server listens on. ----------------- */}}

{{- define "kiln.port" -}}
8000
{{- end }}

{{/* After the drain, uvicorn waits this long for open connections before exiting
     (GRACEFUL_SHUTDOWN_SECONDS in server/__main__.py); part of the shutdown budget. */}}
{{- define "kiln.serverCloseSeconds" -}}
5
{{- end }}

{{/* The one metric both autoscalers read (server/metrics.py exports it, label model_name). */}}
{{- define "kiln.autoscalingMetric" -}}
kiln:num_requests_waiting
{{- end }}

{{/* Sum of the queue over this release's pods, as scraped through the ServiceMonitor. */}}
{{- define "kiln.autoscalingQuery" -}}
sum({{ include "kiln.autoscalingMetric" . }}{namespace="{{ .Release.Namespace }}",service="{{ include "kiln.fullname" . }}"})
{{- end }}

{{- define "kiln.image" -}}
{{- $flavor := ternary "neuron" "cpu" .Values.neuron.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Artifact folder as the server sees it. */}}
{{- define "kiln.artifactDir" -}}
{{- if .Values.artifact.subPath }}
{{- printf "/artifacts/%s" (trimPrefix "/" .Values.artifact.subPath) }}
{{- else }}
{{- "/artifacts" }}
{{- end }}
{{- end }}

{{/* Container resources with the Neuron request added: cores = tpDegree, or devices =
     ceil(tpDegree / coresPerDevice). Extended resources need requests == limits. */}}
{{- define "kiln.resources" -}}
{{- $res := deepCopy .Values.resources }}
{{- if .Values.neuron.enabled }}
{{- $tp := int .Values.neuron.tpDegree }}
{{- $cpd := int .Values.neuron.coresPerDevice }}
{{- $key := printf "aws.amazon.com/%s" .Values.neuron.resource }}
{{- $count := ternary $tp (div (add $tp (sub $cpd 1)) $cpd) (eq .Values.neuron.resource "neuroncore") }}
{{- range $section := list "requests" "limits" }}
{{- $m := default dict (get $res $section) }}
{{- range $k, $_ := $m }}
{{- if hasPrefix "aws.amazon.com/neuron" $k }}
{{- fail (printf "resources.%s.%s: leave Neuron resources to neuron.tpDegree and neuron.resource" $section $k) }}
{{- end }}
{{- end }}
{{- $_ := set $m $key $count }}
{{- $_ := set $res $section $m }}
{{- end }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Startup can take startupProbe's whole budget; only then may the rollout count as stuck. */}}
{{- define "kiln.progressDeadlineSeconds" -}}
{{- $p := .Values.probes.startup }}
{{- $threshold := eq .Values.artifact.source "compile" | ternary .Values.artifact.compile.startupFailureThreshold $p.failureThreshold }}
{{- add (mul (int $threshold) (int $p.periodSeconds)) 600 }}
{{- end }}

{{- define "kiln.affinity" -}}
{{- $aff := deepCopy .Values.affinity }}
{{- if and .Values.neuron.enabled .Values.neuron.instanceTypes (not (hasKey $aff "nodeAffinity")) }}
{{- $expr := dict "key" "node.kubernetes.io/instance-type" "operator" "In" "values" .Values.neuron.instanceTypes }}
{{- $terms := list (dict "matchExpressions" (list $expr)) }}
{{- $_ := set $aff "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" $terms)) }}
{{- end }}
{{- if $aff }}
{{- toYaml $aff }}
{{- end }}
{{- end }}

{{- define "kiln.tolerations" -}}
{{- $tol := .Values.tolerations }}
{{- if and .Values.neuron.enabled .Values.neuron.tolerateNeuronTaint }}
{{- $tol = append $tol (dict "key" "aws.amazon.com/neuron" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- if $tol }}
{{- toYaml $tol }}
{{- end }}
{{- end }}

{{/* Cross-field checks the schema cannot express; included by deployment.yaml. ----------- */}}
{{- define "kiln.validate" -}}
{{- $v := .Values }}
{{- if and $v.neuron.enabled (eq $v.artifact.source "compile") }}
{{- fail "artifact.source=compile is CPU only: a Neuron pod must never compile at start (minutes to hours per pod). Build the artifact once with `python -m compile --target neuron` and use artifact.source s3, url or pvc" }}
{{- end }}
{{- if and (eq $v.artifact.source "s3") (not $v.artifact.s3.uri) }}
{{- fail "artifact.source=s3 needs artifact.s3.uri (s3://bucket/prefix/)" }}
{{- end }}
{{- if and (eq $v.artifact.source "url") (not $v.artifact.url.url) }}
{{- fail "artifact.source=url needs artifact.url.url (a .tar.gz of the artifact folder)" }}
{{- end }}
{{- if and (eq $v.artifact.source "pvc") (not $v.artifact.pvc.claimName) }}
{{- fail "artifact.source=pvc needs artifact.pvc.claimName (an existing PersistentVolumeClaim)" }}
{{- end }}
{{- $close := include "kiln.serverCloseSeconds" . | float64 }}
{{- $needed := addf (float64 $v.server.drainTimeout) (float64 $v.preStopSleepSeconds) $close }}
{{- if le (float64 $v.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed server.drainTimeout (%v) + preStopSleepSeconds (%v) + %v s for the server to close connections, or Kubernetes kills the server mid-drain" $v.terminationGracePeriodSeconds $v.server.drainTimeout $v.preStopSleepSeconds $close) }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and $v.autoscaling.enabled (eq $v.autoscaling.mode "keda") (not $v.autoscaling.keda.serverAddress) }}
{{- fail "autoscaling.mode=keda needs autoscaling.keda.serverAddress (the Prometheus URL)" }}
{{- end }}
{{- end }}

{{/* Observability (grafana-dashboard.yaml, prometheusrule.yaml) ----------------------------- */}}

{{/* The server's --max-num-queued-reqs default (ServerConfig().max_num_queued_reqs; a test
     keeps the two equal). */}}
{{- define "kiln.defaultMaxNumQueuedReqs" -}}
256
{{- end }}

{{/* The waiting-queue bound the pods run with: server.maxNumQueuedReqs, a KILN_MAX_NUM_QUEUED_REQS
     in server.extraConfig, or the server's default. */}}
{{- define "kiln.maxNumQueuedReqs" -}}
{{- $s := .Values.server }}
{{- if not (kindIs "invalid" $s.maxNumQueuedReqs) }}
{{- $s.maxNumQueuedReqs }}
{{- else if hasKey $s.extraConfig "KILN_MAX_NUM_QUEUED_REQS" }}
{{- get $s.extraConfig "KILN_MAX_NUM_QUEUED_REQS" }}
{{- else }}
{{- include "kiln.defaultMaxNumQueuedReqs" . }}
{{- end }}
{{- end }}

{{/* PromQL label matchers for this release's series: the labels the ServiceMonitor's targets
     carry (namespace, service), unless prometheusRule.selector replaces them. */}}
{{- define "kiln.promSelector" -}}
{{- default (printf "namespace=%q,service=%q" .Release.Namespace (include "kiln.fullname" .)) .Values.prometheusRule.selector }}
{{- end }}

{{/* Name of the InferencePool and of the endpoint picker Service it points at. */}}
{{- define "kiln.inferencePoolName" -}}
{{- include "kiln.fullname" . }}
{{- end }}

{{- define "kiln.eppServiceName" -}}
{{- default (printf "%s-epp" (include "kiln.inferencePoolName" .)) .Values.inferencePool.endpointPicker.serviceName }}
{{- end }}

{{/* for, labels and annotations of one alert: dict alert (its values), summary, description, r
     (.Values.prometheusRule). */}}
{{- define "kiln.alertMeta" -}}
for: {{ .alert.for }}
labels:
  severity: {{ .alert.severity }}
  {{- with .r.alertLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  summary: {{ .summary | quote }}
  description: {{ .description | quote }}
{{- end }}
