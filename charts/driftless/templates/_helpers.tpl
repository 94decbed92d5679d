{{- define "driftless.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "driftless.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "driftless.labels" -}}
{{ include "driftless.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: driftless
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "driftless.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "driftless.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The watched namespaces, one per line (namespaced mode). */}}
{{- define "driftless.namespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "\n" .Values.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* "auto" follows the cluster's API (prometheus-operator's monitoring.coreos.com/v1). */}}
{{- define "driftless.monitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/* "true" when a true | false | "auto" value is on; called with (list $ value). */}}
{{- define "driftless.on" -}}
{{- $v := toString (index . 1) -}}
{{- if or (eq $v "true") (and (eq $v "auto") (include "driftless.monitoringApi" (index . 0))) -}}true{{- end -}}
{{- end -}}

{{- define "driftless.serviceMonitors" -}}
{{- include "driftless.on" (list . .Values.monitoring.serviceMonitors) -}}
{{- end -}}

{{/* ServiceMonitors can exist to be pruned: the API is served, or they are built. */}}
{{- define "driftless.serviceMonitorRights" -}}
{{- if or (include "driftless.serviceMonitors" .) (include "driftless.monitoringApi" .) -}}true{{- end -}}
{{- end -}}

{{- define "driftless.prometheusRule" -}}
{{- include "driftless.on" (list . .Values.monitoring.prometheusRule.enabled) -}}
{{- end -}}

{{- define "driftless.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) -}}
{{- end -}}
