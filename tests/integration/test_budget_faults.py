"""The budget invariant under faults: whatever breaks mid-burst, budgets are never overspent
and every request is accounted.

test_budget_invariant.py fires hypothesis bursts at two replicas (Envoy + two ext_proc
workers each) sharing one Valkey on a healthy system. Here hypothesis also picks one fault
and when it strikes during the burst:

- the store frozen (SIGSTOP) and thawed: requests hang rather than fail to connect;
- the store stopped gracefully, or SIGKILLed, and started again on the same port (it
  persists, as docs/budgets.md requires: append-only file, fsync always);
- an ext_proc worker SIGKILLed (its supervisor starts another), or SIGSTOPped for longer
  than both the reservation TTL and Envoy's ext_proc message timeout;
- one replica's Envoy SIGKILLed and started again.

Clients still disconnect mid-stream, providers still fail, lie and ignore caps. Once the
fault is undone and things have settled:

- every level in every window is charged at most its limit, and every charge reached every
  level (team and org spend equal the sum of the keys');
- no reservation is held; one stays expired unsettled only after a worker was killed, and
  it stays charged at its worst case (a frozen worker settles late once it thaws; when
  Envoy dies, the ext_proc settles each stream as a client disconnect);
- a refusal for the store (`503 budget_store_unavailable`) happens only with a store fault,
  comes within 2 s, and the provider never saw that request; `gateway_unavailable` only with
  a worker or Envoy fault; never `500 gateway_internal_error`; Envoy is alive;
- after a fault that loses nothing (store frozen or restarted with its data, no fault), a key
  whose requests were all well-behaved is charged exactly what the provider's usage says.

Two store freezes are also struck at fixed points: after a burst of streams is wholly
reserved (they end while it is frozen, past their TTL: each is settled exactly once after the
thaw), and during 200 concurrent reserves at the budget edge over both replicas.

Kept to about a minute for CI (three examples per fault); BUDGET_FAULT_EXAMPLES=50 hunts longer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis as redis_py
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ..redis_server import RedisServer
from .conftest import Gateway, two_replicas, workers, workers_healthy
from .test_budget_invariant import (KEYS, NAMES, PREFIX, Shape, invariant_values, report, send, shapes,
                                    within_limits)

TTL_S = 2  # budgets.reservationTTLSeconds: an abandoned reservation expires quickly here
MESSAGE_TIMEOUT = "2s"  # extproc.messageTimeout: above the store's worst refusal time (1.5 s)
STORE_FAULTS = ("store_pause", "store_restart", "store_kill")
PROCESS_FAULTS = ("worker_kill", "worker_stop", "envoy_kill")
# Faults after which nothing the gateway wrote or was about to write is lost.
LOSSLESS = ("none", *STORE_FAULTS)
EXAMPLES = int(os.environ.get("BUDGET_FAULT_EXAMPLES", "3"))  # per fault kind
STORE_REFUSAL_S = 2.0


@dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float  # after the burst starts
    for_s: float  # how long the store stays away (a frozen worker: always past TTL and message timeout)
    replica: int
    worker: int


def faults(kind: str) -> st.SearchStrategy[Fault]:
    # Up to 3 s away: past the reservation TTL, so held reservations expire meanwhile and
    # the queued settlements land late.
    return st.builds(Fault, kind=st.just(kind), at_s=st.floats(0.0, 0.4), for_s=st.floats(0.2, 3.0),
                     replica=st.integers(0, 1), worker=st.integers(0, 1))


# Requests of a burst start over its first second, so faults strike admissions as well as
# responses and settlements.
requests = st.lists(st.tuples(shapes, st.floats(0.0, 1.0)), min_size=1, max_size=12)


def fault_values(values: dict[str, Any], redis_url: str) -> None:
    invariant_values(values, redis_url)
    values["budgets"]["reservationTTLSeconds"] = TTL_S
    values["extproc"]["messageTimeout"] = MESSAGE_TIMEOUT


# Seconds each `503 budget_store_unavailable` took, by store fault: printed at the end (-s).
REFUSAL_TIMES: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[RedisServer, Gateway, Gateway]]:
    with RedisServer(persist=True) as redis, \
            two_replicas("gw-faults-", lambda v, _: fault_values(v, redis.url)) as (a, b):
        yield redis, a, b
    for kind, times in sorted(REFUSAL_TIMES.items()):
        times.sort()
        print(f"\n503 budget_store_unavailable during {kind}: {len(times)}, median {times[len(times) // 2]:.3f} s, "
              f"max {times[-1]:.3f} s")


def inject(fault: Fault, redis: RedisServer, gws: tuple[Gateway, Gateway]) -> None:
    """Strike at `fault.at_s`, then undo the fault (the supervisor restarts a killed worker).
    Runs on the main thread: Envoy is started with a parent-death signal, which a worker
    thread's exit would deliver."""
    time.sleep(fault.at_s)
    gw = gws[fault.replica]
    if fault.kind == "store_pause":
        redis.pause()
        time.sleep(fault.for_s)
        redis.resume()
    elif fault.kind in ("store_restart", "store_kill"):
        redis.stop() if fault.kind == "store_restart" else redis.kill()
        time.sleep(fault.for_s)
        redis.start()
    elif fault.kind in ("worker_kill", "worker_stop"):
        pid = workers(gw)[fault.worker]
        if fault.kind == "worker_kill":
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(TTL_S + 0.5)
            os.kill(pid, signal.SIGCONT)
    elif fault.kind == "envoy_kill":
        envoy = gw.stack.procs["envoy"]
        envoy.kill()
        envoy.wait()
        gw.stack.procs.pop("envoy")
        gw.stack.start_envoy()  # not restart_envoy(): its crash-loop guard counts every example


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: the connection failed (Envoy died under it)
    cost: int | None  # provider cost in nano$ when the client saw the provider's usage
    code: str | None
    took_s: float
    tag: str


