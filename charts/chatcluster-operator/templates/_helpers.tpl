{{/* Full name of the release's objects. */}}
{{- define "chatcluster-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels. app.kubernetes.io/name is what the ChatCluster NetworkPolicies admit. */}}
{{- define "chatcluster-operator.selectorLabels" -}}
app.kubernetes.io/name: chatcluster-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "chatcluster-operator.labels" -}}
{{ include "chatcluster-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: chatcluster
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "chatcluster-operator.serviceAccountName" -}}
{{- default (include "chatcluster-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}
