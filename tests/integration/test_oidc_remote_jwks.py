"""A remote JWKS (identity.oidc.providers[].jwks.remote), end to end: Envoy fetches it
through the cluster the chart renders and serves many tokens from one fetch. Its own module:
test_identity.py's gateway replaces conftest.LocalStack with a TLS stack for its module."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import running_gateway

ISSUER = "https://idp.test.example"
AUDIENCE = "gateway-test"


def test_a_remote_jwks_is_fetched_through_its_cluster_and_cached() -> None:
    """identity.oidc.providers[].jwks.remote: Envoy fetches the JWKS through the cluster the
    chart renders, and serves many tokens from one fetch (cacheDuration)."""
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key()))
    jwk.update(kid="remote-1", alg="RS256", use="sig")
    body = json.dumps({"keys": [jwk]}).encode()
    fetches: list[str] = []

    class JWKS(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JWKS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"

    def customize(values: dict[str, Any]) -> None:
        values["identity"] = {"oidc": {"providers": [{
            "name": "remote-idp", "issuer": ISSUER, "audiences": [AUDIENCE],
            "jwks": {"remote": {"url": url, "cacheDuration": "300s"}}, "defaultTeam": "demo"}]}}

    try:
        with running_gateway("gw-jwks-", customize=customize) as gw:
            now = int(time.time())
            token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "dave", "iat": now, "exp": now + 300},
                               signing_key, algorithm="RS256", headers={"kid": "remote-1"})
            for _ in range(5):
                r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10)
                assert r.status_code == 200, r.text
                assert (r.json()["team"], r.json()["user"]) == ("demo", "dave")
            forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "dave", "exp": now + 300},
                                rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                                headers={"kid": "remote-1"})
            r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {forged}"}, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
            assert fetches and set(fetches) == {"/.well-known/jwks.json"} and len(fetches) <= 2, fetches
    finally:
        server.shutdown()
