"""Identity on a mesh-shaped listener, end to end through real Envoy and real clients.

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


# -- caller text in Envoy's own replies and log ----------------------------------------------


def _h2_request(gw: Gateway, headers: list[tuple[str, str]]) -> tuple[dict[bytes, bytes], bytes]:
    """One HTTP/2 request with exactly these headers (httpx would upper-case a method)."""
    host, port = gw.url.rsplit("//", 1)[1].split(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status: dict[bytes, bytes] = {}
        body = b""
        while True:
            data = sock.recv(65536)
            assert data, "Envoy closed the connection without an answer"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, body
            sock.sendall(conn.data_to_send())


def test_a_key_sent_as_an_http2_method_is_never_written_to_envoys_log(gw: Gateway) -> None:
    """HTTP/2 takes any token as a method; a refused token makes Envoy reply (and log) itself."""
    method = DEMO_KEY + "-" + "m" * 10_000
    headers, body = _h2_request(gw, [(":method", method), (":path", "/v1/models"), (":scheme", "http"),
                                      (":authority", "gateway"), ("authorization", "Bearer aaa.bbb.ccc")])
    assert headers[b":status"] == b"401", (headers, body)
    assert json.loads(body)["error"]["code"] == "invalid_token"
    request_id = headers[b"x-request-id"].decode()
    time.sleep(0.5)  # Envoy's stdout log
    logs = gw.logs()
    assert DEMO_KEY.split("_", 2)[2] not in logs
    [line] = [json.loads(x) for x in logs.splitlines() if request_id in x and '"envoy_error"' in x]
    assert line["method"] == "other" and line["error_code"] == "invalid_token", line


def test_a_refused_tokens_challenge_does_not_echo_the_url_or_host(gw: Gateway) -> None:
    """jwt_authn's `www-authenticate` quoted `http://<Host><path>?<query>` as sent: a key in the
    query string (`?key=`, as Gemini clients send theirs) came back in a response header."""
    r = httpx.get(f"{gw.url}/v1/models", params={"key": DEMO_KEY}, timeout=10,
                  headers={"Authorization": "Bearer aaa.bbb.ccc", "Host": "gwk_host_hostsecret.example"})
    assert r.status_code == 401 and code(r) == "invalid_token", r.text
    assert r.headers.get("www-authenticate") == 'Bearer error="invalid_token"', r.headers
    for name, value in r.headers.items():
        assert DEMO_KEY.split("_", 2)[2] not in value and "hostsecret" not in value, (name, value)


@pytest.mark.parametrize("form", ["Bearer  {}", "bearer {}", "BEARER   {}", "Bearer {}"])
def test_a_gateway_key_is_served_in_every_form_with_an_oidc_issuer_too(gw: Gateway, form: str) -> None:
    """Without OIDC these forms are the key (test_identity_attacks' forms); jwt_authn skipped
    only the exact prefix `Bearer gwk_`, so two spaces made the key a JWT to verify: 401
    invalid_token `Jwt_is_not_in_the_form...` for a valid key, only once OIDC was on."""
    r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": form.format(DEMO_KEY)}, timeout=10)
    assert r.status_code == 200 and r.json()["key_id"] == "demo", r.text
    wrong = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": form.format(DEMO_KEY + "x")}, timeout=10)
    assert wrong.status_code == 401 and code(wrong) == "invalid_api_key", wrong.text


# -- the key admin API -----------------------------------------------------------------------


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    port = gw.stack.values["identity"]["keyAdmin"]["port"]
    return httpx.request(method, f"http://127.0.0.1:{port}{path}", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kwargs)


@pytest.mark.parametrize("id_", ["nl\n", "ok\n", "a\n"])
def test_an_admin_key_id_with_a_final_newline_is_refused(gw: Gateway, id_: str) -> None:
    """`$` matched before a final newline: the key was created, its secret held a line break
    (no HTTP header can carry it) and no admin path can name it to revoke it."""
    r = admin(gw, "POST", "/admin/keys", json={"team": "demo", "id": id_})
    assert r.status_code == 400 and code(r) == "invalid_request" and r.json()["error"]["param"] == "id", r.text
    listed = admin(gw, "GET", "/admin/keys").json()["data"]
    assert not any("\n" in k["id"] for k in listed), listed
