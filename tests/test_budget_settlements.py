"""Settlements are never lost: queued while the store is away, sent once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway_extproc.budgets.redis_store import RedisBudgetStore, connect
from gateway_extproc.budgets.settlements import Settlement, Settlements, settled
from gateway_extproc.budgets.store import Limit, MemoryBudgetStore, ReserveRequest
from tests.redis_server import RedisServer

T0 = 1_800_000_000_000
TEAM = Limit("team:demo:daily:2026-11-23", 10**9, None, 3600)


def request(rid: str) -> ReserveRequest:
    return ReserveRequest(rid, (TEAM,), (), (), 100, 1_000, 10, 100, 1, 60, T0)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


async def test_settlements_wait_out_an_outage_and_land_once(server: RedisServer) -> None:
    client = connect(server.url)
    store = RedisBudgetStore(client, "gw:{acme}:", timeout_s=0.2)
    settlements = Settlements()
    try:
        for i in range(5):
            await store.reserve(request(f"r{i}"))
        server.pause()  # hangs: every call times out
        for i in range(5):
            settlements.submit(Settlement(store, request(f"r{i}"), 1_500, 150, T0))
        await asyncio.sleep(0.6)
        assert settlements.pending == 5
        server.resume()
        await settled(timeout_s=10)
        assert settlements.pending == 0
        usage = await store.usage((TEAM,), (), T0)
        assert usage.used_nano == {TEAM.key: 5 * 1_500} and usage.held == 0
    finally:
        server.resume()
        await client.aclose()


async def test_a_settlement_sent_twice_charges_once() -> None:
    store, settlements = MemoryBudgetStore(), Settlements()
    await store.reserve(request("r0"))
    for _ in range(3):
        settlements.submit(Settlement(store, request("r0"), 1_500, 150, T0))
    await settled()
    assert (await store.usage((TEAM,), (), T0)).used_nano == {TEAM.key: 1_500}
