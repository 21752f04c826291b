"""A value split between two texts of one streamed answer (a card begun in a choice's content
and ended in its reasoning or a tool call's arguments, or split over two tool calls; over two
output items of a Responses stream) was seen by neither text's hold-back window: each saw
half, and the client got both halves. The seam where the text moves on is now read with what
follows it (`ResponseGuard._seams_blocked`, `ResponsesGuard`), numeric values bridging it as
across a request's strings; a value there ends the stream (`content_filter`)."""

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
    deltas = []
    for text, slot in ((before + CARD[:cut], pair[0]), (CARD[cut:] + after, pair[1])):
        i, k = 0, 0
        while i < len(text):
            n = sizes[k % len(sizes)]
            deltas.append(SLOTS[slot](text[i:i + n], i == 0))
            i, k = i + n, k + 1
    assert DIGITS not in received(chat(deltas, in_order))


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


def test_responses_items_without_a_value_at_their_seam_go_out_whole() -> None:
    out = responses([("message", ["ticket 4821, order ", "1111"]), ("message", ["1111 items, build 20241205"])])
    assert "content_filter" not in out and "1111 items" in out and "order 1111" in out
