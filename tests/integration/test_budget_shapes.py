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

from gateway_extproc import keys, tokens
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, nothing_held, two_replicas

KEY = keys.generate("shapes")
RL_KEY = keys.generate("shapes-rl")
RPM, TPM = 40, 3000
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
    values["keys"].append({"id": "shapes-rl", "sha256": keys.digest(RL_KEY), "team": "shapes",
                           "rateLimits": {"requestsPerMinute": RPM, "models": {"default-chat": {"tokensPerMinute": TPM}}}})
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
                headers: dict[str, str] | None = None, key: str = KEY) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=300)) as c:
        return await asyncio.gather(*(c.post(gws[i % 2].url + path, json=body, headers={
            "authorization": f"Bearer {key}", **(headers or {})}) for i, body in enumerate(bodies)))


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
    nothing_held(redis)
    assert spent_nano(gws[0]) == owed


@pytest.mark.parametrize("bucket", ["requests", "tokens"])
def test_a_burst_at_two_replicas_admits_no_more_than_the_rate_limit(
        setup: tuple[RedisServer, Gateway, Gateway], bucket: str) -> None:
    """250 requests at once, split over two replicas: no more are admitted than the bucket
    holds plus what it refilled while the burst ran (requests per minute; tokens per minute
    per model, each request reserving its prompt and output cap and giving back what it did
    not use when it settles)."""
    redis, *gws = setup
    fresh(redis)
    cap = 50 if bucket == "requests" else 500
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": cap}
    prompt = tokens.chat_prompt_tokens(body, tokens.counter("o200k_base"))
    started = time.monotonic()
    answers = asyncio.run(burst((gws[0], gws[1]), "/v1/chat/completions", [body] * 250, key=RL_KEY))
    elapsed = time.monotonic() - started
    admitted = [a for a in answers if a.status_code == 200]
    for a in answers:
        assert a.status_code in (200, 429), a.text
        if a.status_code == 429:
            assert a.json()["error"]["code"] == "rate_limited" and int(a.headers["retry-after"]) >= 1
    assert admitted
    if bucket == "requests":  # (the token bucket, 3,000 at ~60 a request, does not bind)
        assert RPM - 1 <= len(admitted) <= RPM + elapsed * RPM / 60 + 1
    else:
        # A settled request gives back the tokens it did not use: what the admitted requests
        # used (prompt as counted plus output) stays within the bucket and its refill.
        used = sum(prompt + a.json()["usage"]["completion_tokens"] for a in admitted)
        assert used <= TPM + elapsed * TPM / 60 + 1


CLAUDE = Price.from_usd_per_million(3, 15, 0.3, cache_write="3.75", cache_write_1h=6)


def _claude_cost(usage: dict[str, Any]) -> int:
    """What an Anthropic usage block costs at claude-chat's first backend (input excludes the
    cache reads and writes, which Anthropic reports beside it)."""
    split = usage.get("cache_creation") or {}
    long = split.get("ephemeral_1h_input_tokens", 0)
    writes = usage.get("cache_creation_input_tokens", 0)
    reads = usage.get("cache_read_input_tokens", 0)
    prompt = usage["input_tokens"] + writes + reads
    return cost_nano(CLAUDE, prompt, usage["output_tokens"], reads, writes, long)


async def _message(c: httpx.AsyncClient, gw: Gateway, body: dict[str, Any], headers: dict[str, str]) -> int | None:
    """Send one Messages request; the cost of its answer's usage (None: refused)."""
    h = {"x-api-key": KEY, "anthropic-version": "2023-06-01", **headers}
    if not body.get("stream"):
        r = await c.post(gw.url + "/v1/messages", json=body, headers=h)
        if r.status_code != 200:
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
            return None
        return _claude_cost(r.json()["usage"])
    usage: dict[str, Any] = {}
    async with c.stream("POST", gw.url + "/v1/messages", json=body, headers=h) as r:
        if r.status_code != 200:
            await r.aread()
            assert r.status_code == 429, r.text
            return None
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                event = httpx.Response(200, content=line[6:]).json()
                if event["type"] == "message_start":
                    usage.update(event["message"]["usage"])
                elif event["type"] == "message_delta":
                    usage.update({k: v for k, v in event["usage"].items() if v is not None})
    return _claude_cost(usage)


def test_anthropic_messages_with_cache_writes_thinking_and_streams_are_charged_their_bill(
        setup: tuple[RedisServer, Gateway, Gateway]) -> None:
    """A burst of 200 Messages requests (JSON and streamed, cache markers with 5-minute and
    1-hour lifetimes, cache writes of part or all of the prompt, thinking budgets) against a
    $0.05 key: no level above its limit, and the key charged exactly what each answer's usage
    costs, cache writes at their dearer prices."""
    redis, *gws = setup
    fresh(redis)
    text = "Please summarise the quarterly figures for the board. " * 20

    def shape(i: int) -> tuple[dict[str, Any], dict[str, str]]:
        block: dict[str, Any] = {"type": "text", "text": f"{i} {text}"}
        headers = {"x-mock-reply-words": str(10 + i % 50)}
        if i % 4:
            block["cache_control"] = {"type": "ephemeral", **({"ttl": "1h"} if i % 4 == 3 else {})}
            headers["x-mock-cache-write-tokens"] = str(50 * (i % 5))
            if i % 4 == 3:
                headers["x-mock-cache-write-1h-tokens"] = "10000"
        body: dict[str, Any] = {"model": "claude-chat", "max_tokens": 200 + i, "stream": i % 2 == 0,
                                "messages": [{"role": "user", "content": [block]}]}
        if i % 7 == 0:
            body["thinking"] = {"type": "enabled", "budget_tokens": 100}
        return body, headers

    async def run() -> list[int | None]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=300)) as c:
            return await asyncio.gather(*(_message(c, gws[i % 2], *shape(i)) for i in range(200)))

    costs = asyncio.run(run())
    assert any(c is not None for c in costs) and any(c is None for c in costs)
    nothing_held(redis)
    assert spent_nano(gws[0]) == sum(c for c in costs if c is not None)
