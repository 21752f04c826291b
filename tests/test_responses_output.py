"""Output scanning of the Responses API (policy/responses_output.py), without gRPC: JSON
answers and streams as an OpenAI backend writes them, through `SseUsageTap` (which splits
the events and canonicalises their framing) exactly as the router wires it.

Property: whatever the delta splits, framings, network chunks and output items (messages,
function calls, reasoning summaries, refusals), no restricted value leaves; each text's
deltas, its done event, its content part, its output item and the final response all hold
the same redacted text; a blocked value ends the stream with one `response.incomplete`
(content_filter) and nothing after; usage is still read.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from gateway_extproc.config import Classification
from gateway_extproc.errors import GatewayError
from gateway_extproc.mock_provider import SSE_FRAMINGS, _reframe
from gateway_extproc.policy.classification import Policy, ResponseGuard
from gateway_extproc.policy.responses_output import ResponsesGuard
from gateway_extproc.policy.scanner import PlaceholderMap, redact_strings
from gateway_extproc.usage import SseUsageTap
from tests.test_processor_properties import local_runtime, run_stream

__all__ = ["local_runtime"]  # the fixture, values-local's runtime

TIERS = ("public", "internal", "confidential", "restricted")
POLICY = Policy(Classification(TIERS, "enforce", "public", {}, (), None, (), True, 64, None))
CARD, EMAIL, AWS_KEY = "4111 1111 1111 1111", "jane.doe@example.com", "AKIAIOSFODNN7EXAMPLE"
RESTRICTED = (CARD, EMAIL, AWS_KEY)
USAGE = {"input_tokens": 7, "output_tokens": 35, "total_tokens": 42}
_SEPARATORS = re.compile(r"[\s.\-_/\u200b]")


def guard(sent: dict[str, Any] | None = None) -> ResponsesGuard:
    return ResponsesGuard(POLICY, POLICY._params["enforce"], "team", sent)


def leaks(text: str) -> list[str]:
    flat = _SEPARATORS.sub("", text)
    return [v for v in RESTRICTED if v in text or _SEPARATORS.sub("", v) in flat]


def whole_redaction(text: str) -> str | None:
    """The text redacted in one pass (None: blocked): what the deltas must add up to."""
    findings = POLICY.scanner.scan_strings([text])
    decision = POLICY.scanner.decide(findings, POLICY._params["enforce"])
    if decision.block:
        return None
    return redact_strings([text], decision.redact, PlaceholderMap())[0][0] if decision.redact else text


# -- what a provider sends --------------------------------------------------------------------

RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-x", "tools": [],
            "parallel_tool_calls": True, "tool_choice": "auto"}


def item_of(kind: str, text: str, i: int) -> dict[str, Any]:
    if kind == "message":
        return {"type": "message", "id": f"msg_{i}", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    if kind == "refusal":
        return {"type": "message", "id": f"msg_{i}", "role": "assistant", "status": "completed",
                "content": [{"type": "refusal", "refusal": text}]}
    if kind == "function_call":
        return {"type": "function_call", "id": f"fc_{i}", "call_id": f"call_{i}", "name": "save",
                "arguments": text, "status": "completed"}
    return {"type": "reasoning", "id": f"rs_{i}", "summary": [{"type": "summary_text", "text": text}]}


def provider_events(items: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """The event sequence OpenAI documents for output items whose texts arrive in these deltas."""
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {**RESPONSE, "status": "in_progress",
                                                                               "output": [], "usage": None}}]
    done = []
    for i, (kind, deltas) in enumerate(items):
        text = "".join(deltas)
        full = item_of(kind, text, i)
        done.append(full)
        added = {**full, "status": "in_progress"}
        where: dict[str, Any] = {"item_id": full["id"], "output_index": i}
        if kind in ("message", "refusal"):
            added["content"] = []
        elif kind == "function_call":
            added["arguments"] = ""
        else:
            added["summary"] = []
        events.append({"type": "response.output_item.added", "output_index": i, "item": added})
        if kind in ("message", "refusal"):
            part = full["content"][0]
            field = "text" if kind == "message" else "refusal"
            name = "response.output_text" if kind == "message" else "response.refusal"
            events.append({"type": "response.content_part.added", **where, "content_index": 0,
                           "part": {**part, field: ""}})
            events += [{"type": f"{name}.delta", **where, "content_index": 0, "delta": d,
                        **({"logprobs": [{"token": d, "logprob": -0.1}], "obfuscation": "x1Yz"}
                           if kind == "message" else {})} for d in deltas]
            events.append({"type": f"{name}.done", **where, "content_index": 0, field: text,
                           **({"logprobs": []} if kind == "message" else {})})
            events.append({"type": "response.content_part.done", **where, "content_index": 0, "part": part})
        elif kind == "function_call":
            events += [{"type": "response.function_call_arguments.delta", **where, "delta": d} for d in deltas]
            events.append({"type": "response.function_call_arguments.done", **where, "name": "save", "arguments": text})
        else:
            part = full["summary"][0]
            events.append({"type": "response.reasoning_summary_part.added", **where, "summary_index": 0,
                           "part": {**part, "text": ""}})
            events += [{"type": "response.reasoning_summary_text.delta", **where, "summary_index": 0, "delta": d}
                       for d in deltas]
            events.append({"type": "response.reasoning_summary_text.done", **where, "summary_index": 0, "text": text})
            events.append({"type": "response.reasoning_summary_part.done", **where, "summary_index": 0, "part": part})
        events.append({"type": "response.output_item.done", "output_index": i, "item": full})
    events.append({"type": "response.completed", "response": {**RESPONSE, "status": "completed", "output": done,
                                                             "usage": USAGE}})
    return [{**e, "sequence_number": n} for n, e in enumerate(events)]


def wire(events: list[dict[str, Any]], framing: str | None) -> bytes:
    raw = [b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events]
    return b"".join(_reframe(r, framing, n) if framing else r for n, r in enumerate(raw))


def run(raw: bytes, cuts: list[int], g: ResponsesGuard | None = None) -> tuple[bytes, SseUsageTap]:
    """The provider's bytes, in chunks cut at `cuts`, through the tap and the guard."""
    g = g or guard()
    tap = SseUsageTap(False, g.sse_event)
    bounds = [0, *sorted({c % (len(raw) + 1) for c in cuts}), len(raw)]
    chunks = [raw[a:b] for a, b in zip(bounds, bounds[1:])]
    out = b"".join(tap.feed(c, i == len(chunks) - 1) or b"" for i, c in enumerate(chunks))
    return out, tap


