"""How much large-body work one ext_proc process takes on at once.

Parsing, scanning and counting the tokens of a request body costs about 55 ms of CPU per MB
here. A burst of large bodies (64 callers at the 10 MiB limit) queued every one behind all the
others: each waited past Envoy's message timeout and failed as `gateway_unavailable`, small
requests of other callers waited seconds behind them, and the process held every body's
parsed copies at once (1.9 GB). So bodies over `LARGE_BYTES` reserve their size from a
per-process budget before that work starts; one that cannot get its share within
`WAIT_S` is refused with 503 `gateway_busy` (the SDKs retry it), well before Envoy's
message timeout. Small bodies never wait: they take microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import GatewayError

LARGE_BYTES = 64 * 1024  # the same size above which that work leaves the event loop
BUDGET_BYTES = 16 * 1024 * 1024  # about a second of work at a time per process
WAIT_S = 1.5  # well under Envoy's default message timeout (extproc.messageTimeout, 5 s)


class BodyWork:
    """A byte budget for large-body work, in one process; a body larger than the whole
    budget still goes alone."""

    def __init__(self, budget: int = BUDGET_BYTES, wait_s: float = WAIT_S) -> None:
        self.budget, self.wait_s, self.used = budget, wait_s, 0
        self._freed = asyncio.Condition()

    @asynccontextmanager
    async def share(self, size: int) -> AsyncIterator[None]:
        if size <= LARGE_BYTES:
            yield
            return
        async with self._freed:
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._freed.wait_for(lambda: self.used == 0 or self.used + size <= self.budget)
            except TimeoutError:
                raise GatewayError("gateway_busy", "The gateway is busy with other large requests; retry shortly.",
                                   headers={"retry-after": "1"}) from None
            self.used += size
        try:
            yield
        finally:
            async with self._freed:
                self.used -= size
                self._freed.notify_all()


BODY_WORK = BodyWork()
