"""Budgets and rate limits: the store contract, its data, the decision, and an in-process store.

Admission *reserves* a request's worst-case cost at every budget level at once and the
response *settles* it to the actual cost. Checking a balance now and charging it later lets
concurrent requests all read the same below-budget value and all pass (BerriAI/litellm#34732);
a reservation taken atomically, before the request leaves, closes that window.

`decide` and `result` are the one definition of the policy. `MemoryBudgetStore` runs them
directly; the Redis store runs the same decision inside `lua/reserve.lua` (so it stays one
atomic round trip) and builds its answer with `result`. The shared test suite holds the two
to the same behaviour.

A reservation is never released for free. It carries a deadline; every reserve and usage
call first expires reservations whose deadline passed unsettled (their replica died, or
every settle retry failed), and an expired reservation stays charged at its reserved
worst case. A settle that arrives later still corrects it to the actual cost, once:
settling is idempotent per reservation id, and reserving an id already held answers with
the held grant, so both are safe to retry after a lost reply.

A reserve whose reply was lost is cancelled by settling it at $0. On the wire the cancel
can overtake its reserve (a frozen store thaws and serves the cancel's connection first),
so a settle that finds nothing remembers the id as cancelled (EXPIRED_KEEP_MS), and a
later reserve of a cancelled id changes nothing and is refused (`CANCELLED`): otherwise it
would be held, then expire charged at its worst case for a request never sent.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Lua numbers are doubles: integers stay exact up to 2**53 nano$ (about 9 million USD).
MAX_NANO = 2**53 - 1
# Reservations expired per reserve/usage call, bounding the Redis script's work (the
# memory store keeps the same bound so both stores report the same balances).
EXPIRE_BATCH = 50
# How long an expired reservation is remembered, so a late settle can still correct it;
# also how long a cancelled id stays refused.
EXPIRED_KEEP_MS = 86_400_000
# `refused_by` of a reserve whose id was cancelled (settled) before it arrived.
CANCELLED = "cancelled"


class BudgetStoreUnavailable(Exception):
    """The store could not be reached in time. The caller decides to fail open or closed."""


@dataclass(frozen=True, slots=True)
class Limit:
    """One budget level in one window, e.g. `team:demo:daily:2026-11-23`. `ttl_s` is how long
    the counter lives once created: until its window ends plus a day (`Window.ttl_s`)."""

    key: str
    limit_nano: int
    soft_nano: int | None
    ttl_s: int

    def __post_init__(self) -> None:
        if not 0 <= self.limit_nano <= MAX_NANO or self.ttl_s <= 0:
            raise ValueError(f"limit {self.key!r}: need 0 <= limit_nano <= {MAX_NANO} and ttl_s > 0")
        if self.soft_nano is not None and not 0 <= self.soft_nano <= MAX_NANO:
            raise ValueError(f"limit {self.key!r}: soft_nano out of range")


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: holds up to `capacity`, refills continuously at `refill_per_s`."""

    key: str
    capacity: int
    refill_per_s: float

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.refill_per_s <= 0:
            raise ValueError(f"bucket {self.key!r}: capacity and refill_per_s must be positive")

    @classmethod
    def per_minute(cls, key: str, n: int) -> Bucket:
        """A tokens- or requests-per-minute limit: a full minute's worth, refilled evenly."""
        return cls(key, n, n / 60)


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """Everything one reservation needs. Keep it: `settle` takes it back.

    Cost reserved = prompt_cost_nano + granted output tokens * output_price_nano. Token
    buckets are charged prompt_tokens + granted output tokens; request buckets one each.
    """

    reservation_id: str
    limits: tuple[Limit, ...]
    token_buckets: tuple[Bucket, ...]
    request_buckets: tuple[Bucket, ...]
    prompt_tokens: int
    prompt_cost_nano: int
    output_price_nano: int  # per output token
    output_tokens_wanted: int
    min_output_tokens: int
    reservation_ttl_s: int
    now_ms: int
    # Counters that settle adds the actual tokens to (tokens used per key and window, for
    # /v1/usage); read back with `usage` like limits. Never checked against a limit.
    tallies: tuple[Limit, ...] = ()

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.prompt_cost_nano, self.output_price_nano, self.min_output_tokens) < 0:
            raise ValueError("token counts and prices must not be negative")
        if self.min_output_tokens > self.output_tokens_wanted or self.reservation_ttl_s <= 0:
            raise ValueError("need min_output_tokens <= output_tokens_wanted and reservation_ttl_s > 0")
        if self.prompt_cost_nano + self.output_tokens_wanted * self.output_price_nano > MAX_NANO:
            raise ValueError("worst-case cost exceeds MAX_NANO")
        for group in (self.limits, self.buckets):
            if len({x.key for x in group}) != len(group):
                raise ValueError("keys must be unique among limits and among buckets")

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """Token buckets then request buckets: the order `decide` and the scripts index by."""
        return self.token_buckets + self.request_buckets


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The admission decision and the balances after it (unchanged when refused).

    `tokens_remaining` and `bucket_reset_s` cover request buckets too, for rate-limit
    headers. `retry_after_s` is set only for bucket refusals: a budget refusal lasts until
    its window resets, which the caller knows (`Window.seconds_until_reset`).
    """

    admitted: bool
    output_tokens: int  # granted; less than wanted means clamped
    reserved_nano: int
    refused_by: str | None
    retry_after_s: float | None
    remaining_nano: dict[str, int]
    soft_exceeded: tuple[str, ...]
    tokens_remaining: dict[str, int]
    bucket_reset_s: float | None
    expired: int = 0  # reservations of any request this call found expired unsettled


@dataclass(frozen=True, slots=True)
class Usage:
    used_nano: dict[str, int]
    remaining_nano: dict[str, int]
    tokens_remaining: dict[str, int]
    expired: int = 0  # as in ReserveResult
    held: int = -1  # reservations of the tenant held right now (-1: not reported)


# What `settle` did: charged as reserved, corrected an expired reservation, or nothing
# (settled before, or unknown).
SETTLED, LATE, NOTHING = "settled", "late", "nothing"


class BudgetStore(Protocol):
    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve at every limit and bucket, or change nothing. An id already held gets
        the held grant back and nothing changes (a retry)."""

    async def settle(self, request: ReserveRequest, actual_cost_nano: int, actual_tokens: int, now_ms: int) -> str:
        """Move the reservation to the actual cost (which may exceed it) and return unused
        tokens (`actual_tokens` counts prompt and completion). Idempotent. A reservation
        that expired (charged at its worst case) is corrected to the actual cost too.
        Returns SETTLED, LATE (it had expired) or NOTHING."""

    async def usage(self, limits: Sequence[Limit], buckets: Sequence[Bucket], now_ms: int) -> Usage:
        """Balances as of `now_ms`, after expiring due reservations."""


