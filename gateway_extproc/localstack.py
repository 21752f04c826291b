"""The whole gateway on one machine: mock provider(s), the ext_proc, Envoy.

`make run` and the integration tests start exactly this, from a render of the Helm chart,
so what developers try and what tests exercise is the config the chart deploys.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from .render import render_values

_BIN = Path(sys.executable).parent


def mock_ports(values: dict[str, Any]) -> list[int]:
    """The loopback ports the providers in these values point at: one mock instance each."""
    ports = set()
    for provider in values["providers"]:
        url = urlsplit(provider["baseURL"])
        if url.hostname in ("127.0.0.1", "localhost"):
            ports.add(url.port or 80)
    return sorted(ports)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_binary() -> str:
    found = _BIN / "envoy"
    return str(found) if found.exists() else (shutil.which("envoy") or "envoy")


@dataclass
class LocalStack:
    values: dict[str, Any]
    workdir: Path
    env: dict[str, str]  # provider credentials for Envoy (native injection) and the ext_proc
    mocks: dict[int, str]  # port -> API key each mock provider requires
    quiet: bool = True
    # A second Envoy rendered from these values (same ext_proc): `make run`'s mTLS listener.
    mtls_values: dict[str, Any] | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.values['envoy']['listener']['port']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.values['envoy']['admin']['port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.values['extproc']['metrics']['port']}/metrics"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self) -> "LocalStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name, text in render_values(self.values).items():
            (self.workdir / name).write_text(text, encoding="utf-8")
        for port, key in self.mocks.items():
            self._spawn(f"mock-{port}", [str(_BIN / "gateway-extproc"), "mock-provider", "--port", str(port),
                                         "--api-key", key])
            _wait(lambda p=port: connects(p), f"mock provider on {port}", self.log_path(f"mock-{port}"))
        self.start_extproc()
        self._spawn("envoy", [envoy_binary(), "-c", str(self.workdir / "envoy.yaml"), "--log-level", "warn",
                              "--disable-hot-restart", "--file-flush-interval-msec", "200"])
        _wait(self._ready, "Envoy", self.log_path("envoy"), timeout=30)
        if self.mtls_values is not None:
            self.start_mtls()
        return self

    def start_mtls(self) -> None:
        """The second Envoy, from `mtls_values` rendered into their configDir."""
        assert self.mtls_values is not None
        out = Path(self.mtls_values["configDir"])
        out.mkdir(parents=True, exist_ok=True)
        for name, text in render_values(self.mtls_values).items():
            (out / name).write_text(text, encoding="utf-8")
        self._spawn("envoy-mtls", [envoy_binary(), "-c", str(out / "envoy.yaml"), "--log-level", "warn",
                                   "--disable-hot-restart", "--file-flush-interval-msec", "200"])
        admin = f"http://127.0.0.1:{self.mtls_values['envoy']['admin']['port']}/ready"
        _wait(lambda: _answers(admin), "mTLS Envoy", self.log_path("envoy-mtls"), timeout=30)

    def start_extproc(self) -> None:
        self._spawn("extproc", [str(_BIN / "gateway-extproc"), "serve", "--config",
                                str(self.workdir / "gateway.yaml")])
        sockets = [Path(a[len("unix://"):]) for a in _listen(self.workdir / "gateway.yaml")]
        _wait(lambda: all(s.exists() for s in sockets), "ext_proc sockets", self.log_path("extproc"))

    def kill_extproc(self) -> None:
        """SIGKILL every ext_proc process, as a crash would."""
        proc = self.procs.pop("extproc")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for name in ("envoy", "envoy-mtls", "extproc", *[n for n in self.procs if n.startswith("mock-")]):
            terminate(self.procs.pop(name, None))
        for f in self._logs:
            f.close()
        self._logs.clear()

    def _spawn(self, name: str, argv: list[str]) -> None:
        if self.quiet:
            out: IO[bytes] | None = open(self.log_path(name), "ab")
            self._logs.append(out)
        else:
            out = None
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                            env={**os.environ, **self.env}, start_new_session=True)

    def _ready(self) -> bool:
        try:
            return (httpx.get(f"{self.admin_url}/ready", timeout=1).status_code == 200
                    and httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 401)
        except httpx.HTTPError:
            return False


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a process group started with start_new_session; SIGKILL it after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _listen(gateway_yaml: Path) -> list[str]:
    import yaml

    return yaml.safe_load(gateway_yaml.read_text())["listen"]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def connects(port: int) -> bool:
    """Something accepts TCP connections on this loopback port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(check: Any, what: str, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not become ready in {timeout}s; log {log}:\n{tail}")
