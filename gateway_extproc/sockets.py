"""Who owns an ext_proc Unix socket.

A worker holds an exclusive flock on `<socket>.lock` for its whole life; the kernel drops
it when the process exits, however it exits. So a socket file whose lock is free is stale
(its owner died) and is removed; one whose lock is held belongs to a live gateway, and
starting a second gateway on it is refused with a clear error instead of stealing the
path (Envoy would then talk to whichever process bound last, and the loser's shutdown
would delete the winner's socket).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class SocketInUse(RuntimeError):
    pass


def unix_path(address: str) -> Path | None:
    return Path(address[len("unix://"):]) if address.startswith("unix://") else None


def claim(path: Path) -> int:
    """Take ownership of a socket path for this process; returns the lock fd to keep open.
    Removes a stale socket file; raises SocketInUse when a live gateway owns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SocketInUse(_in_use(path)) from None
    if _accepts(path):  # a live process that takes no lock (an older gateway)
        os.close(fd)
        raise SocketInUse(_in_use(path))
    path.unlink(missing_ok=True)
    return fd


def check_free(path: Path) -> None:
    """Raise SocketInUse if a live gateway owns this socket path; leave it unclaimed."""
    os.close(claim(path))


def listening(address: str) -> bool:
    """Something accepts connections at this listen address (unix:///path or host:port)."""
    path = unix_path(address)
    if path is not None:
        return _accepts(path)
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(0.2)
        try:
            s.connect((host.strip("[]") or "127.0.0.1", int(port)))
            return True
        except OSError:
            return False


def _accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _in_use(path: Path) -> str:
    return (f"another gateway is using {path}: stop it first, or give this one its own "
            "extproc.socketDir in a values file")