def _refill(level: float, ts_ms: int, bucket: Bucket, now_ms: int) -> float:
    return min(bucket.capacity, level + max(0, now_ms - ts_ms) / 1000 * bucket.refill_per_s)


def decide(request: ReserveRequest, used: Sequence[int], levels: Sequence[float]) -> tuple[int, int]:
    """(granted output tokens, -1) to admit, or (0, index of the refusing key) where indices
    run over limits, then `request.buckets`. `used` and `levels` are current balances."""
    r = request
    grant = r.output_tokens_wanted
    if r.limits:
        headroom, tightest = min((lim.limit_nano - u, i) for i, (lim, u) in enumerate(zip(r.limits, used)))
        spare = headroom - r.prompt_cost_nano
        if spare < grant * r.output_price_nano:
            if r.output_price_nano == 0 or spare // r.output_price_nano < r.min_output_tokens:
                return 0, tightest
            grant = spare // r.output_price_nano
    n_tok = len(r.token_buckets)
    for j, level in enumerate(levels):
        need = r.prompt_tokens + r.min_output_tokens if j < n_tok else 1
        if level < need:
            return 0, len(r.limits) + j
        if j < n_tok:
            grant = min(grant, math.floor(level - r.prompt_tokens))
    return grant, -1


def result(
    request: ReserveRequest, grant: int, refused: int, used: Sequence[int], levels: Sequence[float], expired: int = 0
) -> ReserveResult:
    """The caller-facing answer, from balances *after* the decision was applied. `refused`
    is as `decide` returns it, or -2: the id was cancelled before it arrived."""
    r = request
    buckets = r.buckets
    retry_after = None
    if refused >= len(r.limits):
        j = refused - len(r.limits)
        need = r.prompt_tokens + r.min_output_tokens if j < len(r.token_buckets) else 1
        if need <= buckets[j].capacity:  # otherwise waiting never helps
            retry_after = (need - levels[j]) / buckets[j].refill_per_s
    admitted = refused == -1
    balances = usage_of(r.limits, buckets, used, levels)
    return ReserveResult(
        admitted=admitted,
        output_tokens=grant if admitted else 0,
        reserved_nano=r.prompt_cost_nano + grant * r.output_price_nano if admitted else 0,
        refused_by=None if admitted else CANCELLED if refused == -2 else (r.limits + buckets)[refused].key,
        retry_after_s=retry_after,
        remaining_nano=balances.remaining_nano,
        soft_exceeded=tuple(
            lim.key for lim, u in zip(r.limits, used) if lim.soft_nano is not None and u > lim.soft_nano
        ),
        tokens_remaining=balances.tokens_remaining,
        bucket_reset_s=max(((b.capacity - v) / b.refill_per_s for b, v in zip(buckets, levels)), default=None),
        expired=expired,
    )


