"""A value split between two texts of one streamed answer (a card begun in a choice's content
and ended in its reasoning or a tool call's arguments, or split over two tool calls; over two
output items of a Responses stream) was seen by neither text's hold-back window: each saw
half, and the client got both halves. The seam where the text moves on is now read with what
follows it (`ResponseGuard._seams_blocked`, `ResponsesGuard`), numeric values bridging it as
across a request's strings; a value there ends the stream (`content_filter`). Since
2026-12-05 the texts are also read joined as they are (an e-mail's local part ending one text
and its `@domain` beginning the next), and a seam reads on over a next text that let nothing
out (a card over three texts, the middle one shorter than the hold-back)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_extproc import config
from gateway_extproc.policy.classification import Policy, ResponseGuard
from gateway_extproc.policy.responses_output import ResponsesGuard
from gateway_extproc.render import chart_values, render_values

ROOT = Path(__file__).resolve().parent.parent
VALUES = chart_values([ROOT / "helm" / "values-local.yaml"])
CFG = config.parse(yaml.safe_load(render_values(VALUES)["gateway.yaml"]), "values-local (rendered)")
assert CFG.classification is not None
POLICY = Policy(CFG.classification)
CARD = "4111 1111 1111 1111"
DIGITS = CARD.replace(" ", "")


def chunk(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                                     "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


def tool(i: int, args: str, first: bool) -> dict[str, Any]:
    call: dict[str, Any] = {"index": i, "function": {"arguments": args}}
    if first:
        call.update(id=f"call_{i}", type="function")
        call["function"]["name"] = "save"
    return {"tool_calls": [call]}


def chat(deltas: list[dict[str, Any]], in_order: bool) -> str:
    g = ResponseGuard(POLICY, POLICY._params["enforce"], "t", in_order)
    out = b"".join(g.sse_event(chunk(d)) for d in deltas)
    out += g.sse_event(chunk({}, 0, "stop")) + g.sse_event(b"data: [DONE]\n\n")
    return out.decode()


def received(out: str) -> str:
    """Every text the client got, in order, as one string of digits and letters: a value
    split across fields still reads whole here."""
    texts = []
    for line in out.split("\n\n"):
        if line.startswith("data: {"):
            obj = orjson.loads(line[6:])
            for c in obj.get("choices", []):
                d = c.get("delta", {})
                texts += [v for k, v in d.items() if isinstance(v, str) and k != "role"]
                texts += [t["function"].get("arguments", "") for t in d.get("tool_calls", []) if "function" in t]
            if isinstance(obj.get("delta"), str):
                texts.append(obj["delta"])
    return re.sub(r"[^0-9A-Za-z]", "", "".join(texts))


FIELDS = {
    "content->reasoning": lambda a, b: [{"content": a}, {"reasoning_content": b}],
    "reasoning->content": lambda a, b: [{"reasoning_content": a}, {"content": b}],
    "content->tool call": lambda a, b: [{"content": a}, tool(0, b, True)],
    "tool call->tool call": lambda a, b: [tool(0, '{"n": "' + a, True), tool(1, b + '"}', True)],
    "refusal->content": lambda a, b: [{"refusal": a}, {"content": b}],
}


@pytest.mark.parametrize("in_order", [False, True], ids=["openai", "anthropic order"])
@pytest.mark.parametrize("fields", list(FIELDS), ids=list(FIELDS))
def test_a_card_split_between_two_texts_of_a_choice_never_reaches_the_client(fields: str, in_order: bool) -> None:
    out = chat(FIELDS[fields]("card 4111 1111", " 1111 1111 thanks"), in_order)
    assert DIGITS not in received(out)
    assert '"finish_reason":"content_filter"' in out


@pytest.mark.parametrize("in_order", [False, True], ids=["openai", "anthropic order"])
def test_ordinary_texts_either_side_of_a_seam_go_out_whole(in_order: bool) -> None:
    """Numbers at a seam that make no value (ticket numbers, years, prices) do not block, and a
    value whole in one text is redacted there, as before, even when a digit follows the seam."""
    out = chat([{"reasoning_content": "ticket 4821, due 2024-05-01, price 12.50 for order 1111"},
                {"content": "1111 items shipped; timestamp 1733356800 and build 20241205"},
                {"content": " and more words so the window moves on past sixty-four characters"}], in_order)
    assert "content_filter" not in out
    assert "4821" in out and "1733356800" in out and "1111 items" in out
    out = chat([{"content": f"card {CARD}"}, {"reasoning_content": "1. check the order"}], in_order)
    assert "content_filter" not in out and "[CREDIT_CARD_1]" in out and DIGITS not in received(out)


SLOTS = {
    "content": lambda t, first: {"content": t},
    "reasoning_content": lambda t, first: {"reasoning_content": t},
    "refusal": lambda t, first: {"refusal": t},
    "tool 0": lambda t, first: tool(0, t, first),
    "tool 1": lambda t, first: tool(1, t, first),
}
def split_over(value: str, cut: int, sizes: list[int], pair: tuple[str, str], before: str,
               after: str) -> list[dict[str, Any]]:
    """`value` cut at `cut` between the two texts of `pair` (`before` it, `after` it), each
    text chunked in `sizes` (cycled)."""
    deltas = []
    for text, slot in ((before + value[:cut], pair[0]), (value[cut:] + after, pair[1])):
        i, k = 0, 0
        while i < len(text):
            n = sizes[k % len(sizes)]
            deltas.append(SLOTS[slot](text[i:i + n], i == 0))
            i, k = i + n, k + 1
    return deltas


PAIRS = [("content", "reasoning_content"), ("reasoning_content", "content"), ("content", "tool 0"),
         ("tool 0", "tool 1"), ("refusal", "content"), ("tool 0", "content")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(1, len(CARD) - 1), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
       pair=st.sampled_from(PAIRS), in_order=st.booleans(),
       before=st.sampled_from(["", "card ", "my number is: "]), after=st.sampled_from(["", " ok", ", exp 12/29"]))
def test_any_split_of_a_card_over_two_texts_any_chunking(cut: int, sizes: list[int], pair: tuple[str, str],
                                                        in_order: bool, before: str, after: str) -> None:
    """The invariant: however the provider chunks the two texts, and wherever the value is cut
    between them, the client never receives its digits in a row."""
    assert DIGITS not in received(chat(split_over(CARD, cut, sizes, pair, before, after), in_order))


# -- Responses API ---------------------------------------------------------------------------------


def responses(items: list[tuple[str, list[str]]]) -> str:
    from tests.test_responses_output import provider_events

    g = ResponsesGuard(POLICY, POLICY._params["enforce"], "t")
    out = b"".join(g.sse_event(b"data: " + orjson.dumps(e) + b"\n\n") for e in provider_events(items))
    out += g.sse_event(b"data: [DONE]\n\n")
    return out.decode()


@pytest.mark.parametrize("items", [
    [("message", ["card 4111 ", "1111"]), ("message", [" 1111 1111", " thanks"])],
    [("reasoning", ["card 4111 1111"]), ("message", [" 1111 1111 thanks"])],
    [("message", ["card 4111 1111"]), ("function_call", ["1111 1111"])],
    [("function_call", ['{"n": "4111 1111']), ("function_call", ['1111 1111"}'])],
], ids=["message->message", "reasoning->message", "message->function call", "function call->function call"])
def test_a_card_split_between_two_output_items_never_reaches_the_client(items: list[tuple[str, list[str]]]) -> None:
    out = responses(items)
    deltas = [orjson.loads(line.split("data: ", 1)[1]) for line in out.split("\n\n") if "data: {" in line]
    streamed = re.sub(r"[^0-9]", "", "".join(e["delta"] for e in deltas if isinstance(e.get("delta"), str)))
    assert DIGITS not in streamed
    assert DIGITS not in re.sub(r"[^0-9]", "", out)
    assert '"reason":"content_filter"' in out


def text_delta(item: int, text: str) -> bytes:
    return b"data: " + orjson.dumps({"type": "response.output_text.delta", "item_id": f"msg_{item}",
                                     "output_index": item, "content_index": 0, "delta": text}) + b"\n\n"


def responses_without_closes(deltas: list[tuple[int, str]]) -> tuple[str, str]:
    """Output text deltas (output index, text) with no `*.done` between them, then the end:
    (every delta as a client that prints them reads it, the whole output)."""
    g = ResponsesGuard(POLICY, POLICY._params["enforce"], "t")
    out = b"".join(g.sse_event(text_delta(i, t)) for i, t in deltas)
    out += g.sse_event(b'data: {"type": "response.completed", "response": {"id": "r", "output": []}}\n\n')
    said = "".join(orjson.loads(line.split("data: ", 1)[1]).get("delta", "") for line in out.decode().split("\n\n")
                   if '"delta":"' in line)
    return said, out.decode()


@pytest.mark.parametrize("deltas", [
    [(0, "card 4111 1111 "), (1, "1111 1111 thanks")],
    [(0, "write to jane.doe"), (1, "@example.com thanks")],
    [(0, "card 4111 "), (1, "1111 "), (0, "1111 "), (1, "1111 ok")],
    [(0, "card 4111 1111 "), (1, "hi"), (0, "1111 1111 ok")],
    [(0, "card 4111 1111 "), (1, "and a longer sentence that goes on for a while in between"), (0, "1111 1111 ok")],
    [(0, "write to jane.doe"), (1, "and a longer sentence that goes on for a while in between"), (0, "@example.com")],
], ids=["card, no close between", "email, no close between", "card interleaved", "card around another text",
        "card around a long text", "email around a long text"])
def test_a_value_split_between_output_items_that_never_close_never_reaches_the_client(deltas: list) -> None:
    said, out = responses_without_closes(deltas)
    assert DIGITS not in re.sub(r"[^0-9]", "", said) and not ("doe" in said and "example" in said), said
    assert '"reason":"content_filter"' in out
    per_item: dict[int, str] = {}  # (what a client that collects each item's text reads)
    for line in out.split("\n\n"):
        if '"delta":"' in line:
            event = orjson.loads(line.split("data: ", 1)[1])
            per_item[event["output_index"]] = per_item.get(event["output_index"], "") + event["delta"]
    assert not any(DIGITS in re.sub(r"[^0-9]", "", t) or "doe@" in t for t in per_item.values()), per_item


def test_output_items_that_never_close_go_out_whole_and_in_order() -> None:
    said, out = responses_without_closes([(0, "Hello there, "), (1, "another text "), (0, "goes on, build 1234"),
                                          (1, "5678 and more.")])
    assert "content_filter" not in out
    assert said == "Hello there, another text goes on, build 12345678 and more."


def test_responses_items_without_a_value_at_their_seam_go_out_whole() -> None:
    out = responses([("message", ["ticket 4821, order ", "1111"]), ("message", ["1111 items, build 20241205"])])
    assert "content_filter" not in out and "1111 items" in out and "order 1111" in out


# -- e-mails at a seam, values over three or more texts -------------------------------------------

EMAIL = "jane.doe@example.com"


def by_text(out: str) -> dict[str, str]:
    """What the client got in each text of choice 0 (content, reasoning, each tool call...)."""
    got: dict[str, str] = {}
    for line in out.split("\n\n"):
        if line.startswith("data: {"):
            for c in orjson.loads(line[6:]).get("choices", []):
                d = c.get("delta", {})
                for k, v in d.items():
                    if isinstance(v, str) and k != "role":
                        got[k] = got.get(k, "") + v
                for t in d.get("tool_calls", []):
                    key = f"tool {t['index']}"
                    got[key] = got.get(key, "") + t.get("function", {}).get("arguments", "")
    return got


def an_address_leaves(out: str) -> bool:
    """The local part and the domain both reached the client (in whichever texts)."""
    texts = "\n".join(by_text(out).values())
    return "jane.doe" in texts and "example" in texts


@pytest.mark.parametrize("in_order", [False, True], ids=["openai", "anthropic order"])
@pytest.mark.parametrize("fields", list(FIELDS), ids=list(FIELDS))
def test_an_email_split_between_two_texts_of_a_choice_never_reaches_the_client(fields: str, in_order: bool) -> None:
    """The address's local part ends one text and its `@domain` begins the next (content, then
    a tool call's arguments): each window read half, and the client got both halves."""
    out = chat(FIELDS[fields]("please write to jane.doe", "@example.com and say hi"), in_order)
    assert not an_address_leaves(out), out
    assert '"finish_reason":"content_filter"' in out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(1, len(EMAIL) - 1), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
       pair=st.sampled_from(PAIRS), in_order=st.booleans(),
       before=st.sampled_from(["", "write to ", "mail: "]), after=st.sampled_from(["", " ok", ", thanks!"]))
