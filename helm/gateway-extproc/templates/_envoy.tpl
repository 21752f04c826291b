{{/*
envoy.yaml. One cluster per logical model, its backends as endpoints at priorities
(endpoint metadata gw.backend names the backend), per-attempt work in the cluster's
upstream http_filters. See docs/architecture.md for why each piece is where it is.
*/}}
{{/*
Routing targets as JSON: each model once ({route: name, backends}), plus, when
classification is on, one target per tier whose approved backends are a strict subset
({route: "name@tier"}). The ext_proc routes a request to "name@tier" when not every
backend is approved for its tier, so Envoy's fallback never leaves the approved set.
*/}}
{{- define "gateway-extproc.targets" -}}
{{- $v := .Values -}}
{{- $tiers := list -}}
{{- if $v.classification }}{{ $tiers = $v.classification.tiers | default (list "public" "internal" "confidential" "restricted") }}{{ end -}}
{{- $out := list -}}
{{- range $m := $v.models -}}
{{- $out = append $out (dict "route" $m.name "backends" $m.backends) -}}
{{- range $ti, $t := $tiers -}}
{{- $eligible := list -}}
{{- range $b := $m.backends -}}
{{- $bi := 0 -}}
{{- range $j, $x := $tiers }}{{ if eq $x ($b.maxTier | default (last $tiers)) }}{{ $bi = $j }}{{ end }}{{ end -}}
{{- if ge $bi $ti }}{{ $eligible = append $eligible $b }}{{ end -}}
{{- end -}}
{{- if and (gt (len $eligible) 0) (lt (len $eligible) (len $m.backends)) -}}
{{- $out = append $out (dict "route" (printf "%s@%s" $m.name $t) "backends" $eligible) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "gateway-extproc.envoyConfig" -}}
{{- $v := .Values -}}
{{- $bufferLimit := add $v.envoy.maxRequestBytes 1048576 -}}
node:
  id: gateway-extproc
  cluster: gateway-extproc
admin:
  address:
    socket_address: {{ include "gateway-extproc.socketAddress" $v.envoy.admin }}
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: {{ $v.envoy.maxConnections | int64 }}
  {{- with (($v.deployment.envoy.resources | default dict).limits | default dict).memory }}{{ if include "gateway-extproc.bytes" . | int64 }}
  # Envoy buffers every request body (up to envoy.maxRequestBytes) and its copy to the
  # ext_proc: a burst of huge prompts would take it past its container's memory limit and
  # get it OOM-killed. Near the limit (90% of it, as heap) it stops taking new requests
  # (503 gateway_busy) and resets the HTTP/2 streams that hold the most memory.
  - name: envoy.resource_monitors.fixed_heap
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig
      max_heap_size_bytes: {{ mulf (include "gateway-extproc.bytes" .) 0.9 | int64 }}
  refresh_interval: 0.1s
  actions:
  - name: envoy.overload_actions.shrink_heap
    triggers: [{name: envoy.resource_monitors.fixed_heap, threshold: {value: 0.85}}]
  - name: envoy.overload_actions.stop_accepting_requests
    triggers: [{name: envoy.resource_monitors.fixed_heap, threshold: {value: 0.90}}]
  - name: envoy.overload_actions.reset_high_memory_stream
    triggers: [{name: envoy.resource_monitors.fixed_heap, scaled: {scaling_threshold: 0.90, saturation_threshold: 0.98}}]
  buffer_factory_config:
    minimum_account_to_track_power_of_two: 20  # streams holding 1 MiB or more
  {{- end }}{{ end }}
