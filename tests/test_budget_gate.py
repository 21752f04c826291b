"""BudgetGate with an injected clock: calendar rollover, time zones, soft threshold, refusals."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_extproc import config, keys
from gateway_extproc.budgets.gate import BudgetGate
from gateway_extproc.budgets.pricing import cost_nano
from gateway_extproc.budgets.settlements import settled
from gateway_extproc.budgets.store import MemoryBudgetStore
from gateway_extproc.errors import GatewayError

KEY = keys.generate("k")


def cfg(tz: str = "UTC", key_budget: dict | None = None) -> config.GatewayConfig:
    return config.parse({
        "version": 1, "listen": ["unix:///tmp/x.sock"],
        "providers": [{"name": "p", "kind": "openai", "baseURL": "http://127.0.0.1:1/v1", "credential": {"env": "X"}}],
        "models": [{"name": "m", "tokenizer": "estimate", "maxOutputTokens": 100,
                    "backends": [{"provider": "p", "model": "pm", "pricing": {"input": 1000, "output": 1000}}]}],
        "budgets": {"timezone": tz},
        "teams": [{"name": "t", "budget": {"daily": 1, "monthly": 3, "soft": 0.5}}],
        "keys": [{"id": "k", "sha256": keys.digest(KEY), "team": "t", **({"budget": key_budget} if key_budget else {})}],
    })


class Clock:
    def __init__(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).timestamp()


def spend(gate: BudgetGate, c: config.GatewayConfig, prompt: int = 100, output: int = 400) -> int:
    """Admit and settle one request that costs exactly (prompt + output) * $0.001; return status."""
    async def go() -> int:
        try:
            admission = await gate.admit(gate.plan(c.keys["k"], c.models["m"], prompt, output))
        except GatewayError as err:
            return err.status
        gate.settle(admission, (prompt + output) * 1_000_000, prompt + output)
        await settled()
        return 200
    return asyncio.run(go())


def test_daily_budget_rolls_over_at_midnight_and_monthly_at_month_end() -> None:
    c = cfg()
    clock = Clock("2026-11-30T10:00:00+00:00")
    gate = BudgetGate(c, MemoryBudgetStore(), clock)
    assert [spend(gate, c) for _ in range(3)] == [200, 200, 429]  # $0.5 each, $1/day
    clock.set("2026-11-30T23:59:59+00:00")
    assert spend(gate, c) == 429
    clock.set("2026-12-01T00:00:01+00:00")  # new day and new month
    assert [spend(gate, c) for _ in range(3)] == [200, 200, 429]
    clock.set("2026-12-02T09:00:00+00:00")
    assert [spend(gate, c) for _ in range(3)] == [200, 200, 429]  # monthly: $2 of $3 used
    clock.set("2026-12-03T09:00:00+00:00")
    assert [spend(gate, c) for _ in range(3)] == [200, 200, 429]  # monthly: $3 of $3 used
    clock.set("2026-12-04T09:00:00+00:00")
    assert spend(gate, c) == 429  # a fresh day, but the month is spent


def test_windows_follow_the_configured_time_zone() -> None:
    c = cfg("America/New_York")
    clock = Clock("2026-11-24T04:30:00+00:00")  # 23:30 on the 23rd in New York
    gate = BudgetGate(c, MemoryBudgetStore(), clock)
    assert [spend(gate, c) for _ in range(3)] == [200, 200, 429]
    clock.set("2026-11-24T05:00:01+00:00")  # 00:00:01 on the 24th in New York
    assert spend(gate, c) == 200


def test_refusal_names_the_level_with_retry_after_until_reset() -> None:
    c = cfg(key_budget={"daily": 0.6})
    clock = Clock("2026-11-30T23:00:00+00:00")
    gate = BudgetGate(c, MemoryBudgetStore(), clock)
    assert spend(gate, c) == 200

    async def refused() -> GatewayError:
        with pytest.raises(GatewayError) as exc:
            await gate.admit(gate.plan(c.keys["k"], c.models["m"], 100, 400))
        return exc.value
    err = asyncio.run(refused())
    assert err.code == "budget_exceeded" and "key:k" in err.message
    assert err.headers["retry-after"] == "3600"
    assert err.headers["x-gateway-budget-remaining-usd"] == "0.1"


def test_soft_threshold_and_clamp_are_reported() -> None:
    c = cfg()
    gate = BudgetGate(c, MemoryBudgetStore(), Clock("2026-11-30T10:00:00+00:00"))
    assert spend(gate, c, 100, 500) == 200  # $0.6 of $1: above the 0.5 soft threshold

    async def admit():
        return await gate.admit(gate.plan(c.keys["k"], c.models["m"], 100, 1000))
    admission = asyncio.run(admit())
    assert admission.result.output_tokens == 300  # clamped: $0.4 left, $0.1 of it for the prompt
    headers = gate.response_headers(admission)
    assert headers["x-gateway-budget-warning"] == "team:t daily"
    assert headers["x-gateway-budget-remaining-usd"] == "0"


def test_tokens_used_per_window_are_tallied_for_usage_reports() -> None:
    c = cfg()
    clock = Clock("2026-11-30T10:00:00+00:00")
    gate = BudgetGate(c, MemoryBudgetStore(), clock)
    assert spend(gate, c, 100, 400) == 200
    assert spend(gate, c, 50, 50) == 200
    report = asyncio.run(gate.report(c.keys["k"]))
    assert report["tokens_used"] == {"daily": 600, "monthly": 600}
    clock.set("2026-12-01T00:00:01+00:00")
    assert asyncio.run(gate.report(c.keys["k"]))["tokens_used"] == {"daily": 0, "monthly": 0}


def test_tokens_used_keeps_its_windows_for_principals_whose_id_has_a_colon() -> None:
    """OIDC callers are `token:<issuer>` and workloads `workload:<name>`: the colon in their id
    once shifted the window out of the report (`{"dev": 0}` instead of daily and monthly)."""
    c = cfg()
    gate = BudgetGate(c, MemoryBudgetStore(), Clock("2026-11-30T10:00:00+00:00"))
    for principal in ("token:dev", "workload:demo-app"):
        key = dataclasses.replace(c.keys["k"], id=principal)
        assert asyncio.run(gate.report(key))["tokens_used"] == {"daily": 0, "monthly": 0}


def test_reservation_ids_are_unique_within_a_process_and_across_a_fork() -> None:
    import os

    from gateway_extproc.budgets.gate import reservation_id

    ids = {reservation_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's ids must not repeat the parent's sequence
        os.write(write, ",".join(reservation_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = set(os.read(read, 1 << 20).decode().split(","))
    os.close(read)
    assert len(child) == 100 and not child & (ids | {reservation_id() for _ in range(100)})


def test_a_reserve_whose_caller_is_cancelled_is_cancelled_in_the_store() -> None:
    """Envoy resets the stream (client gone, message timeout) while the reserve is in flight:
    the reserve may still land with nobody left to settle it, so it is settled at $0."""
    class SlowStore(MemoryBudgetStore):
        async def reserve(self, request):  # type: ignore[no-untyped-def]
            result = await super().reserve(request)  # lands in the store...
            await asyncio.sleep(10)  # ...but the reply is slow to come back
            return result

    c = cfg()
    store = SlowStore()
    gate = BudgetGate(c, store, Clock("2026-03-01T12:00:00+00:00"))

    async def go() -> int:
        plan = gate.plan(c.keys["k"], c.models["m"], 100, 400)
        admitting = asyncio.ensure_future(gate.admit(plan))
        await asyncio.sleep(0.05)
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        await settled()
        return (await store.usage(list(plan.request.limits), [], plan.request.now_ms)).held
    assert asyncio.run(go()) == 0


def cache_cfg(kinds: tuple[str, ...]) -> config.GatewayConfig:
    """A model with one backend of each kind, priced like Claude: by default where it is
    Claude, named where it is an OpenAI-compatible server in front of Claude (OpenRouter)."""
    return config.parse({
        "version": 1, "listen": ["unix:///tmp/x.sock"],
        "providers": [{"name": kind, "kind": kind, "baseURL": "http://127.0.0.1:1/v1", "credential": {"env": "X"},
                       **({"apiVersion": "2024-10-21"} if kind == "azure" else {}),
                       **({"region": "us-east-1"} if kind == "bedrock" else {})} for kind in kinds],
        "models": [{"name": "m", "tokenizer": "estimate", "maxOutputTokens": 100, "backends": [
            {"provider": kind, "model": "pm", "priority": i, "pricing": {
                "input": 3, "output": 15, "cachedInput": 0.3,
                **({} if kind in config.CLAUDE_WRITE_PRICES else {"cacheWrite": 3.75, "cacheWrite1h": 6})}}
            for i, kind in enumerate(kinds)]}],
        "budgets": {}, "teams": [{"name": "t", "budget": {"daily": 1000}}],
        "keys": [{"id": "k", "sha256": keys.digest(KEY), "team": "t"}],
    })


@given(prompt=st.integers(0, 300_000), predicted=st.integers(0, 1000), ttl=st.sampled_from(["5m", "1h"]),
       kinds=st.sampled_from([("openai",), ("azure", "anthropic"), ("anthropic", "openai"), ("bedrock",),
                              ("gemini", "anthropic"), ("bedrock", "gemini")]), data=st.data())
@settings(max_examples=200, deadline=None)
def test_a_request_with_cache_markers_reserves_every_bill_its_writes_can_make(prompt, predicted, ttl, kinds, data):
    """Whatever share of the prompt a backend that gets the markers writes (with the 1-hour TTL
    only when the request can ask for it), its bill for the prompt fits the reservation."""
    c = cache_cfg(kinds)
    plan = BudgetGate(c, MemoryBudgetStore()).plan(c.keys["k"], c.models["m"], prompt, 100, 1, predicted, ttl)
    written = data.draw(st.integers(0, prompt))
    long = data.draw(st.integers(0, written)) if ttl == "1h" else 0
    read = data.draw(st.integers(0, prompt - written))
    for backend in c.models["m"].backends:
        assert cost_nano(backend.price, prompt, predicted, read, written, long) <= plan.request.prompt_cost_nano


def test_cache_markers_cost_nothing_more_where_no_backend_gets_them() -> None:
    """Gemini backends get a body the gateway built, without the client's markers; Claude,
    Converse and OpenAI-schema backends get them (Claude's write prices by default)."""
    c = cache_cfg(("gemini",))
    gate = BudgetGate(c, MemoryBudgetStore())
    plain, marked = (gate.plan(c.keys["k"], c.models["m"], 1000, 100, cache_writes=t).request.prompt_cost_nano
                     for t in (None, "1h"))
    assert plain == marked == 1000 * 3000
    for kinds in (("openai",), ("anthropic",), ("bedrock",), ("gemini", "bedrock")):
        c = cache_cfg(kinds)
        gate = BudgetGate(c, MemoryBudgetStore())
        assert [gate.plan(c.keys["k"], c.models["m"], 1000, 100, cache_writes=t).request.prompt_cost_nano
                for t in (None, "5m", "1h")] == [1000 * 3000, 1000 * 3750, 1000 * 6000], kinds
