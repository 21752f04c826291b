"""Data classification and guardrail scanning: normalize, one pass, pure functions.

`Scanner.scan_strings(strings)` normalizes every string (`normalize`: NFKC, format characters
removed, Unicode digits to ASCII…), joins them with U+001F into ONE text (numeric detectors may
bridge that boundary, so a value split over messages, parts or tool results is one value) and
scans it once:

1. a Hyperscan pass over the whole text (`prefilter`) reports where a detector could match;
2. the combined regex (`Scanner.pattern`) runs only in those windows (or over the whole text
   for short texts and when Hyperscan is not available: same results):

    [^A-Za-z0-9_](?: <private_key>(?P<d_private_key>) | <jwt>(?P<d_jwt>) | … | <phrase trie> | …)

Every alternative ends in an empty named group (a marker), so `match.lastindex` says which
detector (or which keyword/phrase) matched without wrapping alternatives in groups, which
would disable the regex engine's first-character skipping. The leading boundary character
gives every detector the same "starts a token" rule and lets the engine skip to the next
non-word character between attempts. Keywords and injection phrases share one character
trie, so their cost does not grow with their number. Validators (Luhn, mod-97, …) run only
on candidates. Runs that may be base64, hex or URL-encoded are decoded and their text scanned
the same way (two levels deep); what is found inside counts over the whole run.

Findings are mapped back to the original strings (offsets and values in original characters;
one finding per string a split value covers).

Overlaps are resolved deterministically, like a lexer: the leftmost candidate wins; at the
same start the longest valid candidate wins, then the earlier detector in priority order
(secrets, then IBAN, email, card, SSN, IPv6, IPv4, phone, encoded runs, then custom regexes in
config order, then keywords/injection phrases, then injection patterns). Findings never
overlap. If a candidate fails validation, the other detectors are tried at the same start
before the scan moves on by one character.

`decide()` turns findings into what to do (block / redact / monitor, tiers, allowlist);
`redact()` replaces findings with typed placeholders; `walk_strings()` / `map_strings()`
reach the string values of a parsed JSON body iteratively, with depth and size guards.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import functools
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from re import _parser as _sre_parse  # (Python >= 3.11, pyproject's requires-python)
from typing import Any

from .detectors import (
    BOUNDARY,
    BRIDGE,
    BUILTIN_DETECTORS,
    ENCODED_PATTERN,
    MAX_DECODE_DEPTH,
    MIXED_NUMBER_PATTERN,
    NUMBER_WORDS_PATTERN,
    SPACED_PATTERN,
    STRUCTURAL,
    DEFAULT_INJECTION_PATTERNS,
    DEFAULT_INJECTION_PHRASES,
    PROMPT_INJECTION,
    SEP_CHARS,
    Validator,
    ssn_context_name,
    decode_payload,
    encoded_start_ok,
    wrapped_end,
    expand_phrase,
    normalize_phrase,
    number_words_run,
    phrase_start_ok,
    phrase_trie_pattern,
    spaced_run,
    texty,
)

from .normalize import (Normalized, digit_array, json_placeholder, json_quotes, json_rendered, normalize,
                        normalize_json, rendered, tables)
from .prefilter import (BUILTIN_TRIGGERS, ENCODED_RUN_TRIGGERS, ENCODED_TRIGGERS, MIXED_NUMBER_TRIGGERS,
                        NUMBER_WORDS_TRIGGERS, SPACED_TRIGGERS, Trigger, phrase_trigger, regex_trigger,
                        template_trigger)
from .prefilter import build as build_prefilter

# A region's check on a candidate v[start:end]: the accepted end, or 0 to reject.
Check = Callable[[str, int, int], int]


def _detector_check(validator: Validator | None,
                    start_ok: Callable[[str, int], bool] | None,
                    context_ok: Callable[[str, int, int], bool] | None = None) -> Check | None:
    if validator is None and start_ok is None and context_ok is None:
        return None

    def check(v: str, start: int, end: int) -> int:
        if start_ok is not None and not start_ok(v, start):
            return 0
        if validator is not None:
            k = validator(v[start:end])
            if not k:
                return 0
            end = start + k
        if context_ok is not None and not context_ok(v, start, end):
            return 0
        return end
    return check


def _phrase_check(v: str, start: int, end: int) -> int:
    return end if phrase_start_ok(v[start - 1], v[start]) else 0


ACTIONS = ("monitor", "redact", "block")
MODES = ("monitor", "soft", "enforce")
DEFAULT_TIERS: tuple[str, ...] = ("public", "internal", "confidential", "restricted")


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """What to do when `detector` finds something. `critical` rules block even in `soft` mode.

    `min_tier`: the lowest data tier a model must be approved for to receive this data.
    """

    name: str
    detector: str
    action: str = "monitor"
    min_tier: str | None = None
    critical: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("rule without a name")
        if self.action not in ACTIONS:
            raise ValueError(f"rule {self.name!r}: action must be one of {ACTIONS}, not {self.action!r}")


@dataclass(frozen=True, slots=True)
class CustomRule:
    """A rule with its own detector: a user `regex`, or `keywords` (case-insensitive, whole-word).

    A custom regex matches at token starts only (start of text, or after a character that is
    not an ASCII letter/digit/underscore), like the built-in detectors. Backreferences are
    not supported (the pattern is joined with others); named groups are allowed (ignored).
    """

    name: str
    kind: str  # "regex" | "keywords"
    pattern: str | None = None
    keywords: tuple[str, ...] = ()
    action: str = "monitor"
    min_tier: str | None = None
    critical: bool = False
    ignore_case: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keywords", tuple(self.keywords))
        if self.kind == "regex":
            if not self.pattern:
                raise ValueError(f"custom rule {self.name!r}: a regex rule needs a pattern")
        elif self.kind == "keywords":
            if not self.keywords:
                raise ValueError(f"custom rule {self.name!r}: a keywords rule needs keywords")
        else:
            raise ValueError(f"custom rule {self.name!r}: kind must be 'regex' or 'keywords'")
        self.rule()  # validates name and action

    def rule(self) -> Rule:
        return Rule(self.name, self.name, self.action, self.min_tier, self.critical)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> CustomRule:
        kind = m.get("kind", m.get("type"))
        if kind is None:
            kind = "regex" if "pattern" in m or "regex" in m else "keywords"
        return cls(
            name=str(m["name"]),
            kind=str(kind),
            pattern=m.get("pattern", m.get("regex")),
            keywords=tuple(m.get("keywords", ())),
            action=str(m.get("action", "monitor")),
            min_tier=m.get("min_tier"),
            critical=bool(m.get("critical", False)),
            ignore_case=bool(m.get("ignore_case", False)),
        )


@dataclass(frozen=True, slots=True)
class InjectionConfig:
    """Prompt-injection guard: phrases (case-insensitive, whole-word, any whitespace between
    words; `{a|b|}` alternatives, see `detectors.expand_phrase`) and regex patterns
    (case-insensitive), each with a weight. A text's score is the sum of the weights of the
    *distinct* phrase templates/patterns found (over all strings of one `scan_strings`
    call); the detector triggers when score >= threshold."""

    phrases: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_INJECTION_PHRASES))
    patterns: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_INJECTION_PATTERNS))
    threshold: float = 1.0

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError("injection threshold must be > 0")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> InjectionConfig:
        """`{phrases: {text: weight}, patterns: {regex: weight}, threshold, include_defaults}`."""
        defaults = bool(m.get("include_defaults", True))
        phrases = dict(DEFAULT_INJECTION_PHRASES) if defaults else {}
        patterns = dict(DEFAULT_INJECTION_PATTERNS) if defaults else {}
        phrases.update({str(k): float(v) for k, v in (m.get("phrases") or {}).items()})
        patterns.update({str(k): float(v) for k, v in (m.get("patterns") or {}).items()})
        return cls(phrases, patterns, float(m.get("threshold", 1.0)))


DEFAULT_RULES: tuple[Rule, ...] = (
    # Credentials: never leave, whatever the model.
    Rule("private_key", "private_key", "block", "restricted", critical=True),
    Rule("jwt", "jwt", "block", "restricted", critical=True),
    Rule("anthropic_key", "anthropic_key", "block", "restricted", critical=True),
    Rule("openai_key", "openai_key", "block", "restricted", critical=True),
    Rule("gateway_key", "gateway_key", "block", "restricted", critical=True),
    Rule("gateway_admin_token", "gateway_admin_token", "block", "restricted", critical=True),
    Rule("github_token", "github_token", "block", "restricted", critical=True),
    Rule("aws_access_key", "aws_access_key", "block", "restricted", critical=True),
    Rule("service_token", "service_token", "block", "restricted", critical=True),
    # Financial / government identifiers: replaced by placeholders.
    Rule("credit_card", "credit_card", "redact", "restricted"),
    Rule("us_ssn", "us_ssn", "redact", "restricted"),
    Rule("iban", "iban", "redact", "confidential"),
    # Contact data.
    Rule("email", "email", "redact", "confidential"),
    Rule("phone", "phone", "redact", "confidential"),
    # Infrastructure: logged only.
    Rule("ipv4", "ipv4", "monitor", "internal"),
    Rule("ipv6", "ipv6", "monitor", "internal"),
    # Guardrail: heuristic, so not critical (soft mode logs it).
    Rule("prompt_injection", PROMPT_INJECTION, "block", None),
)


# -- findings and decisions ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """`text[start:end]` of string `index` matched `detector` for `rule`.

    `value` is kept out of repr so a logged finding never shows the data. `score` is set on
    prompt-injection findings (the total score that triggered them).
    """

    rule: str
    detector: str
    start: int
    end: int
    value: str = field(default="", repr=False)
    index: int = 0
    score: float | None = None


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """Exempts matching findings. Exactly one of `value` (exact) or `pattern` (regex, full
    match); `reason` is mandatory. `rules`: rule or detector names it applies to (all if empty)."""

    reason: str
    value: str | None = None
    pattern: str | None = None
    rules: tuple[str, ...] = ()
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("allowlist entry without a reason")
        if (self.value is None) == (self.pattern is None):
            raise ValueError("allowlist entry needs exactly one of value or pattern")
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.pattern is not None:
            try:
                object.__setattr__(self, "_regex", re.compile(self.pattern))
            except re.error as exc:
                raise ValueError(f"allowlist pattern {self.pattern!r}: {exc}") from None

    def matches(self, finding: Finding) -> bool:
        if self.rules and finding.rule not in self.rules and finding.detector not in self.rules:
            return False
        if self._regex is not None:
            return self._regex.fullmatch(finding.value) is not None
        return finding.value == self.value

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> AllowEntry:
        return cls(
            reason=m.get("reason", ""), value=m.get("value"), pattern=m.get("pattern"),
            rules=tuple(m.get("rules", ())),
        )


@dataclass(frozen=True, slots=True)
class DecisionParams:
    """`mode`: monitor = log only; soft = only critical rules block (redactions apply, other
    blocks are logged); enforce = every action applies. `model_tier`: the tier the target
    model is approved for; data above it blocks (enforce; soft: if a critical rule's)."""

    mode: str = "enforce"
    allowlist: tuple[AllowEntry, ...] = ()
    tiers: tuple[str, ...] = DEFAULT_TIERS
    model_tier: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        object.__setattr__(self, "allowlist", tuple(self.allowlist))
        object.__setattr__(self, "tiers", tuple(self.tiers))
        if self.model_tier is not None and self.model_tier not in self.tiers:
            raise ValueError(f"unknown tier {self.model_tier!r} (tiers: {self.tiers})")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> DecisionParams:
        """`{mode, allowlist: [{value|pattern, reason, rules}], tiers, model_tier}`."""
        return cls(
            mode=str(m.get("mode", "enforce")),
            allowlist=tuple(e if isinstance(e, AllowEntry) else AllowEntry.from_mapping(e)
                            for e in m.get("allowlist") or ()),
            tiers=tuple(m.get("tiers") or DEFAULT_TIERS),
            model_tier=m.get("model_tier"),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    block: bool
    blocked_rules: tuple[str, ...]  # rules whose findings block (incl. tier violations that block)
    blocking: tuple[Finding, ...]
    redact: tuple[Finding, ...]
    monitor: tuple[Finding, ...]  # log-only events (monitor rules, and actions the mode suspends)
    allowlisted: tuple[tuple[Finding, AllowEntry], ...]
    detected_tier: str | None  # highest min_tier over all non-allowlisted findings
    outgoing_tier: str | None  # same, over what leaves as is (not redacted)
    tier_violations: tuple[Finding, ...]  # outgoing findings above DecisionParams.model_tier
    tier_block: bool

    @property
    def replaced(self) -> tuple[Finding, ...]:
        """What an answer loses in place: the redactions, and when it blocks the blocking
        values too (a blocked value outside the generated text becomes its placeholder)."""
        return (*self.blocking, *self.redact) if self.block else self.redact

    @property
    def allowlist_applied(self) -> tuple[AllowEntry, ...]:
        seen: dict[int, AllowEntry] = {}
        for _, entry in self.allowlisted:
            seen.setdefault(id(entry), entry)
        return tuple(seen.values())


def decide(
    findings: Iterable[Finding], rules: Mapping[str, Rule], params: DecisionParams | None = None,
) -> Decision:
    """What to do with `findings` (pure; `rules` by name, e.g. `Scanner.rules`)."""
    if not findings:  # most texts: nothing to decide, one shared answer
        return CLEAN
    params = params or DecisionParams()
    mode = params.mode
    rank = {t: i for i, t in enumerate(params.tiers)}
    blocking: list[Finding] = []
    redact_: list[Finding] = []
    monitor: list[Finding] = []
    allowlisted: list[tuple[Finding, AllowEntry]] = []
    considered: list[tuple[Finding, Rule]] = []
    for f in findings:
        rule = rules.get(f.rule)
        if rule is None:
            raise ValueError(f"finding for unknown rule {f.rule!r}")
        entry = next((e for e in params.allowlist if e.matches(f)), None)
        if entry is not None:
            allowlisted.append((f, entry))
            continue
        considered.append((f, rule))
        if mode == "monitor":
            monitor.append(f)
        elif rule.action == "block" and (mode == "enforce" or rule.critical):
            blocking.append(f)
        elif rule.action == "redact":
            redact_.append(f)
        else:
            monitor.append(f)

    def tier_rank(rule: Rule) -> int:
        if rule.min_tier is None:
            return -1
        if rule.min_tier not in rank:
            raise ValueError(f"rule {rule.name!r}: unknown tier {rule.min_tier!r}")
        return rank[rule.min_tier]

    redacted = {id(f) for f in redact_}
    detected = max((tier_rank(r) for _, r in considered), default=-1)
    outgoing_pairs = [(f, r) for f, r in considered if id(f) not in redacted]
    outgoing = max((tier_rank(r) for _, r in outgoing_pairs), default=-1)
    violations: list[tuple[Finding, Rule]] = []
    if params.model_tier is not None:
        limit = rank[params.model_tier]
        violations = [(f, r) for f, r in outgoing_pairs if tier_rank(r) > limit]
    tier_block = bool(violations) and (
        mode == "enforce" or (mode == "soft" and any(r.critical for _, r in violations)))
    blocked_rules = dict.fromkeys(f.rule for f in blocking)
    if tier_block:
        blocked_rules.update(dict.fromkeys(f.rule for f, _ in violations))
    return Decision(
        block=bool(blocking) or tier_block,
        blocked_rules=tuple(blocked_rules),
        blocking=tuple(blocking),
        redact=tuple(redact_),
        monitor=tuple(monitor),
        allowlisted=tuple(allowlisted),
        detected_tier=params.tiers[detected] if detected >= 0 else None,
        outgoing_tier=params.tiers[outgoing] if outgoing >= 0 else None,
        tier_violations=tuple(f for f, _ in violations),
        tier_block=tier_block,
    )


CLEAN = Decision(False, (), (), (), (), (), None, None, (), False)  # what no findings decide

# -- the scanner -----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Region:
    """One top-level alternative of the combined pattern."""

    priority: int
    kind: str  # builtin | regex | phrases | injection
    solo: re.Pattern[str]  # the alternative alone, boundary character included
    group_base: int  # its groups' offset in the combined pattern
    check: Check | None
    first: frozenset[str] | None = None  # every possible first character, when known
    later_all: tuple[_Region, ...] = ()
    later_overlap: tuple[_Region, ...] = ()


@dataclass(frozen=True, slots=True)
class _Target:
    rule: str | None  # None: a prompt-injection hit (rules resolved when the score triggers)
    detector: str
    key: str | None = None  # injection phrase/pattern (for distinct counting)


Hit = tuple[int, int, int]  # (start, end, marker group) in the scanned string


_LEADING_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")
_NAMED_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")
_BACKREF = re.compile(r"\(\?P=|\\[1-9]|\\g<")


def _user_regex(source: str, what: str) -> str:
    if _BACKREF.search(source):
        raise ValueError(f"{what}: backreferences are not supported")
    m = _LEADING_FLAGS.match(source)
    if m:  # global flags are only allowed at the very start: scope them instead
        source = f"(?{m.group(1)}:{source[m.end():]})"
    source = _NAMED_GROUP.sub("(", source)
    try:
        compiled = re.compile(source)
    except re.error as exc:
        raise ValueError(f"{what}: invalid regex: {exc}") from None
    if compiled.match("") is not None:
        raise ValueError(f"{what}: the regex matches the empty string")
    return source


_C = _sre_parse  # the stdlib's regex parser, to learn which characters can start a pattern
_CATEGORY_ESCAPES = {
    _C.CATEGORY_DIGIT: r"\d", _C.CATEGORY_NOT_DIGIT: r"\D", _C.CATEGORY_SPACE: r"\s",
    _C.CATEGORY_NOT_SPACE: r"\S", _C.CATEGORY_WORD: r"\w", _C.CATEGORY_NOT_WORD: r"\W",
}
# Characters the engine folds together under IGNORECASE beyond lower()/upper().
_CASE_EXTRAS = {"i": "\u0130\u0131", "k": "\u212a", "s": "\u017f", "\u00b5": "\u03bc", "\u00e5": "\u212b",
                "\u00df": "\u1e9e", "\u03c9": "\u2126"}


def _class_char(code: int) -> str:
    ch = chr(code)
    return "\\" + ch if ch in "\\]^-[&~|" else ch


def _case_variants(code: int) -> list[str]:
    ch = chr(code)
    low = ch.lower()
    variants = {ch, low, ch.upper(), ch.title(), *_CASE_EXTRAS.get(low, "")}
    for k, extra in _CASE_EXTRAS.items():
        if ch in extra:
            variants.add(k)
            variants.update(extra)
    return [_class_char(ord(v)) for v in sorted(variants) if len(v) == 1]


def _first_items(data: Any, icase: bool) -> tuple[list[str] | None, bool]:
    """Character-class items covering every first character the parsed pattern can match
    (None when unknown; a superset is always fine), and whether it can match empty."""
    return _first_of_seq([(op, av, icase) for op, av in data])


def _first_of_op(op: Any, av: Any, icase: bool) -> tuple[list[str] | None, bool]:
    if op is _C.LITERAL:
        return (_case_variants(av) if icase else [_class_char(av)]), False
    if op is _C.IN:
        items: list[str] = []
        for iop, iav in av:
            if iop is _C.LITERAL:
                items += _case_variants(iav) if icase else [_class_char(iav)]
            elif iop is _C.RANGE:
                lo, hi = iav
                items.append(f"{_class_char(lo)}-{_class_char(hi)}")
                if icase:
                    if hi - lo > 1024:
                        return None, False
                    for code in range(lo, hi + 1):
                        items += _case_variants(code)
            elif iop is _C.CATEGORY and iav in _CATEGORY_ESCAPES:
                items.append(_CATEGORY_ESCAPES[iav])
            else:
                return None, False
        return items, False
    if op is _C.BRANCH:
        items, any_empty = [], False
        for alt in av[1]:
            sub, empty = _first_items(alt.data, icase)
            if sub is None:
                return None, False
            items += sub
            any_empty = any_empty or empty
        return items, any_empty
    if op is _C.SUBPATTERN:
        _, add, remove, sub_pattern = av
        flag = _C.SRE_FLAG_IGNORECASE
        return _first_items(sub_pattern.data, (icase or bool(add & flag)) and not remove & flag)
    if op in (_C.MAX_REPEAT, _C.MIN_REPEAT, getattr(_C, "POSSESSIVE_REPEAT", None)):
        lo, _, sub_pattern = av
        sub, empty = _first_items(sub_pattern.data, icase)
        return sub, empty or lo == 0
    if op is getattr(_C, "ATOMIC_GROUP", None):
        return _first_items(av.data, icase)
    return None, False


_ZERO_WIDTH = (_C.AT, _C.ASSERT, _C.ASSERT_NOT)
_REPEATS = tuple(op for op in (_C.MAX_REPEAT, _C.MIN_REPEAT, getattr(_C, "POSSESSIVE_REPEAT", None)) if op)


def _seq(data: Any, icase: bool) -> list[tuple[Any, Any, bool]]:
    return [(op, av, icase) for op, av in data]


def _first_of_seq(seq: list[tuple[Any, Any, bool]]) -> tuple[list[str] | None, bool]:
    items: list[str] = []
    for op, av, icase in seq:
        if op in _ZERO_WIDTH:
            continue  # zero-width: the first character comes later
        sub, empty = _first_of_op(op, av, icase)
        if sub is None:
            return None, False
        items += sub
        if not empty:
            return items, False
    return items, True


def _first_two(seq: list[tuple[Any, Any, bool]]) -> tuple[list[str], list[str]] | None:
    """Class items for the first and the second character of every match, or None."""
    for i, (op, av, icase) in enumerate(seq):
        if op not in _ZERO_WIDTH:
            break
    else:
        return None
    rest = seq[i + 1:]
    if op in (_C.LITERAL, _C.IN):
        first, _ = _first_of_op(op, av, icase)
        second, empty = _first_of_seq(rest)
        return (first, second) if first and second and not empty else None
    if op is _C.BRANCH:
        firsts: list[str] = []
        seconds: list[str] = []
        for alt in av[1]:
            pair = _first_two(_seq(alt.data, icase) + rest)
            if pair is None:
                return None
            firsts += pair[0]
            seconds += pair[1]
        return firsts, seconds
    if op is _C.SUBPATTERN:
        _, add, remove, sub_pattern = av
        flag = _C.SRE_FLAG_IGNORECASE
        return _first_two(_seq(sub_pattern.data, (icase or bool(add & flag)) and not remove & flag) + rest)
    if op is getattr(_C, "ATOMIC_GROUP", None):
        return _first_two(_seq(av.data, icase) + rest)
    if op in _REPEATS:
        lo, hi, sub_pattern = av
        sub = list(sub_pattern.data)
        if len(sub) != 1 or sub[0][0] not in (_C.LITERAL, _C.IN) or lo < 1:
            return None
        first, _ = _first_of_op(sub[0][0], sub[0][1], icase)
        if not first:
            return None
        if lo >= 2:
            return first, first
        if hi < 2:
            return _first_two([(sub[0][0], sub[0][1], icase)] + rest)
        after, empty = _first_of_seq(rest)
        return (first, first + after) if after is not None and not empty else None
    return None


def _first_chars(source: str) -> frozenset[str] | None:
    """The characters a match of `source` can start with, if a small explicit set."""
    try:
        items, empty = _first_items(_sre_parse.parse(source).data, False)
    except Exception:  # pragma: no cover
        return None
    if not items or empty:
        return None
    chars: set[str] = set()
    for item in items:
        if item.startswith("\\"):
            if len(item) != 2 or item[1].isalnum():
                return None  # a category (\d, \w, ...)
            item = item[1]
        if len(item) == 1:
            chars.add(item)
        elif len(item) >= 3 and "-" in item[1:]:
            lo, hi = _range_ends(item)
            if hi - lo > 512:
                return None
            chars.update(chr(c) for c in range(lo, hi + 1))
        else:
            return None
    return frozenset(chars)


def _range_ends(item: str) -> tuple[int, int]:
    if item.startswith("\\"):
        lo, rest = item[1], item[3:]
    else:
        lo, rest = item[0], item[2:]
    hi = rest[1] if rest.startswith("\\") else rest[0]
    return ord(lo), ord(hi)


def _gated(source: str) -> str:
    """`source` behind a one- or two-character gate the engine tests without entering it.

    The regex engine skips an alternative cheaply only when it starts with a literal or a
    character class, and entering an alternative costs far more than testing a class.
    Alternatives are rewritten as `[a][b](?<=(?=source)[a][b])`: two class tests per
    attempt; on a hit the look-behind steps back and the look-ahead matches `source` in
    place, its end marker recording where the value ends (the match itself ends at the
    gate). The classes come from the parsed pattern and are a superset, so nothing is lost.
    """
    try:
        data = _sre_parse.parse(source).data
    except Exception:  # pragma: no cover - the source compiled already
        return source
    if data and data[0][0] in (_C.LITERAL, _C.IN):
        return source  # the engine tests the first character itself
    pair = _first_two(_seq(data, False))
    if pair is not None:
        a = "[" + "".join(dict.fromkeys(pair[0])) + "]"
        b = "[" + "".join(dict.fromkeys(pair[1])) + "]"
        return f"{a}{b}(?<=(?={source}){a}{b})"
    items, empty = _first_items(data, False)
    if not items or empty:
        return source
    gate = "[" + "".join(dict.fromkeys(items)) + "]"
    return f"{gate}(?<=(?={source}){gate})"


def _wrapped_ends(v: str, start: int, end: int) -> tuple[int, ...]:
    """Where a run v[start:end] may end: its end; for a run wrapped over lines that does not
    decode whole (a word on the line after it, taken for one more line), before its last line,
    and after its first."""
    last = v.rfind("\n", start, end)
    if last < 0:
        return (end,)
    first = v.find("\n", start, end)
    return end, last - (v[last - 1] == "\r"), first - (v[first - 1] == "\r")


def _label(detector: str) -> str:
    d = BUILTIN_DETECTORS.get(detector)
    if d is not None and d.label:
        return d.label
    return re.sub(r"[^A-Za-z0-9]+", "_", detector).strip("_").upper() or "REDACTED"


_ENCODED = "e_encoded"
_SPACED = "e_spaced"
_WORDS = "e_words"
_MIXED = "e_mixed"
# The run regions: kind -> (its Hyperscan triggers, the name of its check, the text to decode for
# a run there (None: the run)).
_RUN_KINDS: dict[str, tuple[tuple[Trigger, ...], str, Callable[[str, int, int], str] | None]] = {
    "encoded": (ENCODED_TRIGGERS, "_encoded_check", None),
    "spaced": (SPACED_TRIGGERS, "_spaced_check", spaced_run),
    "words": (NUMBER_WORDS_TRIGGERS, "_words_check", number_words_run),
    "mixed": (MIXED_NUMBER_TRIGGERS, "_words_check", number_words_run),
}


class _Depth(threading.local):
    value = 0


_DEPTH = _Depth()  # decoding depth of the scan running on this thread


# What may precede the rest of a split number at the start of a string: keys of JSON arguments
# (structural words, each followed by the boundary), separators.
_CONTINUATION = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.\-]{0,63}[\x1e\x1f])*[ .\-/_\t\r\n]*")


