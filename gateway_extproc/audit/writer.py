"""The audit sink: a bounded in-memory queue filled on the request path and a background
thread that owns the files.

The request path only appends a small dict to a deque (no I/O, no lock, no serialization).
When the queue is full the event is dropped, counted in `genai_audit_events_total{result=
"dropped"}`, and the writer records how many were lost as an `events_dropped` record in the
chain, so a gap is itself on the record (docs/audit.md). The thread serializes, hashes,
writes one batch per cycle with os.write (no user-space buffer), fsyncs by policy, writes a
signed checkpoint every `checkpointSeconds`, rotates segments by size and age, prunes by
retention, and optionally ships every line to a Redis Stream (best effort: the files are the
record). Events go to one chain per tier (retention differs by tier), all of this process;
the `gateway` chain is checkpointed and written after the others, naming how far each got.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from ..telemetry.metrics import AUDIT_EVENTS
from .chain import Chain, iso
from .retention import prunable
from .settings import GATEWAY_STREAM, AuditSettings
from .signing import Signer

log = structlog.get_logger("gateway_extproc.audit")
POLL_SECONDS = 0.05
BATCH = 512  # events per write; the GIL is given back between batches
PRUNE_SECONDS = 600.0
SHIP_BACKOFF_SECONDS = 5.0
CONFIGS = "configs"
_WRITTEN, _DROPPED, _SHIP_FAILED = (AUDIT_EVENTS.labels(r) for r in ("written", "dropped", "ship_failed"))


class AuditSink:
    def __init__(self, settings: AuditSettings, signer: Signer, instance: str,
                 now: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.signer = signer
        self.root = Path(settings.dir)
        self.instance = instance
        self.now = now
        self.queue: deque[dict[str, Any]] = deque()
        self.max = settings.queue_size
        self.dropped = 0  # by the request path (queue full); only that thread writes it
        self._lost = 0  # by the writer (disk errors)
        self._noted_drops = 0  # losses counted in `events_dropped` records appended so far
        self._written_drops = 0  # ... and in those written to a file
        self.chains: dict[str, Chain] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._lock_fd: int | None = None
        self._last_fsync = self._last_prune = 0.0
        self._last_checkpoint = now()
        self._redis: Any = None
        self._ship_retry_at = 0.0

    # -- request path ------------------------------------------------------------------

    def put(self, event: dict[str, Any]) -> None:
        if len(self.queue) >= self.max:
            self.dropped += 1
            _DROPPED.inc()
            return
        self.queue.append(event)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "AuditSink":
        inst = self.root / self.instance
        inst.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(inst / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"audit: {inst} is being written by another process; give each process its own "
                               "audit.instance (default: host name) or stop the other one") from None
        if self.settings.redis is not None:
            self._redis = _redis_client(self.settings)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, seal every chain with a shutdown checkpoint, fsync."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            busy = self.safe_cycle()
            if busy is None:
                if stopping:
                    return
                self._stop.wait(1.0)
            elif stopping and not self.queue:
                self._close_all()
                return
            elif not busy and not stopping:
                self._stop.wait(POLL_SECONDS)

    def safe_cycle(self) -> bool | None:
        """`cycle`, surviving any failure (None). Disk full or gone, or a bug: what was pending
        is lost and counted, the chains reopen from what is on disk (their resume checkpoint
        names any partial line), and the loss goes on the record once writing works again."""
        try:
            return self.cycle()
        except Exception as exc:  # noqa: BLE001 - the writer must outlive any one failure
            # Only records count (not checkpoints); an `events_dropped` record lost with them
            # is not one, and the losses it noted are owed again.
            owed = self._noted_drops > self._written_drops
            lost = sum(c.pending_records for c in self.chains.values()) - owed
            self._noted_drops = self._written_drops
            self._lost += lost
            _DROPPED.inc(lost)
            log.error("audit_write_failed", error=str(exc), lost=lost, exc_info=not isinstance(exc, OSError))
            for c in self.chains.values():
                c.close_fd()
            self.chains.clear()
            return None

    def cycle(self) -> bool:
        """One round of the writer thread; public for tests. True when it wrote events."""
        now = self.now()
        n = 0
        q = self.queue
        while q and n < BATCH:
            ev = q[0]
            # Opening the chain may fail (its directory unwritable, or a file): the event stays
            # queued for the next try, never popped and lost off the record.
            c = self.chain(ev.get("tier") or GATEWAY_STREAM)
            q.popleft()
            n += 1
            self._append(c, ev)
        gone = self.dropped + self._lost
        if gone > self._noted_drops:  # noted once appended: a chain that cannot open leaves it owed
            self.chain(GATEWAY_STREAM).append({"type": "events_dropped", "ts": iso(now), "count": gone - self._noted_drops})
            self._noted_drops = gone
        if now - self._last_checkpoint >= self.settings.checkpoint_seconds:
            self._last_checkpoint = now
            sealed = [c for c in self._siblings() if c.unsealed]
            for c in sealed:
                c.checkpoint("interval")
            gateway = self.chains.get(GATEWAY_STREAM)
            if sealed or (gateway is not None and gateway.unsealed):
                self.chain(GATEWAY_STREAM).checkpoint("interval", self._heads())
        policy = self.settings.fsync
        sync = policy == "always" or (policy == "interval" and now - self._last_fsync >= self.settings.fsync_interval_seconds)
        if sync:
            self._last_fsync = now
        for c in self._in_order():
            self._ship(c.name, c.flush(sync))
        self._written_drops = self._noted_drops  # `gateway` (which holds them) is flushed last
        for c in self._in_order():
            if c.segment_bytes >= self.settings.segment_bytes or (
                    now - c.segment_started >= self.settings.segment_seconds and c.segment_records):
                self._ship(c.name, c.rotate())
        if now - self._last_prune >= PRUNE_SECONDS:
            self._last_prune = now
            self.prune(now)
        if n:
            _WRITTEN.inc(n)
        return n > 0

    def _append(self, c: Chain, ev: dict[str, Any]) -> None:
        ev["ts"] = iso(ev["ts"])
        if ev["type"] == "config":
            self._snapshot(ev)
        try:
            c.append(ev)
        except TypeError as exc:  # a value JSON cannot hold: this event is lost, not its batch
            self._lost += 1
            _DROPPED.inc()
            log.error("audit_event_unwritable", error=str(exc), event_type=ev.get("type"))

    def chain(self, stream: str) -> Chain:
        c = self.chains.get(stream)
        if c is None:
            c = self.chains[stream] = Chain(self.root, f"{self.instance}/{stream}", self.signer, self.now)
            c.open()
        return c

    def _siblings(self) -> list[Chain]:
        """The chains other than `gateway`, which vouches for them."""
        return [c for stream, c in self.chains.items() if stream != GATEWAY_STREAM]

    def _in_order(self) -> list[Chain]:
        """Every chain, `gateway` last: its checkpoint names what the others wrote before it."""
        gateway = self.chains.get(GATEWAY_STREAM)
        return [*self._siblings(), *([gateway] if gateway is not None else [])]

    def _heads(self) -> dict[str, Any]:
        """Each sibling chain's last seq, for the gateway chain's checkpoint: signed, so verify can
        tell a deleted tier chain, or one cut at a checkpoint, from one that never got further.
        Taken after the siblings' own checkpoints, and the gateway chain is written after them."""
        siblings = self._siblings()
        return {"heads": {c.name.rsplit("/", 1)[1]: c.seq for c in siblings}} if siblings else {}

    def _close_all(self) -> None:
        for c in self._in_order():
            self._ship(c.name, c.close(self._heads() if c.name.endswith(f"/{GATEWAY_STREAM}") else None))

    # -- retention ---------------------------------------------------------------------

    def prune(self, now: float) -> None:
        """Drop segments past retention in every chain of this process (docs/audit.md)."""
        inst = self.root / self.instance
        for stream_dir in sorted(p for p in inst.iterdir() if p.is_dir()):
            stream = stream_dir.name
            days = self.settings.days_for(stream)
            active = self.chains[stream].segment if stream in self.chains else None
            if active is None:
                self.chain(stream)  # opening it starts a new segment, so older ones become prunable
                active = self.chains[stream].segment
            gone = prunable(stream_dir, iso(now - days * 86400), active)
            if not gone:
                continue
            c = self.chains[stream]
            c.append({"type": "retention_pruned", "ts": iso(now), "through_seq": gone[-1][1],
                      "head": gone[-1][2].decode(), "segments": [p.name for p, _, _ in gone], "days": days})
            c.checkpoint("prune")
            self._ship(c.name, c.flush(sync=True))
            for path, _, _ in gone:
                path.unlink()
            log.info("audit_pruned", chain=c.name, segments=len(gone), through_seq=gone[-1][1], days=days)

    # -- config versions ---------------------------------------------------------------

    def _snapshot(self, ev: dict[str, Any]) -> None:
        """Keep a copy of each config version the trail names (configs/<sha256>.yaml), so an
        export carries the policy that was in force. gateway.yaml holds key hashes, never keys."""
        digest, path = ev.get("config_sha256"), ev.get("path")
        if not digest or not path:
            return
        target = self.root / CONFIGS / f"{digest}.yaml"
        if target.exists():
            return
        try:
            data = Path(path).read_bytes()
        except OSError:
            return
        if hashlib.sha256(data).hexdigest() != digest:
            return  # changed again since it was loaded; the next reload records that version
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:  # the copy is lost, never the config event itself
            log.error("audit_config_copy_failed", error=str(exc), config_sha256=digest)

    # -- shipping ----------------------------------------------------------------------

    def _ship(self, chain: str, lines: list[bytes]) -> None:
        if self._redis is None or not lines:
            return
        r = self.settings.redis
        assert r is not None
        if self.now() < self._ship_retry_at:  # Redis failed recently: do not stall the writer on it
            _SHIP_FAILED.inc(len(lines))
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for line in lines:
                pipe.xadd(r.key, {"chain": chain, "record": line}, maxlen=r.max_len, approximate=True)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - any Redis failure: the files stay the record
            _SHIP_FAILED.inc(len(lines))
            self._ship_retry_at = self.now() + SHIP_BACKOFF_SECONDS
            log.warning("audit_ship_failed", error=str(exc), lines=len(lines))


def _redis_client(settings: AuditSettings) -> Any:
    import redis

    r = settings.redis
    assert r is not None
    password = os.environ.get(r.password_env) if r.password_env else None
    return redis.Redis.from_url(r.url, password=password, socket_timeout=1.0, socket_connect_timeout=1.0)
