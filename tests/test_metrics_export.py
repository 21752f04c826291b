"""In-process metrics (telemetry/counters.py) and the `serve` parent's merge of its
workers' numbers on scrape (telemetry/export.py), with real worker processes answering on
their own Unix sockets, killed and replaced as a crash would."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway_extproc.telemetry import counters, export, metrics

# A worker: sets its counters from argv, answers scrapes, bumps on SIGUSR1, exits on SIGTERM.
WORKER = r"""
import asyncio, signal, sys
from gateway_extproc.telemetry import export, metrics as m
index, requests = int(sys.argv[1]), int(sys.argv[2])
m.child(m.REQUESTS, "demo", "chat", "mock", "2xx").inc(requests)
for _ in range(requests):
    m.child(m.DURATION, "chat", "2xx").observe(0.3)
m.BUDGET_SETTLEMENTS_PENDING.inc(2)
m.TEAM_DAILY_REMAINING.labels("demo").set(float(sys.argv[3]))
if len(sys.argv) > 4:  # as reload.py leaves them: the last load worked (1) or not (0), and when it last did
    m.CONFIG_LAST_RELOAD_SUCCESSFUL.set(float(sys.argv[4]))
    m.CONFIG_LAST_RELOAD_SUCCESS_TIME.set(float(sys.argv[5]))
async def main():
    server = await export.serve_snapshots(index)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: m.child(m.REQUESTS, "demo", "chat", "mock", "2xx").inc())
    print("ready", flush=True)
    await stop.wait()
    server.close()
asyncio.run(main())
"""


def start(directory: Path, index: int, requests: int, remaining: float,
          reload: tuple[float, float] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(index), str(requests), str(remaining),
                             *(str(v) for v in reload or ())],
                            env={**os.environ, export.DIR_ENV: str(directory)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def scrape(collector: export.WorkerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


REQ = ("genai_requests_total", (("model", "chat"), ("provider", "mock"), ("status_class", "2xx"), ("team", "demo")))
DURATION_COUNT = ("genai_request_duration_seconds_count", (("model", "chat"), ("status_class", "2xx")))
PENDING = ("genai_budget_settlements_pending", ())
REMAINING = ("genai_team_daily_budget_remaining_dollars", (("team", "demo"),))


def test_the_parent_sums_its_workers_on_each_scrape(tmp_path: Path) -> None:
    procs = [start(tmp_path, 0, 3, 4.0), start(tmp_path, 1, 5, 2.5)]
    try:
        collector = export.WorkerMetrics(str(tmp_path), 2)
        first = scrape(collector)
        assert first[REQ] == 8 and first[DURATION_COUNT] == 8
        assert first[PENDING] == 4  # livesum
        assert first[REMAINING] == 2.5  # mostrecent: worker 1 set it last
        procs[0].send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        assert scrape(collector)[REQ] == 9  # read on scrape, not from a periodic copy
    finally:
        for p in procs:
            p.terminate()
            p.wait()


RELOAD_OK = ("genai_gateway_config_last_reload_successful", ())
RELOAD_OK_AT = ("genai_gateway_config_last_reload_success_timestamp_seconds", ())


def test_a_pod_whose_worker_refuses_the_file_on_disk_shows_it(tmp_path: Path) -> None:
    """Each worker reloads gateway.yaml itself. One that refuses the file on disk (the others
    took it, or not yet) makes the pod's genai_gateway_config_last_reload_successful 0, the min
    over its live workers, not a sum (2 for two workers) nor whichever worker wrote last; the
    success timestamp is the oldest of theirs, the config in force longest unchanged."""
    procs = [start(tmp_path, 0, 1, 1.0, (1, 2000.0)), start(tmp_path, 1, 1, 1.0, (0, 1000.0)),
             start(tmp_path, 2, 1, 1.0, (1, 3000.0))]
    try:
        collector = export.WorkerMetrics(str(tmp_path), 3)
        first = scrape(collector)
        assert first[RELOAD_OK] == 0 and first[RELOAD_OK_AT] == 1000
        procs[1].kill()  # the refusing worker dies; its replacement loaded the file that is there now
        procs[1].wait()
        collector.retire(procs[1].pid)
        procs[1] = start(tmp_path, 1, 0, 1.0, (1, 4000.0))
        now = scrape(collector)
        assert now[RELOAD_OK] == 1 and now[RELOAD_OK_AT] == 2000  # gauges: live workers only
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def test_a_dead_workers_scraped_counts_stay_and_counters_never_go_backwards(tmp_path: Path) -> None:
    """Workers are killed and replaced at random; every scrape's counters are >= the last."""
    rng = random.Random(16)
    procs = {0: start(tmp_path, 0, 10, 1.0), 1: start(tmp_path, 1, 20, 1.0)}
    collector = export.WorkerMetrics(str(tmp_path), 2)
    try:
        last = scrape(collector)
        assert last[REQ] == 30
        for _ in range(6):
            index = rng.choice([0, 1])
            dead = procs[index]
            dead.send_signal(signal.SIGUSR1)  # counted after the last scrape: may be lost
            time.sleep(0.05)
            dead.kill()
            dead.wait()
            if rng.random() < 0.5:  # the supervisor saw the death before the next scrape
                collector.retire(dead.pid)
                assert scrape(collector)[REQ] >= last[REQ]  # the socket is gone, the counts are not
            procs[index] = start(tmp_path, index, rng.randint(0, 3), 1.0)
            now = scrape(collector)
            for key in (REQ, DURATION_COUNT):
                assert now[key] >= last[key], (key, now[key], last[key])
            assert now[PENDING] == 4  # gauges: only live workers
            last = now
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_an_unanswering_worker_contributes_its_last_reply(tmp_path: Path) -> None:
    proc = start(tmp_path, 0, 7, 1.0)
    collector = export.WorkerMetrics(str(tmp_path), 1)
    try:
        assert scrape(collector)[REQ] == 7
        proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        assert scrape(collector)[REQ] == 7
        assert time.monotonic() - started < export.REPLY_TIMEOUT_S + 1
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("values", [[0.0, 0.05, 0.07, 1, 300, 301, 1e9], [0.1] * 5, []])
def test_histograms_match_prometheus_client(values: list[float]) -> None:
    """Same buckets (`le` inclusive), sum and count as prometheus-client's own Histogram."""
    ours = counters.Histogram("test_h_" + str(len(values)), "h", ["x"], buckets=(0.05, 0.1, 1, 300))
    registry = CollectorRegistry()
    theirs = prometheus_client.Histogram("test_h", "h", ["x"], buckets=(0.05, 0.1, 1, 300), registry=registry)
    for v in values:
        ours.labels("a").observe(v)
        theirs.labels("a").observe(v)
    want = {(s.name.replace("test_h", ""), tuple(sorted(s.labels.items()))): s.value
            for f in registry.collect() for s in f.samples if not s.name.endswith("_created")}
    got = {(s.name.replace(ours.name, ""), tuple(sorted(s.labels.items()))): s.value
           for f in counters.families({ours.name: ours.snapshot()}) if f.name == ours.name for s in f.samples}
    assert got == want
    del counters.FAMILIES[ours.name]


