{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "trtqwen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, prefixed to the chart name unless it already contains it.
Components append "-triton", "-openai", "-bench", so it is cut to leave them room.
*/}}
{{- define "trtqwen.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "trtqwen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels; the component's are added with trtqwen.componentLabels. */}}
{{- define "trtqwen.labels" -}}
helm.sh/chart: {{ include "trtqwen.chart" . }}
{{ include "trtqwen.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trtqwen
{{- end }}

{{- define "trtqwen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trtqwen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Names of the components' objects. */}}
{{- define "trtqwen.triton.fullname" -}}
{{- printf "%s-triton" (include "trtqwen.fullname" .) }}
{{- end }}

{{- define "trtqwen.openai.fullname" -}}
{{- printf "%s-openai" (include "trtqwen.fullname" .) }}
{{- end }}

{{- define "trtqwen.bench.fullname" -}}
{{- printf "%s-bench" (include "trtqwen.fullname" .) }}
{{- end }}

{{- define "trtqwen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trtqwen.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Triton Service's in-cluster DNS name (what the OpenAI proxy and the bench Job dial). */}}
{{- define "trtqwen.triton.host" -}}
{{- printf "%s.%s.svc" (include "trtqwen.triton.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "trtqwen.triton.grpcUrl" -}}
{{- printf "%s:%d" (include "trtqwen.triton.host" .) (int .Values.triton.ports.grpc) }}
{{- end }}

{{- define "trtqwen.triton.metricsUrl" -}}
{{- printf "%s:%d" (include "trtqwen.triton.host" .) (int .Values.triton.ports.metrics) }}
{{- end }}

{{/* image: repository:tag from a {repository, tag} dict. */}}
{{- define "trtqwen.image" -}}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}

{{/*
The queue-to-compute ratio the PrometheusRule records and the HPA reads: Triton's cumulative queue
time over its cumulative compute time for one model, per pod, over autoscaling.metric.rateWindow.
*/}}
{{- define "trtqwen.autoscaling.expr" -}}
{{- $m := .Values.autoscaling.metric }}
{{- $sel := printf "namespace=%q" .Release.Namespace }}
{{- if $m.model }}
{{- $sel = printf "%s, model=%q" $sel $m.model }}
{{- end }}
{{- printf "sum by (namespace, pod) (rate(nv_inference_queue_duration_us{%s}[%s])) / clamp_min(sum by (namespace, pod) (rate(nv_inference_compute_infer_duration_us{%s}[%s])), 1)" $sel $m.rateWindow $sel $m.rateWindow }}
{{- end }}

{{/* Refuse values that cannot work, naming the value. */}}
{{- define "trtqwen.validate" -}}
{{- if not .Values.modelRepository.fromImage }}
{{- if not .Values.modelRepository.existingClaim }}
{{- fail "modelRepository.existingClaim is required (a PersistentVolumeClaim holding the model repository) unless modelRepository.fromImage is true" }}
{{- end }}
{{- end }}
{{- if and .Values.engines.mountPath (not (isAbs .Values.engines.mountPath)) }}
{{- fail (printf "engines.mountPath must be an absolute path (the path the config.pbtxt files name), got %q" .Values.engines.mountPath) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The OpenAI proxy binds 0.0.0.0, which `trtqwen openai` refuses without an API key: it must come from a Secret. */}}
{{- define "trtqwen.openai.validate" -}}
{{- if not .Values.openai.apiKeySecret.name }}
{{- fail (printf "openai.apiKeySecret.name is required while openai.enabled: the OpenAI proxy listens on 0.0.0.0 and needs an API key from an existing Secret. Create it and set the value, e.g.\n  kubectl -n %s create secret generic trtqwen-openai --from-literal=%s=$(openssl rand -hex 32)\n  helm ... --set openai.apiKeySecret.name=trtqwen-openai\n(or set openai.enabled=false)" .Release.Namespace .Values.openai.apiKeySecret.key) }}
{{- end }}
{{- range .Values.openai.extraArgs }}
{{- if hasPrefix "--api-key" . }}
{{- fail "openai.extraArgs must not carry --api-key (the key would sit in the pod spec): put it in a Secret and name it in openai.apiKeySecret" }}
{{- end }}
{{- end }}
{{- range .Values.openai.env }}
{{- if eq .name "TRTQWEN_API_KEY" }}
{{- fail "openai.env must not set TRTQWEN_API_KEY: the chart sets it from openai.apiKeySecret" }}
{{- end }}
{{- end }}
{{- end }}