async def attempt(client: httpx.AsyncClient, gws: tuple[Gateway, Gateway], s: Shape, after_s: float) -> Outcome:
    await asyncio.sleep(after_s)
    tag, started = uuid.uuid4().hex, time.monotonic()
    try:
        status, cost, code = await send(client, gws, s, {"x-mock-chunk-delay-ms": "5", "x-fault-test": tag})
    except httpx.TransportError:
        status, cost, code = 0, None, None
    return Outcome(status, cost, code, time.monotonic() - started, tag)


def fresh_day(redis: RedisServer, gw: Gateway) -> None:
    """An empty store (a fresh day for every level) and the mock providers' records cleared."""
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()
    client.close()
    gw.reset()


def usage_status(gw: Gateway, name: str) -> int:
    return httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[name]}"}, timeout=10).status_code


def settlements_pending(gw: Gateway) -> float:
    metrics = httpx.get(gw.stack.metrics_url, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("genai_budget_settlements_pending "))


def settle(redis: RedisServer, gws: tuple[Gateway, Gateway]) -> None:
    """Wait until both replicas answer through both of their workers (healthy in Envoy's
    eyes and answering), no settlement waits for a retry, and no reservation is held
    (usage calls expire reservations past their deadline)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answering = [usage_status(gw, name) for gw in gws for name in NAMES]
        if (answering == [200] * len(answering) and all(workers_healthy(gw) for gw in gws)
                and not any(settlements_pending(gw) for gw in gws) and held(redis) == 0):
            return
        time.sleep(0.2)
    raise AssertionError(f"not settled in 30 s: workers {[workers(gw) for gw in gws]}, held {held(redis)}")


def held(redis: RedisServer) -> int:
    client = redis_py.Redis(host=redis.host, port=redis.port)
    try:
        return client.hlen(f"{PREFIX}reservations")
    finally:
        client.close()


def expired_records(redis: RedisServer) -> dict[str, dict[str, Any]]:
    """Reservations that expired unsettled: id -> record."""
    client = redis_py.Redis(host=redis.host, port=redis.port)
    try:
        return {k.decode(): json.loads(v) for k, v in client.hgetall(f"{PREFIX}reservations:expired").items()}
    finally:
        client.close()


def mentioning(gws: tuple[Gateway, Gateway], ids: Any) -> list[str]:
    """Log lines of either replica that name one of `ids` (to explain a failure)."""
    return [line for gw in gws for line in gw.logs().splitlines() if any(i in line for i in ids)]


def provider_tags(gw: Gateway) -> set[str]:
    return {r["headers"].get("x-fault-test", "") for mock in (gw.primary, gw.backup) for r in gw.received(mock)}


@pytest.mark.parametrize("kind", ["none", *STORE_FAULTS, *PROCESS_FAULTS])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize="BUDGET_FAULT_EXAMPLES" not in os.environ)  # CI: the same examples every run; hunts: new ones
@given(data=st.data())
def test_no_fault_during_a_burst_overspends_or_loses_a_request(
        setup: tuple[RedisServer, Gateway, Gateway], kind: str, data: st.DataObject) -> None:
    fault, timed = data.draw(faults(kind), "fault"), data.draw(requests, "burst")
    burst = [s for s, _ in timed]
    redis, *pair = setup
    gws = (pair[0], pair[1])
    event(fault.kind)
    fresh_day(redis, gws[0])  # for every burst

    async def run() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(attempt(c, gws, s, after) for s, after in timed))

    with ThreadPoolExecutor(1) as pool:
        firing = pool.submit(asyncio.run, run())
        inject(fault, redis, gws)
        outcomes = firing.result()
    for gw in gws:
        assert gw.stack.procs["envoy"].poll() is None, "Envoy died"
        assert httpx.get(f"{gw.stack.admin_url}/ready", timeout=5).status_code == 200
    settle(redis, gws)

    seen_by_provider = provider_tags(gws[0])
    for o, s in zip(outcomes, burst):
        event(f"{fault.kind}: {o.status} {o.code or ''}".strip())
        assert o.code != "gateway_internal_error", s
        if o.code == "budget_store_unavailable":
            assert fault.kind in STORE_FAULTS, (fault, s)
            REFUSAL_TIMES.setdefault(fault.kind, []).append(o.took_s)
            assert o.took_s < STORE_REFUSAL_S, (o, fault)
            assert o.tag not in seen_by_provider, (o, fault, s)
        if o.code == "gateway_unavailable" or o.status == 0:
            assert fault.kind in PROCESS_FAULTS, (o, fault, s)

    reports = {name: report(gws[0], name) for name in NAMES}
    key_spend = {}
    for name, levels in reports.items():
        for (level, window), b in levels.items():
            if b["limit_usd"] is not None:
                assert round(b["spent_usd"] * 1e9) <= round(b["limit_usd"] * 1e9), (f"{level} {window} overspent", fault)
        key_spend[name] = round(levels[(f"key:{name}", "daily")]["spent_usd"] * 1e9)
    any_levels = reports[NAMES[0]]
    assert round(any_levels[("team:inv", "daily")]["spent_usd"] * 1e9) == sum(key_spend.values()), fault
    assert round(any_levels[("org:local", "daily")]["spent_usd"] * 1e9) == sum(key_spend.values()), fault

    expired = expired_records(redis)
    if fault.kind != "worker_kill":  # only a killed worker never settles what it held
        assert expired == {}, (fault, expired, mentioning(gws, expired))
    for name in NAMES:  # an expired reservation stays charged at its worst case
        worst = sum(int(r["r"]) for r in expired.values() if any(k.endswith(f"key:{name}:daily") or
                                                        f"key:{name}:daily:" in k for k in r["l"]))
        assert key_spend[name] >= worst, (name, fault)

    if fault.kind in LOSSLESS:
        for name in NAMES:
            mine = [(o, s) for o, s in zip(outcomes, burst) if s.key == name]
            if mine and all(s.honest and (o.status == 429 or o.code == "budget_store_unavailable"
                                          or (o.status == 200 and o.cost is not None)) for o, s in mine):
                assert key_spend[name] == sum(o.cost or 0 for o, _ in mine if o.status == 200), (name, fault, mine)


def test_a_client_gone_while_its_reserve_hangs_on_a_frozen_store_leaves_no_reservation(
        setup: tuple[RedisServer, Gateway, Gateway]) -> None:
    """The reserve reaches the frozen store's socket and is applied when it thaws; the client
    hung up meanwhile, so Envoy cancelled the ext_proc stream while it awaited the reply. That
    reserve must be cancelled like any whose reply was lost, not held until it expires
    charged at its worst case for a request never sent."""
    redis, gw, _ = setup
    fresh_day(redis, gw)
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}
    redis.pause()
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=0.2,
                       headers={"authorization": f"Bearer {KEYS['inv-c']}"})
        time.sleep(0.2)  # Envoy has reset the stream; the reserve is still in the store's socket
    finally:
        redis.resume()
    time.sleep(TTL_S + 0.5)  # any reservation it left has passed its deadline
    spent = report(gw, "inv-c")[("key:inv-c", "daily")]["spent_usd"]
    expired = expired_records(redis)
    assert (held(redis), expired, spent) == (0, {}, 0), mentioning((gw, gw), expired)


def _streamed(key: str, replica: int, words: int) -> Shape:
    return Shape(key, replica, "chat", "default-chat", 60, True, 1, words, False, None, None, None)


def test_streams_whose_store_freezes_between_reserve_and_settlement_are_charged_exactly_once(
        setup: tuple[RedisServer, Gateway, Gateway]) -> None:
    """Streams at both replicas are all reserved; then the store freezes (SIGSTOP) for longer
    than the reservation TTL, the streams end meanwhile (nothing on the response path waits
    for the store) and their settlements queue. Once it thaws, each key is charged exactly
    what the provider's usage says: settled once (late, if a reservation's deadline was seen
    to pass first), none lost, none held, none left expired."""
    redis, *pair = setup
    gws = (pair[0], pair[1])
    fresh_day(redis, gws[0])
    burst = [_streamed(NAMES[i % 3], i % 2, 40) for i in range(12)]
    slow = {"x-mock-latency-ms": "1500", "x-mock-chunk-delay-ms": "20"}

    async def run() -> list[tuple[int, int | None, str | None]]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(send(c, gws, s, slow) for s in burst))

    with ThreadPoolExecutor(1) as pool:
        firing = pool.submit(asyncio.run, run())
        deadline = time.monotonic() + 20
        while held(redis) < len(burst) and time.monotonic() < deadline:
            time.sleep(0.01)
        frozen_with = held(redis)
        redis.pause()
        try:
            results = firing.result(timeout=60)  # every stream ends while the store is frozen
            time.sleep(TTL_S + 1)  # past every held reservation's deadline
        finally:
            redis.resume()
    assert frozen_with > 0
    assert all(status == 200 and cost is not None or code == "budget_store_unavailable"
               for status, cost, code in results), results
    settle(redis, gws)
    assert expired_records(redis) == {}
    reports = {name: report(gws[0], name) for name in NAMES}
    for name in NAMES:
        spent = round(reports[name][(f"key:{name}", "daily")]["spent_usd"] * 1e9)
        assert spent == sum(cost or 0 for (status, cost, _), s in zip(results, burst)
                            if s.key == name and status == 200), (name, results)
    team = round(reports[NAMES[0]][("team:inv", "daily")]["spent_usd"] * 1e9)
    assert team == sum(cost or 0 for status, cost, _ in results if status == 200)


@pytest.mark.parametrize("at_s,for_s", [(0.05, 1.0), (0.3, 2.5)])
def test_a_store_frozen_during_200_concurrent_reserves_at_the_budget_edge_overspends_nothing(
        setup: tuple[RedisServer, Gateway, Gateway], at_s: float, for_s: float) -> None:
    """200 streamed requests at once over two replicas, far more than the keys' and team's
    budgets hold, and the store freezes while their reserves are in flight. Reserves that
    timed out are cancelled (even when they land after their cancel); once it thaws nothing
    is held or left expired, no level is above its limit, every charge reached every level,
    and every key whose requests all finished is charged exactly its providers' usage."""
    redis, *pair = setup
    gws = (pair[0], pair[1])
    fresh_day(redis, gws[0])
    burst = [_streamed(NAMES[i % 3], i % 2, 20) for i in range(200)]

    async def run() -> list[tuple[int, int | None, str | None]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=400)) as c:
            return await asyncio.gather(*(send(c, gws, s, {"x-mock-chunk-delay-ms": "5"}) for s in burst))

    with ThreadPoolExecutor(1) as pool:
        firing = pool.submit(asyncio.run, run())
        time.sleep(at_s)
        redis.pause()
        time.sleep(for_s)
        redis.resume()
        results = firing.result(timeout=120)
    assert all(code in (None, "budget_exceeded", "budget_store_unavailable") for _, _, code in results), results
    settle(redis, gws)
    assert expired_records(redis) == {}
    reports, key_spend = within_limits(gws[0])
    for name in NAMES:
        assert key_spend[name] == sum(cost or 0 for (status, cost, _), s in zip(results, burst)
                                      if s.key == name and status == 200), name
    assert round(reports[NAMES[0]][("team:inv", "daily")]["spent_usd"] * 1e9) == sum(key_spend.values())
