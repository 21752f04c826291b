"""Prompt-cache writes end to end: real Envoy, two replicas, real ext_proc processes, a shared
Redis-protocol server, the mock provider playing Claude (Messages API), Converse and an
OpenAI-compatible server in front of Claude (OpenRouter-style usage); real openai and
anthropic SDK clients.

Anthropic bills a cache write at 1.25x the input price (5-minute TTL) or 2x (1 hour), a read
at 0.1x. What a budget is charged must be that bill, and no burst may push it past its limit.
The bills here are computed from the usage the client got, with Anthropic's published
multipliers, not with the gateway's own pricing code."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway_extproc import keys

from ..redis_server import RedisServer
from .conftest import Gateway, two_replicas
from .test_metrics import sample

NANO = 1_000_000_000
# USD per 1M tokens: Claude Sonnet's list prices, and the multiples Anthropic bills cache traffic at.
INPUT, OUTPUT = 3.0, 15.0
WRITE_5M, WRITE_1H, READ = 1.25 * INPUT, 2 * INPUT, 0.1 * INPUT
KEYS = {name: keys.generate(name) for name in ("bill", "claude-burst", "marked-burst", "unmarked")}
BUDGETS = {"bill": 1.0, "claude-burst": 0.004, "marked-burst": 0.004, "unmarked": 1.0}
# The system prompt a coding agent would mark for caching (long enough to be worth it).
SYSTEM = "You are a careful reviewer of pull requests. " * 8


def cache_values(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["extproc"]["processes"] = 2
    # claude-chat (Anthropic, falling back to Converse) keeps values-local's prices: its cache
    # writes are priced by default. router-claude is an OpenAI-compatible server in front of
    # Claude (OpenRouter): it gets the client's cache_control markers, and its writes are priced.
    values["models"].append({
        "name": "router-claude", "tokenizer": "o200k_base", "maxOutputTokens": 1024, "backends": [{
            "provider": "mock", "model": "anthropic/claude-sonnet-4.5", "maxTier": "internal",
            "pricing": {"input": INPUT, "output": OUTPUT, "cachedInput": READ, "cacheWrite": WRITE_5M,
                        "cacheWrite1h": WRITE_1H}}]})
    values["keys"] += [{"id": name, "sha256": keys.digest(KEYS[name]), "team": "demo",
                        "budget": {"daily": BUDGETS[name]}} for name in KEYS]


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[Gateway, Gateway]]:
    with RedisServer() as redis, two_replicas("gw-cache-", lambda v, _: cache_values(v, redis.url)) as pair:
        yield pair


@pytest.fixture
def gw(replicas: tuple[Gateway, Gateway]) -> Gateway:
    replicas[0].reset()
    return replicas[0]


def spent(gw: Gateway, key: str) -> int:
    """The key's daily spend, once settlements (which run after the response) have landed."""
    time.sleep(0.3)
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[key]}"})
    assert resp.status_code == 200, resp.text
    [daily] = [b for b in resp.json()["budgets"] if b["level"] == f"key:{key}" and b["window"] == "daily"]
    return round(daily["spent_usd"] * NANO)


def nano(usd_per_million: float, tokens: int) -> float:
    return usd_per_million * 1000 * tokens


def claude_bill(usage: dict[str, Any]) -> int:
    """What Anthropic bills for a message's usage, in nano-dollars (rounded up once)."""
    long = (usage.get("cache_creation") or {}).get("ephemeral_1h_input_tokens", 0)
    short = usage["cache_creation_input_tokens"] - long
    return math.ceil(nano(INPUT, usage["input_tokens"]) + nano(READ, usage["cache_read_input_tokens"])
                     + nano(WRITE_5M, short) + nano(WRITE_1H, long) + nano(OUTPUT, usage["output_tokens"]))


def router_bill(usage: Any, ttl_1h: bool) -> int:
    """An OpenRouter-style chat usage billed as Anthropic bills it (writes inside prompt_tokens)."""
    writes = usage.prompt_tokens_details.cache_write_tokens or 0
    plain = usage.prompt_tokens - writes - (usage.prompt_tokens_details.cached_tokens or 0)
    return math.ceil(nano(INPUT, plain) + nano(WRITE_1H if ttl_1h else WRITE_5M, writes)
                     + nano(OUTPUT, usage.completion_tokens))


