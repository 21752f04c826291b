"""Answer shapes a hostile provider could use to get a value out whole, through real Envoy and
the ext_proc (values-local: output scanning on), read with the openai SDK as an application
reads them (tests/test_egress_shapes.py has the guard's own cases):

- an `n` > 1 stream whose choice 1 is also written `1.0`: the SDK keeps the float, and a
  client collecting each choice's text by index (Python: `1 == 1.0`) read a card split over
  the two spellings whole;
- a card written with an exponent (`4.111111111111111e15`) in streamed tool-call arguments,
  split over two deltas: the tool's JSON parser reads it as the card;
- a custom tool's input streamed in pieces (`tool_calls[].custom.input`);
- an embeddings answer with a card as a number beside the vectors;
- a card whose last group runs into a word (`4111 1111 1111 1111th`, `… 1111 5A`), asked or answered;
- a GitHub token in pieces, an AWS key in groups apart by dots, asked;
- another service's token (Stripe, Slack) or a private key's bare DER in base64, asked or answered;
- a number read out partly in digit words, asked and answered;
- letters or an emoji between a card's, SSN's or IBAN's groups (`4111 x 1111 x …`), `S` for
  5, an address with a comment by its sign, a phone number read out in words, asked or
  answered;
- an address at an internationalized domain (`jane@exämple.com`), answered.

The provider's answers are scripted with the mock provider's `x-mock-raw-events` and
`x-mock-raw-body` (sealed by conftest), docs/mock-provider.md.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import httpx
import openai
import orjson
import pytest

from .conftest import Gateway
from .test_stream_seam_leaks import raw_events

MODEL = "default-chat"
DIGITS = "4111111111111111"
FILLER = " and then some more words that are long enough to leave the hold-back window of the guard."


def chunk(*choices: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-shape", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", "choices": list(choices)}) + b"\n\n"


def collected(gw: Gateway, events: list[bytes]) -> tuple[dict[Any, str], dict[Any, str], set[str | None]]:
    """What the openai SDK's stream gave, as an application collects it: each choice's content
    by `choice.index`, each tool call's arguments (or custom input) by (choice, call index),
    and the finish reasons."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-mock-raw-events": raw_events(*events, b"data: [DONE]\n\n")})
    content: dict[Any, str] = {}
    calls: dict[Any, str] = {}
    finishes: set[str | None] = set()
    for c in client.chat.completions.create(model=MODEL, stream=True, n=2,
                                            messages=[{"role": "user", "content": "Pay the invoice."}]):
        for choice in c.choices:
            finishes.add(choice.finish_reason)
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            for t in choice.delta.tool_calls or []:
                custom = (t.model_extra or {}).get("custom") or {}
                text = (t.function.arguments if t.function else None) or custom.get("input") or ""
                calls[(choice.index, t.index)] = calls.get((choice.index, t.index), "") + text
    return content, calls, finishes


def test_a_card_split_over_two_spellings_of_a_choice_index_never_reaches_the_client(gw: Gateway) -> None:
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "hello"}}),
        chunk({"index": 1, "delta": {"role": "assistant", "content": "card 4111 1111"}}),
        chunk({"index": 1.0, "delta": {"content": " 1111 1111" + FILLER}}),
        chunk({"index": 0, "delta": {"content": FILLER}}),
        chunk({"index": 1, "delta": {}, "finish_reason": "stop"}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert all(DIGITS not in re.sub(r"\D", "", text) for text in content.values()), content
    assert set(content) == {0, 1} and all(type(i) is int for i in content), content
    assert content[0] == "hello" + FILLER


def test_a_card_written_with_an_exponent_in_streamed_tool_arguments_never_reaches_the_tool(gw: Gateway) -> None:
    first = {"index": 0, "id": "call_0", "type": "function",
             "function": {"name": "pay", "arguments": '{"amount": 12, "card": 4.1111111'}}
    _, calls, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "tool_calls": [first]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '11111111e15}'}}]}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"})])
    args = calls[(0, 0)]
    try:
        card = json.loads(args).get("card")
    except json.JSONDecodeError:  # (a placeholder where a number was: no longer JSON the tool reads)
        card = None
    assert card != 4111111111111111 and DIGITS not in re.sub(r"\D", "", args), args
    assert "[CREDIT_CARD_1]" in args and args.startswith('{"amount": 12, "card": ')


