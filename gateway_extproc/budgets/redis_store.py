"""Budgets in Redis (or Valkey), shared by every replica: one script call per operation,
and one round trip per event-loop tick for all of them.

Each of reserve, settle and usage is one EVALSHA of a Lua script (`lua/*.lua`), so the
whole multi-level check-and-reserve is atomic (a pipeline of INCRBYs, as
envoyproxy/ratelimit uses for plain counters, cannot refuse without first charging). The
script's SHA-1 is computed locally; on NOSCRIPT (a restarted or failed-over server, SCRIPT
FLUSH) it is loaded with SCRIPT LOAD and called again, once.

Batching (`_Pipeliner`). Calls made in the same event-loop tick — every admission and
settlement of every request the process is serving — go out as ONE pipeline, like
ratelimit's pipeline window: a burst of 500 requests costs a handful of round trips, not
500 connections racing for one server. At most `POOL_SIZE` pipelines are in flight (one
connection each); calls arriving meanwhile wait for the next one, and all of them go in
it. Busy is not down: no answer within `redis_deadline.TIMEOUT_S`, or a refused
connection, is `BudgetStoreUnavailable`; a connection that fails because the server
closed it (a graceful restart left stale sockets in the pool) is retried once on a fresh
one, after every idle pooled socket is dropped (they are all stale then). A queued call
has no deadline of its own: every pipeline in flight ends within its own deadline, and
the next one takes every queued call. (A queue deadline, checked whenever a call arrived,
misfired after the event loop stalled: the next request's arrival was handled before
the replies that freed a connection were read, and every queued call was refused as
busy while Redis sat idle.) A reply this process's busy event loop was too late to read
in time is still read (`redis_deadline`).
Retrying is safe because every script is idempotent per reservation id: reserving a held
id answers with the held grant, settling twice is settling once, usage only reads and
expires.

Key naming. `prefix` must carry a Redis Cluster hash tag, one per tenant, e.g.
`gw:{acme}:`. Every key of the store is `prefix` + a fixed part, so all of a tenant's keys
(every budget level, bucket and reservation) hash to one slot and a script may touch them
together; Cluster rejects scripts whose keys span slots ("EVALSHA - all keys must map to the
same key slot", BerriAI/litellm#14968). The cost is that one tenant's traffic is served by
one shard. Keys:

    {prefix}budget:{limit.key}          counter, nano$ used (STRING, TTL = Limit.ttl_s)
    {prefix}bucket:{bucket.key}         token bucket {v: level, ts: ms} (HASH, gone when full)
    {prefix}reservations                held: id -> {r: nano$, t: tokens, g: grant, l: [keys]} (HASH)
    {prefix}reservations:expiry         held ids by deadline ms (ZSET)
    {prefix}reservations:expired        expired unsettled, still charged: id -> record (HASH)
    {prefix}reservations:expired:at     expired ids by expiry ms, to forget them (ZSET)
    {prefix}reservations:cancelled      ids settled before they were held, by ms: refused if they arrive (ZSET)
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway_extproc.budgets.store import (
    EXPIRE_BATCH,
    EXPIRED_KEEP_MS,
    LATE,
    NOTHING,
    SETTLED,
    Bucket,
    BudgetStoreUnavailable,
    Limit,
    ReserveRequest,
    ReserveResult,
    Usage,
    result,
    usage_of,
)
from gateway_extproc.redis_deadline import TIMEOUT_S, answered

_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError)
# Redis hashes only the part between the first "{" and the next "}", if non-empty.
_HASH_TAG = re.compile(r"^[^{]*\{[^}]+\}")
# Pipelines in flight per process (one connection each). The server runs scripts one at a
# time anyway; a few pipelines overlap network and parsing with its work.
POOL_SIZE = 4
_OUTCOMES = {0: NOTHING, 1: SETTLED, 2: LATE}


def connect(url: str) -> Redis:
    """A client suited to the store: a bounded pool (POOL_SIZE, plus one for other callers)
    and no retries of its own (redis-py retries by default; the store retries once, where
    that is safe). It has no socket timeouts: every call is made through
    `redis_deadline.answered`, which a busy event loop does not trip."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE + 1, timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0))
    return Redis(connection_pool=pool)


class _Script:
    def __init__(self, name: str) -> None:
        lua = files("gateway_extproc.budgets") / "lua"
        self.text = (lua / "common.lua").read_text() + "\n" + (lua / name).read_text()
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()


_RESERVE, _SETTLE, _USAGE = _Script("reserve.lua"), _Script("settle.lua"), _Script("usage.lua")


@dataclass(slots=True)
class _Call:
    script: _Script
    keys: Sequence[str]
    args: Sequence[int | float | str]
    future: asyncio.Future[Any]
    attempts: int = field(default=0)


