"""Fallback to a dearer backend under a dollar budget, two replicas and a shared Valkey.

The reservation is made at the router before Envoy picks an attempt's backend, so it is
priced at the dearest backend of the model; the settlement charges the backend that
answered, at the price the request's model lists for it. Here the primary is cheap and
fails, the backup is 50-200x dearer and answers, and another model lists the backup's
provider model at a price of its own (an alias)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway_extproc import keys
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, two_replicas

BACKUP = Price.from_usd_per_million(50.0, 200.0)
KEY = keys.generate("fallback-budget")
BUDGET_NANO = 20_000_000  # $0.02
NANO = 1_000_000_000


def dearer_backup(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["extproc"]["processes"] = 2
    fallback = next(m for m in values["models"] if m["name"] == "fallback-chat")
    fallback["backends"][0]["pricing"] = {"input": 1.0, "output": 1.0}
    fallback["backends"][1]["pricing"] = {"input": 50.0, "output": 200.0}
    values["models"].append({"name": "secondary-alias", "tokenizer": "o200k_base", "backends": [
        {"provider": "mock-backup", "model": "mock-secondary", "pricing": {"input": 0.01, "output": 0.01},
         "maxTier": "internal"}]})
    values["keys"].append({"id": "fallback-budget", "sha256": keys.digest(KEY), "team": "demo",
                           "budget": {"daily": BUDGET_NANO / NANO}})


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[Gateway, Gateway]]:
    with RedisServer() as redis, two_replicas("gw-budget-fb-", lambda v, _: dearer_backup(v, redis.url)) as pair:
        yield pair


def spent(gw: Gateway) -> int:
    """The key's daily spend as the shared store holds it."""
    doc = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEY}"}).json()
    [daily] = [b for b in doc["budgets"] if b["level"] == "key:fallback-budget" and b["window"] == "daily"]
    return round(daily["spent_usd"] * NANO)


def test_a_burst_whose_cheap_primary_fails_is_charged_at_the_dearer_backup_within_the_budget(
        replicas: tuple[Gateway, Gateway]) -> None:
    first, _ = replicas
    httpx.post(f"{first.primary}/_mock/behaviour", json={"model": "mock-primary", "status": 500}).raise_for_status()
    body = {"model": "fallback-chat", "messages": [{"role": "user", "content": "Count the apples."}], "max_tokens": 8}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=300)) as client:
            return await asyncio.gather(*(
                client.post(f"{replicas[i % 2].url}/v1/chat/completions", json=body,
                            # a client naming the cheap alias or backend: the gateway's headers are its own
                            headers={"authorization": f"Bearer {KEY}", "x-gateway-model": "secondary-alias",
                                     "x-gateway-backend": "mock/mock-primary"})
                for i in range(300)))

    responses = asyncio.run(burst())
    admitted = [r for r in responses if r.status_code == 200]
    # Refused only by the budget: every admitted request falls back (the chart's circuit
    # breakers let every request's retry be in flight at once).
    assert admitted and {(r.status_code, r.json()["error"]["code"]) for r in responses if r.status_code != 200} \
        <= {(429, "budget_exceeded")}
    assert {r.headers["x-gateway-backend"] for r in admitted} == {"mock-backup/mock-secondary"}
    bills = [cost_nano(BACKUP, r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"])
             for r in admitted]
    assert 0 < len(admitted) <= BUDGET_NANO // bills[0]
    time.sleep(0.5)  # settlement runs after the response
    assert spent(first) == spent(replicas[1]) == sum(bills) <= BUDGET_NANO
