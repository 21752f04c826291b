"""A value split between the texts of one streamed answer, through real Envoy and the ext_proc
(values-local: output scanning on), read with the openai and anthropic SDKs.

- an e-mail address whose local part ends one text and whose `@domain` begins the next
  (content, then a tool call's arguments; one Responses output item, then the next): each
  hold-back window read half, and the client got both halves;
- a card over three texts, the middle one shorter than the hold-back (`card 4111 1111`, a
  tool call's `1111`, the next one's `1111`): each seam was read with its two neighbours only;
- an address written with `-at-` / `-dot-` (`jane-at-example-dot-com`), in a request and in a
  streamed answer: no detector read it;
- a card split by tags in tool-call arguments streamed in pieces: a stream of arguments
  read no markup.

The provider's answers are scripted with the mock provider's `x-mock-raw-events` and
`x-mock-reply` (sealed by conftest), docs/mock-provider.md.
"""

from __future__ import annotations

import re
from typing import Any

import anthropic
import openai
import orjson
import pytest

from ..test_responses_output import provider_events
from .conftest import Gateway, raw_events

MODEL = "default-chat"
DIGITS = "4111111111111111"
LOCAL, DOMAIN = "jane.doe", "example.com"


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-seam", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", "choices": [{"index": 0, "delta": delta,
                                                                "finish_reason": finish}]}) + b"\n\n"


def call(i: int, args: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                            "function": {"name": "save", "arguments": args}}]}


def chat_stream(deltas: list[dict[str, Any]]) -> str:
    events = [chunk({"role": "assistant", "content": ""}), *(chunk(d) for d in deltas),
              chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    return raw_events(*events)


SPLIT_EMAIL = [{"content": f"Please write to {LOCAL}"}, call(0, f"@{DOMAIN} and say hi")]
THREE_TEXT_CARD = [{"content": "card 4111 1111"}, call(0, "1111"), call(1, "1111 thanks")]


def openai_texts(gw: Gateway, controls: dict[str, str]) -> tuple[list[str], set[str | None]]:
    """Every text the openai SDK's stream gave (content and each tool call's arguments, in the
    order they came), and the finish reasons."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0, default_headers=controls)
    texts: list[str] = []
    finishes: set[str | None] = set()
    for c in client.chat.completions.create(model=MODEL, stream=True,
                                            messages=[{"role": "user", "content": "Who do I write to?"}]):
        for choice in c.choices:
            finishes.add(choice.finish_reason)
            texts.append(choice.delta.content or "")
            texts += [t.function.arguments or "" for t in choice.delta.tool_calls or [] if t.function]
    return texts, finishes


def anthropic_texts(gw: Gateway, controls: dict[str, str]) -> tuple[list[str], set[str | None]]:
    """Every text the anthropic SDK's stream gave (`/v1/messages` on an OpenAI-schema backend:
    text and tool input deltas), and the stop reasons."""
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, default_headers=controls)
    texts: list[str] = []
    stops: set[str | None] = set()
    # (the raw events: the SDK's accumulating stream parses a tool's partial JSON as it comes)
    for event in client.messages.create(model=MODEL, max_tokens=200, stream=True,
                                        messages=[{"role": "user", "content": "Who do I write to?"}]):
        if event.type == "content_block_delta":
            d = event.delta
            texts.append(getattr(d, "text", None) or getattr(d, "partial_json", None) or "")
        elif event.type == "message_delta":
            stops.add(event.delta.stop_reason)
    return texts, stops


CLIENTS = {"openai": openai_texts, "anthropic": anthropic_texts}
FILTERED = {"openai": "content_filter", "anthropic": "refusal"}


def both_halves(texts: list[str]) -> bool:
    said = "\n".join(texts)
    return LOCAL in said and DOMAIN.split(".")[0] in said


@pytest.mark.parametrize("sdk", list(CLIENTS))
def test_an_email_split_between_content_and_a_tool_call_never_reaches_the_client(gw: Gateway, sdk: str) -> None:
    texts, ends = CLIENTS[sdk](gw, {"x-mock-raw-events": chat_stream(SPLIT_EMAIL)})
    assert not both_halves(texts), texts
    assert FILTERED[sdk] in ends, ends


@pytest.mark.parametrize("sdk", list(CLIENTS))
def test_a_card_split_over_three_texts_never_reaches_the_client(gw: Gateway, sdk: str) -> None:
    texts, ends = CLIENTS[sdk](gw, {"x-mock-raw-events": chat_stream(THREE_TEXT_CARD)})
    assert DIGITS not in re.sub(r"\D", "", "".join(texts)), texts
    assert FILTERED[sdk] in ends, ends


def responses_texts(gw: Gateway, items: list[tuple[str, list[str]]],
                    closes_late: bool = False) -> tuple[str, str | None]:
    """What the openai SDK's Responses stream gave (every text delta, in order), and the final
    status. `closes_late`: the provider sends every item's closing events (`*.done`) only
    after the last item's deltas, as some OpenAI-compatible servers do."""
    sent = provider_events(items)
    if closes_late:
        closing = [e for e in sent[:-1] if e["type"].endswith(".done")]
        sent = [e for e in sent[:-1] if not e["type"].endswith(".done")] + closing + sent[-1:]
    events = [b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in sent]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-mock-raw-events": raw_events(*events, b"data: [DONE]\n\n")})
    said, status = [], None
    for event in client.responses.create(model=MODEL, input="Who do I write to?", stream=True):
        if event.type.endswith(".delta") and isinstance(getattr(event, "delta", None), str):
            said.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            status = event.response.status
    return "\n".join(said), status


