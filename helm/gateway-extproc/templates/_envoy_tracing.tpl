{{/*
Envoy's OpenTelemetry tracer (tracing.otlp.address set): a server span per request, a span
per upstream attempt (spawn_upstream_span: retries and fallbacks are separate spans with the
backend that answered), and the ext_proc's gRPC stream as a child the ext_proc continues
(traceparent in the stream's metadata), all exported over OTLP/gRPC to tracing.otlp.
Included by _envoy.tpl: the HCM's `tracing` and the collector's cluster.
*/}}
{{- define "gateway-extproc.envoyTracing" -}}
{{- $t := .Values.tracing -}}
{{- if $t.otlp.address }}
tracing:
  random_sampling: {value: {{ $t.samplingPercent }}}
  spawn_upstream_span: true
  # Envoy tags every span with the caller's URL, method, user agent and x-client-trace-id as
  # sent, and a caller may put a key in any of them. Custom tags are set after those and
  # replace them.
  custom_tags:
  - {tag: http.url, value: {{ include "gateway-extproc.loggedPath" . | quote }}}
  - {tag: http.method, value: {{ include "gateway-extproc.loggedMethod" . | quote }}}
  - {tag: user_agent, literal: {value: "-"}}
  - {tag: "guid:x-client-trace-id", literal: {value: "-"}}
  provider:
    name: envoy.tracers.opentelemetry
    typed_config:
      "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
      service_name: {{ $t.envoyServiceName }}
      grpc_service:
        envoy_grpc: {cluster_name: otlp_collector}
        timeout: 2s
{{- end }}
{{- end -}}

{{- define "gateway-extproc.envoyTracingCluster" -}}
{{- $t := .Values.tracing -}}
{{- if $t.otlp.address }}
- name: otlp_collector
  type: STRICT_DNS
  connect_timeout: 2s
  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config: {http2_protocol_options: {}}
  load_assignment:
    cluster_name: otlp_collector
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {address: {{ $t.otlp.address | quote }}, port_value: {{ $t.otlp.port | int }}}
{{- end }}
{{- end -}}
