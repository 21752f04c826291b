"""The chart as a Kubernetes install: rendered with the real Helm engine (helm-python-sdk) for
the defaults and every helm/examples/*.yaml, lint-clean, every manifest valid against the
Kubernetes schemas (kubernetes-validate), every envoy.yaml accepted by `envoy --mode validate`,
and the rules a cluster admin relies on: no secret in a ConfigMap, config changes roll pods,
budgets never split across replicas, typos in values rejected by values.schema.json."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.localstack import envoy_binary
from gateway_extproc.render import CHART, chart_values, merge

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "helm" / "examples").glob("*.yaml"))
CASES = {"defaults": [], "local": [REPO / "helm" / "values-local.yaml"], **{p.stem: [p] for p in EXAMPLES}}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas here.
KUBE_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
# Custom resources kubernetes-validate has no schema for; checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
             ("gateway.networking.k8s.io/v1", "HTTPRoute")}


def render(chart: helm_python.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name="gw", namespace="ai-platform")


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object (NOTES.txt is the install message, not a manifest)."""
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    [found] = [d for d in objects(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    return found


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap", "-config")["data"]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "gw-gateway-extproc")["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [c] = [c for c in pod_spec(docs)["containers"] if c["name"] == name]
    return c


def with_local_paths(values: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Point configDir and the TLS directories into tmp, so the rendered envoy.yaml can be
    validated here with its SDS files and certificates in place."""
    values = copy.deepcopy(values)
    values["configDir"] = str(tmp / "config")
    tls = values["envoy"]["tls"]
    tls["certificate"]["dir"] = str(tmp / "tls")
    tls["clientCA"]["dir"] = str(tmp / "client-ca")
    return values


def write_config_dir(docs: list[dict[str, Any]], values: dict[str, Any]) -> Path:
    """The config ConfigMap as Kubernetes would mount it at configDir."""
    config_dir = Path(values["configDir"])
    config_dir.mkdir(parents=True, exist_ok=True)
    for name, text in config_map(docs).items():
        (config_dir / name).write_text(text)
    return config_dir


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"mtls", "three-providers-fallback", "hpa", "monitoring"}


@pytest.mark.parametrize("case", CASES)
def test_lints_clean_in_strict_mode(case: str) -> None:
    report = helm_python.lint(str(CHART), chart_values(CASES[case]), strict=True, namespace="ai-platform")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_validates_against_kubernetes_schemas(chart: helm_python.Chart, case: str) -> None:
    docs = manifests(render(chart, chart_values(CASES[case])))
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            assert doc["metadata"]["name"] and isinstance(doc["spec"], dict)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid on Kubernetes {version}: {exc}")
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "gateway-extproc"
        assert labels["app.kubernetes.io/instance"] == "gw"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert {"app.kubernetes.io/version", "helm.sh/chart", "app.kubernetes.io/component"} <= labels.keys() or \
            doc["kind"] == "ConfigMap"
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "NetworkPolicy"} <= kinds
    values = chart_values(CASES[case])
    always = values["autoscaling"]["minReplicas"] if values["autoscaling"]["enabled"] else values["deployment"]["replicas"]
    assert ("PodDisruptionBudget" in kinds) == (always > 1)


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_envoy_yaml_passes_envoy_validate(chart: helm_python.Chart, case: str, tmp_path: Path) -> None:
    values = with_local_paths(chart_values(CASES[case]), tmp_path)
    docs = manifests(render(chart, values))
    config_dir = write_config_dir(docs, values)
    if values["envoy"]["tls"]["enabled"]:
        pki = write_pki(tmp_path)
        for d in ("tls", "client-ca"):
            (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / "tls" / "tls.crt").write_bytes(pki["server.crt"])
        (tmp_path / "tls" / "tls.key").write_bytes(pki["server.key"])
        (tmp_path / "client-ca" / "ca.crt").write_bytes(pki["ca.crt"])
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_dir / "envoy.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config.parse(yaml.safe_load((config_dir / "gateway.yaml").read_text()), f"{case}: gateway.yaml")


def write_pki(tmp: Path) -> dict[str, bytes]:
    from .integration.test_mtls import make_pki

    return make_pki()


# --- Workload ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_pods_are_locked_down(chart: helm_python.Chart, case: str) -> None:
    docs = manifests(render(chart, chart_values(CASES[case])))
    for deployment in objects(docs, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_envoy_and_extproc_share_the_socket_dir_and_both_are_probed(chart: helm_python.Chart) -> None:
    values = chart_values([])
    docs = manifests(render(chart, values))
    envoy, extproc = container(docs, "envoy"), container(docs, "extproc")
    assert envoy["image"] == "envoyproxy/envoy:v1.40.0"
    assert extproc["command"] == ["gateway-extproc", "serve", "--config", "/etc/gateway/gateway.yaml"]
    socket_dir = values["extproc"]["socketDir"]
    for c in (envoy, extproc):
        assert {"name": "sockets", "mountPath": socket_dir} in c["volumeMounts"]
        assert {"name": "config", "mountPath": "/etc/gateway", "readOnly": True} in c["volumeMounts"]
    # Envoy: admin /ready over loopback (admin never leaves the pod).
    assert "/dev/tcp/127.0.0.1/9901" in envoy["readinessProbe"]["exec"]["command"][-1]
    assert "GET /ready" in envoy["readinessProbe"]["exec"]["command"][-1]
    # ext_proc: gRPC health over every worker's Unix socket.
    probe = extproc["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["python3", "-c"] and "grpc_health" in probe[2]
    assert probe[3:] == [f"unix://{socket_dir}/extproc-{i}.sock" for i in range(values["extproc"]["processes"])]
    assert extproc["livenessProbe"]["exec"]["command"] == probe


def test_envoy_drains_before_the_extproc_is_stopped(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, chart_values([])))
    envoy, extproc = container(docs, "envoy"), container(docs, "extproc")
    drain = int(envoy["args"][envoy["args"].index("--drain-time-s") + 1])
    pre_stop = envoy["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "POST /drain_listeners?graceful" in pre_stop and pre_stop.rstrip().endswith(f"sleep {drain}")
    assert extproc["lifecycle"]["preStop"]["sleep"]["seconds"] > drain
    # ...and the ext_proc's own 30 s drain after SIGTERM fits in the grace period.
    assert pod_spec(docs)["terminationGracePeriodSeconds"] >= extproc["lifecycle"]["preStop"]["sleep"]["seconds"] + 30


def test_a_grace_period_shorter_than_the_drain_fails_the_render(chart: helm_python.Chart) -> None:
    values = merge(chart_values([]), {"deployment": {"terminationGracePeriodSeconds": 30}})
    with pytest.raises(helm_python.HelmError, match=r"terminationGracePeriodSeconds \(30\) must be at least"):
        render(chart, values)


def test_hpa_owns_the_replica_count(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, chart_values([REPO / "helm" / "examples" / "hpa.yaml"])))
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert "replicas" not in one(docs, "Deployment")["spec"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    spread = pod_spec(docs)["topologySpreadConstraints"]
    assert [t["topologyKey"] for t in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]


BUDGETED = {"teams": [{"name": "t", "budget": {"daily": 5}}], "extproc": {"processes": 1},
            "models": [{"name": "m", "backends": [{"provider": "openai", "model": "x",
                                                   "pricing": {"input": 1, "output": 1}}]}]}


@pytest.mark.parametrize("scale", [{"deployment": {"replicas": 3}},
                                   {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}}],
                         ids=["replicas", "hpa"])
def test_several_replicas_with_the_memory_store_fail_the_render(chart: helm_python.Chart,
                                                                scale: dict[str, Any]) -> None:
    values = merge(merge(merge(chart_values([]), BUDGETED), scale), {"budgets": {"devMemoryStore": True}})
    with pytest.raises(helm_python.HelmError, match="budgets.store is memory but up to [35] replicas run"):
        render(chart, values)
    # Without budgets nothing is shared, and with Redis everything is: both render.
    render(chart, merge(merge(chart_values([]), scale), {}))
    render(chart, merge(values, {"budgets": {"store": "redis", "redis": {"url": "redis://redis:6379/0"}}}))


@pytest.mark.parametrize("spend", [BUDGETED, {"keys": [{"id": "k", "sha256": "0" * 64, "team": "t",
                                                        "rateLimits": {"requestsPerMinute": 5}}]},
                                   {"identity": {"workloads": {"principals": [
                                       {"name": "w", "dns": "w.x.svc", "team": "t", "budget": {"daily": 1}}]}}}],
                         ids=["team-budget", "key-rate-limit", "workload-budget"])
def test_a_single_replica_with_the_memory_store_and_budgets_fails_the_render(chart: helm_python.Chart,
                                                                              spend: dict[str, Any]) -> None:
    """A rollout replaces the pod: spend kept in memory would be forgotten and every budget
    would start again, so the memory store needs the explicit development flag."""
    values = merge(merge(chart_values([]), BUDGETED), spend)
    with pytest.raises(helm_python.HelmError, match="forgets recorded spend .* budgets.devMemoryStore: true"):
        render(chart, values)
    render(chart, merge(values, {"budgets": {"devMemoryStore": True}}))
    render(chart, merge(values, {"budgets": {"store": "redis", "redis": {"url": "redis://redis:6379/0"}}}))


def test_one_replica_with_the_dev_memory_store_renders(chart: helm_python.Chart) -> None:
    dev = merge(merge(chart_values([]), BUDGETED), {"budgets": {"devMemoryStore": True}})
    docs = manifests(render(chart, dev))
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    # ...with one ext_proc process, as gateway-extproc itself requires.
    with pytest.raises(helm_python.HelmError, match="budgets.store is memory, which one process holds, but "
                       "extproc.processes is 2"):
        render(chart, merge(dev, {"extproc": {"processes": 2}}))


def test_dev_redis_is_wired_and_fenced(chart: helm_python.Chart) -> None:
    values = merge(merge(chart_values([]), BUDGETED), {"deployment": {"replicas": 2}, "redis": {"dev": {"enabled": True}},
                                                       "budgets": {"store": "redis"}})
    with pytest.raises(helm_python.HelmError, match="redis://gw-gateway-extproc-redis:6379/0"):
        render(chart, values)
    values["budgets"]["redis"]["url"] = "redis://gw-gateway-extproc-redis:6379/0"
    docs = manifests(render(chart, values))
    redis = one(docs, "Deployment", "-redis")
    assert redis["spec"]["replicas"] == 1
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"].startswith("valkey/valkey:")
    assert one(docs, "Service", "-redis")["spec"]["ports"][0]["port"] == 6379
    fence = one(docs, "NetworkPolicy", "-redis")
    assert fence["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    egress = one(docs, "NetworkPolicy", "gw-gateway-extproc")["spec"]["egress"]
    [to_redis] = [r for r in egress if r.get("ports") == [{"port": 6379, "protocol": "TCP"}]]
    assert to_redis["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"


# --- Config and secrets -----------------------------------------------------------------


def checksum(chart: helm_python.Chart, values: dict[str, Any]) -> str:
    docs = manifests(render(chart, values))
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_checksum_rolls_pods_when_either_config_changes(chart: helm_python.Chart) -> None:
    base = chart_values([])
    before = checksum(chart, base)
    assert checksum(chart, merge(base, {"envoy": {"upstreamTimeout": "120s"}})) != before  # envoy.yaml
    assert checksum(chart, merge(base, {"teams": [{"name": "new"}]})) != before  # gateway.yaml
    assert checksum(chart, merge(base, {"envoy": {"tls": {"enabled": True}}})) != before  # SDS files
    # Only the Deployment changes: no config roll needed beyond the Deployment's own.
    assert checksum(chart, merge(base, {"deployment": {"podLabels": {"team": "ai"}}})) == before


SECRET_VALUES = ("-----BEGIN", "PRIVATE KEY", "sk-", "gwk_")


@pytest.mark.parametrize("case", CASES)
def test_no_secret_value_is_ever_in_a_configmap(chart: helm_python.Chart, case: str) -> None:
    docs = manifests(render(chart, chart_values(CASES[case])))
    assert objects(docs, "Secret") == []  # the chart only references existing Secrets
    for cm in objects(docs, "ConfigMap"):
        text = json.dumps(cm["data"]).replace("-----BEGIN PUBLIC KEY-----", "")  # the audit key, published
        assert not [s for s in SECRET_VALUES if s in text], cm["metadata"]["name"]


def test_credentials_come_from_secrets_env_in_both_containers_files_in_the_extproc(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, chart_values([REPO / "helm" / "examples" / "three-providers-fallback.yaml"])))
    envoy, extproc = container(docs, "envoy"), container(docs, "extproc")
    expected = [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai-api-key", "key": "api-key"}}},
                {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "token"}}}]
    assert envoy["env"] == expected and extproc["env"] == expected
    mount = {"name": "credentials-0", "mountPath": "/etc/gateway-credentials/groq", "readOnly": True}
    assert mount in extproc["volumeMounts"] and mount not in envoy["volumeMounts"]
    [volume] = [v for v in pod_spec(docs)["volumes"] if v["name"] == "credentials-0"]
    assert volume["projected"]["sources"] == [{"secret": {"name": "groq-api-key",
                                                          "items": [{"key": "api-key", "path": "api-key"}]}}]
    assert volume["projected"]["defaultMode"] == 0o440


def test_redis_password_comes_from_a_secret_into_the_extproc_only(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, chart_values([REPO / "helm" / "examples" / "hpa.yaml"])))
    ref = {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}
    assert ref in container(docs, "extproc")["env"]
    assert ref not in container(docs, "envoy")["env"]


def test_a_secret_mounted_inside_the_config_dir_fails_the_render(chart: helm_python.Chart) -> None:
    values = merge(chart_values([]), {"envoy": {"tls": {"enabled": True, "certificate": {
        "secretName": "gw-tls", "dir": "/etc/gateway/tls"}}}})
    with pytest.raises(helm_python.HelmError, match="inside configDir /etc/gateway"):
        render(chart, values)


def test_mtls_listener_reads_certificates_through_sds_files_from_secrets(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, chart_values([REPO / "helm" / "examples" / "mtls.yaml"])))
    data = config_map(docs)
    envoy = yaml.safe_load(data["envoy.yaml"])
    [chain] = envoy["static_resources"]["listeners"][0]["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"] == \
        "/etc/gateway/sds-certificate.yaml"
    assert common["validation_context_sds_secret_config"]["sds_config"]["path_config_source"]["path"] == \
        "/etc/gateway/sds-client-ca.yaml"
    cert = yaml.safe_load(data["sds-certificate.yaml"])["resources"][0]["tls_certificate"]
    assert cert == {"certificate_chain": {"filename": "/etc/envoy/tls/tls.crt"},
                    "private_key": {"filename": "/etc/envoy/tls/tls.key"},
                    "watched_directory": {"path": "/etc/envoy/tls"}}
    ca = yaml.safe_load(data["sds-client-ca.yaml"])["resources"][0]["validation_context"]
    assert ca["trusted_ca"] == {"filename": "/etc/envoy/client-ca/ca.crt"}
    mounts = container(docs, "envoy")["volumeMounts"]
    assert {"name": "tls-certificate", "mountPath": "/etc/envoy/tls", "readOnly": True} in mounts
    assert {"name": "tls-client-ca", "mountPath": "/etc/envoy/client-ca", "readOnly": True} in mounts
    assert container(docs, "envoy")["ports"] == [{"name": "https", "containerPort": 8080, "protocol": "TCP"},
                                                 {"name": "envoy-metrics", "containerPort": 9902, "protocol": "TCP"}]
    [port] = one(docs, "Service", "gw-gateway-extproc")["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("https", 443, "https")


def test_tls_is_off_by_default_and_envoy_dir_has_no_transport_socket_on_the_listener(chart: helm_python.Chart) -> None:
    data = config_map(manifests(render(chart, chart_values([]))))
    assert set(data) == {"envoy.yaml", "gateway.yaml"}
    [chain] = yaml.safe_load(data["envoy.yaml"])["static_resources"]["listeners"][0]["filter_chains"]
    assert "transport_socket" not in chain


# --- Networking -------------------------------------------------------------------------


def test_network_policy_allows_dns_providers_and_named_namespaces_only(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, chart_values([REPO / "helm" / "examples" / "three-providers-fallback.yaml"])))
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    dns, providers, extra = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert sorted(p["port"] for p in providers["ports"]) == [443, 8000]
    blocks = [t["ipBlock"] for t in providers["to"]]
    assert blocks[0]["cidr"] == "0.0.0.0/0" and "169.254.0.0/16" in blocks[0]["except"]
    assert "10.0.0.0/8" in blocks[0]["except"]
    assert extra["ports"] == [{"port": 8000, "protocol": "TCP"}]
    # Envoy admin is on loopback, the ext_proc on Unix sockets: only the API and metrics ports.
    assert [r["ports"][0]["port"] for r in policy["ingress"]] == ["http", "metrics"]

    docs = manifests(render(chart, chart_values([REPO / "helm" / "examples" / "mtls.yaml"])))
    api, metrics = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert api["ports"] == [{"port": "https", "protocol": "TCP"}]
    assert api["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["payments", "search", "ai-platform"]
    assert metrics["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["monitoring"]


def test_ingress_and_httproute_point_at_the_service(chart: helm_python.Chart) -> None:
    values = merge(chart_values([]), {
        "ingress": {"enabled": True, "className": "nginx"},
        "httpRoute": {"enabled": True, "parentRefs": [{"name": "shared", "namespace": "gateway-system"}],
                      "hostnames": ["ai.example.com"]}})
    docs = manifests(render(chart, values))
    kubernetes_validate.validate(one(docs, "Ingress"), KUBE_VERSIONS[-1], strict=True)
    rule = one(docs, "Ingress")["spec"]["rules"][0]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "gw-gateway-extproc", "port": {"name": "http"}}
    route = one(docs, "HTTPRoute")["spec"]
    assert route["parentRefs"] == [{"name": "shared", "namespace": "gateway-system"}]
    assert route["rules"][0]["backendRefs"] == [{"name": "gw-gateway-extproc", "port": 80}]
    with pytest.raises(helm_python.HelmError, match="httpRoute.parentRefs"):
        render(chart, merge(chart_values([]), {"httpRoute": {"enabled": True}}))


# --- Operations -------------------------------------------------------------------------


def test_monitoring_objects_carry_the_shipped_rules_and_dashboard(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, chart_values([REPO / "helm" / "examples" / "monitoring.yaml"])))
    files = CHART / "files"
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((files / "prometheus-rules.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    monitor = one(docs, "ServiceMonitor")
    metrics_service = one(docs, "Service", "-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == metrics_service["spec"]["ports"][0]["name"] == "metrics"
    dashboard = one(docs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["gateway-extproc.json"]) == json.loads((files / "grafana-dashboard.json").read_text())
    # The API Service never exposes /metrics.
    assert [p["name"] for p in one(docs, "Service", "gw-gateway-extproc")["spec"]["ports"]] == ["http"]


def test_grafana_sidecar_label_is_configurable(chart: helm_python.Chart) -> None:
    values = merge(chart_values([]), {"monitoring": {"grafanaDashboard": {
        "enabled": True, "sidecarLabel": "grafana.io/dashboard", "sidecarLabelValue": "genai"}}})
    labels = one(manifests(render(chart, values)), "ConfigMap", "-dashboard")["metadata"]["labels"]
    assert labels["grafana.io/dashboard"] == "genai" and "grafana_dashboard" not in labels


def test_notes_show_the_first_call(chart: helm_python.Chart) -> None:
    notes = render(chart, chart_values([]))["gateway-extproc/templates/NOTES.txt"]
    assert "kubectl -n ai-platform port-forward service/gw-gateway-extproc 8080:80" in notes
    assert "/v1/chat/completions" in notes and '"model": "default-chat"' in notes
    mtls = render(chart, chart_values([REPO / "helm" / "examples" / "mtls.yaml"]))["gateway-extproc/templates/NOTES.txt"]
    assert "--cert client.crt --key client.key" in mtls


# --- values.schema.json -----------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ({"envoy": {"lisener": {"port": 8080}}}, "at '/envoy': additional properties 'lisener' not allowed"),
    ({"deployment": {"replica": 2}}, "at '/deployment': additional properties 'replica' not allowed"),
    ({"providers": [{"name": "openai", "kind": "openai", "baseURL": "https://api.openai.com/v1",
                     "credential": {"value": "sk-abc"}}]}, "additional properties 'value' not allowed"),
    ({"envoy": {"upstreamTimeout": "5m"}}, "at '/envoy/upstreamTimeout'"),
    ({"budgets": {"store": "redis-cluster"}}, "at '/budgets/store'"),
    ({"teams": [{"name": "t", "budget": {"dayly": 5}}]}, "at '/teams/0/budget': additional properties 'dayly' not allowed"),
], ids=["envoy.lisener", "deployment.replica", "credential.value", "duration", "store", "budget.dayly"])
def test_schema_rejects_typos_with_a_clear_message(chart: helm_python.Chart, override: dict[str, Any],
                                                   message: str) -> None:
    values = merge(chart_values([]), override)
    with pytest.raises(helm_python.HelmValuesError) as err:
        render(chart, values)
    assert message in str(err.value)
    report = helm_python.lint(str(CHART), values, strict=True)
    assert any(message in e for e in report["errors"])


def test_a_credential_with_both_env_and_file_fails_the_render(chart: helm_python.Chart) -> None:
    values = merge(chart_values([]), {"providers": [{"name": "openai", "kind": "openai", "baseURL": "https://x/v1",
                                                     "credential": {"env": "A", "file": "/etc/k/a"}}]})
    with pytest.raises(helm_python.HelmError, match=r"providers\[0\].credential \(openai\) has both env and file"):
        render(chart, values)


def test_schema_accepts_sections_owned_elsewhere(chart: helm_python.Chart) -> None:
    """classification is validated by the ext_proc; the schema only asks for an object."""
    values = merge(chart_values([REPO / "helm" / "values-local.yaml"]), {"classification": {"anythingNew": {"x": 1}}})
    render(chart, values)


def test_an_internal_provider_ca_is_mounted_into_envoy_and_trusted(chart: helm_python.Chart) -> None:
    values = chart_values([])
    values["envoy"]["upstreamCA"] = {"secretName": "provider-ca", "key": "bundle.pem", "dir": "/etc/envoy/provider-ca"}
    docs = manifests(render(chart, values))
    envoy = yaml.safe_load(config_map(docs)["envoy.yaml"])
    trusted = {c["transport_socket_matches"][0]["transport_socket"]["typed_config"]["common_tls_context"]
               ["validation_context"]["trusted_ca"]["filename"] for c in envoy["static_resources"]["clusters"]
               if c["name"].startswith("model.")}
    assert trusted == {"/etc/envoy/provider-ca/bundle.pem"}
    assert {"name": "upstream-ca", "mountPath": "/etc/envoy/provider-ca", "readOnly": True} in \
        container(docs, "envoy")["volumeMounts"]
    values["envoy"]["upstreamCA"]["dir"] = ""
    with pytest.raises(helm_python.HelmError, match="envoy.upstreamCA.dir is empty"):
        render(chart, values)


@pytest.mark.parametrize(("override", "warning"), [
    ({"envoy": {"upstreamCA": {"secretName": "", "key": "ca.crt", "dir": "/etc/envoy/provider-ca"}}},
     "envoy.upstreamCA.dir without envoy.upstreamCA.secretName: nothing is mounted at /etc/envoy/provider-ca"),
    ({"envoy": {"listener": {"address": "::1", "port": 8080}}}, "envoy.listener.address is ::1, which the Service"),
], ids=["provider-ca-not-mounted", "ipv6-loopback-listener"])
def test_notes_warn_of_a_pod_that_renders_but_cannot_serve(chart: helm_python.Chart, override: dict[str, Any],
                                                            warning: str) -> None:
    """Envoy reads the provider CA bundle at start (every model cluster names it): with a
    directory and no Secret behind it, the pod crash-looped ("Invalid path") after a clean
    install. Outside Kubernetes the file is the operator's to place, so it is a warning."""
    notes = render(chart, merge(chart_values([]), override))["gateway-extproc/templates/NOTES.txt"]
    assert warning in notes
    if "upstreamCA" in override["envoy"]:  # mounted by the operator's own volume: nothing to warn of
        mounted = merge(chart_values([]), merge(override, {"deployment": {
            "envoy": {"extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/envoy/provider-ca"}]},
            "extraVolumes": [{"name": "ca", "configMap": {"name": "provider-ca"}}]}}))
        assert "envoy.upstreamCA.dir" not in render(chart, mounted)["gateway-extproc/templates/NOTES.txt"]


PRIVATE = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIS3cretS3cretS3cretS3cretS3cretS3cretS3cr\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(("override", "message"), [
    # the private key pasted where the public one goes: published in a ConfigMap for auditors
    ({"audit": {"enabled": True, "signingKey": {"secret": {"name": "audit-key"}}, "publicKey": PRIVATE}},
     r"audit\.publicKey holds a private key"),
    # a provider key as a literal extraEnv value: in the Deployment for anyone who can read it
    ({"deployment": {"extproc": {"extraEnv": [{"name": "OPENAI_API_KEY", "value": "sk-proj-S3cret"}]}}},
     r"deployment\.extproc\.extraEnv\[0\] \(OPENAI_API_KEY\) has a literal value"),
    ({"deployment": {"envoy": {"extraEnv": [{"name": "TZ", "value": "UTC"}, {"name": "HF_TOKEN", "value": "hf_S3cret"}]}}},
     r"deployment\.envoy\.extraEnv\[1\] \(HF_TOKEN\) has a literal value"),
    ({"budgets": {"redis": {"passwordEnv": "REDIS_AUTH"}},
      "deployment": {"extproc": {"extraEnv": [{"name": "REDIS_AUTH", "value": "S3cret"}]}}},
     r"deployment\.extproc\.extraEnv\[0\] \(REDIS_AUTH\) has a literal value"),
], ids=["private-key-as-public", "provider-key-literal", "token-literal", "redis-password-literal"])
def test_a_secret_pasted_into_rendered_text_fails_without_echoing_it(chart: helm_python.Chart,
                                                                   override: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message) as err:
        render(chart, merge(chart_values([]), override))
    assert "S3cret" not in str(err.value)
    assert "secretKeyRef" in str(err.value) or "through audit.signingKey.secret" in str(err.value)


def test_literal_env_values_that_are_no_credentials_render(chart: helm_python.Chart) -> None:
    env = [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}, {"name": "KEY_FILE", "value": "/etc/x/key"},
           {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai-api-key", "key": "api-key"}}}]
    values = merge(chart_values([]), {"providers": [{"name": "openai", "kind": "openai",
                                                     "baseURL": "https://api.openai.com/v1",
                                                     "credential": {"env": "OPENAI_API_KEY"}}],
                                      "deployment": {"extproc": {"extraEnv": env}}})
    assert [e["name"] for e in container(manifests(render(chart, values)), "extproc")["env"]][-3:] == \
        [e["name"] for e in env]


SECRET = "S3cretValue1234567890abcdef"


@pytest.mark.parametrize(("override", "key"), [
    ({"teams": [{"name": "t"}], "keys": [{"id": "k1", "sha256": f"gwk_k1_{SECRET}", "team": "t"}]}, r"keys\[0\]\.sha256"),
    ({"teams": [{"name": "t"}], "keys": [{"id": f"gwk_{SECRET}", "sha256": "a" * 64, "team": "t"}]}, r"keys\[0\]\.id"),
    ({"providers": [{"name": "openai", "kind": "openai", "baseURL": "https://api.openai.com/v1",
                     "credential": {"env": f"sk-proj-{SECRET}"}}]}, r"providers\[0\]\.credential\.env"),
    ({"identity": {"keyAdmin": {"enabled": True, "admins": [{"name": "ops", "sha256": f"gwa_{SECRET}"}]}}},
     r"identity\.keyAdmin\.admins\[0\]\.sha256"),
    ({"providers": [{"name": "openai", "kind": "openai", "baseURL": f"https://user:{SECRET}@llm.internal/v1",
                     "credential": {"env": "K"}}]}, r"providers\[0\]\.baseURL"),
    ({"budgets": {"store": "redis", "redis": {"url": f"redis://:{SECRET}@redis:6379/budgets"}}}, r"budgets\.redis\.url"),
], ids=["key-as-sha256", "key-as-id", "provider-key-as-env", "admin-token-as-sha256", "password-in-base-url",
        "redis-password-and-bad-db"])
def test_helm_never_echoes_a_secret_pasted_into_the_wrong_field(chart: helm_python.Chart, override: dict[str, Any],
                                                               key: str) -> None:
    """The Helm CLI prints a schema pattern's refused value ('<value>' does not match pattern…):
    `helm install` and `helm lint` put a key pasted as a hash, an id or a variable name, or a
    password in a URL, on the terminal and in CI logs. These fields are checked by the chart's
    templates instead, which name the key and the fix and never the value (`helm install` and
    `helm template` stop on them; `helm lint` only logs a template's `fail`)."""
    values = merge(chart_values([]), override)
    with pytest.raises(helm_python.HelmError, match=key) as err:
        render(chart, values)
    assert SECRET not in str(err.value)
    # (helm lint runs templates with `fail` logged, not raised: it reports nothing, and echoes nothing)
    assert SECRET not in json.dumps(helm_python.lint(str(CHART), values, strict=True))


@pytest.mark.parametrize(("override", "message"), [
    ({"extproc": {"socketDir": "/tmp"}}, r"extproc\.socketDir and the ext_proc's /tmp are both mounted at /tmp"),
    ({"extproc": {"socketDir": "/etc/gateway"}}, r"configDir and extproc\.socketDir are both mounted at /etc/gateway"),
    ({"extproc": {"socketDir": "/etc/gateway/sockets"}}, r"extproc\.socketDir \(/etc/gateway/sockets\) is inside configDir"),
    ({"audit": {"enabled": True, "dir": "/tmp", "signingKey": {"secret": {"name": "k"}}}},
     r"the ext_proc's /tmp and audit\.dir are both mounted at /tmp"),
    ({"deployment": {"envoy": {"extraVolumeMounts": [{"name": "x", "mountPath": "/etc/gateway/"}]},
                     "extraVolumes": [{"name": "x", "emptyDir": {}}]}},
     r"configDir and deployment\.envoy\.extraVolumeMounts are both mounted at /etc/gateway"),
], ids=["socket-dir-is-tmp", "socket-dir-is-config-dir", "socket-dir-in-config-dir", "audit-dir-is-tmp",
        "extra-mount-on-config-dir"])
def test_two_volumes_at_one_path_or_inside_the_config_map_fail_the_render(chart: helm_python.Chart,
                                                                         override: dict[str, Any], message: str) -> None:
    """Kubernetes refuses a container whose mount paths repeat (the install failed half-way with
    "must be unique"), and a volume inside the read-only ConfigMap mount cannot get its mount
    point (the container never started)."""
    with pytest.raises(helm_python.HelmError, match=message):
        render(chart, merge(chart_values([]), override))