def read(out: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """The events an SSE client reads: (event name, data), every data a JSON object."""
    events = []
    for sse in SSEDecoder().iter_bytes(iter([out])):
        obj = orjson.loads(sse.data)
        assert isinstance(obj, dict), sse.data
        events.append((sse.event, obj))
    return events


def texts_of(events: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """Each text's concatenated deltas, by (kind, output_index)."""
    out: dict[tuple[str, int], str] = {}
    for e in events:
        if e["type"].endswith(".delta"):
            key = (e["type"][:-6], e["output_index"])
            out[key] = out.get(key, "") + e["delta"]
    return out


def item_text(item: dict[str, Any]) -> str:
    if item["type"] == "message":
        part = item["content"][0]
        return part.get("text", part.get("refusal"))
    if item["type"] == "function_call":
        return item["arguments"]
    return item["summary"][0]["text"]


def check_consistent(events: list[dict[str, Any]], n_items: int) -> dict[int, str]:
    """Every text's deltas == its done event == its part == its item == the final response;
    deltas before their done event; sequence numbers in order. Returns the texts by item."""
    texts = {i: t for (_, i), t in texts_of(events).items()}
    types = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.completed" and final["response"]["usage"] == USAGE
    assert len(final["response"]["output"]) == n_items
    for i, item in enumerate(final["response"]["output"]):
        streamed = texts.get(i, "")
        assert item_text(item) == streamed, (i, item, streamed)
    for n, e in enumerate(events):
        if e["type"].endswith(".done") and "output_index" in e:
            i = e["output_index"]
            for field in ("text", "refusal", "arguments"):
                if field in e:
                    assert e[field] == texts.get(i, ""), e
            part, item = e.get("part"), e.get("item")
            if isinstance(part, dict):
                assert part.get("text", part.get("refusal")) == texts.get(i, ""), e
            if isinstance(item, dict):
                assert item_text(item) == texts.get(i, ""), e
            assert not [k for k in range(n + 1, len(events))
                        if types[k].endswith(".delta") and events[k].get("output_index") == i], "delta after done"
        if e["type"] == "response.output_text.delta":
            assert e.get("logprobs") == [] and "obfuscation" not in e
    return texts


# -- streams: properties ----------------------------------------------------------------------

WORDS = st.lists(st.sampled_from(["the", "invoice", "is", "due", "soon,", "see", "page", "and", "us", "–", "ok.",
                                  "😀", "\u00e9t\u00e9", "\\n", '"quoted"', "{}", "data:", "[DONE]", "event:"]),
                 min_size=0, max_size=10).map(" ".join)
REDACTABLE = st.sampled_from([(CARD, "[CREDIT_CARD_1]"), ("4111-1111-1111-1111", "[CREDIT_CARD_1]"),
                              (EMAIL, "[EMAIL_1]"), (None, None)])
KINDS = st.sampled_from(["message", "function_call", "reasoning", "refusal"])


@st.composite
def split_text(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, max(len(text), 1)), max_size=12))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [""]


