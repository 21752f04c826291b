"""How much large-body work one ext_proc process takes on at once.

Parsing, scanning and counting the tokens of a request body costs about 55 ms of CPU per MB
here. A burst of large bodies (64 callers at the 10 MiB limit) queued every one behind all the
others: each waited past Envoy's message timeout and failed as `gateway_unavailable`, small
requests of other callers waited seconds behind them, and the process held every body's
parsed copies at once (1.9 GB). So bodies over `LARGE_BYTES` take their size from a
per-process budget before that work starts, first come first served; one that cannot get
its share within `WAIT_S` is refused with 503 `gateway_busy` (the SDKs retry it), well
before Envoy's message timeout. Small bodies never wait: they take microseconds.

A request whose `content-length` announces a large body is refused at its headers already
when the bodies ahead of it (waiting in line, or announced and still on their way) come to
more than one budget with it, so Envoy never sends here a body that would only wait and be
refused. Counting the announced ones matters for a burst: 64 callers announce 9 MB
each before any body has arrived, and with only the line counted every one was let through,
so 576 MB crossed to the ext_proc to be refused there. Those bodies queued on the few HTTP/2
connections Envoy keeps to a process, and small requests' messages waited behind them past
the message timeout (503 `gateway_unavailable`). Nothing is reserved at the headers: an
announcement counts for `WAIT_S` at most, so a client uploading slowly (or never) stops
counting, and holds no share of the work it is not using. (The refusal itself goes out once
the body is in, from Envoy, which reads the body but does not send it here:
processors/responses.py `refusal_after_body`.)
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import GatewayError

LARGE_BYTES = 64 * 1024  # the same size above which that work leaves the event loop
BUDGET_BYTES = 16 * 1024 * 1024  # about a second of work at a time per process
WAIT_S = 1.5  # well under Envoy's default message timeout (extproc.messageTimeout, 5 s)


def busy() -> GatewayError:
    return GatewayError("gateway_busy", "The gateway is busy with other large requests; retry shortly.",
                        headers={"retry-after": "1"})


class BodyWork:
    """A byte budget for large-body work in one process; a body larger than the whole
    budget still goes, alone."""

    def __init__(self, budget: int = BUDGET_BYTES, wait_s: float = WAIT_S) -> None:
        self.budget, self.wait_s = budget, wait_s
        self.used = self.queued = self.announced = 0
        self._line: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._announcements: dict[int, tuple[float, int]] = {}  # id -> (counts until, size), oldest first
        self._ids = 0

    def announce(self, size: int, now: float) -> int:
        """At the request headers: refuse a large body when the bodies ahead of it come to
        more than one budget with it; else count it as on its way until `now + wait_s`. The
        announcement's id (0 for a small body) goes to `acquire` with the body."""
        if size <= LARGE_BYTES:
            return 0
        while self._announcements:  # oldest first: the first still counting ends the purge
            first = next(iter(self._announcements))
            until, old = self._announcements[first]
            if until > now:
                break
            del self._announcements[first]
            self.announced -= old
        ahead = self.queued + self.announced
        if ahead and ahead + size > self.budget:
            raise busy()
        self._ids += 1
        self._announcements[self._ids] = (now + self.wait_s, size)
        self.announced += size
        return self._ids

    async def acquire(self, size: int, announcement: int = 0) -> int:
        """Take `size` bytes of the budget (nothing for a small body); the bytes taken,
        which `release` gives back. Raises `gateway_busy` after `wait_s` in line.
        `announcement`: what `announce` gave this body's headers; it stops counting here."""
        if (announced := self._announcements.pop(announcement, None)) is not None:
            self.announced -= announced[1]
        if size <= LARGE_BYTES:
            return 0
        if not self._line and self._fits(size):
            self.used += size
            return size
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, turn)
        self._line.append(entry)
        self.queued += size
        try:
            async with asyncio.timeout(self.wait_s):
                await asyncio.shield(turn)
        except TimeoutError:
            if turn.done():  # its turn came as the wait ran out: it has the share
                return size
            self._leave(entry)
            raise busy() from None
        except BaseException:  # the stream ended while in line (Envoy reset it)
            if turn.done():
                self.release(size)
            else:
                self._leave(entry)
            raise
        return size

    def _leave(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        self._line.remove(entry)
        self.queued -= entry[0]
        self._wake()  # a big body leaving the head of the line may let smaller ones start

    def release(self, size: int) -> None:
        if size:
            self.used -= size
            self._wake()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.budget

    def _wake(self) -> None:
        while self._line and self._fits(self._line[0][0]):
            size, turn = self._line.popleft()
            self.queued -= size
            self.used += size
            turn.set_result(None)


BODY_WORK = BodyWork()
