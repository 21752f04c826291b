"""One /metrics for all ext_proc workers: the `serve` parent asks each worker on scrape.

Each `serve-one` worker keeps its numbers in its own memory (telemetry/counters.py) and
answers a connection on its own Unix socket (`worker-<index>.sock` in the directory `serve`
names in GATEWAY_EXTPROC_METRICS_DIR) with a JSON snapshot of them. On a scrape the parent
connects to each worker in turn and merges: counters and histograms are summed, gauges
merged as each declares (max, min, mostrecent, livesum). No file is written per increment and
nothing crosses processes between scrapes.

Restarts: the parent keeps each worker's last snapshot, read on every scrape and, between
scrapes, every REFRESH_S by a thread of its own. When a worker dies the supervisor folds that
snapshot into a `retired` total, so everything it had counted up to its last reply stays in
the sums and no counter goes backwards (`rate()`/`increase()` see no reset). What the dead
worker counted after its last reply is lost: about REFRESH_S of that worker's traffic, never
a drop (without the thread it was a whole scrape interval: a worker killed 30 s after a
scrape took 30 s of requests, tokens and cost with it). A worker that does not answer within
REPLY_TIMEOUT_S (busy or restarting) contributes its last snapshot.

Concurrent scrapes (two Prometheus servers, an HA pair, scraping one pod): each reply carries
the worker's reply number (`seq`), and a reply older than the one already merged for that
worker is ignored, so a slow scrape that read a worker first can never put older numbers
back after a faster one merged newer ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from . import counters

DIR_ENV = "GATEWAY_EXTPROC_METRICS_DIR"
REPLY_TIMEOUT_S = 2.0
REFRESH_S = 1.0  # between scrapes: what a worker's death can take with it
_replies = 0  # this worker's answers so far: each reply's `seq`


def reply() -> dict[str, Any]:
    """A worker's answer to one scrape: its numbers now, with `seq` (1, 2, ... per process)
    so the parent can tell a newer reply from an older one read by a concurrent scrape."""
    global _replies
    _replies += 1
    return {"pid": os.getpid(), "seq": _replies, "series": counters.snapshot()}


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


async def serve_snapshots(index: int) -> asyncio.AbstractServer | None:
    """In a worker started by `serve`: answer the parent's scrapes (None when run alone)."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return None
    path = socket_path(directory, index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by this index's previous, dead worker

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(orjson.dumps(reply()))
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_unix_server(answer, path)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(REPLY_TIMEOUT_S)
            s.connect(path)
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        return orjson.loads(b"".join(chunks))
    except (OSError, orjson.JSONDecodeError):
        return None


def _add(into: dict[str, dict[tuple[str, ...], Any]], snap: counters.Snapshot, kinds: tuple[str, ...]) -> None:
    """Sum the counters and histograms of `snap` into `into`."""
    for name, series in snap.items():
        family = counters.FAMILIES.get(name)
        if family is None or family.kind not in kinds:
            continue
        target = into.setdefault(name, {})
        for labels, state in series:
            key = tuple(labels)
            old = target.get(key)
            if old is None:
                target[key] = list(state) if isinstance(state, list) else state
            elif isinstance(state, list):
                target[key] = [a + b for a, b in zip(old, state)]
            else:
                target[key] = old + state


class WorkerMetrics(Collector):
    """The `serve` parent's view of its workers' numbers (see the module docstring)."""

    def __init__(self, directory: str, workers: int, own: tuple[str, ...] = ()) -> None:
        """`own`: counter families this process (the parent) also counts itself, added to
        its workers' sums (the `serve` parent's admin audit chain writes audit events)."""
        self._directory, self._workers, self._own = directory, workers, own
        self._lock = threading.Lock()
        self._last: dict[int, tuple[int, counters.Snapshot]] = {}  # index: (pid, snapshot)
        self._seq: dict[int, int] = {}  # index: `seq` of the reply in _last
        self._retired: dict[str, dict[tuple[str, ...], Any]] = {}
        self._gone: set[int] = set()

    def retire(self, pid: int) -> None:
        """Worker `pid` died: keep what it last reported in the totals, for good."""
        with self._lock:
            self._gone.add(pid)
            for index, (known, snap) in list(self._last.items()):
                if known == pid:
                    _add(self._retired, snap, ("counter", "histogram"))
                    del self._last[index]

    def refresh_in_background(self) -> threading.Thread:
        """Read the workers every REFRESH_S between scrapes (a daemon thread of `serve`)."""
        def loop() -> None:
            while True:
                time.sleep(REFRESH_S)
                self.refresh()
        thread = threading.Thread(target=loop, name="metrics-refresh", daemon=True)
        thread.start()
        return thread

    def refresh(self) -> None:
        """Ask every worker for its numbers now and keep the newest reply of each."""
        replies = [(i, _read(socket_path(self._directory, i))) for i in range(self._workers)]
        with self._lock:
            for index, reply in replies:
                if reply is None or reply["pid"] in self._gone:
                    continue  # keep the last snapshot
                previous = self._last.get(index)
                if previous is not None and previous[0] == reply["pid"] and \
                        reply.get("seq", 0) <= self._seq.get(index, 0):
                    continue  # read before the one a concurrent scrape already merged: older numbers
                self._seq[index] = reply.get("seq", 0)
                if previous is not None and previous[0] != reply["pid"]:
                    _add(self._retired, previous[1], ("counter", "histogram"))  # a death not seen yet
                    self._gone.add(previous[0])
                self._last[index] = (reply["pid"], reply["series"])

    def collect(self) -> Iterator[Metric]:
        self.refresh()
        with self._lock:
            merged: dict[str, dict[tuple[str, ...], Any]] = {
                name: dict(series) for name, series in self._retired.items()}
            for _pid, snap in self._last.values():
                _add(merged, snap, ("counter", "histogram"))
            _add(merged, {name: counters.FAMILIES[name].snapshot() for name in self._own}, ("counter",))
            gauges = self._gauges()
        out: counters.Snapshot = {name: [[list(k), v] for k, v in series.items()] for name, series in merged.items()}
        out.update(gauges)
        return counters.families(out)

    def _gauges(self) -> counters.Snapshot:
        merged: dict[str, dict[tuple[str, ...], list[float]]] = {}
        for _pid, snap in self._last.values():
            for name, series in snap.items():
                family = counters.FAMILIES.get(name)
                if not isinstance(family, counters.Gauge):
                    continue
                target = merged.setdefault(name, {})
                for labels, (value, updated) in series:
                    key = tuple(labels)
                    old = target.get(key)
                    if old is None:
                        target[key] = [value, updated]
                    elif family.merge == "livesum":
                        target[key] = [old[0] + value, max(old[1], updated)]
                    elif family.merge == "max":
                        target[key] = [max(old[0], value), max(old[1], updated)]
                    elif family.merge == "min":
                        target[key] = [min(old[0], value), max(old[1], updated)]
                    elif updated > old[1]:  # mostrecent
                        target[key] = [value, updated]
        return {name: [[list(k), v] for k, v in series.items()] for name, series in merged.items()}
