"""Classification and guardrails applied to one request and its response.

Config (`classification:` in gateway.yaml) compiles once into a `Policy`: one Scanner for all
rules (a single pass per body), the tier order, the allowlist. Per request the router calls
`check_request` on the parsed body, which answers with everything it must do: refuse (403),
the tier, which backends are eligible, the redacted body. `ResponseGuard` scans what comes
back (a JSON body, or SSE events through a bounded hold-back window).

A request's tier is the highest of: the key's and team's default tier, a declared
`x-data-classification` header (only keys with `mayDeclare`), and the tiers of what the
scanner found (including values it then redacts: redaction is a second layer, not a
licence). Only backends approved up to that tier are eligible; Envoy routes to a cluster
holding just those, so fallback never escalates to a lower-tier backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog

from ..config import Backend, Classification, Limits, Model, VirtualKey
from ..errors import GatewayError
from ..telemetry import metrics
from ..usage import STREAM_ENDS
from .scanner import (DEFAULT_RULES, MODES, AllowEntry, CustomRule, Decision, DecisionParams, InjectionConfig,
                      LimitExceeded, PlaceholderMap, Scanner, map_strings, redact_strings, walk_strings)
from .stream import StreamRedactor

log = structlog.get_logger("gateway_extproc.policy")
CONTENT_LOG_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Verdict:
    tier: str
    mode: str
    eligible: tuple[Backend, ...]
    body: dict[str, Any] | None  # the redacted body, when something was redacted
    params: DecisionParams


class Policy:
    def __init__(self, cfg: Classification) -> None:
        self.cfg = cfg
        self.rank = {t: i for i, t in enumerate(cfg.tiers)}
        rules = [replace(rule, action=o.get("action", rule.action), min_tier=o.get("minTier", rule.min_tier),
                         critical=o.get("critical", rule.critical))
                 for rule in DEFAULT_RULES for o in [cfg.rules.get(rule.name, {})]]
        custom = [CustomRule.from_mapping({**c, "min_tier": c.get("minTier"), "ignore_case": c.get("ignoreCase", False)})
                  for c in cfg.custom]
        inj = cfg.injection or {}
        injection = InjectionConfig.from_mapping({
            "phrases": inj.get("phrases"), "patterns": inj.get("patterns"), "threshold": inj.get("threshold", 1.0),
            "include_defaults": inj.get("includeDefaults", True)})
        self.scanner = Scanner.compile(rules, custom, injection, tiers=cfg.tiers).prepare()  # at config load
        self.allowlist = tuple(AllowEntry.from_mapping(e) for e in cfg.allowlist)
        self._params = {m: DecisionParams(mode=m, allowlist=self.allowlist, tiers=cfg.tiers) for m in MODES}

    def top(self, *tiers: str | None) -> str:
        return max((t for t in tiers if t), key=self.rank.__getitem__, default=self.cfg.tiers[0])

    def check_request(self, body: dict[str, Any], key: VirtualKey, team: Limits | None, declared: str | None,
                      model: Model, team_label: str) -> Verdict:
        mode = key.limits.policy.mode or (team.policy.mode if team else None) or self.cfg.mode
        params = self._params[mode]
        strings = walk_strings(body)
        if isinstance(strings, LimitExceeded):
            raise GatewayError("invalid_request", f"Request body is too deeply nested or too large to inspect "
                               f"({strings.reason}).")
        findings = self.scanner.scan_strings(strings)
        decision = self.scanner.decide(findings, params)
        record(decision, team_label, mode, "request")
        if declared is not None and declared not in self.rank:
            raise GatewayError("invalid_request", f"x-data-classification must be one of {', '.join(self.cfg.tiers)}.",
                               "x-data-classification")
        may_declare = key.limits.policy.may_declare
        tier = self.top(self.cfg.default_tier, team.policy.default_tier if team else None,
                        key.limits.policy.default_tier, declared if may_declare else None, decision.detected_tier)
        if decision.block:
            raise GatewayError("content_blocked", "The request was blocked by gateway policy (rules: "
                               f"{', '.join(sorted(set(decision.blocked_rules)))}); remove that content.")
        eligible = tuple(b for b in model.backends if self.rank[b.max_tier or self.cfg.tiers[-1]] >= self.rank[tier])
        if not eligible:
            log.info("classification_violation", tier=tier, model=model.name, mode=mode, key_id=key.id)
            metrics.GUARDRAIL_TRIGGERS.labels("classification_tier", "block" if mode != "monitor" else "monitor",
                                              team_label, mode).inc()
            if mode != "monitor":
                raise GatewayError("classification_violation", f"This request is classified {tier!r}, above what "
                                   f"model {model.name!r} is approved for; use a model approved for {tier!r} data.",
                                   "model")
            eligible = model.backends
        redacted = None
        if decision.redact:
            new_strings, _ = redact_strings(strings, decision.redact, PlaceholderMap())
            replacements = iter(new_strings)
            redacted = map_strings(body, lambda _s: next(replacements))
        return Verdict(tier, mode, eligible, redacted, params)

    def may_log_content(self, tier: str) -> bool:
        limit = self.cfg.content_log_max_tier
        return limit is not None and self.rank[tier] <= self.rank[limit]


def record(decision: Decision, team: str, mode: str, where: str) -> None:
    """Every decision: a log event per matched rule and the trigger counter (never the value)."""
    for action, found in (("block", decision.blocking), ("redact", decision.redact), ("monitor", decision.monitor)):
        for rule in sorted({f.rule for f in found}):
            metrics.GUARDRAIL_TRIGGERS.labels(rule, action, team, mode).inc()
            log.info("policy_decision", rule=rule, action=action, mode=mode, where=where,
                     count=sum(1 for f in found if f.rule == rule))
    for finding, entry in decision.allowlisted:
        metrics.GUARDRAIL_TRIGGERS.labels(finding.rule, "allowlisted", team, mode).inc()
        log.info("policy_allowlist_applied", rule=finding.rule, reason=entry.reason, where=where)


class ResponseGuard:
    """Scans a response: a whole JSON body, or SSE events with a bounded hold-back window."""

    __slots__ = ("policy", "params", "team", "redactors", "blocked_by", "ended", "response_text")

    def __init__(self, policy: Policy, params: DecisionParams, team: str) -> None:
        self.policy, self.params, self.team = policy, params, team
        # One per choice (`n` > 1 streams interleave choices): text of one choice is never
        # held back into, or released in, another's chunk.
        self.redactors: dict[int, StreamRedactor] = {}
        self.blocked_by: StreamRedactor | None = None
        self.ended = False
        self.response_text: list[str] = []

    def json_body(self, body: dict[str, Any]) -> bytes | None:
        """The body (parsed by the caller, which also reads usage from it; changed in place)
        to send instead, or None to send it unchanged."""
        # Only choices of the expected shape are read or changed (any other passes as it is).
        listed = body.get("choices")
        choices = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
        contents = [c.get("message") for c in choices]
        texts = [m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), str) else "" for m in contents]
        self.response_text = ["\n".join(texts)]
        findings = self.policy.scanner.scan_strings(texts)
        if not findings:
            return None
        decision = self.policy.scanner.decide(findings, self.params)
        record(decision, self.team, self.params.mode, "response")
        if decision.block:
            self.response_text = []
            for choice in choices:
                if isinstance(choice.get("message"), dict):
                    choice["message"]["content"] = ""
                choice["finish_reason"] = "content_filter"
        elif decision.redact:
            new, _ = redact_strings(texts, decision.redact, PlaceholderMap())
            self.response_text = ["\n".join(new)]  # what the client sees is all a log may hold
            for choice, text in zip(choices, new):
                if isinstance(choice.get("message"), dict) and isinstance(choice["message"].get("content"), str):
                    choice["message"]["content"] = text
        else:
            return None
        return orjson.dumps(body)

    def sse_event(self, event: bytes) -> bytes:
        """One complete SSE event in, what to forward out (possibly empty)."""
        if self.ended:
            return b""
        if event.startswith(STREAM_ENDS):
            # The stream ends without a finish_reason chunk (which flushes): the text still
            # held back goes out first, else the answer would lose its tail.
            return self._release() + event
        if not event.startswith(b"data: {") or b'"choices"' not in event:
            return event
        try:
            chunk = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return event
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        text = delta.get("content")
        index = choice.get("index") if type(choice.get("index")) is int else 0
        redactor = self.redactors.get(index)
        if redactor is None or redactor.done and isinstance(text, str) and text:  # text after its finish
            redactor = self.redactors[index] = StreamRedactor(self.policy.scanner, self.params,
                                                               self.policy.cfg.holdback_chars)
        out = redactor.feed(text) if isinstance(text, str) and text else ""
        if choice.get("finish_reason") is not None:
            out += redactor.flush()
        if redactor.blocked:
            self.blocked_by = redactor
            return self.block(chunk)
        self._keep(out)
        if isinstance(text, str) and text:
            if not out and choice.get("finish_reason") is None:
                return b""  # held back until the window moves on
            delta["content"] = out
        elif out:
            delta["content"] = out
        else:
            return event
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def flush(self) -> bytes:
        """Whatever text is still held back, scanned, as one chunk (the stream is ending early)."""
        if self.ended:
            return b""
        self.ended = True
        return self._release()

    def _release(self) -> bytes:
        """Every choice's held-back text, scanned, one chunk per choice."""
        out = []
        for index, redactor in self.redactors.items():
            text = redactor.flush()
            if text and not redactor.blocked:
                self._keep(text)
                chunk = {"object": "chat.completion.chunk",
                         "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}
                out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        return b"".join(out)

    def _keep(self, emitted: str) -> None:
        """The streamed text as the client got it (redacted), for content logging; bounded."""
        if emitted and sum(map(len, self.response_text)) < CONTENT_LOG_CHARS:
            self.response_text.append(emitted)

    def logged_response(self) -> str:
        """The response text a log line may hold: exactly what the client was sent."""
        return "".join(self.response_text)[:CONTENT_LOG_CHARS]

    def block(self, chunk: dict[str, Any]) -> bytes:
        self.ended = True
        decision = self.blocked_by.block_decision if self.blocked_by is not None else None
        if decision is not None:
            record(decision, self.team, self.params.mode, "response")
        final = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}
        return b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n"


def content_for_log(body: dict[str, Any]) -> str:
    strings = walk_strings(body.get("messages", body.get("input", "")))
    text = "\n".join(strings) if isinstance(strings, list) else ""
    return text[:CONTENT_LOG_CHARS]