def test_a_card_in_a_streamed_custom_tool_input_never_reaches_the_client(gw: Gateway) -> None:
    first = {"index": 0, "id": "call_0", "type": "custom", "custom": {"name": "shell", "input": "pay 4111 1111"}}
    _, calls, finishes = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "tool_calls": [first]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "custom": {"input": " 1111 1111 now"}}]}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"})])
    assert calls[(0, 0)] == "pay [CREDIT_CARD_1] now", calls
    assert finishes == {None, "tool_calls"}


def test_an_embeddings_answer_with_a_card_as_a_number_reaches_the_client_redacted(gw: Gateway) -> None:
    answer = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
              "model": "text-embedding-3-small", "ref": 4111111111111111,
              "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "default-embedding", "input": "hello"},
                   headers={"authorization": f"Bearer {gw.key}",
                            "x-mock-raw-body": base64.b64encode(orjson.dumps(answer)).decode()}, timeout=30)
    assert r.status_code == 200, r.text
    assert DIGITS not in r.text and r.json()["ref"] == "[CREDIT_CARD_1]", r.text
    assert r.json()["data"][0]["embedding"] == [0.25, -0.5]


def test_a_card_split_over_a_tool_calls_name_never_reaches_the_sdk_stream_helper(gw: Gateway) -> None:
    """`client.chat.completions.stream` joins every string of the deltas, a tool call's name
    included: a card sent as `4111-1111` + `-1111-1111` there came out whole."""
    first = {"index": 0, "id": "call_0", "type": "function", "function": {"name": "4111-1111", "arguments": ""}}
    events = [chunk({"index": 0, "delta": {"role": "assistant", "tool_calls": [first]}}),
              chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "-1111-1111",
                                                                                     "arguments": "{}"}}]}}),
              chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}), b"data: [DONE]\n\n"]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-mock-raw-events": raw_events(*events)})
    snapshot = None
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "Pay."}]) as s:
        for event in s:
            snapshot = event.snapshot if event.type == "chunk" else snapshot
    assert snapshot is not None
    said = snapshot.model_dump_json()
    assert "4111-1111" in said and DIGITS not in re.sub(r"\D", "", said), said
    assert snapshot.choices[0].finish_reason == "content_filter"