def _pieces(f: Finding, v: str, segs: Sequence[tuple[int, int, int, Normalized, str]],
            starts: Sequence[int]) -> Iterator[Finding]:
    """A finding over the joined normalized text `v`, as findings in the original strings: one
    per string it covers (structural strings it bridged over, such as a role, are left out).
    The value is the original text, or the decoded value for a finding inside an encoded run."""
    decoded = f.value != v[f.start:f.end]
    k = max(0, bisect.bisect_right(starts, f.start) - 1)
    pieces: list[tuple[int, int, int, str]] = []  # (index, orig start, orig end, original string)
    for j in range(k, len(segs)):
        index, vs, ve, nz, orig = segs[j]
        if vs >= f.end and j > k:
            break
        ps, pe = max(f.start, vs), min(f.end, ve)
        if ps >= pe:
            continue
        if vs > f.start and ve < f.end and STRUCTURAL.fullmatch(nz.text):
            continue
        if ps == vs and j > k:  # a continuation: not the keys before it (tool-call arguments)
            ps += _CONTINUATION.match(nz.text, 0).end()
            if ps >= pe:
                continue
        pieces.append((index, nz.start(ps - vs), nz.end(pe - vs), orig))
    value = f.value if decoded else "".join(orig[os_:oe] for _, os_, oe, orig in pieces)
    for index, os_, oe, _ in pieces:
        yield Finding(f.rule, f.detector, os_, oe, value, index, f.score)


