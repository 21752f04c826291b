"""The large-body work budget of one ext_proc process (gateway_extproc/admission.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway_extproc.admission import LARGE_BYTES, BodyWork
from gateway_extproc.errors import GatewayError

MB = 1 << 20


async def hold(work: BodyWork, size: int, started: list[int], release: asyncio.Event) -> None:
    async with work.share(size):
        started.append(size)
        await release.wait()


async def test_small_bodies_never_wait() -> None:
    work = BodyWork(budget=4 * MB, wait_s=0.05)
    release, started = asyncio.Event(), []
    big = asyncio.create_task(hold(work, 4 * MB, started, release))
    await asyncio.sleep(0)
    async with work.share(LARGE_BYTES):  # at the threshold: small
        assert work.used == 4 * MB
    release.set()
    await big


async def test_large_bodies_share_the_budget_and_wait_their_turn() -> None:
    work = BodyWork(budget=4 * MB, wait_s=1)
    release, started = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(work, 2 * MB, started, release)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert started == [2 * MB, 2 * MB] and work.used == 4 * MB  # the third waits
    release.set()
    await asyncio.gather(*tasks)
    assert started == [2 * MB] * 3 and work.used == 0


async def test_a_body_larger_than_the_budget_goes_alone() -> None:
    work = BodyWork(budget=4 * MB, wait_s=1)
    release, started = asyncio.Event(), []
    first = asyncio.create_task(hold(work, 9 * MB, started, release))
    await asyncio.sleep(0.01)
    assert started == [9 * MB]
    second = asyncio.create_task(hold(work, 1 * MB, started, release))
    await asyncio.sleep(0.01)
    assert started == [9 * MB]
    release.set()
    await asyncio.gather(first, second)


async def test_a_body_that_cannot_get_its_share_in_time_is_gateway_busy() -> None:
    work = BodyWork(budget=4 * MB, wait_s=0.05)
    release, started = asyncio.Event(), []
    big = asyncio.create_task(hold(work, 4 * MB, started, release))
    await asyncio.sleep(0.01)
    with pytest.raises(GatewayError) as refused:
        async with work.share(MB):
            pass
    assert (refused.value.code, refused.value.status, refused.value.headers) == ("gateway_busy", 503,
                                                                                 {"retry-after": "1"})
    assert work.used == 4 * MB  # the refused one took nothing
    release.set()
    await big
    assert work.used == 0


async def test_a_failing_body_gives_its_share_back() -> None:
    work = BodyWork(budget=4 * MB, wait_s=0.05)
    with pytest.raises(ValueError):
        async with work.share(3 * MB):
            raise ValueError("bad body")
    assert work.used == 0
