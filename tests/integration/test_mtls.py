"""mTLS on the listener, end to end: the chart's envoy.yaml with envoy.tls + clientCA on, its
SDS files, real Envoy, the ext_proc and the mock providers. A test CA, the server certificate
and client certificates are made here with `cryptography`.

- no client certificate: the TLS handshake is refused;
- a certificate signed by the configured CA: served (200);
- a certificate signed by another CA: refused;
- the client CA bundle is replaced on disk (as a Secret update does): picked up without a restart.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import httpx
import pytest
import yaml

from gateway_extproc.localstack import LocalStack
from gateway_extproc.render import CHART

from . import conftest
from .conftest import DEMO_KEY, Gateway, build_gateway, config_dir_is


def make_pki() -> dict[str, bytes]:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1, a client certificate
    from that CA, and a second CA with its own client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, public: Any, issuer: str, signer: Any, *, ca: bool = False,
             usage: Any = None, sans: list[Any] | None = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(public).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False, data_encipherment=False,
                                              key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(signer, hashes.SHA256())

    def pem(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    out: dict[str, bytes] = {}
    for prefix in ("", "other-"):
        ca_key = key()
        ca_name = f"gateway test {prefix or 'workload-'}CA"
        out[f"{prefix}ca.crt"] = pem(cert(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True))
        client_key = key()
        out[f"{prefix}client.crt"] = pem(cert(f"{prefix}workload", client_key.public_key(), ca_name, ca_key,
                                              usage=ExtendedKeyUsageOID.CLIENT_AUTH))
        out[f"{prefix}client.key"] = pem_key(client_key)
        if not prefix:
            server_key = key()
            out["server.crt"] = pem(cert("gateway", server_key.public_key(), ca_name, ca_key,
                                         usage=ExtendedKeyUsageOID.SERVER_AUTH,
                                         sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
            out["server.key"] = pem_key(server_key)
    return out


def config_files(values: dict[str, Any]) -> dict[str, str]:
    """Every file of the chart's config ConfigMap (envoy.yaml, gateway.yaml, SDS files)."""
    chart = helm_python.Chart.load(str(CHART))
    try:
        rendered = chart.render(values, name="gateway", namespace="default")
    finally:
        chart.close()
    return yaml.safe_load(rendered["gateway-extproc/templates/configmap.yaml"])["data"]


def tls_stack(client: ssl.SSLContext) -> type[LocalStack]:
    """LocalStack whose readiness check speaks TLS with a client certificate: its own check
    is a plain-HTTP request to the listener, which a TLS listener refuses."""

    class TLSStack(LocalStack):
        @property
        def url(self) -> str:
            return f"https://127.0.0.1:{self.values['envoy']['listener']['port']}"

        def _ready(self) -> bool:
            try:
                return (httpx.get(f"{self.admin_url}/ready", timeout=1).status_code == 200
                        and httpx.get(f"{self.url}/v1/models", verify=client, timeout=2).status_code == 401)
            except httpx.HTTPError:
                return False

    return TLSStack


@dataclass
class MTLS:
    gw: Gateway
    dir: Path
    pki: dict[str, bytes]

    def context(self, client: str | None) -> ssl.SSLContext:
        """A client that trusts the test CA and presents `client` ("client", "other-client")."""
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        if client is not None:
            ctx.load_cert_chain(str(self.dir / f"{client}.crt"), str(self.dir / f"{client}.key"))
        return ctx

    def chat(self, client: str | None) -> httpx.Response:
        return httpx.post(f"{self.gw.url}/v1/chat/completions", verify=self.context(client), timeout=10,
                          headers={"Authorization": f"Bearer {DEMO_KEY}"},
                          json={"model": "default-chat", "messages": [{"role": "user", "content": "Hello"}]})

    def ssl_stat(self, name: str) -> int:
        """Sum of listener ssl.<name> counters (Envoy admin /stats)."""
        text = httpx.get(f"{self.gw.stack.admin_url}/stats", params={"filter": f"ssl\\.{name}$"}).text
        return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.startswith("listener."))