@st.composite
def items_st(draw: st.DrawFn, values: st.SearchStrategy) -> list[tuple[str, list[str], str | None]]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(KINDS)
        secret, placeholder = draw(values)
        text = " ".join(p for p in (draw(WORDS), secret, draw(WORDS)) if p)
        if kind == "function_call":
            text = orjson.dumps({"note": text}).decode()
        out.append((kind, draw(split_text(text)), placeholder))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=items_st(REDACTABLE), framing=st.sampled_from([None, *SSE_FRAMINGS]),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_a_redacted_value_never_leaves_and_every_repeat_matches_the_deltas(
        items: list[tuple[str, list[str], str | None]], framing: str | None, cuts: list[int]) -> None:
    out, tap = run(wire(provider_events([(k, d) for k, d, _ in items]), framing), cuts)
    assert leaks(out.decode()) == []
    named = read(out)
    assert all(name == e["type"] for name, e in named)
    events = [e for _, e in named]
    texts = check_consistent(events, len(items))
    for i, (kind, deltas, placeholder) in enumerate(items):
        if placeholder:
            assert placeholder in texts[i], (kind, texts[i])
        if kind != "function_call":  # arguments are scanned as JSON values in one pass: offsets may differ
            assert texts.get(i, "") == whole_redaction("".join(deltas)), (kind, deltas)
    assert tap.usage is not None and tap.usage.completion_tokens == USAGE["output_tokens"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=items_st(st.sampled_from([(AWS_KEY, None), (None, None), (CARD, "x")])), data=st.data(),
       framing=st.sampled_from([None, *SSE_FRAMINGS]), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_a_blocked_value_ends_the_stream_incomplete_with_nothing_after(
        items: list[tuple[str, list[str], str | None]], data: st.DataObject, framing: str | None,
        cuts: list[int]) -> None:
    blocked = data.draw(st.integers(0, len(items) - 1))
    kind, _, _ = items[blocked]
    secret_text = f"upload with {AWS_KEY} today"
    if kind == "function_call":
        secret_text = orjson.dumps({"key": secret_text}).decode()
    items[blocked] = (kind, data.draw(split_text(secret_text)), None)
    out, tap = run(wire(provider_events([(k, d) for k, d, _ in items]), framing), cuts)
    assert leaks(out.decode()) == []
    events = [e for _, e in read(out)]
    last = events[-1]
    assert last["type"] == "response.incomplete", [e["type"] for e in events]
    assert last["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert last["response"]["output"] == [] and last["response"]["id"] == "resp_1"
    assert [e["type"] for e in events].count("response.incomplete") == 1
    assert "response.completed" not in [e["type"] for e in events]
    assert tap.usage is not None and tap.usage.completion_tokens == USAGE["output_tokens"]  # still accounted


# -- streams: cases ---------------------------------------------------------------------------


def test_a_value_split_one_character_per_delta_is_redacted() -> None:
    text = f"Write to {EMAIL} or charge {CARD} please."
    out, _ = run(wire(provider_events([("message", list(text))]), None), [])
    events = [e for _, e in read(out)]
    assert check_consistent(events, 1)[0] == "Write to [EMAIL_1] or charge [CREDIT_CARD_1] please."
    # The held text went out in fewer, merged deltas, all before the done event.
    assert 1 < sum(e["type"] == "response.output_text.delta" for e in events) < len(text)


def test_a_closing_event_without_deltas_is_scanned() -> None:
    """A provider that sends a text only in its done events (no deltas)."""
    events = [e for e in provider_events([("message", [f"mail {EMAIL}"]), ("function_call", ['{"k": "x"}'])])
              if not e["type"].endswith(".delta")]
    out, _ = run(wire(events, None), [])
    assert leaks(out.decode()) == [] and b"[EMAIL_1]" in out


def test_a_done_text_other_than_the_deltas_is_scanned_whole() -> None:
    events = provider_events([("message", ["hello ", "there"])])
    for e in events:
        if e["type"] == "response.output_text.done":
            e["text"] = f"hello there, and {CARD}"
    out, _ = run(wire(events, None), [])
    assert leaks(out.decode()) == []
    [done] = [e for _, e in read(out) if e["type"] == "response.output_text.done"]
    assert done["text"] == "hello there, and [CREDIT_CARD_1]"


@pytest.mark.parametrize("event", [
    b"data: not json\n\n", b'data: ["a list"]\n\n', b'data: {"no": "type"}\n\n',
    b'data: {"type": "x\\ndata: {}", "delta": "a"}\n\n', b'data: {"type": 5}\n\n'])
def test_an_unreadable_event_is_not_forwarded(event: bytes) -> None:
    g = guard()
    assert g.sse_event(event) == b""
    assert g.sse_event(b":\n\n") == g.sse_event(b": keep-alive 4111 1111 1111 1111") == b":\n\n"


@pytest.mark.parametrize("framing", [None, *SSE_FRAMINGS])
@pytest.mark.parametrize("reply", [f"mail {EMAIL} now", f"key {AWS_KEY} now"])
def test_an_unterminated_last_event_is_scanned(framing: str | None, reply: str) -> None:
    """The stream ends without the blank line after `response.completed` (which repeats the
    text whole): the tap hands the guard that tail as it came, `event:` line first."""
    raw = wire(provider_events([("message", [reply])]), framing).rstrip(b"\r\n")
    for cuts in ([], [len(raw) - 5], list(range(0, len(raw), 7))):
        out, _ = run(raw, cuts)
        assert leaks(out.decode()) == [], (framing, cuts, out[-300:])


def test_text_of_a_delta_that_is_no_string_is_scanned() -> None:
    g = guard()
    out = g.sse_event(b"data: " + orjson.dumps({"type": "response.output_text.delta", "output_index": 0,
                                                 "content_index": 0, "delta": {"odd": f"card {CARD}"}}) + b"\n\n")
    assert leaks(out.decode()) == [] and b"[CREDIT_CARD_1]" in out
    out = g.sse_event(b"data: " + orjson.dumps({"type": "response.custom.delta", "delta": [AWS_KEY]}) + b"\n\n")
    assert b"response.incomplete" in out and leaks(out.decode()) == []
    assert g.sse_event(b"data: " + orjson.dumps(provider_events([("message", ["x"])])[-1]) + b"\n\n") == b""


def test_held_text_goes_out_before_the_stream_ends_early() -> None:
    g = guard()
    events = provider_events([("message", ["short answer"])])[:4]  # cut after the first delta
    out = b"".join(g.sse_event(b"data: " + orjson.dumps(e) + b"\n\n") for e in events)
    assert b"short answer" not in out  # held back (shorter than the window)
    out += g.flush()
    assert texts_of([e for _, e in read(out)]) == {("response.output_text", 0): "short answer"}
    assert g.flush() == b"" and g.sse_event(b"data: {}\n\n") == b""


def test_the_gateway_error_event_goes_out_after_the_held_text() -> None:
    g = guard()
    events = provider_events([("message", ["almost done"])])[:4]
    out = b"".join(g.sse_event(b"data: " + orjson.dumps(e) + b"\n\n") for e in events)
    error = b'data: {"error":{"message":"cut","type":"server_error","code":"provider_error","param":null}}\n\n'
    out += g.sse_event(error)
    assert out.endswith(error) and b'"delta":"almost done"' in out


def test_the_logged_response_is_what_the_client_got() -> None:
    g = guard()
    run(wire(provider_events([("message", ["mail ", EMAIL, " now"])]), None), [], g)
    assert g.logged_response() == "mail [EMAIL_1] now"


TYPES = ["response.output_text.delta", "response.output_text.done", "response.refusal.delta",
         "response.function_call_arguments.delta", "response.function_call_arguments.done",
         "response.content_part.done", "response.output_item.done", "response.completed", "response.incomplete",
         "response.created", "error", "response.custom.delta", "response.audio.done", "x"]
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) |
                        # Values with words beside them: Scanner.scan_strings misses bare ones in
                        # some sequences of strings (three cards; a key between two numbers, which
                        # a card candidate bridges over): the scanner's to fix, not this module's.
                        st.sampled_from(["", "a", f"mail {EMAIL}", f"card {CARD} ok", f"key {AWS_KEY} now",
                                         AWS_KEY[:10], AWS_KEY[10:]]),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.sampled_from(["text", "delta", "output", "item", "part", "content", "arguments",
                                             "logprobs", "output_index", "content_index", "response"]), inner,
                            max_size=4), max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=st.lists(st.fixed_dictionaries({"type": st.sampled_from(TYPES)}, optional={
    "delta": ANY_JSON, "output_index": ANY_JSON, "content_index": ANY_JSON, "text": ANY_JSON, "item": ANY_JSON,
    "part": ANY_JSON, "response": ANY_JSON, "logprobs": ANY_JSON}), max_size=12))
