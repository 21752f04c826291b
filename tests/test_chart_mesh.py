"""The mesh examples (helm/examples/istio.yaml, linkerd.yaml; docs/mesh.md) stay consistent with
the chart they configure: the sidecar outlives Envoy's drain, scrape ports and provider ports
bypass it as documented, and the NetworkPolicy lets the sidecar reach its control plane.
(They also go through every check of tests/test_chart_k8s.py as CASES.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import pytest

from gateway_extproc.render import CHART, chart_values

from .test_chart_k8s import manifests, objects, one

EXAMPLES = Path(__file__).resolve().parents[1] / "helm" / "examples"


def rendered(example: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = chart_values([EXAMPLES / example])
    chart = helm_python.Chart.load(str(CHART))
    try:
        return values, manifests(chart.render(values, name="gateway-extproc", namespace="ai-platform"))
    finally:
        chart.close()


def pod_metadata(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "gateway-extproc")["spec"]["template"]["metadata"]


def egress_ports(docs: list[dict[str, Any]], namespace: str) -> set[int]:
    policy = one(docs, "NetworkPolicy", "gateway-extproc")
    return {p["port"] for rule in policy["spec"]["egress"] for peer in rule.get("to", [])
            if peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == namespace
            for p in rule["ports"]}


def ingress_ports(docs: list[dict[str, Any]]) -> set[Any]:
    policy = one(docs, "NetworkPolicy", "gateway-extproc")
    return {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}


def ports(annotation: str) -> set[int]:
    return {int(p) for p in annotation.split(",")}


def test_istio_sidecar_outlives_envoys_drain_and_reaches_istiod() -> None:
    values, docs = rendered("istio.yaml")
    meta = pod_metadata(docs)
    assert meta["labels"]["sidecar.istio.io/inject"] == "true"
    proxy = json.loads(meta["annotations"]["proxy.istio.io/config"])
    assert proxy["holdApplicationUntilProxyStarts"] is True
    assert int(proxy["terminationDrainDuration"].removesuffix("s")) > values["deployment"]["envoy"]["drainSeconds"]
    # Scrapes bypass the sidecar (plaintext under STRICT mTLS), provider calls leave directly.
    assert ports(meta["annotations"]["traffic.sidecar.istio.io/excludeInboundPorts"]) == {
        values["extproc"]["metrics"]["port"], values["envoy"]["metrics"]["port"]}
    assert ports(meta["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"]) == {443}
    assert egress_ports(docs, "istio-system") == {15012}
    assert 15020 in ingress_ports(docs)
    assert values["envoy"]["tls"]["enabled"] is False  # the mesh carries mTLS


def test_linkerd_proxy_outlives_envoys_drain_and_reaches_its_control_plane() -> None:
    values, docs = rendered("linkerd.yaml")
    annotations = pod_metadata(docs)["annotations"]
    assert annotations["linkerd.io/inject"] == "enabled"
    assert int(annotations["config.alpha.linkerd.io/proxy-wait-before-exit-seconds"]) > \
        values["deployment"]["envoy"]["drainSeconds"]
    assert ports(annotations["config.linkerd.io/skip-outbound-ports"]) == {443}
    assert egress_ports(docs, "linkerd") == {8080, 8086, 8090}
    assert 4191 in ingress_ports(docs)


@pytest.mark.parametrize("example", ["istio.yaml", "linkerd.yaml"])
def test_mesh_examples_keep_the_gateways_own_rules(example: str) -> None:
    _, docs = rendered(example)
    policy = one(docs, "NetworkPolicy", "gateway-extproc")
    assert {"http", "metrics", "envoy-metrics"} <= ingress_ports(docs)
    assert any(rule.get("ports") == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
               for rule in policy["spec"]["egress"])
    assert objects(docs, "Pod")  # helm test still runs (no mTLS on the gateway listener)