@pytest.mark.parametrize("items", [
    [("message", [f"Please write to {LOCAL}"]), ("function_call", [f"@{DOMAIN}"])],
    [("message", ["card 4111 1111"]), ("function_call", ["1111"]), ("function_call", ["1111 thanks"])],
], ids=["email over two items", "card over three items"])
def test_a_value_split_between_responses_output_items_never_reaches_the_client(gw: Gateway, items: list) -> None:
    said, status = responses_texts(gw, items)
    assert not both_halves([said]) and DIGITS not in re.sub(r"\D", "", said), said
    assert status == "incomplete"


@pytest.mark.parametrize("items", [
    [("message", [f"Please write to {LOCAL}"]), ("message", [f"@{DOMAIN} today"])],
    [("message", ["card 4111 1111"]), ("function_call", ["1111 1111"])],
    [("reasoning", ["card 4111 1111"]), ("message", ["1111 1111 thanks"])],
], ids=["email over two messages", "card from a message into a function call", "card from reasoning into a message"])
def test_a_value_split_between_responses_output_items_closed_late_never_reaches_the_client(
        gw: Gateway, items: list) -> None:
    """No `*.done` between two output items' texts: each text's window held its half, and both
    went out when the stream ended; a client printing the deltas read the whole value."""
    said, status = responses_texts(gw, items, closes_late=True)
    assert not both_halves([said]) and DIGITS not in re.sub(r"\D", "", said), said
    assert status == "incomplete"


HYPHENATED = ["jane-at-example-dot-com", "jane -at- example -dot- com"]


@pytest.mark.parametrize("value", HYPHENATED)
def test_an_email_written_with_hyphens_does_not_reach_the_provider(gw: Gateway, value: str) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    answer = client.chat.completions.create(model="private-chat", messages=[
        {"role": "user", "content": f"Draft a note to {value} about the state-of-the-art stay-at-home plan."}])
    assert answer.choices[0].message.content is not None
    (sent,) = gw.received(gw.primary)
    content = sent["body"]["messages"][0]["content"]
    assert "jane" not in content and "[EMAIL_1]" in content, content
    assert "state-of-the-art stay-at-home plan" in content  # hyphenated English goes out as written


@pytest.mark.parametrize("sdk", list(CLIENTS))
@pytest.mark.parametrize("value", HYPHENATED)
def test_an_email_written_with_hyphens_in_a_streamed_answer_reaches_the_client_redacted(gw: Gateway, sdk: str,
                                                                                        value: str) -> None:
    texts, _ = CLIENTS[sdk](gw, {"x-mock-reply": f"Write to {value} about the dot-com era, it is at-risk."})
    said = "".join(texts)
    assert "jane" not in said and "[EMAIL_1]" in said, said
    assert said.endswith("about the dot-com era, it is at-risk."), said


MARKUP_ARGUMENTS = orjson.dumps({"html": "card 4111<b></b>1111 <td width=40>1111</td><td width=40>1111</td> ok"}).decode()


@pytest.mark.parametrize("sdk", list(CLIENTS))
def test_a_card_split_by_markup_in_streamed_arguments_reaches_the_client_redacted(gw: Gateway, sdk: str) -> None:
    """Tool-call arguments streamed in pieces with a card split by tags (one holding a digit):
    a stream of arguments read no markup until 2026-12-06, and the card went out."""
    pieces = [MARKUP_ARGUMENTS[i:i + 7] for i in range(0, len(MARKUP_ARGUMENTS), 7)]
    deltas = [call(0, pieces[0]), *({"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces[1:])]
    texts, _ = CLIENTS[sdk](gw, {"x-mock-raw-events": chat_stream(deltas)})
    said = "".join(texts)
    arguments = orjson.loads(said[said.index("{"):])
    shown = re.sub(r"<[^>]*>", "", arguments["html"])
    assert DIGITS not in re.sub(r"\D", "", shown) and "[CREDIT_CARD_1]" in shown, arguments
