"""Admission by reservation: config -> one reservation per request -> the store -> a decision.

Every level that applies (org, team, user, key; daily and monthly) and every rate-limit
bucket (key and team, optionally per model) goes into ONE `ReserveRequest`, so admission is
one store round trip whatever the number of levels. The worst-case cost is priced at the
most expensive backend of the model, since Envoy may fall back to any of them; settlement
uses the backend that actually answered.

When the shared store is unreachable, a request whose checks are all `onStoreError: open`
is admitted against this process's own `MemoryBudgetStore` (each replica then enforces the
full limits on its own traffic only); any `closed` check makes it a 503. A reserve whose
reply was lost may still have been applied, so it is cancelled (settled at $0, which is a
no-op if it never landed) through the same retried queue as settlements.

A budget is charged at most what was reserved: every request carries an output cap its
reservation covers (caps.py), so an honest provider cannot cost more. A provider that
bills past the cap it was sent is charged to the budget at the reservation, and the
excess is reported (`over_reservation` event, `budget_over_reservation` log line) rather
than silently pushing the budget over its limit.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import structlog

from ..config import BudgetSpec, Budgets, GatewayConfig, Limits, Model, VirtualKey
from ..errors import GatewayError
from ..providers import CACHE_MARKED
from .pricing import Price, cost_nano, worst
from .store import (MAX_NANO, Bucket, BudgetStore, BudgetStoreUnavailable, Limit, MemoryBudgetStore,
                    ReserveRequest, ReserveResult)
from ..telemetry.metrics import BUDGET_EVENTS, BUDGET_RESERVATIONS_EXPIRED, OTHER, REDIS_LATENCY, child
from .settlements import Settlement, Settlements
from .windows import Window, current_windows, day_span

log = structlog.get_logger("gateway_extproc.budgets")
NANO = 1_000_000_000
_MAX_SHAPES = 100_000  # cached (principal, model) shapes before the cache starts over


class _ReservationIds:
    """Reservation ids unique across processes and replicas without a syscall per request
    (uuid4 reads /dev/urandom each time): 96 random bits drawn at process start (and again
    in a forked child), then a counter."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix, self._seq = os.urandom(12).hex(), itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._seq):x}"


reservation_id = _ReservationIds()


@dataclass(frozen=True, slots=True)
class Level:
    name: str  # "team:demo"
    window: Window
    limit: Limit


@dataclass(frozen=True, slots=True)
class Plan:
    request: ReserveRequest
    levels: tuple[Level, ...]
    price: Price  # worst-case price the reservation used
    fail_open: bool  # every check may fall back to the local limiter


@dataclass(frozen=True, slots=True)
class _Shape:
    levels: tuple[Level, ...]
    limits: tuple[Limit, ...]
    token_buckets: tuple[Bucket, ...]
    request_buckets: tuple[Bucket, ...]
    price: Price
    # The worst price of the backends that get the client's prompt-cache markers (None: no
    # backend does), for a request that carries some.
    write_price: Price | None
    fail_open: bool
    tallies: tuple[Limit, ...]


@dataclass(frozen=True, slots=True)
class Admission:
    plan: Plan
    result: ReserveResult
    store: BudgetStore


def usd(nano: int) -> str:
    return f"{nano / NANO:.6f}".rstrip("0").rstrip(".") if nano else "0"