def test_any_split_of_an_email_over_two_texts_any_chunking(cut: int, sizes: list[int], pair: tuple[str, str],
                                                          in_order: bool, before: str, after: str) -> None:
    """However the two texts are chunked and wherever the address is cut between them, the
    client never gets the whole address (a piece that is an address itself, `jane.doe@example.co`,
    is redacted in its own window)."""
    got = by_text(chat(split_over(EMAIL, cut, sizes, pair, before, after), in_order))
    assert EMAIL not in got.get(pair[0], "") + got.get(pair[1], "")


TRIPLES = [("content", "tool 0", "tool 1"), ("tool 0", "tool 1", "content"), ("reasoning_content", "content", "tool 0"),
           ("content", "reasoning_content", "refusal")]


@pytest.mark.parametrize("in_order", [False, True], ids=["openai", "anthropic order"])
@pytest.mark.parametrize("slots", TRIPLES, ids=["->".join(t) for t in TRIPLES])
def test_a_card_split_over_three_texts_never_reaches_the_client(slots: tuple[str, str, str], in_order: bool) -> None:
    """`card 4111 1111`, then `1111` in a tool call, then `1111` in the next: each seam read
    with its two neighbours only saw 12 digits, and the client got all sixteen."""
    deltas = [SLOTS[s](t, True) for s, t in zip(slots, ["card 4111 1111", "1111", "1111 thanks"])]
    out = chat(deltas, in_order)
    got = by_text(out)
    assert DIGITS not in re.sub(r"\D", "", "".join(got.get(s, "") for s in slots)), got
    assert '"finish_reason":"content_filter"' in out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, len(CARD) - 1), min_size=2, max_size=4, unique=True),
       slots=st.permutations(list(SLOTS)), in_order=st.booleans(), size=st.integers(1, 9),
       before=st.sampled_from(["", "card ", "my number is: "]), after=st.sampled_from(["", " ok", ", exp 12/29"]))
