"""Output scanning for the OpenAI Responses API (`POST /v1/responses`): what `ResponseGuard`
does for chat completions, in the Responses API's own shapes.

A JSON answer is scanned in one pass over every string of its `output` (message text,
refusals, function-call arguments, reasoning summaries...), `output_text` and its other
fields but the request's echoed settings; a value is redacted in place, a blocked one
empties `output` and marks the answer `incomplete` with `incomplete_details.reason:
"content_filter"` (how the API itself reports filtered output).

A stream carries each text twice: piecewise in `*.delta` events, then whole in the events
that close it (`*.done`, `response.content_part.done`, `response.output_item.done`, the
final `response.completed` / `incomplete` / `failed`). Every delta text goes through its own
hold-back window (`StreamRedactor`), keyed by its kind, output item and part, so a value
split across deltas is seen whole. A closing event first flushes the windows it closes (their
held text goes out as one more delta, before it); then each of its strings that is the whole
text of a closed window is replaced by exactly what the client was sent for that window (so
the done text equals the concatenated deltas, placeholders included), and every other string
is scanned like a JSON answer. A block ends the stream with one `response.incomplete` event
(reason `content_filter`, no output) and nothing after it.

Forwarded events are re-serialised as OpenAI sends them, `event: <type>` then `data: <json>`
(the openai SDKs dispatch on the data's `type`; the event line is for clients that read the
SSE event name), and renumbered (`sequence_number`), since held-back deltas go out merged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import structlog

from ..errors import GatewayError
from ..providers.base import event_data
from ..usage import STREAM_ENDS
from .classification import (CONTENT_LOG_CHARS, SEAM_HEAD, Policy, Seam, Unreadable, read_json, read_keys, record,
                             rewritten, scanned_error, seam_decision)
from .scanner import (Decision, DecisionParams, LimitExceeded, PlaceholderMap, keyed_replacement, map_strings,
                      redact_strings, walk_strings)
from .stream import StreamRedactor

log = structlog.get_logger("gateway_extproc.policy")

# Events after which no text of the response follows: every window is flushed before them.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
# Fields of a response object that echo the request (scanned when it came in, and possibly
# large): not scanned again while they hold what the request sent (`ResponsesGuard.sent`); a
# provider that writes anything else there is scanned like any other field.
_ECHOES = frozenset({"instructions", "tools", "tool_choice", "text", "reasoning", "prompt", "metadata", "input"})
# The deltas of a message's text (`Key`'s kind).
_MESSAGE_TEXT = "response.output_text"
# The part index of a text, beside its output item's `output_index`.
_PART_INDEXES = ("content_index", "summary_index", "command_index")
FILTERED = {"reason": "content_filter"}
UNREADABLE = "The provider answered with a body output scanning could not read; it was not forwarded."

Key = tuple[str, int | None, str | None, int | None]  # (text kind, output_index, part index name, part index)


class _Window:
    """One text being streamed: its hold-back window, what the provider sent, what the
    client got, and the delta event its held text goes out in."""

    __slots__ = ("redactor", "raw", "sent", "template")

    def __init__(self, redactor: StreamRedactor, template: dict[str, Any]) -> None:
        self.redactor, self.template = redactor, template
        self.raw: list[str] = []
        self.sent: list[str] = []


class ResponsesGuard:
    """Scans a Responses API answer: a whole JSON body, or its SSE events."""

    __slots__ = ("policy", "params", "team", "sent", "windows", "known", "head", "seq", "ended", "response_text",
                 "clean", "seam", "deferred", "last", "tails", "resumed", "unreadable", "text_tail")

    def __init__(self, policy: Policy, params: DecisionParams, team: str, sent: dict[str, Any] | None = None) -> None:
        """`sent`: the request as forwarded (classified), whose echoes need no second scan."""
        self.policy, self.params, self.team = policy, params, team
        self.unreadable = Unreadable()
        self.sent = {k: sent[k] for k in _ECHOES if k in sent} if sent else {}
        self.windows: dict[Key, _Window] = {}
        # The whole text of every closed window -> the text the client was sent for it: how a
        # closing event's repeat of a streamed text is made to match its deltas, unscanned.
        self.known: dict[str, str] = {}
        # The response object as last announced (`response.created`...): a block's
        # `response.incomplete` repeats it (id, model, created_at...) with no output.
        self.head: dict[str, Any] = {}
        self.seq = 0
        self.ended = False
        self.response_text: list[str] = []
        # A JSON answer in which the scan found nothing: its logged text needs no second look.
        self.clean = False
        # A window closed with text still held (its tail) and the next texts since: a value may
        # be split there (one output item's text and the next's). Until the next text has been
        # seen past it, what goes out after the tail waits in `deferred`.
        self.seam: Seam | None = None
        self.deferred: list[bytes] = []
        # The window the last delta went to: a delta for another one while it is still open
        # (the provider sent no `*.done` between them, or interleaves texts) closes it first.
        self.last: Key | None = None
        # A text closed so (its held tail, as it went out) -> when it goes on after another one,
        # that tail and what follows are read together (`resumed`) as a client that collects
        # each item's text reads them; decided once the text has been seen past its hold-back.
        self.tails: dict[Key, str] = {}
        self.resumed: dict[Key, Seam] = {}
        # The last message text closed and its held tail, as it went out: the openai SDK's
        # `output_text` joins message texts whatever items come between them (a tool call, a
        # reasoning summary), so the next message text is read on from it (`resumed`).
        self.text_tail: tuple[Key, str] | None = None

    # -- JSON ----------------------------------------------------------------------------

    def json_body(self, body: Any) -> bytes | None:
        """The body (parsed by the caller, which also reads usage from it) to send instead,
        or None to send it unchanged. Logprobs are dropped (they spell the text out token by
        token, where no scan sees a value whole). Raises `provider_error` for a body that
        cannot be read, which therefore cannot be sent."""
        output = body.get("output") if isinstance(body, dict) else None
        if not isinstance(output, list):
            log.warning("response_unreadable", reason="no output")
            raise GatewayError("provider_error", UNREADABLE)
        dropped = _drop_logprobs(output)
        fields = [f for f in body if not self._echo(body, f)]
        # The messages with text first, in their order: the openai SDK's `output_text` joins
        # their texts, so a value split over two of them is one even with a tool call, a
        # reasoning item or a refusal between them (until 2026-12-08 it went out whole then);
        # put back in place after.
        order = sorted(range(len(output)), key=lambda i: not _has_text(output[i]))
        values = [[output[i] for i in order] if f == "output" else body[f] for f in fields]
        read = read_json(self.policy.scanner, values)
        if isinstance(read, LimitExceeded):
            log.warning("response_unreadable", reason=read.reason)
            raise GatewayError("provider_error", UNREADABLE)
        findings = read.findings
        self.clean = not findings
        decision = self.policy.scanner.decide(findings, self.params) if findings else None
        if decision is not None:
            record(decision, self.team, self.params.mode, "response")
        if decision is not None and (decision.block or decision.redact):
            # A block empties the output; a blocked value elsewhere (an error message) is
            # replaced by its placeholder, like redacted ones.
            for f, value in zip(fields, rewritten(values, read, decision.replaced)):
                if f == "output":
                    value = [v for _, v in sorted(zip(order, value), key=lambda pair: pair[0])]
                body[f] = value
            if decision.block:
                body.update(output=[], status="incomplete", incomplete_details=dict(FILTERED))
                if "output_text" in body:
                    body["output_text"] = ""
        elif not dropped:
            self.response_text = [_output_text(output)]
            return None
        self.response_text = [_output_text(body["output"])]  # what the client sees is all a log may hold
        return orjson.dumps(body)

    # -- SSE -----------------------------------------------------------------------------

    def sse_event(self, event: bytes) -> bytes:
        """One complete SSE event (in `usage.canonical_event` form, or the unterminated last
        one) in, what to forward out (possibly empty). What cannot be read is not forwarded,
        since it could not be scanned."""
        out = self._event(event)
        if self.seam is not None and not self.ended:
            self.deferred.append(out)  # after a seam still undecided
            return b""
        return out

    def _seam_out(self) -> bytes:
        """Decides the pending seam (`seam`) with what followed it: what it deferred, or the
        stream's end when a value spans it (`ended` is set then: a piece of the value may have
        gone out in its own window already, so it cannot be redacted whole)."""
        seam, self.seam = self.seam, None
        deferred, self.deferred = b"".join(self.deferred), []
        if seam is None:
            return deferred
        decision = seam_decision(self.policy, self.params, self.team, seam)
        return deferred if decision is None else self.block(decision)

    def _event(self, event: bytes) -> bytes:
        if self.ended:
            return b""
        if event.startswith(STREAM_ENDS):  # an error event (or [DONE]), scanned like text
            # Nothing after it is forwarded: text after it would start new windows, where a
            # value split around the end is never seen whole (the client joins the deltas).
            head = self._seam_out()
            if self.ended:
                return head
            out = head + self._close(None) + scanned_error(self.policy, self.params, self.team, event)
            self.ended = True
            return out
        data = event_data(event)  # the unterminated last event may start with its `event:` line
        if data is None:
            return b":\n\n" if event.strip(b"\r\n") else b""  # a comment (keep-alive), carrying nothing
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if not isinstance(kind, str) or not kind.isprintable():  # no event, or one that would break the framing
            self.unreadable.drop(event_bytes=len(event))
            return b""
        assert isinstance(obj, dict)
        if kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            return self._delta(obj, kind[:-6])
        before = b""
        if kind.endswith(".done"):
            before = self._close(obj)
        elif kind in _TERMINAL:
            before = self._seam_out()
            if self.ended:
                return before
            before += self._close(None)
        if self.ended:  # a flushed window held a blocked value
            return before
        for key, text in _opening_texts(obj):
            if key not in self.windows:  # (the deltas that follow are read with it: `resumed`)
                self.tails[key] = text[-SEAM_HEAD:]
        if (decision := self._unstreamed_seam(obj)) is not None:
            return before + self.block(decision)
        return before + self._whole(obj)

    def _delta(self, obj: dict[str, Any], kind: str) -> bytes:
        part = next((name for name in _PART_INDEXES if name in obj), None)
        key = (kind, _index(obj.get("output_index")), part, _index(obj.get(part)) if part else None)
        head = b""
        last, self.last = self.last, key
        if last is not None and last != key and (previous := self.windows.get(last)) and not previous.redactor.done:
            # A client that prints the deltas as they come reads this text right after that
            # one, whatever their items: it is closed here, as a `*.done` would close it, so
            # its held tail and this text are read across its seam (and go out in this order).
            self.tails[last] = previous.redactor.held()
            head = self._shut(last, previous, True)
            if self.ended:
                return head
        window = self.windows.get(key)
        fresh = window is None or window.redactor.done
        if fresh and key in self.tails:  # the text goes on after another one: read across its pause
            self.resumed[key] = Seam([self.tails.pop(key), ""], [key, key])
        if fresh and kind == _MESSAGE_TEXT and self.text_tail is not None:
            if self.text_tail[0] != key and key not in self.resumed:  # (the next message text)
                self.resumed[key] = Seam([self.text_tail[1], ""], [key, key])
            self.text_tail = None
        if fresh:  # a new text (or text after its close)
            # The event's other fields (ids, indexes) as every delta of this text will carry
            # them: scanned once.
            template = {k: v for k, v in obj.items() if k not in ("delta", "sequence_number", "obfuscation")}
            outcome = self._scan([(template, k) for k in template])
            if outcome is not None:
                return head if isinstance(outcome, LimitExceeded) else head + self.block(outcome)
            resumed = window if key in self.resumed else None
            window = self.windows[key] = _Window(
                StreamRedactor(self.policy.scanner, self.params, self.policy.cfg.holdback_chars,
                               json=kind.endswith("_arguments")), template)
            if resumed is not None:  # (its closing event repeats the whole text)
                window.raw, window.sent = resumed.raw, resumed.sent
        text = obj["delta"]
        if self.seam is not None and self.seam.key not in (None, key) and not self.seam.extend(key, fresh):
            head += self._seam_out()  # another text, and the seam is too long to read on into it
            if self.ended:
                return head
        window.raw.append(text)
        out = window.redactor.feed(text)
        if window.redactor.blocked:
            return head + self.block(window.redactor.block_decision)
        if key in self.resumed:
            self.resumed[key].parts[-1] += text
            if (out or len(self.resumed[key].parts[-1]) > SEAM_HEAD) and self._resume_blocked(key):
                return head + self.block(None)
        if self.seam is not None:
            if self.seam.key is None:  # the text after a closed one
                self.seam.keys[-1] = key
                self.seam.straight = self.seam.straight and fresh
            self.seam.parts[-1] += text
            if out or len(self.seam.parts[-1]) > SEAM_HEAD:  # what follows the seam has been seen
                head += self._seam_out()
                if self.ended:
                    return head
        if not out:
            return head  # held back until the window moves on
        return head + self._sent(key, window, out)

    def _sent(self, key: Key, window: _Window, text: str) -> bytes:
        """A delta event carrying `text` (scanned) of one window."""
        window.sent.append(text)
        if key[0] == _MESSAGE_TEXT:
            self._keep(text)
        obj = {**window.template, "delta": text}
        if "logprobs" in obj:
            obj["logprobs"] = []  # tokens spell out text held back, unscanned
        return self._emit(obj)

    def _close(self, obj: dict[str, Any] | None) -> bytes:
        """Flushes the windows a closing event closes (every one for None): their held text,
        scanned, one delta each, to go out before it."""
        out = []
        for key, window in self.windows.items():
            if window.redactor.done or obj is not None and not _closes(obj, key):
                continue
            out.append(self._shut(key, window, obj is not None))
            if self.ended:
                break
        return b"".join(out)

    def _shut(self, key: Key, window: _Window, seam: bool) -> bytes:
        """Flushes one window: its held text, scanned, as one delta; with `seam`, the next
        text may go on where it ends (a seam: `Seam`)."""
        if self._resume_blocked(key):
            return self.block(None)
        out = []
        tail = window.redactor.held() if seam else ""
        # The seam before this text reads on into the next one when this text let nothing
        # out since (a value over three texts); else it is decided first.
        joined = tail and self.seam is not None and self.seam.key == key and self.seam.extend(None)
        if tail and self.seam is not None and not joined:
            out.append(self._seam_out())
            if self.ended:
                return b"".join(out)
        text = window.redactor.flush()
        if window.redactor.blocked:
            return b"".join(out) + self.block(window.redactor.block_decision)
        if text:
            out.append(self._sent(key, window, text))
        self.known["".join(window.raw)] = "".join(window.sent)
        if tail and key[0] == _MESSAGE_TEXT:
            self.text_tail = (key, tail)
        if tail and not joined:  # the next text may go on with it: what goes out from here waits (`sse_event`)
            self.seam = Seam([tail, ""], [key, None])
        return b"".join(out)

    def _unstreamed_seam(self, obj: dict[str, Any]) -> Decision | None:
        """A message text that an event holds whole but was never streamed (a part or an item
        only its `*.added`, `*.done` or the final response carries), read on from the text
        before it as the openai SDK's `output_text` joins them: the streamed ones in the same
        event as the client got them, else the last one closed (`text_tail`). The decision
        that ends the stream when a value spans them (until 2026-12-08 a streamed text's
        strings were left out of the scan of such an event, and the value went out whole)."""
        texts = [text for key, text in _texts_in(obj) if key[0] == _MESSAGE_TEXT]
        fresh = [text for text in texts if text not in self.known]
        if not fresh:
            return None
        if len(fresh) < len(texts):
            parts = [self.known.get(text, text) for text in texts]
        elif self.text_tail is not None:
            parts = [self.text_tail[1], *texts]
        else:
            parts = texts
        decision = seam_decision(self.policy, self.params, self.team, Seam(parts, [None] * len(parts)))
        if decision is None and obj["type"] == "response.output_item.added":
            self.text_tail = (("", None, None, None), fresh[-1][-SEAM_HEAD:])  # (the next text reads on from it)
        return decision

    def _resume_blocked(self, key: Key) -> bool:
        """Decides the pause in a text that went on after another one (`resumed`): True when a
        value spans it (its first piece went out before the pause: the stream ends)."""
        seam = self.resumed.pop(key, None)
        decision = seam_decision(self.policy, self.params, self.team, seam) if seam is not None else None
        if decision is not None:
            record(decision, self.team, self.params.mode, "response")
        return decision is not None

    def _echo(self, response: dict[str, Any], field: str) -> bool:
        """`response[field]` repeats what the request sent there (its scan on the way in holds)."""
        return field in _ECHOES and field in self.sent and response[field] == self.sent[field]

    def _whole(self, obj: dict[str, Any]) -> bytes:
        """Any other event, every string scanned (a streamed text it repeats becomes what
        the client was sent for it), redacted in place, or the stream is blocked."""
        obj.pop("obfuscation", None)  # padding sized to the provider's text, not to what goes out
        if "logprobs" in obj:
            obj["logprobs"] = []
        response = obj.get("response")
        if isinstance(response, dict):
            fields = [(obj, k) for k in obj if k not in ("response", "sequence_number")]
            fields += [(response, k) for k in response if not self._echo(response, k)]
        else:
            fields = [(obj, k) for k in obj if k != "sequence_number"]
        outcome = self._scan(fields)
        if outcome is not None:
            return b"" if isinstance(outcome, LimitExceeded) else self.block(outcome)
        if isinstance(response, dict):
            self.head = response  # scanned: a block's response.incomplete may repeat it
        return self._emit(obj)

    def _scan(self, fields: list[tuple[dict[str, Any], str]]) -> Decision | LimitExceeded | None:
        """Scans the strings under these (dict, key) fields in one pass and redacts them in
        place (None); else the decision that blocks, or why they cannot be read (then the
        event is not forwarded)."""
        values = [holder[k] for holder, k in fields]
        _drop_logprobs(values)
        keyed: dict[str, None] = {}
        names: dict[str, None] = {}
        strings = walk_strings(values, keyed=keyed, names=names)
        if isinstance(strings, LimitExceeded):
            self.unreadable.drop(reason=strings.reason)
            return strings
        new = [self.known.get(s, s) for s in strings]
        unknown = [i for i, s in enumerate(strings) if s and s not in self.known]
        texts, numbers = [strings[i] for i in unknown], list(keyed)  # (numbers, keys: `read_json`)
        scanner = self.policy.scanner
        keys = read_keys(scanner, names)
        findings = scanner.scan_strings(texts) if unknown else []
        if numbers:
            findings += [replace(f, index=f.index + len(texts)) for f in scanner.scan_strings(numbers, apart=True)]
        if keys:
            findings += [replace(f, index=f.index + len(texts) + len(numbers)) for f in scanner.scan_strings(keys)]
        rekeyed: dict[str, str] = {}
        renamed: dict[str, str] = {}
        if findings:
            decision = self.policy.scanner.decide(findings, self.params)
            if decision.block:
                return decision
            record(decision, self.team, self.params.mode, "response")
            if decision.redact:
                redacted, _ = redact_strings(texts + numbers + keys, decision.redact, PlaceholderMap())
                for i, text in zip(unknown, redacted):
                    new[i] = text
                rekeyed = {old: keyed_replacement(old, text) for old, text in zip(numbers, redacted[len(texts):])
                           if old != text}
                renamed = {old: text for old, text in zip(keys, redacted[len(texts) + len(numbers):]) if old != text}
        if new != strings or rekeyed or renamed:
            replacements = iter(new)
            for (holder, k), value in zip(fields, map_strings(values, lambda _s: next(replacements), keyed=rekeyed,
                                                              keys=renamed)):
                holder[k] = value
        return None

    def _emit(self, obj: dict[str, Any]) -> bytes:
        obj["sequence_number"] = self.seq
        self.seq += 1
        return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    def block(self, decision: Decision | None) -> bytes:
        """Ends the stream: one `response.incomplete` (reason content_filter, no output)."""
        self.ended = True
        if decision is not None:
            record(decision, self.team, self.params.mode, "response")
        response = {**self.head, "status": "incomplete", "incomplete_details": dict(FILTERED), "output": []}
        response.pop("output_text", None)
        return self._emit({"type": "response.incomplete", "response": response})

    def flush(self) -> bytes:
        """Whatever text is still held back, scanned, one delta each (the stream is ending early)."""
        if self.ended:
            return b""
        head = self._seam_out()
        if self.ended:
            return head
        self.ended = True
        return head + self._close(None)

    def _keep(self, emitted: str) -> None:
        """The streamed text as the client got it (redacted), for content logging; bounded."""
        if sum(map(len, self.response_text)) < CONTENT_LOG_CHARS:
            self.response_text.append(emitted)

    def logged_response(self) -> str:
        """The response text a log line may hold: exactly what the client was sent."""
        return "".join(self.response_text)[:CONTENT_LOG_CHARS]


# The texts an event that opens them may already hold: a part's (by its type), an output
# item's own (by its type), and where an item keeps its parts (field, index name).
_PART_TEXTS = {"output_text": ("response.output_text", "text"), "refusal": ("response.refusal", "refusal"),
               "summary_text": ("response.reasoning_summary_text", "text")}
_ITEM_TEXTS = {"function_call": ("response.function_call_arguments", "arguments"),
               "custom_tool_call": ("response.custom_tool_call_input", "input")}
_ITEM_PARTS = {"message": ("content", "content_index"), "reasoning": ("summary", "summary_index")}


def _opening_texts(obj: dict[str, Any]) -> list[tuple[Key, str]]:
    """(window key, text) of the texts an event that opens them already holds (`response.created`
    and the like with an `output`, `response.output_item.added`, `response.content_part.added`,
    `response.reasoning_summary_part.added`): the openai SDK's `responses.stream()` starts each
    text from it and appends the deltas, so it is read with them (`ResponsesGuard.tails`)."""
    return [] if obj["type"].endswith(".done") or obj["type"] in _TERMINAL else _texts_in(obj)


def _texts_in(obj: dict[str, Any]) -> list[tuple[Key, str]]:
    """(window key, text) of the texts any event holds whole, in their order: a part's, an
    output item's, a response's `output`, or an `output_text.done`'s own."""
    kind, response = obj["type"], obj.get("response")
    if kind.endswith(("_part.added", "_part.done")):
        name = next((n for n in _PART_INDEXES if n in obj), None)
        return _part_text(obj.get("part"), obj.get("output_index"), name, obj.get(name) if name else None)
    if kind == _MESSAGE_TEXT + ".done":
        text = obj.get("text")
        return [((_MESSAGE_TEXT, _index(obj.get("output_index")), "content_index", _index(obj.get("content_index"))),
                 text)] if isinstance(text, str) and text else []
    if kind in ("response.output_item.added", "response.output_item.done"):
        return _item_texts([(obj.get("output_index"), obj.get("item"))])
    if isinstance(response, dict) and isinstance(response.get("output"), list):
        return _item_texts(list(enumerate(response["output"])))
    return []


