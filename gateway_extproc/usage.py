"""Provider-reported token usage, read from JSON bodies and from SSE streams as they flow.

For streams the gateway asks the provider for a final usage chunk
(`stream_options.include_usage`); when the client did not ask for it, `SseUsageTap`
removes that chunk so the client sees exactly the stream it requested.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog

from .errors import completed_error
from .providers.base import MAX_TOKENS, error_event, event_data, event_field
from .tokens import TokenCount

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# A choice's finish reason in an OpenAI stream chunk, read without parsing the event (inside
# generated text the quotes are escaped, so text cannot match).
_FINISH_REASON = re.compile(rb'"finish_reason":\s*"([^"\\]+)"')
# An event carrying generated text: a chat delta's content (a string, or a content part's
# `text`: since 2026-12-08), refusal, reasoning or tool-call arguments, or a Responses API text
# delta (non-empty; text inside a string is escaped, so it never matches). JSON may put
# whitespace around the colon (Python's json.dumps does).
_GENERATED = re.compile(rb'"(?:content|refusal|reasoning_content|reasoning|arguments|delta|text)"\s*:\s*"(?!")')
# The generated text itself (the JSON string after one of those keys, still escaped), counted for
# a stream that ends without usage: one event may carry many tokens (a server that batches its
# output, Azure's asynchronous content filter), so one token per event undercounts the bill.
_GENERATED_TEXT = re.compile(rb'"(?:content|refusal|reasoning_content|reasoning|arguments|delta|text)"\s*:\s*"((?:[^"\\]|\\.)+)"')
# A Responses stream's generated text comes in its `*.delta` events; its `.done` events, output
# items and final response repeat it whole (a tool call's `arguments` too), so only the deltas
# count as output (a type inside generated text is escaped: it cannot match).
_DELTA_EVENT = re.compile(rb'"type"\s*:\s*"[^"\\]*\.delta"')
# The budget backstop also counts the generated text's tokens: a provider that ignores the cap
# and batches its output (many tokens an event) stays below one token an event for ever. The
# model's tokenizer, run on each event on its own, may count a provider's text longer than the
# provider does (another vendor's tokenizer, a word split between events), so an honest stream
# at its cap is only cut when its text passes this many times the limit.
TEXT_LIMIT_FACTOR = 2
# The events that end a Responses stream: only their usage is its bill. A server may report
# usage so far on `response.created` or `.in_progress` (0 output tokens, before any text).
_RESPONSES_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ENDS_ALTERNATIVES = b"|".join(re.escape(name.encode()) for name in sorted(_RESPONSES_ENDS | {"error"}))
# An event that ends a Responses stream, by its `event:` line or its payload's `type`: those,
# or OpenAI's own `error` event.
_RESPONSES_END = re.compile(rb'^event: (?:' + _ENDS_ALTERNATIVES + rb')\n'
                            rb'|"type"\s*:\s*"(?:' + _ENDS_ALTERNATIVES + rb')"')
# A stream whose events never end would otherwise grow the tail without bound.
MAX_PENDING_BYTES = 1 << 20
# The events that end a stream: [DONE], or an error event (an `error` object; OpenAI's own
# and the gateway's are written either way).
STREAM_ENDS = (b"data: [DONE]", b'data: {"error":{', b'data: {"error": {')
# A Responses API stream's failure events (named, or by their payload's `type` only): their
# messages are the provider's words (`cut`).
_FAILURES = rb"error|response\.failed"
_NAMED_FAILURES = re.compile(rb'^(?:event: (?:' + _FAILURES + rb')\n'
                             rb'|data: \{\s*"type"\s*:\s*"(?:' + _FAILURES + rb')")')
UNSCANNABLE = ("The provider sent a stream event larger than output scanning can read (1 MiB); the stream was "
               "ended by the gateway.")

log = structlog.get_logger("gateway_extproc.usage")


def _completed_error_event(event: bytes, cut: Callable[[str], str] | None = None) -> bytes:
    """A stream's error event with the four fields and a runbook `code` (`completed_error`):
    an OpenAI-schema provider's own event says `"code": null`, which reached clients as sent.
    `cut` takes the provider credentials' pieces out of the error's JSON text, as a JSON error
    answer's are (`client_error`): a quota error mid-stream quoted "the key ending …" as sent.
    The event itself when it needs nothing (the gateway's own, a translator's) or is no error
    object (output scanning withholds it)."""
    try:
        obj = orjson.loads(event_data(event) or b"")
    except orjson.JSONDecodeError:
        return event
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        return event
    done = completed_error(error, "server_error", "The provider reported an error mid-stream.")
    if cut is not None:
        text = orjson.dumps(done).decode()
        if (kept := cut(text)) != text:
            done = orjson.loads(kept)
    return event if done == error else b"data: " + orjson.dumps({**obj, "error": done}) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    # Prompt tokens the provider wrote to its prompt cache (part of prompt_tokens), and of
    # those the ones written with a 1-hour lifetime: billed above the input price.
    cache_write_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    response_model: str | None = None
    # For the trace (gen_ai.response.id, gen_ai.response.finish_reasons), not for accounting.
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()


def usage_from_object(obj: Any) -> Usage | None:
    """Chat/embeddings usage (`prompt_tokens`, `completion_tokens`), or Responses API usage
    (`input_tokens`, `output_tokens`; in streams inside `response.completed`). Cache writes
    are `prompt_tokens_details.cache_creation_tokens` (with `cache_creation_1h_tokens`), as
    the Claude and Converse translators report them, or `cache_write_tokens` (OpenAI, OpenRouter)."""
    if isinstance(obj, dict) and isinstance(obj.get("response"), dict):
        obj = obj["response"]
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    details = details if isinstance(details, dict) else {}
    model, response_id, choices = obj.get("model"), obj.get("id"), obj.get("choices")
    reasons = () if not isinstance(choices, list) else tuple(
        c["finish_reason"] for c in choices if isinstance(c, dict) and isinstance(c.get("finish_reason"), str))
    prompt, completion = _int(usage.get("prompt_tokens", usage.get("input_tokens"))), \
        _int(usage.get("completion_tokens", usage.get("output_tokens")))
    if completion is not None:
        completion = _with_reasoning(usage, prompt, completion)
    return Usage(prompt, completion, _int(details.get("cached_tokens")),
                 _int(details.get("cache_creation_tokens", details.get("cache_write_tokens"))),
                 _int(details.get("cache_creation_1h_tokens")),
                 model if isinstance(model, str) else None, response_id if isinstance(response_id, str) else None,
                 reasons)


def _with_reasoning(usage: dict[str, Any], prompt: int | None, completion: int) -> int:
    """The output to charge: OpenAI counts reasoning tokens inside `completion_tokens`, but
    some compatible servers report them beside it (`completion_tokens` 20, `reasoning_tokens`
    480, `total_tokens` prompt + 500): reasoning above the completion count is added to it,
    and a `total_tokens` above prompt + completion is the bill (until 2026-12-08 those 480
    tokens went uncharged)."""
    details = usage.get("completion_tokens_details", usage.get("output_tokens_details"))
    reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    if reasoning is not None and reasoning > completion:
        completion = min(completion + reasoning, MAX_TOKENS)
    total = _int(usage.get("total_tokens"))
    if total is not None and prompt is not None and total - prompt > completion:
        completion = total - prompt
    return completion


def usage_from_json(raw: bytes) -> Usage | None:
    try:
        return usage_from_object(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return None


def _int(value: Any) -> int | None:
    """A token count: a non-negative integer (a negative one is a provider bug, and would
    credit spend back), else unknown. A count past `MAX_TOKENS` is no bill any provider sends:
    unknown too (the request is charged its reservation), and no store is asked to add an
    integer it cannot hold."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None