static_resources:
  listeners:
  - name: gateway_http
    address:
      socket_address: {{ include "gateway-extproc.socketAddress" $v.envoy.listener }}
    per_connection_buffer_limit_bytes: {{ $bufferLimit }}
    filter_chains:
    {{- /* identity (docs/identity.md): one chain per trust level of XFCC. Everyone: Envoy
    drops a client-sent XFCC and writes its own from the verified client certificate. Trusted
    proxies (a mesh sidecar terminating mTLS, matched by source address): their XFCC is kept.
    APPEND_FORWARD keeps it only on an mTLS connection (Envoy drops XFCC from any other), so
    on a listener that does not require client certificates (a sidecar connects in plain
    HTTP, as Istio's does from 127.0.0.6) it is ALWAYS_FORWARD_ONLY: else no mesh caller
    ever had a workload identity. */}}
    {{- $ident := $v.identity | default dict }}
    {{- $chains := list (dict "name" "direct" "xfcc" "SANITIZE_SET") }}
    {{- with (($ident.workloads | default dict).trustedProxies) }}
    {{- $mtls := and $v.envoy.tls.enabled $v.envoy.tls.clientCA.enabled }}
    {{- $chains = append $chains (dict "name" "trusted_proxy" "xfcc" (ternary "APPEND_FORWARD" "ALWAYS_FORWARD_ONLY" $mtls) "sources" .) }}
    {{- end }}
    {{- range $chain := $chains }}
    - name: {{ $chain.name }}
      {{- with $chain.sources }}
      filter_chain_match:
        source_prefix_ranges:
        {{- range $cidr := . }}
        - {address_prefix: {{ index (splitList "/" $cidr) 0 | quote }}, prefix_len: {{ index (splitList "/" $cidr) 1 }}}
        {{- end }}
      {{- end }}
      {{- if $v.envoy.tls.enabled }}
      # A connection that never finishes its TLS handshake is closed after 10 s; it was held
      # for the idle timeout (1 h), and enough of them fill envoy.maxConnections.
      transport_socket_connect_timeout: 10s
      transport_socket:
        {{- include "gateway-extproc.downstreamTls" $ | nindent 8 }}
      {{- end }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          {{- with include "gateway-extproc.envoyTracing" $ }}{{ . | trim | nindent 10 }}{{ end }}
          use_remote_address: true
          forward_client_cert_details: {{ $chain.xfcc }}
          # The certificate itself too: the ext_proc reads its SANs exactly (URI and DNS values are
          # written unquoted, where a SAN holding `;DNS=` would read as two).
          set_current_client_cert_details: {uri: true, dns: true, cert: true}
          always_set_request_id_in_response: true
          # A caller's `tracestate` is free text (a key may be put there): removed before
          # Envoy's tracer reads it (it would be copied into every span's trace state and into
          # the provider's request). Early mutations run before routing, tracing and filters.
          early_header_mutation_extensions:
          - name: envoy.http.early_header_mutation.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation
              mutations:
              - remove: tracestate
          # A client has this long to send its whole request (a body trickled byte by byte
          # would else hold its stream for ever); disarmed once the request went upstream,
          # so long replies are bounded by the route timeout alone.
          request_timeout: {{ $v.envoy.upstreamTimeout }}
          # The headers alone must arrive within 10 s of their first byte (Envoy's edge-proxy
          # advice): a client trickling them held its stream for the whole request_timeout.
          request_headers_timeout: 10s
          stream_idle_timeout: {{ $v.envoy.upstreamTimeout }}
          # As Envoy's edge-proxy guide advises: one HTTP/2 connection may not open unbounded
          # streams (Envoy's own default is 2^31-1). (The guide's smaller flow-control windows
          # are left out: with them Envoy 1.40 sent a client that stopped reading a second
          # HEADERS frame without END_STREAM, which RFC 9113 forbids.)
          # A malformed HTTP/2 request (a `connection` or `transfer-encoding` header, an
          # upper-case name, CR/LF in a value) resets its own stream: by default Envoy closes
          # the whole connection, cutting off every other caller's answer on it (a proxy in
          # front multiplexes many callers on one connection).
          http2_protocol_options:
            max_concurrent_streams: 100
            override_stream_error_on_invalid_http_message: true
          # Envoy's own error replies, in the OpenAI error shape with a code from
          # docs/runbooks.md (first match wins). The ext_proc's replies (code details gw_*)
          # keep their bodies. x-gateway-error-code tells the ext_proc's access line the
          # code; the access log below records these replies even when the ext_proc is down.
          # Any other 400 of Envoy's is a request it could not take (a `#fragment` in the path,
          # no Host, a Host with a space: path_normalization_failed, missing_host_header,
          # http.invalid_authority), before any filter: malformed_http, never an empty body.
          local_reply_config:
            mappers:
            - filter:
                extension_filter:
                  name: envoy.access_loggers.extension_filters.cel
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter
                    expression: "response.code_details == 'direct_response' && 'x-gateway-refusal' in request.headers"
              body_format_override:
                text_format_source: {inline_string: "%REQ(X-GATEWAY-REFUSAL)%"}
                content_type: application/json
            {{- $d := "response.code_details" }}
            {{- $reset := printf "%s.startsWith('upstream_reset_before_response_started')" $d }}
            {{- $codec := printf "%s.startsWith('http1.') || %s.startsWith('http2.')" $d $d }}
            {{- range $m := list
                (list (printf "%s == 'overload'" $d) 503 "gateway_busy" "server_error" "The gateway is near its memory limit; retry shortly.")
                (list (printf "(%s) && response.code == 431" $codec) 431 "request_headers_too_large" "invalid_request_error" "The request's headers are larger than the gateway accepts (60 KiB, 100 lines).")
                (list $codec 400 "malformed_http" "invalid_request_error" "The request is not valid HTTP: %RESPONSE_CODE_DETAILS%")
                (list (printf "%s == 'low_version'" $d) 426 "malformed_http" "invalid_request_error" "HTTP/1.0 is not supported: use HTTP/1.1 or HTTP/2.")
                (list (printf "%s.startsWith('jwt_authn_access_denied')" $d) 401 "invalid_token" "authentication_error" "The bearer token was rejected: %RESPONSE_CODE_DETAILS%")
                (list (printf "response.code == 404 && %s == 'direct_response' && 'x-gateway-model' in request.headers" $d) 503 "model_not_deployed" "server_error" "Model '%REQ(X-GATEWAY-MODEL)%' is in gateway.yaml but not in Envoy's configuration yet: the operator must re-render envoy.yaml and restart Envoy.")
                (list (printf "%s && %s.contains('overflow')" $reset $d) 503 "upstream_overloaded" "server_error" "Too many requests are in flight to this model's providers; retry shortly.")
                (list (printf "%s && %s.contains('connection_failure')" $reset $d) 503 "upstream_unavailable" "server_error" "No provider backend is available for this model right now.")
                (list $reset 502 "upstream_reset" "server_error" "The provider closed the connection before answering.")
                (list (printf "%s.startsWith('upstream_reset_after_response_started')" $d) 502 "upstream_reset" "server_error" "The provider's connection broke off while it was answering, before any of the answer reached you; the provider may have processed (and billed) the request.")
                (list (printf "%s == 'response_payload_too_large'" $d) 502 "upstream_response_too_large" "server_error" "The provider's response is larger than the gateway can process; the provider did process (and bill) the request.")
                (list (printf "%s == 'request_payload_too_large' || response.code == 413" $d) 413 "request_too_large" "invalid_request_error" "Request body exceeds the gateway limit.")
                (list (printf "%s.startsWith('ext_proc') || response.code == 500" $d) 503 "gateway_unavailable" "server_error" "The gateway's policy service is unavailable; retry shortly (if it failed while a provider worked on the request, the provider may have processed it).")
                (list "response.code == 503" 503 "upstream_unavailable" "server_error" "No provider backend is available for this model right now.")
                (list "response.code == 408" 408 "request_timeout" "invalid_request_error" "The request was not received in time: the client stopped sending before its request was complete (%RESPONSE_CODE_DETAILS%).")
                (list (printf "%s == 'upgrade_failed'" $d) 400 "upgrade_not_supported" "invalid_request_error" "The gateway does not accept protocol upgrades (WebSocket): send plain HTTP/1.1 or HTTP/2 requests.")
                (list "response.code == 400" 400 "malformed_http" "invalid_request_error" "The request is not valid HTTP: %RESPONSE_CODE_DETAILS%")
                (list (printf "response.code == 504 || %s.contains('timeout')" $d) 504 "upstream_timeout" "server_error" "The provider did not answer in time.")
                (list "response.code == 404" 404 "unknown_endpoint" "not_found_error" "Unknown endpoint.") }}
            - filter:
                extension_filter:
                  name: envoy.access_loggers.extension_filters.cel
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter
                    expression: {{ printf "!%s.startsWith('gw_') && (%s)" $d (index $m 0) | quote }}
              status_code: {{ index $m 1 }}
              headers_to_add:
              - header: {key: x-gateway-error-code, value: {{ index $m 2 }}}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              {{- if eq (index $m 2) "invalid_token" }}
              # jwt_authn's own challenge quotes the URL as sent (`realm="http://<Host><path>?<query>"`):
              # caller text, a key in the query string (`?key=`) included, echoed back unbounded.
              - header: {key: www-authenticate, value: 'Bearer error="invalid_token"'}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              {{- end }}
              body_format_override:
                json_format:
                  error: {message: {{ index $m 4 | quote }}, type: {{ index $m 3 }}, code: {{ index $m 2 }}, param: null}
            {{- end }}
          # One JSON line per reply Envoy makes itself (not the ext_proc's, a refusal route's
          # included, nor a provider's): the outcome and code of errors the ext_proc may never
          # see (it may be down).
          access_log:
          - name: envoy.access_loggers.stdout
            filter:
              extension_filter:
                name: envoy.access_loggers.extension_filters.cel
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter
                  expression: "response.code >= 400 && response.code_details != 'via_upstream' && !response.code_details.startsWith('gw_') && !(response.code_details == 'direct_response' && 'x-gateway-refusal' in request.headers)"
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                json_format:
                  event: envoy_error
                  outcome: error
                  request_id: {{ include "gateway-extproc.loggedRequestId" $ | quote }}
                  start_time: "%START_TIME%"
                  method: {{ include "gateway-extproc.loggedMethod" $ | quote }}
                  path: {{ include "gateway-extproc.loggedPath" $ | quote }}
                  status: "%RESPONSE_CODE%"
                  error_code: "%RESP(X-GATEWAY-ERROR-CODE)%"
                  details: "%RESPONSE_CODE_DETAILS%"
                  flags: "%RESPONSE_FLAGS%"
                  failure: "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
                  backend: "%UPSTREAM_METADATA(gw:backend)%"
                  attempts: "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"
                  duration_ms: "%DURATION%"
                formatters:
                - name: envoy.formatter.cel
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.formatter.cel.v3.Cel
          route_config:
            name: models
            virtual_hosts:
            - name: gateway
              domains: ["*"]
              # x-envoy-attempt-count on responses; the ext_proc renames it x-gateway-attempts.
              include_attempt_count_in_response: true
              # The buffer filter waits for a whole body on the refusal routes alone.
              typed_per_filter_config:
                envoy.filters.http.buffer:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute
                  disabled: true
              routes:
              # A refusal the ext_proc decided at the request headers of a client that is still
              # sending its body (processors/responses.py `refusal_after_body`). Sent at once,
              # an HTTP/1 connection was closed with the body unread (envoyproxy/envoy#13781) and
              # an HTTP/2 stream reset, and clients that write their whole body before they read
              # (httpx, the SDKs) saw the break, not the refusal. Here the body is read to its
              # end (never sent to the ext_proc), then the refusal goes out, its body the
              # ext_proc's own (the first local-reply mapper).
              {{- range $status := list 415 503 }}
              - match:
                  prefix: /
                  headers:
                  - name: x-gateway-refusal-status
                    string_match: {exact: {{ $status | quote }}}
                direct_response: {status: {{ $status }}}
                response_headers_to_add:
                - header: {key: retry-after, value: "%REQ(X-GATEWAY-REFUSAL-RETRY-AFTER)%"}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                typed_per_filter_config:
                  envoy.filters.http.buffer:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute
                    buffer: {max_request_bytes: {{ $v.envoy.maxRequestBytes }}}
              {{- end }}
              {{- range $model := fromJsonArray (include "gateway-extproc.targets" $) }}
              - match:
                  prefix: /
                  headers:
                  - name: x-gateway-model
                    string_match: {exact: {{ $model.route | quote }}}
                # The route header is the gateway's own; providers never see it.
                request_headers_to_remove: [x-gateway-model]
                # What a provider says about the account that called it (the gateway's: its
                # rate limits, shared by every team, too) and the cookies it sets for that
                # account: never the caller's to see. (Removed before the ext_proc adds the
                # gateway's own `x-ratelimit-*-tokens`.)
                response_headers_to_remove: [set-cookie, openai-organization, openai-project,
                                             anthropic-organization-id,
                                             x-ratelimit-limit-requests, x-ratelimit-remaining-requests,
                                             x-ratelimit-reset-requests, x-ratelimit-limit-tokens,
                                             x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens,
                                             anthropic-ratelimit-requests-limit, anthropic-ratelimit-requests-remaining, anthropic-ratelimit-requests-reset,
                                             anthropic-ratelimit-tokens-limit, anthropic-ratelimit-tokens-remaining, anthropic-ratelimit-tokens-reset,
                                             anthropic-ratelimit-input-tokens-limit, anthropic-ratelimit-input-tokens-remaining, anthropic-ratelimit-input-tokens-reset,
                                             anthropic-ratelimit-output-tokens-limit, anthropic-ratelimit-output-tokens-remaining, anthropic-ratelimit-output-tokens-reset,
                                             anthropic-priority-input-tokens-limit, anthropic-priority-input-tokens-remaining, anthropic-priority-input-tokens-reset,
                                             anthropic-priority-output-tokens-limit, anthropic-priority-output-tokens-remaining, anthropic-priority-output-tokens-reset]
                # Providers answer uncompressed: the gateway reads every answer (usage, output
                # scanning, translation). A compressed one anyway is refused (provider_error).
                request_headers_to_add:
                - header: {key: accept-encoding, value: identity}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                route:
                  cluster: {{ printf "model.%s" $model.route | quote }}
                  timeout: {{ $v.envoy.upstreamTimeout }}
                  auto_host_rewrite: true
                  {{- if gt (len $model.backends) 1 }}
                  retry_policy:
                    retry_on: {{ nospace $v.envoy.retry.retryOn }}
                    retriable_status_codes: {{ toJson $v.envoy.retry.retriableStatusCodes }}
                    num_retries: {{ sub (len $model.backends) 1 }}
                    {{- with $v.envoy.retry.perTryTimeout }}
                    per_try_timeout: {{ . }}
                    {{- end }}
                    {{- with $v.envoy.retry.perTryIdleTimeout }}
                    per_try_idle_timeout: {{ . }}
                    {{- end }}
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
                  {{- end }}
              {{- end }}
              - match: {prefix: /}
                direct_response: {status: 404}
          http_filters:
          {{- $oidc := ($ident.oidc | default dict).providers }}
          {{- if $oidc }}
          {{- include "gateway-extproc.jwtAuthn" $oidc | nindent 10 }}
          {{- end }}
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {cluster_name: gateway_extproc}
                timeout: {{ $v.extproc.messageTimeout }}
                {{- include "gateway-extproc.extprocRetry" . | nindent 16 }}
              failure_mode_allow: false
              message_timeout: {{ $v.extproc.messageTimeout }}
              # A large request body gets 20 s (processors/responses.py LARGE_BODY_TIME).
              max_message_timeout: {{ max 20 (trimSuffix "s" $v.extproc.messageTimeout | float64 | ceil) }}s
              # The response is processed only when the request headers were: their answer
              # turns response processing on (mode_override, processors/responses.py). Envoy's
              # own replies to requests it could not parse (HTTP/1 codec errors) would else wait
              # for an ext_proc answer while Envoy closes the connection: the client got no reply.
              processing_mode:
                request_header_mode: SEND
                request_body_mode: BUFFERED
                response_header_mode: SKIP
                response_body_mode: NONE
                request_trailer_mode: SKIP
                response_trailer_mode: SKIP
              allow_mode_override: true
              # lets the ext_proc replace x-envoy-attempt-count with x-gateway-attempts
              mutation_rules: {allow_envoy: true}
              metadata_options:
                receiving_namespaces: {untyped: [gw]}
                {{- if $oidc }}
                # the claims jwt_authn verified (payload_in_metadata), never a header
                forwarding_namespaces: {untyped: [envoy.filters.http.jwt_authn]}
                {{- end }}
          # Holds a body refused at its headers until it is all in (the refusal routes only).
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: {{ $v.envoy.maxRequestBytes }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              # No x-envoy-* request headers from the router: above all x-envoy-original-host,
              # Envoy's copy of the client's Host, which auto_host_rewrite adds when the
              # connection is ready, after every upstream filter has run (so the clusters'
              # header_mutation cannot remove it). The Host is caller text the scanner never
              # reads (a pseudo-header); it reached every provider. (x-envoy-attempt-count in
              # responses stays: include_attempt_count_in_response.)
              suppress_envoy_headers: true
              # One JSON line per upstream attempt (retries and fallbacks included), joined to
              # the ext_proc's access line by request_id: which backend, what it answered.
              upstream_log:
              - name: envoy.access_loggers.stdout
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                  log_format:
                    json_format:
                      event: upstream_attempt
                      request_id: "%REQ(X-REQUEST-ID)%"
                      start_time: "%START_TIME%"
                      backend: "%UPSTREAM_METADATA(gw:backend)%"
                      status: "%RESPONSE_CODE%"
                      flags: "%RESPONSE_FLAGS%"
                      failure: "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
                      upstream_host: "%UPSTREAM_HOST%"
                      duration_ms: "%DURATION%"
    {{- end }}
  {{- with include "gateway-extproc.envoyStatsListener" $ }}{{ . | trim | nindent 2 }}{{ end }}
  clusters:
  {{- with include "gateway-extproc.envoyStatsCluster" $ }}{{ . | trim | nindent 2 }}{{ end }}
  {{- with include "gateway-extproc.envoyTracingCluster" $ }}{{ . | trim | nindent 2 }}{{ end }}
  {{- with include "gateway-extproc.jwksClusters" $ }}{{ . | trim | nindent 2 }}{{ end }}
  # Envoy 1.40 segfaults when this connection's buffered data goes over its high watermark
  # while an ext_proc runs as an upstream (cluster) filter anywhere on the same worker
  # (docs/architecture.md, "Why Envoy never pushes back on the ext_proc connection"), so its
  # limit is the largest Envoy takes. Each stream's own body limits still bound what Envoy holds.
  - name: gateway_extproc
    type: STATIC
    connect_timeout: 1s
    per_connection_buffer_limit_bytes: 4294967295
    # Every client request holds one ext_proc stream for its whole life, two while an upstream
    # attempt runs: Envoy's default of 1024 streams in flight would fail requests (503
    # gateway_unavailable) far below the connections the listener admits.
    # Retries (gateway-extproc.extprocRetry) too: at Envoy's default of 3 in flight, the burst
    # of new streams that meets a just-killed worker overflowed it and failed anyway.
    circuit_breakers:
      thresholds:
      - max_requests: {{ mul 2 ($v.envoy.maxConnections | int64) }}
        max_pending_requests: {{ mul 2 ($v.envoy.maxConnections | int64) }}
        max_retries: {{ mul 2 ($v.envoy.maxConnections | int64) }}
    # Streams go to healthy workers whenever one is. Envoy's default panic threshold (50 %)
    # spread them over all workers, frozen and dead ones included, as soon as half of them
    # were out (two of three killed: 315 of 499 requests failed over the 4 s until both were
    # back); only with none healthy is trying every worker better (1 %: Envoy rounds the
    # percentage to an integer, and 0.01 became 0, no panic at all, so with every worker out
    # of rotation, e.g. busy past a check with huge bodies, every request failed 503).
    # A health change reaches the balancers at once: Envoy's default update_merge_window (1 s)
    # held back every change after the first within a second, so a second frozen or dead
    # worker, or a restarted one, stayed in (or out of) rotation a second longer.
    common_lb_config:
      healthy_panic_threshold: {value: 1}
      update_merge_window: 0s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    # A worker that died (serve restarts it in ~1-4 s) or froze leaves rotation at the next
    # check. ext_proc streams do not count as traffic for health checking, so
    # no_traffic_interval is the interval that applies. With a request's two streams on two
    # workers, every new request meets an undetected frozen worker (two workers): the
    # requests of its first 1-1.5 s fail. A 0.25 s timeout halved that but took busy workers
    # out of rotation (64 prompts of 9 MB at once: small requests failed 503), so 1 s it is.
    # One check a busy worker misses only moves new streams to the others until its next
    # check: no stream is cut.
    health_checks:
    - timeout: 1s
      interval: 0.5s
      unhealthy_threshold: 1
      healthy_threshold: 1
      no_traffic_interval: 0.5s
      grpc_health_check: {}
    load_assignment:
      cluster_name: gateway_extproc
      endpoints:
      - lb_endpoints:
        {{- range $i := until (int $v.extproc.processes) }}
        - endpoint:
            address:
              pipe: {path: {{ include "gateway-extproc.socket" (dict "dir" $v.extproc.socketDir "i" $i) | quote }}}
        {{- end }}
  {{- range $model := fromJsonArray (include "gateway-extproc.targets" $) }}
  {{- $multi := gt (len $model.backends) 1 }}
  {{- $first := fromJson (include "gateway-extproc.provider" (dict "root" $ "name" (index $model.backends 0).provider)) }}
  {{- $native := and (not $multi) (eq $first.kind "openai") (hasKey $first.credential "env") }}
  - name: {{ printf "model.%s" $model.route | quote }}
    type: STRICT_DNS
    dns_lookup_family: V4_PREFERRED
    connect_timeout: 5s
    per_connection_buffer_limit_bytes: {{ $bufferLimit }}
    {{- with $v.envoy.circuitBreakers }}
    circuit_breakers:
      thresholds:
      - max_requests: {{ .maxRequests | int64 }}
        max_pending_requests: {{ .maxPendingRequests | int64 }}
        max_connections: {{ .maxConnections | int64 }}
        max_retries: {{ .maxRetries | int64 }}
    {{- end }}
    {{- if $multi }}
    # A backend failing repeatedly is skipped for a while instead of paying its timeout.
    outlier_detection:
      consecutive_5xx: {{ $v.envoy.outlierDetection.consecutive5xx }}
      consecutive_gateway_failure: {{ $v.envoy.outlierDetection.consecutive5xx }}
      interval: {{ $v.envoy.outlierDetection.interval }}
      base_ejection_time: {{ $v.envoy.outlierDetection.baseEjectionTime }}
      max_ejection_percent: {{ $v.envoy.outlierDetection.maxEjectionPercent }}
    {{- end }}
    load_assignment:
      cluster_name: {{ printf "model.%s" $model.route | quote }}
      endpoints:
      {{- range $b := $model.backends }}
      {{- $p := fromJson (include "gateway-extproc.provider" (dict "root" $ "name" $b.provider)) }}
      {{- $u := urlParse $p.baseURL }}
      {{- $tls := eq $u.scheme "https" }}
      {{- $hostParts := splitList ":" $u.host }}
      {{- $port := ternary 443 80 $tls }}
      {{- if gt (len $hostParts) 1 }}{{ $port = index $hostParts 1 | int }}{{ end }}
      - priority: {{ $b.priority | default 0 }}
        lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: {{ index $hostParts 0 | quote }}, port_value: {{ $port }}}
            hostname: {{ $u.host | quote }}
          load_balancing_weight: {{ $b.weight | default 1 }}
          metadata:
            filter_metadata:
              gw: {backend: {{ printf "%s/%s" $b.provider $b.model | quote }}}
              envoy.transport_socket_match: {tls: {{ $tls }}}
      {{- end }}
    transport_socket_matches:
    - name: tls
      match: {tls: true}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            validation_context:
              trusted_ca: {filename: {{ ternary (printf "%s/%s" $v.envoy.upstreamCA.dir $v.envoy.upstreamCA.key) "/etc/ssl/certs/ca-certificates.crt" (ne $v.envoy.upstreamCA.dir "") | quote }}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http_protocol_options: {}}
        upstream_http_protocol_options: {auto_sni: true, auto_san_validation: true}
        http_filters:
        - name: envoy.filters.http.header_mutation
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              request_mutations:
              {{- if $native }}
              - append:
                  header: {key: authorization, value: {{ printf "Bearer %%ENVIRONMENT(%s)%%" $first.credential.env | quote }}}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
              {{- end }}
              # Envoy's copy of the client's Host when it rewrites the host for the provider:
              # caller text no provider needs (docs/classification.md, "Request headers").
              # Not enough alone: the rewrite adds it after this filter ran; the router's
              # suppress_envoy_headers is what keeps it out.
              - remove: x-envoy-original-host
              response_mutations:
              - append:
                  header: {key: x-gateway-backend, value: "%UPSTREAM_METADATA(gw:backend)%"}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
              # The gateway's own response headers come from Envoy and the ext_proc only: a
              # provider's x-gateway-error-code would pass its answer off as Envoy's own reply.
              {{- range list "x-gateway-error-code" "x-gateway-attempts" "x-gateway-prompt-tokens" "x-gateway-completion-tokens" "x-gateway-max-tokens-clamped" "x-gateway-budget-remaining-usd" "x-gateway-budget-warning" }}
              - remove: {{ . }}
              {{- end }}
        {{- if not $native }}
        - name: envoy.filters.http.ext_proc
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
            grpc_service:
              envoy_grpc: {cluster_name: gateway_extproc}
              timeout: {{ $v.extproc.messageTimeout }}
              {{- include "gateway-extproc.extprocRetry" . | nindent 14 }}
            failure_mode_allow: false
            message_timeout: {{ $v.extproc.messageTimeout }}
            # Request headers and body: this attempt's request. Response headers: its status
            # (metrics). Never a response body, and no mode override (answers are translated
            # by the router-level filter: docs/architecture.md).
            processing_mode:
              request_header_mode: SEND
              request_body_mode: BUFFERED
              response_header_mode: SEND
              response_body_mode: NONE
              request_trailer_mode: SKIP
              response_trailer_mode: SKIP
            request_attributes:
            - "xds.upstream_host_metadata.filter_metadata['gw']['backend']"
            metadata_options:
              forwarding_namespaces: {untyped: [gw]}
        {{- end }}
        - name: envoy.filters.http.upstream_codec
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec
  {{- end }}
{{- end -}}


{{/*
TLS on the client listener (envoy.tls). Certificate, key and client CA come through SDS
files (rendered next to envoy.yaml in configDir) that name files in directories Envoy
watches: a Kubernetes Secret update (atomic symlink swap) or a file moved into place is
picked up without a restart. clientCA.enabled turns it into mTLS.
*/}}
{{- define "gateway-extproc.downstreamTls" -}}
{{- $tls := .Values.envoy.tls -}}
name: envoy.transport_sockets.tls
typed_config:
  "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
  {{- if $tls.clientCA.enabled }}
  require_client_certificate: true
  {{- end }}
  common_tls_context:
    alpn_protocols: [h2, http/1.1]
    tls_certificate_sds_secret_configs:
    - name: listener_certificate
      sds_config:
        path_config_source: {path: {{ printf "%s/sds-certificate.yaml" .Values.configDir | quote }}}
        resource_api_version: V3
    {{- if $tls.clientCA.enabled }}
    {{- $sans := include "gateway-extproc.clientSanMatchers" . }}
    {{- if $sans }}
    # identity.workloads.trustDomains: Envoy refuses client certificates outside them.
    combined_validation_context:
      default_validation_context:
        match_typed_subject_alt_names:
        {{- $sans | trim | nindent 8 }}
      validation_context_sds_secret_config:
        name: client_ca
        sds_config:
          path_config_source: {path: {{ printf "%s/sds-client-ca.yaml" .Values.configDir | quote }}}
          resource_api_version: V3
    {{- else }}
    validation_context_sds_secret_config:
      name: client_ca
      sds_config:
        path_config_source: {path: {{ printf "%s/sds-client-ca.yaml" .Values.configDir | quote }}}
        resource_api_version: V3
    {{- end }}
    {{- end }}
{{- end -}}

{{/*
identity (docs/identity.md). Client certificate SANs Envoy accepts when
identity.workloads.trustDomains is set: a URI SAN in one of those SPIFFE trust domains, or a
DNS SAN some principal's dns pattern names. Empty when no trust domain is configured.
*/}}
{{- define "gateway-extproc.clientSanMatchers" -}}
{{- $wl := ((.Values.identity | default dict).workloads | default dict) -}}
{{- if $wl.trustDomains -}}
{{- range $td := $wl.trustDomains }}
- san_type: URI
  matcher: {prefix: {{ printf "spiffe://%s/" $td | quote }}}
{{- end }}
{{- range $p := $wl.principals | default list }}
{{- with $p.dns }}
- san_type: DNS
  matcher: {{ if hasPrefix "*." . }}{suffix: {{ trimPrefix "*" . | quote }}}{{ else }}{exact: {{ . | quote }}}{{ end }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
identity: Envoy's jwt_authn for identity.oidc.providers. Each provider's verified payload
goes to dynamic metadata under its name (the router ext_proc receives that namespace); the
token header is removed once verified. A gateway key in Authorization skips verification;
any other bearer token must verify against some provider; no token at all is allowed (the
ext_proc then needs a key or a workload identity).
*/}}
{{- define "gateway-extproc.jwtAuthn" -}}
- name: envoy.filters.http.jwt_authn
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
    providers:
      {{- range $p := . }}
      {{ $p.name }}:
        issuer: {{ $p.issuer | quote }}
        {{- with $p.audiences }}
        audiences: {{ toJson . }}
        {{- end }}
        forward: false
        payload_in_metadata: {{ $p.name }}
        # The scheme in every case (`bearer`, `BEARER`...: RFC 9110 11.1, auth schemes are
        # case-insensitive): jwt_authn matches a prefix case-sensitively, and `bearer <JWT>` was
        # no token to it (allow_missing), so the ext_proc read the JWT as a key (invalid_api_key).
        from_headers: {{ include "gateway-extproc.bearerPrefixes" . }}
        clock_skew_seconds: {{ $p.clockSkewSeconds | default 60 }}
        # A token without `exp` would be valid forever: refused (jwt_authn accepts it by default).
        require_expiration: true
        {{- if $p.jwks.remote }}
        remote_jwks:
          http_uri:
            uri: {{ $p.jwks.remote.url | quote }}
            cluster: {{ printf "jwks.%s" $p.name | quote }}
            timeout: {{ $p.jwks.remote.timeout | default "5s" }}
          cache_duration: {{ $p.jwks.remote.cacheDuration | default "600s" }}
          async_fetch: {}
        {{- else if $p.jwks.file }}
        local_jwks: {filename: {{ $p.jwks.file | quote }}}
        {{- else }}
        local_jwks: {inline_string: {{ $p.jwks.inline | quote }}}
        {{- end }}
      {{- end }}
    rules:
    # A gateway key in every form the ext_proc reads as one (identity.presented_key: the scheme
    # in any case, then spaces): a prefix "Bearer gwk_" sent `bearer` or `Bearer  gwk_...` to be
    # verified as a JWT, so a key that works without OIDC was 401 invalid_token with it.
    - match:
        prefix: /
        headers: [{name: authorization, string_match: {safe_regex: {regex: '(?i)bearer [ \t]*gwk_.*'}}}]
    - match: {prefix: /}
      requires:
        requires_any:
          requirements:
          {{- range $p := . }}
          - provider_name: {{ $p.name }}
          {{- end }}
          - allow_missing: {}
{{- end -}}