def test_counters_refuse_to_go_down_and_labels_are_checked() -> None:
    with pytest.raises(ValueError):
        metrics.REQUESTS.labels("a", "b", "c", "d").inc(-1)
    with pytest.raises(ValueError):
        metrics.REQUESTS.labels("only-one")


def test_unit_tests_read_in_process_values_from_the_default_registry() -> None:
    def applied() -> float:
        name, labels = "genai_gateway_config_reloads_total", {"result": "applied"}
        return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

    before = applied()
    metrics.CONFIG_RELOADS.labels("applied").inc()
    assert applied() == before + 1


def test_the_parents_own_audit_events_join_its_workers(tmp_path: Path) -> None:
    """`serve` writes the admin API's audit chain itself: genai_audit_events_total is the
    workers' events plus the parent's."""
    written = ("genai_audit_events_total", (("result", "written"),))
    proc = start(tmp_path, 0, 1, 1.0)
    try:
        workers_only = scrape(export.WorkerMetrics(str(tmp_path), 1)).get(written, 0)
        assert workers_only == 0  # the worker wrote no audit event
        parent = export.WorkerMetrics(str(tmp_path), 1, own=(metrics.AUDIT_EVENTS.name,))
        before = scrape(parent).get(written, 0)
        metrics.AUDIT_EVENTS.labels("written").inc(3)  # this process plays the parent
        after = scrape(parent)
        assert after[written] == before + 3
        assert after[REQ] == 1  # the workers' numbers are still there
    finally:
        proc.terminate()
        proc.wait()


def test_a_slower_concurrent_scrape_never_puts_older_numbers_back(tmp_path: Path, monkeypatch) -> None:
    """Two Prometheus servers (an HA pair) scrape one pod at once: the first scrape reads a
    worker's reply, the second reads a newer one and merges it, then the first merges its
    older reply. Neither that scrape nor any later one may show less than was shown."""
    import threading

    requests = metrics.child(metrics.REQUESTS, "demo", "slow-scrape", "mock", "2xx")
    key = ("genai_requests_total", (("model", "slow-scrape"), ("provider", "mock"), ("status_class", "2xx"),
                                    ("team", "demo")))
    requests.inc(5)
    older = export.reply()  # what the slow scrape read
    requests.inc(2)
    newer = export.reply()  # what the fast scrape read, after it
    slow_has_read, fast_done = threading.Event(), threading.Event()
    replies = {"slow": older, "fast": newer, "later": None}  # later: the worker does not answer

    def read(_path: str):
        who = threading.current_thread().name
        if who == "slow":
            slow_has_read.set()
            assert fast_done.wait(5)
        return replies[who]

    monkeypatch.setattr(export, "_read", read)
    collector = export.WorkerMetrics(str(tmp_path), 1)
    shown: dict[str, float] = {}

    def scrape_as(who: str) -> None:
        shown[who] = scrape(collector)[key]
        if who == "fast":
            fast_done.set()

    slow = threading.Thread(target=scrape_as, args=("slow",), name="slow")
    slow.start()
    assert slow_has_read.wait(5)
    fast = threading.Thread(target=scrape_as, args=("fast",), name="fast")
    fast.start()
    fast.join()
    slow.join()
    later = threading.Thread(target=scrape_as, args=("later",), name="later")
    later.start()
    later.join()
    assert shown["fast"] == 7
    assert shown["slow"] >= shown["fast"] and shown["later"] >= shown["fast"], shown
