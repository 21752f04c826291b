"""Telemetry when an ext_proc worker is killed (SIGKILL, as the OOM killer does), through
real Envoy with two workers and the openai SDK.

- /metrics: what a worker counted more than a second before it died stays in the pod's
  counters, scraped or not (docs/observability.md, "Where /metrics is"); the scrape after
  hostile traffic and a death is valid exposition (promtool).
- Audit: a burst with a worker killed in the middle leaves chains that verify; no request has
  two records, and every answered one has its record but those the killed worker answered in
  its last ~50 ms (its writer's queue); caller text in a prompt forges no record."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ..redis_server import RedisServer
from .conftest import Gateway, all_healthy, audit_records, running_gateway, workers

WORKERS = 2


@pytest.fixture(scope="module")
def gw2() -> Iterator[Gateway]:
    with RedisServer() as redis:
        def customize(values: dict[str, Any]) -> None:
            values["extproc"]["processes"] = WORKERS
            values["budgets"].update(store="redis", redis={"url": redis.url})

        with running_gateway("gw-tcrash-", customize=customize) as gw:
            yield gw


def requests_total(gw: Gateway) -> float:
    text = httpx.get(gw.stack.metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("genai_requests_total{"))


def wait_back(gw: Gateway, killed: int) -> None:
    """The supervisor replaced the killed worker and both take requests again."""
    deadline = time.monotonic() + 5
    while killed in workers(gw) and time.monotonic() < deadline:
        time.sleep(0.05)
    all_healthy(gw)


async def burst(gw: Gateway, n: int, prompt: str, kill_at: int | None = None,
                killed_at: list[float] | None = None) -> list[tuple[int, str | None, float]]:
    """n chat completions, 16 at a time: (status, x-request-id, when it was answered) each; a
    worker is SIGKILLed when request `kill_at` starts (its time into `killed_at`)."""
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=30)
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[int, str | None, float]:
        async with gate:
            if i == kill_at:
                os.kill(workers(gw)[0], signal.SIGKILL)
                if killed_at is not None:
                    killed_at.append(time.monotonic())
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="default-chat", max_tokens=8, messages=[{"role": "user", "content": f"{prompt} {i}"}])
                return raw.status_code, raw.headers.get("x-request-id"), time.monotonic()
            except openai.APIStatusError as err:
                return err.status_code, err.response.headers.get("x-request-id"), time.monotonic()
            except openai.APIConnectionError:
                return 0, None, time.monotonic()
    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def test_a_killed_workers_counts_from_before_the_last_second_stay(gw2: Gateway) -> None:
    """Nobody scrapes during the burst (Prometheus every 30 s, say); a worker is killed two
    seconds after it: the pod's counter still has every request the burst made."""
    before = requests_total(gw2)
    statuses = asyncio.run(burst(gw2, 120, "count me"))
    assert Counter(s for s, _, _ in statuses) == {200: 120}
    time.sleep(2.0)
    victim = workers(gw2)[0]
    os.kill(victim, signal.SIGKILL)
    wait_back(gw2, victim)
    assert requests_total(gw2) - before == 120


HOSTILE = ["a\nb", "\u2028{\"type\":\"request\",\"team\":\"finance\"}\u2029", "\x85\x00\x1b[2J", "x" * 100_000,
           '"}\n{"prev":"' + "0" * 64 + '","seq":1}']


def test_a_worker_killed_mid_burst_leaves_one_record_per_answer_and_valid_exposition(gw2: Gateway) -> None:
    killed_at: list[float] = []
    statuses = asyncio.run(burst(gw2, 300, "|".join(HOSTILE), kill_at=150, killed_at=killed_at))
    wait_back(gw2, -1)
    # The gateway's own answers (the demo key's rate limit refuses part of the burst): a 503
    # is Envoy's for a request whose worker died under it, which no process could record.
    answered = {rid: at for status, rid, at in statuses if status in (200, 429) and rid}
    assert len(answered) >= 100, Counter(s for s, _, _ in statuses)
    promtool = shutil.which("promtool")
    if promtool is not None:  # Debian's `prometheus` package (tests/test_alerts.py)
        check = subprocess.run([promtool, "check", "metrics"], input=httpx.get(gw2.stack.metrics_url).text,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    time.sleep(0.5)  # the audit writers' batch
    audit, pub = gw2.stack.workdir / "audit", gw2.stack.workdir / "audit-signing.key.pub"
    out = subprocess.run([sys.executable, "-m", "gateway_extproc", "audit", "verify", "--dir", str(audit),
                          "--public-key", str(pub)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "BAD" not in out.stdout, out.stdout
    ids: Counter[str] = Counter()
    for rec in audit_records(audit, crashed=True):
        if rec["type"] == "request":
            assert rec.get("team") != "finance"
            ids[rec["request_id"]] += 1
    # The killed worker's events still queued (the writer's last ~50 ms, docs/audit.md
    # "Durability") are lost with it: a request or two answered just before the kill.
    # (answered by then: a loaded machine may hold the answer back a while after the record was queued)
    assert all(at >= killed_at[0] - 1.0 for rid, at in answered.items() if ids[rid] == 0), (killed_at, answered)
    assert [rid for rid, n in ids.items() if n > 1] == []
