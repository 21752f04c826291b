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
    after_rejection: set[tuple[int, str | None]] = set()

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
        after_rejection.update(codes(gw, KEYS["ops-c"], 2))
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
        # the old config served after the rejection: ops-c was still known (asked right then, not
        # looked for among the burst's requests, which a loaded machine (CI) may not have started then)
        assert after_rejection and after_rejection <= {(200, None), (429, "budget_exceeded")}, after_rejection
        settled(gw, redis, names=("ops-a", "ops-b", "ops-d"))
        d = usage(gw, "ops-d")
        assert d["limit_usd"] == 0.000001 and d["remaining_usd"] == 0 and 0 < d["spent_usd"] <= 0.05, d
        for name in ("ops-a", "ops-b"):
            b = usage(gw, name)
            assert b["spent_usd"] <= b["limit_usd"] and b["remaining_usd"] >= 0, (name, b)
        no_secrets(gw)
    finally:
        reload_to(gw, original)


def codes(gw: Gateway, key: str, n: int = 6) -> set[tuple[int, str | None]]:
    """The (status, error code) of `n` plain requests of `key`."""
    out = set()
    for _ in range(n):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=10,
                       json={"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
        out.add((r.status_code, None if r.status_code == 200 else r.json()["error"]["code"]))
    return out


def test_a_reload_while_the_store_is_down_applies_and_fails_closed_until_it_is_back(
        fresh: Gateway, redis: RedisServer) -> None:  # noqa: F811
    """Valkey killed; gateway.yaml revokes ops-c and SIGHUP is sent. The reload applies
    without the store (nothing at load needs it); meanwhile budgeted keys get 503
    budget_store_unavailable and the revoked key is refused (an id not in values may be a
    stored key, which cannot be looked up: 503 key_store_unavailable); once Valkey is back
    the new config serves and the revoked key is 401."""
    gw, envoy = fresh, fresh.stack.procs["envoy"].pid
    original = copy.deepcopy(gw.stack.values)
    redis.kill()
    try:
        n = reloads(gw)
        written_long_ago(gw.stack.workdir / "gateway.yaml", render_values(without_key(original, "ops-c"))["gateway.yaml"])
        os.kill(serve_pid(gw), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while reloads(gw) < n + 2:
            assert time.monotonic() < deadline, "no reload while the store is down"
            time.sleep(0.05)
        assert codes(gw, KEYS["ops-c"]) == {(503, "key_store_unavailable")}
        assert codes(gw, KEYS["ops-a"]) == {(503, "budget_store_unavailable")}
        redis.start()
        deadline = time.monotonic() + 5
        while codes(gw, KEYS["ops-a"], 2) != {(200, None)}:
            assert time.monotonic() < deadline, "not serving after the store came back"
            time.sleep(0.1)
        assert codes(gw, KEYS["ops-c"]) == {(401, "invalid_api_key")}
        envoy_alive(gw, envoy)
    finally:
        if not redis.running:
            redis.start()
        reload_to(gw, original)


def test_a_worker_stopped_across_a_revocation_applies_it_once_continued(fresh: Gateway,
                                                                        redis: RedisServer) -> None:  # noqa: F811
    """One worker SIGSTOPped, ops-c revoked in gateway.yaml, the other worker applies it; 3 s
    later the stopped one is continued. A burst of ops-c throughout: nothing it starts later
    than 4 s after SIGCONT is served (the watcher's poll and a load, docs/configuration.md),
    every answer a runbook code, and the continued worker serves again."""
    gw, envoy = fresh, fresh.stack.procs["envoy"].pid
    original = copy.deepcopy(gw.stack.values)
    victim = workers(gw)[0]
    marks: dict[str, float] = {}

    async def burst() -> list[Any]:
        t0 = time.monotonic()
        async with client() as c:
            async def one(i: int) -> Any:
                await asyncio.sleep(10.0 * i / 300)
                return await chat(c, gw, KEYS["ops-c"], t0, stream=i % 2 == 0, max_tokens=5)
            answers = await asyncio.gather(*(one(i) for i in range(300)))
        for name in marks:
            marks[name] -= t0
        return answers

    def operate() -> None:
        time.sleep(1.0)
        os.kill(victim, signal.SIGSTOP)
        written_long_ago(gw.stack.workdir / "gateway.yaml", render_values(without_key(original, "ops-c"))["gateway.yaml"])
        marks["revoked"] = time.monotonic()
        time.sleep(3.0)
        os.kill(victim, signal.SIGCONT)
        marks["continued"] = time.monotonic()

    try:
        answers = during(burst, operate)
        envoy_alive(gw, envoy)
        print(tally(answers), marks)
        assert set(tally(answers)) <= {(200, None), (429, "budget_exceeded"), (401, "invalid_api_key"),
                                       (503, "gateway_unavailable")}, tally(answers)
        late = [a for a in answers if a.started_s > marks["continued"] + 4.0]
        assert late and {(a.status, a.code) for a in late} == {(401, "invalid_api_key")}, tally(late)
        all_healthy(gw)
        assert workers(gw)[0] == victim
    finally:
        os.kill(victim, signal.SIGCONT)
        reload_to(gw, original)
