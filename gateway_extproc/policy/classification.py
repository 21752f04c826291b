"""Classification and guardrails applied to one request and its response.

Config (`classification:` in gateway.yaml) compiles once into a `Policy`: one Scanner for all
rules (a single pass per body), the tier order, the allowlist. Per request the router calls
`check_request` on the parsed body and the headers it forwards (policy/headers.py), which
answers with everything it must do: refuse (403), the tier, which backends are eligible, the
redacted body and headers. `ResponseGuard` scans what comes
back (a JSON body, or SSE events through a bounded hold-back window).

A request's tier is the highest of: the key's and team's default tier, a declared
`x-data-classification` header (only keys with `mayDeclare`), and the tiers of what the
scanner found (including values it then redacts: redaction is a second layer, not a
licence). Only backends approved up to that tier are eligible; Envoy routes to a cluster
holding just those, so fallback never escalates to a lower-tier backend.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from itertools import accumulate
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog

from ..config import Backend, Classification, Limits, Model, VirtualKey
from ..errors import GatewayError, error_object
from ..telemetry import metrics
from ..providers.base import event_data
from ..usage import STREAM_ENDS, canonical_event
from .scanner import (BINARY_KEYS, DEFAULT_RULES, DEFAULT_TIERS, MODES, AllowEntry, CustomRule, Decision,
                      DecisionParams, Finding, InjectionConfig, LimitExceeded, PlaceholderMap, Scanner, map_strings,
                      redact, redact_strings, MAX_DEPTH, Rule, keyed_replacement, keyed_text, walk_strings)
from .detectors import DETECTOR_NAMES
from .headers import Header, HeaderEdit, edit, joined, place, scanned_names, where
from .stream import StreamRedactor

log = structlog.get_logger("gateway_extproc.policy")
CONTENT_LOG_CHARS = 4096


# An object key such as `max_tokens` or `role`: most keys of a request, cheap to skip (~2.5 us each).
_IDENTIFIER = re.compile(r"[a-z_]{1,64}")


@dataclass(frozen=True, slots=True)
class Verdict:
    tier: str
    mode: str
    eligible: tuple[Backend, ...]
    body: dict[str, Any] | None  # the redacted body, when something was redacted
    params: DecisionParams
    headers: HeaderEdit | None = None  # what the forwarded headers become, when one was redacted


def _own_tier(rule: Rule, cfg: Classification) -> str | None:
    """A built-in rule's tier under the operator's tier names: one at the top default tier
    (credentials, cards, SSNs: only the most trusted backends) takes the top of theirs, which
    means the same; any other is theirs to place (Policy refuses the config until they do).
    So a rule added in an upgrade at the top tier does not stop a config that placed the rest."""
    if rule.min_tier == DEFAULT_TIERS[-1] and DEFAULT_TIERS[-1] not in cfg.tiers:
        return cfg.tiers[-1]
    return rule.min_tier


class Policy:
    def __init__(self, cfg: Classification) -> None:
        self.cfg = cfg
        self.rank = {t: i for i, t in enumerate(cfg.tiers)}
        self.known_labels: dict[str, set[str]] = {}  # `remember_labels`
        rules = [replace(rule, action=o.get("action", rule.action), min_tier=o.get("minTier", _own_tier(rule, cfg)),
                         critical=o.get("critical", rule.critical))
                 for rule in DEFAULT_RULES for o in [cfg.rules.get(rule.name, {})]]
        unplaced = [r.name for r in rules if r.min_tier is not None and r.min_tier not in self.rank]
        if unplaced:  # own tier names: only the operator knows where the built-in rules' data may go
            raise ValueError(
                f"classification.rules: the built-in rules {', '.join(unplaced)} keep the default tiers "
                f"(confidential, restricted...), which classification.tiers ({', '.join(cfg.tiers)}) does not "
                "have; give each a minTier of yours (classification.rules.<name>.minTier) or use the default "
                "tier names")
        custom = [CustomRule.from_mapping({**c, "min_tier": c.get("minTier"), "ignore_case": c.get("ignoreCase", False)})
                  for c in cfg.custom]
        inj = cfg.injection or {}
        injection = InjectionConfig.from_mapping({
            "phrases": inj.get("phrases"), "patterns": inj.get("patterns"), "threshold": inj.get("threshold", 1.0),
            "include_defaults": inj.get("includeDefaults", True)})
        self.scanner = Scanner.compile(rules, custom, injection, tiers=cfg.tiers).prepare()  # at config load
        # Only a custom rule can match letters alone; built-in detectors and injection phrases
        # need digits, `@` or spaces, so without custom rules plain identifier keys are skipped.
        self.scan_every_key = bool(custom)
        self.allowlist = tuple(AllowEntry.from_mapping(e) for e in cfg.allowlist)
        self._params = {m: DecisionParams(mode=m, allowlist=self.allowlist, tiers=cfg.tiers) for m in MODES}

    def remember_labels(self, values: Iterable[tuple[str, Any]]) -> None:
        """Label values (`model`, `role`, `finish_reason`...) of an answer whose scan found
        nothing: the next answer's are not read again (they repeat on every answer). Per
        Policy, so a reload's new rules read them afresh; bounded."""
        known = self.known_labels
        if sum(map(len, known.values())) > _MAX_KNOWN_LABELS:
            known.clear()
        for key, value in values:
            if isinstance(value, str) and len(value) <= 128:
                known.setdefault(key, set()).add(value)

    def clean_label(self, name: str, value: str | None) -> str | None:
        """A provider's label (an answer's `model`, `id`, a `finish_reason`) as a span may carry
        it: as it is when no rule finds anything in it, else None. The trace reads these from the
        provider's bytes before output scanning rewrites them, so a value the client got as a
        placeholder (or never) would reach the collector whole. Labels already seen clean (`remember_labels`) are not read again."""
        if value is None or value in self.known_labels.get(name, ()):
            return value
        return None if self.scanner.scan_strings([value]) else value

    def top(self, *tiers: str | None) -> str:
        return max((t for t in tiers if t), key=self.rank.__getitem__, default=self.cfg.tiers[0])

    def check_request(self, body: dict[str, Any], key: VirtualKey, team: Limits | None, declared: str | None,
                      model: Model, team_label: str, headers: Sequence[Header] = ()) -> Verdict:
        """The verdict on what the provider will read: the body and the forwarded `headers`
        (policy/headers.py), in one scan."""
        mode = key.limits.policy.mode or (team.policy.mode if team else None) or self.cfg.mode
        params = self._params[mode]
        names: dict[str, None] = {}
        keyed: dict[str, None] = {}
        strings = walk_strings(body, names=names, keyed=keyed)
        if isinstance(strings, LimitExceeded):
            raise GatewayError("invalid_request", f"Request body is too deeply nested or too large to inspect "
                               f"({strings.reason}).")
        # The header values follow the body's strings in the same pass, as one string
        # (policy/headers.py `joined`). Object keys are caller text as much as values
        # (metadata, tool and response schemas, logit_bias): scanned apart, with the header
        # names, their findings indexed after the values'; and so are long JSON numbers (a
        # card sent as a number) and SSN-named values, each with its name (`keyed_text`).
        # Layout: strings | headers | keys | names | keyed.
        at = len(strings)  # the index of the header values' string
        values = [*strings, joined(headers)] if headers else strings
        keys = [k for k in names if self.scan_every_key or not _IDENTIFIER.fullmatch(k)]
        named = scanned_names(headers, self.scan_every_key) if headers else []
        scanned_keys = [*keys, *(headers[i].name for i in named)] if named else keys
        first_name = len(values) + len(keys)  # the index of the first scanned header name
        first_keyed = len(values) + len(scanned_keys)
        keyed_texts = list(keyed)
        findings = self.scanner.scan_strings(values) + [
            replace(f, index=f.index + len(values)) for f in self.scanner.scan_strings(scanned_keys)]
        if keyed_texts:
            findings += [replace(f, index=f.index + first_keyed)
                         for f in self.scanner.scan_strings(keyed_texts, apart=True)]
        decision = self.scanner.decide(findings, params)
        record(decision, team_label, mode, "request")
        if declared is not None and declared not in self.rank:
            raise GatewayError("invalid_request", f"x-data-classification must be one of {', '.join(self.cfg.tiers)}.",
                               "x-data-classification")
        may_declare = key.limits.policy.may_declare
        tier = self.top(self.cfg.default_tier, team.policy.default_tier if team else None,
                        key.limits.policy.default_tier, declared if may_declare else None, decision.detected_tier)

        def in_headers(found: Sequence[Finding]) -> str:
            """Which headers hold `found`, for an error message ("" for none)."""
            return where(headers, place(headers, [f for f in found if f.index == at]),
                         {named[f.index - first_name] for f in found
                                          if first_name <= f.index < first_keyed}) if headers else ""

        if decision.block:
            holder = in_headers(decision.blocking or decision.tier_violations)
            raise GatewayError("content_blocked", "The request was blocked by gateway policy (rules: "
                               f"{', '.join(sorted(set(decision.blocked_rules)))}"
                               f"{'; in ' + holder if holder else ''}); remove that content.")
        eligible = tuple(b for b in model.backends if self.rank[b.max_tier or self.cfg.tiers[-1]] >= self.rank[tier])
        if not eligible:
            log.info("classification_violation", tier=tier, model=model.name, mode=mode, key_id=key.id)
            metrics.GUARDRAIL_TRIGGERS.labels("classification_tier", "block" if mode != "monitor" else "monitor",
                                              team_label, mode).inc()
            if mode != "monitor":
                holder = in_headers([f for f in (*decision.redact, *decision.monitor)
                                     if self.scanner.rules[f.rule].min_tier == tier])
                raise GatewayError("classification_violation", f"This request is classified {tier!r}"
                                   f"{' (found in ' + holder + ')' if holder else ''}, above what model "
                                   f"{model.name!r} is approved for; use a model approved for {tier!r} data.", "model")
            eligible = model.backends
        redacted = header_edit = None
        if decision.redact:
            placeholders = PlaceholderMap()  # one per request: a value keeps its placeholder in body and headers
            new_strings, _ = redact_strings(values + scanned_keys + keyed_texts, decision.redact, placeholders)
            if any(f.index < at or len(values) <= f.index < first_name or f.index >= first_keyed
                   for f in decision.redact):
                replacements = iter(new_strings[:at])
                renamed = {old: new for old, new in zip(keys, new_strings[len(values):first_name]) if old != new}
                rekeyed = {old: keyed_replacement(old, new)
                           for old, new in zip(keyed_texts, new_strings[first_keyed:]) if old != new}
                redacted = map_strings(body, lambda _s: next(replacements), keys=renamed, keyed=rekeyed)
            if headers:
                placed = place(headers, [f for f in decision.redact if f.index == at])
                header_edit = edit(headers, [redact(h.text, placed[i], placeholders)[0] if i in placed else h.text
                                             for i, h in enumerate(headers)],
                                   (named[f.index - first_name] for f in decision.redact
                                    if first_name <= f.index < first_keyed))
        return Verdict(tier, mode, eligible, redacted, params, header_edit)

    def may_log_content(self, tier: str) -> bool:
        limit = self.cfg.content_log_max_tier
        return limit is not None and self.rank[tier] <= self.rank[limit]

    def may_log_text(self, text: str, params: DecisionParams) -> bool:
        """Whether `text` (a reply as the client got it) may go into a log: the tier of what
        it still holds. The request's tier does not cover the reply: a value no rule removed
        from it (monitor mode, a `monitor` rule above `contentLogging.maxTier`) is logged
        only within that tier. One scan of at most CONTENT_LOG_CHARS characters."""
        if not self.may_log_content(self.cfg.tiers[0]):
            return False
        findings = self.scanner.scan_strings([text])
        tier = self.scanner.decide(findings, params).detected_tier if findings else None
        return tier is None or self.may_log_content(tier)


