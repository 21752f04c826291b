"""Settlements that are never lost: tried at once, queued and retried while the store is away.

A settlement moves a reservation to what the request actually cost. If the store cannot
be reached when the response ends, the settlement waits in this process's queue and is
retried with backoff until the store answers; it is safe to send again because settling
is idempotent per reservation id (a second settle changes nothing). Should the process die
with settlements queued, or the queue overflow, their reservations expire and stay charged
at their reserved worst case (store.py): the budget errs on the side of having spent
more, never less, and a settlement that arrives after the expiry still corrects it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import structlog

from ..telemetry.metrics import BUDGET_SETTLEMENTS, BUDGET_SETTLEMENTS_PENDING, REDIS_LATENCY, child
from .store import LATE, BudgetStore, BudgetStoreUnavailable, MemoryBudgetStore, ReserveRequest

log = structlog.get_logger("gateway_extproc.budgets")

# Queued settlements per process. Each holds a ReserveRequest (a few hundred bytes), so a
# full queue is tens of MB; beyond it the oldest is dropped and its reservation expires.
MAX_PENDING = 100_000
# Sent per retry round (one pipeline), so a long outage does not end in one huge burst.
DRAIN_BATCH = 1_000
# Seconds between retry rounds, growing while the store stays away.
RETRY_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# Tasks referenced until done: the event loop holds tasks only weakly.
_TASKS: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class Settlement:
    store: BudgetStore
    request: ReserveRequest
    cost_nano: int
    tokens: int
    now_ms: int

    async def send(self) -> str:
        with child(REDIS_LATENCY, "settle").time():
            return await self.store.settle(self.request, self.cost_nano, self.tokens, self.now_ms)


class Settlements:
    """One process's settlements in flight and waiting."""

    def __init__(self) -> None:
        self._pending: deque[Settlement] = deque()
        self._retrying = 0  # taken from _pending for the retry round in flight
        self._draining = False

    @property
    def pending(self) -> int:
        """Settlements the store has not confirmed since their first attempt failed."""
        return len(self._pending) + self._retrying

    def submit(self, settlement: Settlement) -> None:
        s = settlement
        if isinstance(s.store, MemoryBudgetStore):
            _record(s, s.store.settle_now(s.request, s.cost_nano, s.tokens, s.now_ms))
            return
        _spawn(self._first(s))

    async def _first(self, s: Settlement) -> None:
        try:
            outcome = await s.send()
        except BudgetStoreUnavailable:
            self._queue(s)
        else:
            _record(s, outcome)

    def _queue(self, s: Settlement) -> None:
        child(BUDGET_SETTLEMENTS, "queued").inc()
        log.warning("budget_settle_queued", reservation=s.request.reservation_id, cost_nano=s.cost_nano)
        if len(self._pending) >= MAX_PENDING:
            lost = self._pending.popleft()
            BUDGET_SETTLEMENTS_PENDING.dec()
            child(BUDGET_SETTLEMENTS, "dropped").inc()
            log.error("budget_settle_dropped", reservation=lost.request.reservation_id, cost_nano=lost.cost_nano)
        self._pending.append(s)
        BUDGET_SETTLEMENTS_PENDING.inc()
        if not self._draining:
            self._draining = True
            _spawn(self._drain())

    async def _drain(self) -> None:
        failures = 0
        try:
            while self._pending:
                await asyncio.sleep(RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S) - 1)])
                batch = [self._pending.popleft() for _ in range(min(DRAIN_BATCH, len(self._pending)))]
                self._retrying = len(batch)
                results = await asyncio.gather(*(s.send() for s in batch), return_exceptions=True)
                retry = [s for s, r in zip(batch, results) if isinstance(r, BudgetStoreUnavailable)]
                self._pending.extendleft(reversed(retry))
                self._retrying = 0
                BUDGET_SETTLEMENTS_PENDING.dec(len(batch) - len(retry))
                failures = failures + 1 if retry else 0
                for s, r in zip(batch, results):
                    if isinstance(r, str):
                        _record(s, r)
                    elif not isinstance(r, BudgetStoreUnavailable):
                        child(BUDGET_SETTLEMENTS, "dropped").inc()
                        log.error("budget_settle_dropped", reservation=s.request.reservation_id, error=repr(r))
        finally:
            self._draining = False


def _record(s: Settlement, outcome: str) -> None:
    child(BUDGET_SETTLEMENTS, outcome).inc()
    if outcome == LATE:
        log.warning("budget_settled_late", reservation=s.request.reservation_id, cost_nano=s.cost_nano)


def _spawn(coro: object) -> None:
    task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def settled(timeout_s: float = 5.0) -> None:
    """Wait until every settlement this process started has reached the store (or timeout_s
    passed): for tests, and for a graceful stop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while _TASKS and loop.time() < deadline:
        await asyncio.wait(list(_TASKS), timeout=deadline - loop.time())
