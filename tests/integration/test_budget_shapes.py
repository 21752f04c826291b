"""Budget red team, round 4: request shapes the invariant test does not generate (embeddings,
Anthropic Messages, Responses item lists), through real Envoy, two replicas and a shared Valkey.

Each test fires a burst at a key with a small budget and checks, once settlements landed,
that no level is above its limit and that the key's spend is exactly what each answer's usage
costs at the price of the backend that answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_py

from gateway_extproc import keys
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, two_replicas

KEY = keys.generate("shapes")
PREFIX = "gw:{local}:"
# An embedding model whose backends differ in price: the first (cheaper) one answers.
EMBED_CHEAP = Price.from_usd_per_million(20, 0)
EMBED_DEAR = Price.from_usd_per_million(130, 0)
BUDGET = 0.05


def shapes_values(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["extproc"]["processes"] = 2
    values["teams"].append({"name": "shapes", "budget": {"daily": 1}})
    values["keys"].append({"id": "shapes", "sha256": keys.digest(KEY), "team": "shapes",
                           "budget": {"daily": BUDGET}})
    values["models"].append({"name": "embed-two", "tokenizer": "cl100k_base", "backends": [
        {"provider": "mock", "model": "mock-embedding", "priority": 0, "pricing": {"input": 20, "output": 0},
         "maxTier": "internal"},
        {"provider": "mock-backup", "model": "mock-embedding-b", "priority": 1,
         "pricing": {"input": 130, "output": 0}, "maxTier": "internal"}]})


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[RedisServer, Gateway, Gateway]]:
    with RedisServer() as redis, two_replicas("gw-shapes-", lambda v, _: shapes_values(v, redis.url)) as (a, b):
        yield redis, a, b


def fresh(redis: RedisServer) -> None:
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()
    client.close()


def settled(redis: RedisServer) -> None:
    """Wait until no reservation is held (settlements run in the background)."""
    client = redis_py.Redis(host=redis.host, port=redis.port)
    try:
        deadline = time.monotonic() + 15
        while client.hlen(f"{PREFIX}reservations") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        assert (client.hlen(f"{PREFIX}reservations"), client.hlen(f"{PREFIX}reservations:expired")) == (0, 0)
    finally:
        client.close()


def spent_nano(gw: Gateway) -> int:
    """The key's daily spend, after checking every limited level is within its limit."""
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    levels = {(b["level"], b["window"]): b for b in resp.json()["budgets"]}
    for (level, window), b in levels.items():
        if b["limit_usd"] is not None:
            assert round(b["spent_usd"] * 1e9) <= round(b["limit_usd"] * 1e9), f"{level} {window} overspent"
    return round(levels[("key:shapes", "daily")]["spent_usd"] * 1e9)


async def burst(gws: tuple[Gateway, Gateway], path: str, bodies: list[dict[str, Any]],
                headers: dict[str, str] | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=300)) as c:
        return await asyncio.gather(*(c.post(gws[i % 2].url + path, json=body, headers={
            "authorization": f"Bearer {KEY}", **(headers or {})}) for i, body in enumerate(bodies)))


def test_embeddings_are_charged_their_usage_at_the_answering_backend(
        setup: tuple[RedisServer, Gateway, Gateway]) -> None:
    """Embeddings answers carry `prompt_tokens` but no `completion_tokens`: the gateway took
    that for a bill it could not read and charged every embeddings request its reservation
    (the prompt at the dearest backend's price, 6.5x here) instead of its usage at the price of
    the backend that answered. A burst of 200 (strings, token-id arrays, `dimensions`)."""
    redis, *gws = setup
    fresh(redis)
    bodies: list[dict[str, Any]] = []
    for i in range(200):
        if i % 3 == 0:
            bodies.append({"model": "embed-two", "input": [f"item {i} " * 5, "another text to embed"]})
        elif i % 3 == 1:
            bodies.append({"model": "embed-two", "input": [[1, 2, 3, 4, 5] * (i % 7 + 1), [9] * 40]})
        else:
            bodies.append({"model": "embed-two", "input": f"one string {i}", "dimensions": 8})
    answers = asyncio.run(burst((gws[0], gws[1]), "/v1/embeddings", bodies))
    owed = 0
    for a in answers:
        if a.status_code == 200:
            owed += cost_nano(EMBED_CHEAP, a.json()["usage"]["prompt_tokens"], 0)
        else:
            assert a.status_code == 429 and a.json()["error"]["code"] == "budget_exceeded", a.text
    assert sum(a.status_code == 200 for a in answers) > 0
    settled(redis)
    assert spent_nano(gws[0]) == owed
