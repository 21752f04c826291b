"""How long a Redis call (budgets, keys) may take before its store counts as unavailable,
measured so that this process's own busy event loop cannot trip it.

redis-py's socket timeouts are `asyncio.timeout`, which fires on wall time. When the event
loop was busy past the deadline (a burst; a worker killed mid-burst moves its streams onto
the others; a CPU-starved host), the timer runs in the same loop pass as the read of a reply
that came in time, and cancels it: a healthy store was reported down. In CI, 3 of 300
requests got 503 `budget_store_unavailable` while Redis sat idle.

`answered` gives the loop one more look before it gives up. A deadline that comes due
waits again for as long as the loop was late to run it, at most `TIMEOUT_S` more. A
reply that reached the socket in time is read. A store that is gone still fails after
`TIMEOUT_S` when the loop is responsive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from redis import exceptions as redis_errors

T = TypeVar("T")

TIMEOUT_S = 0.5


async def answered(call: Awaitable[T], timeout_s: float = TIMEOUT_S) -> T:
    """`await call` in this task, or raise redis' TimeoutError (a ConnectionError) when the
    store did not answer in time. The call is cancelled then; redis-py drops a connection
    whose command was cancelled, so no late reply is read as another call's."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    due = loop.time() + timeout_s
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    def last_look() -> None:
        nonlocal timer
        # A reply that came while the loop was busy is read before this runs: its read was
        # queued ahead of this timer, and resumes the task ahead of the new one.
        timer = loop.call_later(min(loop.time() - due, timeout_s), expire)

    timer = loop.call_at(due, last_look)
    try:
        return await call
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise redis_errors.TimeoutError(f"no answer from the store within {timeout_s} s") from None
        raise
    finally:
        timer.cancel()