def merged(old: Usage | None, new: Usage) -> Usage:
    """`new` with the counts it lacks (unreadable, or not sent) kept from `old`: a later usage
    block missing a field (`"usage": {}`) must not erase what the provider reported before;
    nor may a smaller output count lower one (counts in a stream are so far: 480 output tokens
    and then a block saying 2 were charged 2 until 2026-12-08)."""
    if old is None:
        return new
    kept = {f: getattr(old, f) for f in _COUNTS if getattr(new, f) is None}
    if new.completion_tokens is not None and old.completion_tokens is not None \
            and old.completion_tokens > new.completion_tokens:
        kept["completion_tokens"] = old.completion_tokens
    return replace(new, **kept)


_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens")


def canonical_event(event: bytes, named: bool = False) -> bytes:
    """One complete SSE event in the single form the gateway reads and forwards:
    `data: <payload>\n\n` with JSON compacted (`named`: after its `event: <name>` line, which
    Responses API clients may dispatch on), or `:\n\n` (a comment: it keeps the connection
    alive and carries nothing) for an event without data. SSE allows other framings that
    clients read the same (CR or CRLF line ends, `data:` without its space, data over several
    lines, comments, other fields), so usage, the budget backstop and output scanning must
    read them too. Events already in that form (what providers send) are returned as they are."""
    if b"\r" not in event and event.endswith(b"\n\n") and (
            event.startswith(b"data: ") and event.count(b"\n") == 2
            or named and event.startswith(b"event: ") and event.count(b"\n") == 3
            and event.find(b"\ndata: ") == event.find(b"\n")):
        return event
    data = event_data(event)
    if data is None:
        return b":\n\n" if event.strip(b"\r\n") else event
    try:
        data = orjson.dumps(orjson.loads(data))
    except orjson.JSONDecodeError:
        data = data.replace(b"\n", b"\ndata: ")  # not JSON: the same lines, each its own data: line
    names = event_field(event, b"event") if named else []
    return (b"event: " + names[-1] + b"\n" if names else b"") + b"data: " + data + b"\n\n"  # (the last name counts)


