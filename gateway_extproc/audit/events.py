"""What an audit event holds: pure functions from what the router decided to a flat dict.

Built on the request path, so they only read attributes the router already has; the writer
thread serializes them. Content is exactly what the access log may carry
(`RouterProcessor.logged_content`: only for tiers the content-logging rule allows; the prompt
as forwarded, after redaction, and the response text as the client got it, after the
response guard redacted it). Admin events come from the key admin API in `serve`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..usage import Usage

if TYPE_CHECKING:
    from ..config import Backend, GatewayConfig
    from ..processors.router import Consumed, RouterProcessor

BLOCKING_CODES = frozenset({"content_blocked", "classification_violation"})
# The provider failed (Envoy's codes for its resets, timeouts and unavailability, and the
# router's for a stream it broke off): the gateway admitted the request, and charges what the
# provider may have billed, so a chargeback report must not count it as refused.
NOT_A_REFUSAL = frozenset({"upstream_stream_interrupted", "upstream_reset", "upstream_timeout", "upstream_unavailable",
                           "upstream_overloaded", "upstream_response_too_large"})


def decision(p: "RouterProcessor") -> str:
    code = p.error_code
    if code in BLOCKING_CODES:
        return "blocked"
    if code is not None and code not in NOT_A_REFUSAL:
        return "refused"
    if p.cut:
        return "cut"
    if p.redacted:
        return "redacted"
    return "admitted"


def reasons(p: "RouterProcessor") -> list[str]:
    out = [p.error_code] if p.error_code else []
    if p.redacted:
        out.append("request_redacted")
    if p.clamped is not None:
        out.append("max_tokens_clamped")
    if p.cut:
        out.append("budget_stream_cut")
    return out


def request_event(p: "RouterProcessor", backend: "Backend | None", outcome: str, spent: "Consumed",
                  content: dict[str, str]) -> dict[str, Any]:
    """`spent` and `content` as the access line and the metrics have them (computed once per
    request): the tokens and cost are the very numbers `genai_tokens_total` and
    `genai_request_cost_dollars_total` were incremented with, so the chargeback report
    reconciles with Prometheus. Tokens only when a provider may have processed the request
    (none for a refusal or a provider's error: nothing was billed); a client gone before the
    provider's usage came is on the record with what it was charged (the reservation)."""
    usage = p.usage or Usage()
    key = p.key
    ev: dict[str, Any] = {
        "type": "request", "ts": time.time(), "tier": p.tier, "decision": decision(p), "reasons": reasons(p),
        "request_id": p.request_id, "key_id": key.id if key else None, "team": key.team if key else None,
        "user": key.user if key else None, "method": p.method, "path": p.path,
        "endpoint": p.endpoint.name if p.endpoint else None,
        "model": p.model.name if p.model else p.requested, "backend": p.backend,
        "provider": backend.provider.name if backend else None, "status": p.status, "outcome": outcome,
        "stream": p.stream,
        "input_tokens": spent.prompt if spent.processed else None,
        "output_tokens": spent.completion if spent.processed else None,
        "cached_tokens": usage.cached_tokens, "cache_write_tokens": usage.cache_write_tokens, "cost_nano": spent.cost,
        "config": p.runtime.config.digest[:16],
    }
    ev.update(content)
    return ev


def config_event(cfg: "GatewayConfig", action: str) -> dict[str, Any]:
    return {"type": "config", "ts": time.time(), "action": action, "config_sha256": cfg.digest, "path": cfg.source,
            "models": len(cfg.models), "keys": len(cfg.keys), "teams": len(cfg.teams)}


def config_rejected_event(path: str, error: str) -> dict[str, Any]:
    return {"type": "config", "ts": time.time(), "action": "rejected", "path": path, "error": error[:2000]}


def admin_event(actor: str | None, action: str, key_id: str | None, config: str | None,
                details: dict[str, Any]) -> dict[str, Any]:
    """A key admin API call that changed a key, or was refused for its credential: who (the
    admin's name from identity.keyAdmin.admins; None when refused), what, which key id (never
    the secret or its hash), and the config version the call was checked against."""
    return {"type": "admin", "ts": time.time(), "actor": actor, "action": action, "key_id": key_id,
            "config": config, **details}
