"""What a platform engineer does to a running gateway's config, through real Envoy, two
ext_proc workers and budgets and stored keys in a real Valkey: signals (SIGHUP storms, a
worker stopped and continued), rapid rewrites and reloads while the store is down, each
during a burst. The invariants are test_ops_bursts.py's (Envoy up, every answer a success
or a runbook code, budgets never overspent, no secret in a log)."""

from __future__ import annotations

import asyncio
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
from .test_ops_bursts import (KEYS, NAMES, budgets_hold, chat, client, during, envoy_alive, fresh,  # noqa: F401
                              no_secrets, ogw, redis, reload_to, reloads, settled, staggered, tally, usage)


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


def rejections(gw: Gateway) -> list[str]:
    return [line for line in gw.stack.log_path("extproc").read_text().splitlines()
            if '"event":"config_reload_failed"' in line]


def test_fifty_rewrites_a_second_bad_files_and_a_budget_cut_below_spend_mid_burst(
        fresh: Gateway, redis: RedisServer) -> None:  # noqa: F811
    """A burst of 400 requests of four keys over 8 s while gateway.yaml is rewritten 50 times
    in one second (valid files, bad YAML, wrong types, a regex that does not compile, new
    prices), ending on a file of wrong types: it is rejected naming file and key, and the old
    config serves on. Then 50 more rewrites ending on a file that revokes ops-c and cuts
    ops-d's budget below what it has spent: both apply, nothing 5xx, ops-d is refused and its
    remaining budget is 0, never negative."""
    gw, envoy = fresh, fresh.stack.procs["envoy"].pid
    path = gw.stack.workdir / "gateway.yaml"
    original = copy.deepcopy(gw.stack.values)
    good = render_values(original)["gateway.yaml"]
    pricey = copy.deepcopy(original)
    for m in pricey["models"]:
        for b in m["backends"]:
            b["pricing"] = {"input": 90.0, "output": 90.0}
    final = without_key(original, "ops-c")
    for k in final["keys"]:
        if k["id"] == "ops-d":
            k["budget"] = {"daily": 0.000001}
    wrong_types = good.replace("keys:\n", "keys: 5\nx_keys:\n", 1)
    assert wrong_types != good
    bad = ["models: [\n  - {name: x", wrong_types, render_values(pricey)["gateway.yaml"],
           good.replace("classification:\n", "classification:\n  custom: [{name: acme, pattern: 'x**'}]\n", 1)]
    marks: dict[str, float] = {}

    async def burst() -> list[Any]:
        t0 = time.monotonic()
        async with client() as c:
            async def one(i: int) -> Any:
                await asyncio.sleep(8.0 * i / 400)
                return (NAMES[i % 4], await chat(c, gw, KEYS[NAMES[i % 4]], t0, stream=i % 3 == 0, max_tokens=20))
            answers = await asyncio.gather(*(one(i) for i in range(400)))
        for name in marks:
            marks[name] -= t0
        return answers

    def storm(last: str) -> None:
        for i in range(50):
            path.write_text(bad[i % len(bad)] if i % 5 else good)  # in place, as an editor saves
            time.sleep(0.02)
        written_long_ago(path, last)

    def operate() -> None:
        time.sleep(1.0)
        n = len(rejections(gw))
        storm(wrong_types)
        deadline = time.monotonic() + 6
        while len(rejections(gw)) < n + 2:
            assert time.monotonic() < deadline, "the wrong-types file was not rejected by both workers"
            time.sleep(0.05)
        marks["rejected"] = time.monotonic()
        n = reloads(gw)
        storm(render_values(final)["gateway.yaml"])
        while reloads(gw) < n + 2:
            assert time.monotonic() < deadline + 10, "the final file was not applied by both workers"
            time.sleep(0.05)
        marks["applied"] = time.monotonic()

    try:
        answers = during(burst, operate)
        envoy_alive(gw, envoy)
        assert workers(gw) and gw.stack.procs["extproc"].poll() is None
        print(tally([a for _, a in answers]), marks)
        for line in rejections(gw)[-2:]:
            assert "gateway.yaml" in line and "keys" in line, line
        problems = []
        for name, a in answers:
            after = a.started_s > marks["applied"] + 0.1
            ok = {(200, None), (429, "budget_exceeded")}
            if name == "ops-c":
                ok = {(401, "invalid_api_key")} if after else {*ok, (401, "invalid_api_key")}
            elif name == "ops-d" and after:
                ok = {(429, "budget_exceeded")}
            if (a.status, a.code) not in ok:
                problems.append((name, a))
        assert problems == []
        # the old config served between the rejection and the good file: ops-c was known
        assert any(a.status in (200, 429) for name, a in answers if name == "ops-c"
                   and marks["rejected"] < a.started_s < marks["applied"] - 3.5)
        settled(gw, redis, names=("ops-a", "ops-b", "ops-d"))
        d = usage(gw, "ops-d")
        assert d["limit_usd"] == 0.000001 and d["remaining_usd"] == 0 and 0 < d["spent_usd"] <= 0.05, d
        for name in ("ops-a", "ops-b"):
            b = usage(gw, name)
            assert b["spent_usd"] <= b["limit_usd"] and b["remaining_usd"] >= 0, (name, b)
        no_secrets(gw)
    finally:
        reload_to(gw, original)
