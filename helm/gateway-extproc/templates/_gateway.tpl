{{/* gateway.yaml: the ext_proc's config, from the same values as envoy.yaml. */}}
{{- define "gateway-extproc.gatewayConfig" -}}
{{- $v := .Values -}}
version: 1
listen:
{{- range $i := until (int $v.extproc.processes) }}
- {{ printf "unix://%s" (include "gateway-extproc.socket" (dict "dir" $v.extproc.socketDir "i" $i)) | quote }}
{{- end }}
metrics:
  address: {{ $v.extproc.metrics.address | quote }}
  port: {{ $v.extproc.metrics.port | int }}
maxRequestBytes: {{ $v.envoy.maxRequestBytes | int64 }}
providers:
{{- toYaml $v.providers | nindent 2 }}
models:
{{- toYaml $v.models | nindent 2 }}
teams:
{{- toYaml $v.teams | nindent 2 }}
users:
{{- toYaml $v.users | nindent 2 }}
keys:
{{- toYaml $v.keys | nindent 2 }}
budgets:
{{- toYaml $v.budgets | nindent 2 }}
{{- with $v.identity }}
identity:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.classification }}
classification:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.audit }}{{ if .enabled }}
audit:
  dir: {{ .dir | quote }}
  signingKeyFile: {{ .signingKey.file | quote }}
  instance: {{ .instance | quote }}
  checkpointSeconds: {{ .checkpointSeconds }}
  fsync: {{ .fsync }}
  fsyncIntervalSeconds: {{ .fsyncIntervalSeconds }}
  queueSize: {{ .queueSize | int }}
  segmentBytes: {{ .segmentBytes | int64 }}
  segmentSeconds: {{ .segmentSeconds }}
  retention:
    {{- toYaml .retention | nindent 4 }}
  {{- if .redisStream.url }}
  redisStream:
    {{- toYaml (omit .redisStream "passwordSecret") | nindent 4 }}
  {{- end }}
{{- end }}{{ end }}
{{- end -}}