class Scanner:
    """Compiled rules; immutable and safe to share between threads and requests."""

    __slots__ = ("pattern", "rules", "tiers", "injection", "_search", "_region_at",
                 "_targets_at", "_injection_rules", "_regions", "_weights", "_runs", "_decoded",
                 "_prefilter", "_triggers")

    pattern: re.Pattern[str]
    rules: dict[str, Rule]

    @classmethod
    def compile(
        cls,
        rules: Iterable[Rule] | None = None,
        custom_rules: Iterable[CustomRule | Mapping[str, Any]] = (),
        injection_config: InjectionConfig | Mapping[str, Any] | None = None,
        *,
        tiers: Sequence[str] = DEFAULT_TIERS,
    ) -> Scanner:
        """`rules=None` means `DEFAULT_RULES`. Only detectors some rule uses are compiled in."""
        base_rules = list(DEFAULT_RULES if rules is None else rules)
        customs = [c if isinstance(c, CustomRule) else CustomRule.from_mapping(c) for c in custom_rules]
        if isinstance(injection_config, Mapping):
            injection_config = InjectionConfig.from_mapping(injection_config)
        all_rules = base_rules + [c.rule() for c in customs]
        by_name: dict[str, Rule] = {}
        for r in all_rules:
            if r.name in by_name:
                raise ValueError(f"duplicate rule name {r.name!r}")
            if r.min_tier is not None and r.min_tier not in tiers:
                raise ValueError(f"rule {r.name!r}: unknown tier {r.min_tier!r} (tiers: {tuple(tiers)})")
            by_name[r.name] = r
        custom_names = {c.name for c in customs}
        for c in customs:
            if c.name in BUILTIN_DETECTORS or c.name == PROMPT_INJECTION:
                raise ValueError(f"custom rule {c.name!r}: the name of a built-in detector")
        for r in base_rules:
            if r.detector not in BUILTIN_DETECTORS and r.detector != PROMPT_INJECTION \
                    and r.detector not in custom_names:
                raise ValueError(f"rule {r.name!r}: unknown detector {r.detector!r}")

        def targets_for(detector: str) -> list[_Target]:
            return [_Target(r.name, detector) for r in all_rules if r.detector == detector]

        # (kind, source, check, {marker: targets}) in priority order
        specs: list[tuple[str, str, Check | None, dict[str, list[_Target]]]] = []
        for name, det in BUILTIN_DETECTORS.items():
            targets = targets_for(name)
            if targets:
                marker = f"d_{name}"
                check = _detector_check(det.validator, det.start_ok, det.context_ok)
                specs.append(("builtin", f"(?:{det.pattern})(?P<{marker}>)", check, {marker: targets}))
        # Encoded payloads: decoded and scanned when some rule could find something in them.
        if all_rules:
            specs.append(("encoded", f"(?:{ENCODED_PATTERN})(?P<{_ENCODED}>)", None, {_ENCODED: []}))
            # (regions of their own: their gates differ from the other runs')
            specs.append(("spaced", f"(?:{SPACED_PATTERN})(?P<{_SPACED}>)", None, {_SPACED: []}))
            specs.append(("words", f"(?:{NUMBER_WORDS_PATTERN})(?P<{_WORDS}>)", None, {_WORDS: []}))
            # (apart from the words: a region's gate is its first two characters, and a
            # mixed run's takes every number, which the words' many look-behinds then cost)
            specs.append(("mixed", f"(?:{MIXED_NUMBER_PATTERN})(?P<{_MIXED}>)", None, {_MIXED: []}))
        for i, c in enumerate(c for c in customs if c.kind == "regex"):
            source = _user_regex(c.pattern or "", f"custom rule {c.name!r}")
            if c.ignore_case:
                source = f"(?i:{source})"
            specs.append(("regex", f"(?:{source})(?P<c{i}>)", None, {f"c{i}": targets_for(c.name)}))

        injection = None
        if any(r.detector == PROMPT_INJECTION for r in all_rules):
            injection = injection_config if injection_config is not None else InjectionConfig()
        phrases: dict[str, list[_Target]] = {}
        for c in customs:
            if c.kind == "keywords":
                for kw in c.keywords:
                    targets = phrases.setdefault(normalize_phrase(kw), [])
                    new = targets_for(c.name)
                    targets.extend(t for t in new if t not in targets)
        if injection is not None:
            for template in injection.phrases:
                target = _Target(None, PROMPT_INJECTION, "phrase:" + template)
                for norm in expand_phrase(template):
                    targets = phrases.setdefault(norm, [])
                    if target not in targets:
                        targets.append(target)
        if phrases:
            markers = {f"k{j}": (p, t) for j, (p, t) in enumerate(phrases.items())}
            source = phrase_trie_pattern((p, m) for m, (p, _) in markers.items())
            specs.append(("phrases", source, _phrase_check, {m: t for m, (_, t) in markers.items()}))
        if injection is not None:
            for j, pat in enumerate(injection.patterns):
                source = _user_regex(pat, f"injection pattern {pat!r}")
                specs.append(("injection", f"(?i:{source})(?P<j{j}>)", None,
                              {f"j{j}": [_Target(None, PROMPT_INJECTION, "pattern:" + pat)]}))

        triggers: list[Trigger] = []
        ascii_only = False
        for kind, source, _, marker_targets in specs:
            if kind == "builtin":
                triggers += BUILTIN_TRIGGERS[next(iter(marker_targets))[2:]]
            elif kind in _RUN_KINDS:
                triggers += _RUN_KINDS[kind][0]
            elif kind == "phrases":
                keywords = {normalize_phrase(kw) for c in customs if c.kind == "keywords" for kw in c.keywords}
                triggers += [phrase_trigger(p) for p in sorted(keywords)]
                triggers += [template_trigger(t) for t in (injection.phrases if injection is not None else ())]
                ascii_only = ascii_only or not all(p.isascii() for p in phrases)
            else:
                triggers.append(regex_trigger(source, BOUNDARY))
                ascii_only = ascii_only or not source.isascii()
        if all_rules:
            triggers += ENCODED_RUN_TRIGGERS  # (last: `prefilter.ENCODED_RUN_TRIGGERS`)
        specs = [(kind, _gated(source), v, mt) for kind, source, v, mt in specs]
        self = cls.__new__(cls)
        self._prefilter = None
        # (once each: detectors share triggers, and a repeat is matched and collected again)
        self._triggers = (tuple(dict.fromkeys(triggers)), ascii_only)
        combined = f"{BOUNDARY}(?:{'|'.join(s for _, s, _, _ in specs)})" if specs else f"{BOUNDARY}(?!)"
        self.pattern = re.compile(combined)
        self.rules = by_name
        self.tiers = tuple(tiers)
        self.injection = injection
        self._search = self.pattern.search
        self._region_at = [None] * (self.pattern.groups + 1)
        self._targets_at = [()] * (self.pattern.groups + 1)
        regions: list[_Region] = []
        base = 0
        # marker group of each run region -> the text to decode for a run there (None: the run)
        runs: dict[int, Callable[[str, int, int], str] | None] = {}
        self._decoded = functools.lru_cache(maxsize=256)(self._decode_and_scan)
        for prio, (kind, source, check, marker_targets) in enumerate(specs):
            solo = re.compile(f"{BOUNDARY}(?:{source})")
            if kind in _RUN_KINDS:
                _, check_name, run = _RUN_KINDS[kind]
                check = getattr(self, check_name)
                runs[base + solo.groupindex[next(iter(marker_targets))]] = run
            region = _Region(prio, kind, solo, base, check, _first_chars(source))
            regions.append(region)
            for g in range(base + 1, base + solo.groups + 1):
                self._region_at[g] = region
            for marker, targets in marker_targets.items():
                g = self.pattern.groupindex[marker]
                assert g == base + solo.groupindex[marker]
                self._targets_at[g] = tuple(targets)
            base += solo.groups
        for i, region in enumerate(regions):
            region.later_all = tuple(regions[i + 1:])
            region.later_overlap = tuple(r for r in regions[i + 1:] if r.kind != "builtin")
        self._regions = tuple(regions)
        self._runs = runs
        self._injection_rules = tuple(r.name for r in all_rules if r.detector == PROMPT_INJECTION)
        self._weights = {}
        if injection is not None:
            for template, w in injection.phrases.items():
                self._weights["phrase:" + template] = float(w)
            for pat, w in injection.patterns.items():
                self._weights["pattern:" + pat] = float(w)
        return self

    # -- scanning ----------------------------------------------------------------------

    def scan(self, text: str) -> list[Finding]:
        """Findings in `text`, ordered by position (one regex pass)."""
        return self.scan_strings((text,))

    def scan_strings(self, strings: Iterable[str], apart: bool = False) -> list[Finding]:
        """Findings over many strings (e.g. every string of a request body), `Finding.index`
        = position in `strings`, offsets in the original strings.

        The strings are normalized (see `normalize`; a string holding JSON, such as tool-call
        arguments, is seen as its values: `normalize_json`) and scanned as ONE text, joined by
        U+001F: numeric detectors may bridge that boundary (a card split over two messages,
        content parts or tool calls), so a finding may cover pieces of several strings; it is
        reported once per piece (same rule, the whole value). The injection score counts over
        all. `apart`: joined by U+001D instead, which no detector reads as a separator (values
        that are each whole, such as numbers)."""
        segs: list[tuple[int, int, int, Normalized, str]] = []  # (index, start, end, normalized, original)
        parts = ["\n"]  # the virtual boundary character before the text
        pos = 1
        for i, s in enumerate(strings):
            if not s or not isinstance(s, str):
                continue
            bare = s.strip(" \t\r\n")  # (JSON may have whitespace around it)
            arguments = normalize_json(s) if bare[:1] in "{[" and bare[-1:] in "}]" else None
            nz = arguments or normalize(s)
            if not nz.text.strip(SEP_CHARS):
                # Only separators (a message of one space or dash): nothing to find, and left
                # in, a string no number bridges over: a card split around it went unseen.
                continue
            if segs:
                parts.append("\x1d" if apart else BRIDGE)
                pos += 1
            parts.append(nz.text)
            segs.append((i, pos, pos + len(nz.text), nz, s))
            pos += len(nz.text)
            for shown in rendered(s) if arguments is None else json_rendered(s):  # read as shown too, apart
                parts += ("\x1d", shown.text)  # (no value spans the two readings)
                segs.append((i, pos + 1, pos + 1 + len(shown.text), shown, s))
                pos += 1 + len(shown.text)
        if not segs:
            return []
        v = "".join(parts)
        hits = self._all_hits(v)
        if len(segs) > 2:
            hits = self._bridged_over(v, hits)
        raw: list[Finding] = []
        injection_hits: list[tuple[int, int, str, int, str]] = []
        self._collect(v, hits, 0, 0, raw, injection_hits)
        if injection_hits:
            raw.extend(self._injection_findings(injection_hits, {k for *_, k in injection_hits}))
        if not raw:
            return []
        starts = [seg[1] for seg in segs]
        findings = [piece for f in raw for piece in _pieces(f, v, segs, starts)]
        if len(findings) > 1:  # (a string read twice finds its value twice: `rendered`)
            findings = list(dict.fromkeys(findings))
        findings.sort(key=lambda f: (f.index, f.start))
        return findings

    def _bridged_over(self, v: str, hits: list[Hit]) -> list[Hit]:
        """A number bridged over short strings between two strings (a card split over two
        messages, "user" between them) is one value, and the scan resumes after it, so a
        value in a string it bridged over (a key between two card numbers) went unseen: each
        such string is scanned on its own too (`_pieces` leaves it out of the number)."""
        inner: list[Hit] = []
        for s, e, _ in hits:
            b = v.find(BRIDGE, s, e)
            while b != -1:
                nb = v.find(BRIDGE, b + 1, e)
                if nb == -1:
                    break
                if STRUCTURAL.fullmatch(v, b + 1, nb):  # (the rest is the number's own)
                    inner += self._hits(v, b, nb, nb + 1)[0]
                b = nb
        return sorted(hits + inner) if inner else hits

    # -- encoded payloads ----------------------------------------------------------------

    def _worth_decoding(self, v: str, start: int, end: int) -> bool:
        """Whether a run the prefilter found (v[start:end]) holds something once decoded: only
        then does the regex look at it (the encoded region would reject it anyway)."""
        if _DEPTH.value >= MAX_DECODE_DEPTH:
            return False
        end = wrapped_end(v, end)  # (base64 wrapped over lines: the whole run)
        tail = v[end:end + 6]
        end += len(tail) - len(tail.lstrip("="))  # padding is part of the run (base32's: up to six)
        run = v[start:end]
        return any(self._decoded(r, _DEPTH.value) for r in {run.lstrip("+/-_"), *(v[start:e] for e in
                                                                      _wrapped_ends(v, start, end))} if len(r) >= 12)

    def _encoded_check(self, v: str, start: int, end: int) -> int:
        """The run's end; for a wrapped run that does not decode whole (a word on the line after
        it), its end before that line, or its first line's (`_wrapped_ends`)."""
        if _DEPTH.value >= MAX_DECODE_DEPTH or not encoded_start_ok(v, start):
            return 0
        return next((e for e in _wrapped_ends(v, start, end) if self._decoded(v[start:e], _DEPTH.value)), 0)

    def _spaced_check(self, v: str, start: int, end: int) -> int:
        """The run's end, or the end of its last spelled-out character when what the run holds
        is found without the word after it (which a redaction then keeps)."""
        if _DEPTH.value >= MAX_DECODE_DEPTH:
            return 0
        gap = v.rfind(" ", start, end)
        if end - gap > 2:  # the run ends in a word written whole
            cells = len(v[start:gap].rstrip(" ")) + start
            if self._decoded(spaced_run(v, start, cells), _DEPTH.value):
                return cells
        return end if self._decoded(spaced_run(v, start, end), _DEPTH.value) else 0

    def _words_check(self, v: str, start: int, end: int) -> int:
        if _DEPTH.value >= MAX_DECODE_DEPTH:
            return 0
        return end if self._decoded(number_words_run(v, start, end), _DEPTH.value) else 0

    def _decode_and_scan(self, run: str, depth: int) -> tuple[Finding, ...]:
        """What the decoded text of an encoded run holds (cached: the check and the
        collection of one candidate ask twice)."""
        text = decode_payload(run)
        if text is None:
            return ()
        _DEPTH.value = depth + 1
        try:
            return tuple(self.scan(text))
        finally:
            _DEPTH.value = depth

    def decide(self, findings: Iterable[Finding], params: DecisionParams | None = None) -> Decision:
        return decide(findings, self.rules, params)

    def prepare(self) -> Scanner:
        """Build what is otherwise built on first use (the Hyperscan database, ~0.3 s; the
        normalization table, ~0.3 s), so no request pays for it on the event loop."""
        tables()
        if self._prefilter is None and self._triggers[0]:
            self._prefilter = build_prefilter(*self._triggers)
        return self

    def _all_hits(self, v: str) -> list[Hit]:
        """Every accepted candidate in `v`: the regex over the windows the prefilter points at
        (the same hits as over the whole text), or over the whole text."""
        return self.hits_between(v, 0, len(v))[0]

    def hits_between(self, v: str, pos: int, limit: int) -> tuple[list[Hit], int]:
        """`_hits(v, pos, limit)`, with the regex only over the windows the prefilter points
        at in `v` (a stream's window: policy/stream.py reads each piece of an answer with it;
        the regex alone costs ~10 us a search, several searches a piece, where the prefilter
        finds nothing in most prose)."""
        if pos >= limit:
            return [], pos  # (a stream's piece still held back whole)
        pf = self._prefilter
        if pf is None and self._triggers[0]:
            pf = self._prefilter = build_prefilter(*self._triggers)  # built on first use, cached
        windows = pf.windows(v, self._worth_decoding) if pf is not None and pf.usable(v) else None
        if windows is None:
            return self._hits(v, pos, limit)
        hits: list[Hit] = []
        n = len(v)
        for ws, wl, endpos in windows:
            if ws >= limit:
                break  # (windows come sorted by start)
            start, stop = max(ws, pos), min(wl, limit)
            if start >= stop:
                continue
            found, _ = self._hits(v, start, stop, endpos)
            if found and endpos < n and found[-1][1] >= endpos - 2:
                found, _ = self._hits(v, start, stop)  # cut by the bound: read it whole
            hits += found
            if found:
                pos = max(pos, found[-1][1])
        return hits, max(pos, limit)

    def _hits(self, v: str, pos: int, limit: int, endpos: int | None = None) -> tuple[list[Hit], int]:
        """Accepted candidates whose boundary character is before `limit`, and the position
        to resume from. `v[pos]` must be a boundary or context character, never a value's.
        `endpos`: search no further (the candidates the caller wants end well before it)."""
        search = self._search
        hits: list[Hit] = []
        n = len(v) if endpos is None else endpos
        while pos < n and pos < limit:  # a match found from `pos` starts at or after it
            m = search(v, pos, n)
            if m is None:
                break
            p = m.start()
            if p >= limit:
                break
            best = self._resolve(v, p, m)
            if best is None:
                pos = p + 1
                continue
            hits.append((p + 1, best[0], best[1]))
            pos = best[0]
        return hits, max(pos, limit)

    def _resolve(self, v: str, p: int, m: re.Match[str]) -> tuple[int, int] | None:
        """The winning (end, marker group) at boundary `p`: longest valid, then priority."""
        gi = m.lastindex or 0
        region = self._region_at[gi]
        best_end, best_gi = m.end(gi), gi  # the marker's position: the value's end
        if region.check is not None:
            best_end = region.check(v, p + 1, best_end)
        later = region.later_overlap if best_end else region.later_all
        c = v[p + 1] if p + 1 < len(v) else ""
        for r in later:
            if r.first is not None and c not in r.first:
                continue
            mm = r.solo.match(v, p)
            if mm is None:
                continue
            e = mm.end(mm.lastindex or 0)
            if e <= best_end:
                continue
            if r.check is not None:
                e = r.check(v, p + 1, e)
                if e <= best_end:
                    continue
            best_end, best_gi = e, r.group_base + (mm.lastindex or 0)
        return (best_end, best_gi) if best_end else None

    def _collect(self, v: str, hits: Iterable[Hit], index: int, shift: int,
                 findings: list[Finding], injection_hits: list[tuple[int, int, str, int, str]]) -> None:
        targets_at = self._targets_at
        for s, e, gi in hits:
            value = v[s:e]
            if gi in self._runs:  # what the decoded run holds, over the run
                of = self._runs[gi]
                run = value if of is None else of(v, s, e)
                for f in self._decoded(run, _DEPTH.value):
                    findings.append(Finding(f.rule, f.detector, s + shift, e + shift, f.value, index, f.score))
                continue
            for t in targets_at[gi]:
                if t.key is not None:
                    injection_hits.append((s + shift, e + shift, value, index, t.key))
                elif t.rule is not None:
                    findings.append(Finding(t.rule, t.detector, s + shift, e + shift, value, index))

    def _injection_score(self, keys: Iterable[str]) -> float:
        weights = self._weights
        return sum(weights.get(k, 0.0) for k in set(keys))

    def _injection_findings(self, hits: Sequence[tuple[int, int, str, int, str]],
                            keys: set[str]) -> list[Finding]:
        inj = self.injection
        if inj is None:
            return []
        score = self._injection_score(keys)
        if score < inj.threshold:
            return []
        return [Finding(rule, PROMPT_INJECTION, s, e, value, index, score)
                for s, e, value, index, _ in hits for rule in self._injection_rules]

    def injection_score(self, text: str) -> float:
        """The prompt-injection score of `text` (whether or not it reaches the threshold)."""
        v = "\n" + text
        hits, _ = self._hits(v, 0, len(v))
        keys = {t.key for _, _, gi in hits for t in self._targets_at[gi] if t.key is not None}
        return self._injection_score(keys)


