"""The same `sub` from two identity providers is two users, end to end through real Envoy
(two jwt_authn providers, inline JWKS), the ext_proc and the mock provider.

Until 2026-12-05 a token user was the bare claim: `sub` "alice" of the corporate IdP and
`sub` "alice" of a partner's IdP were one user, so the partner's tokens spent (and were
stopped by) corp's alice's budget and were recorded as her in the audit trail. With several
issuers a token's user is `<provider>:<claim>`; with one it stays the bare claim
(tests/integration/test_identity_claims.py).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import Gateway, build_gateway

AUDIENCE = "gw-issuers"
ISSUERS = {"corp": "https://login.corp.test", "partner": "https://idp.partner.test"}
KEYS = {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ISSUERS}
CHAT = {"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def _jwk(name: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEYS[name].public_key()))
    jwk.update(kid=f"{name}-1", alg="RS256", use="sig")
    return jwk


def _token(provider: str, sub: str = "alice") -> str:
    now = int(time.time())
    claims = {"iss": ISSUERS[provider], "aud": AUDIENCE, "sub": sub, "groups": ["search"], "iat": now, "exp": now + 300}
    return jwt.encode(claims, KEYS[provider], algorithm="RS256", headers={"kid": f"{provider}-1"})


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    with tempfile.TemporaryDirectory(prefix="gw-issuers-") as tmp:
        def customize(values: dict[str, Any]) -> None:
            # corp's alice may not spend anything; partner's alice has no budget of her own.
            values["users"] = [*(values.get("users") or []), {"name": "corp:alice", "budget": {"daily": 0.0001}}]
            values["identity"] = {"oidc": {"providers": [
                {"name": name, "issuer": issuer, "audiences": [AUDIENCE],
                 "jwks": {"inline": json.dumps({"keys": [_jwk(name)]})}, "teamClaim": "groups",
                 "teams": {"search": "demo"}} for name, issuer in ISSUERS.items()]}}

        gateway = build_gateway(Path(tmp) / "stack", customize=customize)
        try:
            yield gateway
        finally:
            gateway.stack.stop()


def _who(gw: Gateway, token: str) -> tuple[str, str, str]:
    r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["key_id"], body["team"], body["user"]


def test_the_same_sub_of_two_issuers_is_two_users(gw: Gateway) -> None:
    assert _who(gw, _token("corp")) == ("token:corp", "demo", "corp:alice")
    assert _who(gw, _token("partner")) == ("token:partner", "demo", "partner:alice")


def test_one_issuers_user_budget_does_not_stop_the_others_user(gw: Gateway) -> None:
    gw.reset()
    stopped = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=20,
                         headers={"Authorization": f"Bearer {_token('corp')}"})
    assert stopped.status_code == 429 and stopped.json()["error"]["code"] == "budget_exceeded", stopped.text
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []
    served = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=20,
                        headers={"Authorization": f"Bearer {_token('partner')}"})
    assert served.status_code == 200, served.text
    assert len(gw.received(gw.primary)) + len(gw.received(gw.backup)) == 1


def test_the_audit_trail_records_each_issuers_user(gw: Gateway) -> None:
    audit = Path(gw.stack.values["audit"]["dir"])
    deadline = time.monotonic() + 10
    users: set[str] = set()
    while time.monotonic() < deadline and not {"corp:alice", "partner:alice"} <= users:
        users = {r.get("user") for seg in audit.rglob("*.jsonl") for x in seg.read_bytes().split(b"\n") if x
                 for r in [orjson.loads(x)] if r.get("type") == "request"} - {None}
        time.sleep(0.2)
    assert {"corp:alice", "partner:alice"} <= users and "alice" not in users, users
