"""Prompt-cache markers and writes end to end: real Envoy, two replicas, real ext_proc processes,
a shared Redis-protocol server, the mock provider playing Claude (Messages API), Converse and
an OpenAI-compatible server in front of Claude (OpenRouter-style usage); real openai and
anthropic SDK clients. The mock writes to its cache only what a request marks, as providers do:
the markers must arrive, in each provider's own shape, and be reserved for.

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
KEYS = {name: keys.generate(name) for name in ("bill", "claude-burst", "marked-burst", "unmarked", "converse-burst")}
BUDGETS = {"bill": 1.0, "claude-burst": 0.004, "marked-burst": 0.004, "unmarked": 1.0, "converse-burst": 0.004}
# The system prompt a coding agent would mark for caching (long enough to be worth it).
SYSTEM = "You are a careful reviewer of pull requests. " * 8
EPHEMERAL, HOUR = {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}
# Marked for an hour, as an anthropic SDK client sends it.
MARKED_SYSTEM: Any = [{"type": "text", "text": SYSTEM, "cache_control": HOUR}]
WEATHER: Any = {"name": "get_weather", "description": "The weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


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
    # Claude on Bedrock alone (claude-chat reaches Converse only when Anthropic fails): its
    # writes are priced by default, at Anthropic's multipliers.
    values["models"].append({
        "name": "converse-claude", "tokenizer": "o200k_base", "maxOutputTokens": 1024, "backends": [{
            "provider": "mock-bedrock", "model": "anthropic.claude-mock-sonnet-v1:0", "maxTier": "internal",
            "pricing": {"input": INPUT, "output": OUTPUT, "cachedInput": READ}}]})
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


def converse_bill(usage: Any) -> int:
    """A translated Converse usage (writes inside prompt_tokens, their 1-hour share beside) billed
    as Anthropic bills Claude on Bedrock."""
    details = usage.prompt_tokens_details.model_dump()
    writes, long = details.get("cache_creation_tokens") or 0, details.get("cache_creation_1h_tokens") or 0
    plain = usage.prompt_tokens - writes - (details.get("cached_tokens") or 0)
    return math.ceil(nano(INPUT, plain) + nano(WRITE_5M, writes - long) + nano(WRITE_1H, long)
                     + nano(OUTPUT, usage.completion_tokens))


def sent_to(gw: Gateway, mock: str, path_end: str) -> list[dict[str, Any]]:
    """The bodies a mock provider received on paths ending so, oldest first."""
    return [r["body"] for r in gw.received(mock) if r["path"].endswith(path_end)]


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


def chat_burst(replicas: tuple[Gateway, Gateway], key: str, **create: Any) -> tuple[list[Any], list[Any]]:
    """100 concurrent openai SDK chat requests spread over the replicas: (answered, refused)."""
    async def one(client: openai.AsyncOpenAI) -> Any:
        try:
            return await client.chat.completions.create(**create)
        except openai.APIStatusError as err:
            return err

    results = asyncio.run(burst(lambda: [openai.AsyncOpenAI(base_url=f"{g.url}/v1", api_key=KEYS[key], max_retries=0,
                                                            timeout=60) for g in replicas], one))
    return ([r for r in results if not isinstance(r, openai.APIStatusError)],
            [r for r in results if isinstance(r, openai.APIStatusError)])


def test_claude_cache_writes_are_charged_what_anthropic_bills(gw: Gateway) -> None:
    """JSON and streamed, 5-minute and 1-hour writes: the client's usage shows them as
    Anthropic does, and the budget is charged exactly Anthropic's bill for that usage."""
    client = claude_client(gw, "bill")
    before = spent(gw, "bill")
    bills = []
    for stream, headers in ((False, {"x-mock-cache-write-tokens": "40"}),
                            (False, {"x-mock-cache-write-tokens": "10", "x-mock-cache-write-1h-tokens": "30"}),
                            (True, {"x-mock-cache-write-1h-tokens": "1000"})):
        request = {"model": "claude-chat", "max_tokens": 64, "extra_headers": headers, "system": MARKED_SYSTEM,
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
    # The marker reaches Claude where the client put it (docs/providers.md).
    sent = sent_to(gw, gw.backup, "/messages")
    assert len(sent) == 3 and all(body["system"] == MARKED_SYSTEM for body in sent)
    assert spent(gw, "bill") - before == sum(bills)
    # A plain answer (nothing marked, so nothing written) is billed as before: its prompt at the input price.
    plain = client.messages.create(model="claude-chat", max_tokens=64, messages=[{"role": "user", "content": "Hi"}],
                                   extra_headers={"x-mock-cache-write-tokens": "40"})
    assert plain.usage.cache_creation_input_tokens == 0
    assert spent(gw, "bill") - before == sum(bills) + claude_bill(plain.usage.model_dump())


def test_a_burst_of_claude_cache_writes_never_passes_the_budget(replicas: tuple[Gateway, Gateway]) -> None:
    """100 concurrent anthropic SDK requests at two replicas, their system prompt marked for an
    hour, each answered with its whole prompt written to the 1-hour cache. The markers reach
    Claude, so the writes are reserved for at the 1-hour write price: the budget is charged
    exactly Anthropic's bills, never more than its limit, and no bill passes its reservation."""
    first, second = replicas
    headers = {"x-mock-cache-write-1h-tokens": "100000"}
    events_before = over_reservations(first, second)

    async def one(client: anthropic.AsyncAnthropic) -> anthropic.types.Message | anthropic.APIStatusError:
        try:
            return await client.messages.create(
                model="claude-chat", max_tokens=64, system=MARKED_SYSTEM, extra_headers=headers,
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
    assert total == sum(claude_bill(r.usage.model_dump()) for r in answered) <= BUDGETS["claude-burst"] * NANO
    assert spent(second, "claude-burst") == total
    assert over_reservations(first, second) == events_before


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

    answered, refused = chat_burst(replicas, "marked-burst", model="router-claude", messages=messages, max_tokens=1,
                                   extra_headers=headers)
    assert {(r.status_code, r.code) for r in refused} == {(429, "budget_exceeded")}
    budget = round(BUDGETS["marked-burst"] * NANO)
    assert len(answered) == budget // cost
    assert all(router_bill(r.usage, ttl_1h=True) == cost for r in answered)
    total = spent(first, "marked-burst")
    assert total == len(answered) * cost <= budget
    assert spent(second, "marked-burst") == total
    assert over_reservations(first, second) == events_before


def test_an_anthropic_sdk_clients_markers_reach_claude_where_it_put_them(gw: Gateway) -> None:
    """Markers on a tool, the system prompt and a tool result (longer TTLs first, as Anthropic
    requires) arrive on the same blocks of the Claude backend's request, and it writes."""
    answer = claude_client(gw, "bill").messages.create(
        model="claude-chat", max_tokens=64, system=MARKED_SYSTEM, tools=[{**WEATHER, "cache_control": HOUR}],
        extra_headers={"x-mock-cache-write-tokens": "20"},
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                     "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 C",
                                                "cache_control": EPHEMERAL},
                                               {"type": "text", "text": "Thanks. Pack an umbrella?"}]}])
    assert answer.usage.cache_creation_input_tokens == 20
    [sent] = sent_to(gw, gw.backup, "/messages")
    assert sent["system"] == MARKED_SYSTEM
    assert sent["tools"] == [{**WEATHER, "cache_control": HOUR}]
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 C", "cache_control": EPHEMERAL},
        {"type": "text", "text": "Thanks. Pack an umbrella?"}]


