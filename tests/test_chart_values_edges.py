"""Values an operator may get wrong, rendered with the real Helm engine: each either fails the
render naming its key and the fix, or renders a config real Envoy accepts (`envoy --mode
validate`) and the ext_proc's config check loads. Nothing renders that Envoy refuses at start,
that breaks the YAML it is copied into, or that Envoy would silently read as something else."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.localstack import envoy_binary
from gateway_extproc.render import RenderError, chart_values, render_values

Edit = Callable[[dict[str, Any]], None]


def put(path: str, value: Any) -> Edit:
    """An edit setting one value by its key path ("models.0.backends.0.priority")."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]

    def edit(values: dict[str, Any]) -> None:
        node: Any = values
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def add_backend(**backend: Any) -> Edit:
    return lambda v: v["models"][0]["backends"].append({"provider": "openai", "model": "gpt-4o-mini", **backend})


def render(edit: Edit) -> dict[str, str]:
    values = copy.deepcopy(chart_values([]))
    edit(values)
    return render_values(values)


REFUSED = [
    # numbers Envoy reads as uint32 (or the ext_proc cluster's doubled connection count)
    ("circuit-breaker-over-uint32", put("envoy.circuitBreakers.maxRequests", 2**32),
     r"envoy\.circuitBreakers\.maxRequests: maximum: got 4294967296, want 4294967295$"),  # (Helm wrote 4.294967296×10⁰⁹)
    ("processes-over-the-most-envoy-takes", put("extproc.processes", 100000), r"extproc\.processes: maximum: got 100000, want 128"),
    ("max-connections-doubled-over-uint32", put("envoy.maxConnections", 2**31), r"envoy\.maxConnections"),
    ("max-request-bytes-plus-buffer-over-uint32", put("envoy.maxRequestBytes", 2**32 - 1), r"envoy\.maxRequestBytes"),
    ("priority-over-uint32", put("models.0.backends.0.priority", 2**40), r"models\[0\]\.backends\[0\]\.priority"),
    ("weight-over-uint32", put("models.0.backends.0.weight", 2**40), r"models\[0\]\.backends\[0\]\.weight"),
    # Envoy's --concurrency and outlier counts are uint32: past it Envoy refused its command line
    ("concurrency-over-uint32", put("deployment.envoy.concurrency", 2**40), r"deployment\.envoy\.concurrency: maximum"),
    ("outlier-count-over-uint32", put("envoy.outlierDetection.consecutive5xx", 2**32),
     r"envoy\.outlierDetection\.consecutive5xx: maximum"),
    # durations protobuf or the ext_proc filter cannot hold, and zeros Envoy reads as "no timeout"
    ("timeout-over-protobuf", put("envoy.upstreamTimeout", "99999999999999s"), r"envoy\.upstreamTimeout"),
    ("message-timeout-over-an-hour", put("extproc.messageTimeout", "3601s"), r"extproc\.messageTimeout .*3600s"),
    ("message-timeout-zero", put("extproc.messageTimeout", "0s"), r"extproc\.messageTimeout"),
    ("upstream-timeout-zero-is-no-timeout", put("envoy.upstreamTimeout", "0.0s"), r"envoy\.upstreamTimeout .*no timeout"),
    ("outlier-interval-zero", put("envoy.outlierDetection.interval", "0s"), r"envoy\.outlierDetection\.interval"),
    # Envoy ignores a retry condition it does not know: a typo silently turned fallback off
    ("retry-on-typo", put("envoy.retry.retryOn", "conect-failure"), r"envoy\.retry\.retryOn: .*connect-failure"),
    ("retry-on-newline", put("envoy.retry.retryOn", "connect-failure\n  x: y"), r"envoy\.retry\.retryOn"),
    # addresses copied into YAML flow mappings unquoted
    ("listener-address-not-an-ip", put("envoy.listener.address", "0.0.0.0, port_value: 1}"), r"envoy\.listener\.address"),
    ("admin-address-hostname", put("envoy.admin.address", "localhost"), r"envoy\.admin\.address"),
    ("extproc-metrics-address-newline", put("extproc.metrics.address", "0.0.0.0\nx: 1"), r"extproc\.metrics\.address"),
    # Unix socket paths: sun_path holds 108 bytes; a newline broke gateway.yaml's listen list
    ("socket-dir-too-long", put("extproc.socketDir", "/tmp/" + "a" * 100), r"extproc\.socketDir"),
    ("socket-dir-newline", put("extproc.socketDir", "/tmp/a\nb"), r"extproc\.socketDir"),
    # provider URLs Envoy refuses, cannot resolve, or whose part the gateway never sends
    ("base-url-port-0", put("providers.0.baseURL", "http://vllm.internal:0/v1"), r"providers\[0\]\.baseURL .*port"),
    ("base-url-port-65536", put("providers.0.baseURL", "http://vllm.internal:65536/v1"), r"providers\[0\]\.baseURL .*port"),
    ("base-url-query-dropped", put("providers.0.baseURL", "https://api.openai.com/v1?org=1"), r"providers\[0\]\.baseURL .*query"),
    ("base-url-fragment-dropped", put("providers.0.baseURL", "https://api.openai.com/v1#x"), r"providers\[0\]\.baseURL .*fragment"),
    ("base-url-space-in-host", put("providers.0.baseURL", "http://vllm internal/v1"), r"providers\[0\]\.baseURL"),
    ("base-url-quote-in-host", put("providers.0.baseURL", 'http://vl"lm/v1'), r"providers\[0\]\.baseURL .*host"),
    ("base-url-unicode-host", put("providers.0.baseURL", "https://bücher.example/v1"), r"providers\[0\]\.baseURL .*xn--"),
    ("base-url-space-in-path", put("providers.0.baseURL", "https://api.openai.com/v 1"), r"providers\[0\]\.baseURL.*path"),
    ("base-url-ipv6", put("providers.0.baseURL", "http://[fd00::1]:8000/v1"), r"providers\[0\]\.baseURL.*IPv6"),
    # duplicates: Envoy refuses two clusters of one name; the ext_proc refuses two providers of
    # one name at start (the pod crash-looped after `helm install` succeeded); two backends of one
    # id in a model are one Envoy endpoint id, so the second's pricing was never used
    ("duplicate-model", lambda v: v["models"][1].__setitem__("name", "default-chat"), r"models\[1\]\.name .*default-chat"),
    ("duplicate-provider", lambda v: v["providers"].append({**v["providers"][0], "baseURL": "https://x.example/v1"}),
     r"providers\[1\]\.name .*openai"),
    ("duplicate-backend", add_backend(priority=1), r"models\[0\]\.backends\[1\] .*openai/gpt-4o-mini"),
    # a provider's model name travels in Envoy metadata, response headers and request paths
    ("backend-model-newline", put("models.0.backends.0.model", "gpt\nx"), r"models\[0\]\.backends\[0\]\.model"),
    # references and settings the ext_proc's config check refuses when it starts: `helm install`
    # succeeded and the ext_proc crash-looped (a rollout stalled on its first new pod)
    ("key-team-unknown", lambda v: v.update(teams=[{"name": "payments"}], keys=[{"id": "k1", "sha256": "a" * 64,
                                                                             "team": "paymnets"}]),
     r"keys\[0\]\.team is 'paymnets', not in teams; add it to teams or fix the name"),
    ("key-model-unknown", lambda v: v.update(teams=[{"name": "t"}], keys=[{"id": "k1", "sha256": "a" * 64, "team": "t",
                                                                        "models": ["*", "default-caht"]}]),
     r"keys\[0\]\.models names 'default-caht', which is not in models"),
    ("pricing-missing-with-budgets", lambda v: (v.update(teams=[{"name": "t", "budget": {"daily": 5}}]),
                                                v["budgets"].update(devMemoryStore=True),
                                                v["extproc"].update(processes=1)),
     r"models\[0\]\.backends\[0\]\.pricing is required when budgets are configured"),
    # with classification on, the chart routed a backend without (or with an unknown) maxTier as
    # approved for the last (or first) tier, and the ext_proc refused the config at start
    ("max-tier-missing-with-classification", lambda v: v.update(classification={"tiers": ["public", "restricted"]}),
     r"models\[0\]\.backends\[0\]\.maxTier is missing; with classification on, every backend names the highest tier "
     r"it is approved for: one of public, restricted"),
    ("max-tier-unknown", lambda v: (v.update(classification={"mode": "enforce"}),
                                    put("models.0.backends.0.maxTier", "secret")(v)),
     r"models\[0\]\.backends\[0\]\.maxTier is 'secret'; .*one of public, internal, confidential, restricted"),
    ("azure-without-api-version", put("providers.0.kind", "azure"), r"providers\[0\]: missing property 'apiVersion'"),
    ("bedrock-without-region", put("providers.0.kind", "bedrock"), r"providers\[0\]: missing property 'region'"),
    ("tokenizer-unknown", put("models.0.tokenizer", "gpt2"), r"models\[0\]\.tokenizer: .*o200k_base"),
    # a collector URL where its host goes: Envoy looked up "http://collector:4317" as a DNS name
    # and the ext_proc got http://http://collector:4317:4317; no trace left either, silently
    ("otlp-address-a-url", put("tracing.otlp", {"address": "http://otel-collector.observability:4317", "port": 4317}),
     r"tracing\.otlp\.address: .*no scheme, no port"),
    ("otlp-address-host-port", put("tracing.otlp", {"address": "otel-collector:4317", "port": 4317}),
     r"tracing\.otlp\.address"),
    # Redis URLs the store's client refuses when the ext_proc starts (no scheme, a port out of
    # range), reads as something else (a database that is no number became db 0), or that broke
    # the NetworkPolicy template (a space in the host)
    ("redis-url-no-scheme", put("budgets.redis.url", "redis-master:6379"), r"budgets\.redis\.url"),
    ("redis-url-port", put("budgets.redis.url", "redis://redis:99999/0"), r"budgets\.redis\.url .*port 99999"),
    ("redis-url-db-not-a-number", put("budgets.redis.url", "redis://redis:6379/budgets"), r"budgets\.redis\.url"),
    ("redis-url-space", put("budgets.redis.url", "redis://red is:6379/0"), r"budgets\.redis\.url"),
    ("audit-stream-url-no-scheme", put("audit.redisStream.url", "redis:6379"), r"audit\.redisStream\.url"),
    # one port twice in the pod (or on the host, outside Kubernetes): envoy --mode validate passed,
    # then Envoy (or the ext_proc) exited at start, "Address already in use"
    ("admin-on-the-listener-port", put("envoy.admin.port", 8080), r"envoy\.admin\.port and envoy\.listener\.port are both 8080"),
    ("extproc-metrics-on-envoy-metrics", put("extproc.metrics.port", 9902),
     r"envoy\.metrics\.port and extproc\.metrics\.port are both 9902"),
    ("key-admin-on-extproc-metrics", put("identity.keyAdmin", {"enabled": True, "address": "127.0.0.1", "port": 9464,
                                                              "admins": [], "file": ""}),
     r"extproc\.metrics\.port and identity\.keyAdmin\.port are both 9464"),
    # Envoy's memory limit: "0" made a zero heap Envoy refuses; a limit below what one maximal
    # request takes made Envoy refuse every request (503 gateway_busy)
    ("memory-limit-below-one-request", put("deployment.envoy.resources.limits.memory", "16Mi"),
     r"deployment\.envoy\.resources\.limits\.memory .*envoy\.maxRequestBytes"),
]