class SseUsageTap:
    """Reads usage from an OpenAI SSE stream chunk by chunk; optionally drops usage-only chunks.

    `feed` returns the bytes to forward instead of the chunk, or None to forward it as is.
    When dropping, an event split across chunks is held back until it is complete, so a
    client never sees half of an event that is later removed.
    """

    __slots__ = ("drop_usage_chunk", "named", "usage", "_pending", "events", "content_events", "rewrite", "done",
                 "finish_reasons", "limit", "over", "refused", "usage_unread", "count", "generated_tokens", "choices",
                 "usage_final", "cut", "ended", "stale")

    def __init__(self, drop_usage_chunk: bool, rewrite: Callable[[bytes], bytes] | None = None,
                 limit: int | None = None, named: bool = False, count: TokenCount | None = None,
                 choices: int = 1, cut: Callable[[str], str] | None = None) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.cut = cut  # applied to provider error events' text (`_completed_error_event`, _NAMED_FAILURES)
        self.named = named  # events keep their `event:` name (Responses API streams)
        # At most this many events of generated text (and `TEXT_LIMIT_FACTOR` times this many tokens
        # of it) are forwarded; from the one past it on, `over` is set and nothing more is
        # forwarded (usage is still read). The budget backstop for a provider that ignores the
        # output cap.
        self.limit = limit
        self.over = False
        # An event too large to hold went by while rewriting: it was not forwarded unread
        # (output scanning would be bypassed); the stream ended there with an error event.
        self.refused = False
        # Applied to every complete event forwarded (output scanning); implies holding
        # partial events back, like dropping does.
        self.rewrite = rewrite
        self.usage: Usage | None = None
        # A usage block went by whose completion count could not be read (a string, a negative,
        # missing): the provider's bill is unknown, not absent (RouterProcessor.consumed).
        self.usage_unread = False
        # The last usage block is the provider's bill, not a running count: it came on a
        # usage-only chunk (or a Responses stream's last event), or once all `choices` of the
        # answer had finished, and no text came after it. Servers that report usage on every
        # chunk (vLLM's `continuous_usage_stats`) send counts so far: a stream cut after one
        # is no bill.
        self.choices = choices
        self.usage_final = False
        # Text came after the last usage block: that block was a count so far, even once the
        # stream ends itself (a count on its first chunk and 800 tokens after it was charged
        # as the bill until 2026-12-08).
        self.stale = False
        self.events = 0
        # Events carrying generated text (`_GENERATED`): about one token each, the running
        # output estimate used before (or without) the provider's usage chunk.
        self.content_events = 0
        # The tokens of that generated text (`count`: the model's tokenizer, each event's text on
        # its own), what a stream that ended without usage is charged when above `content_events`.
        self.count = count
        self.generated_tokens = 0
        # `data: [DONE]` or an error event went by: the stream ended itself (not cut off).
        self.done = False
        # A Responses stream's last event (`_RESPONSES_END`) went by: it ended itself too, but
        # not `done`, whose usage counts as the bill: only usage on that event is (`usage_final`).
        self.ended = False
        # Every choice's finish reason, in stream order (the usage chunk has none).
        self.finish_reasons: list[str] = []
        self._pending = b""

    def feed(self, chunk: bytes, end: bool) -> bytes | None:
        had_pending = bool(self._pending)
        data = self._pending + chunk if had_pending else chunk
        out: list[bytes] = []
        start = 0
        changed = False
        for match in _EVENT_END.finditer(data):
            raw = data[start:match.end()]
            event = canonical_event(raw, self.named)
            changed = changed or event is not raw  # reframed, so the chunk cannot go out as it came
            start = match.end()
            self.events += 1
            if _GENERATED.search(event) is not None and (not self.named or _DELTA_EVENT.search(event) is not None):
                self.content_events += 1
                self.usage_final = False  # text after a usage block: that was a count so far
                self.stale = self.usage is not None
                if self.count is not None:
                    self.generated_tokens += self._text_tokens(event)
                self.over = self.over or (self.limit is not None and (
                    self.content_events > self.limit or self.generated_tokens > TEXT_LIMIT_FACTOR * self.limit))
            elif event.startswith(STREAM_ENDS):
                self.done = True
                if not event.startswith(b"data: [DONE]"):
                    event = _completed_error_event(event, self.cut)
                    changed = changed or event is not raw
            elif self.named and _RESPONSES_END.search(event) is not None:
                self.ended = True
                if self.cut is not None and _NAMED_FAILURES.match(event) is not None:
                    text = event.decode("utf-8", "surrogateescape")
                    if (kept := self.cut(text)) != text:
                        event, changed = kept.encode("utf-8", "surrogateescape"), True
            if b'"finish_reason":' in event and b'"finish_reason":null' not in event:
                self.finish_reasons += [m.decode() for m in _FINISH_REASON.findall(event)]
            if self.over or self.refused:
                if b'"usage"' in event:
                    self._take_usage(event)
                changed = True
            elif b'"usage"' in event and self._take_usage(event) and self.drop_usage_chunk:
                changed = True
            else:
                out.append(self.rewrite(event) if self.rewrite is not None else event)
        tail = data[start:]
        if self.rewrite is not None and not end and len(tail) > MAX_PENDING_BYTES and not self.refused:
            self.refused = self.done = True
            out.append(self.rewrite(error_event(502, UNSCANNABLE)))  # the guard flushes what it holds
            log.warning("stream_event_unscannable", pending_bytes=len(tail))
        if self.over or self.refused:
            tail = b"" if end else tail[-MAX_PENDING_BYTES:]  # kept only to read a usage event
            self._pending = tail
            return b"".join(out)
        if end and tail.strip() == b"data: [DONE]":
            self.done = True  # a last event without its blank line still ends the stream
        if end or len(tail) > MAX_PENDING_BYTES:
            out.append(self.rewrite(tail) if self.rewrite is not None and tail else tail)
            tail = b""
        self._pending = tail
        if not self.holds or not (changed or tail or had_pending or self.rewrite is not None):
            return None
        return b"".join(out)

    @property
    def holds(self) -> bool:
        """Partial events are held back until complete (else chunks go out as they came)."""
        return self.drop_usage_chunk or self.rewrite is not None or self.limit is not None

    def whole(self, out: bytes) -> bytes:
        """The last `feed` output made to end on an event boundary, so an event the caller
        appends stays whole instead of being glued to a partial one (a stream cut off
        mid-event): the partial event is dropped when it was held back (SSE clients never
        dispatch an event without its blank line), else ended (its start already went out)."""
        if not out or out.endswith((b"\n\n", b"\r\r")):
            return out
        if not self.holds:
            return out + b"\n\n"
        ends = [m.end() for m in _EVENT_END.finditer(out)]
        return out[:ends[-1]] if ends else b""

    def _text_tokens(self, event: bytes) -> int:
        """The tokens of the generated text one event carries (its escaped JSON strings decoded;
        one left escaped if it cannot be, which counts it longer, never shorter). A text the
        event repeats under another name counts once: servers send reasoning as both
        `reasoning` and `reasoning_content` (vLLM, OpenRouter)."""
        assert self.count is not None
        total = 0
        for raw in dict.fromkeys(_GENERATED_TEXT.findall(event)):
            try:
                text = orjson.loads(b'"' + raw + b'"')
            except orjson.JSONDecodeError:
                text = raw.decode("utf-8", "replace")
            total += self.count(text)
        return total

    def _take_usage(self, event: bytes) -> bool:
        """Records usage from a usage-bearing event; True when it is a usage-only chunk."""
        try:  # a canonical event, or the unterminated last one
            obj = orjson.loads(event_data(event) or b"")
        except orjson.JSONDecodeError:
            self.usage_unread = True  # a usage chunk that cannot be read: the bill is unknown
            return False
        usage = usage_from_object(obj)
        if usage is None:
            return False
        self.usage_unread = self.usage_unread or usage.completion_tokens is None
        self.stale = False
        self.usage_final = obj.get("type") in _RESPONSES_ENDS if self.named else (
            not obj.get("choices") or len(self.finish_reasons) >= self.choices)
        self.usage = replace(merged(self.usage, usage), finish_reasons=usage.finish_reasons or tuple(self.finish_reasons))
        return obj.get("choices") == []
