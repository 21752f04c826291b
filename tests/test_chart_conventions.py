"""Helm conventions an operator expects from a chart (ingress-nginx, bitnami): name overrides
without doubled names, common labels, image digests, per-container extra env/volumes, an
Envoy startup probe, a PDB only where it protects, and no credential ever in a rendered URL."""

from __future__ import annotations

from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from gateway_extproc.render import chart_values, merge

from .test_chart_k8s import KUBE_VERSIONS, container, manifests, objects, one

DIGEST = "sha256:" + "ab" * 32


def render(chart: helm_python.Chart, values: dict[str, Any], name: str = "gw") -> list[dict[str, Any]]:
    return manifests(chart.render(values, name=name, namespace="ai-platform"))


def gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [d for d in objects(docs, "Deployment")
               if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    return found


def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return gateway(docs)["spec"]["template"]["spec"]


def everything_on() -> dict[str, Any]:
    """Values that render every optional object, so name and label checks cover them all."""
    return merge(chart_values([]), {
        "deployment": {"replicas": 2},
        "budgets": {"store": "redis", "redis": {"url": "redis://gw-redis:6379/0"}},
        "redis": {"dev": {"enabled": True}},
        "ingress": {"enabled": True}, "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}]},
        "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                       "grafanaDashboard": {"enabled": True}}})


@pytest.mark.parametrize(("release", "override", "base"), [
    ("gateway-extproc", {}, "gateway-extproc"),
    ("prod-gateway-extproc", {}, "prod-gateway-extproc"),
    ("gw", {}, "gw-gateway-extproc"),
    ("gw", {"nameOverride": "llm"}, "gw-llm"),
    ("gw", {"fullnameOverride": "ai-gateway"}, "ai-gateway"),
], ids=["release-is-chart-name", "release-contains-it", "plain", "nameOverride", "fullnameOverride"])
def test_object_names_are_never_doubled_and_overrides_apply(chart: helm_python.Chart, release: str,
                                                            override: dict[str, Any], base: str) -> None:
    values = merge(everything_on(), override)
    values["budgets"]["redis"]["url"] = f"redis://{base}-redis:6379/0"
    docs = render(chart, values, name=release)
    names = {d["metadata"]["name"] for d in docs}
    assert gateway(docs)["metadata"]["name"] == base
    assert all(n == base or n.startswith(base + "-") for n in names), names
    assert not any("gateway-extproc-gateway-extproc" in n for n in names)
    assert pod(docs)["volumes"][0]["configMap"]["name"] == f"{base}-config"
    app = override.get("nameOverride", "gateway-extproc")
    assert {d["metadata"]["labels"]["app.kubernetes.io/name"] for d in docs} == {app}
    selector = gateway(docs)["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/name"] == app
    assert one(docs, "Service", base)["spec"]["selector"] == selector


def test_common_labels_reach_every_object_and_pod_but_no_selector(chart: helm_python.Chart) -> None:
    docs = render(chart, merge(everything_on(), {"commonLabels": {"team": "platform", "cost-center": "42"}}))
    for doc in docs:
        assert doc["metadata"]["labels"]["team"] == "platform", doc["kind"]
    assert pod_labels(docs)["cost-center"] == "42"
    for doc in objects(docs, "Deployment"):
        assert "team" not in doc["spec"]["selector"]["matchLabels"]
    for svc in objects(docs, "Service"):
        assert "team" not in svc["spec"]["selector"]
    assert "team" not in one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return gateway(docs)["spec"]["template"]["metadata"]["labels"]


def test_an_image_digest_pins_the_image(chart: helm_python.Chart) -> None:
    docs = render(chart, merge(chart_values([]), {"deployment": {
        "extproc": {"image": {"repository": "registry.example.com/gateway-extproc", "tag": "0.1.0", "digest": DIGEST}},
        "envoy": {"image": {"digest": DIGEST}}}}))
    assert container(docs, "extproc")["image"] == f"registry.example.com/gateway-extproc@{DIGEST}"
    assert container(docs, "envoy")["image"] == f"envoyproxy/envoy@{DIGEST}"
    # Without a digest: repository:tag, the extproc's tag defaulting to the chart's appVersion.
    docs = render(chart, chart_values([]))
    assert container(docs, "extproc")["image"] == "gateway-extproc:0.1.0"
    with pytest.raises(helm_python.HelmValuesError, match="digest"):
        render(chart, merge(chart_values([]), {"deployment": {"extproc": {"image": {"digest": "latest"}}}}))


def test_extra_env_env_from_and_volumes_go_to_the_container_named(chart: helm_python.Chart) -> None:
    otel = {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability:4317"}
    headers = {"name": "OTEL_EXPORTER_OTLP_HEADERS",
               "valueFrom": {"secretKeyRef": {"name": "otel-auth", "key": "headers"}}}
    docs = render(chart, merge(chart_values([]), {"deployment": {
        "extproc": {"extraEnv": [otel, headers], "extraEnvFrom": [{"configMapRef": {"name": "otel-settings"}}],
                    "extraVolumeMounts": [{"name": "policies", "mountPath": "/etc/policies", "readOnly": True}]},
        "envoy": {"extraEnv": [{"name": "ENVOY_EXTRA", "value": "1"}],
                  "extraVolumeMounts": [{"name": "scratch", "mountPath": "/var/scratch"}]},
        "extraVolumes": [{"name": "policies", "configMap": {"name": "policies"}},
                         {"name": "scratch", "emptyDir": {}}]}}))
    envoy, extproc = container(docs, "envoy"), container(docs, "extproc")
    assert extproc["env"][-2:] == [otel, headers] and otel not in envoy["env"]
    assert extproc["env"][0]["name"] == "OPENAI_API_KEY"  # the chart's own Secret env stays
    assert extproc["envFrom"] == [{"configMapRef": {"name": "otel-settings"}}] and "envFrom" not in envoy
    assert {"name": "ENVOY_EXTRA", "value": "1"} in envoy["env"]
    assert {"name": "policies", "mountPath": "/etc/policies", "readOnly": True} in extproc["volumeMounts"]
    assert {"name": "scratch", "mountPath": "/var/scratch"} in envoy["volumeMounts"]
    assert [v["name"] for v in pod(docs)["volumes"]][-2:] == ["policies", "scratch"]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(one(docs, "Deployment"), version, strict=True)


def test_extra_env_cannot_shadow_a_secret_the_chart_fills(chart: helm_python.Chart) -> None:
    shadow = {"extraEnv": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}}]}
    values = merge(chart_values([]), {"deployment": {"envoy": shadow}})
    with pytest.raises(helm_python.HelmError, match="deployment.envoy.extraEnv sets OPENAI_API_KEY, which the chart "
                                                    "already fills from Secret openai-api-key"):
        render(chart, values)


def test_envoy_has_a_startup_probe_gating_liveness(chart: helm_python.Chart) -> None:
    envoy = container(render(chart, chart_values([])), "envoy")
    startup = envoy["startupProbe"]
    assert "GET /ready" in startup["exec"]["command"][-1]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert "initialDelaySeconds" not in envoy["livenessProbe"]


@pytest.mark.parametrize(("scale", "protected"), [
    ({}, False),
    ({"deployment": {"replicas": 3}}, True),
    ({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}, False),
    ({"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}, True),
], ids=["one-replica", "three-replicas", "hpa-min-1", "hpa-min-2"])
def test_a_pdb_exists_only_where_it_keeps_a_pod_up(chart: helm_python.Chart, scale: dict[str, Any],
                                                   protected: bool) -> None:
    rendered = chart.render(merge(chart_values([]), scale), name="gw", namespace="ai-platform")
    pdbs = objects(manifests(rendered), "PodDisruptionBudget")
    assert len(pdbs) == protected
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    assert ("no PodDisruptionBudget is rendered" in notes) != protected
    if protected:
        assert pdbs[0]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize(("override", "message"), [
    ({"budgets": {"store": "redis", "redis": {"url": "redis://:s3cret@redis:6379/0"}}},
     "budgets.redis.url carries a password"),
    ({"budgets": {"store": "redis", "redis": {"url": "rediss://app:s3cret@redis:6380/0"}}},
     "budgets.redis.url carries a password"),
    ({"budgets": {"store": "redis", "redis": {"url": "redis://redis:6379/0?password=s3cret"}}},
     "budgets.redis.url carries a password"),
    ({"providers": [{"name": "openai", "kind": "gemini", "credential": {"env": "K"},
                     "baseURL": "https://generativelanguage.googleapis.com/v1beta?key=s3cret"}]},
     r"providers\[0\].baseURL \(openai\) carries a credential in its query \(key=\)"),
    ({"providers": [{"name": "openai", "kind": "azure", "credential": {"env": "K"}, "apiVersion": "1",
                     "baseURL": "https://x.openai.azure.com/openai?api-version=1&api-key=s3cret"}]},
     r"carries a credential in its query \(api-key=\)"),
    ({"providers": [{"name": "openai", "kind": "openai", "credential": {"env": "K"},
                     "baseURL": "https://s3cret@llm.internal/v1"}]},
     r"providers\[0\].baseURL \(openai\) carries user:password@"),
], ids=["redis-password", "rediss-user-password", "redis-query", "gemini-key", "azure-api-key", "userinfo"])
def test_credentials_inside_urls_are_refused_with_the_secret_to_use(chart: helm_python.Chart,
                                                                    override: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message) as err:
        render(chart, merge(chart_values([]), override))
    assert "s3cret" not in str(err.value)
    assert "secret" in str(err.value).lower()


def test_urls_without_credentials_still_render(chart: helm_python.Chart) -> None:
    docs = render(chart, merge(chart_values([]), {
        "budgets": {"store": "redis", "redis": {"url": "rediss://app@redis:6380/0", "passwordEnv": "REDIS_PASSWORD",
                                                 "passwordSecret": {"name": "redis-auth", "key": "password"}}},
        "providers": [{"name": "openai", "kind": "azure",
                       "credential": {"env": "K", "secret": {"name": "k", "key": "k"}},
                       "baseURL": "https://x.openai.azure.com", "apiVersion": "2024-10-21"}]}))
    assert "REDIS_PASSWORD" in [e["name"] for e in container(docs, "extproc")["env"]]


def test_service_monitor_takes_namespace_selector_honor_labels_and_relabelings(chart: helm_python.Chart) -> None:
    relabel = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    drop = {"sourceLabels": ["__name__"], "regex": "genai_gateway_redis_.*", "action": "drop"}
    docs = render(chart, merge(chart_values([]), {"monitoring": {"serviceMonitor": {
        "enabled": True, "namespaceSelector": {"matchNames": ["ai-platform"]}, "honorLabels": True,
        "relabelings": [relabel], "metricRelabelings": [drop]}}}))
    spec = one(docs, "ServiceMonitor")["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["ai-platform"]}
    # The alert rules select job="gateway-extproc": the job comes from the chart name, not the release.
    assert spec["jobLabel"] == "app.kubernetes.io/name"
    assert one(docs, "Service", "-metrics")["metadata"]["labels"]["app.kubernetes.io/name"] == "gateway-extproc"
    extproc, envoy = spec["endpoints"]
    assert (extproc["port"], extproc["path"]) == ("metrics", "/metrics")
    assert extproc["honorLabels"] is True
    assert extproc["relabelings"] == [relabel] and extproc["metricRelabelings"] == [drop]
    # Envoy's stats under a job of their own: up{job="gateway-extproc"} stays the ext_proc's.
    assert (envoy["port"], envoy["path"]) == ("envoy-metrics", "/stats/prometheus")
    assert envoy["relabelings"] == [{"targetLabel": "job", "replacement": "gateway-extproc-envoy"}, relabel]
    defaults = one(render(chart, merge(chart_values([]), {"monitoring": {"serviceMonitor": {"enabled": True}}})),
                   "ServiceMonitor")["spec"]
    assert "namespaceSelector" not in defaults and defaults["endpoints"][0]["honorLabels"] is False


def test_helm_test_pod_is_a_hook_the_network_policy_lets_in(chart: helm_python.Chart) -> None:
    docs = render(chart, merge(chart_values([]), {"networkPolicy": {"ingress": {"namespaces": ["apps"]}}}))
    [pod] = objects(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["image"] == container(docs, "extproc")["image"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    [api] = [r for r in one(docs, "NetworkPolicy", "gw-gateway-extproc")["spec"]["ingress"]
             if r["ports"][0]["port"] == "http"]
    test_peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway-extproc",
                                                 "app.kubernetes.io/instance": "gw",
                                                 "app.kubernetes.io/component": "test"}}}
    assert test_peer in api["from"]
    assert test_peer["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # mTLS: the test pod has no client certificate, so there is no test pod.
    mtls = {"envoy": {"tls": {"enabled": True, "certificate": {"secretName": "tls"},
                              "clientCA": {"enabled": True, "secretName": "ca"}}}}
    assert objects(render(chart, merge(chart_values([]), mtls)), "Pod") == []


def test_tracing_turns_on_envoys_tracer_and_points_the_extproc_at_the_same_collector(chart: helm_python.Chart) -> None:
    values = merge(chart_values([]), {"tracing": {"otlp": {"address": "otel.observability.svc", "port": 4317},
                                                  "samplingPercent": 10}})
    docs = render(chart, values)
    envoy = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["spawn_upstream_span"] is True and hcm["tracing"]["random_sampling"] == {"value": 10}
    [collector] = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "otlp_collector"]
    address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "otel.observability.svc", "port_value": 4317}
    assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel.observability.svc:4317"} in \
        container(docs, "extproc")["env"]
    egress = one(docs, "NetworkPolicy", "gw-gateway-extproc")["spec"]["egress"]
    assert {"ports": [{"port": 4317, "protocol": "TCP"}]} in egress
    # Off by default: no tracer, no collector, no variable.
    docs = render(chart, chart_values([]))
    envoy = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["envoy.yaml"])
    assert "tracing" not in envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in {e["name"] for e in container(docs, "extproc").get("env", [])}
    with pytest.raises(helm_python.HelmError, match="OTEL_EXPORTER_OTLP_ENDPOINT, which tracing.otlp already sets"):
        render(chart, merge(values, {"deployment": {"extproc": {"extraEnv": [
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://other:4317"}]}}}))


def test_chart_metadata_names_what_the_chart_is_for() -> None:
    import yaml
    from pathlib import Path
    meta = yaml.safe_load((Path(__file__).parents[1] / "helm/gateway-extproc/Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["type"] == "application" and meta["kubeVersion"]
    assert {"ai-gateway", "envoy", "ext-proc"} <= set(meta["keywords"])


@pytest.mark.parametrize(("override", "message"), [
    ({"deployment": {"replicas": 3}, "podDisruptionBudget": {"maxUnavailable": 0}},
     r"podDisruptionBudget\.maxUnavailable 0 lets no pod go: every node drain would hang"),
    ({"deployment": {"replicas": 3}, "podDisruptionBudget": {"maxUnavailable": "0%"}},
     r"podDisruptionBudget\.maxUnavailable 0% lets no pod go"),
    ({"deployment": {"replicas": 3}, "podDisruptionBudget": {"minAvailable": 3}},
     r"podDisruptionBudget\.minAvailable 3 keeps all 3 replicas up"),
    ({"autoscaling": {"enabled": True, "minReplicas": 2}, "podDisruptionBudget": {"minAvailable": "100%"}},
     r"podDisruptionBudget\.minAvailable 100% keeps all"),
], ids=["max-unavailable-0", "max-unavailable-0-percent", "min-available-all", "min-available-100-percent"])
def test_a_pdb_that_would_block_every_drain_fails_the_render(chart: helm_python.Chart, override: dict[str, Any],
                                                             message: str) -> None:
    """Kubernetes takes such a PDB, and then no voluntary eviction ever succeeds: node drains
    and cluster upgrades hang on the gateway's pods (the chart skips the PDB at one replica for
    the same reason)."""
    with pytest.raises(helm_python.HelmError, match=message):
        chart.render(merge(chart_values([]), override), name="gw", namespace="ai-platform")


@pytest.mark.parametrize("container", ["envoy", "extproc"])
def test_autoscaling_without_a_cpu_request_fails_the_render(chart: helm_python.Chart, container: str) -> None:
    """The HPA's CPU utilization is usage over every container's CPU request; with one missing
    it reports no metric and never scales, silently."""
    values = merge(chart_values([]), {"autoscaling": {"enabled": True}})
    values["deployment"][container]["resources"]["requests"] = {"cpu": None}  # (null removes the default)
    with pytest.raises(helm_python.HelmError,
                       match=rf"autoscaling\.enabled needs deployment\.{container}\.resources\.requests\.cpu"):
        chart.render(values, name="gw", namespace="ai-platform")
