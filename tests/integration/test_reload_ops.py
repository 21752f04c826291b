"""What a platform engineer does to a running gateway's config, through real Envoy, two
ext_proc workers and budgets and stored keys in a real Valkey: signals (SIGHUP storms, a
worker stopped and continued), rapid rewrites and reloads while the store is down, each
during a burst. The invariants are test_ops_bursts.py's (Envoy up, every answer a success
or a runbook code, budgets never overspent, no secret in a log)."""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from gateway_extproc.render import render_values

from ..redis_server import RedisServer
from .conftest import Gateway, all_healthy, workers
from .test_ops_bursts import (KEYS, budgets_hold, during, envoy_alive, fresh, no_secrets, ogw, redis,  # noqa: F401
                              reload_to, reloads, settled, staggered, tally)


def serve_pid(gw: Gateway) -> int:
    return gw.stack.procs["extproc"].pid


def statuses(gw: Gateway, key: str, n: int = 6) -> list[int]:
    """`n` plain requests of `key` (on both workers: Envoy balances them)."""
    return [httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=10,
                       json={"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}],
                             "max_tokens": 5}).status_code for _ in range(n)]


def written_long_ago(path: Path, text: str) -> None:
    """The new file, renamed into place with a modification time a minute old (so the
    watcher's settle wait does not apply: only its poll interval or a SIGHUP does)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    then = time.time() - 60
    os.utime(tmp, (then, then))
    os.replace(tmp, path)


def without_key(values: dict[str, Any], name: str) -> dict[str, Any]:
    changed = copy.deepcopy(values)
    changed["keys"] = [k for k in changed["keys"] if k["id"] != name]
    return changed


def test_a_sighup_storm_mid_burst_reloads_and_kills_nothing(fresh: Gateway, redis: RedisServer) -> None:  # noqa: F811
    """`kill -HUP` is how most daemons are told to reload. 20 SIGHUPs each to `serve` and both
    workers during a burst of 300: nothing dies, every request is served; and a SIGHUP makes
    the workers read a changed file at once instead of at their next poll."""
    gw, envoy = fresh, fresh.stack.procs["envoy"].pid
    parent, before = serve_pid(gw), workers(gw)
    original = copy.deepcopy(gw.stack.values)

    def storm() -> None:
        time.sleep(0.3)
        for _ in range(20):
            for pid in (parent, *before):
                os.kill(pid, signal.SIGHUP)
            time.sleep(0.05)

    answers = during(staggered(gw, 300, 3.0), storm)
    envoy_alive(gw, envoy)
    assert gw.stack.procs["extproc"].poll() is None, "serve died of SIGHUP"
    assert workers(gw) == before, "a worker died of SIGHUP"
    assert tally(answers) == {(200, None): 300}, tally(answers)
    try:
        n = reloads(gw)
        written_long_ago(gw.stack.workdir / "gateway.yaml", render_values(without_key(original, "ops-c"))["gateway.yaml"])
        os.kill(parent, signal.SIGHUP)  # to `serve`, which passes it on to its workers
        deadline = time.monotonic() + 3.0  # a load takes 0.5-1 s here (test_reload.py times the nudge itself)
        while reloads(gw) < n + 2:
            assert time.monotonic() < deadline, "SIGHUP did not reload both workers"
            time.sleep(0.02)
        assert set(statuses(gw, KEYS["ops-c"])) == {401}
    finally:
        reload_to(gw, original)
    settled(gw, redis)
    budgets_hold(gw)
    no_secrets(gw)