def over_reservations(*gws: Gateway) -> float:
    return sum(sample(httpx.get(g.stack.metrics_url).text, "genai_budget_events_total",
                      event="over_reservation") for g in gws)


def claude_client(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=KEYS[key], max_retries=0)


async def burst(clients: Callable[[], list[Any]], call: Callable[[Any], Awaitable[Any]], n: int = 100) -> list[Any]:
    """`n` concurrent calls spread over the clients (one per replica), closed after."""
    made = clients()
    try:
        return await asyncio.gather(*(call(made[i % len(made)]) for i in range(n)))
    finally:
        for client in made:
            await client.close()


def test_claude_cache_writes_are_charged_what_anthropic_bills(gw: Gateway) -> None:
    """JSON and streamed, 5-minute and 1-hour writes: the client's usage shows them as
    Anthropic does, and the budget is charged exactly Anthropic's bill for that usage."""
    client = claude_client(gw, "bill")
    before = spent(gw, "bill")
    bills = []
    for stream, headers in ((False, {"x-mock-cache-write-tokens": "40"}),
                            (False, {"x-mock-cache-write-tokens": "10", "x-mock-cache-write-1h-tokens": "30"}),
                            (True, {"x-mock-cache-write-1h-tokens": "1000"})):
        request = {"model": "claude-chat", "max_tokens": 64, "extra_headers": headers,
                   "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                   "messages": [{"role": "user", "content": "Review this diff."}]}
        if stream:  # the whole usage, its TTL split too, comes in message_delta (docs/providers.md)
            with client.messages.stream(**request) as events:
                [usage] = [e.usage.model_dump() for e in events if e.type == "message_delta"]
        else:
            usage = client.messages.create(**request).usage.model_dump()
        written = int(headers.get("x-mock-cache-write-tokens", 0)) + int(headers.get("x-mock-cache-write-1h-tokens", 0))
        prompt = usage["input_tokens"] + usage["cache_creation_input_tokens"]
        assert usage["cache_creation_input_tokens"] == min(written, prompt) > 0
        assert usage["cache_creation"] == {"ephemeral_1h_input_tokens": min(
            int(headers.get("x-mock-cache-write-1h-tokens", 0)), prompt), "ephemeral_5m_input_tokens": min(
            written, prompt) - min(int(headers.get("x-mock-cache-write-1h-tokens", 0)), prompt)}
        bills.append(claude_bill(usage))
    sent = [r for r in gw.received(gw.backup) if r["path"].endswith("/messages")]
    assert len(sent) == 3 and all(SYSTEM.strip() in r["body"]["system"] for r in sent)
    # The markers never reach the Claude backend (docs/providers.md): the writes are the provider's.
    assert all("cache_control" not in str(r["body"]) for r in sent)
    assert spent(gw, "bill") - before == sum(bills)
    # A plain answer (no writes) is billed as before: all of its prompt at the input price.
    plain = client.messages.create(model="claude-chat", max_tokens=64, messages=[{"role": "user", "content": "Hi"}])
    assert plain.usage.cache_creation_input_tokens == 0
    assert spent(gw, "bill") - before == sum(bills) + claude_bill(plain.usage.model_dump())


def test_a_burst_of_claude_cache_writes_never_passes_the_budget(replicas: tuple[Gateway, Gateway]) -> None:
    """100 concurrent anthropic SDK requests at two replicas, each answered with its whole
    prompt written to the 1-hour cache. Their markers do not reach Claude (docs/providers.md),
    so the writes were not reserved for: a bill past its reservation (the budget clamped the
    request's output cap) is charged the reservation and reported (`budget_over_reservation`,
    with the bill). So the budget is charged exactly Anthropic's bills less what the gateway
    reported above the reservations, and never more than its limit."""
    first, second = replicas
    headers = {"x-mock-cache-write-1h-tokens": "100000"}
    logs = [g.stack.log_path("extproc") for g in (first, second)]
    offsets = [len(log.read_bytes()) for log in logs]

    async def one(client: anthropic.AsyncAnthropic) -> anthropic.types.Message | anthropic.APIStatusError:
        try:
            return await client.messages.create(
                model="claude-chat", max_tokens=64, system=SYSTEM, extra_headers=headers,
                messages=[{"role": "user", "content": "Review this diff."}])
        except anthropic.APIStatusError as err:
            return err

    results = asyncio.run(burst(lambda: [
        anthropic.AsyncAnthropic(base_url=g.url, api_key=KEYS["claude-burst"], max_retries=0, timeout=60)
        for g in (first, second)], one))
    answered = [r for r in results if isinstance(r, anthropic.types.Message)]
    refused = [r for r in results if not isinstance(r, anthropic.types.Message)]
    assert answered and refused, "the budget must be tight: some answered, some refused"
    assert {(r.status_code, r.body["error"]["code"]) for r in refused} == {(429, "budget_exceeded")}
    assert all(r.usage.cache_creation.ephemeral_1h_input_tokens > 0 for r in answered)
    total = spent(first, "claude-burst")
    bills = sorted(claude_bill(r.usage.model_dump()) for r in answered)
    over = [json.loads(line) for log, offset in zip(logs, offsets)
            for line in log.read_bytes()[offset:].decode().splitlines() if "budget_over_reservation" in line]
    assert all(entry["cost_nano"] in bills for entry in over)  # the gateway's cost is Anthropic's bill
    assert total == sum(bills) - sum(e["cost_nano"] - e["reserved_nano"] for e in over)
    assert total <= BUDGETS["claude-burst"] * NANO
    assert spent(second, "claude-burst") == total


def test_cache_markers_forwarded_as_sent_are_reserved_at_the_write_price(replicas: tuple[Gateway, Gateway]) -> None:
    """A chat request marked for 1-hour caching (cache_control on a content part, as OpenRouter
    takes it) goes as sent to an OpenAI-compatible server in front of Claude, which writes the
    whole prompt. With an output cap of one token the write costs more than the prompt at the
    input price plus the output: only a reservation at the write price covers the bill. 100
    concurrent at two replicas: the budget admits exactly what it affords at the provider's bill,
    is charged exactly that, and no bill exceeded its reservation."""
    first, second = replicas
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM,
                                                "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
                {"role": "user", "content": "Review this diff."}]
    headers = {"x-mock-cache-write-1h-tokens": "100000"}
    probe = openai.OpenAI(base_url=f"{first.url}/v1", api_key=KEYS["unmarked"], max_retries=0)
    answer = probe.chat.completions.create(model="router-claude", messages=messages, max_tokens=1,
                                           extra_headers=headers)
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cache_write_tokens == answer.usage.prompt_tokens
    cost = router_bill(answer.usage, ttl_1h=True)
    assert cost > math.ceil(nano(INPUT, answer.usage.prompt_tokens) + nano(OUTPUT, 1))  # what used to be reserved
    [sent] = first.received(first.primary)[-1:]
    assert sent["body"]["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    events_before = over_reservations(first, second)

    async def one(client: openai.AsyncOpenAI) -> Any:
        try:
            return await client.chat.completions.create(model="router-claude", messages=messages, max_tokens=1,
                                                        extra_headers=headers)
        except openai.APIStatusError as err:
            return err

    results = asyncio.run(burst(lambda: [
        openai.AsyncOpenAI(base_url=f"{g.url}/v1", api_key=KEYS["marked-burst"], max_retries=0, timeout=60)
        for g in (first, second)], one))
    answered = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert {(r.status_code, r.code) for r in refused} == {(429, "budget_exceeded")}
    budget = round(BUDGETS["marked-burst"] * NANO)
    assert len(answered) == budget // cost
    assert all(router_bill(r.usage, ttl_1h=True) == cost for r in answered)
    total = spent(first, "marked-burst")
    assert total == len(answered) * cost <= budget
    assert spent(second, "marked-burst") == total
    assert over_reservations(first, second) == events_before
