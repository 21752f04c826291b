"""`gateway-extproc local` as a user runs it, on free ports: a values file over
helm/values-local.yaml that moves every port and the socket directory, so tests run
beside a developer's `make run` and each other."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway_extproc.localstack import free_port
from gateway_extproc.render import load_values

REPO = Path(__file__).resolve().parents[2]
VALUES_LOCAL = REPO / "helm" / "values-local.yaml"


def free_ports_values(tmp: Path, **extra: object) -> Path:
    """Write tmp/ports.yaml (every port and path of values-local moved) and return it."""
    local = load_values([VALUES_LOCAL])
    moved = {str(p): free_port() for p in (8081, 8082)}
    providers = []
    for p in local["providers"]:
        p = dict(p)
        p["baseURL"] = re.sub(r":(8081|8082)\b", lambda m: f":{moved[m.group(1)]}", p["baseURL"])
        if "file" in p["credential"]:
            p["credential"] = {"file": str(tmp / Path(p["credential"]["file"]).name)}
        providers.append(p)
    values = {"envoy": {"listener": {"port": free_port()}, "admin": {"port": free_port()}},
              "extproc": {"socketDir": str(tmp / "sock"), "metrics": {"port": free_port()}},
              "providers": providers, **extra}
    path = tmp / "ports.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


@dataclass
class Local:
    """A running `gateway-extproc local`."""

    proc: subprocess.Popen[str]
    workdir: Path
    url: str

    def child(self, needle: str) -> int:
        """pid of the direct child whose command line contains `needle`."""
        for pid in children(self.proc.pid):
            if needle in cmdline(pid):
                return pid
        raise AssertionError(f"no child of local matching {needle!r}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


def start_local(binary: Path, values: list[Path], workdir: Path, timeout: float = 90,
                args: tuple[str, ...] = ()) -> Local:
    """Run `local` with values-local.yaml and then `values` (and `args`, e.g. `--mtls-port`);
    return once it says it is up."""
    argv = [str(binary), "local", "--workdir", str(workdir), *args]
    for v in [VALUES_LOCAL, *values]:
        argv += ["--values", str(v)]
    proc = subprocess.Popen(argv, cwd=workdir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"is up on (http://\S+) ", line):
            _drain(proc)
            return Local(proc, workdir, m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"local did not come up (exit {proc.returncode}):\n{err}")


def _drain(proc: subprocess.Popen[str]) -> None:
    """Keep reading local's stdout (it echoes every child's log) so it never blocks on a full pipe."""
    import threading

    def run() -> None:
        for _ in proc.stdout:  # type: ignore[union-attr]
            pass

    threading.Thread(target=run, daemon=True).start()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (e.g. a test's temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            line = cmdline(int(entry.name))
            if text in line and _alive(int(entry.name)):
                found.append(f"{entry.name}: {line}")
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
