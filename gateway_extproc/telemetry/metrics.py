"""Every Prometheus metric the gateway exports, with its fixed label set.

Label values come only from config (teams, models, providers, backends, rules); anything
else collapses to `other`, so the number of series is bounded by the size of the config,
never by traffic. Per-tenant detail beyond that belongs in logs and traces.

Each ext_proc process keeps these as plain numbers in its own memory (telemetry/counters.py:
an increment is one add, not prometheus-client's multiprocess file write) and the `serve`
parent sums them across its workers on each scrape of its one `/metrics` endpoint
(telemetry/export.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from .counters import Counter, Gauge, Histogram

OTHER = "other"
_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_TTFT = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

REQUESTS = Counter("genai_requests", "Requests by outcome.", ["team", "model", "provider", "status_class"])
TOKENS = Counter("genai_tokens", "Tokens by type (input, output, cached, cache_write).", ["team", "model", "type"])
COST = Counter("genai_request_cost_dollars", "Dollar cost of requests at configured prices.", ["team", "model"])
# Per pod, under its own name: every pod exports the same limit, so N pods give N series per
# team. The chart's recording rule (files/prometheus-rules.yaml) turns them into the one
# genai_team_daily_budget_dollars series per team that the article's alert matches against.
TEAM_DAILY_BUDGET = Gauge("genai_gateway_team_daily_budget_dollars", "A team's configured daily budget, as this "
                          "pod holds it.", ["team"], merge="max")
TEAM_DAILY_REMAINING = Gauge("genai_team_daily_budget_remaining_dollars",
                             "A team's remaining daily budget as last seen by the gateway.", ["team"],
                             merge="mostrecent")
TTFT = Histogram("genai_time_to_first_token_seconds", "Time from request to first response byte (streams).",
                 ["model"], buckets=_TTFT)
TPOT = Histogram("genai_time_per_output_token_seconds", "Generation time per output token after the first.",
                 ["model"], buckets=_TPOT)
DURATION = Histogram("genai_request_duration_seconds", "Whole-request duration.", ["model", "status_class"],
                     buckets=_LATENCY)
BUDGET_EVENTS = Counter("genai_budget_events", "Budget and rate-limit decisions other than a plain admit: "
                        "soft_threshold, clamped, budget_exceeded, rate_limited, store_unavailable_open, "
                        "store_unavailable_closed, stream_cut, over_reservation.", ["team", "event"])
# Settlement outcomes: settled (first try or after retries), late (the reservation had
# expired and was corrected), nothing (settled before), queued (the store was unreachable;
# retried in the background), dropped (the retry queue was full; the reservation expires
# and stays charged at its worst case).
BUDGET_SETTLEMENTS = Counter("genai_budget_settlements", "Budget settlements by outcome.", ["outcome"])
BUDGET_SETTLEMENTS_PENDING = Gauge("genai_budget_settlements_pending",
                                   "Settlements waiting for the budget store to come back.",
                                   merge="livesum")
BUDGET_RESERVATIONS_EXPIRED = Counter("genai_budget_reservations_expired",
                                      "Reservations whose deadline passed unsettled; each stays charged at its "
                                      "reserved worst case until a late settlement corrects it.")
GUARDRAIL_TRIGGERS = Counter("genai_guardrail_triggers", "Policy rule matches by action taken.",
                             ["rule", "action", "team", "mode"])
# The provider's prompt cache, as its usage reports it: one lookup per successful request
# whose usage says how many input tokens were cached (hit: some were).
CACHE_REQUESTS = Counter("genai_cache_requests", "Provider prompt-cache lookups by result.", ["result"])
UPSTREAM_ATTEMPTS = Counter("genai_upstream_attempts", "Provider attempts by backend and outcome.",
                            ["backend", "outcome"])
REDIS_LATENCY = Histogram("genai_gateway_redis_latency_seconds", "Budget store round trips.", ["op"],
                          buckets=_FAST)
CONFIG_RELOADS = Counter("genai_gateway_config_reloads", "gateway.yaml reloads by result (applied, rejected).",
                         ["result"])
# Whether the file on disk is the config in force, as Prometheus's own
# prometheus_config_last_reload_successful: the counter above says a change was rejected,
# this says the current file still is. Every worker reloads the file itself; `min` over a
# pod's live workers makes the pod 0 while any one of them refuses it, and its timestamp the
# oldest config in force there.
CONFIG_LAST_RELOAD_SUCCESSFUL = Gauge("genai_gateway_config_last_reload_successful",
                                      "Whether the last gateway.yaml load worked (1) or the file on disk was "
                                      "rejected and an older config is in force (0).", merge="min")
CONFIG_LAST_RELOAD_SUCCESS_TIME = Gauge("genai_gateway_config_last_reload_success_timestamp_seconds",
                                        "Unix time of the last gateway.yaml load that worked (start-up or "
                                        "reload): when the config in force was loaded.", merge="min")
AUDIT_EVENTS = Counter("genai_audit_events", "Audit events by result: written, dropped (queue full or disk "
                       "error; the chain records the count), ship_failed (Redis Stream copy only).", ["result"],
                       threads=True)  # also counted by the audit writer thread
PHASE_LATENCY = Histogram("genai_gateway_extproc_phase_seconds", "ext_proc time per processing phase.",
                          ["phase"], buckets=_FAST)
# Bugs caught by the stream loop (server.py): the request was refused or passed through
# unprocessed. Nothing else counts them: the access line may never be written.
EXTPROC_ERRORS = Counter("genai_gateway_extproc_errors", "Unexpected ext_proc exceptions by processing phase.",
                         ["phase"])


@lru_cache(maxsize=8192)
def attempt_outcome(status: int) -> str:
    """An attempt's outcome for genai_upstream_attempts_total: what the backend did, not
    what the client ended up seeing (0: no answer at all, a reset or a per-try timeout)."""
    if 0 < status < 400:
        return "success"
    if status == 429:
        return "throttled"
    if 400 <= status < 500:
        return "rejected"
    return "error"


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`: one dict lookup (label values are bounded by config)."""
    return metric.labels(*values)


