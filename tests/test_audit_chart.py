"""The chart's `audit:` section: gateway.yaml carries it, the ext_proc gets its volume and
signing key Secret, the public key is published, and the rendered config loads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.render import chart_values

from .test_chart_k8s import config_map, container, manifests, one, pod_spec, render

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "helm" / "examples" / "audit.yaml"


def test_off_by_default(chart) -> None:
    docs = manifests(render(chart, chart_values([])))
    assert "audit" not in yaml.safe_load(config_map(docs)["gateway.yaml"])
    assert all(v["name"] != "audit" for v in pod_spec(docs)["volumes"])


def test_example_wires_volume_secret_and_public_key(chart) -> None:
    values = chart_values([EXAMPLE])
    docs = manifests(render(chart, values))
    gateway = yaml.safe_load(config_map(docs)["gateway.yaml"])
    assert gateway["audit"]["dir"] == "/var/lib/gateway-audit"
    assert gateway["audit"]["signingKeyFile"] == "/etc/gateway-audit/signing.key"
    cfg = config.parse(gateway, "gateway.yaml")
    assert cfg.audit is not None and cfg.audit.fsync == "interval" and cfg.audit.retention_days == 365
    mounts = {m["name"]: m for m in container(docs, "extproc")["volumeMounts"]}
    assert mounts["audit"]["mountPath"] == "/var/lib/gateway-audit" and not mounts["audit"].get("readOnly")
    assert mounts["audit-signing-key"]["mountPath"] == "/etc/gateway-audit" and mounts["audit-signing-key"]["readOnly"]
    assert "audit" not in {m["name"] for m in container(docs, "envoy")["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["audit"]["persistentVolumeClaim"]["claimName"] == "gw-audit"
    [source] = volumes["audit-signing-key"]["projected"]["sources"]
    assert source["secret"] == {"name": "gw-audit-signing-key", "items": [{"key": "signing.key", "path": "signing.key"}]}
    published = one(docs, "ConfigMap", "-audit-public-key")["data"]["audit-signing.pub"]
    assert published.startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in "".join(yaml.safe_dump(d) for d in docs)


def test_without_a_claim_the_trail_is_an_empty_dir(chart) -> None:
    values = copy.deepcopy(chart_values([EXAMPLE]))
    values["audit"]["persistence"] = {"existingClaim": "", "sizeLimit": "5Gi"}
    volumes = {v["name"]: v for v in pod_spec(manifests(render(chart, values)))["volumes"]}
    assert volumes["audit"] == {"name": "audit", "emptyDir": {"sizeLimit": "5Gi"}}


def test_schema_rejects_an_unknown_fsync_policy(chart) -> None:
    values = copy.deepcopy(chart_values([EXAMPLE]))
    values["audit"]["fsync"] = "sometimes"
    with pytest.raises(Exception, match="fsync"):
        render(chart, values)


def test_redis_stream_password_comes_from_a_secret_into_the_extproc_only(chart) -> None:
    values = copy.deepcopy(chart_values([EXAMPLE]))
    values["audit"]["redisStream"] = {"url": "redis://audit-redis:6379/0", "key": "gw:audit", "maxLen": 1000,
                                      "passwordEnv": "AUDIT_REDIS_PASSWORD",
                                      "passwordSecret": {"name": "audit-redis", "key": "password"}}
    docs = manifests(render(chart, values))
    gateway = yaml.safe_load(config_map(docs)["gateway.yaml"])
    assert gateway["audit"]["redisStream"] == {"url": "redis://audit-redis:6379/0", "key": "gw:audit", "maxLen": 1000,
                                               "passwordEnv": "AUDIT_REDIS_PASSWORD"}
    assert config.parse(gateway, "gateway.yaml").audit.redis.password_env == "AUDIT_REDIS_PASSWORD"
    env = {e["name"]: e for e in container(docs, "extproc").get("env", [])}
    assert env["AUDIT_REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "audit-redis", "key": "password"}}
    assert "AUDIT_REDIS_PASSWORD" not in {e["name"] for e in container(docs, "envoy").get("env", [])}