# -- redaction ---------------------------------------------------------------------------


class PlaceholderMap(dict):
    """placeholder -> original value. Placeholders are numbered per type in order of first
    appearance (`[EMAIL_1]`, `[EMAIL_2]`, `[CREDIT_CARD_1]`); the same value of the same type
    gets the same placeholder. Pass the same map to every `redact` call of one request."""

    __slots__ = ("_by_value", "_counts")

    _PLACEHOLDER = re.compile(r"\[([A-Z0-9_]+)_([0-9]+)\]")

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._by_value: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = {}
        for ph, value in (initial or {}).items():
            m = self._PLACEHOLDER.fullmatch(ph)
            if m is None:
                raise ValueError(f"not a placeholder: {ph!r}")
            label, n = m.group(1), int(m.group(2))
            self[ph] = value
            self._by_value[(label, value)] = ph
            self._counts[label] = max(self._counts.get(label, 0), n)

    def placeholder(self, label: str, value: str) -> str:
        key = (label, value)
        ph = self._by_value.get(key)
        if ph is None:
            n = self._counts.get(label, 0) + 1
            self._counts[label] = n
            ph = f"[{label}_{n}]"
            self._by_value[key] = ph
            self[ph] = value
        return ph

    def _extend(self, ph: str, label: str, old: str, new: str) -> None:
        """A value first seen cut short (stream) turned out longer."""
        if self._by_value.get((label, old)) == ph:
            del self._by_value[(label, old)]
        self._by_value.setdefault((label, new), ph)
        self[ph] = new