def test_hostile_events_never_raise_and_never_carry_a_whole_value_out(events: list[dict[str, Any]]) -> None:
    """Any shape in any order: the guard answers every event; a value whole in one string
    never goes out (values split over strings are the stream's concern, tested above)."""
    g = guard()  # (no request: an echo field holds what the provider put there, and is scanned)
    out = b"".join(g.sse_event(b"data: " + orjson.dumps(e) + b"\n\n") for e in events) + g.flush()
    text = out.decode()
    assert EMAIL not in text and CARD not in text and AWS_KEY not in text
    for _, e in read(out):
        assert isinstance(e.get("type"), str)


# -- JSON -------------------------------------------------------------------------------------


def json_answer(items: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    output = [item_of(kind, text, i) for i, (kind, text) in enumerate(items)]
    return {**RESPONSE, "status": "completed", "output": output, "usage": USAGE, **extra}


def test_json_every_text_of_the_output_is_redacted_in_one_pass() -> None:
    body = json_answer([("message", f"the card {CARD}"), ("refusal", f"not {EMAIL}"),
                        ("function_call", orjson.dumps({"to": EMAIL}).decode()), ("reasoning", f"card {CARD}")],
                       output_text=f"the card {CARD}")
    body["output"][0]["content"][0]["logprobs"] = [{"token": "4111", "logprob": -0.1}]
    g = guard()
    out = g.json_body(body)
    assert out is not None and leaks(out.decode()) == []
    sent = orjson.loads(out)
    assert sent["output"][0]["content"][0]["text"] == "the card [CREDIT_CARD_1]"
    assert sent["output"][0]["content"][0]["logprobs"] == []
    assert sent["output"][1]["content"][0]["refusal"] == "not [EMAIL_1]"
    assert orjson.loads(sent["output"][2]["arguments"]) == {"to": "[EMAIL_1]"}
    assert sent["output"][3]["summary"][0]["text"] == "card [CREDIT_CARD_1]"
    assert sent["output_text"] == "the card [CREDIT_CARD_1]"
    assert sent["usage"] == USAGE and sent["status"] == "completed"
    assert g.logged_response() == "the card [CREDIT_CARD_1]"


BETWEEN = {"function_call": orjson.dumps({"query": "look up the account " + "and its billing history " * 4}).decode(),
           "reasoning": "Considering which account to use; the billing lookup comes first, then the reply.",
           "refusal": "I can't share more than this about the account."}


@pytest.mark.parametrize("kind", sorted(BETWEEN))
def test_a_value_split_over_two_messages_with_another_item_between_them_never_leaves(kind: str) -> None:
    """The openai SDK's `output_text` joins every message's text, skipping other items: a card
    split over two messages with a tool call or a reasoning summary between them went out whole,
    as JSON and streamed, until 2026-12-08 (without the item between, it was redacted)."""
    first, second = "Your card number is 4111 1111", " 1111 1111, as requested."
    items = [("message", first), (kind, BETWEEN[kind]), ("message", second)]
    out = guard().json_body(json_answer(items))
    assert out is not None and leaks(out.decode()) == []
    sent = orjson.loads(out)["output"]
    assert [i["type"] for i in sent] == ["message", "message" if kind == "refusal" else kind, "message"]
    assert [item_text(i) for i in sent] == ["Your card number is [CREDIT_CARD_1]", BETWEEN[kind],
                                            " [CREDIT_CARD_1], as requested."]
    for framing in (None, *SSE_FRAMINGS):
        streamed, _ = run(wire(provider_events([(k, [t[:9], t[9:]]) for k, t in items]), framing), [])
        assert leaks(streamed.decode()) == [], framing
        events = [e for _, e in read(streamed)]
        assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["output"] == []


def test_a_value_split_between_a_streamed_text_and_one_never_streamed_never_leaves() -> None:
    """A message text a provider puts only in a whole event (a second part in the item's
    `output_item.done` and the final response, or a second item already whole in its
    `output_item.added`) was scanned without the streamed text before it, and a card split
    between them went out whole until 2026-12-08 (`output_text` joins them)."""
    first, second = "Your card number is 4111 1111", " 1111 1111 thanks"
    events = provider_events([("message", [first])])
    done = next(e for e in events if e["type"] == "response.output_item.done")
    both = {**done["item"], "content": [*done["item"]["content"], {**done["item"]["content"][0], "text": second}]}
    done["item"] = both
    events[-1]["response"]["output"] = [both]
    later = [{"type": "response.output_item.added", "output_index": 1, "item": {**item_of("message", second, 1)}},
             {"type": "response.output_item.done", "output_index": 1, "item": item_of("message", second, 1)}]
    other = [*events[:-1], *later, {**events[-1], "response": {**events[-1]["response"], "output": [
        item_of("message", first, 0), item_of("message", second, 1)]}}]
    for sequence in (events, other):
        out, _ = run(wire([{**e, "sequence_number": n} for n, e in enumerate(sequence)], None), [])
        got = [e for _, e in read(out)]
        assert leaks(out.decode()) == [] and "thanks" not in out.decode()
        assert got[-1]["type"] == "response.incomplete"
    clean = provider_events([("message", ["Your order number is 4111"]), ("message", [" and it ships today"])])
    out, _ = run(wire(clean, None), [])
    assert [e for _, e in read(out)][-1]["type"] == "response.completed"


def test_json_a_clean_answer_goes_out_unchanged() -> None:
    assert guard().json_body(json_answer([("message", "all fine here")])) is None


@pytest.mark.parametrize("where", ["message", "function_call", "reasoning", "output_text"])
def test_json_a_blocked_value_empties_the_output(where: str) -> None:
    secret = f"key {AWS_KEY}"
    if where == "output_text":
        body = json_answer([("message", "fine")], output_text=secret)
    else:
        body = json_answer([("message", "fine"), (where, orjson.dumps([secret]).decode() if where == "function_call"
                                                  else secret)])
    out = guard().json_body(body)
    assert out is not None and leaks(out.decode()) == [] and b"fine" not in out
    sent = orjson.loads(out)
    assert sent["status"] == "incomplete" and sent["incomplete_details"] == {"reason": "content_filter"}
    assert sent["output"] == [] and sent.get("output_text", "") == "" and sent["usage"] == USAGE


def test_json_a_value_outside_the_output_is_scanned_too() -> None:
    body = json_answer([("message", "fine")], error={"message": f"card {CARD}"}, instructions=f"echo {CARD}")
    sent = orjson.loads(guard({"instructions": f"echo {CARD}"}).json_body(body) or b"")
    assert sent["error"]["message"] == "card [CREDIT_CARD_1]" and sent["output"][0]["content"][0]["text"] == "fine"
    assert sent["instructions"] == f"echo {CARD}"  # the request's own echo: scanned when it came in
    body = json_answer([("message", "fine")], instructions=f"echo {CARD}", metadata={"note": EMAIL})
    sent = orjson.loads(guard({"instructions": "be brief"}).json_body(body) or b"")
    assert leaks(orjson.dumps(sent).decode()) == []  # what the request did not send there is the provider's text
    body = json_answer([("message", "fine")], error={"message": f"key {AWS_KEY}"})
    out = guard().json_body(body) or b""
    assert leaks(out.decode()) == [] and orjson.loads(out)["output"] == []


def test_a_blocked_value_in_the_final_response_is_not_repeated_by_the_block() -> None:
    events = provider_events([("message", ["all ", "fine"])])
    events[-1]["response"]["error"] = {"message": f"key {AWS_KEY}"}
    out, _ = run(wire(events, None), [])
    assert leaks(out.decode()) == []
    last = read(out)[-1][1]
    assert last["type"] == "response.incomplete" and "error" not in last["response"]


@pytest.mark.parametrize("body", [None, [], "text", {"id": "x"}, {"output": "x"}, {"output": {"a": 1}}])
def test_json_an_answer_without_an_output_list_is_a_provider_error(body: Any) -> None:
    with pytest.raises(GatewayError) as info:
        guard().json_body(body)
    assert info.value.code == "provider_error"


# -- through the router processor (no gRPC server) ------------------------------------------------


@pytest.mark.parametrize("end", [b"", b'data: {"type":"response.output_text.delta","output_index":0,"content_ind'])
def test_text_held_back_reaches_the_client_when_the_stream_is_cut_off(local_runtime: Any, end: bytes) -> None:
    """The provider's connection ends after some deltas, without the events that close the
    text: what the window still holds goes out, scanned (chat does the same), then the
    `upstream_stream_interrupted` error event (the answer above it is incomplete)."""
    events = provider_events([("message", ["Hello", " world, mail ", EMAIL, " now"])])
    raw = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events[:7]) + end
    _, out = asyncio.run(run_stream(local_runtime, "responses", "openai", False, raw, [len(raw) // 3], False))
    assert leaks(out.decode()) == []
    *answer, last = [e for _, e in read(out)]
    assert texts_of(answer) == {("response.output_text", 0): "Hello world, mail [EMAIL_1] now"}
    assert last["error"]["code"] == "upstream_stream_interrupted", last


def test_a_whole_stream_through_the_router(local_runtime: Any) -> None:
    raw = wire(provider_events([("message", ["Hello", " world, mail ", EMAIL, " now"]),
                                ("function_call", ['{"to": "', EMAIL, '"}'])]), "multiline")
    proc, out = asyncio.run(run_stream(local_runtime, "responses", "openai", False, raw, [5, 77, 300], False))
    assert leaks(out.decode()) == []
    events = [e for _, e in read(out)]
    check_consistent(events, 2)
    assert proc.usage is not None and proc.usage.completion_tokens == USAGE["output_tokens"]


# -- error events: the provider's message is scanned like its text (both guards) ------------------


def chat_guard() -> ResponseGuard:
    return ResponseGuard(POLICY, POLICY._params["enforce"], "team")


def error_event(message: str) -> bytes:
    return b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error", "code": "provider_error",
                                               "param": None}}) + b"\n\n"