@pytest.fixture(scope="module")
def mtls() -> Iterator[MTLS]:
    pki = make_pki()
    with tempfile.TemporaryDirectory(prefix="gw-mtls-") as tmp, pytest.MonkeyPatch.context() as mp:
        root = Path(tmp)
        for name, data in pki.items():
            (root / name).write_bytes(data)
        (root / "server-tls").mkdir()
        (root / "server-tls" / "tls.crt").write_bytes(pki["server.crt"])
        (root / "server-tls" / "tls.key").write_bytes(pki["server.key"])
        (root / "client-ca").mkdir()
        (root / "client-ca" / "ca.crt").write_bytes(pki["ca.crt"])
        workdir = root / "stack"

        def customize(values: dict[str, Any]) -> None:
            # Outside Kubernetes: no Secrets, the files sit in these directories.
            config_dir_is(values, workdir)
            values["envoy"]["tls"] = {
                "enabled": True,
                "certificate": {"secretName": "", "dir": str(root / "server-tls")},
                "clientCA": {"enabled": True, "secretName": "", "key": "ca.crt", "dir": str(root / "client-ca")},
            }
            # LocalStack writes envoy.yaml and gateway.yaml; the SDS files beside them too.
            workdir.mkdir(parents=True, exist_ok=True)
            for name, text in config_files(values).items():
                (workdir / name).write_text(text)

        good = ssl.create_default_context(cafile=str(root / "ca.crt"))
        good.load_cert_chain(str(root / "client.crt"), str(root / "client.key"))
        mp.setattr(conftest, "LocalStack", tls_stack(good))
        gw = build_gateway(workdir, customize=customize)
        try:
            yield MTLS(gw, root, pki)
        finally:
            gw.stack.stop()


def test_the_listener_serves_the_certificate_from_the_sds_files(mtls: MTLS) -> None:
    assert (mtls.gw.stack.workdir / "sds-certificate.yaml").exists()
    assert (mtls.gw.stack.workdir / "sds-client-ca.yaml").exists()
    # The client verifies the server against the test CA (create_default_context checks the name).
    assert mtls.chat("client").status_code == 200


def test_client_without_a_certificate_is_refused(mtls: MTLS) -> None:
    before = mtls.ssl_stat("fail_verify_no_cert")
    with pytest.raises(httpx.TransportError, match="(?i)certificate required|alert"):
        mtls.chat(None)
    assert mtls.ssl_stat("fail_verify_no_cert") == before + 1


def test_client_signed_by_the_configured_ca_is_served(mtls: MTLS) -> None:
    r = mtls.chat("client")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    models = httpx.get(f"{mtls.gw.url}/v1/models", verify=mtls.context("client"),
                       headers={"Authorization": f"Bearer {DEMO_KEY}"})
    assert models.status_code == 200 and "default-chat" in {m["id"] for m in models.json()["data"]}


def test_client_signed_by_another_ca_is_refused(mtls: MTLS) -> None:
    before = mtls.ssl_stat("fail_verify_error")
    with pytest.raises(httpx.TransportError, match="(?i)unknown ca|alert"):
        mtls.chat("other-client")
    assert mtls.ssl_stat("fail_verify_error") == before + 1


def test_plain_http_is_refused(mtls: MTLS) -> None:
    port = mtls.gw.stack.values["envoy"]["listener"]["port"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=5)


def test_a_replaced_client_ca_bundle_applies_without_a_restart(mtls: MTLS) -> None:
    """A Secret update swaps files into the mounted directory; Envoy watches it (SDS
    watched_directory). Here: move a bundle of both CAs into place, as a rename."""
    envoy_pid = mtls.gw.stack.procs["envoy"].pid
    ca_dir = mtls.dir / "client-ca"
    staged = ca_dir / ".ca.crt.new"
    staged.write_bytes(mtls.pki["ca.crt"] + mtls.pki["other-ca.crt"])
    os.replace(staged, ca_dir / "ca.crt")
    deadline = time.monotonic() + 10
    while True:
        try:
            r = mtls.chat("other-client")
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert mtls.chat("client").status_code == 200
    assert mtls.gw.stack.procs["envoy"].pid == envoy_pid and mtls.gw.stack.procs["envoy"].poll() is None