{{/*
identity: jwt_authn's token locations, `Authorization: <scheme> <JWT>` with the scheme in each
of its 64 spellings (upper or lower case per letter), `Bearer ` first. jwt_authn finds a
`value_prefix` anywhere in the value, case-sensitively; a JWT holds no space, so exactly one of
these matches a `<scheme> <JWT>` value (a value holding two is two tokens, each verified).
Normalising the scheme in a filter before jwt_authn was the alternative: Envoy has none that
rewrites part of a header value (header_mutation sets whole values; Lua is not in the stack).
*/}}
{{- define "gateway-extproc.bearerPrefixes" -}}
{{- $out := list -}}
{{- range $i := until 64 -}}
{{- $scheme := "" -}}
{{- range $j, $c := list "b" "e" "a" "r" "e" "r" -}}
{{- /* bit j of i flips letter j of "Bearer" (i = 0) to the other case */ -}}
{{- if eq (mod (div $i (index (list 1 2 4 8 16 32) $j)) 2) (ternary 0 1 (eq $j 0)) -}}
{{- $scheme = print $scheme (upper $c) -}}
{{- else -}}
{{- $scheme = print $scheme $c -}}
{{- end -}}
{{- end -}}
{{- $out = append $out (dict "name" "authorization" "value_prefix" (print $scheme " ")) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* identity: one cluster per remote JWKS (identity.oidc.providers[].jwks.remote). */}}
{{- define "gateway-extproc.jwksClusters" -}}
{{- $v := .Values -}}
{{- range $p := ((($v.identity | default dict).oidc | default dict).providers | default list) }}
{{- with $p.jwks.remote }}
{{- $u := urlParse .url }}
{{- $tls := eq $u.scheme "https" }}
{{- $hostParts := splitList ":" $u.host }}
{{- $port := ternary 443 80 $tls }}
{{- if gt (len $hostParts) 1 }}{{ $port = index $hostParts 1 | int }}{{ end }}
- name: {{ printf "jwks.%s" $p.name | quote }}
  type: STRICT_DNS
  dns_lookup_family: V4_PREFERRED
  connect_timeout: 5s
  load_assignment:
    cluster_name: {{ printf "jwks.%s" $p.name | quote }}
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {address: {{ index $hostParts 0 | quote }}, port_value: {{ $port }}}
  {{- if $tls }}
  transport_socket:
    name: envoy.transport_sockets.tls
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
      sni: {{ index $hostParts 0 | quote }}
      common_tls_context:
        validation_context:
          trusted_ca: {filename: {{ ternary (printf "%s/%s" $v.envoy.upstreamCA.dir $v.envoy.upstreamCA.key) "/etc/ssl/certs/ca-certificates.crt" (ne $v.envoy.upstreamCA.dir "") | quote }}}
          match_typed_subject_alt_names: [{san_type: DNS, matcher: {exact: {{ index $hostParts 0 | quote }}}}]
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* SDS file of the listener certificate: paths only, never key material. */}}
{{- define "gateway-extproc.sdsCertificate" -}}
{{- $c := .Values.envoy.tls.certificate -}}
resources:
- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: listener_certificate
  tls_certificate:
    certificate_chain: {filename: {{ printf "%s/tls.crt" $c.dir | quote }}}
    private_key: {filename: {{ printf "%s/tls.key" $c.dir | quote }}}
    watched_directory: {path: {{ $c.dir | quote }}}
{{- end -}}