def _as_map(mapping: Mapping[str, str] | None) -> PlaceholderMap:
    if isinstance(mapping, PlaceholderMap):
        return mapping
    return PlaceholderMap(mapping)


_JSON_FIRST = frozenset("{[ \t\r\n")  # (how JSON text may begin: `json_quotes` decides)


def redact(text: str, findings: Iterable[Finding],
           mapping: Mapping[str, str] | None = None) -> tuple[str, PlaceholderMap]:
    """Replace each finding's span in `text` with its typed placeholder.

    Findings should come from one string (same `index`); overlapping spans are merged (the
    first one's type names the placeholder). A placeholder stands for the finding's value.
    Text that is JSON (tool-call arguments; scanned as JSON: `normalize_json`) stays JSON
    (`json_placeholder`). Returns the new text and the (updated) map.
    """
    mapping = _as_map(mapping)
    spans = sorted({(f.start, f.end): (f.detector, f.value) for f in findings}.items())
    quotes = json_quotes(text) if spans and text[:1] in _JSON_FIRST else None
    out: list[str] = []
    pos = 0
    i = 0
    while i < len(spans):
        (start, end), (detector, value) = spans[i]
        i += 1
        merged = False
        while i < len(spans) and spans[i][0][0] < end:
            end = max(end, spans[i][0][1])
            merged = True
            i += 1
        start = max(start, pos)
        if start >= end:
            continue
        # The finding's value names the placeholder: the same for every piece of a value split
        # over strings, and the decoded value for an encoded run.
        placeholder = mapping.placeholder(_label(detector), text[start:end] if merged or not value else value)
        if quotes is not None:
            start, end, placeholder = json_placeholder(text, start, end, pos, quotes, placeholder)
        out.append(text[pos:start])
        out.append(placeholder)
        pos = end
    if not out:
        return text, mapping
    out.append(text[pos:])
    return "".join(out), mapping


