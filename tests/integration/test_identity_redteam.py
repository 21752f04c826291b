"""Identity seams found by red-teaming, end to end through real Envoy and real clients.

One gateway on a plain-HTTP listener (as behind a mesh sidecar: docs/mesh.md) with a
trusted proxy address (127.0.0.2), a SPIFFE principal, an OIDC issuer (inline JWKS) and the
key admin API on a key file:

- a trusted proxy's XFCC over plain HTTP (Istio's sidecar connects so, from 127.0.0.6) names
  the workload; Envoy's APPEND_FORWARD dropped it on any connection that is not mTLS;
- a method of the caller's making (HTTP/2 takes any token) is never written to Envoy's log;
- a rejected token's `www-authenticate` does not echo the URL (a `?key=` in it) or the Host;
- an admin-created key id is exactly the id form (`$` let `id\\n` through).
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from gateway_extproc import keys
from gateway_extproc.localstack import free_port

from .conftest import DEMO_KEY, Gateway, build_gateway

PROXY = "127.0.0.2"
PAYMENTS_API = "spiffe://cluster.local/ns/payments/sa/api"
ADMIN_TOKEN = "gwa_redteam-" + keys.generate("a")[-16:]
JWKS = json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "e": "AQAB",
                             "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDX"
                                  "boIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4"
                                  "gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTA"
                                  "umiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw"}]})


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gw-redteam-id-") as tmp:
        def customize(values: dict[str, Any]) -> None:
            values["teams"] += [{"name": "payments"}]
            values["identity"] = {
                "workloads": {"trustedProxies": [f"{PROXY}/32"], "principals": [
                    {"name": "payments", "spiffe": "spiffe://cluster.local/ns/payments/sa/*", "team": "payments"}]},
                "oidc": {"providers": [{"name": "corp", "issuer": "https://idp.test", "audiences": ["gw"],
                                        "jwks": {"inline": JWKS}, "teamClaim": "team"}]},
                "keyAdmin": {"enabled": True, "address": "127.0.0.1", "port": port, "file": f"{tmp}/keys.json",
                             "admins": [{"name": "ops", "sha256": keys.digest(ADMIN_TOKEN)}]},
            }

        gateway = build_gateway(Path(tmp) / "stack", customize=customize)
        try:
            yield gateway
        finally:
            gateway.stack.stop()


def code(r: httpx.Response) -> str:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    return err["code"]


# -- a trusted proxy on a plain-HTTP listener ------------------------------------------------


def test_a_trusted_proxys_xfcc_over_plain_http_names_the_workload(gw: Gateway) -> None:
    """docs/mesh.md: the listener stays plaintext behind Istio's sidecar, which connects from
    127.0.0.6 (here 127.0.0.2) and passes the caller's SPIFFE ID in XFCC."""
    xfcc = {"x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/ai/sa/gw;Hash=abc;URI={PAYMENTS_API}"}
    with httpx.Client(transport=httpx.HTTPTransport(local_address=PROXY), timeout=10) as proxy:
        r = proxy.get(f"{gw.url}/v1/usage", headers=xfcc)
        assert r.status_code == 200, r.text
        assert (r.json()["key_id"], r.json()["team"]) == ("workload:payments", "payments")
        gw.reset()
        chat = proxy.post(f"{gw.url}/v1/chat/completions", headers=xfcc, json={
            "model": "default-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
        assert chat.status_code == 200, chat.text
    sent = [req for mock in (gw.primary, gw.backup) for req in gw.received(mock)]
    assert len(sent) == 1 and not any(k.lower() == "x-forwarded-client-cert" for k in sent[0]["headers"])
    # The same header from any other address is still dropped (and no key: 401).
    r = httpx.get(f"{gw.url}/v1/usage", headers=xfcc, timeout=10)
    assert r.status_code == 401 and code(r) == "missing_api_key", r.text
