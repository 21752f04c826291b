"""The large-body work budget of one ext_proc process (gateway_extproc/admission.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway_extproc.admission import LARGE_BYTES, BodyWork
from gateway_extproc.errors import GatewayError

MB = 1 << 20


async def hold(work: BodyWork, size: int, started: list[int], release: asyncio.Event, announcement: int = 0) -> None:
    share = await work.acquire(size, announcement)
    try:
        started.append(size)
        await release.wait()
    finally:
        work.release(share)


async def test_small_bodies_never_wait() -> None:
    work = BodyWork(budget=4 * MB, wait_s=0.05)
    release, started = asyncio.Event(), []
    big = asyncio.create_task(hold(work, 4 * MB, started, release))
    await asyncio.sleep(0)
    assert await work.acquire(LARGE_BYTES) == 0 and work.used == 4 * MB  # at the threshold: small
    release.set()
    await big
    assert work.used == 0


async def test_large_bodies_share_the_budget_and_wait_their_turn_in_order() -> None:
    work = BodyWork(budget=4 * MB, wait_s=1)
    release, started = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(work, size, started, release)) for size in (2 * MB, 2 * MB, 3 * MB, 1 * MB)]
    await asyncio.sleep(0.01)
    assert started == [2 * MB, 2 * MB] and work.used == 4 * MB and work.queued == 4 * MB
    release.set()
    await asyncio.gather(*tasks)
    assert started == [2 * MB, 2 * MB, 3 * MB, 1 * MB] and work.used == work.queued == 0  # first come, first served


async def test_a_body_larger_than_the_budget_goes_alone() -> None:
    work = BodyWork(budget=4 * MB, wait_s=1)
    release, started = asyncio.Event(), []
    first = asyncio.create_task(hold(work, 9 * MB, started, release))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(hold(work, 1 * MB, started, release))
    await asyncio.sleep(0.01)
    assert started == [9 * MB]
    release.set()
    await asyncio.gather(first, second)
    assert started == [9 * MB, 1 * MB]


async def test_a_body_that_cannot_get_its_share_in_time_is_gateway_busy() -> None:
    work = BodyWork(budget=4 * MB, wait_s=0.05)
    release, started = asyncio.Event(), []
    big = asyncio.create_task(hold(work, 4 * MB, started, release))
    await asyncio.sleep(0.01)
    with pytest.raises(GatewayError) as refused:
        await work.acquire(MB)
    assert (refused.value.code, refused.value.status, refused.value.headers) == ("gateway_busy", 503,
                                                                                 {"retry-after": "1"})
    assert (work.used, work.queued) == (4 * MB, 0)  # the refused one took nothing and left the line
    release.set()
    await big
    assert work.used == 0


async def test_a_stream_cancelled_in_line_takes_nothing() -> None:
    """A stream Envoy resets while its body waits must not keep a share for ever."""
    work = BodyWork(budget=4 * MB, wait_s=5)
    release, started = asyncio.Event(), []
    big = asyncio.create_task(hold(work, 4 * MB, started, release))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(work.acquire(2 * MB))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (work.used, work.queued) == (4 * MB, 0)
    release.set()
    await big
    assert work.used == 0


async def test_a_large_announced_body_is_refused_at_the_headers_only_behind_a_long_line() -> None:
    work = BodyWork(budget=4 * MB, wait_s=5)
    release, started = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(work, 4 * MB, started, release))]
    await asyncio.sleep(0.01)
    waits = work.announce(4 * MB, 0)  # nothing ahead of it: it may wait its turn
    tasks.append(asyncio.create_task(hold(work, 3 * MB, started, release, waits)))
    await asyncio.sleep(0.01)
    assert (work.queued, work.announced) == (3 * MB, 0)  # its body came: counted once, in line
    work.announce(MB, 0)  # 3 + 1 MB ahead: within one budget
    with pytest.raises(GatewayError):
        work.announce(MB, 0)  # 3 MB in line and 1 MB on its way
    assert work.announce(LARGE_BYTES, 0) == 0  # small bodies never
    release.set()
    await asyncio.gather(*tasks)


def test_announced_bodies_count_before_they_arrive_and_only_for_the_wait() -> None:
    """64 callers announcing 9 MB at once: only the first gets through the headers (576 MB
    crossing to the ext_proc to be refused there held small requests past the message
    timeout). A body announced but not sent stops counting after `wait_s`; one larger than
    the whole budget still goes when nothing is ahead of it."""
    work = BodyWork(budget=16 * MB, wait_s=1.5)
    assert work.announce(9 * MB, 0.0)
    for _ in range(63):
        with pytest.raises(GatewayError):
            work.announce(9 * MB, 0.1)
    assert work.announced == 9 * MB
    work.announce(7 * MB, 0.2)  # 9 + 7: exactly one budget
    with pytest.raises(GatewayError):
        work.announce(9 * MB, 1.49)
    assert work.announce(9 * MB, 1.5)  # the first stopped counting: 7 + 9
    assert work.announced == 16 * MB
    assert work.announce(9 * MB, 10.0) and work.announced == 9 * MB  # both earlier ones expired
    alone = BodyWork(budget=4 * MB, wait_s=1.5)
    assert alone.announce(6 * MB, 0.0)


async def test_a_body_takes_its_announcement_back_once() -> None:
    work = BodyWork(budget=16 * MB, wait_s=5)
    first = work.announce(9 * MB, 0.0)
    assert await work.acquire(9 * MB, first) == 9 * MB
    assert (work.used, work.announced) == (9 * MB, 0)
    second = work.announce(9 * MB, 0.0)  # nothing ahead: the first is at work, not in line
    assert await work.acquire(LARGE_BYTES, second) == 0  # it came smaller than announced
    assert work.announced == 0
    assert await work.acquire(LARGE_BYTES, second) == 0 and work.announced == 0  # not twice
    work.release(9 * MB)
