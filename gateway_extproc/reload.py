"""Config hot reload for the ext_proc: gateway.yaml changes apply without dropping traffic.

Each worker polls the file's stat (inode, size, modification time) off the hot path (every 2 s), loads and
validates a changed file in a thread once it has stood still for a second (a file written
in pieces, as `write_text` or an editor saving in place does, is never read half-written:
a prefix can be valid YAML and a valid config), and swaps one reference. Streams keep the Runtime they
started with (a snapshot per request, as envoyproxy/ratelimit does), so a request never sees
half of two configs. SIGHUP (`kill -HUP`, as most daemons reload) makes a worker look now
instead of at its next poll; a storm of them costs one stat each. A file that fails validation is logged and counted, and the old config
stays; genai_gateway_config_last_reload_successful is 0 until a change loads again. Keys,
teams, budgets, prices, classification rules and model-to-backend names reload this way;
listeners, routes and clusters are Envoy's and need a re-render and an Envoy restart
(docs/configuration.md).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

import structlog

from . import audit
from .config import ConfigError
from .runtime import Runtime
from .telemetry.metrics import CONFIG_LAST_RELOAD_SUCCESS_TIME, CONFIG_LAST_RELOAD_SUCCESSFUL, CONFIG_RELOADS

log = structlog.get_logger("gateway_extproc.reload")
POLL_SECONDS = 2.0
SETTLE_SECONDS = 1.0  # a file changed more recently may still be being written


class RuntimeRef:
    """The current Runtime; `current` is read once per stream."""

    __slots__ = ("current", "path", "_stamp", "_nudged")

    def __init__(self, runtime: Runtime, path: str) -> None:
        self.current = runtime
        self.path = path
        self._stamp = _stat(path)[0]
        self._nudged = asyncio.Event()
        _loaded()  # `runtime` is this file, loaded

    def nudge(self) -> None:
        """Look at the file now (SIGHUP), not at the next poll. Nudges during a check
        coalesce into one more check."""
        self._nudged.set()

    async def watch(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._nudged.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
            self._nudged.clear()
            await self.check()

    async def check(self) -> None:
        stamp, mtime = _stat(self.path)
        while stamp != self._stamp and 0 <= (age := time.time() - mtime) < SETTLE_SECONDS:
            await asyncio.sleep(SETTLE_SECONDS - age)  # may still be being written
            stamp, mtime = _stat(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            runtime = await asyncio.to_thread(Runtime.load, self.path, self.current)
        except (ConfigError, OSError, ValueError) as exc:
            self._reject(str(exc))
            return
        except Exception as exc:  # noqa: BLE001
            # Anything else a load raises is a rejected file too: escaping, it ended this
            # task, and the worker never reloaded again (a later revocation never applied).
            self._reject(f"{self.path}: could not be loaded ({type(exc).__name__}); "
                         "check it with `gateway-extproc check-config`")
            return
        self.current = runtime
        # The replaced Runtime goes once its streams end; frozen out of the collector at
        # start-up (server.quiet_collector), what of it is in a reference cycle never would.
        gc.unfreeze()
        CONFIG_RELOADS.labels("applied").inc()
        _loaded()
        audit.config_applied(runtime.config)
        log.info("config_reloaded", path=self.path, models=len(runtime.config.models), keys=len(runtime.config.keys))

    def _reject(self, error: str) -> None:
        CONFIG_RELOADS.labels("rejected").inc()
        CONFIG_LAST_RELOAD_SUCCESSFUL.set(0)  # until a change loads: the file on disk is not in force
        log.error("config_reload_failed", path=self.path, error=error)
        audit.config_rejected(self.path, error)


def _loaded() -> None:
    CONFIG_LAST_RELOAD_SUCCESSFUL.set(1)
    CONFIG_LAST_RELOAD_SUCCESS_TIME.set(time.time())


def _stat(path: str) -> tuple[tuple[int, int, int, int] | None, float]:
    """(what tells one version of the file from another, its modification time). Not the
    mtime alone: a symlink switched to a file of the same mtime (config directories unpacked
    from one archive, `cp -p`), or a rewrite within the file system's timestamp tick, kept
    the mtime and was never reloaded. The inode and size tell them apart (as keystore.py)."""
    try:
        st = os.stat(path)
    except OSError:
        return None, 0.0
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size), st.st_mtime