def _item_texts(items: list[tuple[Any, Any]]) -> list[tuple[Key, str]]:
    """(window key, text) of the texts of these (output_index, output item)."""
    out: list[tuple[Key, str]] = []
    for at, item in items:
        if not (isinstance(item, dict) and isinstance(item.get("type"), str)):
            continue  # (a type is a key here: one of another kind is no text's)
        kind, field = _ITEM_TEXTS.get(item["type"], ("", ""))
        if kind and isinstance(item.get(field), str) and item[field]:
            out.append(((kind, _index(at), None, None), item[field]))
        field, name = _ITEM_PARTS.get(item["type"], ("", ""))
        parts = item.get(field) if field else None
        for k, part in enumerate(parts if isinstance(parts, list) else ()):
            out += _part_text(part, at, name, k)
    return out


def _part_text(part: Any, at: Any, name: str | None, k: Any) -> list[tuple[Key, str]]:
    kind, field = _PART_TEXTS.get(part["type"], ("", "")) if isinstance(part, dict) \
        and isinstance(part.get("type"), str) else ("", "")
    if not (kind and isinstance(part.get(field), str) and part[field]):
        return []
    return [((kind, _index(at), name, _index(k) if name else None), part[field])]


def _closes(obj: dict[str, Any], key: Key) -> bool:
    """Whether a `*.done` event closes a window: same output item and, when it names one,
    same part; an event that names neither closes its own kind's windows (`response.audio.done`)."""
    part = next((name for name in _PART_INDEXES if name in obj), None)
    if "output_index" not in obj and part is None:
        return obj["type"][:-5] == key[0]
    return ("output_index" not in obj or _index(obj["output_index"]) == key[1]) and \
        (part is None or (part, _index(obj[part])) == key[2:])


def _index(value: Any) -> int | None:
    """An index as a window key: an integer, else None (a key must be hashable)."""
    return value if type(value) is int else None


def _drop_logprobs(values: list[Any]) -> bool:
    """Empties the `logprobs` of every content part of every output item in `values` (an
    `output` list, or an event's fields); True when some were there."""
    dropped = False
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            if value.get("logprobs"):
                value["logprobs"], dropped = [], True
            for field in ("content", "part", "item", "output"):
                if isinstance(value.get(field), (list, dict)):
                    stack.append(value[field])
    return dropped


def _has_text(item: Any) -> bool:
    """A message item with an `output_text` part: one whose text `output_text` joins."""
    return isinstance(item, dict) and item.get("type") == "message" and isinstance(item.get("content"), list) \
        and any(isinstance(part, dict) and part.get("type") == "output_text" for part in item["content"])


def _output_text(output: list[Any]) -> str:
    """The message text of an output, for content logging."""
    return "\n".join(part["text"] for item in output if isinstance(item, dict) and item.get("type") == "message"
                     for part in item.get("content") or ()
                     if isinstance(part, dict) and part.get("type") == "output_text"
                     and isinstance(part.get("text"), str))
