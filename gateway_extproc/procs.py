"""Child processes that die with their parent, and saying why one exited.

`local` and `serve` are supervisors. If a supervisor is killed (SIGKILL, OOM) its children
must not live on: an orphaned ext_proc worker keeps its socket and answers with a stale
config. Linux's parent-death signal (prctl PR_SET_PDEATHSIG) makes the kernel signal the
child when its parent exits, whatever the cause; it survives exec, so Envoy gets it too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent (pid `parent`) exits.
    If the parent is already gone (it died between fork and here), exit now."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


# Sets the parent-death signal, then becomes the real command (execv keeps the setting).
# A wrapper rather than Popen(preexec_fn=...): preexec_fn is unsafe once threads exist.
_EXEC_WITH_PDEATHSIG = (
    "import os, signal, sys; from gateway_extproc.procs import die_with_parent; "
    "die_with_parent(signal.SIGTERM, int(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])"
)


def with_parent_death(argv: list[str]) -> list[str]:
    """argv run so that the command gets SIGTERM when this process exits."""
    return [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv]


def exit_reason(returncode: int) -> str:
    """'exited with code 1' or 'was killed by SIGKILL'."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented, or a note that it is empty or missing."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"  ({path} does not exist)"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  {line}" for line in tail) if tail else f"  ({path} is empty)"