def usage_of(
    limits: Sequence[Limit], buckets: Sequence[Bucket], used: Sequence[int], levels: Sequence[float],
    expired: int = 0, held: int = -1,
) -> Usage:
    return Usage(
        used_nano={lim.key: u for lim, u in zip(limits, used)},
        remaining_nano={lim.key: max(0, lim.limit_nano - u) for lim, u in zip(limits, used)},
        tokens_remaining={b.key: math.floor(v) for b, v in zip(buckets, levels)},
        expired=expired, held=held,
    )


@dataclass(slots=True)
class _Held:
    reserved_nano: int
    tokens: int
    grant: int
    expires_ms: int


class MemoryBudgetStore:
    """The same semantics without I/O, for a single replica and for tests.

    No lock: every method body runs without an `await`, so each call is atomic on the event
    loop. Like Redis keys, counters and buckets expire (`Limit.ttl_s`; a bucket once full),
    purged at most once a minute of `now_ms`, so memory does not grow with past windows.
    """

    _PURGE_EVERY_MS = 60_000

    def __init__(self) -> None:
        self._counters: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, int]] = {}  # key -> (level, as of ms)
        self._expires: dict[str, int] = {}  # counter or bucket key -> ms
        self._held: dict[str, _Held] = {}
        self._expiry_heap: list[tuple[int, str]] = []
        self._expired: OrderedDict[str, tuple[_Held, int]] = OrderedDict()  # id -> (record, expired at ms)
        self._cancelled: OrderedDict[str, int] = OrderedDict()  # id settled before it was held -> ms
        self._next_purge_ms = 0

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        r = request
        expired = self._expire_due(r.now_ms)
        used = [self._counters.get(lim.key, 0) for lim in r.limits]
        levels = [self._level(b, r.now_ms) for b in r.buckets]
        if (held := self._held.get(r.reservation_id)) is not None:
            return result(r, held.grant, -1, used, levels, expired)
        if r.reservation_id in self._cancelled:
            return result(r, 0, -2, used, levels, expired)
        grant, refused = decide(r, used, levels)
        if refused >= 0:
            return result(r, grant, refused, used, levels, expired)
        reserved = r.prompt_cost_nano + grant * r.output_price_nano
        for lim in r.limits:
            self._charge(lim, reserved, r.now_ms)
        n_tok = len(r.token_buckets)
        for j, b in enumerate(r.buckets):
            levels[j] -= r.prompt_tokens + grant if j < n_tok else 1
            self._put_bucket(b, levels[j], r.now_ms)
        expires_ms = r.now_ms + r.reservation_ttl_s * 1000
        self._held[r.reservation_id] = _Held(reserved, r.prompt_tokens + grant, grant, expires_ms)
        heapq.heappush(self._expiry_heap, (expires_ms, r.reservation_id))
        return result(r, grant, -1, [self._counters[lim.key] for lim in r.limits], levels, expired)

    async def settle(self, request: ReserveRequest, actual_cost_nano: int, actual_tokens: int, now_ms: int) -> str:
        return self.settle_now(request, actual_cost_nano, actual_tokens, now_ms)

    def settle_now(self, request: ReserveRequest, actual_cost_nano: int, actual_tokens: int, now_ms: int) -> str:
        """`settle` without a coroutine: no I/O and nothing that can fail, so the settlement
        queue runs it inline (no task per request, and the next request sees the charge)."""
        held = self._held.pop(request.reservation_id, None)
        if len(self._expiry_heap) > 2 * len(self._held) + 1024:
            self._compact_heap()
        outcome = SETTLED
        if held is not None:
            charge, refund = actual_cost_nano - held.reserved_nano, held.tokens - actual_tokens
        elif (gone := self._expired.pop(request.reservation_id, None)) is not None:
            charge, refund, outcome = actual_cost_nano - gone[0].reserved_nano, 0, LATE
        else:
            self._cancelled[request.reservation_id] = now_ms
            return NOTHING
        for lim in request.limits:
            self._charge(lim, charge, now_ms)
        if refund:
            for b in request.token_buckets:
                self._put_bucket(b, max(0.0, self._level(b, now_ms) + refund), now_ms)
        for tally in request.tallies:  # (saturating at MAX_NANO, as the Redis store's tallies do)
            self._charge(tally, min(actual_tokens, MAX_NANO - self._counters.get(tally.key, 0)), now_ms)
        return outcome

    async def usage(self, limits: Sequence[Limit], buckets: Sequence[Bucket], now_ms: int) -> Usage:
        expired = self._expire_due(now_ms)
        used = [self._counters.get(lim.key, 0) for lim in limits]
        return usage_of(limits, buckets, used, [self._level(b, now_ms) for b in buckets], expired, len(self._held))

    def _charge(self, lim: Limit, amount: int, now_ms: int) -> None:
        if lim.key not in self._counters:
            self._expires[lim.key] = now_ms + lim.ttl_s * 1000
        self._counters[lim.key] = self._counters.get(lim.key, 0) + amount

    def _level(self, b: Bucket, now_ms: int) -> float:
        state = self._buckets.get(b.key)
        return b.capacity if state is None else _refill(state[0], state[1], b, now_ms)

    def _put_bucket(self, b: Bucket, level: float, now_ms: int) -> None:
        # A full bucket is the same as no state; otherwise keep it until it would be full.
        if level >= b.capacity:
            self._buckets.pop(b.key, None)
            self._expires.pop(b.key, None)
            return
        as_of = max(now_ms, self._buckets.get(b.key, (0.0, now_ms))[1])  # never rewind on clock skew
        self._buckets[b.key] = (level, as_of)
        self._expires[b.key] = as_of + math.ceil((b.capacity - level) / b.refill_per_s * 1000)

    def _compact_heap(self) -> None:
        """Drop the heap entries of settled reservations (left in place by `settle`), so the
        heap holds about the reservations in flight, not every request of the last TTL."""
        self._expiry_heap = [(h.expires_ms, rid) for rid, h in self._held.items()]
        heapq.heapify(self._expiry_heap)

    def _expire_due(self, now_ms: int) -> int:
        """Reservations past their deadline stay charged at their worst case; their records
        are kept (EXPIRED_KEEP_MS) so a late settle can correct them."""
        expired = 0
        while self._expiry_heap and self._expiry_heap[0][0] <= now_ms and expired < EXPIRE_BATCH:
            _, rid = heapq.heappop(self._expiry_heap)
            held = self._held.get(rid)
            if held is None or held.expires_ms > now_ms:  # settled already (or id reused)
                continue
            del self._held[rid]
            expired += 1
            self._expired[rid] = (held, now_ms)
        while self._expired and next(iter(self._expired.values()))[1] <= now_ms - EXPIRED_KEEP_MS:
            self._expired.popitem(last=False)
        while self._cancelled and next(iter(self._cancelled.values())) <= now_ms - EXPIRED_KEEP_MS:
            self._cancelled.popitem(last=False)
        self._purge(now_ms)
        return expired

    def _purge(self, now_ms: int) -> None:
        if now_ms >= self._next_purge_ms:
            self._next_purge_ms = now_ms + self._PURGE_EVERY_MS
            for key in [k for k, at in self._expires.items() if at <= now_ms]:
                del self._expires[key]
                self._counters.pop(key, None)
                self._buckets.pop(key, None)
