"""Request headers as classification sees them: which values go on to a provider, and what
a finding in one does to the forwarded request.

Headers are caller text as much as the body is: an SDK's `default_headers`, a `user-agent`,
any `x-*` header reach the provider unless the gateway removes them. So the values the
provider will get are scanned with the body's scanner, rules, allowlist and mode, in the
body check's single pass (`Policy.check_request`): appended to the body's strings (apart,
`joined`); their names are scanned with the body's object keys. A finding in a header counts as one in the body
would: it raises the request's tier, blocks (the same `content_blocked` /
`classification_violation` answers, naming the header, never quoting a value), is only
logged in monitor mode, is exempted by the allowlist.

A redact finding is replaced in place by its placeholder (`user-agent: app [EMAIL_1]`):
the header keeps its name and the rest of its text, as a redacted message keeps its own.
A header whose NAME holds a finding is removed (a name cannot hold a placeholder).

Not scanned: pseudo-headers (the path and method are checked against the endpoints the
gateway serves; Envoy rewrites the authority for the provider), the headers the router
removes anyway (credentials, the gateway's own, the client's network path), `OWNED`,
whose values Envoy or the gateway writes over what the client sent, and `PLAIN_VALUES`.

Every forwarded endpoint needs a body, so no request reaches a provider without the body
check: the headers are kept from the request-headers message (`forwarded`) for it.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, replace

from .scanner import Finding

# Values the client's text never reaches the provider in: Envoy generates the request id
# (with the chart's `use_remote_address` and no internal addresses configured, a client's
# own id is replaced: checked through Envoy 1.40) and the forwarded protocol before the ext_proc sees the request and sets the timeout after it;
# the route sets accept-encoding; the gateway sets content-length for a body it changes, and
# Envoy refuses one that does not match the body.
OWNED = frozenset({"x-request-id", "x-forwarded-proto", "x-envoy-expected-rq-timeout-ms", "accept-encoding",
                   "content-length"})
# Values every request carries that hold no text of the caller's: the one media type the
# router accepts, and what SDKs accept. Skipped, not scanned (~2.5 us a request each).
PLAIN_VALUES = frozenset({("content-type", b"application/json"), ("accept", b"application/json"),
                          ("accept", b"*/*"), ("accept", b"text/event-stream")})
# Names HTTP clients and the OpenAI and Anthropic SDKs send, which hold nothing a detector
# finds: not scanned unless custom rules ask for every name. Any other name is (a key may be
# sent as a name: `sk-` and twenty letters is an OpenAI key to the detectors).
KNOWN_NAMES = frozenset({
    "user-agent", "accept", "accept-language", "content-type", "connection", "te", "cache-control", "pragma",
    "traceparent", "tracestate", "baggage", "idempotency-key", "x-session-id", "openai-beta", "anthropic-version",
    "anthropic-beta", "anthropic-dangerous-direct-browser-access", "x-stainless-lang", "x-stainless-package-version",
    "x-stainless-os", "x-stainless-arch", "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-async",
    "x-stainless-retry-count", "x-stainless-read-timeout", "x-stainless-timeout", "x-stainless-helper-method",
    "x-stainless-poll-helper", "x-stainless-custom-poll-interval"})
# Between values in `joined`: a character no number runs over, so a number starts and ends
# with its header (a card beside `x-retry-count: 0` is still a 16-digit card, not a
# 17-digit non-card). No header value holds a line break.
SEPARATOR = "\n|\n"
# A name quoted back in an error: letters and dashes, bounded (every standard and SDK header
# name). A name with digits or underscores may be a key sent as a name: not quoted.
_QUOTABLE = re.compile(r"[a-z][a-z\-]{0,63}")


@dataclass(frozen=True, slots=True)
class Header:
    """One forwarded header line. `text` is what is scanned: the value as UTF-8, or as
    Latin-1 when it is not UTF-8 (obs-text), so every byte is seen as some character and a
    redacted value is written back in the same encoding."""

    name: str
    text: str
    utf8: bool = True

    def encode(self, text: str) -> bytes:
        return text.encode("utf-8" if self.utf8 else "latin-1", "replace")


def forwarded(entries: Iterable[tuple[str, bytes]], removed: Container[str]) -> tuple[Header, ...]:
    """The header lines (name lower-cased by Envoy, raw value) that go on to the provider,
    in wire order: not pseudo-headers, not `removed` by the router, not `OWNED`, not one of
    the `PLAIN_VALUES`."""
    out = []
    for name, raw in entries:
        if name[:1] == ":" or name in OWNED or name in removed or (name, raw) in PLAIN_VALUES:
            continue
        try:
            out.append(Header(name, raw.decode("utf-8")))
        except UnicodeDecodeError:
            out.append(Header(name, raw.decode("latin-1"), utf8=False))
    return tuple(out)


def joined(headers: Sequence[Header]) -> str:
    """The values as ONE string for the scan, apart (`SEPARATOR`): short numeric values
    (`x-stainless-retry-count: 0`) do not each open a string boundary the scanner would
    look across into the body for a split number (~100 us per such value)."""
    return SEPARATOR.join(h.text for h in headers)


def place(headers: Sequence[Header], findings: Iterable[Finding]) -> dict[int, list[Finding]]:
    """Findings in `joined(headers)`, by header position: each clipped to the part of its
    span that lies in that header's value, offsets in the value, `value` the whole finding's
    (so a value split over two headers gets one placeholder in both)."""
    bounds, pos = [], 0
    for h in headers:
        bounds.append((pos, pos + len(h.text)))
        pos += len(h.text) + len(SEPARATOR)
    out: dict[int, list[Finding]] = {}
    for f in findings:
        for i, (a, b) in enumerate(bounds):
            if a >= f.end:
                break
            start, end = max(f.start, a), min(f.end, b)
            if start < end:
                out.setdefault(i, []).append(replace(f, start=start - a, end=end - a, index=i))
    return out


def scanned_names(headers: Sequence[Header], every: bool) -> list[int]:
    """Which headers' names are scanned (their positions): all with custom rules (`every`),
    else every name but the `KNOWN_NAMES`."""
    return [i for i, h in enumerate(headers) if every or h.name not in KNOWN_NAMES]


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """What the forwarded request's headers become: `set` replaces every line of a name with
    one value (a repeated header's values joined with ", ", as RFC 9110 reads them), `remove`
    drops a name."""

    set: dict[str, bytes]
    remove: tuple[str, ...]


def edit(headers: Sequence[Header], values: Sequence[str], removed_at: Iterable[int]) -> HeaderEdit | None:
    """The edit that sends `values` (the redacted texts, one per header) instead of the
    headers' own, and removes the headers at `removed_at` (a finding in the name). None when
    nothing changes."""
    remove = {headers[i].name for i in removed_at}
    changed = {h.name for h, v in zip(headers, values) if v != h.text and h.name not in remove}
    if not changed and not remove:
        return None
    joined_: dict[str, list[bytes]] = {}
    for h, v in zip(headers, values):
        if h.name in changed:
            joined_.setdefault(h.name, []).append(h.encode(v))
    return HeaderEdit({name: b", ".join(parts) for name, parts in joined_.items()}, tuple(sorted(remove)))


def where(headers: Sequence[Header], in_values: Iterable[int], in_names: Container[int]) -> str:
    """Where in the headers findings are, for an error message: the names of the headers
    at positions `in_values` quoted (never a value; never a name that is not a plain word of
    letters and dashes, nor one that holds a finding itself: `in_names`, positions)."""
    at = sorted(set(in_values))
    quoted = [repr(headers[i].name) for i in at if i not in in_names and _QUOTABLE.fullmatch(headers[i].name)]
    parts = [f"request header {', '.join(dict.fromkeys(quoted))}"] if quoted else []
    if len(quoted) < len(at):
        parts.append("a request header's value")
    if any(i in in_names for i in range(len(headers))):
        parts.append("a request header's name")
    return " and ".join(parts)
