{{/*
Helpers for the Kubernetes objects (Deployment and neighbours). envoy.yaml and gateway.yaml
come from _envoy.tpl and _gateway.tpl; nothing here changes them.
*/}}

{{- define "gateway-extproc.selectorLabels" -}}
{{ include "gateway-extproc.componentSelector" (dict "root" . "component" "gateway") }}
{{- end -}}

{{/* Labels of the gateway's objects: the standard ones plus the component. */}}
{{- define "gateway-extproc.gatewayLabels" -}}
{{ include "gateway-extproc.labels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "gateway-extproc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "gateway-extproc.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "gateway-extproc.redisDevName" -}}
{{- printf "%s-redis" (include "gateway-extproc.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "true" when any budget or rate limit is configured (config.py: Budgets.enabled). */}}
{{- define "gateway-extproc.budgetsEnabled" -}}
{{- $on := false -}}
{{- if not (kindIs "invalid" .Values.budgets.orgLimit) }}{{ $on = true }}{{ end -}}
{{- range $p := concat (.Values.teams | default list) (.Values.users | default list) (.Values.keys | default list) (dig "workloads" "principals" list (.Values.identity | default dict)) -}}
{{- if or (not (kindIs "invalid" $p.budget)) (not (kindIs "invalid" $p.rateLimits)) }}{{ $on = true }}{{ end -}}
{{- end -}}
{{- if $on }}true{{ end -}}
{{- end -}}

{{/* Most replicas the Deployment can run. */}}
{{- define "gateway-extproc.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.maxReplicas | int }}{{ else }}{{ .Values.deployment.replicas | int }}{{ end -}}
{{- end -}}

{{/*
Rules the schema cannot express, checked when deployment.yaml renders; each failure says
what to change. They run for every render, `gateway-extproc render` and the local stack
included, so only rules that hold outside Kubernetes too belong here (Kubernetes-only
advice goes to NOTES.txt).
*/}}
{{- define "gateway-extproc.validate" -}}
{{- $v := .Values -}}
{{- $max := include "gateway-extproc.maxReplicas" . | int -}}
{{- if and (eq $v.budgets.store "memory") (not $v.budgets.devMemoryStore) (include "gateway-extproc.budgetsEnabled" .) -}}
{{- fail "values: budgets.store is memory, which forgets recorded spend and rate limits on every restart and rollout, so budgets would reset. Set budgets.store: redis with budgets.redis.url (redis.dev.enabled for a trial), or budgets.devMemoryStore: true to accept that (development only)" -}}
{{- end -}}
{{- if and (gt $max 1) (eq $v.budgets.store "memory") (include "gateway-extproc.budgetsEnabled" .) -}}
{{- fail (printf "values: budgets.store is memory but up to %d replicas run (deployment.replicas / autoscaling.maxReplicas): each replica would count its own spend and rate limits, so every budget would be multiplied. Set budgets.store: redis with budgets.redis.url (redis.dev.enabled for a trial), or run one replica without autoscaling" $max) -}}
{{- end -}}
{{- $fallback := false -}}
{{- range $m := $v.models }}{{ if gt (len ($m.backends | default list)) 1 }}{{ $fallback = true }}{{ end }}{{ end -}}
{{- if and $fallback (include "gateway-extproc.budgetsEnabled" .) -}}
{{- $r := $v.envoy.retry -}}
{{- $abandons := list -}}
{{- range $on := splitList "," (nospace $r.retryOn) -}}
{{- if has $on (list "reset" "5xx" "gateway-error") }}{{ $abandons = append $abandons (printf "retryOn: %s (it retries a reset after the request went out; use reset-before-request, and retriable-status-codes for statuses)" $on) }}{{ end -}}
{{- end -}}
{{- if $r.perTryTimeout }}{{ $abandons = append $abandons "perTryTimeout" }}{{ end -}}
{{- if $r.perTryIdleTimeout }}{{ $abandons = append $abandons "perTryIdleTimeout" }}{{ end -}}
{{- with $abandons -}}
{{- fail (printf "values: envoy.retry %s would move on from an attempt a provider may already be working on, and bill; a request's budget reservation covers one billed attempt, so budgets could be overspent. With budgets or rate limits set, keep these off (docs/budgets.md, Fallback)" (join ", " .)) -}}
{{- end -}}
{{- end -}}
{{- range $i, $p := $v.providers -}}
{{- if and (hasKey ($p.credential | default dict) "env") (hasKey ($p.credential | default dict) "file") -}}
{{- fail (printf "values: providers[%d].credential (%s) has both env and file; keep exactly one" $i $p.name) -}}
{{- end -}}
{{- end -}}
{{- if and (gt ($v.extproc.processes | int) 1) (eq $v.budgets.store "memory") (include "gateway-extproc.budgetsEnabled" .) -}}
{{- fail (printf "values: budgets.store is memory, which one process holds, but extproc.processes is %d; set budgets.store: redis, or extproc.processes: 1" ($v.extproc.processes | int)) -}}
{{- end -}}
{{- if and (eq $v.budgets.store "redis") (not $v.budgets.redis.url) -}}
{{- if $v.redis.dev.enabled -}}
{{- fail (printf "values: budgets.store is redis but budgets.redis.url is empty; for the dev Redis set budgets.redis.url: redis://%s:6379/0" (include "gateway-extproc.redisDevName" .)) -}}
{{- else -}}
{{- fail "values: budgets.store is redis but budgets.redis.url is empty; set it to your Redis (redis://host:6379/0 or rediss://...)" -}}
{{- end -}}
{{- end -}}
{{- if and (dig "passwordSecret" "name" "" $v.budgets.redis) (not $v.budgets.redis.passwordEnv) -}}
{{- fail "values: budgets.redis.passwordSecret is set but budgets.redis.passwordEnv is empty; name the variable the ext_proc reads the password from, e.g. REDIS_PASSWORD" -}}
{{- end -}}
{{- /* Rendered values land in a ConfigMap (and run/ outside Kubernetes): no credentials in URLs. */ -}}
{{- with $v.budgets.redis.url -}}
{{- $u := urlParse . -}}
{{- if or (contains ":" ($u.userinfo | default "")) (regexMatch "(?i)(^|&)password=" ($u.query | default "")) -}}
{{- fail "values: budgets.redis.url carries a password, which would be copied into the ConfigMap; keep redis://[user@]host:port/db and give the password through budgets.redis.passwordEnv (e.g. REDIS_PASSWORD) with budgets.redis.passwordSecret: {name, key}" -}}
{{- end -}}
{{- include "gateway-extproc.checkRedisURL" (dict "key" "budgets.redis.url" "u" $u) -}}
{{- end -}}
{{- with (dig "redisStream" "url" "" $v.audit) -}}
{{- $u := urlParse . -}}
{{- if or (contains ":" ($u.userinfo | default "")) (regexMatch "(?i)(^|&)password=" ($u.query | default "")) -}}
{{- fail "values: audit.redisStream.url carries a password, which would be copied into the ConfigMap and into the audit trail's own copies of the config; keep redis://[user@]host:port/db and give the password through audit.redisStream.passwordEnv with audit.redisStream.passwordSecret: {name, key}" -}}
{{- end -}}
{{- include "gateway-extproc.checkRedisURL" (dict "key" "audit.redisStream.url" "u" $u) -}}
{{- end -}}
{{- range $i, $p := $v.providers -}}
{{- $u := urlParse $p.baseURL -}}
{{- if $u.userinfo -}}
{{- fail (printf "values: providers[%d].baseURL (%s) carries user:password@, which would be copied into the ConfigMap; remove it and set providers[%d].credential: {env: VAR, secret: {name, key}}" $i $p.name $i) -}}
{{- end -}}
{{- $q := regexFind "(?i)(^|&)(key|api[-_]?key|x-goog-api-key|access[-_]?token|token|sig|signature|password|secret|code)=" ($u.query | default "") -}}
{{- if $q -}}
{{- fail (printf "values: providers[%d].baseURL (%s) carries a credential in its query (%s), which would be copied into the ConfigMap; remove it and set providers[%d].credential: {env: VAR, secret: {name, key}} (the key is then sent the way the provider kind expects)" $i $p.name (trimPrefix "&" $q) $i) -}}
{{- end -}}
{{- include "gateway-extproc.checkBaseURL" (dict "i" $i "p" $p "u" $u) -}}
{{- end -}}
{{- include "gateway-extproc.checkUnique" $v -}}
{{- include "gateway-extproc.checkPorts" $v -}}
{{- include "gateway-extproc.checkReferences" . -}}
{{- include "gateway-extproc.checkDurations" $v -}}
{{- with (($v.deployment.envoy.resources | default dict).limits | default dict).memory -}}
{{- $limit := include "gateway-extproc.bytes" . | int64 -}}
{{- $need := add (mul 2 ($v.envoy.maxRequestBytes | int64)) 67108864 -}}
{{- if and $limit (lt $limit $need) -}}
{{- fail (printf "values: deployment.envoy.resources.limits.memory (%v) is below what Envoy needs to hold one largest request, 2 x envoy.maxRequestBytes + 64Mi (%dMi): it would refuse every request (503 gateway_busy). Raise the limit, or lower envoy.maxRequestBytes" . (div $need 1048576)) -}}
{{- end -}}
{{- end -}}
{{- range $i, $p := (dig "oidc" "providers" list $v.identity) -}}
{{- with (dig "jwks" "remote" "url" "" $p) -}}
{{- $u := urlParse . -}}
{{- if or $u.userinfo (regexMatch "(?i)(^|&)(key|api[-_]?key|x-goog-api-key|access[-_]?token|token|sig|signature|password|secret|code)=" ($u.query | default "")) -}}
{{- fail (printf "values: identity.oidc.providers[%d].jwks.remote.url carries a credential (user:password@ or a token in its query), which would be copied into the ConfigMap; remove it (a JWKS is public)" $i) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $secretEnv := fromJsonArray (include "gateway-extproc.secretEnv" .) -}}
{{- if $v.tracing.otlp.address -}}
{{- range $e := $v.deployment.extproc.extraEnv | default list -}}
{{- if eq $e.name "OTEL_EXPORTER_OTLP_ENDPOINT" -}}
{{- fail "values: deployment.extproc.extraEnv sets OTEL_EXPORTER_OTLP_ENDPOINT, which tracing.otlp already sets; keep one" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- include "gateway-extproc.checkLiteralSecrets" . -}}
{{- range $c := list "envoy" "extproc" -}}
{{- range $e := (get $v.deployment $c).extraEnv | default list -}}
{{- range $s := $secretEnv -}}
{{- if and (eq $s.name $e.name) (or (eq $c "extproc") $s.envoy) -}}
{{- fail (printf "values: deployment.%s.extraEnv sets %s, which the chart already fills from Secret %s; remove it from extraEnv" $c $e.name $s.secret) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $drain := $v.deployment.envoy.drainSeconds | int -}}
{{- if lt ($v.deployment.terminationGracePeriodSeconds | int) (add $drain 35) -}}
{{- fail (printf "values: deployment.terminationGracePeriodSeconds (%d) must be at least deployment.envoy.drainSeconds + 35 (%d): Envoy drains for %ds, the ext_proc stops 5s later and gets 30s for open streams" ($v.deployment.terminationGracePeriodSeconds | int) (add $drain 35) $drain) -}}
{{- end -}}
{{- if $v.monitoring.serviceMonitor.enabled -}}
{{- if not (or ($v.extproc.metrics.port | int) ($v.envoy.metrics.port | int)) -}}
{{- fail "values: monitoring.serviceMonitor.enabled needs extproc.metrics.port or envoy.metrics.port (0 turns them off)" -}}
{{- end -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt ($v.autoscaling.minReplicas | int) ($v.autoscaling.maxReplicas | int)) -}}
{{- fail "values: autoscaling.minReplicas is greater than autoscaling.maxReplicas" -}}
{{- end -}}
{{- $config := clean $v.configDir -}}
{{- range $m := fromJsonArray (include "gateway-extproc.secretMounts" .) -}}
{{- if or (eq (clean $m.dir) $config) (hasPrefix (printf "%s/" $config) (clean $m.dir)) -}}
{{- fail (printf "values: %s mounts a Secret at %s, inside configDir %s (a read-only ConfigMap volume); put it elsewhere, e.g. /etc/gateway-credentials/..." $m.from $m.dir $config) -}}
{{- end -}}
{{- end -}}
{{- include "gateway-extproc.checkMounts" . -}}
{{- end -}}

{{/*
A provider's baseURL as Envoy and the ext_proc use it: Envoy connects to its host and port
(a DNS name or IPv4 address), the ext_proc builds each request's path from its path. A query
or fragment would be dropped without a word, a port out of range or a host that is no DNS name
refused by Envoy at start or never resolved.
*/}}
{{- define "gateway-extproc.checkBaseURL" -}}
{{- $at := printf "values: providers[%d].baseURL (%s)" .i .p.name -}}
{{- if contains "?" .p.baseURL -}}
{{- fail (printf "%s has a query, which the gateway never sends (it builds each request's path itself); remove it (kind azure takes apiVersion)" $at) -}}
{{- end -}}
{{- if contains "#" .p.baseURL -}}
{{- fail (printf "%s has a fragment, which the gateway never sends; remove it" $at) -}}
{{- end -}}
{{- include "gateway-extproc.checkPort" (dict "key" (printf "providers[%d].baseURL (%s)" .i .p.name) "host" .u.host) -}}
{{- $host := regexReplaceAll ":[0-9]+$" .u.host "" -}}
{{- if hasPrefix "[" $host -}}
{{- fail (printf "%s has an IPv6 literal host, which the chart cannot route to (Envoy's endpoint and the NetworkPolicy's port take a DNS name or IPv4 address); give the backend a DNS name" $at) -}}
{{- end -}}
{{- if not (regexMatch "^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$" $host) -}}
{{- if regexMatch "[^\\x00-\\x7f]" $host -}}
{{- fail (printf "%s has a host that is not ASCII; write an internationalised name in its punycode form (xn--...)" $at) -}}
{{- end -}}
{{- fail (printf "%s has host %q, which is not a DNS name or IPv4 address (letters, digits, '.', '-', '_')" $at $host) -}}
{{- end -}}
{{- if not (regexMatch "^[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$" (regexReplaceAll "^https?://[^/]*" .p.baseURL "")) -}}
{{- fail (printf "%s has a path with characters a URL path cannot hold unescaped (a space, a quote...); percent-encode them" $at) -}}
{{- end -}}
{{- end -}}

{{/* A URL's port (host:port), when it names one, is 1-65535: Envoy and the Redis client refuse others at start. */}}
{{- define "gateway-extproc.checkPort" -}}
{{- $port := trimPrefix ":" (regexFind ":[0-9]+$" .host) -}}
{{- if and $port (or (lt ($port | int) 1) (gt ($port | int) 65535)) -}}
{{- fail (printf "values: %s has port %s; a port is 1-65535" .key $port) -}}
{{- end -}}
{{- end -}}

{{/*
Secrets pasted where the chart would render them as text (never echoed back): a private key
as audit.publicKey (published in a ConfigMap), a credential as a literal extraEnv value (in
the Deployment for anyone who may read it). A credential is a variable the config reads one
from (credential.env, passwordEnv) or one named like one (…_KEY, …_TOKEN, …SECRET…,
…PASSWORD…); a path (a value starting with /) is not one.
*/}}
{{- define "gateway-extproc.checkLiteralSecrets" -}}
{{- $v := .Values -}}
{{- /* Fields a key gets pasted into by mistake: checked here, as Helm's schema message quotes
the value it refuses (on the terminal and in CI logs). */ -}}
{{- range $i, $p := $v.providers -}}
{{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_]*$" (($p.credential | default dict).env | default "X")) -}}
{{- fail (printf "values: providers[%d].credential.env must name an environment variable (letters, digits and _, not starting with a digit), not hold the key; put the key in a Secret and name it in providers[%d].credential.secret" $i $i) -}}
{{- end -}}
{{- end -}}
{{- range $i, $k := $v.keys | default list -}}
{{- if not (regexMatch "^[a-z0-9][a-z0-9-]{0,62}$" (toString $k.id)) -}}
{{- fail (printf "values: keys[%d].id must be 1-63 lowercase letters, digits and '-' (a key's id, never the key; `gateway-extproc keys create` prints the entry)" $i) -}}
{{- end -}}
{{- if not (regexMatch "^[0-9a-f]{64}$" (toString $k.sha256)) -}}
{{- fail (printf "values: keys[%d].sha256 must be 64 lowercase hex digits, the key's SHA-256, never the key; `gateway-extproc keys create` prints it" $i) -}}
{{- end -}}
{{- end -}}
{{- range $i, $a := dig "keyAdmin" "admins" list ($v.identity | default dict) -}}
{{- if not (regexMatch "^[0-9a-f]{64}$" (toString $a.sha256)) -}}
{{- fail (printf "values: identity.keyAdmin.admins[%d].sha256 must be 64 lowercase hex digits, the token's SHA-256, never the token; `gateway-extproc keys admin-token` prints it" $i) -}}
{{- end -}}
{{- end -}}
{{- if contains "PRIVATE KEY" ($v.audit.publicKey | default "") -}}
{{- fail "values: audit.publicKey holds a private key, which the chart would publish in a ConfigMap; give the .pub file `gateway-extproc audit keygen` wrote (BEGIN PUBLIC KEY) and the private key through audit.signingKey.secret" -}}
{{- end -}}
{{- $named := list ($v.budgets.redis.passwordEnv | default "") (dig "redisStream" "passwordEnv" "" $v.audit) -}}
{{- range $p := $v.providers }}{{ $named = append $named (($p.credential | default dict).env | default "") }}{{ end -}}
{{- range $c := list "envoy" "extproc" -}}
{{- range $i, $e := (get $v.deployment $c).extraEnv | default list -}}
{{- $value := toString ($e.value | default "") -}}
{{- if and $value (not (hasPrefix "/" $value)) (or (has $e.name $named) (regexMatch "(?i)(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|PWD|CREDENTIALS?)($|_)" $e.name)) -}}
{{- fail (printf "values: deployment.%s.extraEnv[%d] (%s) has a literal value, which would sit in the Deployment for anyone who can read it; take it from a Secret (valueFrom.secretKeyRef, or a provider's credential.secret)" $c $i $e.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A Redis URL the client takes as written: its port 1-65535, its database a number. */}}
{{- define "gateway-extproc.checkRedisURL" -}}
{{- include "gateway-extproc.checkPort" (dict "key" .key "host" .u.host) -}}
{{- if and (ne .u.scheme "unix") (not (regexMatch "^/?[0-9]*$" .u.path)) -}}
{{- fail (printf "values: %s names a database that is no number (the Redis client would read it as database 0); use redis://host:port/0" .key) -}}
{{- end -}}
{{- end -}}

{{/*
Each container's mount paths, as deployment.yaml makes them: one volume per path (Kubernetes
refuses a repeat, and the install fails half-way), none inside configDir (a read-only
ConfigMap volume, where no mount point can be made: the container never starts).
*/}}
{{- define "gateway-extproc.checkMounts" -}}
{{- $v := .Values -}}
{{- $config := clean $v.configDir -}}
{{- $secrets := fromJsonArray (include "gateway-extproc.secretMounts" .) -}}
{{- range $c := list "envoy" "extproc" -}}
{{- $mounts := list (list "configDir" $v.configDir) (list "extproc.socketDir" $v.extproc.socketDir) -}}
{{- if eq $c "extproc" -}}
{{- $mounts = append $mounts (list "the ext_proc's /tmp" "/tmp") -}}
{{- if $v.audit.enabled }}{{ $mounts = append $mounts (list "audit.dir" $v.audit.dir) }}{{ end -}}
{{- end -}}
{{- range $m := $secrets }}{{ if eq $m.container $c }}{{ $mounts = append $mounts (list $m.from $m.dir) }}{{ end }}{{ end -}}
{{- range $m := (get $v.deployment $c).extraVolumeMounts | default list -}}
{{- $mounts = append $mounts (list (printf "deployment.%s.extraVolumeMounts" $c) $m.mountPath) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $m := $mounts -}}
{{- $path := clean (index $m 1) -}}
{{- with get $seen $path -}}
{{- fail (printf "values: %s and %s are both mounted at %s in the %s container; give each its own directory" . (index $m 0) $path $c) -}}
{{- end -}}
{{- if hasPrefix (printf "%s/" $config) $path -}}
{{- fail (printf "values: %s (%s) is inside configDir %s, a read-only ConfigMap volume where no mount point can be made; put it elsewhere" (index $m 0) $path $config) -}}
{{- end -}}
{{- $_ := set $seen $path (index $m 0) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Names Envoy and the ext_proc key things by, each used once: two models of one name are two
Envoy clusters of one name (Envoy refuses to start), two providers of one name stop the
ext_proc at start, and two backends of one provider/model in a model are one endpoint id to
Envoy and the ext_proc (the second's pricing and tier were never used).
*/}}
{{- define "gateway-extproc.checkUnique" -}}
{{- range $list := list "providers" "models" -}}
{{- $seen := dict -}}
{{- range $i, $x := get $ $list -}}
{{- if hasKey $seen $x.name -}}
{{- fail (printf "values: %s[%d].name %q is also %s[%d].name; names must be unique" $list $i $x.name $list (get $seen $x.name)) -}}
{{- end -}}
{{- $_ := set $seen $x.name $i -}}
{{- end -}}
{{- end -}}
{{- range $i, $m := .models -}}
{{- $seen := dict -}}
{{- range $j, $b := $m.backends -}}
{{- $id := printf "%s/%s" $b.provider $b.model -}}
{{- if hasKey $seen $id -}}
{{- fail (printf "values: models[%d].backends[%d] is %q again (models[%d].backends[%d]); a backend is known by provider/model, so list each once" $i $j $id $i (get $seen $id)) -}}
{{- end -}}
{{- $_ := set $seen $id $j -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Ports the pod listens on (in Kubernetes one network namespace; outside it, one host): Envoy's
listener, admin and stats listener, the ext_proc's /metrics and key admin API. Two of one
number passed `envoy --mode validate` and stopped Envoy or the ext_proc at start ("Address
already in use"). 0 turns a metrics listener off.
*/}}
{{- define "gateway-extproc.checkPorts" -}}
{{- $ports := dict "envoy.admin.port" .envoy.admin.port "envoy.listener.port" .envoy.listener.port "envoy.metrics.port" .envoy.metrics.port "extproc.metrics.port" .extproc.metrics.port -}}
{{- $ka := (.identity | default dict).keyAdmin | default dict -}}
{{- if $ka.enabled }}{{ $_ := set $ports "identity.keyAdmin.port" $ka.port }}{{ end -}}
{{- $seen := dict -}}
{{- range $key := keys $ports | sortAlpha -}}
{{- $port := get $ports $key | int -}}
{{- if $port -}}
{{- with get $seen (toString $port) -}}
{{- fail (printf "values: %s and %s are both %d; give each its own port (they listen side by side in the pod)" . $key $port) -}}
{{- end -}}
{{- $_ := set $seen (toString $port) $key -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
What the ext_proc's config check refuses at start and Helm alone would let through (`helm
install` succeeded, then the ext_proc crash-looped): a key's team or models that do not exist,
and a backend without pricing once any budget or rate limit is set.
*/}}
{{- define "gateway-extproc.checkReferences" -}}
{{- $v := .Values -}}
{{- $teams := list }}{{ range $v.teams | default list }}{{ $teams = append $teams .name }}{{ end -}}
{{- $models := list "*" }}{{ range $v.models }}{{ $models = append $models .name }}{{ end -}}
{{- range $i, $k := $v.keys | default list -}}
{{- if not (has $k.team $teams) -}}
{{- fail (printf "values: keys[%d].team is %s, not in teams; add it to teams or fix the name" $i (squote $k.team)) -}}
{{- end -}}
{{- range $m := $k.models | default list -}}
{{- if not (has $m $models) -}}
{{- fail (printf "values: keys[%d].models names %s, which is not in models" $i (squote $m)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $v.classification -}}
{{- $tiers := .tiers | default (list "public" "internal" "confidential" "restricted") -}}
{{- range $i, $m := $v.models -}}
{{- range $j, $b := $m.backends -}}
{{- if not (has $b.maxTier $tiers) -}}
{{- fail (printf "values: models[%d].backends[%d].maxTier %s; with classification on, every backend names the highest tier it is approved for: one of %s" $i $j (ternary "is missing" (printf "is %s" (squote $b.maxTier)) (kindIs "invalid" $b.maxTier)) (join ", " $tiers)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if include "gateway-extproc.budgetsEnabled" . -}}
{{- range $i, $m := $v.models -}}
{{- range $j, $b := $m.backends -}}
{{- if not $b.pricing -}}
{{- fail (printf "values: models[%d].backends[%d].pricing is required when budgets are configured: add {input, output} in USD per 1M tokens" $i $j) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Durations the schema's pattern lets through but Envoy does not take as meant: 0s is "no
timeout" to Envoy (a client could hold a request, a silent provider a stream, for ever) and an
ext_proc message timeout may not exceed an hour.
*/}}
{{- define "gateway-extproc.checkDurations" -}}
{{- if eq (trimSuffix "s" .envoy.upstreamTimeout | float64) 0.0 -}}
{{- fail "values: envoy.upstreamTimeout is 0s, which Envoy reads as no timeout at all (requests, streams and slow clients held for ever); set a positive duration such as 300s" -}}
{{- end -}}
{{- $m := trimSuffix "s" .extproc.messageTimeout | float64 -}}
{{- if or (eq $m 0.0) (gt $m 3600.0) -}}
{{- fail (printf "values: extproc.messageTimeout is %s; Envoy's ext_proc filter takes more than 0s and at most 3600s (default 5s)" .extproc.messageTimeout) -}}
{{- end -}}
{{- with dig "outlierDetection" "interval" "" .envoy -}}
{{- if eq (trimSuffix "s" . | float64) 0.0 -}}
{{- fail "values: envoy.outlierDetection.interval is 0s; Envoy's ejection sweep needs a positive interval such as 10s" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Environment variables filled from Secrets, as JSON: [{name, secret, key, envoy}]. Provider
credentials {env, secret} go to both containers (Envoy injects them natively with
%ENVIRONMENT%, the upstream ext_proc when an attempt needs body work); the Redis password
only to the ext_proc.
*/}}
{{- define "gateway-extproc.secretEnv" -}}
{{- $out := dict -}}
{{- range $i, $p := .Values.providers -}}
{{- $c := $p.credential | default dict -}}
{{- if and $c.env $c.secret -}}
{{- $prev := get $out $c.env -}}
{{- if and $prev (or (ne $prev.secret $c.secret.name) (ne $prev.key $c.secret.key)) -}}
{{- fail (printf "values: providers %q and %q read %s from different Secrets; give each its own variable" $prev.provider $p.name $c.env) -}}
{{- end -}}
{{- $_ := set $out $c.env (dict "name" $c.env "secret" $c.secret.name "key" $c.secret.key "envoy" true "provider" $p.name) -}}
{{- end -}}
{{- end -}}
{{- $r := .Values.budgets.redis -}}
{{- if and $r.passwordEnv (dig "passwordSecret" "name" "" $r) -}}
{{- $_ := set $out $r.passwordEnv (dict "name" $r.passwordEnv "secret" $r.passwordSecret.name "key" $r.passwordSecret.key "envoy" false "provider" "") -}}
{{- end -}}
{{- $a := .Values.audit.redisStream -}}
{{- if and .Values.audit.enabled $a.url $a.passwordEnv (dig "passwordSecret" "name" "" $a) -}}
{{- $_ := set $out $a.passwordEnv (dict "name" $a.passwordEnv "secret" $a.passwordSecret.name "key" $a.passwordSecret.key "envoy" false "provider" "") -}}
{{- end -}}
{{- $list := list -}}
{{- range $k := keys $out | sortAlpha }}{{ $list = append $list (get $out $k) }}{{ end -}}
{{- toJson $list -}}
{{- end -}}

{{/*
Secret volumes as JSON: [{name, dir, container, from, sources: [{secret, items}]}]. File
credentials are grouped by directory into one projected volume each (read-only, ext_proc
only); TLS material is mounted into Envoy.
*/}}
{{- define "gateway-extproc.secretMounts" -}}
{{- $v := .Values -}}
{{- $dirs := dict -}}
{{- $files := dict -}}
{{- range $p := $v.providers -}}
{{- $c := $p.credential | default dict -}}
{{- if and $c.file $c.secret -}}
{{- $dir := dir $c.file -}}
{{- if hasKey $files $c.file -}}
{{- fail (printf "values: providers %q and %q both mount credential.file %s; give each provider its own file" (get $files $c.file) $p.name $c.file) -}}
{{- end -}}
{{- $_ := set $files $c.file $p.name -}}
{{- $sources := get $dirs $dir | default list -}}
{{- $_ := set $dirs $dir (append $sources (dict "secret" (dict "name" $c.secret.name "items" (list (dict "key" $c.secret.key "path" (base $c.file)))))) -}}
{{- end -}}
{{- end -}}
{{- $out := list -}}
{{- range $i, $dir := keys $dirs | sortAlpha -}}
{{- $out = append $out (dict "name" (printf "credentials-%d" $i) "dir" $dir "container" "extproc" "from" "providers[].credential.file" "sources" (get $dirs $dir)) -}}
{{- end -}}
{{- $tls := $v.envoy.tls -}}
{{- if and $tls.enabled $tls.certificate.secretName -}}
{{- $out = append $out (dict "name" "tls-certificate" "dir" $tls.certificate.dir "container" "envoy" "from" "envoy.tls.certificate" "sources" (list (dict "secret" (dict "name" $tls.certificate.secretName "items" (list (dict "key" "tls.crt" "path" "tls.crt") (dict "key" "tls.key" "path" "tls.key")))))) -}}
{{- end -}}
{{- $up := $v.envoy.upstreamCA -}}
{{- if $up.secretName -}}
{{- if not $up.dir -}}
{{- fail "values: envoy.upstreamCA.secretName is set but envoy.upstreamCA.dir is empty; give the directory to mount it at" -}}
{{- end -}}
{{- $out = append $out (dict "name" "upstream-ca" "dir" $up.dir "container" "envoy" "from" "envoy.upstreamCA" "sources" (list (dict "secret" (dict "name" $up.secretName "items" (list (dict "key" $up.key "path" $up.key)))))) -}}
{{- end -}}
{{- $audit := $v.audit -}}
{{- if and $audit.enabled $audit.signingKey.secret.name -}}
{{- $out = append $out (dict "name" "audit-signing-key" "dir" (dir $audit.signingKey.file) "container" "extproc" "from" "audit.signingKey" "sources" (list (dict "secret" (dict "name" $audit.signingKey.secret.name "items" (list (dict "key" $audit.signingKey.secret.key "path" (base $audit.signingKey.file))))))) -}}
{{- end -}}
{{- if and $tls.enabled $tls.clientCA.enabled $tls.clientCA.secretName -}}
{{- $out = append $out (dict "name" "tls-client-ca" "dir" $tls.clientCA.dir "container" "envoy" "from" "envoy.tls.clientCA" "sources" (list (dict "secret" (dict "name" $tls.clientCA.secretName "items" (list (dict "key" $tls.clientCA.key "path" $tls.clientCA.key)))))) -}}
{{- end -}}
{{- /* identity: a JWKS file from a Secret, mounted in Envoy at the file's directory. */ -}}
{{- range $i, $p := ((($v.identity | default dict).oidc | default dict).providers | default list) -}}
{{- if and $p.jwks.file $p.jwks.secret -}}
{{- $out = append $out (dict "name" (printf "jwks-%d" $i) "dir" (dir $p.jwks.file) "container" "envoy" "from" "identity.oidc.providers[].jwks" "sources" (list (dict "secret" (dict "name" $p.jwks.secret.name "items" (list (dict "key" $p.jwks.secret.key "path" (base $p.jwks.file))))))) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Ports the configured providers listen on (from baseURL), as JSON. */}}
{{- define "gateway-extproc.providerPorts" -}}
{{- $ports := dict -}}
{{- range $p := .Values.providers -}}
{{- $u := urlParse $p.baseURL -}}
{{- $parts := splitList ":" $u.host -}}
{{- $port := ternary 443 80 (eq $u.scheme "https") -}}
{{- if gt (len $parts) 1 }}{{ $port = index $parts 1 | int }}{{ end -}}
{{- $_ := set $ports (toString $port) $port -}}
{{- end -}}
{{- $list := list -}}
{{- range $k := keys $ports | sortAlpha }}{{ $list = append $list (get $ports $k) }}{{ end -}}
{{- toJson $list -}}
{{- end -}}

{{/* Port of budgets.redis.url (6379 unless it names one). */}}
{{- define "gateway-extproc.redisPort" -}}
{{- $port := 6379 -}}
{{- with .Values.budgets.redis.url -}}
{{- with regexFind ":[0-9]+$" (urlParse .).host }}{{ $port = trimPrefix ":" . | int }}{{ end -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* Envoy admin from inside the pod (loopback when it binds every address). */}}
{{- define "gateway-extproc.adminHost" -}}
{{- $a := .Values.envoy.admin.address -}}
{{- if has $a (list "0.0.0.0" "::" "") }}127.0.0.1{{ else }}{{ $a }}{{ end -}}
{{- end -}}

{{/*
One admin request from the Envoy container. The Envoy image has no curl, and admin stays on
loopback (it can stop Envoy), so bash's /dev/tcp speaks HTTP/1.1; exit 0 on a 200.
*/}}
{{- define "gateway-extproc.adminRequest" -}}
exec 3<>/dev/tcp/{{ include "gateway-extproc.adminHost" .root }}/{{ .root.Values.envoy.admin.port }} || exit 1
printf '{{ .method }} {{ .path }} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n' >&3
read -r -t 3 status <&3 || exit 1
[[ $status == "HTTP/1.1 200"* ]]
{{- end -}}

{{/* ext_proc health: every worker's gRPC health service over its Unix socket says SERVING. */}}
{{- define "gateway-extproc.extprocProbe" -}}
- python3
- -c
- "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; sys.exit(any(g.HealthStub(grpc.insecure_channel(a)).Check(h.HealthCheckRequest(), timeout=3).status != h.HealthCheckResponse.SERVING for a in sys.argv[1:]))"
{{- range $i := until (int .Values.extproc.processes) }}
- {{ printf "unix://%s" (include "gateway-extproc.socket" (dict "dir" $.Values.extproc.socketDir "i" $i)) }}
{{- end }}
{{- end -}}