def redact_strings(strings: Sequence[str], findings: Iterable[Finding],
                   mapping: Mapping[str, str] | None = None) -> tuple[list[str], PlaceholderMap]:
    """`redact` for the strings of one `scan_strings` call (findings grouped by index)."""
    mapping = _as_map(mapping)
    by_index: dict[int, list[Finding]] = {}
    for f in findings:
        by_index.setdefault(f.index, []).append(f)
    out = list(strings)
    for i in sorted(by_index):
        out[i], _ = redact(out[i], by_index[i], mapping)
    return out, mapping


# -- JSON bodies -------------------------------------------------------------------------

MAX_DEPTH = 128
MAX_NODES = 1_000_000
# Keys under which APIs carry raw binary payloads (base64 without a `data:` prefix). A string
# there is left unscanned and unchanged only when it *is* such a payload (`_opaque`: strict
# base64 of bytes that are no UTF-8 text, at least `_OPAQUE_MIN` characters); anything else
# under these names (plain text, a short value, an object) is caller text like any other:
# the name is the caller's choice (`metadata.b64_json`, a tool parameter named `file_data`).
# `data` is `input_audio.data`; `embedding` an embeddings answer's vector with
# `encoding_format: base64` (float32 bytes), which a provider writing text there does not
# get past the scan. Base64 data URIs are recognised wherever they are (`_text`).
BINARY_KEYS: frozenset[str] = frozenset({"input_audio", "file_data", "b64_json"})
_BLOB_KEYS = BINARY_KEYS | {"data", "embedding"}
_OPAQUE_MIN = 64
_LINE_BREAKS = re.compile(r"\r?\n")  # base64 wrapped as MIME wraps it
# Media types a provider reads as text (RFC 2397's default, text/plain, when none is given).
_TEXT_MEDIA = frozenset({"", "application/json", "application/xml", "application/yaml", "application/x-yaml",
                         "application/csv", "application/x-ndjson", "application/javascript", "application/sql"})


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """Returned instead of a result when a JSON body is absurdly deep or large."""

    reason: str


