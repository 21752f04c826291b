"""Virtual keys created through the admin API: stored in Redis (every replica sees the same)
or, on one node, in a JSON file; read by the ext_proc workers through a 1-second cache.

Values-defined keys never come here (they live in gateway.yaml). A record holds the key's
SHA-256 only, never the key. Redis keys share the budget store's hash tag (`gw:{org}:`):

    {prefix}apikey:{id}       HASH  the record (fields below, all strings)
    {prefix}apikeys           SET   ids, for listing
    {prefix}apikeys:used      HASH  id -> last use (ISO 8601), written by the workers

A worker looks a key up at most once per second per id (positive and negative answers are
cached for `CACHE_SECONDS`), so a revocation or rotation is seen everywhere within about a
second, and each lookup is one round trip (a script reads the record and stamps its last use,
only if it exists, so unknown ids leave nothing behind).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Limits, VirtualKey
from .errors import GatewayError
from .redis_deadline import answered

CACHE_SECONDS = 1.0
_CACHE_MAX = 100_000
FIELDS = ("id", "sha256", "team", "user", "owner", "models", "created", "expires_at",
          "previous_sha256", "previous_until")
_LOOKUP = """
local r = redis.call('HGETALL', KEYS[1])
if #r > 0 then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return r
"""


@dataclass(frozen=True, slots=True)
class StoredEntry:
    key: VirtualKey
    previous_sha256: str | None
    previous_until: datetime | None


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def entry(record: dict[str, str]) -> StoredEntry:
    """A stored record (all-string fields, "" for none) as the principal it authenticates."""
    models = json.loads(record["models"]) if record.get("models") else None
    key = VirtualKey(record["id"], record["sha256"], record["team"], frozenset(models) if models is not None else None,
                     parse_time(record.get("expires_at")), record.get("user") or None, Limits())
    return StoredEntry(key, record.get("previous_sha256") or None, parse_time(record.get("previous_until")))


def redis_names(org: str) -> tuple[str, str, str]:
    """(record key prefix, id set, last-used hash) of one org."""
    prefix = f"gw:{{{org}}}:"
    return f"{prefix}apikey:", f"{prefix}apikeys", f"{prefix}apikeys:used"


class RedisKeyLookup:
    """The workers' view of the Redis key store."""

    def __init__(self, client: Any, org: str) -> None:
        from redis import exceptions as redis_errors

        self.errors = redis_errors
        # A replica promoted late in a failover answers READONLY: unavailable, as for budgets.
        self.unavailable = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError,
                            OSError)
        self.client = client
        self.record, _, self.used = redis_names(org)
        self.script = client.register_script(_LOOKUP)
        self.cache: dict[str, tuple[float, StoredEntry | None]] = {}
        # One lookup in flight per id: a burst on a stale entry waits for it instead of
        # sending one round trip each.
        self.inflight: dict[str, asyncio.Task[StoredEntry | None]] = {}

    async def get(self, id_: str) -> StoredEntry | None:
        hit = self.cache.get(id_)
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1]
        task = self.inflight.get(id_)
        if task is None:
            # A task of its own, awaited through a shield: a caller that goes away (Envoy
            # reset its stream, cancelling its handler) cancels only its own wait. Run in
            # the caller, the lookup died with it and every request waiting for it failed.
            task = asyncio.ensure_future(self._fetch(id_))
            self.inflight[id_] = task
            task.add_done_callback(lambda t: self._done(id_, t))
        return await asyncio.shield(task)

    def _done(self, id_: str, task: asyncio.Task[StoredEntry | None]) -> None:
        del self.inflight[id_]
        if not task.cancelled():
            task.exception()  # retrieved: waiters re-raise it, nobody else needs to

    async def _fetch(self, id_: str) -> StoredEntry | None:
        now = time.monotonic()
        args = [id_, datetime.now(timezone.utc).isoformat(timespec="seconds")]
        try:
            try:
                flat = await answered(self.script(keys=[self.record + id_, self.used], args=args))
            except self.errors.ConnectionError as e:
                if isinstance(e, self.errors.TimeoutError):
                    raise
                # The store closed a pooled socket (it restarted), so it closed every idle one:
                # drop them and try once on a fresh connection, or each would cost a request
                # a 503 after the store is back (as budgets/redis_store.py does).
                await self.client.connection_pool.disconnect(inuse_connections=False)
                flat = await answered(self.script(keys=[self.record + id_, self.used], args=args))
        except self.unavailable as e:
            raise GatewayError("key_store_unavailable", "The key store is unreachable; keys from values still "
                               "work. Retry shortly.") from e
        record = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        found = entry(record) if record else None
        if len(self.cache) >= _CACHE_MAX:
            self.cache.clear()
        self.cache[id_] = (now, found)
        return found


class FileKeyLookup:
    """The workers' view of the one-node key file: re-read when it changed, checked at most
    once per second (no file I/O on other requests)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.checked = -CACHE_SECONDS
        self.stamp: tuple[int, int, int] | None = None
        self.entries: dict[str, StoredEntry] = {}
        self.broken: str | None = None  # why the file could not be read, until it can

    async def get(self, id_: str) -> StoredEntry | None:
        now = time.monotonic()
        if now - self.checked >= CACHE_SECONDS:
            self.checked = now
            await asyncio.to_thread(self._refresh)
        if self.broken is not None:
            # Fail closed, as for Redis: a file that cannot be read may hold a revocation.
            raise GatewayError("key_store_unavailable", f"The key file cannot be read ({self.broken}); keys from "
                               "values still work.")
        return self.entries.get(id_)

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.entries, self.stamp, self.broken = {}, None, None
            return
        except OSError as exc:
            self.broken = exc.strerror or type(exc).__name__
            return
        # The inode too: every write renames a new file into place (`write_file`), so two writes
        # of one size within the file system's timestamp tick still differ.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self.stamp:
            try:
                self.entries = {id_: entry(r) for id_, r in read_file(self.path).items()}
            except OSError as exc:
                self.broken = exc.strerror or type(exc).__name__
                return
            except (ValueError, KeyError, TypeError, AttributeError):
                self.broken = "not a key file: invalid JSON or a record without its fields"
                return
            self.stamp, self.broken = stamp, None


def read_file(path: Path) -> dict[str, dict[str, str]]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return {}


def write_file(path: Path, records: dict[str, dict[str, str]]) -> None:
    """Atomically (rename), so a worker never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
