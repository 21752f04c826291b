{{- define "gateway-extproc.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gateway-extproc.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Unix socket of ext_proc process i. */}}
{{- define "gateway-extproc.socket" -}}
{{- printf "%s/extproc-%d.sock" .dir (int .i) -}}
{{- end -}}

{{/* Provider by name; fails the render with a fix when it does not exist. */}}
{{- define "gateway-extproc.provider" -}}
{{- $found := dict -}}
{{- range .root.Values.providers -}}
{{- if eq .name $.name }}{{ $found = . }}{{ end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "values: models[].backends[].provider %q is not in providers[]; add it or fix the name" .name) -}}
{{- end -}}
{{- toJson $found -}}
{{- end -}}