@dataclass(frozen=True, slots=True)
class _DataText:
    """A base64 data URI of a textual media type: the text it carries, and how to put a
    redacted text back (same prefix, same charset)."""

    prefix: str
    charset: str
    text: str

    def encode(self, text: str) -> str:
        return self.prefix + base64.b64encode(text.encode(self.charset, "replace")).decode("ascii")


def _text(key: Any, value: str, skip_keys: frozenset[str]) -> str | _DataText | None:
    """What the scanner reads of a string: the string; for a base64 data URI, the text it
    carries when its media type is textual (a file a provider reads as text: a card in a
    `text/plain` attachment leaves like one in a message), else nothing (images, audio, PDF);
    a string under `skip_keys`, nothing."""
    if value.startswith("data:"):
        head = value[:256]
        marker = head.find(";base64,")
        if marker >= 0:
            media, *params = head[5:marker].split(";")
            media = media.strip().lower()
            if not (media.startswith("text/") or media.endswith(("+json", "+xml")) or media in _TEXT_MEDIA):
                # An image, audio or PDF is not read; but only one that is one: a string that
                # merely starts like a data URI (a message's text, a system prompt, a name) is
                # text the model reads, and base64 of text is read as text wherever it is.
                return None if _opaque(value[marker + 8:]) else value
            charset = next((p.split("=", 1)[1].strip().strip('"') for p in params if p.strip().lower()
                            .startswith("charset=")), "utf-8")
            try:
                charset = codecs.lookup(charset).name
            except LookupError:
                charset = "utf-8"
            # Only a file is read as its decoded text: a payload that is no strict base64
            # (line breaks aside) or no text in its charset is a string that merely starts
            # like a data URI (`data:text/plain;base64, my card is …`: the decoder would skip
            # the spaces and read the rest as garbage), text the model reads as written.
            try:
                raw = binascii.a2b_base64(_LINE_BREAKS.sub("", value[marker + 8:]), strict_mode=True)
                return _DataText(value[:marker + 8], charset, raw.decode(charset))
            except (binascii.Error, ValueError):  # (UnicodeDecodeError is a ValueError)
                return value
    if key in _BLOB_KEYS:
        return None if len(value) >= _OPAQUE_MIN and _opaque(value) else value
    if key is not None and key in skip_keys:
        return None  # (the response guard's labels: role, type, id...)
    return value


def _opaque(payload: str) -> bool:
    """Whether `payload` is a binary blob no model reads as text: strict base64 (its alphabet
    and padding, nothing else) of bytes that are not UTF-8 text. The scanner's encoded-run
    decoder leaves such runs alone anyway; skipping them spares the scan of a large image
    or recording."""
    try:
        raw = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        return False
    return texty(raw) is None  # (the encoded-run decoder's own test for text)


def _items(c: Any) -> Iterator[tuple[Any, Any]]:
    return iter(c.items()) if isinstance(c, dict) else zip(itertools.repeat(None), c)


# The APIs' own numeric parameters: a random `seed` is a valid card number about one time in
# forty, and a placeholder string there would break the request.
_API_NUMBERS = frozenset({"seed", "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "top_k",
                          "top_logprobs", "candidateCount", "maxOutputTokens", "topK"})


_SMALL_NUMBER_TYPES = (int, float)  # (`keyed_text` reads neither below 1e8; a bool is its own type)


