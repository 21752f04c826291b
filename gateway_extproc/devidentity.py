"""Throwaway identities for `make run`: a CA, a server certificate for localhost, a client
certificate whose SPIFFE ID is spiffe://demo.local/ns/demo/sa/app, and an RSA key whose
public half is the demo OIDC provider's JWKS. All are made at start in `<workdir>/certs`
and signed tokens come from `gateway-extproc dev-token`. Nothing here is for production.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import time
from pathlib import Path
from typing import Any

DEMO_SPIFFE_ID = "spiffe://demo.local/ns/demo/sa/app"
DEV_ISSUER = "gateway-extproc-dev"
DEV_AUDIENCE = "gateway-extproc"
_KID = "dev-1"


def prepare(certs: Path) -> None:
    """(Re)make every demo file in `certs`: ca.crt, server/tls.crt+key, client-ca/ca.crt,
    client.crt+key (the demo workload), dev-jwks.json and dev-signing-key.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway-extproc make-run CA (throwaway)")])

    def build(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7)))

    def pem_key(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def leaf(cn: str, usage: Any, sans: list[Any]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), key.public_key())
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    ca = (build(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM)
    server = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = leaf("demo-app", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.UniformResourceIdentifier(DEMO_SPIFFE_ID)])
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = signing.public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": _KID, "alg": "RS256", "use": "sig",
           "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
           "e": _b64(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))}
    files = {"ca.crt": ca, "server/tls.crt": server[0], "server/tls.key": server[1], "client-ca/ca.crt": ca,
             "client.crt": client[0], "client.key": client[1], "dev-signing-key.pem": pem_key(signing),
             "dev-jwks.json": json.dumps({"keys": [jwk]}).encode()}
    for name, data in files.items():
        path = certs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if name.endswith((".key", ".pem")):
            path.chmod(0o600)


def mint(certs: Path, sub: str, team: str | None, expires_in: int = 3600, issuer: str = DEV_ISSUER,
         audience: str = DEV_AUDIENCE) -> str:
    """An RS256 token signed by the demo key in `certs` (made by `prepare`)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    key = serialization.load_pem_private_key((certs / "dev-signing-key.pem").read_bytes(), password=None)
    now = int(time.time())
    claims: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": sub, "iat": now, "exp": now + expires_in}
    if team:
        claims["team"] = team
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": _KID}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr, call-arg]
    return f"{head}.{body}.{_b64(signature)}"


def tls_values(values: dict[str, Any], certs: Path, port: int, admin_port: int, config_dir: Path) -> dict[str, Any]:
    """The same values with Envoy's listener on `port` serving mTLS with the demo certificates
    (its own admin port; no second Envoy-stats listener, the plain Envoy serves that)."""
    out = json.loads(json.dumps(values))
    out["envoy"]["listener"]["port"] = port
    out["envoy"]["admin"]["port"] = admin_port
    out["envoy"]["metrics"]["port"] = 0
    out["envoy"]["tls"] = {"enabled": True, "certificate": {"secretName": "", "dir": str(certs.resolve() / "server")},
                           "clientCA": {"enabled": True, "secretName": "", "key": "ca.crt",
                                        "dir": str(certs.resolve() / "client-ca")}}
    out["configDir"] = str(config_dir.resolve())
    return out


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
