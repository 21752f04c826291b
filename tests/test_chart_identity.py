"""The chart's identity parts (docs/identity.md): XFCC filter chains, SAN matching,
jwt_authn with its rules and JWKS clusters, the claims namespace forwarded to the ext_proc,
and a JWKS Secret mounted in Kubernetes. Every render passes `envoy --mode validate`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import helm_python
import yaml

from gateway_extproc import config
from gateway_extproc.render import CHART, chart_values, render_values

from .test_chart import LOCAL, cluster, envoy_validate

JWKS = json.dumps({"keys": [{"kty": "RSA", "kid": "k", "alg": "RS256", "use": "sig", "e": "AQAB",
                             "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw"}]})


def identity_values(tls: bool = True) -> dict[str, Any]:
    v = chart_values([LOCAL])
    if tls:
        v["envoy"]["tls"] = {"enabled": True, "certificate": {"secretName": "", "dir": "/tls"},
                             "clientCA": {"enabled": True, "secretName": "", "key": "ca.crt", "dir": "/ca"}}
    v["teams"] += [{"name": "payments"}]
    v["identity"] = {
        "workloads": {"trustDomains": ["cluster.local", "prod.example"], "trustedProxies": ["127.0.0.6/32", "10.1.0.0/16"],
                      "principals": [{"name": "pay", "spiffe": "spiffe://cluster.local/ns/payments/sa/*",
                                      "team": "payments"},
                                     {"name": "web", "dns": "*.web.svc", "team": "demo"},
                                     {"name": "one", "dns": "one.svc", "team": "demo"}]},
        "oidc": {"providers": [
            {"name": "corp", "issuer": "https://idp.example", "audiences": ["gw"], "jwks": {"inline": JWKS},
             "teamClaim": "team"},
            {"name": "cloud", "issuer": "https://login.example", "defaultTeam": "demo",
             "jwks": {"remote": {"url": "https://login.example/keys", "cacheDuration": "300s"}}}]},
    }
    return v


def hcms(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    chains = envoy["static_resources"]["listeners"][0]["filter_chains"]
    return {c["name"]: c for c in chains}


def test_identity_render_validates_and_parses(tmp_path: Path) -> None:
    values = identity_values()
    values["configDir"] = str(tmp_path)  # the SDS files envoy.yaml names
    rendered = render_values(values)
    for name, text in rendered.items():
        (tmp_path / name).write_text(text)
    envoy_validate(rendered["envoy.yaml"], tmp_path)
    cfg = config.parse(yaml.safe_load(rendered["gateway.yaml"]), "gateway.yaml")
    assert [r.principal.id for r in cfg.identity.workloads] == ["workload:pay", "workload:web", "workload:one"]
    assert set(cfg.identity.oidc) == {"corp", "cloud"}


def test_xfcc_is_sanitized_except_from_trusted_proxies() -> None:
    chains = hcms(yaml.safe_load(render_values(identity_values())["envoy.yaml"]))
    assert set(chains) == {"direct", "trusted_proxy"}
    direct = chains["direct"]["filters"][0]["typed_config"]
    proxy = chains["trusted_proxy"]["filters"][0]["typed_config"]
    assert "filter_chain_match" not in chains["direct"]
    assert chains["trusted_proxy"]["filter_chain_match"]["source_prefix_ranges"] == [
        {"address_prefix": "127.0.0.6", "prefix_len": 32}, {"address_prefix": "10.1.0.0", "prefix_len": 16}]
    assert direct["forward_client_cert_details"] == "SANITIZE_SET"
    assert proxy["forward_client_cert_details"] == "APPEND_FORWARD"
    for hcm in (direct, proxy):
        assert hcm["set_current_client_cert_details"] == {"uri": True, "dns": True, "cert": True}
    # Both chains are the same listener otherwise (TLS, routes, filters).
    assert chains["direct"]["transport_socket"] == chains["trusted_proxy"]["transport_socket"]
    assert direct["route_config"] == proxy["route_config"] and direct["http_filters"] == proxy["http_filters"]


def test_a_trusted_proxys_xfcc_is_kept_on_a_listener_without_client_certificates() -> None:
    """APPEND_FORWARD drops XFCC from a connection that is not mTLS: behind a sidecar that
    connects in plain HTTP (docs/mesh.md), no workload would ever be identified."""
    for tls, client_ca in ((False, False), (True, False)):
        values = identity_values(tls=tls)
        if tls:
            values["envoy"]["tls"] = {"enabled": True, "certificate": {"secretName": "", "dir": "/tls"},
                                      "clientCA": {"enabled": client_ca, "secretName": "", "key": "ca.crt", "dir": "/ca"}}
        chains = hcms(yaml.safe_load(render_values(values)["envoy.yaml"]))
        assert chains["direct"]["filters"][0]["typed_config"]["forward_client_cert_details"] == "SANITIZE_SET"
        proxy = chains["trusted_proxy"]["filters"][0]["typed_config"]
        assert proxy["forward_client_cert_details"] == "ALWAYS_FORWARD_ONLY", (tls, client_ca)


def test_without_identity_there_is_one_sanitizing_chain() -> None:
    envoy = yaml.safe_load(render_values(chart_values([]))["envoy.yaml"])
    chains = envoy["static_resources"]["listeners"][0]["filter_chains"]
    assert len(chains) == 1
    hcm = chains[0]["filters"][0]["typed_config"]
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert [f["name"] for f in hcm["http_filters"]][0] == "envoy.filters.http.ext_proc"
    assert "forwarding_namespaces" not in hcm["http_filters"][0]["typed_config"]["metadata_options"]


def test_client_certificates_are_limited_to_the_trust_domains_in_envoy() -> None:
    envoy = yaml.safe_load(render_values(identity_values())["envoy.yaml"])
    tls = hcms(envoy)["direct"]["transport_socket"]["typed_config"]["common_tls_context"]
    matchers = tls["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert matchers == [
        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}},
        {"san_type": "URI", "matcher": {"prefix": "spiffe://prod.example/"}},
        {"san_type": "DNS", "matcher": {"suffix": ".web.svc"}},
        {"san_type": "DNS", "matcher": {"exact": "one.svc"}},
    ]
    assert tls["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == "client_ca"


def test_jwt_authn_runs_before_the_ext_proc_and_hands_over_claims_as_metadata() -> None:
    envoy = yaml.safe_load(render_values(identity_values())["envoy.yaml"])
    filters = hcms(envoy)["direct"]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in filters][:2] == ["envoy.filters.http.jwt_authn", "envoy.filters.http.ext_proc"]
    jwt = filters[0]["typed_config"]
    for name, provider in jwt["providers"].items():
        assert provider["payload_in_metadata"] == name and provider["forward"] is False
        # The scheme in every spelling (RFC 9110: case-insensitive), `Bearer ` first; nothing else.
        prefixes = [h["value_prefix"] for h in provider["from_headers"]]
        assert prefixes[0] == "Bearer " and {h["name"] for h in provider["from_headers"]} == {"authorization"}
        assert sorted(prefixes) == sorted({"".join(c) + " " for c in itertools.product(*zip("bearer", "BEARER"))})
        assert provider["require_expiration"] is True  # no `exp`: refused, not valid forever
    assert jwt["providers"]["cloud"]["remote_jwks"]["http_uri"]["cluster"] == "jwks.cloud"
    assert jwt["providers"]["cloud"]["remote_jwks"]["cache_duration"] == "300s"
    skip, verify = jwt["rules"]
    assert "requires" not in skip and skip["match"]["headers"][0]["string_match"] == {
        "safe_regex": {"regex": "(?i)bearer [ \\t]*gwk_.*"}}
    assert verify["requires"]["requires_any"]["requirements"] == [
        {"provider_name": "corp"}, {"provider_name": "cloud"}, {"allow_missing": {}}]
    ext_proc = filters[1]["typed_config"]
    assert ext_proc["metadata_options"]["forwarding_namespaces"] == {"untyped": ["envoy.filters.http.jwt_authn"]}
    remote = cluster(envoy, "jwks.cloud")
    assert remote["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "login.example", "port_value": 443}
    assert remote["transport_socket"]["typed_config"]["sni"] == "login.example"


def test_a_jwks_secret_is_mounted_in_envoy() -> None:
    v = identity_values(tls=False)
    v["identity"]["oidc"]["providers"][0]["jwks"] = {"file": "/etc/gateway-jwks/corp.json",
                                                     "secret": {"name": "corp-jwks", "key": "jwks.json"}}
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(v, name="gateway", namespace="default")
    finally:
        chart.close()
    spec = yaml.safe_load(out["gateway-extproc/templates/deployment.yaml"])["spec"]["template"]["spec"]
    volume = next(vol for vol in spec["volumes"] if vol["name"] == "jwks-0")
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "corp-jwks", "items": [{"key": "jwks.json", "path": "corp.json"}]}}]
    envoy = next(c for c in spec["containers"] if c["name"] == "envoy")
    assert {"name": "jwks-0", "mountPath": "/etc/gateway-jwks", "readOnly": True} in envoy["volumeMounts"]
