{{/* The three artifact modes (README.md "Artifacts"). Built once by `python -m compile`;
     a pod only downloads or mounts it, never compiles it (except source=compile on CPU). */}}

{{/* Init container that fills the "artifacts" emptyDir (s3 and url only). */}}
{{- define "kiln.artifactInitContainers" -}}
{{- $a := .Values.artifact }}
{{- if eq $a.source "s3" }}
- name: fetch-artifact
  image: {{ printf "%s:%s" $a.s3.image.repository $a.s3.image.tag }}
  imagePullPolicy: IfNotPresent
  command: ["aws", "s3", "sync", {{ $a.s3.uri | quote }}, "/artifacts", "--no-progress"{{ range $a.s3.extraArgs }}, {{ . | quote }}{{ end }}]
  env:
    - name: HOME
      value: /tmp
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: artifacts, mountPath: /artifacts}
    - {name: tmp, mountPath: /tmp}
{{- else if eq $a.source "url" }}
- name: fetch-artifact
  image: {{ printf "%s:%s" $a.url.image.repository $a.url.image.tag }}
  imagePullPolicy: IfNotPresent
  command:
    - sh
    - -ec
    - set -o pipefail; curl -fsSL --retry 5 "$ARTIFACT_URL" | tar -xzf - -C /artifacts
  env:
    - name: ARTIFACT_URL
      value: {{ $a.url.url | quote }}
    - name: HOME
      value: /tmp
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: artifacts, mountPath: /artifacts}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end }}

{{- define "kiln.artifactVolume" -}}
{{- $a := .Values.artifact }}
{{- if eq $a.source "pvc" }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ $a.pvc.claimName }}
    readOnly: true
{{- else if has $a.source (list "s3" "url") }}
- name: artifacts
  emptyDir:
    sizeLimit: {{ $a.downloadSizeLimit }}
{{- end }}
{{- end }}

{{- define "kiln.artifactMount" -}}
{{- if ne .Values.artifact.source "compile" }}
- {name: artifacts, mountPath: /artifacts, readOnly: true}
{{- end }}
{{- end }}