def test_any_split_of_a_card_over_several_texts(cuts: list[int], slots: list[str], in_order: bool, size: int,
                                                before: str, after: str) -> None:
    """The invariant over three to five texts: the client never gets the card's digits in a row
    when its texts are read in the order they came."""
    bounds = [0, *sorted(cuts), len(CARD)]
    pieces = [CARD[a:b] for a, b in zip(bounds, bounds[1:])]
    pieces[0], pieces[-1] = before + pieces[0], pieces[-1] + after
    used = slots[:len(pieces)]
    deltas = [SLOTS[s](p[i:i + size], i == 0) for s, p in zip(used, pieces) for i in range(0, len(p), size)]
    got = by_text(chat(deltas, in_order))
    assert DIGITS not in re.sub(r"\D", "", "".join(got.get(s, "") for s in used))


@pytest.mark.parametrize("items", [
    [("message", ["please write to jane.doe"]), ("function_call", ["@example.com"])],
    [("message", ["write to jane."]), ("message", ["doe@exam"]), ("message", ["ple.com thanks"])],
], ids=["message->function call", "three messages"])
def test_an_email_split_between_output_items_never_reaches_the_client(items: list[tuple[str, list[str]]]) -> None:
    out = responses(items)
    deltas = "".join(orjson.loads(line.split("data: ", 1)[1]).get("delta", "") for line in out.split("\n\n")
                     if "data: {" in line and '"delta":"' in line)
    assert not ("doe" in deltas and "example" in deltas), deltas
    assert EMAIL not in out and '"reason":"content_filter"' in out