class _Pipeliner:
    """Sends every call queued in one event-loop tick as one pipeline (see module doc)."""

    def __init__(self, client: Redis, timeout_s: float, slots: int = POOL_SIZE) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._free = slots
        self._waiting: list[_Call] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def call(self, script: _Script, keys: Sequence[str], args: Sequence[int | float | str]) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self._waiting.append(call)
        self._schedule(loop)
        return await call.future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._free == 0:
            return  # a pipeline in flight flushes again when it returns
        waiting = [c for c in self._waiting if not c.future.done()]  # done: the caller gave up
        self._waiting = []
        if not waiting:
            return
        self._free -= 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(waiting))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Call]) -> None:
        try:
            await self._send(batch)
        finally:
            self._free += 1
            if self._waiting:
                self._schedule(asyncio.get_running_loop())

    async def _send(self, batch: list[_Call]) -> None:
        stale_retry = True
        while batch:
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for c in batch:
                        pipe.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
                    replies = await answered(pipe.execute(raise_on_error=False), self._timeout_s)
            except redis_errors.ConnectionError as e:
                if stale_retry and not isinstance(e, redis_errors.TimeoutError):
                    # The server closed a pooled socket (it restarted): so it closed every idle
                    # one too. Drop them all, then try once more on a fresh connection.
                    stale_retry = False
                    await self._client.connection_pool.disconnect(inuse_connections=False)
                    continue
                return _fail(batch, e)
            except _UNAVAILABLE as e:
                return _fail(batch, e)
            again = []
            for c, reply in zip(batch, replies):
                if isinstance(reply, redis_errors.NoScriptError) and c.attempts == 0:
                    c.attempts += 1
                    again.append(c)
                elif c.future.done():
                    continue
                elif isinstance(reply, _UNAVAILABLE):
                    c.future.set_exception(BudgetStoreUnavailable(f"budget store unavailable: {reply}"))
                elif isinstance(reply, Exception):
                    c.future.set_exception(reply)
                else:
                    c.future.set_result(reply)
            if again:
                try:
                    for script in {c.script.sha: c.script for c in again}.values():
                        await answered(self._client.script_load(script.text), self._timeout_s)
                except _UNAVAILABLE as e:
                    return _fail(again, e)
            batch = again


def _fail(batch: list[_Call], error: Exception) -> None:
    for c in batch:
        if not c.future.done():
            c.future.set_exception(BudgetStoreUnavailable(f"budget store unreachable: {error}"))


class RedisBudgetStore:
    """`BudgetStore` for one tenant on Redis; cheap to create, so one per tenant prefix."""

    def __init__(self, client: Redis, prefix: str, timeout_s: float = TIMEOUT_S) -> None:
        if not _HASH_TAG.match(prefix):
            raise ValueError(f"prefix {prefix!r} needs a non-empty hash tag, e.g. 'gw:{{acme}}:'")
        self._prefix = prefix
        held = f"{prefix}reservations"
        self._fixed = (held, f"{held}:expiry", f"{held}:expired", f"{held}:expired:at", f"{held}:cancelled")
        self._pipeliner = _Pipeliner(client, timeout_s)

    def _keys(self, limits: Sequence[Limit], buckets: Sequence[Bucket]) -> list[str]:
        return [
            *self._fixed,
            *(f"{self._prefix}budget:{lim.key}" for lim in limits),
            *(f"{self._prefix}bucket:{b.key}" for b in buckets),
        ]

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        r = request
        args: list[int | float | str] = [
            r.reservation_id, r.now_ms, r.now_ms + r.reservation_ttl_s * 1000, r.prompt_tokens,
            r.prompt_cost_nano, r.output_price_nano, r.output_tokens_wanted, r.min_output_tokens,
            len(r.limits), len(r.token_buckets), EXPIRE_BATCH, EXPIRED_KEEP_MS,
        ]
        for lim in r.limits:
            args += [lim.limit_nano, lim.ttl_s]
        for b in r.buckets:
            args += [b.capacity, repr(b.refill_per_s)]
        grant, refused, used, levels, expired = await self._pipeliner.call(
            _RESERVE, self._keys(r.limits, r.buckets), args)
        return result(r, grant, refused, [int(u) for u in used], [float(v) for v in levels], expired)

    async def settle(self, request: ReserveRequest, actual_cost_nano: int, actual_tokens: int, now_ms: int) -> str:
        r = request
        args: list[int | float | str] = [r.reservation_id, actual_cost_nano, actual_tokens, now_ms, len(r.limits),
                                         len(r.token_buckets)]
        args += [lim.ttl_s for lim in r.limits]
        for b in r.token_buckets:
            args += [b.capacity, repr(b.refill_per_s)]
        args += [t.ttl_s for t in r.tallies]
        args.append(EXPIRED_KEEP_MS)
        keys = self._keys(r.limits, r.token_buckets) + [f"{self._prefix}budget:{t.key}" for t in r.tallies]
        return _OUTCOMES[await self._pipeliner.call(_SETTLE, keys, args)]

    async def usage(self, limits: Sequence[Limit], buckets: Sequence[Bucket], now_ms: int) -> Usage:
        args: list[int | float | str] = [now_ms, EXPIRE_BATCH, EXPIRED_KEEP_MS, len(limits)]
        for b in buckets:
            args += [b.capacity, repr(b.refill_per_s)]
        used, levels, expired, held = await self._pipeliner.call(_USAGE, self._keys(limits, buckets), args)
        return usage_of(limits, buckets, [int(u) for u in used], [float(v) for v in levels], expired, held)