def keyed_text(value: Any, key: Any, top: bool = True) -> str | None:
    """A value scanned with its member's name, apart from the other strings: a JSON integer
    long enough to be a value (nine digits or more: an SSN, a card, a phone number sent as a
    number in metadata or a tool schema's `enum`), an integral float read as the integer
    (`4.111111111111111e15` is 4111111111111111), and a string of nine digits under a name
    that says SSN (`"ssn": "123456789"`, `social_security_number`), as `name: value` (the
    name is the SSN's context word). The APIs' numeric parameters are skipped only as members
    of the body itself (`top`). Fractions are not read (the digits of a `temperature`
    are no value, and a random one is a valid card number one time in ten)."""
    if isinstance(value, str):
        if 9 <= len(value) <= 32 and isinstance(key, str) and ssn_context_name(key) \
                and sum(c.isdigit() for c in value) == 9:
            return f"{key.replace('_', ' ')}: {value}"  # (`user_ssn`: a word the context reads)
        return None
    if key in _API_NUMBERS and top:  # (the API's parameters are the body's own members: a
        return None                  # `seed` in `metadata` or a tool schema is caller data)
    if isinstance(value, float):
        if not (value.is_integer() and 1e8 <= abs(value) < 1e21):
            return None
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, int) or -10 ** 8 < value < 10 ** 8:
        return None
    return _named(key, str(value))


def _named(key: Any, text: str) -> str:
    return f"{key.replace('_', ' ')}: {text}" if isinstance(key, str) else text


# Arrays of numbers that are no value: token ids, which an embeddings or completions request
# sends as its top-level `input` / `prompt` (an array, or arrays of them; read as the text they
# stand for, docs/classification.md), and a logprob's UTF-8 `bytes`.
_TOKEN_MEMBERS = frozenset({"input", "prompt"})


def array_text(value: list[Any], key: Any, depth: int, top_key: Any) -> str | None:
    """The `keyed_text` of a JSON array that spells one number (`normalize.digit_array`:
    `[4111, 1111, 1111, 1111]`, `[4,1,1,…]`, `"ssn": [123, 45, 6789]`), read as that number
    under its member's name; else None. `depth`: the walk's depth at the array's member
    (1: the body's own), `top_key`: the body member it is under. Costs one length check for a
    long array (an 8k token-id `input`), a type check for an array of objects."""
    if not 2 <= len(value) <= 19 or key == "bytes" or (depth == 1 and key in _TOKEN_MEMBERS) or \
            (depth == 2 and key is None and top_key in _TOKEN_MEMBERS):
        return None
    groups = []
    for x in value:
        if type(x) is not int or not 0 <= x < 10 ** 6:
            return None
        groups.append(str(x))
    digits = digit_array(groups)
    return None if digits is None else _named(key, digits)


def keyed_replacement(text: str, redacted: str) -> str:
    """What replaces a value whose `keyed_text` was redacted: the redacted value alone,
    without its member's name (unless the finding reached into the name)."""
    name, sep, _ = text.rpartition(": ")
    return redacted[len(name) + 2:] if sep and redacted.startswith(name + sep) else redacted


def walk_strings(obj: Any, *, skip_keys: frozenset[str] = BINARY_KEYS, max_depth: int = MAX_DEPTH,
                 max_nodes: int = MAX_NODES, names: dict[str, None] | None = None,
                 keyed: dict[str, None] | None = None,
                 known: Mapping[str, set[str]] | None = None) -> list[str] | LimitExceeded:
    """Every string value in a parsed JSON value, in document order (dict keys are not
    included; strings under `skip_keys` and base64 data URIs are skipped; objects and arrays
    under `skip_keys` are walked: a label names no container). Iterative.

    `names`, when given, collects every object key once, in first-seen order, from the same
    pass: keys are caller text too (metadata, tool schemas, logit_bias), and classification
    scans them apart from the values (a key never bridges into a value). `keyed` collects
    the `keyed_text` of every long number and SSN-named string the same way, and the
    `array_text` of every array that spells one number. `known`: per
    member name, values skipped as already read (a provider's labels, seen clean before);
    `map_strings` must be given the same."""
    if isinstance(obj, str):
        text = _text(None, obj, skip_keys)
        return [] if text is None else [text.text if isinstance(text, _DataText) else text]
    if not isinstance(obj, (dict, list, tuple)):
        return []
    out: list[str] = []
    nodes = 1
    top_key: Any = None  # (the body's member being walked: `array_text`)
    stack = [_items(obj)]
    while stack:
        for key, value in stack[-1]:
            if names is not None and key is not None:
                names[key] = None
            if isinstance(value, str):
                if value.startswith("data:") or key in _BLOB_KEYS or key in skip_keys:  # (else: the text)
                    text = _text(key, value, skip_keys)
                    if text is None:
                        continue
                    text = text.text if isinstance(text, _DataText) else text
                else:
                    text = value
                if known is not None and key in known and value in known[key]:
                    continue
                out.append(text)
                nodes += 1
                if keyed is not None and key is not None and len(value) >= 9 and \
                        (named := keyed_text(value, key)) is not None:
                    keyed[named] = None
            elif isinstance(value, (dict, list, tuple)):
                nodes += 1
                if len(stack) >= max_depth:
                    return LimitExceeded(f"JSON nested deeper than {max_depth}")
                if keyed is not None and type(value) is list and \
                        (named := array_text(value, key, len(stack), top_key)) is not None:
                    keyed[named] = None
                if len(stack) == 1:
                    top_key = key
                stack.append(_items(value))
                break
            else:
                # (a number under 1e8 is never read: the vectors of an embeddings answer and an
                # answer's token counts cost a comparison each, not a call)
                if keyed is not None and not (type(value) in _SMALL_NUMBER_TYPES and -1e8 < value < 1e8) and \
                        (named := keyed_text(value, key, top=len(stack) == 1)) is not None:
                    keyed[named] = None
                continue
            if nodes > max_nodes:
                return LimitExceeded(f"JSON with more than {max_nodes} strings/containers")
        else:
            stack.pop()
    if nodes > max_nodes:
        return LimitExceeded(f"JSON with more than {max_nodes} strings/containers")
    return out


def _mapped(text: str | _DataText | None, value: str, fn: Callable[[str], str]) -> str:
    if text is None:
        return value
    if isinstance(text, _DataText):
        new = fn(text.text)
        return value if new == text.text else text.encode(new)
    return fn(text)


def map_strings(obj: Any, fn: Callable[[str], str], *, skip_keys: frozenset[str] = BINARY_KEYS,
                max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES, keys: Mapping[str, str] | None = None,
                keyed: Mapping[str, str] | None = None, known: Mapping[str, set[str]] | None = None) -> Any:
    """A copy of `obj` with `fn` applied to every string `walk_strings` would return, called
    in the same order (so `fn` may consume an iterator of replacements), every object key
    found in `keys` renamed to its value (redacted keys), and every number or string whose
    `keyed_text` is in `keyed` replaced by that string (a redacted value). Returns
    `LimitExceeded` under the same conditions as `walk_strings`. Iterative."""
    if isinstance(obj, str):
        return _mapped(_text(None, obj, skip_keys), obj, fn)
    if not isinstance(obj, (dict, list, tuple)):
        return obj

    def new_container(c: Any) -> Any:
        return {} if isinstance(c, dict) else []

    root = new_container(obj)
    nodes = 1
    top_key: Any = None
    stack: list[tuple[Iterator[tuple[Any, Any]], Any]] = [(_items(obj), root)]
    while stack:
        it, target = stack[-1]
        for key, value in it:
            descend = None
            if isinstance(value, str):
                text = _text(key, value, skip_keys)
                if text is not None and not (known is not None and key in known and value in known[key]):
                    original = value
                    value = _mapped(text, value, fn)
                    nodes += 1
                    if keyed and key is not None and (named := keyed_text(original, key)) in keyed:
                        value = keyed[named]
            elif isinstance(value, (dict, list, tuple)):
                nodes += 1
                if len(stack) >= max_depth:
                    return LimitExceeded(f"JSON nested deeper than {max_depth}")
                if len(stack) == 1:
                    top_key = key
                if keyed and type(value) is list and (named := array_text(value, key, len(stack), top_key)) in keyed:
                    value = keyed[named]  # (a number spelled as an array: its placeholder, a string)
                else:
                    descend = value
                    value = new_container(value)
            elif keyed and (named := keyed_text(value, key, top=len(stack) == 1)) is not None:
                value = keyed.get(named, value)
            if nodes > max_nodes:
                return LimitExceeded(f"JSON with more than {max_nodes} strings/containers")
            if key is None:
                target.append(value)
            else:
                target[keys.get(key, key) if keys else key] = value
            if descend is not None:
                stack.append((_items(descend), value))
                break
        else:
            stack.pop()
    return root