def test_a_card_split_over_three_output_items_never_reaches_the_client() -> None:
    out = responses([("message", ["card 4111 1111"]), ("function_call", ["1111"]), ("function_call", ["1111 ok"])])
    assert DIGITS not in re.sub(r"[^0-9]", "", out)
    assert '"reason":"content_filter"' in out


@pytest.mark.parametrize("in_order", [False, True], ids=["openai", "anthropic order"])
def test_texts_with_their_own_addresses_either_side_of_a_seam_go_out_redacted(in_order: bool) -> None:
    """An address whole in each text is redacted in its own window; words either side of the
    seam that make no address (`Sending to` + `bob@…`) do not end the stream."""
    out = chat([{"content": "Sending to"}, tool(0, '{"to": "bob@example.org", "cc": "a.b@example.com"}', True),
                {"content": " alice@example.net now, 3 items"}], in_order)
    assert "content_filter" not in out
    got = by_text(out)
    assert "@example" not in "".join(got.values()) and "[EMAIL_" in got["tool 0"], got


@pytest.mark.parametrize("in_order", [False, True], ids=["openai", "anthropic order"])
@pytest.mark.parametrize("fields", list(FIELDS), ids=list(FIELDS))
@pytest.mark.parametrize("first, then", [
    ("I will write to jane@example.com.", "Sure, done."),
    ("write to jane@example.com", ".Then we wait"),
    ("key sk-proj-abcdefghijklmnopqrstuvwx.", "Done"),
])
def test_a_value_redacted_whole_before_a_seam_does_not_end_the_stream(
        fields: str, in_order: bool, first: str, then: str) -> None:
    """Read joined, a text ending in an address and a full stop and the next beginning with a
    word make a longer 'address' (`jane@example.com.Sure`) that neither window held whole:
    the stream ended with content_filter and the client got nothing. The client sees the
    address redacted and then the word: no new value."""
    out = chat(FIELDS[fields](first, then), in_order)
    assert "content_filter" not in out and "jane@example.com" not in out
    assert re.sub(r"[^0-9A-Za-z]", "", then) in received(out)


