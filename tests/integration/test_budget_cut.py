"""Budget red team on streamed Anthropic Messages and OpenAI Responses answers, through real
Envoy, two replicas and a shared Valkey: clients that abandon a stream part way, budgets so
small the gateway must cap the output, providers that ignore that cap or end without usage,
and bursts of such streams under one small budget.

After every request: no level is above its limit, and nothing stays reserved (what a level
has left is its limit less what it spent, docs/budgets.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis as redis_py

from gateway_extproc import keys

from ..redis_server import RedisServer
from .conftest import Gateway, two_replicas

PREFIX = "gw:{local}:"
NANO = 1_000_000_000
KEYS = {name: keys.generate(name) for name in ("cut-tiny", "cut-roomy")}
BUDGETS = {"cut-tiny": 0.001, "cut-roomy": 1.0}
MSG = [{"role": "user", "content": "Please count the apples in the basket for me."}]


def cut_values(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["extproc"]["processes"] = 2
    values["teams"].append({"name": "cut"})
    for name, daily in BUDGETS.items():
        values["keys"].append({"id": name, "sha256": keys.digest(KEYS[name]), "team": "cut",
                               "budget": {"daily": daily}})


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[RedisServer, Gateway, Gateway]]:
    with RedisServer() as redis, two_replicas("gw-cut-", lambda v, _: cut_values(v, redis.url)) as (a, b):
        yield redis, a, b


@pytest.fixture
def gw(setup: tuple[RedisServer, Gateway, Gateway]) -> Gateway:
    redis, first, _ = setup
    first.reset()
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()
    client.close()
    return first


def settled(gw: Gateway, redis: RedisServer) -> None:
    """Waits until no reservation is held (settlements run after the response), then checks
    none is held or expired unsettled."""
    client = redis_py.Redis(host=redis.host, port=redis.port)
    try:
        deadline = time.monotonic() + 15
        while client.hlen(f"{PREFIX}reservations") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert (client.hlen(f"{PREFIX}reservations"), client.hlen(f"{PREFIX}reservations:expired")) == (0, 0)
    finally:
        client.close()


def levels(gw: Gateway, key: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every level of the key: spent within its limit, and what is left exactly its limit less
    its spend (nothing held)."""
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[key]}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    out = {(b["level"], b["window"]): b for b in resp.json()["budgets"]}
    for (level, window), b in out.items():
        if b["limit_usd"] is not None:
            limit, spent = round(b["limit_usd"] * NANO), round(b["spent_usd"] * NANO)
            assert spent <= limit, f"{level} {window} overspent"
            assert round(b["remaining_usd"] * NANO) == limit - spent, f"{level} {window} still holds a reservation"
    return out


def spent(gw: Gateway, key: str) -> int:
    return round(levels(gw, key)[(f"key:{key}", "daily")]["spent_usd"] * NANO)


def oai(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[key], max_retries=0)


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=KEYS[key], max_retries=0)


@pytest.mark.parametrize("honest", [False, True], ids=["ignores-cap", "honest"])
def test_a_responses_stream_of_a_provider_ignoring_the_cap_is_cut_at_the_reservation(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, honest: bool) -> None:
    """The budget backstop covered chat streams only: a Responses stream from a provider that
    ignores `max_output_tokens` (400 tokens against a grant of ~45) ran on for as long as the
    provider wrote. Now it ends with a `budget_exceeded` error event once past the grant; an
    honest provider's stream at the grant (`incomplete`, a tool call's arguments repeated
    whole in its `.done` events) ends as the provider ended it."""
    redis = setup[0]
    deltas: list[str] = []
    events: list[str] = []
    controls = {"x-mock-reply-words": "400", **({} if honest else {"x-mock-ignore-max-tokens": "1"})}
    stream = oai(gw, "cut-tiny").responses.create(model="default-chat", input="Count the apples.", stream=True,
                                                  extra_headers=controls)
    try:
        for event in stream:
            events.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
    except openai.APIError as err:
        assert not honest and "budget" in str(err) and err.body["code"] == "budget_exceeded"
    granted = gw.received(gw.primary)[-1]["body"]["max_output_tokens"]
    assert granted < 100
    if honest:
        assert events[-1] == "response.incomplete" and len("".join(deltas).split()) == granted
    else:
        assert "response.incomplete" not in events and 0 < len("".join(deltas).split()) <= granted + 1
    settled(gw, redis)
    assert spent(gw, "cut-tiny") <= BUDGETS["cut-tiny"] * NANO


def sent_cap(gw: Gateway) -> int:
    """The output cap the provider was sent (the last request either mock got)."""
    [body] = [r["body"] for mock in (gw.primary, gw.backup) for r in gw.received(mock)[-1:]]
    return next(body[f] for f in ("max_completion_tokens", "max_tokens", "max_output_tokens") if f in body)


def streamed_words(gw: Gateway, client: str, model: str, controls: dict[str, str]) -> tuple[int, str | None]:
    """The words of generated text a client got, and the code of the error that ended the
    stream (None: it ended cleanly)."""
    texts: list[str] = []
    try:
        if client == "messages":
            with claude(gw, "cut-tiny").messages.stream(model=model, max_tokens=4096, messages=MSG,
                                                        extra_headers=controls) as stream:
                texts += [e.delta.text for e in stream if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        elif client == "responses":
            texts += [e.delta for e in oai(gw, "cut-tiny").responses.create(
                model=model, input="Count the apples.", stream=True, extra_headers=controls)
                if e.type == "response.output_text.delta"]
        else:
            for chunk in oai(gw, "cut-tiny").chat.completions.create(model=model, messages=MSG, stream=True,
                                                                     extra_headers=controls):
                texts += [c.delta.content for c in chunk.choices if c.delta.content]
    except (openai.APIError, anthropic.APIError) as err:
        body = err.body if isinstance(err.body, dict) else {}
        return len("".join(texts).split()), str(body.get("code") or body.get("error", {}).get("code") or err)
    return len("".join(texts).split()), None


@pytest.mark.parametrize(("client", "model"), [("chat", "default-chat"), ("messages", "default-chat"),
                                               ("messages", "claude-chat"), ("responses", "default-chat")])
def test_a_provider_ignoring_the_cap_in_large_events_is_cut_near_the_reservation(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, client: str, model: str) -> None:
    """The backstop counted events, about one token each: a provider that ignores the cap and
    batches its output (25 tokens an event here; servers behind Azure's asynchronous content
    filter send whole sentences) streamed 400 tokens against a grant of ~45 in 16 events, never
    reaching the count, the whole answer to the client and billed. Now the text's tokens count
    too (with room for a tokenizer that counts the provider's text longer than it does)."""
    words, code = streamed_words(gw, client, model, {"x-mock-ignore-max-tokens": "1", "x-mock-reply-words": "400",
                                                     "x-mock-event-words": "25"})
    granted = sent_cap(gw)
    assert granted < 100 and code is not None and "budget" in code, (words, code)
    assert words <= 2 * granted + 25
    settled(gw, setup[0])
    assert spent(gw, "cut-tiny") <= BUDGETS["cut-tiny"] * NANO
