"""Three ext_proc workers and a request's two gRPC streams on different ones.

A request through a model whose attempts need the upstream (per-attempt) ext_proc opens
two streams: the router's and the attempt's. Envoy balances each on its own, so with
several workers they usually land on different processes. Nothing per-request may live
only in one process's memory (docs/architecture.md, "Processes and state"), and a worker
that dies or freezes must not leave a request uncharged:

- a mixed burst (OpenAI and Anthropic SDKs, JSON and streams, every translated provider,
  a redaction in every prompt) is answered right through three workers;
- a worker killed or frozen while providers work on attempts whose per-attempt stream it
  holds: the router's stream, on a healthy worker, sees Envoy's `503 gateway_unavailable`
  although the provider had (and billed) the request. Each request a provider received is
  charged at least what the provider's usage says it cost (here the reservation), never $0;
- under a steady stream of requests, a fault costs only the requests on the worker at that
  moment (and, for a freeze, those of the health check's timeout): two of three workers
  killed at once, or one frozen, and every later request is answered by the live worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway_extproc import keys
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, add_provider_models, all_healthy, running_gateway, workers

WORKERS = 3
TTL_S = 2  # budgets.reservationTTLSeconds: a dead worker's reservations expire quickly
SPLIT_REQUESTS = 30
NAMES = [f"split-{i}" for i in range(SPLIT_REQUESTS)]
KEYS = {name: keys.generate(name) for name in NAMES}
CLAUDE = Price.from_usd_per_million(3.0, 15.0, 0.3)  # claude-chat's Anthropic backend (values-local)

BACKENDS = {"default-chat": "mock/mock-gpt-4o-mini", "claude-chat": "mock-anthropic/claude-mock-sonnet",
            "gemini-chat": "mock-gemini/gemini-mock-flash", "azure-chat": "mock-azure/mock-gpt-4o-deployment",
            "fallback-chat": "mock/mock-primary", "private-chat": "mock/mock-private-llama",
            "bedrock-chat": "mock-bedrock/amazon.nova-mock-v1:0", "gemini3-chat": "mock-gemini/gemini-3-mock-pro"}


@pytest.fixture(scope="module")
def wgw() -> Iterator[Gateway]:
    with RedisServer() as redis:
        def customize(values: dict[str, Any]) -> None:
            values["extproc"]["processes"] = WORKERS
            values["extproc"]["messageTimeout"] = "2s"
            values["budgets"].pop("devMemoryStore", None)
            values["budgets"].update(store="redis", redis={"url": redis.url}, reservationTTLSeconds=TTL_S)
            add_provider_models(values)
            values["keys"] += [{"id": name, "sha256": keys.digest(KEYS[name]), "team": "demo",
                                "budget": {"daily": 1}} for name in NAMES]

        with running_gateway("gw-wfault-", customize=customize) as gw:
            yield gw


def test_a_mixed_burst_over_three_workers_is_answered_right(wgw: Gateway) -> None:
    all_healthy(wgw)
    wgw.reset()
    rng = random.Random(7)
    cases = [(rng.choice(sorted(BACKENDS)), rng.choice(["json", "stream", "messages", "messages-stream"]))
             for _ in range(160)]

    async def one(i: int, model: str, kind: str, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> str:
        prompt = f"hello {i}, write to bob@example.com"
        msgs: Any = [{"role": "user", "content": prompt}]
        if kind in ("json", "stream"):
            raw = await oai.chat.completions.with_raw_response.create(
                model=model, messages=msgs, max_tokens=50, stream=kind == "stream",
                **({"stream_options": {"include_usage": True}} if kind == "stream" else {}))
            backend = raw.headers.get("x-gateway-backend")
            if kind == "json":
                done = raw.parse()
                text, out = done.choices[0].message.content or "", done.usage.completion_tokens if done.usage else 0
            else:
                chunks = [c async for c in raw.parse()]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                out = chunks[-1].usage.completion_tokens if chunks and chunks[-1].usage else 0
        elif kind == "messages":
            raw = await ant.messages.with_raw_response.create(model=model, max_tokens=50, messages=msgs)
            backend, done = raw.headers.get("x-gateway-backend"), await raw.parse()
            text, out = "".join(b.text for b in done.content if b.type == "text"), done.usage.output_tokens
        else:
            async with ant.messages.stream(model=model, max_tokens=50, messages=msgs) as s:
                backend = s.response.headers.get("x-gateway-backend")
                text = "".join([t async for t in s.text_stream])
                out = (await s.get_final_message()).usage.output_tokens
        want = f"This is a mock reply from {BACKENDS[model].split('/', 1)[1]} to: hello {i}, write to "
        problems = [p for p, bad in (("backend", backend != BACKENDS[model]), ("text", not text.startswith(want)),
                                     ("unredacted", "bob@example.com" in text), ("usage", not out)) if bad]
        return f"{model} {kind}: {problems} {backend} {text!r}" if problems else "ok"

    async def burst() -> list[str]:
        oai = openai.AsyncOpenAI(base_url=f"{wgw.url}/v1", api_key=wgw.key, max_retries=0, timeout=30)
        ant = anthropic.AsyncAnthropic(base_url=wgw.url, api_key=wgw.key, max_retries=0, timeout=30)
        gate = asyncio.Semaphore(24)

        async def bounded(i: int, model: str, kind: str) -> str:
            async with gate:
                return await one(i, model, kind, oai, ant)
        return await asyncio.gather(*(bounded(i, m, k) for i, (m, k) in enumerate(cases)))

    results = asyncio.run(burst())
    assert [r for r in results if r != "ok"] == []


def _all_received(gw: Gateway, tags: set[str], timeout: float = 30) -> None:
    """Waits until the backup provider has received a request tagged (`x-split`) with each of `tags`."""
    deadline = time.monotonic() + timeout
    while not tags <= {r["headers"].get("x-split") for r in gw.received(gw.backup)}:
        assert time.monotonic() < deadline, "not every attempt reached the provider"
        time.sleep(0.05)


def _spent(gw: Gateway, name: str) -> int:
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[name]}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    [daily] = [b for b in resp.json()["budgets"] if b["level"] == f"key:{name}" and b["window"] == "daily"]
    return round(daily["spent_usd"] * 1e9)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_an_attempt_whose_worker_dies_while_the_provider_works_is_still_charged(wgw: Gateway, fault: str) -> None:
    all_healthy(wgw)
    wgw.reset()
    envoy = wgw.stack.procs["envoy"].pid
    victim = workers(wgw)[1]
    run = uuid.uuid4().hex[:8]
    names = NAMES  # spend is compared with what each key had before this run
    before = {name: _spent(wgw, name) for name in names}

    async def one(client: httpx.AsyncClient, i: int, name: str) -> tuple[int, str | None, dict | None, float]:
        started = time.monotonic()
        # The provider thinks for 3 s: the fault strikes while every attempt waits for it.
        resp = await client.post(f"{wgw.url}/v1/chat/completions", headers={
            "authorization": f"Bearer {KEYS[name]}", "x-mock-latency-ms": "3000", "x-split": f"{run}-{i}"},
            json={"model": "claude-chat", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 20})
        error = resp.json().get("error") if resp.status_code != 200 else None
        return (resp.status_code, error.get("code") if isinstance(error, dict) else None,
                resp.json().get("usage") if resp.status_code == 200 else None, time.monotonic() - started)

    async def burst() -> list[tuple[int, str | None, dict | None, float]]:
        async with httpx.AsyncClient(timeout=30) as client:
            sent = asyncio.gather(*(one(client, i, name) for i, name in enumerate(names)))
            # Struck once every attempt is with the provider: a fixed second struck before some had
            # left the gateway on a loaded machine (CI), and those never reached the provider.
            await asyncio.to_thread(_all_received, wgw, {f"{run}-{i}" for i in range(len(names))})
            os.kill(victim, getattr(signal, fault))
            if fault == "SIGSTOP":
                await asyncio.sleep(5.0)  # well past Envoy's 2 s message timeout for the answer's headers (at 3 s)
                os.kill(victim, signal.SIGCONT)
            return await sent

    results = asyncio.run(burst())
    assert wgw.stack.procs["envoy"].poll() is None and wgw.stack.procs["envoy"].pid == envoy, "Envoy died"
    for status, code, _, took in results:
        assert (status, code) in ((200, None), (503, "gateway_unavailable")), (status, code)
        assert took < 15, took
    costs = {cost_nano(CLAUDE, u["prompt_tokens"], u["completion_tokens"]) for _, _, u, _ in results if u}
    assert len(costs) == 1, costs  # every request is the same: what one costs, all cost
    [cost] = costs
    received = {r["headers"].get("x-split") for r in wgw.received(wgw.backup)}
    assert received == {f"{run}-{i}" for i in range(len(names))}  # every attempt reached the provider

    all_healthy(wgw)
    time.sleep(TTL_S + 0.5)  # a killed worker's held reservations pass their deadline (charged at worst case)
    deadline = time.monotonic() + 15
    while True:
        charged = {name: _spent(wgw, name) - before[name] for name in names}
        short = {name: c for name, c in charged.items() if c < cost}
        if not short or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    # Requests the router saw fail at the attempt's ext_proc (its own worker healthy): the
    # case this test is about must have happened, or it proves nothing.
    seen = [json.loads(line) for line in wgw.stack.log_path("extproc").read_text().splitlines()
            if '"event":"access"' in line and '"key_id":"split-' in line]
    split = [a for a in seen if a["outcome"] == "complete" and a["error_code"] == "gateway_unavailable"
             and a["key_id"] in names]
    assert split, ("no request had its router and its attempt on different workers",
                   Counter((s, c) for s, c, _, _ in results),
                   Counter((a["outcome"], a["status"], a["error_code"]) for a in seen))
    assert short == {}, f"billed by the provider, charged less than the {cost} n$ it cost: {short}"


RATE = 40  # new requests a second, whatever the gateway does with the earlier ones
SENT = tuple[float, int, Any]  # (seconds after the fault when sent, status, error body)


async def _steady(gw: Gateway, fault: Callable[[], object], after_s: float) -> list[SENT]:
    """Requests at RATE a second from 1 s before `fault()` until `after_s` after it, each
    with its send time relative to the fault, its status and, when it failed, its error."""
    results: list[SENT] = []
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=400)) as client:
        async def one(sent: float) -> None:
            resp = await client.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                                     json={"model": "default-chat", "max_tokens": 5,
                                           "messages": [{"role": "user", "content": "Hi"}]})
            results.append((sent, resp.status_code, None if resp.status_code == 200 else resp.json()))

        started, tasks, faulted = time.monotonic(), [], None
        while (now := time.monotonic()) - started < 1 + after_s:
            if faulted is None and now - started >= 1:
                fault()
                faulted = time.monotonic()
            tasks.append(asyncio.create_task(one(now - (faulted or started + 1))))
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r[0])


def _bounded(wgw: Gateway, envoy: int, results: list[SENT], after_s: float, fault: str) -> None:
    """No request sent `after_s` or more after the fault failed; every failure is the
    gateway's own OpenAI-shaped 503, never a reset; Envoy is the same process."""
    for _, status, body in results:
        if status != 200:
            assert status == 503 and body["error"]["code"] == "gateway_unavailable", (status, body)
            assert body["error"]["type"] == "server_error" and body["error"]["message"], body
    late = [r for r in results if r[0] >= after_s and r[1] != 200]
    failed = [r for r in results if r[1] != 200]
    assert late == [], (f"{len(late)} requests sent {after_s} s or more after the {fault} failed, the last sent "
                        f"{late[-1][0]:.2f} s after it; {len(failed)} of {len(results)} in all")
    assert wgw.stack.procs["envoy"].poll() is None and wgw.stack.procs["envoy"].pid == envoy, "Envoy died"
    print(f"{fault}: {len(failed)} of {len(results)} requests failed, the last sent "
          f"{max((r[0] for r in failed), default=0):.2f} s after it")