def test_text_after_a_choices_finish_never_completes_a_card(gw: Gateway) -> None:
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "card 4111 1111"}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
        chunk({"index": 0, "delta": {"content": " 1111 1111 ok"}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert content == {0: "card 4111 1111"}, content


def test_a_card_with_a_digit_written_as_a_character_reference_reaches_the_client_redacted(gw: Gateway) -> None:
    """A Markdown-rendering client shows `&#52;111 1111 1111 1111` as a card."""
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Your card: &#5"}}),
        chunk({"index": 0, "delta": {"content": "2;111 1111 1111 1111, on file."}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert content == {0: "Your card: [CREDIT_CARD_1], on file."}, content


def test_a_card_whose_last_group_runs_into_a_word_reaches_neither_provider_nor_client(gw: Gateway) -> None:
    """`4111 1111 1111 1111th` and `… 1111 2nd` went out whole until 2026-12-06: the run took
    the word's first digit, and a letter after it ended no number."""
    # (a card is restricted data, above what this model is approved for)
    refused(gw, ["Refund 4111 1111 1111 1111th copy.", "Refund 5555-5555-5555-4444 2nd copy."],
            "classification_violation")
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Your card: 4111 1111 1111 1111"}}),
        chunk({"index": 0, "delta": {"content": " 5A, on file." + FILLER}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert content == {0: "Your card: [CREDIT_CARD_1], on file." + FILLER}, content


def test_a_github_token_in_pieces_or_an_aws_key_with_dots_reaches_no_provider(gw: Gateway) -> None:
    """Both went out whole until 2026-12-06 (a credential rule blocks the request)."""
    token = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2  # (40 characters: real ones have 36)
    refused(gw, [f"push with {token[:20]} {token[20:]} please", f"push with {token[:14]}\n{token[14:30]}\n{token[30:]}",
                 "deploy with AKIA.IOSF.ODNN.7EXA.MPLE now"], "content_blocked")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    # (over two messages: a GitHub token since 2026-12-07, an AWS key id since 2026-12-08)
    for first, second in ((f"push with {token[:20]}", token[20:]), ("the id AKIAIOSF", "ODNN7EXAMPLE please")):
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": first},
                                                                  {"role": "user", "content": second}])
        assert e.value.code == "content_blocked"
    assert gw.received(gw.primary) + gw.received(gw.backup) == []


# (random-looking, fixed: a Stripe live key, a Slack bot token, a private key's bare PKCS#8 DER)
STRIPE = "sk_live_51Hq" + "Ab12cdEf34GhIj56KlMn78OpQr90StUv"
SLACK = "xoxb-123456789012-1234567890123-" + "Ab12cdEf34GhIj56KlMn78Op"
DER_KEY = base64.b64encode(b"\x30\x82\x01\x20\x02\x01\x00\x30\x0d\x06\x09" + bytes(range(7, 250))).decode()


def test_other_services_tokens_and_a_bare_der_key_reach_no_provider_and_no_client(gw: Gateway) -> None:
    """Went out until 2026-12-07: no detector read another service's token (Stripe, Slack,
    Google, ...), HTTP Basic credentials, or a private key's base64 DER without its BEGIN and
    END lines (`SNOWFLAKE_PRIVATE_KEY=MIIE…`). A credential rule blocks the request; in an
    answer it ends the stream before any of it."""
    refused(gw, [f"charge it with {STRIPE} now", f"post as {SLACK}", f"SNOWFLAKE_PRIVATE_KEY={DER_KEY}",
                 "curl -H 'Authorization: Basic YWRtaW46UzNjcjN0IVBhc3N3MHJk' https://api.internal"],
            "content_blocked")
    for secret in (STRIPE, DER_KEY):
        try:
            content, _, _ = collected(gw, [
                chunk({"index": 0, "delta": {"role": "assistant", "content": "Set it to " + secret[:20]}}),
                chunk({"index": 0, "delta": {"content": secret[20:] + FILLER}}),
                chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
        except openai.APIError:
            continue  # (the stream ended with the gateway's error event)
        assert not any(secret[i:i + 12] in text for text in content.values() for i in range(len(secret) - 12)), content


def test_an_api_key_in_short_pieces_reaches_no_provider(gw: Gateway) -> None:
    """Went out whole until 2026-12-07 unless its first piece held 20 characters; cut in
    pieces of two, or after its `s`, until later that day; over two messages until 2026-12-08."""
    key = "sk-proj-" + "Ab12cdEf34GhIj56KlMn78OpQr90StUv12WxYz34" * 2
    anthropic = "sk-ant-api03-" + "Ab12cdEf34GhIj56KlMn78OpQr90StUv12WxYz34-_" * 2
    refused(gw, [f"use {' '.join(key[i:i + 10] for i in range(0, len(key), 10))} for the call",
                 f"use {chr(10).join(anthropic[i:i + 6] for i in range(0, len(anthropic), 6))}\nplease",
                 f"key: {key[:15]}  {key[15:40]}  {key[40:]} thanks",
                 f"use {' '.join(key[i:i + 2] for i in range(0, len(key), 2))} for the EMEA region in Q3 2024",
                 f"key: s k -{key[3:]} thanks", f"key: sk\t-{anthropic[3:]}"], "content_blocked")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    for cut in (8, 30):  # over two messages (until 2026-12-08: unseen, or its second part went out)
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"my key {key[:cut]}"},
                                                                  {"role": "user", "content": key[cut:]}])
        assert e.value.code == "content_blocked"
    assert gw.received(gw.primary) + gw.received(gw.backup) == []


@pytest.mark.parametrize("size", [6, 1, 2])
def test_an_api_key_in_short_pieces_in_a_streamed_answer_reaches_no_client(gw: Gateway, size: int) -> None:
    """A credential in an answer ends the stream (a block rule): no piece of the key after
    the text before it reaches the client, whichever chunks carry them (of one character:
    `s` alone in the first chunk, `k -proj…` in the next)."""
    key = "sk-proj-" + "Ab12cdEf34GhIj56KlMn78OpQr90StUv12WxYz34" * 2
    pieces = [key[i:i + size] for i in range(0, len(key), size)]
    try:
        content, _, _ = collected(gw, [
            chunk({"index": 0, "delta": {"role": "assistant", "content": "Use " + " ".join(pieces[:1])}}),
            chunk({"index": 0, "delta": {"content": " " + " ".join(pieces[1:]) + " for the call." + FILLER}}),
            chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    except openai.APIError as e:
        shown = str(e.body)
    else:
        shown = " ".join(content.values())
    rest = " ".join(pieces[1:])
    assert not any(rest[k:k + 8] in shown for k in range(len(rest) - 7)) and "for the call" not in shown, shown


def test_an_ssn_with_letters_between_its_groups_reaches_neither_provider_nor_client(gw: Gateway) -> None:
    """`SSN 078x05x1120` went out whole until 2026-12-07."""
    refused(gw, ["My SSN is 078x05x1120, please file it."], "classification_violation")
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Your SSN: 078x0"}}),
        chunk({"index": 0, "delta": {"content": "5x1120, on file." + FILLER}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert content == {0: "Your SSN: [US_SSN_1], on file." + FILLER}, content


def test_a_number_read_out_partly_in_words_reaches_neither_provider_nor_client(gw: Gateway) -> None:
    """Digits and digit words mixed (`4111 one one …`) went out whole until 2026-12-07."""
    refused(gw, ["card 4111 one one one one one one one one one one one one, thanks",
                 "card four one one one 1111 1111 1111 please", "SSN: zero seven eight 05 1120"],
                "classification_violation")
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Your card: 4111 - one - one - one"}}),
        chunk({"index": 0, "delta": {"content": " - one - one - one - one - one - one - one - one - one, on file."
                                     + FILLER}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert content == {0: "Your card: [CREDIT_CARD_1], on file." + FILLER}, content


def test_letters_between_groups_a_commented_address_and_a_phone_read_out_are_caught(gw: Gateway) -> None:
    """Each went out whole until 2026-12-07: `4111 x 1111 x …`, an SSN or IBAN so, an emoji
    between a card's groups, `S` for 5, an address with a comment by its sign
    (`jane(work)@example.com`), a phone number read out in words."""
    refused(gw, ["card 4111 x 1111 x 1111 x 1111, thanks", "card 4111 and 1111 and 1111 and 1111",
                 "My SSN is 078 x 05 x 1120.", "Pay GB82 x WEST x 1234 x 5698 x 7654 x 32 today.",
                 "card 4111\U0001f6421111\U0001f6421111\U0001f6421111", "card 5S55 5555 5555 4444",
                 "card 4111\nx\n1111\nx\n1111\nx\n1111"],
            "classification_violation")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": (
        "Mail jane(work)@example.com or call +1 four one five 555 0123, or four one five five five five zero one two"
        " three.")}])
    [sent] = [m["content"] for r in gw.received(gw.primary) + gw.received(gw.backup) for m in r["body"]["messages"]]
    assert sent == "Mail [EMAIL_1] or call +[PHONE_1], or [PHONE_2].", sent
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Mail jane(wo"}}),
        chunk({"index": 0, "delta": {"content": "rk)@example.com or call four one five"}}),
        chunk({"index": 0, "delta": {"content": " five five five zero one two three." + FILLER}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert content == {0: "Mail [EMAIL_1] or call [PHONE_1]." + FILLER}, content


def refused(gw: Gateway, texts: list[str], code: str) -> None:
    """Each text, asked with the openai SDK, is refused (403 with `code`), and no provider saw any."""
    gw.reset()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    for text in texts:
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
        except openai.PermissionDeniedError as e:
            assert e.code == code, e.body
        else:
            raise AssertionError(f"{text!r} reached the provider")
    assert gw.received(gw.primary) + gw.received(gw.backup) == []


def test_an_address_at_an_internationalized_domain_reaches_the_client_redacted(gw: Gateway) -> None:
    content, _, _ = collected(gw, [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Write to jane@exä"}}),
        chunk({"index": 0, "delta": {"content": "mple.com or bob@例え.jp today." + FILLER}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"})])
    assert content == {0: "Write to [EMAIL_1] or [EMAIL_2] today." + FILLER}, content