@dataclass(frozen=True, slots=True)
class Read:
    """A provider's JSON as output scanning reads it (`read_json`): its strings, then the
    `keyed_text` of each long number in it (and of each SSN-named string), then the whole
    values read `apart` (an answer's `id`), then its object keys (`keys`), and what the scan
    found in all four (indexed in that order)."""

    strings: list[str]
    numbers: list[str]
    apart: list[str]
    keys: list[str]
    findings: list[Finding]


def read_json(scanner: Scanner, obj: Any, skip_keys: frozenset[str] = BINARY_KEYS,
              known: dict[str, set[str]] | None = None, apart: Sequence[str] = ()) -> Read | LimitExceeded:
    """Every string of `obj`, scanned as one text, and every JSON number that could be a value
    (nine digits or more: a card or an SSN a provider sent as a number, `4111111111111111` or
    `4.111111111111111e15`, reaches the client as much as a string does), each apart with its
    member's name, as a request's are (`Policy.check_request`); `apart`: strings read the same
    way as those numbers, each a whole value (an answer's `id`: joined with the text, a digit
    run there opened regex windows reaching into it), in the same scan. Its object keys are
    read too, apart from the values, as a request's are: a client reads a provider's
    `{"4111 1111 1111 1111": …}` as much as a value (until 2026-12-05 no answer's keys were
    read); plain identifiers only when custom rules exist (no built-in rule matches one)."""
    keyed: dict[str, None] = {}
    names: dict[str, None] = {}
    strings = walk_strings(obj, skip_keys=skip_keys, known=known, keyed=keyed, names=names)
    if isinstance(strings, LimitExceeded):
        return strings
    findings = scanner.scan_strings(strings)
    whole = [*keyed, *apart]
    if whole:
        findings += [replace(f, index=f.index + len(strings)) for f in scanner.scan_strings(whole, apart=True)]
    keys = read_keys(scanner, names)
    if keys:
        first = len(strings) + len(whole)
        findings += [replace(f, index=f.index + first) for f in scanner.scan_strings(keys)]
    return Read(strings, list(keyed), list(apart), keys, findings)


def read_keys(scanner: Scanner, names: Iterable[str]) -> list[str]:
    """The object keys of an answer that are read: not the plain identifiers (`role`,
    `finish_reason`) unless the scanner has custom rules, the only ones that can match one."""
    if _reads_every_key(scanner):
        return list(names)
    return [k for k in names if not _plain_identifier(k)]


@functools.lru_cache(maxsize=4096)
def _plain_identifier(key: str) -> bool:
    """(Cached: every answer repeats the schema's ~25 keys.)"""
    return _IDENTIFIER.fullmatch(key) is not None


@functools.lru_cache(maxsize=8)
def _reads_every_key(scanner: Scanner) -> bool:
    """Whether the scanner has custom rules (`Policy.scan_every_key`)."""
    return any(rule.detector not in DETECTOR_NAMES for rule in scanner.rules.values())


def rewritten(obj: Any, read: Read, found: Sequence[Finding], skip_keys: frozenset[str] = BINARY_KEYS,
              known: dict[str, set[str]] | None = None) -> Any:
    """A copy of `obj` (as `read`) with each of `found` replaced by its placeholder: in its
    string, a number by its placeholder (a string), a key renamed to it. The `apart` values:
    `rewritten_apart`."""
    end = len(read.strings) + len(read.numbers)
    first_key = end + len(read.apart)
    mapping = PlaceholderMap()
    new, _ = redact_strings(read.strings + read.numbers, [f for f in found if f.index < end], mapping)
    replacements = iter(new[:len(read.strings)])
    rekeyed = {old: keyed_replacement(old, text) for old, text in zip(read.numbers, new[len(read.strings):])
               if old != text}
    keys, _ = redact_strings(read.keys, [replace(f, index=f.index - first_key) for f in found
                                         if f.index >= first_key], mapping)
    renamed = {old: new_key for old, new_key in zip(read.keys, keys) if old != new_key}
    return map_strings(obj, lambda _s: next(replacements), skip_keys=skip_keys, known=known, keyed=rekeyed,
                       keys=renamed)


def rewritten_apart(read: Read, found: Sequence[Finding]) -> list[str]:
    """`read.apart` with each of `found` that is in them replaced by its placeholder."""
    start = len(read.strings) + len(read.numbers)
    new, _ = redact_strings(read.apart, [replace(f, index=f.index - start) for f in found
                                         if start <= f.index < start + len(read.apart)], PlaceholderMap())
    return new


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


