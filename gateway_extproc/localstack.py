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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

from . import config, sockets
from .procs import exit_reason, log_tail, with_parent_death
from .render import render_values

_BIN = Path(sys.executable).parent


def mock_ports(values: dict[str, Any]) -> list[int]:
    """The loopback ports the providers in these values point at: one mock instance each."""
    ports = set()
    for provider in values.get("providers") or []:
        url = urlsplit(str(provider.get("baseURL", "")) if isinstance(provider, dict) else "")
        if url.hostname in ("127.0.0.1", "localhost"):
            ports.add(url.port or 80)
    return sorted(ports)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this process handed out before: the kernel may
    give the same free port twice in a row, and two of a stack's listeners on one port fail
    its render (the chart refuses them)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            if len(_HANDED_OUT) >= 8192:  # (a fraction of the ephemeral range: never exhausted)
                _HANDED_OUT.clear()
            _HANDED_OUT.add(port)
            return port


def envoy_binary() -> str:
    found = _BIN / "envoy"
    return str(found) if found.exists() else (shutil.which("envoy") or "envoy")


ENVOY_RESTARTS = 5  # per minute, before `local` gives up on a crash-looping Envoy


class StartError(RuntimeError):
    """The stack could not start or a part of it died: one line with the cause, then the
    last lines of that part's log."""