def test_an_openai_sdk_clients_marked_content_part_reaches_claude(gw: Gateway) -> None:
    """A content part marked as OpenRouter and LiteLLM take it, at a model served by Claude."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["bill"], max_retries=0)
    answer = client.chat.completions.create(
        model="claude-chat", max_tokens=16, extra_headers={"x-mock-cache-write-1h-tokens": "30"},
        messages=[{"role": "system", "content": [{"type": "text", "text": SYSTEM, "cache_control": HOUR}]},
                  {"role": "user", "content": [{"type": "text", "text": "Review this diff.",
                                                "cache_control": EPHEMERAL}]}])
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.model_dump()["cache_creation_1h_tokens"] == 30
    [sent] = sent_to(gw, gw.backup, "/messages")
    assert sent["system"] == MARKED_SYSTEM
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Review this diff.", "cache_control": EPHEMERAL}]}]


def marked_weather(gw: Gateway, model: str) -> Any:
    """An anthropic SDK request with its system prompt, tool and question marked for caching,
    the provider asked to write 20 tokens (it writes only what arrives marked)."""
    return claude_client(gw, "bill").messages.create(
        model=model, max_tokens=64, system=MARKED_SYSTEM, tools=[{**WEATHER, "cache_control": HOUR}],
        extra_headers={"x-mock-cache-write-tokens": "20"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?",
                                                "cache_control": EPHEMERAL}]}])


def test_an_anthropic_sdk_clients_markers_never_reach_an_openai_schema_backend(gw: Gateway) -> None:
    """A backend that gets the pivot as it is (strict OpenAI-compatible servers refuse keys
    they do not know) gets no marker from an Anthropic client, and so writes nothing."""
    message = marked_weather(gw, "router-claude")
    assert message.usage.cache_creation_input_tokens == 0
    [sent] = sent_to(gw, gw.primary, "/chat/completions")
    assert "cache_control" not in json.dumps(sent)
    assert sent["messages"][0]["content"][0]["text"] == SYSTEM and sent["tools"][0]["function"]["name"] == "get_weather"


def test_a_converse_backend_gets_cache_points_after_the_marked_blocks(gw: Gateway) -> None:
    """Converse's own shape: a cachePoint block (with the marker's TTL) after the marked tool,
    system block and message block; its writes come back to the client."""
    message = marked_weather(gw, "converse-claude")
    assert message.usage.cache_creation_input_tokens == 20
    [sent] = sent_to(gw, gw.backup, "/converse")
    point_1h = {"cachePoint": {"type": "default", "ttl": "1h"}}
    assert sent["system"] == [{"text": SYSTEM}, point_1h]
    assert [tool for tool in sent["toolConfig"]["tools"] if "toolSpec" not in tool] == [point_1h]
    assert sent["messages"] == [{"role": "user", "content": [{"text": "Weather in Paris?"},
                                                             {"cachePoint": {"type": "default"}}]}]


def test_a_marker_of_another_shape_is_refused_before_any_provider(gw: Gateway) -> None:
    """400 invalid_request naming the marker's path, in the client's own terms; a fifth marker too."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["bill"], max_retries=0)
    part = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "2h"}}
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="claude-chat", messages=[{"role": "user", "content": [part]}])
    assert (bad.value.code, bad.value.param) == ("invalid_request", "messages[0].content[0].cache_control")
    five: Any = [{"type": "text", "text": "x", "cache_control": EPHEMERAL}] * 5
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_client(gw, "bill").messages.create(model="claude-chat", max_tokens=8,
                                                  messages=[{"role": "user", "content": five}])
    error = refused.value.body["error"]  # type: ignore[index]
    assert (error["code"], error["param"]) == ("invalid_request", "messages.0.content.4.cache_control")
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_client(gw, "bill").messages.create(
            model="converse-claude", max_tokens=8, system=[{"type": "text", "text": "s", "cache_control": "yes"}],
            messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["error"]["param"] == "system.0.cache_control"  # type: ignore[index]
    assert gw.received(gw.primary) == gw.received(gw.backup) == []


def test_a_burst_of_converse_cache_writes_never_passes_the_budget(replicas: tuple[Gateway, Gateway]) -> None:
    """100 concurrent openai SDK requests at two replicas to Claude on Bedrock, the system part
    marked for an hour, each answered with its whole prompt written for an hour: reserved at
    the 1-hour write price, charged exactly the bills, never past the budget or a reservation."""
    first, second = replicas
    messages: Any = [{"role": "system", "content": [{"type": "text", "text": SYSTEM, "cache_control": HOUR}]},
                     {"role": "user", "content": "Review this diff."}]
    events_before = over_reservations(first, second)

    answered, refused = chat_burst(replicas, "converse-burst", model="converse-claude", messages=messages,
                                   max_tokens=64, extra_headers={"x-mock-cache-write-1h-tokens": "100000"})
    assert answered and refused, "the budget must be tight: some answered, some refused"
    assert {(r.status_code, r.code) for r in refused} == {(429, "budget_exceeded")}
    assert all(r.usage.prompt_tokens_details.model_dump()["cache_creation_1h_tokens"] == r.usage.prompt_tokens
               for r in answered)
    total = spent(first, "converse-burst")
    assert total == sum(converse_bill(r.usage) for r in answered) <= BUDGETS["converse-burst"] * NANO
    assert spent(second, "converse-burst") == total
    assert over_reservations(first, second) == events_before


# -- a top-level marker (OpenRouter's, and Anthropic's automatic caching) -------------------


def test_a_top_level_marker_reaches_claude_on_the_last_block_and_its_writes_are_billed(gw: Gateway) -> None:
    """`cache_control` beside `messages`, as OpenRouter takes it: Anthropic puts that breakpoint
    on the last cacheable block, so the Claude backend gets it there (it reached Claude nowhere
    until 2026-12, and Claude wrote nothing); the writes are charged their bill."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["bill"], max_retries=0)
    before = spent(gw, "bill")
    answer = client.chat.completions.create(
        model="claude-chat", max_tokens=16, extra_headers={"x-mock-cache-write-1h-tokens": "30"},
        extra_body={"cache_control": HOUR},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Review this diff."}])
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.model_dump()["cache_creation_1h_tokens"] == 30
    [sent] = sent_to(gw, gw.backup, "/messages")
    assert "cache_control" not in sent and sent["system"] == SYSTEM
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Review this diff.", "cache_control": HOUR}]}]
    assert spent(gw, "bill") - before == converse_bill(answer.usage)


def test_an_anthropic_sdk_clients_top_level_marker_reaches_converse_as_a_last_cache_point(gw: Gateway) -> None:
    message = claude_client(gw, "bill").messages.create(
        model="converse-claude", max_tokens=64, system=SYSTEM, extra_body={"cache_control": EPHEMERAL},
        extra_headers={"x-mock-cache-write-tokens": "20"},
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert message.usage.cache_creation_input_tokens == 20
    [sent] = sent_to(gw, gw.backup, "/converse")
    assert sent["system"] == [{"text": SYSTEM}]
    assert sent["messages"] == [{"role": "user", "content": [{"text": "Weather in Paris?"},
                                                             {"cachePoint": {"type": "default"}}]}]


def test_a_top_level_marker_goes_as_sent_to_an_openai_schema_backend_reserved_at_the_write_price(gw: Gateway) -> None:
    """An OpenAI-compatible server in front of Claude gets the body as sent (OpenRouter takes the
    top-level marker) and writes the whole prompt for an hour: with one output token that costs
    more than the prompt at the input price, and the reservation covered it (no bill past it)."""
    events_before = over_reservations(gw)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["unmarked"], max_retries=0)
    answer = client.chat.completions.create(
        model="router-claude", max_tokens=1, extra_headers={"x-mock-cache-write-1h-tokens": "100000"},
        extra_body={"cache_control": HOUR},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Review this diff."}])
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cache_write_tokens == answer.usage.prompt_tokens
    [sent] = sent_to(gw, gw.primary, "/chat/completions")
    assert sent["cache_control"] == HOUR
    assert router_bill(answer.usage, ttl_1h=True) > math.ceil(nano(INPUT, answer.usage.prompt_tokens) + nano(OUTPUT, 1))
    assert over_reservations(gw) == events_before


def test_a_top_level_marker_of_another_shape_or_a_fifth_is_refused_before_any_provider(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["bill"], max_retries=0)
    part = {"type": "text", "text": "x", "cache_control": EPHEMERAL}
    for body, messages in (({"cache_control": {"type": "ephemeral", "ttl": "2h"}}, [{"role": "user", "content": "x"}]),
                           ({"cache_control": EPHEMERAL}, [{"role": "user", "content": [part] * 4}])):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="claude-chat", max_tokens=8, extra_body=body, messages=messages)
        assert (refused.value.code, refused.value.param) == ("invalid_request", "cache_control")  # type: ignore[attr-defined]
    assert gw.received(gw.primary) == gw.received(gw.backup) == []