def test_two_of_three_workers_killed_at_once_cost_only_their_requests_in_flight(wgw: Gateway) -> None:
    """Each request holds two ext_proc streams, and Envoy balanced them over every worker,
    dead ones too, once half were out (its 50 % panic threshold): for the 3-4 s until the
    restarts, two requests in three failed. Now a stream that cannot connect goes to another
    worker, and the dead ones leave rotation at once."""
    all_healthy(wgw)
    envoy = wgw.stack.procs["envoy"].pid
    victims = workers(wgw)[:2]
    results = asyncio.run(_steady(wgw, lambda: [os.kill(pid, signal.SIGKILL) for pid in victims], after_s=3.0))
    # Until the kernel has torn a killed process down (freeing its memory comes before closing
    # its files) its socket still accepts, and a stream that lands then is cut when it closes:
    # such a stream had reached the worker, so it is not sent again. 0.1 s was seen here; the
    # bound leaves a loaded machine room (before the fix, failures went on to +3-4 s).
    _bounded(wgw, envoy, results, 1.0, "kill")
    all_healthy(wgw)  # both restarted and back in rotation


def test_a_frozen_worker_costs_only_the_requests_of_the_health_check_timeout(wgw: Gateway) -> None:
    """A frozen (SIGSTOP) worker accepts connections and never answers. Every request that
    drew it for one of its two streams waited for the message timeout and failed; at a 1 s
    health-check timeout that is every request of the first 1-1.5 s; then the worker leaves
    rotation, the others take everything, and after SIGCONT it is re-admitted."""
    all_healthy(wgw)
    envoy = wgw.stack.procs["envoy"].pid
    victim = workers(wgw)[0]
    try:
        results = asyncio.run(_steady(wgw, lambda: os.kill(victim, signal.SIGSTOP), after_s=3.0))
    finally:
        os.kill(victim, signal.SIGCONT)
    # Out of rotation at the first check that times out (1 s timeout every 0.5 s: within
    # 1.5 s); the bound leaves a loaded machine room.
    _bounded(wgw, envoy, results, 2.0, "freeze")
    all_healthy(wgw, timeout=5)  # resumed: back in rotation, not restarted
    assert victim in workers(wgw)
    with httpx.Client(timeout=10) as client:
        statuses = [client.post(f"{wgw.url}/v1/chat/completions", headers={"authorization": f"Bearer {wgw.key}"},
                                json={"model": "default-chat", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": "Hi"}]}).status_code
                    for _ in range(20)]
    assert statuses == [200] * 20, statuses
