{{/* The chart's name: "conveyor", or nameOverride. */}}
{{- define "conveyor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object's name: RELEASE-conveyor, or RELEASE if it contains the chart's name (as
     `conveyor keys kubernetes-secrets --release RELEASE` assumes), or fullnameOverride. */}}
{{- define "conveyor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "conveyor.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "conveyor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: never the version or the chart, so an upgrade keeps the (immutable) selectors. */}}
{{- define "conveyor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conveyor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The standard labels (helm.sh/docs/chart_best_practices/labels) of every object. */}}
{{- define "conveyor.labels" -}}
helm.sh/chart: {{ include "conveyor.chart" . }}
{{ include "conveyor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: conveyor
{{- end -}}

{{/* REPOSITORY:TAG of an image map ({repository, tag}), the tag defaulting to the chart's appVersion. */}}
{{- define "conveyor.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s:%s" $image.repository (toString (default $root.Chart.AppVersion $image.tag)) -}}
{{- end -}}

{{/* The dispatcher's address inside the cluster: its Service. */}}
{{- define "conveyor.dispatcherAddress" -}}
{{- printf "tcp://%s-dispatcher:%d" (include "conveyor.fullname" .) (int .Values.dispatcher.port) -}}
{{- end -}}

{{/* A key Secret's name: keys.<value> if set, else FULLNAME-<suffix> (what `conveyor keys kubernetes-secrets`
     prints). Called with (list $ "dispatcherSecret" "dispatcher-keys"). */}}
{{- define "conveyor.secretName" -}}
{{- $root := index . 0 -}}
{{- default (printf "%s-%s" (include "conveyor.fullname" $root) (index . 2)) (index $root.Values.keys (index . 1)) -}}
{{- end -}}

{{/* A Secret volume as every pod mounts it: read-only files of mode 0400. */}}
{{- define "conveyor.secretVolume" -}}
- name: {{ index . 0 }}
  secret:
    secretName: {{ index . 1 }}
    defaultMode: 0400
{{- end -}}

{{/* `conveyor-healthcheck dispatcher` as a probe command, its budget below the probe's timeout. */}}
{{- define "conveyor.dispatcherCheck" -}}
{{- $root := index . 0 -}}
{{- $probe := index . 1 -}}
exec:
  command:
    - conveyor-healthcheck
    - dispatcher
    - --address
    - {{ printf "tcp://127.0.0.1:%d" (int $root.Values.dispatcher.port) }}
    {{- if not $root.Values.insecure }}
    - --keys
    - /etc/conveyor/client
    {{- end }}
    - --timeout
    - {{ sub (int $probe.timeoutSeconds) 2 | quote }}
timeoutSeconds: {{ $probe.timeoutSeconds }}
periodSeconds: {{ $probe.periodSeconds }}
failureThreshold: {{ $probe.failureThreshold }}
{{- end -}}

{{/* A worker group's objects' name: FULLNAME-worker-GROUP. Called with (list $ $group). */}}
{{- define "conveyor.workerName" -}}
{{- printf "%s-worker-%s" (include "conveyor.fullname" (index . 0)) (index . 1).name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of a worker group's pods. Called with (list $ $group). */}}
{{- define "conveyor.workerSelectorLabels" -}}
{{ include "conveyor.selectorLabels" (index . 0) }}
app.kubernetes.io/component: worker
conveyor/worker-group: {{ (index . 1).name }}
{{- end -}}
