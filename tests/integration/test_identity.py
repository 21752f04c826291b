"""Workload identity (SPIFFE over mTLS) and OIDC tokens, end to end through real Envoy.

Certificates with SPIFFE URI SANs and an RSA JWKS are made here. The gateway runs the
chart's render with envoy.tls + clientCA, identity.workloads (trust domain cluster.local,
127.0.0.2 as the trusted mesh proxy) and one OIDC provider whose JWKS is inline. Who the
gateway took the caller for is read from GET /v1/usage (key_id, team, user).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import conftest
from .conftest import DEMO_KEY, Gateway, build_gateway, config_dir_is
from .test_mtls import config_files, tls_stack

ISSUER = "https://idp.test.example"
AUDIENCE = "gateway-test"
PAYMENTS_API = "spiffe://cluster.local/ns/payments/sa/api"
PAYMENTS_BATCH = "spiffe://cluster.local/ns/payments/sa/batch"  # exact rule: team batch, one model
UNMAPPED = "spiffe://cluster.local/ns/other/sa/tool"
FOREIGN = "spiffe://evil.example/ns/payments/sa/api"  # outside the trust domain
SIDECAR = "spiffe://cluster.local/ns/mesh/sa/sidecar"


class PKI:
    """A CA and certificates it signs, written as PEM files into `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.now = dt.datetime.now(dt.timezone.utc)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "identity test CA")])
        ca = (self._builder(self.ca_name, self.ca_key.public_key())
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
              .sign(self.ca_key, hashes.SHA256()))
        (root / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_name).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(self.now - dt.timedelta(minutes=5)).not_valid_after(self.now + dt.timedelta(days=1)))

    def issue(self, name: str, sans: list[x509.GeneralName], server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        crt, pem = self.root / f"{name}.crt", self.root / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return crt, pem


@dataclass
class Identity:
    gw: Gateway
    root: Path
    signing_key: rsa.RSAPrivateKey

    def context(self, client: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root / "ca.crt"))
        ctx.load_cert_chain(str(self.root / f"{client}.crt"), str(self.root / f"{client}.key"))
        return ctx

    def get(self, path: str, client: str, headers: dict[str, str] | None = None,
            source: str | None = None) -> httpx.Response:
        transport = httpx.HTTPTransport(verify=self.context(client), local_address=source)
        with httpx.Client(transport=transport, timeout=10) as c:
            return c.get(f"{self.gw.url}{path}", headers=headers or {})

    def chat(self, client: str, headers: dict[str, str]) -> httpx.Response:
        with httpx.Client(verify=self.context(client), timeout=10) as c:
            return c.post(f"{self.gw.url}/v1/chat/completions", headers=headers,
                          json={"model": "default-chat", "messages": [{"role": "user", "content": "Hello"}]})

    def token(self, *, sub: str = "alice", team: str | None = "demo", iss: str = ISSUER, aud: str = AUDIENCE,
              expires_in: int = 300, key: rsa.RSAPrivateKey | None = None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "exp": now + expires_in}
        if team is not None:
            claims["team"] = team
        return jwt.encode(claims, key or self.signing_key, algorithm="RS256", headers={"kid": "test-1"})


def usage(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def ident() -> Iterator[Identity]:
    with tempfile.TemporaryDirectory(prefix="gw-ident-") as tmp, pytest.MonkeyPatch.context() as mp:
        root = Path(tmp)
        pki = PKI(root)
        server_crt, server_key = pki.issue("server", [x509.DNSName("localhost"),
                                                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], server=True)
        for name, uri in (("payments-api", PAYMENTS_API), ("payments-batch", PAYMENTS_BATCH), ("unmapped", UNMAPPED),
                          ("foreign", FOREIGN), ("sidecar", SIDECAR)):
            pki.issue(name, [x509.UniformResourceIdentifier(uri)])
        pki.issue("web", [x509.DNSName("frontend.web.svc")])
        (root / "server-tls").mkdir()
        (root / "server-tls" / "tls.crt").write_bytes(server_crt.read_bytes())
        (root / "server-tls" / "tls.key").write_bytes(server_key.read_bytes())
        (root / "client-ca").mkdir()
        (root / "client-ca" / "ca.crt").write_bytes((root / "ca.crt").read_bytes())
        signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key()))
        jwk.update(kid="test-1", alg="RS256", use="sig")
        workdir = root / "stack"

        def customize(values: dict[str, Any]) -> None:
            config_dir_is(values, workdir)
            values["envoy"]["tls"] = {
                "enabled": True,
                "certificate": {"secretName": "", "dir": str(root / "server-tls")},
                "clientCA": {"enabled": True, "secretName": "", "key": "ca.crt", "dir": str(root / "client-ca")},
            }
            values["teams"] += [{"name": "payments"}, {"name": "batch"}]
            values["users"] = [*(values.get("users") or []), {"name": "frugal", "budget": {"daily": 0.0001}}]
            values["identity"] = {
                "workloads": {
                    "trustDomains": ["cluster.local"],
                    "trustedProxies": ["127.0.0.2/32"],
                    "principals": [
                        {"name": "payments", "spiffe": "spiffe://cluster.local/ns/payments/sa/*", "team": "payments"},
                        {"name": "payments-batch", "spiffe": PAYMENTS_BATCH, "team": "batch",
                         "models": ["default-chat"]},
                        {"name": "web", "dns": "*.web.svc", "team": "demo", "user": "web-frontend"},
                    ],
                },
                "oidc": {"providers": [{"name": "corp", "issuer": ISSUER, "audiences": [AUDIENCE],
                                        "jwks": {"inline": json.dumps({"keys": [jwk]})}, "teamClaim": "team"}]},
            }
            workdir.mkdir(parents=True, exist_ok=True)
            for name, text in config_files(values).items():
                (workdir / name).write_text(text)

        ready = ssl.create_default_context(cafile=str(root / "ca.crt"))
        ready.load_cert_chain(str(root / "unmapped.crt"), str(root / "unmapped.key"))
        mp.setattr(conftest, "LocalStack", _ready_on(tls_stack(ready), ready))
        gw = build_gateway(workdir, customize=customize)
        try:
            yield Identity(gw, root, signing_key)
        finally:
            gw.stack.stop()


def _ready_on(base: type, client: ssl.SSLContext) -> type:
    """The TLS stack, ready once an unmapped workload gets its 403 (not 401: it has an identity)."""

    class Stack(base):  # type: ignore[misc, valid-type]
        def _ready(self) -> bool:
            try:
                return (httpx.get(f"{self.admin_url}/ready", timeout=1).status_code == 200
                        and httpx.get(f"{self.url}/v1/models", verify=client, timeout=2).status_code == 403)
            except httpx.HTTPError:
                return False

    return Stack


# -- workloads ---------------------------------------------------------------------------


def test_a_mapped_spiffe_id_is_the_principal_without_any_key(ident: Identity) -> None:
    u = usage(ident.get("/v1/usage", "payments-api"))
    assert (u["key_id"], u["team"]) == ("workload:payments", "payments")
    r = ident.chat("payments-api", {})
    assert r.status_code == 200, r.text


def test_an_exact_spiffe_id_wins_over_the_wildcard_and_its_allow_list_holds(ident: Identity) -> None:
    u = usage(ident.get("/v1/usage", "payments-batch"))
    assert (u["key_id"], u["team"]) == ("workload:payments-batch", "batch")
    models = ident.get("/v1/models", "payments-batch").json()
    assert [m["id"] for m in models["data"]] == ["default-chat"]


def test_a_dns_san_maps_too(ident: Identity) -> None:
    u = usage(ident.get("/v1/usage", "web"))
    assert (u["key_id"], u["team"], u["user"]) == ("workload:web", "demo", "web-frontend")


def test_an_unmapped_spiffe_id_is_refused_unless_a_key_names_the_caller(ident: Identity) -> None:
    r = ident.get("/v1/usage", "unmapped")
    assert r.status_code == 403 and r.json()["error"]["code"] == "identity_not_mapped", r.text
    assert UNMAPPED in r.json()["error"]["message"]
    u = usage(ident.get("/v1/usage", "unmapped", {"Authorization": f"Bearer {DEMO_KEY}"}))
    assert (u["key_id"], u["team"]) == ("demo", "demo")


def test_envoy_refuses_a_certificate_outside_the_trust_domain(ident: Identity) -> None:
    with pytest.raises(httpx.TransportError):
        ident.get("/v1/usage", "foreign")


def test_xfcc_from_an_untrusted_client_is_ignored(ident: Identity) -> None:
    forged = {"x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/gw/sa/gw;URI={PAYMENTS_API}"}
    r = ident.get("/v1/usage", "unmapped", forged)
    assert r.status_code == 403 and r.json()["error"]["code"] == "identity_not_mapped", r.text
    # With a key, the key's team, not the forged workload's (which would be a conflict).
    u = usage(ident.get("/v1/usage", "unmapped", {**forged, "Authorization": f"Bearer {DEMO_KEY}"}))
    assert u["team"] == "demo"


def test_xfcc_from_a_trusted_proxy_names_the_workload(ident: Identity) -> None:
    """127.0.0.2 is the configured mesh proxy: the first XFCC element is its client."""
    xfcc = {"x-forwarded-client-cert": f'Hash=abc;URI="{PAYMENTS_API}"'}
    u = usage(ident.get("/v1/usage", "sidecar", xfcc, source="127.0.0.2"))
    assert (u["key_id"], u["team"]) == ("workload:payments", "payments")
    # The same header from any other address is dropped.
    r = ident.get("/v1/usage", "sidecar", xfcc, source="127.0.0.1")
    assert r.status_code == 403 and SIDECAR in r.json()["error"]["message"]


def test_providers_never_see_the_client_certificate_details(ident: Identity) -> None:
    ident.gw.reset()
    assert ident.chat("payments-api", {}).status_code == 200
    sent = ident.gw.received(ident.gw.primary)[-1]["headers"]
    assert not any(k.lower() == "x-forwarded-client-cert" for k in sent)


def test_a_key_of_another_team_on_a_mapped_workload_is_a_conflict(ident: Identity) -> None:
    r = ident.get("/v1/usage", "payments-api", {"Authorization": f"Bearer {DEMO_KEY}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "identity_conflict", r.text


# -- OIDC tokens -------------------------------------------------------------------------


def test_a_valid_token_is_the_principal(ident: Identity) -> None:
    token = ident.token()
    u = usage(ident.get("/v1/usage", "unmapped", {"Authorization": f"Bearer {token}"}))
    assert (u["key_id"], u["team"], u["user"]) == ("token:corp", "demo", "alice")
    r = ident.chat("unmapped", {"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    # The verified token never reaches the provider.
    sent = ident.gw.received(ident.gw.primary)[-1]["headers"]
    assert token not in json.dumps(sent)


def test_workload_team_and_token_user_combine(ident: Identity) -> None:
    u = usage(ident.get("/v1/usage", "payments-api", {"Authorization": f"Bearer {ident.token(sub='bob')}"}))
    assert (u["key_id"], u["team"], u["user"]) == ("workload:payments", "payments", "bob")


@pytest.mark.parametrize("kind", ["expired", "wrong-audience", "wrong-issuer", "wrong-key", "not-a-jwt"])
def test_a_bad_token_is_a_401_in_the_openai_shape_before_the_ext_proc(ident: Identity, kind: str) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = {"expired": lambda: ident.token(expires_in=-600),
             "wrong-audience": lambda: ident.token(aud="someone-else"),
             "wrong-issuer": lambda: ident.token(iss="https://evil.example"),
             "wrong-key": lambda: ident.token(key=other),
             "not-a-jwt": lambda: "sk-not-a-gateway-key"}[kind]()
    ident.gw.reset()
    r = ident.chat("payments-api", {"Authorization": f"Bearer {token}"})
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert (err["code"], err["type"]) == ("invalid_token", "authentication_error"), err
    assert set(err) == {"message", "type", "code", "param"}
    assert ident.gw.received(ident.gw.primary) == []


# RFC 9110 (11.1, RFC 7235 before it): an auth scheme is case-insensitive. jwt_authn matched
# its `value_prefix` case-sensitively, so `bearer <JWT>` was no token to it (allow_missing):
# the ext_proc then read the JWT as a gateway key, 401 invalid_api_key for a valid token.
SCHEMES = ["bearer", "BEARER", "bEaReR", "Bearer  "]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_valid_token_is_the_principal_whatever_the_schemes_case(ident: Identity, scheme: str) -> None:
    token = ident.token(sub="erin")
    u = usage(ident.get("/v1/usage", "unmapped", {"Authorization": f"{scheme} {token}"}))
    assert (u["key_id"], u["team"], u["user"]) == ("token:corp", "demo", "erin")
    ident.gw.reset()
    r = ident.chat("unmapped", {"Authorization": f"{scheme} {token}"})
    assert r.status_code == 200, r.text
    sent = ident.gw.received(ident.gw.primary)[-1]["headers"]
    assert token not in json.dumps(sent)  # verified, then removed (forward: false), as with `Bearer`


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["expired", "wrong-key", "not-a-jwt"])
def test_a_bad_token_is_refused_by_jwt_authn_whatever_the_schemes_case(ident: Identity, scheme: str,
                                                                        kind: str) -> None:
    """Verified, not read as a key: a forged token in another case is the 401 `invalid_token`
    of jwt_authn, before the ext_proc and any provider."""
    token = {"expired": lambda: ident.token(expires_in=-600),
             "wrong-key": lambda: ident.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
             "not-a-jwt": lambda: "aaa.bbb.ccc"}[kind]()
    ident.gw.reset()
    r = ident.chat("payments-api", {"Authorization": f"{scheme} {token}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token", r.text
    assert ident.gw.received(ident.gw.primary) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_gateway_key_in_any_case_still_skips_verification(ident: Identity, scheme: str) -> None:
    assert usage(ident.get("/v1/usage", "unmapped", {"Authorization": f"{scheme} {DEMO_KEY}"}))["key_id"] == "demo"
    wrong = ident.get("/v1/usage", "unmapped", {"Authorization": f"{scheme} gwk_nope_wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key", wrong.text


def test_a_token_without_a_team_is_refused(ident: Identity) -> None:
    r = ident.get("/v1/usage", "unmapped", {"Authorization": f"Bearer {ident.token(team=None)}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "identity_not_mapped", r.text


def test_gateway_keys_still_work_next_to_tokens(ident: Identity) -> None:
    u = usage(ident.get("/v1/usage", "unmapped", {"Authorization": f"Bearer {DEMO_KEY}"}))
    assert u["key_id"] == "demo"
    # Anthropic-style key header plus a user's token: the key's team, the token's user.
    u = usage(ident.get("/v1/usage", "unmapped", {"x-api-key": DEMO_KEY,
                                                  "Authorization": f"Bearer {ident.token(sub='carol')}"}))
    assert (u["key_id"], u["team"], u["user"]) == ("demo", "demo", "carol")


def test_a_mixed_burst_gets_each_request_its_own_principal(ident: Identity) -> None:
    """200 concurrent requests on one mTLS workload connection pool: valid tokens of
    different users, expired tokens, forged XFCC. Each answer matches its own credential."""
    import asyncio

    users = [f"user-{i}" for i in range(50)]
    cases: list[tuple[dict[str, str], tuple[int, str | None]]] = []
    for i in range(200):
        kind = i % 4
        if kind == 0:
            cases.append(({"Authorization": f"Bearer {ident.token(sub=users[i % 50])}"}, (200, users[i % 50])))
        elif kind == 1:
            cases.append(({"Authorization": f"Bearer {ident.token(expires_in=-600)}"}, (401, None)))
        elif kind == 2:
            cases.append(({"x-forwarded-client-cert": f"URI={PAYMENTS_BATCH}"}, (200, None)))
        else:
            cases.append(({"Authorization": "Bearer gwk_nope_wrong"}, (401, None)))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(verify=ident.context("payments-api"), timeout=30,
                                     limits=httpx.Limits(max_connections=50)) as c:
            return await asyncio.gather(*(c.get(f"{ident.gw.url}/v1/usage", headers=h) for h, _ in cases))

    for r, (_, (status, user)) in zip(asyncio.run(burst()), cases):
        assert r.status_code == status, r.text
        if status == 200:
            body = r.json()
            # The workload is payments-api whatever XFCC says; the user is the token's own.
            assert (body["key_id"], body["team"], body["user"]) == ("workload:payments", "payments", user)


def test_the_token_users_budget_applies_to_a_workloads_request(ident: Identity) -> None:
    """Team from the workload, user from the token: the user's own budget refuses, while
    the same workload carrying another user's token is served."""
    r = ident.chat("payments-api", {"Authorization": f"Bearer {ident.token(sub='frugal')}"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded", r.text
    assert "user:frugal" in r.json()["error"]["message"]
    assert ident.chat("payments-api", {"Authorization": f"Bearer {ident.token(sub='generous')}"}).status_code == 200