@dataclass
class LocalStack:
    values: dict[str, Any]
    workdir: Path
    env: dict[str, str]  # provider credentials for Envoy (native injection) and the ext_proc
    mocks: dict[int, str]  # port -> API key each mock provider requires
    quiet: bool = True  # False: children's output also goes to this terminal (`make run`)
    source: str = "values"  # the values files, as errors name them
    # A second Envoy rendered from these values (same ext_proc): `make run`'s mTLS listener.
    mtls_values: dict[str, Any] | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _tees: list[threading.Thread] = field(default_factory=list)
    _envoy_deaths: list[float] = field(default_factory=list)

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
        """Every child's output is in workdir/<name>.log, whether or not it is also shown."""
        return self.workdir / f"{name}.log"

    def start(self) -> "LocalStack":
        """Start mocks, ext_proc and Envoy; raise StartError within ~2 s of any of them
        failing (a busy port, a bad config, a child exiting), naming its log."""
        self.check_free()  # before writing the config files a running stack reloads
        self.workdir.mkdir(parents=True, exist_ok=True)
        audit = self.values.get("audit") or {}
        if audit.get("enabled") and not Path(audit["signingKey"]["file"]).exists():
            from .audit.signing import generate

            generate(Path(audit["signingKey"]["file"]))  # local only: a deployment mounts its own key
        for name, text in render_values(self.values, source=self.source).items():  # checks the values
            (self.workdir / name).write_text(text, encoding="utf-8")
        try:
            config.load(self.workdir / "gateway.yaml")
        except config.ConfigError as exc:
            raise StartError(f"{exc} (rendered from {self.source}: fix it there)") from None
        for old in self.workdir.glob("*.log"):  # this run's logs only: error messages quote them
            old.unlink()
        try:
            for port, key in self.mocks.items():
                # --api-key=KEY, not two arguments: a random key may start with "-".
                self._spawn(f"mock-{port}", [str(_BIN / "gateway-extproc"), "mock-provider", "--port", str(port),
                                             f"--api-key={key}"])
                self._wait(f"mock-{port}", lambda p=port: connects(p), f"mock provider on {port}")
            self.start_extproc()
            self.start_envoy()
            if self.mtls_values is not None:
                self.start_mtls()
        except BaseException:
            self.stop()
            raise
        return self

    def start_envoy(self) -> None:
        self._spawn("envoy", [envoy_binary(), "-c", str(self.workdir / "envoy.yaml"), "--log-level", "warn",
                              "--disable-hot-restart", "--file-flush-interval-msec", "200"])
        self._wait("envoy", self._ready, "Envoy")

    def restart_envoy(self) -> bool:
        """Start Envoy again after it died (a crash must not end a developer's session);
        False when it has died ENVOY_RESTARTS times within a minute (a crash loop)."""
        now = time.monotonic()
        self._envoy_deaths = [t for t in self._envoy_deaths if now - t < 60] + [now]
        if len(self._envoy_deaths) > ENVOY_RESTARTS:
            return False
        self.procs.pop("envoy", None)
        self.start_envoy()
        return True

    def check_free(self) -> None:
        """Fail before starting anything if a port or ext_proc socket is taken: two stacks
        on one machine would otherwise half-start and talk to each other's processes."""
        v = self.values
        ports = [(v["envoy"]["listener"]["port"], "envoy.listener.port"),
                 (v["envoy"]["admin"]["port"], "envoy.admin.port"),
                 *[(port, f"the mock provider for a providers[].baseURL on port {port}") for port in self.mocks]]
        if v["extproc"]["metrics"]["port"]:
            ports.append((v["extproc"]["metrics"]["port"], "extproc.metrics.port"))
        if self.mtls_values is not None:
            ports.append((self.mtls_values["envoy"]["listener"]["port"], "--mtls-port"))
        for port, key in ports:
            if connects(int(port)) or not _bindable(int(port)):
                raise StartError(f"port {port} ({key}) is in use: another gateway (`make run`?) or another "
                                 f"program holds it; stop it, or change the port in a values file")
        for i in range(int(v["extproc"]["processes"])):
            try:
                sockets.check_free(Path(v["extproc"]["socketDir"]) / f"extproc-{i}.sock")
            except sockets.SocketInUse as exc:
                raise StartError(str(exc)) from None

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
        self._wait("envoy-mtls", lambda: _status(admin, 1) == 200, "mTLS Envoy")

    def start_extproc(self) -> None:
        self._spawn("extproc", [str(_BIN / "gateway-extproc"), "serve", "--config",
                                str(self.workdir / "gateway.yaml")])
        addresses = _listen(self.workdir / "gateway.yaml")
        self._wait("extproc", lambda: all(sockets.listening(a) for a in addresses), "ext_proc sockets")

    def kill_extproc(self) -> None:
        """SIGKILL every ext_proc process, as a crash would."""
        proc = self.procs.pop("extproc")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def exited(self) -> tuple[str, int] | None:
        """(name, return code) of a child that has exited, if any."""
        for name, proc in self.procs.items():
            if (rc := proc.poll()) is not None:
                return name, rc
        return None

    def describe_exit(self, name: str, returncode: int) -> str:
        log = self.log_path(name)
        return f"{name} (pid {self.procs[name].pid}) {exit_reason(returncode)}; last lines of {log}:\n{log_tail(log)}"

    def stop(self) -> None:
        for name in ("envoy", "envoy-mtls", "extproc", *[n for n in self.procs if n.startswith("mock-")]):
            terminate(self.procs.pop(name, None))
        for t in self._tees:
            t.join(timeout=2)
        self._tees.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log_path(name), "ab")
        self._logs.append(out)
        # Own process group (Ctrl-C reaches `local` only, which stops children in order);
        # the parent-death signal stops them if `local` itself is killed.
        proc = subprocess.Popen(with_parent_death(argv), stdout=out if self.quiet else subprocess.PIPE,
                                stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True)
        self.procs[name] = proc
        if not self.quiet:
            tee = threading.Thread(target=_tee, args=(proc.stdout, out, f"{name:>10} | "), daemon=True)
            tee.start()
            self._tees.append(tee)

    def _wait(self, name: str, check: Any, what: str, timeout: float = 60) -> None:
        """Until `check()` passes; a process that exits ends the wait at once. The timeout only
        bounds a start that hangs: a loaded machine (CI, a laptop building something) took
        over 20 s to start the ext_proc's workers, and the start failed though nothing was wrong."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if (gone := self.exited()) is not None:
                raise StartError(self.describe_exit(*gone))
            time.sleep(0.05)
        log = self.log_path(name)
        raise StartError(f"{what} did not become ready in {timeout:.0f}s; last lines of {log}:\n{log_tail(log)}")

    def _ready(self) -> bool:
        return _status(f"{self.admin_url}/ready", 1) == 200 and _status(f"{self.url}/v1/models", 2) == 401


def _tee(pipe: IO[bytes], log: IO[bytes], prefix: str) -> None:
    """Copy a child's output to its log file and, prefixed with its name, to this terminal."""
    for line in iter(pipe.readline, b""):
        log.write(line)
        log.flush()
        sys.stdout.write(prefix + line.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    pipe.close()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
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


def _status(url: str, timeout: float) -> int | None:
    """HTTP status of a GET, None when nothing answers. The standard library, not httpx:
    `local` must run with only the runtime dependencies and the render extra."""
    try:
        with urlopen(url, timeout=timeout) as resp:
            return resp.status
    except HTTPError as exc:
        return exc.code
    except (URLError, OSError):
        return None


def _listen(gateway_yaml: Path) -> list[str]:
    import yaml

    return yaml.safe_load(gateway_yaml.read_text())["listen"]


def connects(port: int) -> bool:
    """Something accepts TCP connections on this loopback port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