@pytest.mark.parametrize(("edit", "key"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_value_envoy_or_the_extproc_would_refuse_fails_the_render_naming_its_key(edit: Edit, key: str) -> None:
    with pytest.raises(RenderError, match=key):
        render(edit)


ACCEPTED = [
    ("listener-on-every-ipv6-address", put("envoy.listener.address", "::")),
    ("admin-on-ipv6-loopback", put("envoy.admin.address", "::1")),
    ("model-names-with-yaml-and-envoy-syntax", lambda v: [m.__setitem__("name", n) for m, n in
                                                          zip(v["models"], ['a:b "c" %d', "gpt-ü-模型-" + "m" * 300])]),
    ("provider-name-with-a-colon-and-slash", lambda v: [v["providers"][0].__setitem__("name", "p:a/b")] +
     [b.__setitem__("provider", "p:a/b") for m in v["models"] for b in m["backends"]]),
    ("backend-model-with-slash-and-percent", put("models.0.backends.0.model", "meta/llama-3%ENVIRONMENT(HOME)%")),
    ("base-url-ip-port-trailing-slash", put("providers.0.baseURL", "http://10.0.0.7:65535/v1/")),
    ("base-url-underscore-host", put("providers.0.baseURL", "https://my_vllm.internal/v1")),
    ("largest-envoy-numbers", lambda v: (  # (a 4 GiB request needs more than the default 2Gi limit)
        v["envoy"].update(maxConnections=2**31 - 1, maxRequestBytes=2**32 - 1 - 2**20),
        v["deployment"]["envoy"]["resources"]["limits"].update(memory="9Gi"),
        v["envoy"]["circuitBreakers"].update(maxRequests=2**32 - 1, maxRetries=2**32 - 1),
        v["models"][0]["backends"][0].update(priority=0, weight=1000000))),
    ("longest-socket-dir", put("extproc.socketDir", "/tmp/" + "s" * 85)),
    ("fallback-to-the-same-model-at-another-provider", lambda v: (
        v["providers"].append({"name": "azure", "kind": "openai", "baseURL": "https://x.example/v1",
                               "credential": {"env": "AZURE_KEY"}}),
        add_backend(provider="azure", priority=1)(v))),
    ("circuit-breakers-unset", put("envoy.circuitBreakers", {})),
    ("memory-limit-unset", lambda v: v["deployment"]["envoy"]["resources"].pop("limits")),
    ("memory-limit-zero-is-no-limit", put("deployment.envoy.resources.limits.memory", "0")),
    ("redis-urls", lambda v: (put("budgets.redis.url", "rediss://app@redis.internal:6380/2?ssl_cert_reqs=required")(v),
                              put("audit.redisStream.url", "redis://[fd00::7]:6379")(v))),
    ("tokenizer-file-and-estimate", lambda v: (put("models.0.tokenizer", "/models/llama/tokenizer.json")(v),
                                               put("models.1.tokenizer", "estimate")(v))),
    ("key-for-every-model", lambda v: v.update(teams=[{"name": "t"}], keys=[{"id": "k1", "sha256": "a" * 64,
                                                                          "team": "t", "models": ["*"]}])),
    ("otlp-collector-by-name-and-by-ip", lambda v: put("tracing.otlp", {"address": "otel-collector.observability.svc",
                                                                      "port": 4317})(v)),
    ("metrics-off-on-both-sides", lambda v: (put("envoy.metrics.port", 0)(v), put("extproc.metrics.port", 0)(v))),
]


@pytest.mark.parametrize("edit", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_an_edge_value_that_renders_passes_envoy_validate_and_the_config_check(edit: Edit, tmp_path: Path) -> None:
    rendered = render(edit)
    config.parse(yaml.safe_load(rendered["gateway.yaml"]), "gateway.yaml", local_files=False)
    path = tmp_path / "envoy.yaml"
    path.write_text(rendered["envoy.yaml"])
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_an_ipv6_any_address_takes_ipv4_connections_too() -> None:
    """`::` reads as "every address"; Envoy binds it IPv6-only unless told, and an IPv4 Service
    (most clusters) then reached nothing. (Checked by hand on Envoy 1.40: 127.0.0.1 and ::1 both
    answer on a `::` listener and admin rendered so.)"""
    envoy = yaml.safe_load(render(lambda v: (put("envoy.listener.address", "::")(v),
                                             put("envoy.admin.address", "::")(v)))["envoy.yaml"])
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "::", "port_value": 8080, "ipv4_compat": True}
    assert envoy["admin"]["address"]["socket_address"]["ipv4_compat"] is True
    default = yaml.safe_load(render(lambda v: None)["envoy.yaml"])
    assert "ipv4_compat" not in default["static_resources"]["listeners"][0]["address"]["socket_address"]


def test_a_timestamp_written_unquoted_renders_as_helm_reads_it(tmp_path: Path) -> None:
    """configuration.md writes `expiresAt: 2027-06-30T00:00:00Z` unquoted. Helm reads it as a
    string; `gateway-extproc render` (and `make run`) read it as a Python datetime and stopped
    with a TypeError traceback from the Helm engine's JSON encoding."""
    from gateway_extproc.render import render as render_files

    values = tmp_path / "my-values.yaml"
    values.write_text("teams: [{name: payments}]\nkeys:\n- {id: payments-1, sha256: " + "a" * 64 +
                      ", team: payments, expiresAt: 2027-06-30T00:00:00Z}\n- {id: payments-2, sha256: " + "b" * 64 +
                      ", team: payments, expiresAt: 2027-07-01}\n")
    render_files([values], tmp_path / "out")
    cfg = config.load(tmp_path / "out" / "gateway.yaml")
    assert [k.expires_at.isoformat() for k in cfg.keys.values()] == ["2027-06-30T00:00:00+00:00",
                                                                   "2027-07-01T00:00:00+00:00"]


@pytest.mark.parametrize(("override", "message"), [
    # fallback off without a word: max_retries 0, retry_on empty
    ({"envoy": {"circuitBreakers": {"maxRetries": None}}}, r"envoy\.circuitBreakers: missing property 'maxRetries'"),
    ({"envoy": {"retry": None}}, r"envoy: missing property 'retry'"),
    # Envoy refused to start (max_active_downstream_connections 0), or took 1 MiB bodies
    ({"envoy": {"maxConnections": None}}, r"envoy: missing property 'maxConnections'"),
    ({"envoy": {"maxRequestBytes": None}}, r"envoy: missing property 'maxRequestBytes'"),
    # a Go template nil-pointer error naming a template line, not the key
    ({"tracing": None}, r"<top level>: missing property 'tracing'"),
    ({"networkPolicy": {"egress": None}}, r"networkPolicy: missing property 'egress'"),
    ({"deployment": {"containerSecurityContext": None}}, r"deployment: missing property 'containerSecurityContext'"),
], ids=["max-retries", "retry", "max-connections", "max-request-bytes", "tracing", "egress", "security-context"])
def test_a_null_that_removes_a_default_the_chart_needs_fails_naming_the_key(override: dict[str, Any],
                                                                         message: str) -> None:
    """In a values file `key: null` removes the chart's default (Helm's rule), so the templates
    saw nothing there: fallback silently off, Envoy refusing to start, or a Go template error
    naming a template line. Now the schema names the key, and the message says why it is missing."""
    with pytest.raises(RenderError, match=message + r".*a null in a values file removes the chart's default"):
        render_values(override)


def test_a_null_the_chart_reads_as_absent_still_renders() -> None:
    """No memory limit (no Envoy heap cap) and no key list are meanings of their own."""
    envoy = render_values({"deployment": {"envoy": {"resources": {"limits": None}}}, "keys": None,
                           "commonLabels": None})["envoy.yaml"]
    assert "fixed_heap" not in envoy


def test_retry_conditions_reach_envoy_without_the_spaces_a_values_file_may_put_between_them() -> None:
    """The schema takes `connect-failure, refused-stream`; Envoy gets the list without spaces,
    whether or not its parser trims them (one it does not would silently drop the condition)."""
    rendered = render(lambda v: (put("envoy.retry.retryOn", " connect-failure , refused-stream")(v),
                                 add_backend(model="gpt-4o", priority=1)(v)))
    assert "retry_on: connect-failure,refused-stream\n" in rendered["envoy.yaml"]