class BudgetGate:
    def __init__(self, cfg: GatewayConfig, store: BudgetStore, clock: Callable[[], float] = time.time) -> None:
        assert cfg.budgets is not None
        self.cfg = cfg
        self.settings: Budgets = cfg.budgets
        self.store = store
        self.local = MemoryBudgetStore()
        self.settlements = Settlements()
        self.clock = clock
        self._shapes: dict[tuple[str, str, str | None, str], tuple[str, _Shape]] = {}
        self._day = ("", 0.0, 0.0)  # the local day of the last request: id, start, end (Unix s)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    # -- planning (pure) -----------------------------------------------------------------

    def principals(self, key: VirtualKey) -> list[tuple[str, Limits | None, BudgetSpec | None]]:
        s = self.settings
        team = self.cfg.teams.get(key.team)
        user = self.cfg.users.get(key.user) if key.user else None
        return [
            (f"org:{s.org}", None, s.org_budget),
            (f"team:{key.team}", team, team.budget if team else None),
            (f"user:{key.user}", user, user.budget if user else None),
            # Key spend is always tracked (an unlimited level) so /v1/usage can report it.
            (f"key:{key.id}", key.limits, key.limits.budget or BudgetSpec(None, None, None, True)),
        ]

    def levels(self, key: VirtualKey, now: datetime) -> list[tuple[Level, bool]]:
        out = []
        for window in current_windows(now, self.settings.timezone):
            for name, _, spec in self.principals(key):
                if spec is None:
                    continue
                amount = spec.daily_nano if window.kind == "daily" else spec.monthly_nano
                if amount is None and not name.startswith("key:"):
                    continue
                limit_nano = MAX_NANO if amount is None else amount
                soft = int(limit_nano * spec.soft) if spec.soft and amount is not None else None
                limit = Limit(f"{name}:{window.kind}:{window.id}", limit_nano, soft, window.ttl_s(now))
                out.append((Level(name, window, limit), spec.fail_open))
        return out

    def buckets(self, key: VirtualKey, model: Model) -> tuple[list[Bucket], list[Bucket], bool]:
        tokens, requests, fail_open = [], [], True
        for prefix, limits in ((f"key:{key.id}", key.limits), (f"team:{key.team}", self.cfg.teams.get(key.team))):
            if limits is None:
                continue
            for scope, spec in ((prefix, limits.rate), (f"{prefix}:model:{model.name}", limits.model_rates.get(model.name))):
                if spec is None:
                    continue
                fail_open &= spec.fail_open
                if spec.tokens_per_minute:
                    tokens.append(Bucket.per_minute(f"{scope}:tpm", spec.tokens_per_minute))
                if spec.requests_per_minute:
                    requests.append(Bucket.per_minute(f"{scope}:rpm", spec.requests_per_minute))
        return tokens, requests, fail_open

    def plan(self, key: VirtualKey, model: Model, prompt_tokens: int, wanted_output: int, choices: int = 1,
             billed_output: int = 0, cache_writes: str | None = None, min_output: int = 0) -> Plan:
        """`wanted_output` covers all `choices`; each must get at least `minOutputTokens`.
        `billed_output`: tokens of the request billed at the output price whatever the cap
        (a chat `prediction`'s rejected tokens), reserved beside the prompt. `cache_writes`
        ("5m", "1h": api.cache_writes): the request carries prompt-cache markers, so a backend
        that gets them may write the whole prompt to its cache, billed at its cache-write price.
        `min_output`: fewer output tokens than this would make the request fail at the provider
        (Claude's thinking budget + 1), so the budget grants at least that many or refuses."""
        now = self.now()
        shape = self.shape(key, model, now)
        price = shape.price.for_prompt(prompt_tokens)
        prompt_cost = cost_nano(price, prompt_tokens, billed_output)
        if cache_writes is not None and shape.write_price is not None:
            write = shape.write_price.for_prompt(prompt_tokens)
            prompt_cost = max(prompt_cost, cost_nano(write, prompt_tokens, billed_output, 0, prompt_tokens),
                              cost_nano(write, prompt_tokens, billed_output, 0, prompt_tokens, prompt_tokens)
                              if cache_writes == "1h" else 0)
        request = ReserveRequest(
            reservation_id=reservation_id(), limits=shape.limits, token_buckets=shape.token_buckets,
            request_buckets=shape.request_buckets, prompt_tokens=prompt_tokens + billed_output,
            prompt_cost_nano=prompt_cost, output_price_nano=math.ceil(price.output),
            output_tokens_wanted=wanted_output,
            min_output_tokens=min(max(self.settings.min_output_tokens * choices, min_output), wanted_output),
            reservation_ttl_s=self.settings.reservation_ttl_s, now_ms=int(now.timestamp() * 1000),
            tallies=shape.tallies)
        return Plan(request, shape.levels, price, shape.fail_open)

    def tallies(self, key: VirtualKey, now: datetime) -> tuple[Limit, ...]:
        """The key's tokens-used counters, one per window."""
        return tuple(Limit(f"tokens:key:{key.id}:{w.kind}:{w.id}", MAX_NANO, None, w.ttl_s(now))
                     for w in current_windows(now, self.settings.timezone))

    def shape(self, key: VirtualKey, model: Model, now: datetime) -> _Shape:
        """Levels, buckets and worst price of (key, model) in the current windows; built once
        per day per pair, since only the calendar changes it. (Counter TTLs computed at the
        first request of a window run at most a day long, which is harmless.)"""
        ts, (day, start, end) = now.timestamp(), self._day
        if not start <= ts < end:  # a new day (or a clock set back): the calendar is asked again
            day, start, end = self._day = day_span(now, self.settings.timezone)
        # The principal's team and user are part of the shape: a workload's id is shared by
        # every end user whose token it carries (docs/identity.md).
        pair = (key.id, key.team, key.user, model.name)
        cached = self._shapes.get(pair)
        if cached is not None and cached[0] == day:
            return cached[1]
        levels = self.levels(key, now)
        tokens, requests, buckets_open = self.buckets(key, model)
        marked = [b.price for b in model.backends if b.price is not None and b.provider.kind in CACHE_MARKED]
        shape = _Shape(tuple(lv for lv, _ in levels), tuple(lv.limit for lv, _ in levels), tuple(tokens),
                       tuple(requests), worst(b.price for b in model.backends if b.price is not None),
                       worst(marked) if marked else None,
                       buckets_open and all(open_ for _, open_ in levels), self.tallies(key, now))
        if len(self._shapes) >= _MAX_SHAPES:  # token users are unbounded over time
            self._shapes.clear()
        self._shapes[pair] = (day, shape)
        return shape

    # -- store ---------------------------------------------------------------------------

    async def admit(self, plan: Plan, team: str = OTHER) -> Admission:
        """Reserve, or raise the GatewayError to answer with. `team` is the bounded metric label."""
        store: BudgetStore = self.store
        try:
            if isinstance(store, MemoryBudgetStore):  # no round trip to time
                result = await store.reserve(plan.request)
            else:
                with child(REDIS_LATENCY, "reserve").time():
                    result = await store.reserve(plan.request)
        except asyncio.CancelledError:
            # Envoy reset the stream (client gone, message timeout) while the reserve was in
            # flight: it may still land, with nobody left to settle it. Cancel it.
            self.settlements.submit(Settlement(store, plan.request, 0, 0, int(self.clock() * 1000)))
            raise
        except BudgetStoreUnavailable as e:
            self.settlements.submit(Settlement(store, plan.request, 0, 0, int(self.clock() * 1000)))
            if not plan.fail_open:
                log.warning("budget_store_unavailable", fallback="closed", reason=str(e),
                            reservation=plan.request.reservation_id)
                child(BUDGET_EVENTS, team, "store_unavailable_closed").inc()
                raise GatewayError("budget_store_unavailable",
                                   "The budget store is unreachable and this key's budgets fail closed; "
                                   "retry shortly.") from None
            log.warning("budget_store_unavailable", fallback="local", reason=str(e))
            child(BUDGET_EVENTS, team, "store_unavailable_open").inc()
            store = self.local
            result = await store.reserve(plan.request)
        if result.expired:
            BUDGET_RESERVATIONS_EXPIRED.inc(result.expired)
        if not result.admitted:
            err = self.refusal(plan, result)
            child(BUDGET_EVENTS, team, err.code).inc()
            log.info("budget_refused", code=err.code, refused_by=result.refused_by)
            raise err
        if result.output_tokens < plan.request.output_tokens_wanted:
            child(BUDGET_EVENTS, team, "clamped").inc()
        if result.soft_exceeded:
            child(BUDGET_EVENTS, team, "soft_threshold").inc()
            log.info("budget_soft_threshold", levels=list(result.soft_exceeded))
        return Admission(plan, result, store)

    def settle(self, admission: Admission, cost: int, tokens: int, team: str = OTHER) -> None:
        """Charge what the request cost (at most its reservation; see the module doc), in
        the background, retried until the store has it. `tokens` = prompt + completion."""
        reserved = admission.result.reserved_nano
        if cost > reserved:
            child(BUDGET_EVENTS, team, "over_reservation").inc()
            log.warning("budget_over_reservation", reservation=admission.plan.request.reservation_id,
                        cost_nano=cost, reserved_nano=reserved)
        self.settlements.submit(Settlement(admission.store, admission.plan.request, min(cost, reserved), tokens,
                                           int(self.clock() * 1000)))

    def refusal(self, plan: Plan, result: ReserveResult) -> GatewayError:
        headers = rate_headers(plan.request, result)
        level = next((lv for lv in plan.levels if lv.limit.key == result.refused_by), None)
        if level is not None:
            now = self.now()
            headers["retry-after"] = str(math.ceil(level.window.seconds_until_reset(now)))
            headers["x-gateway-budget-remaining-usd"] = usd(result.remaining_nano.get(level.limit.key, 0))
            return GatewayError(
                "budget_exceeded",
                f"The {level.window.kind} budget of {level.name} (${usd(level.limit.limit_nano)}) cannot cover "
                f"this request; it resets at {level.window.ends_at.isoformat()}.", headers=headers)
        unit = "tokens" if (result.refused_by or "").endswith(":tpm") else "requests"
        if result.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(result.retry_after_s)))
        return GatewayError("rate_limited", f"Rate limit reached: {unit} per minute for "
                            f"{(result.refused_by or '').rsplit(':', 1)[0]}.", headers=headers)

    def response_headers(self, admission: Admission) -> dict[str, str]:
        """Remaining budget (the tightest level) and soft-threshold warnings for a 2xx."""
        r = admission.result
        headers = rate_headers(admission.plan.request, r)
        limited = [lv for lv in admission.plan.levels if lv.limit.limit_nano < MAX_NANO]
        if limited:
            tight = min(limited, key=lambda lv: r.remaining_nano.get(lv.limit.key, 0))
            headers["x-gateway-budget-remaining-usd"] = usd(r.remaining_nano.get(tight.limit.key, 0))
        if r.soft_exceeded:
            names = [lv for lv in admission.plan.levels if lv.limit.key in r.soft_exceeded]
            headers["x-gateway-budget-warning"] = ", ".join(f"{lv.name} {lv.window.kind}" for lv in names)
        return headers

    async def report(self, key: VirtualKey) -> dict:
        """The caller's own spend and remaining budget per level and window (`GET /v1/usage`)."""
        now = self.now()
        levels = [lv for lv, _ in self.levels(key, now)]
        buckets = []
        for model in self.cfg.models.values():
            tokens, requests, _ = self.buckets(key, model)
            buckets += [b for b in tokens + requests if b not in buckets]
        tallies = self.tallies(key, now)
        try:
            with child(REDIS_LATENCY, "usage").time():
                usage = await self.store.usage([*(lv.limit for lv in levels), *tallies], buckets,
                                               int(now.timestamp() * 1000))
        except BudgetStoreUnavailable:
            raise GatewayError("budget_store_unavailable", "The budget store is unreachable; retry shortly.") from None
        if usage.expired:
            BUDGET_RESERVATIONS_EXPIRED.inc(usage.expired)
        return {
            "object": "usage", "key_id": key.id, "team": key.team, "user": key.user,
            "budgets": [{
                "level": lv.name, "window": lv.window.kind, "period": lv.window.id,
                "limit_usd": None if lv.limit.limit_nano >= MAX_NANO else lv.limit.limit_nano / NANO,
                "spent_usd": usage.used_nano[lv.limit.key] / NANO,
                "remaining_usd": None if lv.limit.limit_nano >= MAX_NANO else usage.remaining_nano[lv.limit.key] / NANO,
                "resets_at": lv.window.ends_at.isoformat()} for lv in levels],
            # The window kind counted from the right: a principal's id may hold colons (`token:dev`).
            "tokens_used": {t.key.rsplit(":", 2)[1]: usage.used_nano[t.key] for t in tallies},
            "rate_limits": [{"bucket": b.key, "limit_per_minute": b.capacity, "remaining": usage.tokens_remaining[b.key]}
                            for b in buckets],
        }


def rate_headers(request: ReserveRequest, result: ReserveResult) -> dict[str, str]:
    """OpenAI-style `x-ratelimit-*-tokens` headers for the tightest token bucket."""
    if not request.token_buckets:
        return {}
    tight = min(request.token_buckets, key=lambda b: result.tokens_remaining.get(b.key, b.capacity))
    remaining = result.tokens_remaining.get(tight.key, tight.capacity)
    return {"x-ratelimit-limit-tokens": str(tight.capacity), "x-ratelimit-remaining-tokens": str(max(0, remaining)),
            "x-ratelimit-reset-tokens": f"{math.ceil((tight.capacity - max(0, remaining)) / tight.refill_per_s)}s"}