{{/* SDS file of the CA bundle client certificates must chain to (mTLS). */}}
{{- define "gateway-extproc.sdsClientCA" -}}
{{- $c := .Values.envoy.tls.clientCA -}}
resources:
- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: client_ca
  validation_context:
    trusted_ca: {filename: {{ printf "%s/%s" $c.dir $c.key | quote }}}
    watched_directory: {path: {{ $c.dir | quote }}}
{{- end -}}


{{/*
Retry policy of the ext_proc gRPC streams (both filters). Each client request opens two
streams (router and attempt) and Envoy balances each on its own, so with round robin over
two workers every request holds one stream on each: a dead worker's socket failed every
new request, not half, until the health check noticed (measured: all requests in the first
0.2-0.5 s after a SIGKILL). A stream that could not connect (the socket's process is gone),
was reset before it went out, or that the worker refused never reached a processor, so it
goes again to another worker (previous_hosts) at once. Never on a reset after the worker has
the stream: it may have reserved budget or be mid-answer, and a replay would charge twice.
*/}}
{{- define "gateway-extproc.extprocRetry" -}}
retry_policy:
  retry_on: reset-before-request,connect-failure,refused-stream
  num_retries: 2
  retry_back_off: {base_interval: 0.005s, max_interval: 0.05s}
  retry_host_predicate:
  - name: envoy.retry_host_predicates.previous_hosts
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
  host_selection_retry_max_attempts: 3
{{- end -}}
