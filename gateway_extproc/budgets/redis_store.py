"""Budgets in Redis (or Valkey), shared by every replica: one script call per operation.

Each of reserve, settle and usage is exactly one round trip: an EVALSHA of a Lua script
(`lua/*.lua`), so the whole multi-level check-and-reserve is atomic (a pipeline of INCRBYs,
as envoyproxy/ratelimit uses for plain counters, cannot refuse without first charging). The
script's SHA-1 is computed locally; on NOSCRIPT (a restarted or failed-over server, SCRIPT
FLUSH) it is loaded with SCRIPT LOAD and called again, once.

Key naming. `prefix` must carry a Redis Cluster hash tag, one per tenant, e.g.
`gw:{acme}:`. Every key of the store is `prefix` + a fixed part, so all of a tenant's keys
(every budget level, bucket and reservation) hash to one slot and a script may touch them
together; Cluster rejects scripts whose keys span slots ("EVALSHA - all keys must map to the
same key slot", BerriAI/litellm#14968). The cost is that one tenant's traffic is served by
one shard. Keys:

    {prefix}budget:{limit.key}          counter, nano$ used (STRING, TTL = Limit.ttl_s)
    {prefix}bucket:{bucket.key}         token bucket {v: level, ts: ms} (HASH, gone when full)
    {prefix}reservations                reservation id -> {r: nano$, t: tokens, l: [keys]} (HASH)
    {prefix}reservations:expiry         reservation id by expiry ms (ZSET)
    {prefix}reservations:released       ids released by expiry, by release ms (ZSET)

Connection errors and timeouts become `BudgetStoreUnavailable`. Give the client short
timeouts and no retries (see `connect`): a reserve whose reply was lost may still have been
applied (its reservation expires and is released), so it must not be sent again, and a
caller waiting on retries is a caller not failing over.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib.resources import files

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway_extproc.budgets.store import (
    RELEASE_BATCH,
    RELEASED_KEEP_MS,
    Bucket,
    BudgetStoreUnavailable,
    Limit,
    ReserveRequest,
    ReserveResult,
    Usage,
    result,
    usage_of,
)

_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError)
# Redis hashes only the part between the first "{" and the next "}", if non-empty.
_HASH_TAG = re.compile(r"^[^{]*\{[^}]+\}")


def connect(url: str, timeout_s: float = 0.5) -> Redis:
    """A client suited to the store: short timeouts, no retries (redis-py retries by default)."""
    return Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


class _Script:
    def __init__(self, name: str) -> None:
        lua = files("gateway_extproc.budgets") / "lua"
        self.text = (lua / "common.lua").read_text() + "\n" + (lua / name).read_text()
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[int | float | str]) -> list:
        try:
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except redis_errors.NoScriptError:
                await client.script_load(self.text)
                return await client.evalsha(self.sha, len(keys), *keys, *args)
        except _UNAVAILABLE as e:
            raise BudgetStoreUnavailable(f"budget store unreachable: {e}") from e


_RESERVE, _SETTLE, _USAGE = _Script("reserve.lua"), _Script("settle.lua"), _Script("usage.lua")


class RedisBudgetStore:
    """`BudgetStore` for one tenant on Redis; cheap to create, so one per tenant prefix."""

    def __init__(self, client: Redis, prefix: str) -> None:
        if not _HASH_TAG.match(prefix):
            raise ValueError(f"prefix {prefix!r} needs a non-empty hash tag, e.g. 'gw:{{acme}}:'")
        self._client = client
        self._prefix = prefix
        held = f"{prefix}reservations"
        self._fixed = (held, f"{held}:expiry", f"{held}:released")

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
            len(r.limits), len(r.token_buckets), RELEASE_BATCH, RELEASED_KEEP_MS,
        ]
        for lim in r.limits:
            args += [lim.limit_nano, lim.ttl_s]
        for b in r.buckets:
            args += [b.capacity, repr(b.refill_per_s)]
        try:
            grant, refused, used, levels = await _RESERVE(self._client, self._keys(r.limits, r.buckets), args)
        except redis_errors.ResponseError as e:
            if str(e).startswith("DUPLICATE"):
                raise ValueError(f"reservation {r.reservation_id!r} is already held") from e
            raise
        return result(r, grant, refused, [int(u) for u in used], [float(v) for v in levels])

    async def settle(self, request: ReserveRequest, actual_cost_nano: int, actual_tokens: int, now_ms: int) -> None:
        r = request
        args: list[int | float | str] = [r.reservation_id, actual_cost_nano, actual_tokens, now_ms, len(r.limits),
                                         len(r.token_buckets)]
        args += [lim.ttl_s for lim in r.limits]
        for b in r.token_buckets:
            args += [b.capacity, repr(b.refill_per_s)]
        args += [t.ttl_s for t in r.tallies]
        keys = self._keys(r.limits, r.token_buckets) + [f"{self._prefix}budget:{t.key}" for t in r.tallies]
        await _SETTLE(self._client, keys, args)

    async def usage(self, limits: Sequence[Limit], buckets: Sequence[Bucket], now_ms: int) -> Usage:
        args: list[int | float | str] = [now_ms, RELEASE_BATCH, RELEASED_KEEP_MS, len(limits)]
        for b in buckets:
            args += [b.capacity, repr(b.refill_per_s)]
        used, levels = await _USAGE(self._client, self._keys(limits, buckets), args)
        return usage_of(limits, buckets, [int(u) for u in used], [float(v) for v in levels])
