{{/*
Envoy's own metrics for Prometheus (envoy.metrics). Admin stays on loopback because it can
stop Envoy and dump its config; this listener forwards exactly `GET /stats/prometheus` to it
and answers 404 to anything else, so the scrape port exposes nothing but the stats.
Included by _envoy.tpl: one listener and one cluster, both only when envoy.metrics.port ≠ 0.
*/}}
{{- define "gateway-extproc.envoyStatsListener" -}}
{{- $m := .Values.envoy.metrics -}}
{{- if ($m.port | int) }}
- name: envoy_stats
  address:
    socket_address: {{ include "gateway-extproc.socketAddress" $m }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: envoy_stats
        route_config:
          virtual_hosts:
          - name: stats
            domains: ["*"]
            routes:
            - match:
                path: /stats/prometheus
                headers: [{name: ":method", string_match: {exact: GET}}]
              route: {cluster: envoy_admin, timeout: 10s}
            - match: {prefix: /}
              direct_response: {status: 404}
        http_filters:
        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{{- end }}
{{- end -}}

{{- define "gateway-extproc.envoyStatsCluster" -}}
{{- $v := .Values -}}
{{- if ($v.envoy.metrics.port | int) }}
- name: envoy_admin
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: envoy_admin
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {{ include "gateway-extproc.socketAddress" (dict "address" (include "gateway-extproc.adminHost" .) "port" $v.envoy.admin.port) }}
{{- end }}
{{- end -}}