class Bounded:
    """Maps a label value to itself when config knows it, else to `other`."""

    __slots__ = ("_known",)

    def __init__(self, known: Iterable[str]) -> None:
        self._known = frozenset(known)

    def __call__(self, value: str | None) -> str:
        return value if value in self._known else OTHER


_STATUS_CLASSES = {status: f"{status // 100}xx" for status in range(100, 600)}


def status_class(status: int) -> str:
    return _STATUS_CLASSES.get(status, OTHER)


class Labels:
    """Bounded label mappers built once from config."""

    __slots__ = ("team", "model", "provider", "backend")

    def __init__(self, teams: Iterable[str], models: Iterable[str], providers: Iterable[str],
                 backends: Iterable[str]) -> None:
        self.team, self.model = Bounded(teams), Bounded(models)
        self.provider, self.backend = Bounded(providers), Bounded(backends)


def record_request(labels: Labels, *, team: str | None, model: str | None, provider: str | None, status: int,
                   prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None,
                   duration_s: float, ttft_s: float | None, generated_tokens: int | None = None,
                   cache_write_tokens: int | None = None) -> None:
    """One finished request, as the access log line saw it. `completion_tokens` is what it is
    charged for (the reservation's worst case when the provider's usage never came);
    `generated_tokens` the output the provider reported, the only count time per output
    token may divide by."""
    t, m = labels.team(team), labels.model(model)
    sc = status_class(status)
    child(REQUESTS, t, m, labels.provider(provider), sc).inc()
    for kind, value in (("input", prompt_tokens), ("output", completion_tokens), ("cached", cached_tokens),
                        ("cache_write", cache_write_tokens)):
        if value:
            child(TOKENS, t, m, kind).inc(value)
    if cached_tokens is not None and sc == "2xx":
        child(CACHE_REQUESTS, "hit" if cached_tokens else "miss").inc()
    child(DURATION, m, sc).observe(duration_s)
    # Streams that succeeded only: a provider's error body (a fast 503, a slow 504) is no first
    # token, and would pull the TTFT alert's p95 wherever errors happen to be.
    if ttft_s is not None and sc == "2xx":
        child(TTFT, m).observe(ttft_s)
        if generated_tokens and generated_tokens > 1:
            child(TPOT, m).observe(max(duration_s - ttft_s, 0.0) / (generated_tokens - 1))
