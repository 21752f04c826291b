"""README: "A second `make run` on the same machine stops at once, naming the port or socket
in use." It must stop before it touches anything the first one uses: the provider key files,
the rendered gateway.yaml (which the running ext_proc reloads) and the demo certificates."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from gateway_extproc.localstack import free_port

from .local_cli import VALUES_LOCAL, free_ports_values, start_local

DEMO_KEY = "gwk_demo_local-only-demo-key-not-for-production"


def azure_status(url: str) -> int:
    """A model whose provider takes a `file` credential (helm/values-local.yaml)."""
    return httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {DEMO_KEY}"},
                      json={"model": "azure-chat", "messages": [{"role": "user", "content": "Hi"}]}, timeout=30).status_code


def test_a_second_local_refuses_without_touching_the_first(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "gateway-extproc"
    ports = free_ports_values(tmp_path)
    workdir, mtls = tmp_path / "run", str(free_port())
    first = start_local(binary, [ports], workdir, args=("--mtls-port", mtls))
    try:
        assert azure_status(first.url) == 200
        keys = [Path(p["credential"]["file"]) for p in yaml.safe_load(ports.read_text())["providers"]
                if "file" in p["credential"]]
        touched = {p: p.read_bytes() for p in [*keys, workdir / "gateway.yaml", workdir / "envoy.yaml",
                                               *(workdir / "certs").rglob("*")] if p.is_file()}
        assert keys and all(k in touched for k in keys) and (workdir / "certs" / "ca.crt") in touched
        second = subprocess.run([str(binary), "local", "--workdir", str(workdir), "--mtls-port", mtls,
                                 "--values", str(VALUES_LOCAL), "--values", str(ports)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "is in use" in second.stderr, second.stderr
        changed = [str(p.relative_to(tmp_path)) for p, before in touched.items() if p.read_bytes() != before]
        assert changed == []
        time.sleep(3)  # past the ext_proc's config poll (reload.POLL_SECONDS)
        assert azure_status(first.url) == 200
    finally:
        rc, err = first.stop()
    assert rc == 0, err
