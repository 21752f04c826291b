{{/* app.kubernetes.io/name: the chart name unless nameOverride. */}}
{{- define "gateway-extproc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Base name of every object: fullnameOverride, else <release>-<name>, else the release name
alone when it already contains the name (release gateway-extproc: no
gateway-extproc-gateway-extproc).
*/}}
{{- define "gateway-extproc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "gateway-extproc.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gateway-extproc.labels" -}}
app.kubernetes.io/name: {{ include "gateway-extproc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels selectors match on, for a component (never commonLabels: selectors are immutable). */}}
{{- define "gateway-extproc.componentSelector" -}}
app.kubernetes.io/name: {{ include "gateway-extproc.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* "repository@digest" when a digest is set, else "repository:tag" (tag defaults to .default). */}}
{{- define "gateway-extproc.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .default) -}}
{{- end -}}
{{- end -}}

{{/*
Envoy socket_address {address, port} as a flow mapping, the address quoted (an IPv6 `::` is
YAML syntax unquoted). `::` means every address, IPv4 included: Envoy would otherwise bind it
IPv6-only, and an IPv4 Service would reach nothing.
*/}}
{{- define "gateway-extproc.socketAddress" -}}
{address: {{ .address | quote }}, port_value: {{ .port | int }}{{ if eq .address "::" }}, ipv4_compat: true{{ end }}}
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

{{/* A Kubernetes memory quantity (512Mi, 1Gi, 1G, 1000000) in bytes. */}}
{{- define "gateway-extproc.bytes" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- . | int64 -}}
{{- else -}}
{{- $q := toString . -}}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $unit := trimPrefix $num $q -}}
{{- if or (not $num) (not (hasKey $units $unit)) -}}
{{- fail (printf "values.yaml: deployment.envoy.resources.limits.memory %q is not a memory quantity such as 1Gi or 512Mi" $q) -}}
{{- end -}}
{{- mulf (float64 $num) (index $units $unit) | int64 -}}
{{- end -}}
{{- end -}}

{{/*
What Envoy's logs and spans name a request by: the endpoint's path, or "(unknown)" as in the
ext_proc's access line (a CEL formatter). A caller may put a key in a query string or in a
path of its own making; neither is ever written.
*/}}
{{- define "gateway-extproc.loggedPath" -}}
%CEL(request.url_path in ['/v1/chat/completions', '/v1/embeddings', '/v1/responses', '/v1/messages', '/v1/models', '/v1/usage'] ? request.url_path : '(unknown)')%
{{- end -}}

{{/*
The request id Envoy's envoy_error line names: Envoy's own (a UUID), else "-". Envoy replaces a
caller's x-request-id only once it accepts the request; one it refuses before that (a
`#fragment` in the path) still carries the caller's header, any text up to 60 KiB.
*/}}
{{- define "gateway-extproc.loggedRequestId" -}}
%CEL(request.id.matches('^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$') ? request.id : '-')%
{{- end -}}

{{/*
The method Envoy's logs and spans name a request by: one HTTP defines, or "other" as in the
ext_proc's access line (processors/router.py KNOWN_METHODS). Over HTTP/2 a method is any
token a caller makes up, up to the 60 KiB header limit: a key sent as one was written whole.
*/}}
{{- define "gateway-extproc.loggedMethod" -}}
%CEL(request.method in ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS'] ? request.method : 'other')%
{{- end -}}
