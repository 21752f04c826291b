"""`make run`'s identity extras, end to end: helm/values-local-identity.yaml over
values-local.yaml, throwaway certificates and a demo signing key made by devidentity, a
second Envoy serving mTLS from the same chart, and `gateway-extproc dev-token`."""

from __future__ import annotations

import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway_extproc.devidentity import DEMO_SPIFFE_ID, prepare, tls_values
from gateway_extproc.localstack import free_port

from .conftest import REPO, Gateway, build_gateway


@pytest.fixture(scope="module")
def local() -> Iterator[tuple[Gateway, Path, int]]:
    with tempfile.TemporaryDirectory(prefix="gw-local-ident-") as tmp:
        root = Path(tmp)
        certs = root / "certs"
        prepare(certs)
        mtls_port = free_port()

        def customize(values: dict[str, Any]) -> None:
            extra = yaml.safe_load((REPO / "helm" / "values-local-identity.yaml").read_text())
            extra["identity"]["oidc"]["providers"][0]["jwks"]["file"] = str(certs / "dev-jwks.json")
            extra["identity"]["keyAdmin"].update(port=free_port(), file=str(root / "keys.json"))
            values["identity"] = extra["identity"]

        def with_mtls(values: dict[str, Any]) -> None:
            customize(values)
            stack_values.update(values)

        stack_values: dict[str, Any] = {}
        gw = build_gateway(root / "stack", customize=with_mtls)
        try:
            gw.stack.mtls_values = tls_values(stack_values, certs, mtls_port, free_port(), root / "mtls")
            gw.stack.start_mtls()
            yield gw, certs, mtls_port
        finally:
            gw.stack.stop()


def test_the_demo_workload_certificate_is_team_demo_on_8443(local: tuple[Gateway, Path, int]) -> None:
    _, certs, port = local
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    r = httpx.get(f"https://localhost:{port}/v1/usage", verify=ctx, timeout=10)
    assert r.status_code == 200, r.text
    assert (r.json()["key_id"], r.json()["team"]) == ("workload:demo-app", "demo")
    assert DEMO_SPIFFE_ID.endswith("/sa/app")


def test_dev_token_is_accepted_and_an_expired_one_is_not(local: tuple[Gateway, Path, int]) -> None:
    gw, certs, _ = local

    def token(*extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "gateway_extproc", "dev-token", "--sub", "alice", "--team", "demo",
                              "--certs", str(certs), *extra], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {token()}"}, timeout=10)
    assert r.status_code == 200 and (r.json()["team"], r.json()["user"]) == ("demo", "alice"), r.text
    r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {token('--expires-in', '-600')}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
