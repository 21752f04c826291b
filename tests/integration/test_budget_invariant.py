"""The budget invariant, tested as one: whatever requests arrive, budgets are never overspent.

Hypothesis generates bursts of request shapes — with or without an output cap, JSON or
stream, chat or Responses, `n` choices, clients that disconnect at a random point,
provider errors, providers that ignore the cap or misreport usage, replies of any length —
and fires each burst at once at two gateway replicas (Envoy + two ext_proc processes each)
sharing one Valkey. After every burst, once settlements have landed:

- every level (org, team, key) in every window is charged at most its limit (amounts are
  integer nano-dollars: no rounding allowance is needed);
- every charge reached every level: team and org spend equal the sum of the keys' spend,
  and the monthly windows equal the daily ones (a fresh store per burst);
- no reservation is left open, and none expired unsettled;
- when every request of a key was well-behaved (completed, honest provider), its spend is
  exactly the sum of what the provider's usage says those requests cost;
- the gateway never answered 503/500 of its own (store unavailable, internal error).

Kept small for CI: a dozen bursts of up to 16 requests. The same bursts under faults (the
store, an ext_proc worker or Envoy going away mid-burst): test_budget_faults.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis as redis_py
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway_extproc import keys
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, nothing_held, two_replicas

PRICE = Price.from_usd_per_million(5.0, 20.0, 2.5)  # default-chat; fallback-chat's worst is the same
NAMES = ("inv-a", "inv-b", "inv-c")
KEYS = {name: keys.generate(name) for name in NAMES}
KEY_BUDGETS = {"inv-a": 0.01, "inv-b": 0.03, "inv-c": 0.05}
TEAM_BUDGET = 0.06
PREFIX = "gw:{local}:"  # (the budget store's keys, as test_budget_faults reads them)
# The gateway's own failures: none may happen on a healthy store.
OWN_FAILURES = {"budget_store_unavailable", "gateway_internal_error", "gateway_unavailable"}


def invariant_values(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["extproc"]["processes"] = 2
    values["teams"].append({"name": "inv", "budget": {"daily": TEAM_BUDGET, "monthly": TEAM_BUDGET}})
    for name in NAMES:
        values["keys"].append({"id": name, "sha256": keys.digest(KEYS[name]), "team": "inv",
                               "budget": {"daily": KEY_BUDGETS[name], "monthly": TEAM_BUDGET}})


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[RedisServer, Gateway, Gateway]]:
    with RedisServer() as redis, two_replicas("gw-inv-", lambda v, _: invariant_values(v, redis.url)) as (a, b):
        yield redis, a, b


@dataclass(frozen=True)
class Shape:
    key: str
    replica: int
    api: str  # chat | responses
    model: str
    cap: int | None
    stream: bool
    n: int
    reply_words: int | None
    ignore_cap: bool
    usage_lie: int | None
    status: int | None  # provider error
    disconnect_after: int | None  # stream events read before the client goes away

    @property
    def honest(self) -> bool:
        return not (self.ignore_cap or self.usage_lie is not None or self.status or self.disconnect_after)


shapes = st.builds(
    Shape,
    key=st.sampled_from(NAMES),
    replica=st.integers(0, 1),
    api=st.sampled_from(["chat", "chat", "responses"]),
    model=st.sampled_from(["default-chat", "fallback-chat"]),
    cap=st.none() | st.integers(1, 5000),
    stream=st.booleans(),
    n=st.sampled_from([1, 1, 2, 3]),
    reply_words=st.none() | st.integers(1, 400),
    ignore_cap=st.booleans(),
    usage_lie=st.none() | st.integers(0, 20_000),
    status=st.sampled_from([None, None, None, 500, 429]),
    disconnect_after=st.none() | st.integers(1, 30),
)


async def send(client: httpx.AsyncClient, gws: tuple[Gateway, Gateway], s: Shape,
               extra_headers: dict[str, str] | None = None) -> tuple[int, int | None, str | None]:
    """(status, provider cost in nano$ when the client saw the provider's usage, error code)."""
    gw = gws[s.replica]
    headers = {"authorization": f"Bearer {KEYS[s.key]}", "x-mock-chunk-delay-ms": "2", **(extra_headers or {})}
    if s.reply_words:
        headers["x-mock-reply-words"] = str(s.reply_words)
    if s.ignore_cap:
        headers["x-mock-ignore-max-tokens"] = "1"
    if s.usage_lie is not None:
        headers["x-mock-usage-completion-tokens"] = str(s.usage_lie)
    if s.status:
        headers["x-mock-status"] = str(s.status)
    if s.api == "chat":
        path, body = "/v1/chat/completions", {"model": s.model, "messages": [{"role": "user", "content": "Hi"}],
                                              "n": s.n}
        if s.cap is not None:
            body["max_tokens"] = s.cap
        if s.stream:
            body["stream_options"] = {"include_usage": True}
    else:
        path, body = "/v1/responses", {"model": s.model, "input": "Hi"}
        if s.cap is not None:
            body["max_output_tokens"] = s.cap
    body["stream"] = s.stream
    usage: dict[str, Any] | None = None
    async with client.stream("POST", gw.url + path, json=body, headers=headers) as resp:
        if resp.status_code != 200 or not s.stream:
            raw = await resp.aread()
            if resp.status_code != 200:
                error = httpx.Response(200, content=raw).json().get("error")
                return resp.status_code, None, error.get("code") if isinstance(error, dict) else None
            usage = httpx.Response(200, content=raw).json().get("usage")
        else:
            seen = 0
            async for line in resp.aiter_lines():
                seen += 1
                if s.disconnect_after is not None and seen >= s.disconnect_after:
                    return resp.status_code, None, None  # leaves the block: the connection is closed mid-stream
                if '"usage":{' in line:
                    usage = httpx.Response(200, content=line.partition("data: ")[2]).json()
                    usage = usage.get("usage") or usage.get("response", {}).get("usage")
    if usage is None:
        return resp.status_code, None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return resp.status_code, cost_nano(PRICE, prompt, completion), None



def report(gw: Gateway, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[name]}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return {(b["level"], b["window"]): b for b in resp.json()["budgets"]}


def within_limits(gw: Gateway) -> tuple[dict[str, dict[tuple[str, str], dict[str, Any]]], dict[str, int]]:
    """Every key's usage report, each level checked within its limit, and each key's daily
    spend in nano-dollars."""
    reports = {name: report(gw, name) for name in NAMES}
    for levels in reports.values():
        for (level, window), b in levels.items():
            if b["limit_usd"] is not None:
                assert round(b["spent_usd"] * 1e9) <= round(b["limit_usd"] * 1e9), f"{level} {window} overspent"
    return reports, {name: round(levels[(f"key:{name}", "daily")]["spent_usd"] * 1e9)
                     for name, levels in reports.items()}


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(burst=st.lists(shapes, min_size=1, max_size=16))
def test_no_request_shape_or_burst_overspends_a_budget(setup: tuple[RedisServer, Gateway, Gateway],
                                                       burst: list[Shape]) -> None:
    redis, *gws = setup
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()  # a fresh day for every burst
    client.close()

    async def run() -> list[tuple[int, int | None, str | None]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(send(c, (gws[0], gws[1]), s) for s in burst))

    results = asyncio.run(run())
    nothing_held(redis)
    for (status, _, code), s in zip(results, burst):
        assert code not in OWN_FAILURES, f"the gateway failed {s}: {status} {code}"
        event(f"status {status} {code or ''}".strip())

    reports, key_spend = within_limits(gws[0])
    for name, levels in reports.items():
        assert levels[(f"key:{name}", "monthly")]["spent_usd"] == levels[(f"key:{name}", "daily")]["spent_usd"]
    any_levels = reports[NAMES[0]]
    assert round(any_levels[("team:inv", "daily")]["spent_usd"] * 1e9) == sum(key_spend.values())
    assert round(any_levels[("org:local", "daily")]["spent_usd"] * 1e9) == sum(key_spend.values())
    for name in NAMES:
        mine = [(r, s) for r, s in zip(results, burst) if s.key == name]
        if mine and all(s.honest and status in (200, 429) and (status == 429 or cost is not None)
                        for (status, cost, _), s in mine):
            assert key_spend[name] == sum(cost or 0 for (status, cost, _), _ in mine if status == 200)