def test_texts_interleaved_mid_value_are_not_read_joined() -> None:
    """(Found by test_processor_properties.) Reasoning paused mid-address (`a.b@example.`),
    a refusal began (`mail …`), then the reasoning went on (`com …`): read joined at the
    seam, `a.b@example.mail` ended the stream, though no client sees those texts side by
    side. Joined reading waits until the first text's tail goes out, and is dropped when that
    text goes on."""
    out = chat([{"reasoning_content": "mail a.b@example."}, {"refusal": "m"}, {"refusal": "a"},
                {"refusal": "il a.b@example.com now alpha"}, {"reasoning_content": "com now alpha"}], False)
    assert "content_filter" not in out and "a.b@example" not in out
    assert received(out).count("mailEMAIL1nowalpha") == 2


def test_a_value_split_at_a_seam_is_still_caught_when_the_first_text_ends_last() -> None:
    """The joined reading moved to when the first text's tail goes out (the choice's end in
    OpenAI order): that tail is withheld and the stream ends there."""
    out = chat([{"reasoning_content": "write to jane.doe"}, {"content": "@example.com and then a long sentence follows"
                                                                        " that lets the window move past its hold"}], False)
    assert '"finish_reason":"content_filter"' in out and "janedoe" not in received(out)


@pytest.mark.parametrize("first, then, other", [
    ("card 4111 1111", " 1111 1111 thanks", tool(0, "{}", True)),
    ("write to jane.doe", "@example.com today", tool(0, "{}", True)),
    ("card 4111 1111", " 1111 1111 thanks", {"reasoning_content": "let me think"}),
], ids=["card around a tool call", "email around a tool call", "card around reasoning"])
def test_a_value_split_around_another_text_never_reaches_an_anthropic_client(first: str, then: str,
                                                                             other: dict[str, Any]) -> None:
    """An Anthropic client's content blocks follow one another, so the content's window was
    flushed when the choice moved on to a tool call (or reasoning), and the content that came
    after it started a new window: `card 4111 1111`, a tool_use block, ` 1111 1111` went out,
    and the anthropic SDK's `text_stream` and `get_final_text()` join every text block into
    the whole card (until 2026-12-05; OpenAI clients' windows stay open over the move). The
    text that goes on is now read with the tail its window had at the close (`resumed`)."""
    from gateway_extproc import messages

    out = chat([{"content": first}, other, {"content": then}], True)
    text = "".join(orjson.loads(line.split("data: ", 1)[1])["delta"].get("text", "")
                   for line in messages.ToMessagesStream().feed(out.encode(), True).decode().split("\n\n")
                   if '"text_delta"' in line)
    assert DIGITS not in re.sub(r"\D", "", text) and "jane.doe@example" not in text, text
    assert '"finish_reason":"content_filter"' in out


def test_text_that_goes_on_after_another_for_an_anthropic_client_goes_out_whole() -> None:
    out = chat([{"content": "Saving it now. "}, tool(0, "{}", True), {"content": "Saved: 4111 is the last order."}], True)
    assert "content_filter" not in out and "Savingitnow" in received(out) and "Saved4111" in received(out)


def test_a_value_split_around_another_text_is_caught_when_the_stream_ends_without_a_finish() -> None:
    g = ResponseGuard(POLICY, POLICY._params["enforce"], "t", True)
    out = b"".join(g.sse_event(chunk(d)) for d in [{"content": "card 4111 1111"}, tool(0, "{}", True),
                                                    {"content": " 1111 1111"}])
    out += g.sse_event(b"data: [DONE]\n\n")
    assert DIGITS not in re.sub(r"\D", "", received(out.decode())) and b"content_filter" in out, out
