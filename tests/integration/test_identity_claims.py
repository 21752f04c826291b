"""Verified token claims of odd types, and tokens whose header tries to choose the key, end
to end through real Envoy (jwt_authn), the ext_proc and the mock provider.

One plain-HTTP gateway with one OIDC issuer (inline JWKS) whose user claim is a custom
numeric claim (`employee_id`, as HR-system ids are) and whose team claim maps numeric group
ids; user "4711" has a budget too small for any request. Who the gateway took the caller for
is read from GET /v1/usage (key_id, team, user).
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import DEMO_KEY, Gateway, build_gateway

ISSUER, AUDIENCE = "https://hr-idp.test", "gw-claims"
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CHAT = {"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg="RS256", use="sig")
    return jwk


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    with tempfile.TemporaryDirectory(prefix="gw-claims-") as tmp:
        def customize(values: dict[str, Any]) -> None:
            values["teams"] += [{"name": "payments"}]
            values["users"] = [*(values.get("users") or []), {"name": "4711", "budget": {"daily": 0.0001}}]
            values["identity"] = {"oidc": {"providers": [{
                "name": "hr", "issuer": ISSUER, "audiences": [AUDIENCE],
                "jwks": {"inline": json.dumps({"keys": [_jwk(SIGNING_KEY, "hr-1")]})},
                "userClaim": "employee_id", "teamClaim": "groups", "teams": {"42": "payments", "search": "demo"}}]}}

        gateway = build_gateway(Path(tmp) / "stack", customize=customize)
        try:
            yield gateway
        finally:
            gateway.stack.stop()


def _token(key: rsa.RSAPrivateKey = SIGNING_KEY, headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "s-1", "employee_id": "e-1", "groups": ["search"],
               "iat": now, "exp": now + 300, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "hr-1", **(headers or {})})


def _code(r: httpx.Response) -> str:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    return err["code"]


def _who(gw: Gateway, token: str) -> tuple[int, Any]:
    r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    if r.status_code != 200:
        return r.status_code, _code(r)
    body = r.json()
    return 200, (body["key_id"], body["team"], body["user"])


def test_numeric_claims_name_their_user_and_team(gw: Gateway) -> None:
    """jwt_authn hands the payload over as a protobuf Struct, where 4711 is 4711.0: a number
    named no user (the user's budget was skipped) and no team (defaultTeam, or refused)."""
    assert _who(gw, _token(employee_id=4711, groups=[42])) == (200, ("token:hr", "payments", "4711"))
    assert _who(gw, _token(employee_id=4711, groups=42)) == (200, ("token:hr", "payments", "4711"))
    # Past 2^53 the double is not the id the token held (2^53 + 1 arrives as 2^53): nobody.
    assert _who(gw, _token(employee_id=2 ** 53 + 1)) == (200, ("token:hr", "demo", None))
    for odd in (True, 1.5, {"id": 4711}, [4711]):
        assert _who(gw, _token(employee_id=odd)) == (200, ("token:hr", "demo", None)), odd
    for groups in ({"42": True}, [[42]], [{"id": 42}], True, 42.5, ""):
        assert _who(gw, _token(groups=groups)) == (403, "identity_not_mapped"), groups


def test_a_numeric_users_budget_stops_its_requests_before_the_provider(gw: Gateway) -> None:
    gw.reset()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=20,
                   headers={"Authorization": f"Bearer {_token(employee_id=4711, groups=[42])}"})
    assert r.status_code == 429 and _code(r) == "budget_exceeded", r.text
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any]) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "employee_id": 4711, "exp": int(time.time()) + 60}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def test_a_token_header_never_chooses_the_key_that_verifies_it(gw: Gateway) -> None:
    """Held: the JWKS in values is the only key source. A `jwk`/`jku`/`x5u` header naming the
    attacker's key, a kid that is a path or an injection, or a kid of the right key on a token
    the attacker signed: all 401 invalid_token from jwt_authn, and the provider sees nothing."""
    attacker_jwk = _jwk(OTHER_KEY, "hr-1")
    tokens = {
        "embedded jwk": _token(OTHER_KEY, {"jwk": attacker_jwk}),
        "jku": _token(OTHER_KEY, {"jku": "http://127.0.0.1:1/jwks.json"}),
        "x5u": _token(OTHER_KEY, {"x5u": "http://127.0.0.1:1/cert.pem"}),
        "kid path traversal": _token(OTHER_KEY, {"kid": "../../../../dev/null"}),
        "kid sql": _token(OTHER_KEY, {"kid": "x' UNION SELECT 'secret"}),
        "kid of the right key": _token(OTHER_KEY),
        "alg none, right kid": _unsigned({"alg": "none", "kid": "hr-1"}),
    }
    gw.reset()
    wrong = {name: _who(gw, t) for name, t in tokens.items()}
    assert {k: v for k, v in wrong.items() if v != (401, "invalid_token")} == {}
    assert gw.received(gw.primary) == []
    # The same token signed with the issuer's own key is served: the refusals were the key.
    assert _who(gw, _token()) == (200, ("token:hr", "demo", "e-1"))


@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u2003", "\u0085"])
def test_a_key_with_unicode_space_around_it_is_no_key(gw: Gateway, space: str) -> None:
    """Python's str.strip() took a NBSP or ideographic space pasted after a key off it in
    `Authorization` (served as that key), while the same value in `x-api-key` was refused and
    one before the key went to jwt_authn (invalid_token): now every form is refused."""
    gw.reset()
    for headers in ({"Authorization": f"Bearer {DEMO_KEY}{space}".encode()},
                    {"x-api-key": f"{DEMO_KEY}{space}".encode()}):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
        assert r.status_code == 401 and _code(r) == "invalid_api_key", (headers, r.text)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=10,
                   headers={"Authorization": f"Bearer {space}{DEMO_KEY}".encode()})
    assert r.status_code == 401 and _code(r) in ("invalid_api_key", "invalid_token"), r.text
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []
    assert _who(gw, f" \t {DEMO_KEY}") == (200, ("demo", "demo", None))