@pytest.mark.parametrize("make", [chat_guard, guard], ids=["chat", "responses"])
def test_an_error_event_holding_a_value_is_redacted_or_withheld(make: Any) -> None:
    redacted = orjson.loads(make().sse_event(error_event("card 4111 1111 1111 1111 was declined"))[6:])
    assert redacted["error"] == {"message": "card [CREDIT_CARD_1] was declined", "type": "server_error",
                                 "code": "provider_error", "param": None}
    withheld = orjson.loads(make().sse_event(error_event("upload with AKIAIOSFODNN7EXAMPLE"))[6:])
    assert withheld["error"]["code"] == "provider_error" and "AKIA" not in str(withheld)
    plain = error_event("overloaded, try again")
    assert make().sse_event(plain) == plain
    assert make().sse_event(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"


def test_nothing_after_the_end_of_a_chat_stream_is_forwarded() -> None:
    """A value split around an error event (or [DONE]) by a provider that carries on after
    it would start in a fresh window and never be seen whole: the stream ends there."""
    g = chat_guard()

    def delta(text: str) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"
    out = b"".join(g.sse_event(e) for e in [delta("Your card 4111"), error_event("oops"), delta(" 1111 1111 1111")])
    assert b"1111 1111" not in out and out.endswith(error_event("oops"))


def test_nothing_after_the_end_of_a_responses_stream_is_forwarded() -> None:
    """The same for the Responses API: a card split around an error event is never rebuilt
    by the client from deltas on both sides of it."""
    g = guard()

    def delta(text: str) -> bytes:
        return b"event: response.output_text.delta\ndata: " + orjson.dumps(
            {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0,
             "delta": text}) + b"\n\n"
    done = b"event: response.output_text.done\ndata: " + orjson.dumps(
        {"type": "response.output_text.done", "item_id": "m", "output_index": 0, "content_index": 0,
         "text": "Your card 4111 1111 1111 1111"}) + b"\n\n"
    out = b"".join(g.sse_event(e) for e in [delta("Your card 4111"), error_event("oops"), delta(" 1111 1111 1111"),
                                            done])
    assert b"1111 1111" not in out and out.endswith(error_event("oops"))


def test_streamed_function_call_arguments_are_read_with_their_escapes_decoded() -> None:
    """`4111\\n1111\\n…` is how JSON writes a card one group per line: the tool reads a card."""
    events = provider_events([("function_call", ['{"card": "4111\\n1111\\n', '1111\\n1111", "to": "jane.doe\\u00',
                                                 '40example.com"}'])])
    out, _ = run(wire(events, None), [])
    got = read(out)
    args = "".join(e["delta"] for _, e in got if e["type"] == "response.function_call_arguments.delta")
    assert orjson.loads(args) == {"card": "[CREDIT_CARD_1]", "to": "[EMAIL_1]"}, args
    done = [e for _, e in got if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == [args]


def _with_initial_text(where: str, kind: str, first: str, then: str) -> list[dict[str, Any]]:
    """A provider stream whose text begins in an event that opens it (`where`: the response's
    own `output`, the output item, or the content part), and goes on in deltas."""
    events = provider_events([(kind, [then])])
    if where == "response":
        item = item_of(kind, first, 0)
        events[0]["response"]["output"] = [item]
        return [e for e in events if e["type"] not in ("response.output_item.added", "response.content_part.added")]
    for e in events:
        if where == "item" and e["type"] == "response.output_item.added":
            e["item"] = item_of(kind, first, 0)
        if where == "part" and e["type"] == "response.content_part.added":
            e["part"]["text"] = first
    return [e for e in events if not (where == "item" and e["type"] == "response.content_part.added")]


@pytest.mark.parametrize("where, kind, first, then", [
    ("part", "message", "card 4111 1111", " 1111 1111 thanks"),
    ("item", "message", "card 4111 1111", " 1111 1111 thanks"),
    ("item", "function_call", '{"n": "4111 1111', ' 1111 1111"}'),
    ("response", "message", "write to jane.doe", "@example.com today"),
])
def test_a_value_begun_in_the_event_that_opens_a_text_never_reaches_the_stream_helper(
        where: str, kind: str, first: str, then: str) -> None:
    """The openai SDK's `responses.stream()` starts each text from what `response.created`,
    `response.output_item.added` or `response.content_part.added` carries and appends the
    deltas to it (`ResponseStreamState.accumulate_event`): each event was scanned alone, so
    `card 4111 1111` there and ` 1111 1111` in a delta reached its snapshot whole (until
    2026-12-05). That opening text is now read with the deltas that follow, as a seam."""
    out, _ = run(wire(_with_initial_text(where, kind, first, then), None), [])
    events = [orjson.loads(line.split(b"data: ", 1)[1]) for line in out.split(b"\n\n") if b"data: {" in line]
    assert events[-1]["type"] == "response.incomplete", events[-1]
    said = "".join(e.get("delta") or "" for e in events if e["type"].endswith(".delta"))
    assert then.strip()[:9] not in said, events


def test_text_in_the_event_that_opens_a_text_goes_out_as_sent_when_nothing_spans() -> None:
    out, _ = run(wire(_with_initial_text("part", "message", "Hello ", "there, all good"), None), [])
    assert b"response.completed" in out and b'"text":"Hello "' in out and b"there, all good" in out


def test_an_opening_event_of_an_odd_shape_is_read_as_before() -> None:
    events = provider_events([("message", ["all good"])])
    events[1]["item"] = {"type": ["message"], "content": [{"type": {"x": 1}, "text": "a"}]}
    events[2]["part"] = {"type": ["output_text"], "text": "b"}
    out, _ = run(wire(events, None), [])
    assert b"response.completed" in out and b"all good" in out