class Unreadable:
    """Stream events output scanning could not read, and so did not forward: the first is
    logged when it comes, the count goes on the request's access line (`unreadable_events`).
    A line per event let a provider's stream of thousands of tiny unreadable events write
    thousands of lines for one request."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def drop(self, **fields: Any) -> None:
        self.count += 1
        if self.count == 1:
            log.warning("stream_event_unreadable", **fields)


class ResponseGuard:
    """Scans a response: a whole JSON body, or SSE events with a bounded hold-back window."""

    __slots__ = ("policy", "params", "team", "in_order", "redactors", "blocked_by", "ended", "response_text",
                 "kept", "head", "clean", "last", "seams", "deferred", "seam_block", "queue", "labels",
                 "names", "mirrored", "assembled", "finished", "unreadable", "late", "tails", "resumed")

    def __init__(self, policy: Policy, params: DecisionParams, team: str, in_order: bool = False) -> None:
        self.policy, self.params, self.team = policy, params, team
        self.unreadable = Unreadable()
        # Each choice's texts must reach the client one after the other (an Anthropic client's
        # content blocks): a window is flushed when its choice moves on to another text. Else
        # windows stay open across such moves, so a value split around one is still seen whole.
        self.in_order = in_order
        # One per text of each choice (`n` > 1 streams interleave choices; a choice streams
        # content, refusal, reasoning and tool-call arguments): text is never held back into,
        # or released in, another's chunk or field.
        self.redactors: dict[tuple[Any, ...], StreamRedactor] = {}
        self.blocked_by: StreamRedactor | None = None
        # Where each choice's text last went, and the seam (`Seam`) where it moved on from one
        # text to another, until what follows it has been seen: a value may be split there.
        self.last: dict[int, tuple[Any, ...]] = {}
        self.seams: dict[int, Seam] = {}
        # Seams whose first text still holds its tail (`_seams_blocked`): read joined when
        # that tail goes out (`_released`), not at all when the text goes on instead.
        self.deferred: list[tuple[int, Seam]] = []
        self.seam_block: Decision | None = None
        # With `in_order`, the first text's tail went out at the seam (its block must close
        # before the next one opens): what goes out from there waits here until it is decided.
        self.queue: list[bytes] = []
        # The stream's chunk fields (id, created, model...): chunks of released text carry them
        # too, as clients that validate chunks require.
        self.head: dict[str, Any] | None = None
        # The chunk labels read so far (`_CHUNK_LABELS`), (name, value as sent) -> what goes out:
        # every chunk repeats them, so each value is read once per stream.
        self.labels: dict[tuple[str, str], str] = {}
        # The tool calls' function names read clean (`_tool_names`): every chunk of a call repeats its name.
        self.names: set[str] = set()
        self.ended = False
        self.response_text: list[str] = []
        # A JSON answer in which the scan found nothing: its logged text needs no second look.
        self.clean = False
        self.kept = 0  # characters in response_text (summing them per event made a stream quadratic)
        # A choice's reasoning string whose text a `reasoning_details` entry repeats (`_mirrors`)
        # -> that entry's index: what its window releases goes out in both.
        self.mirrored: dict[tuple[Any, ...], int] = {}
        # (choice index, path) -> what the openai SDK's stream helper has joined there of the
        # strings and numbers without a window (`_joined_leaves`): a string's last JOIN_TAIL
        # characters and whether a piece other than a schema label came; a number's sum.
        self.assembled: dict[tuple[Any, ...], tuple[str, bool] | int | float] = {}
        # The choices that have finished (a `finish_reason` went by): their windows were flushed.
        self.finished: set[int] = set()
        self.late: set[int] = set()  # the finished choices whose later text was logged
        # With `in_order`, a text flushed because its choice moved on (its held tail, as it went
        # out) -> when it goes on after the other text, that tail and what follows are read
        # together (`resumed`), as a client that joins a choice's text blocks (the anthropic
        # SDK's `text_stream`, `get_final_text()`) reads them; decided before the new text goes out.
        self.tails: dict[tuple[Any, ...], str] = {}
        self.resumed: dict[tuple[Any, ...], Seam] = {}

    def json_body(self, body: Any) -> bytes | None:
        """The body (parsed by the caller, which also reads usage from it) to send instead, or
        None to send it unchanged. Every string of every choice is scanned (content, refusal,
        reasoning, tool-call arguments, labels; not a tool call's id), and of the body's other
        fields (its own `id` apart);
        logprobs are dropped, since they spell the text out
        token by token where no scan can see a value whole. Raises `provider_error` for a body
        that cannot be read, which therefore cannot be sent."""
        listed = body.get("choices") if isinstance(body, dict) else None
        dropped = False
        for choice in listed if isinstance(listed, list) else ():
            if isinstance(choice, dict) and choice.get("logprobs") is not None:
                choice["logprobs"], dropped = None, True
        # The body's other fields (`model`, `system_fingerprint`, a provider's extensions) reach
        # the client too, and a stream chunk's are scanned: every string of them is, after the
        # choices' (a value there is redacted in place, a blocked one too; the choices block).
        others = [k for k in body if k != "choices"] if isinstance(body, dict) else []
        whole = [listed, {k: body[k] for k in others}]  # (by name: labels repeat, `known`)
        known = self.policy.known_labels
        # The answer's own `id` reaches the client (and an Anthropic client's `message.id`): read
        # apart, a whole value. Unique per answer, so never remembered; a tool call's id stays
        # unread. Any other string under an identifier's name is read apart too (`_identifiers`).
        ident = body.get("id") if isinstance(body, dict) else None
        ids = [ident] if isinstance(ident, str) and ident else []
        named = _identifiers(whole)
        read = read_json(self.policy.scanner, whole, _NOT_TEXT, known, ids + [h[k] for h, k in named]) \
            if isinstance(listed, list) else LimitExceeded("no choices")
        if isinstance(read, LimitExceeded):
            log.warning("response_unreadable", reason=read.reason)
            raise GatewayError("provider_error", "The provider answered with a body output scanning could not read; "
                               "it was not forwarded.")
        findings = read.findings
        self.clean = not findings
        if self.clean:
            self.policy.remember_labels([*((k, body[k]) for k in _MEMO_HEAD if k in body), *(
                (k, m.get(k) if k == "role" else c.get(k)) for c in listed if isinstance(c, dict)
                for m in [c.get("message") if isinstance(c.get("message"), dict) else {}]
                for k in ("role", "finish_reason"))])
        decision = self.policy.scanner.decide(findings, self.params) if findings else None
        if decision is not None:
            record(decision, self.team, self.params.mode, "response")
        if decision is not None and (decision.block or decision.redact):
            apart = rewritten_apart(read, decision.replaced)
            for (holder, key), value in zip(named, apart[len(ids):]):
                holder[key] = value  # (before the copy: `rewritten` leaves these names as they are)
            listed, values = rewritten(whole, read, decision.replaced, _NOT_TEXT, known)
            body.update(values)
            if ids:
                body["id"] = apart[0]
            body["choices"] = listed
            if decision.block:
                body["choices"] = [{"index": c.get("index", i) if isinstance(c, dict) else i,
                                    "message": {"role": "assistant", "content": ""},
                                    "finish_reason": "content_filter", "logprobs": None} for i, c in enumerate(listed)]
        elif not dropped:
            self.response_text = [_contents(listed)]
            return None
        self.response_text = [_contents(body["choices"])]  # what the client sees is all a log may hold
        return orjson.dumps(body)

    def sse_event(self, event: bytes) -> bytes:
        """One complete SSE event in (`_event`), what to forward out: with `in_order`, while a
        seam that a text's tail went out at is undecided, nothing (it waits in `queue`)."""
        out = self._event(event)
        if self.ended:
            return out  # (the queue went out first, or was dropped by a block)
        if self.in_order and self.seams:
            self.queue.append(out)
            return b""
        if self.queue:
            out, self.queue = b"".join(self.queue) + out, []
        return out

    def _event(self, event: bytes) -> bytes:
        """One complete SSE event (in `usage.canonical_event` form, or the unterminated last
        one) in, what to forward out (possibly empty). Every choice's generated text (content,
        refusal, reasoning, tool-call arguments) goes through its own hold-back window; what
        cannot be read is not forwarded, since it could not be scanned."""
        if self.ended:
            return b""
        if event.startswith(STREAM_ENDS):
            # The stream ends without a finish_reason chunk (which flushes): the text still
            # held back goes out first, else the answer would lose its tail. Nothing after
            # the end is forwarded: a provider that carries on would start a fresh window,
            # where a value split around the end is never seen whole.
            if self._seams_blocked(list(self.seams)):
                return self.block(self.head or {})
            released = self._release()
            if self.seam_block is not None:  # (a value over a pause or a seam, read as its text went out)
                return self.block(self.head or {})
            out = b"".join(self.queue) + released + scanned_error(self.policy, self.params, self.team, event)
            self.queue = []
            self.ended = True
            return out
        if not event.startswith(b"data: "):  # the stream's unterminated last bytes: read like an event
            event = canonical_event(event)
            if not event.startswith(b"data: "):
                return event  # a comment: no text
        try:
            chunk = orjson.loads(event[6:])  # canonical: one data line
        except orjson.JSONDecodeError:
            try:  # the unterminated last event, in another framing
                chunk = orjson.loads(event_data(event) or b"")
            except orjson.JSONDecodeError:
                chunk = None
        if not isinstance(chunk, dict):
            return self._unreadable(event)
        blocked, relabelled = self._labels(chunk)
        if blocked:
            return self.block(chunk)
        choices = chunk.get("choices")
        if not isinstance(choices, list):  # no chunk; but the usage alone may come without choices
            return self._bare(chunk, event, relabelled) if choices is None and chunk.keys() <= _HEAD | {"usage"} \
                else self._unreadable(event)
        if not choices:
            return self._bare(chunk, event, relabelled)  # no generated text (the usage chunk), but maybe other fields
        if self._extras_blocked(chunk, choices):
            return self.block(chunk)
        if self.head is None:  # (without a field `_extras_blocked` dropped)
            self.head = {"object": "chat.completion.chunk", **{k: v for k, v in chunk.items() if k in _HEAD}}
        shown, before = [], []
        for choice in choices:
            if not isinstance(choice, dict):
                continue  # unreadable, so not forwarded
            if self._choice(choice, before):
                shown.append(choice)
            if self.blocked_by is not None or self.seam_block is not None:
                return self.block(chunk)
        released = b"".join(before)
        if not shown and chunk.get("usage") is None:
            return released  # the rest is held back until the window moves on
        chunk["choices"] = shown
        return released + b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _labels(self, chunk: dict[str, Any]) -> tuple[bool, bool]:
        """Reads the chunk's labels (`_CHUNK_LABELS`) that this stream has not read yet, apart
        from its text (each value is whole), in one scan, and puts what may go out in their
        place: a value redacted per its rule, in this and every later chunk. A `model` or
        `system_fingerprint` seen clean is remembered per Policy, like a JSON answer's.
        (blocked: a value there ends the stream, relabelled: the chunk was rewritten)."""
        relabelled = False
        fresh: list[tuple[str, str]] = []
        known = self.policy.known_labels
        for name in _CHUNK_LABELS:
            value = chunk.get(name)
            if not isinstance(value, str) or not value:
                continue  # (another type is read as a field outside the schema: `_not_strings`)
            sent = self.labels.get((name, value))
            if sent is None:
                if name in known and value in known[name]:
                    self.labels[(name, value)] = value
                else:
                    fresh.append((name, value))
            elif sent != value:
                chunk[name], relabelled = sent, True
        if not fresh:
            return False, relabelled
        values = [value for _, value in fresh]
        findings = self.policy.scanner.scan_strings(values, apart=True)
        decision = self.policy.scanner.decide(findings, self.params) if findings else None
        if decision is None or not (decision.block or decision.redact):
            self.labels.update(((name, value), value) for name, value in fresh)
            if not findings:
                self.policy.remember_labels([(name, value) for name, value in fresh if name != "id"])
            return False, relabelled
        record(decision, self.team, self.params.mode, "response")
        new, _ = redact_strings(values, decision.replaced, PlaceholderMap())
        for (name, value), out in zip(fresh, new):
            self.labels[(name, value)] = out
            if out != value:
                chunk[name], relabelled = out, True
        return decision.block, relabelled

    def _bare(self, chunk: dict[str, Any], event: bytes, relabelled: bool = False) -> bytes:
        """A chunk without choices (the usage chunk): no text window, but its other fields reach
        the client (`usage` and any field beside it), so their strings are scanned as a chunk's
        extras are: the event as it came when they hold nothing (its labels as `_labels` left
        them); else without them, or the stream's end when a value blocks."""
        odd = _not_strings(chunk, _CHUNK_LABELS)
        fields = [k for k in chunk if k not in _HEAD and k != "choices"] + odd
        read = read_json(self.policy.scanner, [chunk[k] for k in fields])
        if isinstance(read, LimitExceeded):
            return self._unreadable(event)
        findings = read.findings
        decision = self.policy.scanner.decide(findings, self.params) if findings else None
        if decision is None or not (decision.block or decision.redact):
            return b"data: " + orjson.dumps(chunk) + b"\n\n" if relabelled else event
        record(decision, self.team, self.params.mode, "response")
        if decision.block:
            return self.block(chunk)
        kept = {k: v for k, v in chunk.items() if k in _HEAD and k not in odd or k == "choices"}
        hit = {f.index for f in decision.replaced}
        if isinstance(chunk.get("usage"), dict) and max(hit) < len(read.strings):
            kept["usage"] = _counts(chunk["usage"])  # the counts stay (clients read them), its strings go
        return b"data: " + orjson.dumps(kept) + b"\n\n"

    def _choice(self, choice: dict[str, Any], before: list[bytes]) -> bool:
        """Scans one choice's texts in place; False when it has nothing left to show now.
        With `in_order`, text another of its windows still holds goes out first (into
        `before`) when this choice moves on to another text; at its finish, always."""
        index = choice["index"] = _position(choice.get("index"), 0)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None  # tokens spell out text still held back, unscanned
        finished = choice.get("finish_reason") is not None
        mirrors = _mirrors(delta)
        slots = _text_slots(index, delta, {id(entry) for entry, _, _ in mirrors})
        if index in self.finished and any(isinstance(holder[name], str) and holder[name] for _, holder, name in slots):
            # Text after the choice's finish is not forwarded: its windows were flushed there,
            # so it would start new ones, and a value split around the finish (`card 4111
            # 1111`, finish, ` 1111 1111`) was read by neither, while clients join it whole.
            if index not in self.late:  # (once per choice: a provider may send thousands)
                self.late.add(index)
                log.warning("stream_text_after_finish", choice=index)
            for _, holder, name in slots:
                del holder[name]
            mirrors, slots = [], []
        if self._joined_blocked(index, delta):
            return False
        active = {key for key, holder, name in slots if holder[name] is not None}  # where the choice is now
        first = next((key for key, holder, name in slots if isinstance(holder[name], str) and holder[name]), None)
        if first is not None and not self._moved(index, first):
            return False
        # With `in_order`, a thinking block's signature (`thinking_blocks`) ends that block: its
        # text still held goes out before it, so the Messages translation (messages.py) closes
        # the block there and the next reasoning text opens the next one (until 2026-12-05 the
        # held tail came after the signature, and two signed blocks reached an anthropic client
        # as one, with the second signature). What follows is still read across the pause.
        signed = self.in_order and bool(delta.get("thinking_blocks"))
        if active and self.in_order or finished or signed:
            for key, redactor in self.redactors.items():
                if key[0] == index and key not in active and not redactor.done:
                    seam = self.seams.get(index)
                    if seam is not None and key == seam.key:  # what follows the seam ends here
                        if not self._seam_passes(index):
                            return False
                    if not finished and (tail := redactor.held()):
                        self.tails[key] = tail
                    before.append(self._released(key, redactor))
                    if self.seam_block is not None:
                        return False
                    if redactor.blocked:
                        self.blocked_by = redactor
                        return False
        held = False
        # With `in_order`, a text followed by another in the same delta (parallel tool calls)
        # is closed there too: its held text must go out before the next one starts.
        last = next((key for key, holder, name in reversed(slots) if holder[name] is not None), None)
        for key, holder, name in slots:
            text = holder[name]
            if text is None:
                continue
            if not isinstance(text, str):
                del holder[name]  # text the scanner cannot read is not forwarded
                continue
            redactor = self.redactors.get(key)
            if redactor is None or redactor.done and text:  # text after its close (`in_order`)
                redactor = self.redactors[key] = StreamRedactor(self.policy.scanner, self.params,
                                                                 self.policy.cfg.holdback_chars,
                                                                 json=key[1] in _JSON_TEXTS)
                if key in self.tails:  # the text goes on after another one: read across its pause
                    self.resumed[key] = Seam([self.tails.pop(key), ""], [key, key])
            if text and key != self.last.get(index) and not self._moved(index, key):
                return False
            seam = self.seams.get(index)
            out = redactor.feed(text) if text else ""
            if signed and not finished and (tail := redactor.held()):
                self.tails[key] = tail
            if finished or signed or self.in_order and key != last:
                out += redactor.flush()
            if redactor.blocked:
                self.blocked_by = redactor
                return False
            if key in self.resumed:
                self.resumed[key].parts[-1] += text
                if (out or redactor.done or len(self.resumed[key].parts[-1]) > SEAM_HEAD) and self._resume_blocked(key):
                    return False
            if seam is not None and seam.key == key:
                seam.parts[-1] += text
                if (out or redactor.done or len(seam.parts[-1]) > SEAM_HEAD) and not self._seam_passes(index):
                    return False
            if key[1] == "content":
                self._keep(out)
            holder[name] = out
            held = held or bool(text) and not out
        for entry, field, at in mirrors:  # (the entry repeats the text as the client gets it)
            entry["text"] = delta.get(field) or ""
            self.mirrored[(index, field)] = at
        if finished:
            self.finished.add(index)
        if finished and index in self.seams and not self._seam_passes(index):
            return False
        return not (held and not finished and all(not v for k, v in delta.items() if k != "role"))

    def _joined_blocked(self, index: int, delta: dict[str, Any]) -> bool:
        """The openai SDK's stream helper (`client.chat.completions.stream`) builds each
        choice's message by joining every string of its deltas piece by piece and adding up
        every number (`openai.lib.streaming._deltas.accumulate_delta`), a tool call's `id` and
        function `name` and a provider's own objects too, which are read event by event, each
        piece whole (or not at all: ids): a card sent as `4111 1111` + ` 1111 1111` in a
        tool call's name, or as 4000000000000000 + 111111111111111 in an extension field,
        reached that client whole. What it has joined is kept per choice and field (a string's
        tail), and a value that a new piece completes ends the stream, as a seam's does (its
        first piece is out already). True when one does (`seam_block`)."""
        scanner = self.policy.scanner
        for path, value in _joined_leaves(delta):
            key = (index, *path)
            held = self.assembled.get(key)
            if held is None:
                self.assembled[key] = (value[-JOIN_TAIL:], not _label_piece(path, value)) \
                    if isinstance(value, str) else value
                continue
            if isinstance(held, tuple) and isinstance(value, str):
                tail, dirty = held[0] + value, held[1] or not _label_piece(path, value)
                self.assembled[key] = (tail[-JOIN_TAIL:], dirty)
                cut = len(held[0])
                findings = [f for f in scanner.scan(tail) if f.start < cut < f.end] if dirty else []
            elif isinstance(held, (int, float)) and isinstance(value, (int, float)):
                self.assembled[key] = total = held + value
                text = keyed_text(total, path[-1] if isinstance(path[-1], str) else None, top=False)
                findings = scanner.scan_strings([text], apart=True) if text is not None else []
            else:
                continue  # (the helper keeps what it has when the type changes)
            decision = scanner.decide(findings, self.params) if findings else None
            if decision is not None and (decision.block or decision.redact):
                self.seam_block = replace(decision, block=True)
                return True
            if decision is not None:
                record(decision, self.team, self.params.mode, "response")
        return False

    def _moved(self, index: int, key: tuple[Any, ...]) -> bool:
        """The choice's text goes to `key`: when it last went to another text, the seam there
        is kept with that text's held tail (the seam before it decided first, unless that
        text let nothing out since it: then the seam reads on into `key`, since a value may
        run over three texts or more, `card 4111 1111`, `1111`, `1111`). False when that
        decision blocks."""
        last = self.last.get(index)
        self.last[index] = key
        if last is None or last == key:
            return True
        seam = self.seams.get(index)
        fresh = (redactor := self.redactors.get(key)) is None or redactor.done  # `key` begins here
        if seam is None or not seam.extend(key, fresh):
            if not self._seam_passes(index):
                return False
            seam = None
        if self.deferred:  # a text goes on: its part of a seam was no end, nothing to join
            self.deferred = [(i, d) for i, d in self.deferred if i != index or key not in d.keys[:-1]]
        if seam is not None:
            return True
        redactor = self.redactors.get(last)
        tail = redactor.held() if redactor is not None else ""
        if tail:
            self.seams[index] = Seam([tail, ""], [last, key], fresh)
        return True

    def _seam_passes(self, index: int) -> bool:
        """Decide the choice's seam now (what follows it has been seen, or it ends): True when
        no value spans it."""
        return index not in self.seams or not self._seams_blocked([index])

    def _seams_blocked(self, indexes: list[int]) -> bool:
        """Drop the seams of `indexes`, scanning each: a value that spans one (a card begun in a
        choice's content and ended in its tool call's arguments, an address whose `@domain`
        begins the next text) is in two windows or more, each of which saw only a piece of
        it. Unless one window's own scan covers its piece (then that piece is redacted there,
        and the rest is no value), it ends the stream as a block does: a piece may have gone
        out in its own window already. True when one does; `seam_block` is the decision."""
        for index in indexes:
            seam = self.seams.pop(index, None)
            if seam is None:
                continue
            first = self.redactors.get(seam.keys[0])
            if seam.straight and not self.in_order and first is not None and not first.done:
                # The first text's tail is still held in its window: numbers are read across
                # now; the texts joined once that tail goes out, since until then the text
                # may go on (texts interleaved), and its tail was then no end to join.
                self.deferred.append((index, seam))
                seam = replace(seam, straight=False)
            decision = seam_decision(self.policy, self.params, self.team, seam)
            if decision is not None:
                self.seam_block = replace(decision, block=True)
                self.ended = True
                return True
        return False

    def _extras_blocked(self, chunk: dict[str, Any], choices: list[Any]) -> bool:
        """Fields of a chunk outside the chat schema's (a provider's extensions, or junk) other
        than a delta's strings are scanned chunk by chunk, without a window; one holding a
        finding is dropped, or ends the stream when the finding blocks. True when it does."""
        names = self._tool_names(choices)
        extras = _extras(chunk, choices) + names
        if not extras:
            return False
        read = read_json(self.policy.scanner, [holder[key] for holder, key in extras])
        findings = None if isinstance(read, LimitExceeded) else read.findings
        decision = self.policy.scanner.decide(findings, self.params) if findings else None
        if findings == [] or decision is not None and not (decision.block or decision.redact):
            self.names.update(holder[key] for holder, key in names)
            return False
        if decision is not None:
            record(decision, self.team, self.params.mode, "response")
        # The names' strings come last, one each: only one holding a finding goes (with a block
        # too); the other fields go with any finding of theirs (their numbers' included).
        first = len(read.strings) - len(names) if not isinstance(read, LimitExceeded) else 0
        hit = {f.index for f in decision.replaced} if decision is not None else {-1}
        gone = [pair for i, pair in enumerate(names) if decision is None or first + i in hit]
        if hit - set(range(first, first + len(names))) and not (decision is not None and decision.block):
            gone += extras[:len(extras) - len(names)]
        for holder, key in gone:
            del holder[key]
        return decision is not None and decision.block

    def _tool_names(self, choices: list[Any]) -> list[tuple[dict[str, Any], str]]:
        """(dict, key) of the chunk's tool-call function names not read yet: labels the schema
        leaves to the provider, which a client reads (a JSON answer's are scanned with it); each
        is sent whole, so it is read event by event, once per value."""
        out = []
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            fns = [f for call in calls if isinstance(call, dict) for f in (call.get("function"), call.get("custom"))] \
                if isinstance(calls, list) else []
            for fn in [*fns, delta.get("function_call") if isinstance(delta, dict) else None]:
                if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"] not in self.names:
                    out.append((fn, "name"))
        return out

    def _resume_blocked(self, key: tuple[Any, ...]) -> bool:
        """Decides the pause in a text that went on after another one (`resumed`): True when a
        value spans it (its first piece went out at the pause: the stream ends, `seam_block`)."""
        seam = self.resumed.pop(key, None)
        decision = seam_decision(self.policy, self.params, self.team, seam) if seam is not None else None
        if decision is not None:
            self.seam_block = replace(decision, block=True)
        return decision is not None

    def _released(self, key: tuple[Any, ...], redactor: StreamRedactor) -> bytes:
        """The rest of one window, scanned, as a chunk of its own ("" if none or blocked, or
        when, read with what followed it in the next text, it makes a value: `seam_block`)."""
        if self._resume_blocked(key):
            return b""
        for pending in [d for d in self.deferred if d[1].keys[0] == key]:
            self.deferred.remove(pending)
            decision = seam_decision(self.policy, self.params, self.team, pending[1])
            if decision is not None:
                self.seam_block = replace(decision, block=True)
                return b""
        text = redactor.flush()
        if not text or redactor.blocked:
            return b""
        if key[1] == "content":
            self._keep(text)
        delta = _released_delta(key, text)
        if key in self.mirrored:
            delta["reasoning_details"] = [{"type": "reasoning.text", "index": self.mirrored[key], "text": text}]
        chunk = {**(self.head or {"object": "chat.completion.chunk"}),
                 "choices": [{"index": key[0], "delta": delta, "finish_reason": None}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def flush(self) -> bytes:
        """Whatever text is still held back, scanned, as one chunk (the stream is ending early)."""
        if self.ended:
            return b""
        if self._seams_blocked(list(self.seams)):
            return self.block(self.head or {})
        self.ended = True
        out, self.queue = b"".join(self.queue) + self._release(), []
        return self.block(self.head or {}) if self.seam_block is not None else out

    def _release(self) -> bytes:
        """Every window's held-back text, scanned, one chunk each."""
        return b"".join(self._released(key, redactor) for key, redactor in list(self.redactors.items()))

    def _unreadable(self, event: bytes) -> bytes:
        """An event whose data is no JSON object cannot be scanned: it is not forwarded (an
        SDK could not parse it either)."""
        self.unreadable.drop(event_bytes=len(event))
        return b""

    def _keep(self, emitted: str) -> None:
        """The streamed text as the client got it (redacted), for content logging; bounded."""
        if emitted and self.kept < CONTENT_LOG_CHARS:
            self.response_text.append(emitted)
            self.kept += len(emitted)

    def logged_response(self) -> str:
        """The response text a log line may hold: exactly what the client was sent."""
        return "".join(self.response_text)[:CONTENT_LOG_CHARS]

    def block(self, chunk: dict[str, Any]) -> bytes:
        self.ended = True
        self.queue = []  # (what waited on a seam)
        decision = self.blocked_by.block_decision if self.blocked_by is not None else self.seam_block
        if decision is not None:  # (a block in a chunk's other fields is recorded where it is found)
            record(decision, self.team, self.params.mode, "response")
        indexes = sorted({key[0] for key in self.redactors} | {0})
        # Only the chunk's head goes with it: its other fields may hold the very value that blocks.
        final = {**{k: v for k, v in chunk.items() if k in _HEAD and (k != "created" or _count(v, _MAX_CREATED))},
                 "choices": [{"index": i, "delta": {}, "finish_reason": "content_filter"} for i in indexes]}
        return b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n"


class EmbeddingsGuard:
    """Scans an embeddings answer (`POST /v1/embeddings`, never streamed). Vectors carry no
    text, but the answer is a provider's JSON like any other: a string anywhere else in it
    (an echoed input, a provider's extension field) reaches the client, so every string but
    the vectors (`embedding`: floats, or base64 of float32 bytes with `encoding_format: base64`;
    text under that name, or base64 of text, is read like any other) is scanned, and every
    number that could be a value (`read_json`: `"ref": 4111111111111111`, an integral
    `4.111111111111111e15`, in a vector too: no embedding is such a number), and a value
    redacted in place (a blocked one too); a body that is no JSON object with a
    `data` list is no answer and is not forwarded (`provider_error`)."""

    __slots__ = ("policy", "params", "team", "unreadable")

    def __init__(self, policy: Policy, params: DecisionParams, team: str) -> None:
        self.policy, self.params, self.team = policy, params, team
        self.unreadable = Unreadable()  # (never streamed: stays 0)

    def json_body(self, body: Any) -> bytes | None:
        if not (isinstance(body, dict) and isinstance(body.get("data"), list)):
            log.warning("response_unreadable", reason="no data")
            raise GatewayError("provider_error", "The provider answered with a body that is no embeddings answer; "
                               "it was not forwarded.")
        read = read_json(self.policy.scanner, body, _NOT_EMBEDDED_TEXT)
        if isinstance(read, LimitExceeded):
            log.warning("response_unreadable", reason=read.reason)
            raise GatewayError("provider_error", "The provider answered with a body output scanning could not read; "
                               "it was not forwarded.")
        decision = self.policy.scanner.decide(read.findings, self.params) if read.findings else None
        if decision is None or not (decision.block or decision.redact):
            return None
        record(decision, self.team, self.params.mode, "response")
        return orjson.dumps(rewritten(body, read, decision.replaced, _NOT_EMBEDDED_TEXT))

    def sse_event(self, event: bytes) -> bytes:  # never streamed; an SSE-labelled answer is read whole
        return b""

    def flush(self) -> bytes:
        return b""

    def logged_response(self) -> str:
        return ""


# The vectors (`embedding`) are skipped as blobs are (scanner._BLOB_KEYS): only when they are
# one (floats, or base64 of float32 bytes); text a provider writes there is read like any.
_NOT_EMBEDDED_TEXT = BINARY_KEYS

# Answer headers whose value the client never gets from the provider: Envoy writes them
# (`server`, the status, the framing; `x-gateway-backend` from the endpoint's metadata) or
# checks them as numbers. Every other header is a provider's text, `cache-control`, `vary`,
# `retry-after`, `x-ratelimit-*` and `x-gateway-*` names included (until 2026-12-08 those went
# out unread); a content type or a `date` (Envoy passes the provider's on) only when it is one
# of the forms that hold no value (`_ANSWER_TYPES`, `_HTTP_DATE`).
_OWN_HEADERS = frozenset({":status", "content-length", "transfer-encoding", "connection", "server",
                          "x-envoy-upstream-service-time", "x-gateway-backend"})
_ANSWER_TYPES = frozenset({"application/json", "application/json; charset=utf-8", "text/event-stream",
                           "text/event-stream; charset=utf-8", "application/vnd.amazon.eventstream"})
_HTTP_DATE = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                        r"[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT")


def _provider_text(name: str, value: str) -> bool:
    """Whether an answer header's value is a provider's text the client reads (`_OWN_HEADERS`)."""
    if name == "content-type":
        return value.lower() not in _ANSWER_TYPES
    if name == "date":
        return _HTTP_DATE.fullmatch(value) is None
    return name not in _OWN_HEADERS


def withheld_headers(policy: Policy, params: DecisionParams, team: str, headers: dict[str, str]) -> tuple[str, ...]:
    """The names of a provider's answer headers holding a value output scanning redacts or blocks
    (a debug header echoing the prompt, a `www-authenticate` quoting an address): a header is
    text the client reads like the body. A value cannot be cut out of a header safely, so the
    header is not forwarded."""
    named = [(k, v) for k, v in headers.items() if _provider_text(k, v)]
    if not named:
        return ()
    strings = [text for k, v in named for text in (k, v)]
    findings = policy.scanner.scan_strings(strings)
    decision = policy.scanner.decide(findings, params) if findings else None
    if decision is None or not (decision.block or decision.redact):
        return ()
    record(decision, team, params.mode, "response")
    return tuple(dict.fromkeys(named[f.index // 2][0] for f in decision.replaced))


WITHHELD_ERROR = "The provider sent an error whose message output scanning withheld."


def scanned_error(policy: Policy, params: DecisionParams, team: str, event: bytes) -> bytes:
    """A stream's error event (`data: {"error": ...}`, usually the provider's own, passed on
    by a translator) scanned like generated text (`scanned_error_object`). `[DONE]` goes as
    it is."""
    if event.startswith(b"data: [DONE]"):
        return event
    try:
        error = orjson.loads(event_data(event) or b"")
    except orjson.JSONDecodeError:
        error = None
    scanned = scanned_error_object(policy, params, team, error)
    return event if scanned is error else b"data: " + orjson.dumps(scanned) + b"\n\n"


def scanned_error_object(policy: Policy, params: DecisionParams, team: str, error: Any) -> dict[str, Any]:
    """A provider's error object (a stream's error event, a non-2xx answer) scanned like
    generated text: providers put anything in a message, the answer's text or the request's
    included. The same object when nothing is to change; a value that is redacted is redacted
    in place (a copy); one that blocks, or an object that cannot be read, gives a
    `provider_error` saying the error was withheld."""
    read = read_json(policy.scanner, error) if isinstance(error, dict) else LimitExceeded("no error object")
    if isinstance(read, LimitExceeded):
        return _withheld()
    decision = policy.scanner.decide(read.findings, params) if read.findings else None
    if decision is None or not (decision.block or decision.redact):
        return error
    record(decision, team, params.mode, "response")
    if decision.block:
        return _withheld()
    return rewritten(error, read, decision.redact)


def _identifiers(whole: list[Any]) -> list[tuple[dict[str, Any], str]]:
    """(dict, key) of the strings a JSON answer's scan skips as identifiers (`_NOT_TEXT`: `id`,
    `object`, `index`) but the answer's own `id` (read apart already) and `object` (when the
    schema's) and a tool call's `id` (it must come back as it went out): a provider's `message.x.id` or `{"ext": {"object":
    …}}` reaches the client like any text, so each is read apart, a whole value (until
    2026-12-05 every string under those names went out unread). `whole`: [choices, the
    answer's other fields]."""
    out: list[tuple[dict[str, Any], str]] = []
    stack: list[tuple[Any, Any, int]] = [(whole[0], "choices", 1), (whole[1], None, 1)]
    while stack:
        value, parent, depth = stack.pop()
        if depth > MAX_DEPTH:
            continue  # (read_json refuses such a body)
        if isinstance(value, list):
            stack += [(v, parent, depth + 1) for v in value if isinstance(v, (dict, list))]
            continue
        if not isinstance(value, dict):
            continue
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                stack.append((v, k, depth + 1))
            elif k in ("id", "object", "index") and isinstance(v, str) and v and \
                    not (k == "id" and (parent == "tool_calls" or value is whole[1])) and \
                    not (k == "object" and value is whole[1] and v == "chat.completion"):  # (the schema's)
                out.append((value, k))
    return out


def _withheld() -> dict[str, Any]:
    return error_object(WITHHELD_ERROR, "server_error", "provider_error")


# Strings of a choice that are the provider's identifiers, not generated text (and binary data):
# a tool call's `id` must come back as it went out. Its labels (`role`, `finish_reason`, a tool
# call's `type`) are scanned: a provider may put anything there, and a client reads them. The
# answer's own `id` is read apart (`ResponseGuard.json_body`), a chunk's with its labels (`_labels`).
_NOT_TEXT = BINARY_KEYS | {"id", "index", "object"}
# Labels of a stream chunk and the values the chat schema gives them: any other value is
# scanned like a field outside the schema (`_extras`).
_LABELS: dict[str, frozenset[str]] = {
    "role": frozenset({"assistant", "tool", "user", "system", "developer", "function"}),
    "finish_reason": frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"}),
    "type": frozenset({"function", "custom"}),
    "service_tier": frozenset({"auto", "default", "flex", "scale", "priority"}),
}
# Fields of the schema that hold a provider's annotations, never text of the answer, and are
# scanned like fields outside it (Azure's content-filter results, OpenAI's obfuscation padding,
# a usage object beside choices).
_ANNOTATIONS = frozenset({"obfuscation", "prompt_filter_results", "content_filter_results", "content_filter_offsets"})
_HEAD = frozenset({"id", "object", "created", "model", "system_fingerprint", "service_tier"})
# The head labels a provider writes into every stream chunk, read as text (`ResponseGuard._labels`):
# `object` is the schema's constant and `created` a timestamp; `service_tier` is read by value
# (`_LABELS`). A JSON answer's are read with it (`id` apart).
_CHUNK_LABELS = ("id", "model", "system_fingerprint")
# A JSON answer's labels that repeat on every answer, read once per value (`remember_labels`).
_MEMO_HEAD = ("model", "system_fingerprint", "service_tier")
_MAX_KNOWN_LABELS = 4096
# The generated text of a stream delta, beside `tool_calls[].function.arguments`.
_DELTA_TEXTS = ("content", "refusal", "reasoning_content")


# The chat stream schema's fields, by level; any other field's strings are scanned statelessly.
# (Azure's content-filter annotations hold only its labels: categories, severities, flags.)
_CHUNK_KEYS = _HEAD | {"choices", "usage", "obfuscation", "prompt_filter_results"}
_CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs", "content_filter_results",
                          "content_filter_offsets"})
_DELTA_KEYS = frozenset({"role", *_DELTA_TEXTS, "tool_calls", "function_call"})
# Windows whose text is JSON (`StreamRedactor(json=True)`): tool calls' arguments, and the
# deprecated `function_call`'s (still streamed to requests that send `functions`).
_JSON_TEXTS = ("tool_calls", "function_call")
_CALL_KEYS = frozenset({"index", "id", "type", "function", "custom"})
_FUNCTION_KEYS = frozenset({"name", "arguments", "input"})  # (`function`'s, and a custom tool's `custom`)


def _extras(chunk: dict[str, Any], choices: list[Any]) -> list[tuple[dict[str, Any], str]]:
    """(dict, key) of every field outside the chat stream schema, down to tool calls, and of
    the schema's labels holding a value it does not define and its annotations."""
    out = [] if chunk.keys() <= _CHUNK_KEYS else [(chunk, k) for k in chunk if k not in _CHUNK_KEYS]
    out += _odd(chunk, ("service_tier", *_ANNOTATIONS)) + [(chunk, k) for k in _not_strings(chunk, _CHUNK_LABELS)]
    if "created" in chunk and not _count(chunk["created"], _MAX_CREATED):
        out.append((chunk, "created"))
    if isinstance(chunk.get("usage"), dict) and not all(
            _count(v) or isinstance(v, dict) and all(map(_count, v.values())) for v in chunk["usage"].values()):
        out.append((chunk, "usage"))  # (usage was read before: `SseUsageTap`)
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if not choice.keys() <= _CHOICE_KEYS:
            out += [(choice, k) for k in choice if k not in _CHOICE_KEYS]
        out += _odd(choice, ("finish_reason", *_ANNOTATIONS))
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        out += _odd(delta, ("role",))
        if not delta.keys() <= _DELTA_KEYS:  # (a string there is a text with its own window: `_text_slots`)
            out += [(delta, k) for k, v in delta.items() if k not in _DELTA_KEYS and not isinstance(v, str)
                    and _nested_texts(k, v) is None]
            for name, value in delta.items():  # (their texts have windows: `_text_slots`)
                for _, part, field in _nested_texts(name, value) or ():
                    out += [(part, k) for k in part if k != field]
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            out += [(legacy, k) for k in legacy if k not in _FUNCTION_KEYS]
        elif legacy is not None:
            out.append((delta, "function_call"))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                out += [(call, k) for k in call if k not in _CALL_KEYS]
                out += _odd(call, ("type",)) + [(call, k) for k in _not_strings(call, ("id",))]
                for fn in (call.get("function"), call.get("custom")):
                    if isinstance(fn, dict):
                        out += [(fn, k) for k in fn if k not in _FUNCTION_KEYS or k == "name"
                                and not isinstance(fn[k], str)]
                    elif fn is not None:
                        out.append((call, "function" if fn is call.get("function") else "custom"))
    return list({(id(holder), key): (holder, key) for holder, key in out}.values())


# A chunk's `created` is a timestamp in seconds (ten digits until 2286); any other value is read.
_MAX_CREATED = 10 ** 10
_MAX_COUNT = 10 ** 8  # (a number under this is never a value: `scanner.keyed_text`)


def _count(value: Any, limit: int = _MAX_COUNT) -> bool:
    """A usage count or a timestamp as the schema gives it: a number (or null) too small to be
    a value (a card or an SSN a provider put there reached the client unread)."""
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool) and -limit < value < limit


def _not_strings(holder: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The fields among `keys`, which the schema gives a string, that `holder` holds as something
    else (an id written as a number, a model as an object): the guard reads those fields'
    strings only (`_labels`, `_tool_names`; a tool call's `id` not at all), and the openai SDK
    builds its chunks without validating them, so the client gets these as sent."""
    return [k for k in keys if holder.get(k) is not None and not isinstance(holder[k], str)]


def _odd(holder: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[dict[str, Any], str]]:
    """(dict, key) of the labels among `keys` holding a value the schema does not give them, and
    of the annotations present."""
    return [(holder, k) for k in keys if (v := holder.get(k)) is not None
            and not (k in _LABELS and isinstance(v, str) and v in _LABELS[k])]


SEAM_HEAD = 2048  # characters after a seam read with it at most (a window holds less)


@dataclass(slots=True)
class Seam:
    """Where a streamed answer's text moved on to another (a choice's content to a tool call's
    arguments, one Responses output item to the next), until decided: the first text's held
    tail, then what each text since brought (`parts`, the last one growing), and the text
    each part is of (`keys`; None: not known yet). A text that moves on again before it let
    anything out (the seam is decided when it does) joins the seam instead of closing it:
    a value may run over three texts or more, the middle ones shorter than the hold-back.
    `straight`: every text after the first begins in its part (a new tool call, content after
    reasoning), so the parts read joined as a client reads the texts one after the other; a
    text that goes on from before (texts interleaved chunk by chunk) is read on in its own
    window, and joined to the others only as numbers are across strings."""
    parts: list[str]
    keys: list[Any]
    straight: bool = True

    @property
    def key(self) -> Any:
        return self.keys[-1]

    def extend(self, key: Any, fresh: bool = True) -> bool:
        """The last part's text moves on to `key` (`fresh`: a text that begins there): True
        when the seam reads on into it; False when it must be decided first: `key` is one of
        its texts already (what comes there goes on in that text's own window, not after the
        others), or the seam is too long."""
        if key in self.keys or sum(map(len, self.parts)) > SEAM_HEAD:
            return False
        self.parts.append("")
        self.keys.append(key)
        self.straight = self.straight and fresh
        return True


# Read across a seam as strings of one text: the numbers, which bridge strings in a request
# too. Every other value is read with the texts joined as they are (`_spanning`).
_SEAM_NUMBERS = frozenset({"credit_card", "us_ssn", "iban", "phone"})


def seam_decision(policy: Policy, params: DecisionParams, team: str, seam: Seam) -> Decision | None:
    """The decision that ends a stream at a seam (its parts: the first text's held end, then
    what followed in each next text): a value read across it that would be redacted or
    blocked. A finding there that is only monitored is recorded here; None then."""
    spans = _spanning(policy.scanner, seam.parts, seam.straight)
    if not spans:
        return None
    decision = policy.scanner.decide(spans, params)
    if decision.block or decision.redact:
        return decision
    record(decision, team, params.mode, "response")
    return None


def _spanning(scanner: Scanner, parts: list[str], straight: bool) -> list[Finding]:
    """Findings that span two or more of `parts` and that no part's own scan covers its piece
    of (that piece is redacted in its own window, and the rest is no value): numbers read
    with the parts as strings of one text (they bridge strings, as in a request); when the
    parts are `straight` (`Seam`), every other value too (an e-mail whose local part ends one
    text and `@domain` begins the next, a key), read with the parts joined as a client that
    puts the texts together sees them: each part's own findings already redacted (`jane@
    example.com.` ending reasoning and `Sure` beginning the content are no new address)."""
    if sum(1 for p in parts if p) < 2:
        return []
    own = [scanner.scan(p) if p else [] for p in parts]
    pieces: dict[tuple[str, str], list[tuple[int, int, int]]] = {}  # (rule, value) -> (part, start, end)
    first: dict[tuple[str, str], Finding] = {}
    for f in scanner.scan_strings(parts):
        if f.detector in _SEAM_NUMBERS:
            pieces.setdefault((f.rule, f.value), []).append((f.index, f.start, f.end))
            first.setdefault((f.rule, f.value), f)
    out = [first[k] for k, p in pieces.items() if len({i for i, _, _ in p}) > 1
           and not any(o.start <= a and b <= o.end for i, a, b in p for o in own[i])]
    if straight:
        shown = [_blanked(p, o) for p, o in zip(parts, own)]
        ends = list(accumulate(map(len, shown)))
        for f in scanner.scan("".join(shown)):
            if f.detector not in _SEAM_NUMBERS and \
                    sum(1 for s, e in zip(shown, ends) if s and f.start < e and e - len(s) < f.end) > 1:
                out.append(f)
    return out


def _blanked(text: str, findings: list[Finding]) -> str:
    """`text` with each finding's span blanked (line breaks, which no value holds), same length."""
    for f in findings:
        text = text[:f.start] + "\n" * (f.end - f.start) + text[f.end:]
    return text


def _text_slots(index: int, delta: dict[str, Any],
                mirrored: frozenset[int] | set[int] = frozenset()) -> list[tuple[tuple[Any, ...], dict[str, Any], str]]:
    """(window key, dict, field) of every text in one choice's delta: the schema's, and any
    other string field (a provider's `reasoning`, `thinking`...), which a client reads as
    text too, so a value split over its chunks must be seen whole as well; but not the text
    of a nested entry in `mirrored` (ids: `_mirrors`)."""
    slots: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
        ((index, f), delta, f) for f in _DELTA_TEXTS if f in delta]
    if not delta.keys() <= _DELTA_KEYS:
        slots += [((index, f), delta, f) for f, v in delta.items() if f not in _DELTA_KEYS and isinstance(v, str)]
        slots += [((index, name, at, field), part, field) for name, value in delta.items()
                  for at, part, field in _nested_texts(name, value) or ()
                  if not (field == "text" and id(part) in mirrored)]
    legacy = delta.get("function_call")
    if isinstance(legacy, dict) and "arguments" in legacy:
        slots.append(((index, "function_call"), legacy, "arguments"))
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for k, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            at = call["index"] = _position(call.get("index"), k)
            fn = call.get("function")
            if isinstance(fn, dict) and "arguments" in fn:
                slots.append(((index, "tool_calls", at), fn, "arguments"))
            custom = call.get("custom")  # (a custom tool's free-form input: text, not JSON)
            if isinstance(custom, dict) and "input" in custom:
                slots.append(((index, "custom", at), custom, "input"))
    return slots


JOIN_TAIL = 256  # characters of a joined string read with its next piece (`ResponseGuard._joined_blocked`)
# Fields with a window of their own (`_text_slots`), by their names' path in a delta: not joined.
_WINDOWED = frozenset({("tool_calls", "function", "arguments"), ("tool_calls", "custom", "input"),
                       ("function_call", "arguments"), ("audio", "transcript"), ("reasoning_details", "text"),
                       ("reasoning_details", "summary")})


def _joined_leaves(delta: dict[str, Any]) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value) of each string and number of a delta that the openai SDK's stream helper
    joins (`accumulate_delta`: recursively, entries of a list by their integer `index`, but
    never `index` or `type`, which it replaces, nor a list of scalars, which it extends) and
    that has no window: `role`, a tool call's `id` and `name`, a provider's own objects. The
    delta's own strings but `role` are texts with windows."""
    out: list[tuple[tuple[Any, ...], Any]] = [(("role",), delta["role"])] if isinstance(delta.get("role"), str) else []
    stack: list[tuple[tuple[Any, ...], Any]] = [((k,), v) for k, v in delta.items() if isinstance(v, (dict, list))]
    while stack:
        path, value = stack.pop()
        if isinstance(value, list):
            stack += [((*path, e["index"]), e) for e in value if isinstance(e, dict) and type(e.get("index")) is int]
            continue
        for k, v in value.items():
            if k in ("index", "type"):
                continue
            if isinstance(v, (dict, list)):
                stack.append(((*path, k), v))
            elif isinstance(v, (str, int, float)) and not isinstance(v, bool) and \
                    (*(p for p in path if isinstance(p, str)), k) not in _WINDOWED:
                out.append(((*path, k), v))
    return out


def _label_piece(path: tuple[Any, ...], value: str) -> bool:
    """A delta's `role` as the schema gives it (providers repeat it in every chunk): no value
    is made of those words, so the pieces joined so far need not be read."""
    return path == ("role",) and value in _LABELS["role"]


MAX_POSITION = 1024  # (choices: `n` is at most 128; tool calls per answer)


def _position(value: Any, default: int) -> int:
    """A choice's, tool call's or reasoning entry's `index` as the key of its text's window.
    Clients group a stream's texts by it, with their own language's equality: `1`, `1.0` and
    `true` are one choice to a Python client, `1` and `"1"` to a JavaScript one; keyed by its
    exact value (a float or a string fell to the default), a value split over two spellings
    was read in two windows and joined by the client. So any integral spelling counts as that
    integer, anything else (or an integer no stream has, which would carry a value out
    unscanned) as `default`, and the caller writes the key back: the client groups as the
    windows did."""
    if isinstance(value, str) and value.isascii() and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, (int, float)) or isinstance(value, float) and not value.is_integer():
        return default
    return int(value) if 0 <= value < MAX_POSITION else default


def _mirrors(delta: dict[str, Any]) -> list[tuple[dict[str, Any], str, int]]:
    """OpenRouter sends a reasoning model's text twice, in `reasoning` and in the one entry of
    `reasoning_details`: (that entry, the string field it repeats, its index) when the two
    are equal. Read as one text (one window; the entry gets what the client is sent of the
    string): two windows of the same text, side by side, made a seam of every chunk (5x the
    cost of a reasoning stream)."""
    details = delta.get("reasoning_details")
    if not (isinstance(details, list) and len(details) == 1 and isinstance(details[0], dict)):
        return []
    entry = details[0]
    text = entry.get("text")
    if not isinstance(text, str) or entry.get("type", "reasoning.text") != "reasoning.text":
        return []
    at = _position(entry.get("index"), 0)
    return [(entry, f, at) for f in ("reasoning", "reasoning_content") if delta.get(f) == text][:1]


def _nested_texts(name: str, value: Any) -> list[tuple[int | None, dict[str, Any], str]] | None:
    """The texts a provider streams piecewise inside a delta's structured field, as (position,
    the dict holding it, its field): an audio answer's transcript (OpenAI: `delta.audio.
    transcript`, with `modalities: ["text", "audio"]`), and the reasoning text and summaries
    of OpenRouter's `reasoning_details` (each entry by its `index`). None for any other field
    (scanned event by event, `_extras`)."""
    if name == "audio" and isinstance(value, dict):
        return [(None, value, "transcript")] if "transcript" in value else []
    if name == "reasoning_details" and isinstance(value, list) and all(isinstance(d, dict) for d in value):
        for k, d in enumerate(value):
            if "index" in d:
                d["index"] = _position(d["index"], k)
        return [(d.get("index", k), d, field) for k, d in enumerate(value)
                for field in _REASONING_DETAIL_TEXTS if field in d]
    return None


# The text fields of a `reasoning_details` entry, and its `type` when it carries each.
_REASONING_DETAIL_TEXTS = {"text": "reasoning.text", "summary": "reasoning.summary"}


def _released_delta(key: tuple[Any, ...], text: str) -> dict[str, Any]:
    """The delta that carries a window's held `text` (its `key`, `_text_slots`) on its own."""
    if key[1] == "tool_calls":
        return {"tool_calls": [{"index": key[2], "function": {"arguments": text}}]}
    if key[1] == "custom":
        return {"tool_calls": [{"index": key[2], "custom": {"input": text}}]}
    if key[1] == "function_call":
        return {"function_call": {"arguments": text}}
    if len(key) == 4 and key[1] == "audio":
        return {"audio": {"transcript": text}}
    if len(key) == 4:  # (reasoning_details)
        return {key[1]: [{"type": _REASONING_DETAIL_TEXTS[key[3]], **({"index": key[2]} if key[2] is not None else {}),
                          key[3]: text}]}
    return {key[1]: text}


def _counts(obj: dict[str, Any]) -> dict[str, Any]:
    """A usage object's numbers (nested details included), without any text."""
    return {k: _counts(v) if isinstance(v, dict) else v for k, v in obj.items()
            if isinstance(v, (int, float, dict)) or v is None}


def _contents(choices: list[Any]) -> str:
    return "\n".join(m["content"] for c in choices if isinstance(c, dict) for m in [c.get("message")]
                     if isinstance(m, dict) and isinstance(m.get("content"), str))


def content_for_log(body: dict[str, Any]) -> str:
    strings = walk_strings(body.get("messages", body.get("input", "")))
    text = "\n".join(strings) if isinstance(strings, list) else ""
    return text[:CONTENT_LOG_CHARS]
