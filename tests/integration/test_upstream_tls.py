"""Providers over HTTPS: one model's cluster mixing a plain-HTTP backend and an HTTPS one
(per-endpoint transport sockets), Envoy checking the provider's certificate against
`envoy.upstreamCA` with the baseURL's name (SNI, SAN), and refusing a certificate from
another CA. The HTTPS provider is the mock provider with a certificate made here."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_extproc.localstack import connects, free_port, terminate

from .conftest import Gateway, running_gateway
from .test_mtls import make_pki

HELLO = [{"role": "user", "content": "hello"}]
TLS_KEY = "sk-tls-provider-0123456789abcdef"


@pytest.fixture(scope="module")
def tls_mock() -> Iterator[tuple[int, Path]]:
    """An HTTPS mock provider on localhost; yields its port and the directory of the PKI."""
    with tempfile.TemporaryDirectory(prefix="gw-tls-mock-") as tmp:
        pki = Path(tmp)
        for name, data in make_pki().items():
            (pki / name).write_bytes(data)
        (pki / "tls-provider.key").write_text(TLS_KEY)
        port = free_port()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "gateway-extproc"), "mock-provider", "--port",
                                 str(port), "--api-key", TLS_KEY, "--tls-cert", str(pki / "server.crt"),
                                 "--tls-key", str(pki / "server.key")], start_new_session=True)
        try:
            for _ in range(200):
                if connects(port):
                    break
                assert proc.poll() is None, "the HTTPS mock provider exited"
                time.sleep(0.05)
            yield port, pki
        finally:
            terminate(proc)


def with_tls_backend(port: int, pki: Path, ca: str) -> Any:
    def customize(values: dict[str, Any]) -> None:
        values["providers"].append({"name": "mock-tls", "kind": "openai", "baseURL": f"https://localhost:{port}/v1",
                                    "credential": {"file": str(pki / "tls-provider.key")}})
        values["models"].append({"name": "tls-chat", "tokenizer": "o200k_base", "backends": [
            {"provider": "mock", "model": "plain-primary", "priority": 0, "maxTier": "restricted",
             "pricing": {"input": 1.0, "output": 1.0}},
            {"provider": "mock-tls", "model": "tls-secondary", "priority": 1, "maxTier": "restricted",
             "pricing": {"input": 1.0, "output": 1.0}}]})
        values["envoy"]["upstreamCA"] = {"secretName": "", "key": ca, "dir": str(pki)}
    return customize


def ask(gw: Gateway) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "tls-chat", "messages": HELLO},
                      headers={"authorization": f"Bearer {gw.key}"}, timeout=30)


def test_a_cluster_mixes_plain_and_tls_backends_and_checks_the_certificate(tls_mock: tuple[int, Path]) -> None:
    port, pki = tls_mock
    tls_url = f"https://localhost:{port}"
    httpx.post(f"{tls_url}/_mock/reset", verify=str(pki / "ca.crt")).raise_for_status()
    with running_gateway("gw-upstream-tls-", customize=with_tls_backend(port, pki, "ca.crt")) as gw:
        assert ask(gw).headers["x-gateway-backend"] == "mock/plain-primary"  # plain HTTP endpoint
        httpx.post(f"{gw.primary}/_mock/behaviour", json={"status": 500}).raise_for_status()
        resp = ask(gw)
        assert resp.status_code == 200 and resp.headers["x-gateway-backend"] == "mock-tls/tls-secondary"
        [sent] = httpx.get(f"{tls_url}/_mock/requests", verify=str(pki / "ca.crt")).json()
        assert sent["headers"]["host"] == f"localhost:{port}"  # the provider's own name, not the gateway's
        assert sent["headers"]["authorization"] == f"Bearer {TLS_KEY}"
        assert sent["body"]["model"] == "tls-secondary"


def test_a_provider_certificate_from_another_ca_is_refused(tls_mock: tuple[int, Path]) -> None:
    port, pki = tls_mock
    with running_gateway("gw-upstream-badca-", customize=with_tls_backend(port, pki, "other-ca.crt")) as gw:
        httpx.post(f"{gw.primary}/_mock/behaviour", json={"status": 500}).raise_for_status()
        resp = ask(gw)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
        for _ in range(50):  # Envoy's access log reaches the file within its flush interval
            lines = [line for line in gw.stack.log_path("envoy").read_text().splitlines() if "mock-tls/" in line]
            if lines:
                break
            time.sleep(0.1)
        assert "CERTIFICATE_VERIFY_FAILED" in lines[0]
