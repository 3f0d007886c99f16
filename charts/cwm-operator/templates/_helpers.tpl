{{/*
Names. Kubernetes names are at most 63 characters; trim and drop a trailing dash.
*/}}
{{- define "cwm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cwm-operator.fullname" -}}
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

{{- define "cwm-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The standard app.kubernetes.io labels, from this one helper on every object.
*/}}
{{- define "cwm-operator.labels" -}}
helm.sh/chart: {{ include "cwm-operator.chart" . }}
{{ include "cwm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cwm-pipeline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cwm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cwm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "cwm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cwm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference: registry/repository then @digest, else :tag, where the tag falls back to
images.tag and then to the chart's appVersion (never `latest`).
Call with (dict "image" .Values.images.beam "root" $).
*/}}
{{- define "cwm-operator.image" -}}
{{- $root := .root }}
{{- $registry := default $root.Values.images.registry .image.registry }}
{{- $repo := .image.repository }}
{{- $ref := ternary $repo (printf "%s/%s" $registry $repo) (empty $registry) }}
{{- if .image.digest }}
{{- printf "%s@%s" $ref .image.digest }}
{{- else }}
{{- $tag := .image.tag | default $root.Values.images.tag | default $root.Chart.AppVersion | toString }}
{{- if eq $tag "latest" }}
{{- fail (printf "image %s: tag `latest` is not allowed; pin a version" $repo) }}
{{- end }}
{{- printf "%s:%s" $ref $tag }}
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules, written once: exactly cwm_operator.permissions.RULES (tests/chart
compares them: nothing missing, nothing extra). All are namespaced, so they go in a ClusterRole
when every namespace is watched and in a Role per namespace otherwise. No delete anywhere: the
garbage collector removes children with their pipeline. See permissions.py for why each exists.
*/}}
{{- define "cwm-operator.rules" -}}
- apiGroups: ["cwm.dev"]
  resources: ["cwmpipelines"]
  verbs: ["list", "watch"]
- apiGroups: ["cwm.dev"]
  resources: ["cwmpipelines/status"]
  verbs: ["patch"]
- apiGroups: ["cwm.dev"]
  resources: ["cwmpipelines/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "patch", "watch"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["create", "get", "list", "patch", "watch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
