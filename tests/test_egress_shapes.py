"""Answer shapes a hostile provider (or a prompt-injected model) could use to get a value out
whole past the output guard's hold-back windows, each read as the client reads it:

- chat streams with several choices (`n` > 1) whose chunks interleave: a client groups texts
  by `index`, and `1`, `1.0` and `true` are one choice to a Python client, `1` and `"1"` to a
  JavaScript one; each chunk now carries the index its window was keyed by (a tool call's too);
- a number written with an exponent (`4.111111111111111e15`, a card to any JSON parser) in
  streamed tool-call arguments, whole or split over deltas;
- a custom tool's input streamed in pieces (`delta.tool_calls[].custom.input`);
- an embeddings answer's numbers beside the vectors (`ref: 4111111111111111`), an SSN-named
  string, an integral number inside a vector.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
import structlog.testing

from gateway_extproc.policy.classification import EmbeddingsGuard, ResponseGuard

from .test_stream_seams import POLICY

DIGITS = "4111111111111111"
FILLER = " and then some more words that are long enough to leave the hold-back window of the guard."


def chunk(*choices: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                                     "choices": list(choices)}) + b"\n\n"


def stream(*events: bytes, in_order: bool = False) -> str:
    guard = ResponseGuard(POLICY, POLICY._params["enforce"], "t", in_order)
    out = b"".join(guard.sse_event(e) for e in events) + guard.sse_event(b"data: [DONE]\n\n")
    return out.decode()


def per_choice(out: str) -> dict[Any, str]:
    """Each choice's texts (content, each tool call's arguments or input) as a Python client
    collects them: by `index`, with Python's equality (`1 == 1.0 == True`), or by its string
    (a JavaScript client: `choices["1"]` is `choices[1]`)."""
    texts: dict[Any, list[str]] = {}
    for line in out.split("\n\n"):
        if not line.startswith("data: {"):
            continue
        for c in orjson.loads(line[6:]).get("choices", []):
            i = c.get("index")
            i = int(i) if isinstance(i, str) and i.isdigit() else i
            d = c.get("delta") or {}
            for k, v in d.items():
                if isinstance(v, str) and k != "role":
                    texts.setdefault((i, k), []).append(v)
            for t in d.get("tool_calls") or []:
                ti = t.get("index")
                ti = int(ti) if isinstance(ti, str) and ti.isdigit() else ti
                for holder, field in ((t.get("function") or {}, "arguments"), (t.get("custom") or {}, "input")):
                    if isinstance(holder.get(field), str):
                        texts.setdefault((i, "tool", ti), []).append(holder[field])
    return {k: "".join(v) for k, v in texts.items()}


def streamed_content(text: str, size: int) -> str:
    """`text` streamed as one choice's content in pieces of `size` characters (0: whole), as
    the client receives it."""
    pieces = [text] if size == 0 else [text[i:i + size] for i in range(0, len(text), size)]
    out = stream(*(chunk({"index": 0, "delta": {"content": p}}) for p in pieces),
                 chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    return per_choice(out)[(0, "content")]


def leaked(out: str) -> bool:
    return any(DIGITS in re.sub(r"\D", "", text) for text in per_choice(out).values())


@pytest.mark.parametrize("other", [1.0, True, "1"], ids=["float", "bool", "string"])
def test_a_card_split_over_two_spellings_of_one_choice_index_never_reaches_the_client(other: Any) -> None:
    out = stream(chunk({"index": 0, "delta": {"content": "hello"}}),
                 chunk({"index": 1, "delta": {"content": "card 4111 1111"}}),
                 chunk({"index": other, "delta": {"content": " 1111 1111" + FILLER}}),
                 chunk({"index": 0, "delta": {"content": FILLER}}),
                 chunk({"index": 1, "delta": {}, "finish_reason": "stop"}),
                 chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    assert not leaked(out), per_choice(out)
    for line in out.split("\n\n"):
        if line.startswith("data: {"):
            assert all(type(c["index"]) is int for c in orjson.loads(line[6:])["choices"]), line


def test_a_card_split_over_two_spellings_of_one_tool_call_index_never_reaches_the_client() -> None:
    def call(index: Any, args: str, first: bool = False) -> bytes:
        tc: dict[str, Any] = {"index": index, "function": {"arguments": args}}
        if first:
            tc.update(id=f"call_{index}", type="function", function={"name": "save", "arguments": args})
        return chunk({"index": 0, "delta": {"tool_calls": [tc]}})

    out = stream(call(0, '{"a": "hello"}', True), call(1, '{"n": "card 4111 1111', True),
                 call(1.0, ' 1111 1111' + FILLER + '"}'), call(0, FILLER),
                 chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}))
    assert not leaked(out), per_choice(out)


@pytest.mark.parametrize("in_order", [False, True])
def test_interleaved_choices_each_keep_their_own_window(in_order: bool) -> None:
    """Two choices, each with content, reasoning and a tool call, their chunks alternating, a
    card split in each text of choice 1 while choice 0's chunks come between; choice 0's
    plain text goes out whole."""
    texts = {"content": ("card 4111 1111", " 1111 1111 ok"), "reasoning_content": ("4111 1111", " 1111 1111"),
             "refusal": ("no 4111", " 1111 1111 1111")}
    events = []
    for field, (a, b) in texts.items():
        events += [chunk({"index": 1, "delta": {field: a}}), chunk({"index": 0, "delta": {field: "plain words"}}),
                   chunk({"index": 1, "delta": {field: b}}), chunk({"index": 0, "delta": {field: " go"}})]
    events += [chunk({"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "x", "type": "function",
                                                            "function": {"name": "f", "arguments": '{"c": "4111'}}]}}),
               chunk({"index": 0, "delta": {"content": " on"}}),
               chunk({"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' 1111 1111 1111"}'}}]}}),
               chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
               chunk({"index": 1, "delta": {}, "finish_reason": "stop"})]
    out = stream(*events, in_order=in_order)
    got = per_choice(out)
    assert not leaked(out), got
    if "content_filter" not in out:
        assert got[(0, "reasoning_content")] == "plain words go"


@pytest.mark.parametrize("pieces", [
    ['{"card": 4.111111111111111e15}'],
    ['{"card": 4.1111111', '11111111e15}'],
    ['{"card": 4.111111111111111e', '15, "x": 1}'],
    ['{"card": 4111111111111111', '.0, "x": 1}'],
    ['{"card": [41111111111111.11e', '2]}'],
    ['{"card": 4.111111111111111E+15', '}'],
    ['{"card": 4.111111111111111e15'],  # (the stream ends there)
], ids=["whole", "split in the mantissa", "split in the exponent", "a trailing fraction", "in a list", "E+",
        "unterminated"])
def test_a_card_written_with_an_exponent_in_streamed_tool_arguments_never_reaches_the_client(
        pieces: list[str]) -> None:
    first = {"index": 0, "id": "call_0", "type": "function", "function": {"name": "pay", "arguments": pieces[0]}}
    events = [chunk({"index": 0, "delta": {"tool_calls": [first]}})]
    events += [chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}})
               for p in pieces[1:]]
    out = stream(*events, chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}))
    args = per_choice(out).get((0, "tool", 0), "")
    numbers = [float(n) for n in re.findall(r"[-+0-9.eE]{6,}", args)]
    assert all(n != 4111111111111111 for n in numbers), args
    assert "[CREDIT_CARD_1]" in args


def test_numbers_and_strings_with_an_e_in_streamed_tool_arguments_go_out_unchanged() -> None:
    args = ['{"x": 1.5e3, "y": "4.111111111111111e15 is a string", "ok": true', ', "n": 12e', '2, "z": false}']
    events = [chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                                            "function": {"name": "f", "arguments": args[0]}}]}})]
    events += [chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}})
               for a in args[1:]]
    out = stream(*events, chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}))
    assert per_choice(out)[(0, "tool", 0)] == "".join(args)


@pytest.mark.parametrize("pieces", [["card 4111 1111", " 1111 1111 done"], ["card 4111 1111 1111 1111 done"],
                                    ["4", "111 1111 11", "11 1111"]], ids=["split", "whole", "three pieces"])
def test_a_card_in_a_streamed_custom_tool_input_never_reaches_the_client(pieces: list[str]) -> None:
    first = {"index": 0, "id": "call_0", "type": "custom", "custom": {"name": "shell", "input": pieces[0]}}
    events = [chunk({"index": 0, "delta": {"tool_calls": [first]}})]
    events += [chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "custom": {"input": p}}]}})
               for p in pieces[1:]]
    out = stream(*events, chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}))
    got = per_choice(out)
    assert not leaked(out), got
    assert "[CREDIT_CARD_1]" in got[(0, "tool", 0)]


def test_a_streamed_custom_tool_input_goes_out_whole_with_its_name_and_type() -> None:
    first = {"index": 0, "id": "call_0", "type": "custom", "custom": {"name": "shell", "input": "ls -la /tmp"}}
    out = stream(chunk({"index": 0, "delta": {"tool_calls": [first]}}),
                 chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "custom": {"input": " && echo done"}}]}}),
                 chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}))
    assert per_choice(out)[(0, "tool", 0)] == "ls -la /tmp && echo done"
    assert '"type":"custom"' in out and '"name":"shell"' in out


def test_a_card_split_between_content_and_a_custom_tool_input_never_reaches_the_client() -> None:
    first = {"index": 0, "id": "call_0", "type": "custom", "custom": {"name": "shell", "input": " 1111 1111 ok"}}
    out = stream(chunk({"index": 0, "delta": {"content": "card 4111 1111"}}),
                 chunk({"index": 0, "delta": {"tool_calls": [first]}}),
                 chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}))
    assert DIGITS not in re.sub(r"\D", "", "".join(per_choice(out).values())), out


def embeddings(**extra: Any) -> dict[str, Any]:
    item = {"object": "embedding", "index": 0, "embedding": [0.1, -0.2], **extra.pop("item", {})}
    return {"object": "list", "data": [item], "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 3, "total_tokens": 3}, **extra}


@pytest.mark.parametrize("body", [
    embeddings(ref=4111111111111111),
    embeddings(ref=4.111111111111111e15),
    embeddings(item={"embedding": [0.1, 4111111111111111.0]}),
    embeddings(item={"ssn": "123456789"}),
    embeddings(usage={"prompt_tokens": 4111111111111111, "total_tokens": 3}),
], ids=["number beside", "exponent beside", "integral number in a vector", "ssn-named string", "in usage"])
def test_an_embeddings_answer_holds_no_value_beside_its_vectors(body: dict[str, Any]) -> None:
    out = EmbeddingsGuard(POLICY, POLICY._params["enforce"], "t").json_body(body)
    sent = orjson.loads(out) if out is not None else body
    assert DIGITS not in repr(sent) and "4.111111111111111e" not in repr(sent) and "123456789" not in repr(sent), sent


def test_an_ordinary_embeddings_answer_goes_out_unchanged() -> None:
    body = embeddings(item={"embedding": [0.1, -0.2, 3.0, 1e-9]}, created=1733400000)
    assert EmbeddingsGuard(POLICY, POLICY._params["enforce"], "t").json_body(body) is None


def sdk_message(out: str) -> dict[str, Any]:
    """The message the openai SDK's stream helper (`client.chat.completions.stream`) builds
    from what the client was sent: every string of the deltas joined, every number added."""
    from openai._models import construct_type
    from openai.lib.streaming.chat._completions import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for line in out.split("\n\n"):
        if line.startswith("data: {"):
            state.handle_chunk(construct_type(type_=ChatCompletionChunk, value=orjson.loads(line[6:])))
    return state.current_completion_snapshot.model_dump()["choices"][0]["message"]


def calls(*pieces: dict[str, Any]) -> list[bytes]:
    return [chunk({"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, **p}]}}) for p in pieces]


@pytest.mark.parametrize("events", [
    calls({"id": "call_1", "type": "function", "function": {"name": "4111-1111", "arguments": ""}},
          {"function": {"name": "-1111-1111", "arguments": "{}"}}),
    calls({"id": "4111 1111", "type": "function", "function": {"name": "pay", "arguments": ""}},
          {"id": " 1111 1111", "function": {"arguments": "{}"}}),
    calls({"id": "c", "type": "custom", "custom": {"name": "4111 1111", "input": ""}}, {"custom": {"name": " 1111 1111"}}),
    [chunk({"index": 0, "delta": {"role": "assistant", "x": {"note": "jane.doe@exa"}}}),
     chunk({"index": 0, "delta": {"x": {"note": "mple.com"}}})],
    [chunk({"index": 0, "delta": {"role": "assistant", "x": {"n": 4000000000000000}}}),
     chunk({"index": 0, "delta": {"x": {"n": 111111111111111}}})],
    [chunk({"index": 0, "delta": {"role": "assistant", "x": [{"index": 0, "t": "4111 1111"}]}}),
     chunk({"index": 0, "delta": {"x": [{"index": 0, "t": " 1111 1111"}]}})],
], ids=["function name", "tool call id", "custom tool name", "extension string", "extension number", "extension list"])
def test_a_value_the_sdk_stream_helper_would_join_never_reaches_it(events: list[bytes]) -> None:
    out = stream(*events, chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    message = repr(sdk_message(out))
    assert DIGITS not in re.sub(r"[^0-9]", "", message) and "jane.doe@example.com" not in message, message
    assert "content_filter" in out


def test_pieces_the_sdk_joins_into_no_value_go_out() -> None:
    """A provider repeating `role` and a tool call's `id` and `name` in every chunk, ordinary
    extension fields: nothing ends the stream."""
    events = calls({"id": "call_1", "type": "function", "function": {"name": "save", "arguments": '{"a": '}},
                   {"id": "call_1", "function": {"name": "save", "arguments": '1}'}})
    events += [chunk({"index": 0, "delta": {"role": "assistant", "content": "ok", "x": {"n": 3, "t": "a"}}}),
               chunk({"index": 0, "delta": {"role": "assistant", "content": " done", "x": {"n": 4, "t": "b"}}})]
    out = stream(*events, chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    assert "content_filter" not in out
    message = sdk_message(out)
    assert message["content"] == "ok done" and message["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'


@pytest.mark.parametrize("pieces", [
    ["card &#52;111 1111 1111 1111 ok"],
    ["card &#5", "2;111 1111 1111 1111 ok"],
    ["card &", "#x34;111 1111 1111 111&#4", "9 ok"],
    ["card 4111 1111 1111 111&#49", "; ok"],
    ["write to jane&#64;example&#46;com today"],
    ["card \\u00", "34111 1111 1111 1111 ok"],
    ["card \\", "x34111 1111 1111 111\\x3", "1 ok"],
    ["write to jane\\u0040example.com today"],
    ["card \\ud835", "\\udfd2111 1111 1111 1111 ok"],
], ids=["whole", "split in the reference", "hex, split twice", "split before its semicolon", "address",
        "an escape, split", "x-escapes, split twice", "an escaped @", "a surrogate pair, split"])
def test_a_value_written_with_a_character_reference_never_reaches_the_client(pieces: list[str]) -> None:
    """A chat client renders Markdown, which decodes numeric character references: one digit
    written `&#52;` showed a card the scanner did not read."""
    out = stream(*(chunk({"index": 0, "delta": {"content": p}}) for p in pieces),
                 chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    text = per_choice(out)[(0, "content")]
    assert "[CREDIT_CARD_1]" in text or "[EMAIL_1]" in text, text
    assert "111" not in text and "jane" not in text, text


_MARKUP_CARDS = {
    "tags": "card 4111<b></b>1111<i></i>1111<b></b>1111 ok",
    "one tag": "card 4111<b></b>1111 1111 1111 ok",
    "a comment and a tag": "card 4111 1111<!-- -->1111<i></i>1111 ok",
    "a tag with attributes": 'card 4111 <span class="x">1111</span> 1111 1111 ok',
    "a comment": "card 4111<!-- -->1111<!-- x -->1111<!---->1111 ok",
    "named references": "card 4111&nbsp;1111&thinsp;1111&ensp;1111 ok",
    "ANSI escapes": "card 4111\x1b[0m1111\x1b[1;31m1111\x1b[0m1111 ok",
}


@pytest.mark.parametrize("text", list(_MARKUP_CARDS.values()), ids=list(_MARKUP_CARDS))
@pytest.mark.parametrize("size", [0, 1, 3, 7])
def test_a_value_written_around_markup_never_reaches_the_client(text: str, size: int) -> None:
    """A client renders Markdown (HTML tags, comments and references inside it) or a
    terminal renders ANSI escapes: `4111<b></b>1111…` shows a card the scanner read as four
    groups apart by letters. Now read as shown, whole or in pieces of any size (markup cut
    at a delta's end waits for the next one)."""
    shown = streamed_content(text, size)
    assert "[CREDIT_CARD_1]" in shown and "1111" not in shown, shown


def test_markup_is_read_as_shown_in_requests_and_text_stays_as_sent() -> None:
    findings = POLICY.scanner.scan_strings(list(_MARKUP_CARDS.values()))
    assert [f.rule for f in findings] == ["credit_card"] * len(_MARKUP_CARDS)
    for f, text in zip(findings, _MARKUP_CARDS.values()):
        assert text[f.start:f.end].startswith("4111") and text[f.start:f.end].endswith("1111")
    # Text that is not markup, or markup around nothing, finds nothing.
    assert POLICY.scanner.scan_strings(["if a<b and c>d then 4 < 5", "Q&A: R&D &amp; more &bogus; <<>>",
                                        "<b>bold</b> <!-- x --> \x1b[0m plain"]) == []


def test_a_value_inside_a_tag_is_read_as_written() -> None:
    """A renderer shows a tag as nothing, but the model reads its attributes: a card or an
    address inside `<...>` (found by Hypothesis between two header lines `<A` and `>`) went
    unseen. A tag whose attributes hold a digit or an `@` is now read as written."""
    texts = ["<A is 4111 1111 1111 1111 ok >", "<A\nis 4111 1111 1111 1111 ok\n>", '<img alt="4111-1111-1111-1111">',
             '<a href="mailto:jane.doe@example.com">write</a>', "<x 4111111111111111/>"]
    findings = POLICY.scanner.scan_strings(texts, apart=True)
    assert sorted(f.index for f in findings) == [0, 1, 2, 3, 4], findings
    assert [f.rule for f in POLICY.scanner.scan_strings(["<A", "is 4111 1111 1111 1111 ok", ">"])] == ["credit_card"]


@pytest.mark.parametrize("text", ['write "jane.doe"@example.com now', 'x = "jane" + "@" + "example.com" ok'])
@pytest.mark.parametrize("size", [0, 1, 3, 7])
def test_an_address_quoted_or_put_together_in_code_never_reaches_the_client(text: str, size: int) -> None:
    """`"jane.doe"@example.com` (a quoted local part) and `"jane" + "@" + "example.com"` are
    addresses: both went out, whole or in pieces."""
    shown = streamed_content(text, size)
    assert "[EMAIL_1]" in shown and "jane" not in shown and "example" not in shown, shown


_NUMBERED_TAGS = {
    "table cells": "card <td width=40>4111</td><td width=40>1111</td><td width=40>1111</td><td width=40>1111</td>",
    "a span": 'card 4111 1111 <span id="2">1111</span> 1111 ok',
    "a font": "card 4111 1111 <font size=2>1111</font> 1111 ok",
    "an address": "write to <b id=7>jane.doe</b>@example.com",
}


@pytest.mark.parametrize("text", list(_NUMBERED_TAGS.values()), ids=list(_NUMBERED_TAGS))
def test_a_value_split_by_a_tag_with_a_digit_in_it_is_read_as_shown(text: str) -> None:
    """A tag whose attributes hold a digit is read as written (a value may be inside it), so
    a card split by `<td width=40>` cells went out: such text is now read as shown too."""
    assert {f.rule for f in POLICY.scanner.scan_strings(["hello", text])} & {"credit_card", "email"}
    chat = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    shown = orjson.loads(ResponseGuard(POLICY, POLICY._params["enforce"], "t").json_body(chat) or b"{}")
    content = shown["choices"][0]["message"]["content"]
    assert "[CREDIT_CARD_1]" in content or "[EMAIL_1]" in content, content
    assert "1111" not in content and "jane" not in content, content


@pytest.mark.parametrize("pad", [0, 5000])
@pytest.mark.parametrize("text", [
    'key = "sk-proj-abcdefghij" + "klmnopqrstuvwxyz0123456789ABCDEFGHIJ"',
    "token = 'ghp_abcdefghijklmnop' +\n    'qrstuvwxyz0123456789'",
    _NUMBERED_TAGS["table cells"],
])
def test_a_value_put_together_from_strings_or_cells_is_found_in_any_text(text: str, pad: int) -> None:
    """A key put together from two strings in code went out as two harmless pieces; in a long
    text the stretches around each join or tag are read as shown (not the whole text again)."""
    filler = "lorem ipsum dolor sit amet " * (pad // 27)
    padded = filler + text + " " + filler
    findings = POLICY.scanner.scan_strings([padded])
    assert {f.rule for f in findings} & {"openai_key", "github_token", "credit_card"}, findings
    assert all(padded[f.start:f.end].strip() in text for f in findings)


def test_a_value_written_with_a_character_reference_never_reaches_the_provider() -> None:
    findings = POLICY.scanner.scan_strings(["pay with &#52;111 1111 1111 1111", "or &#x34;111-1111-1111-1111"])
    assert {f.rule for f in findings} == {"credit_card"} and len(findings) == 2
    assert POLICY.scanner.scan_strings(["fish &amp; chips &#; &#x; &#52111 1111"]) == []


@pytest.mark.parametrize("pieces", [['{"card": "4111 1111', ' 1111 1111"}'], ['{"card": 4.1111111', '11111111e15}']],
                         ids=["string", "exponent"])
def test_a_card_split_over_a_deprecated_function_calls_arguments_reaches_the_client_redacted(pieces: list[str]) -> None:
    """`delta.function_call` (requests that send `functions`) streams its arguments as tool
    calls do: read event by event, a split card went out (or, once the SDK's joins were read,
    ended the stream); it has a window of its own now."""
    events = [chunk({"index": 0, "delta": {"role": "assistant", "function_call": {"name": "pay", "arguments": pieces[0]}}})]
    events += [chunk({"index": 0, "delta": {"function_call": {"arguments": p}}}) for p in pieces[1:]]
    out = stream(*events, chunk({"index": 0, "delta": {}, "finish_reason": "function_call"}))
    assert "content_filter" not in out
    message = sdk_message(out)
    assert message["function_call"]["name"] == "pay"
    assert "[CREDIT_CARD_1]" in message["function_call"]["arguments"], message


def test_an_answers_object_keys_are_read_as_a_requests_are() -> None:
    """A provider's extension object keyed by a card or an address reached the client whole
    (keys of no answer were read): now renamed to the placeholder in a JSON answer, dropped
    with the field in a stream chunk."""
    chat = {"id": "x", "object": "chat.completion", "ext": {"jane@example.com": True}, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok", "x": {"4111 1111 1111 1111": 1}},
         "finish_reason": "stop"}]}
    out = ResponseGuard(POLICY, POLICY._params["enforce"], "t").json_body(chat)
    assert out is not None and b"4111" not in out and b"jane" not in out
    assert orjson.loads(out)["ext"] == {"[EMAIL_1]": True}
    embedded = embeddings(x={"4111 1111 1111 1111": 1})
    out = EmbeddingsGuard(POLICY, POLICY._params["enforce"], "t").json_body(embedded)
    assert out is not None and orjson.loads(out)["x"] == {"[CREDIT_CARD_1]": 1}
    sent = stream(chunk({"index": 0, "delta": {"content": "hi", "x": {"4111 1111 1111 1111": 1}}}),
                  chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    assert "4111" not in sent and per_choice(sent)[(0, "content")] == "hi"


def test_a_responses_answers_object_keys_are_read() -> None:
    from gateway_extproc.policy.responses_output import ResponsesGuard

    body = {"id": "r", "object": "response", "status": "completed", "x": {"4111 1111 1111 1111": 1}, "output": [
        {"type": "message", "id": "m", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}]}
    out = ResponsesGuard(POLICY, POLICY._params["enforce"], "t", {}).json_body(body)
    assert out is not None and orjson.loads(out)["x"] == {"[CREDIT_CARD_1]": 1}
    guard = ResponsesGuard(POLICY, POLICY._params["enforce"], "t", {})
    created = {"type": "response.created", "response": {"id": "r", "object": "response", "status": "in_progress",
                                                        "output": [], "x": {"jane@example.com": 1}}}
    sent = guard.sse_event(b"event: response.created\ndata: " + orjson.dumps(created) + b"\n\n")
    assert b"jane" not in sent and b"[EMAIL_1]" in sent, sent


@pytest.mark.parametrize("finish_with_text", [False, True], ids=["finish alone", "finish with the text"])
@pytest.mark.parametrize("field", ["content", "tool call"])
def test_text_after_a_choices_finish_never_completes_a_value(finish_with_text: bool, field: str) -> None:
    def piece(text: str, finish: str | None = None) -> bytes:
        delta = {"content": text} if field == "content" else {"tool_calls": [
            {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": text}}]}
        return chunk({"index": 0, "delta": delta, "finish_reason": finish})

    head = [piece("card 4111 1111", "stop")] if finish_with_text else \
        [piece("card 4111 1111"), chunk({"index": 0, "delta": {}, "finish_reason": "stop"})]
    out = stream(*head, piece(" 1111 1111 ok"), chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    assert not leaked(out), per_choice(out)
    assert "1111 ok" not in out


def test_text_after_a_finish_is_logged_once_per_choice() -> None:
    """A provider that goes on streaming after a finish, event after event, writes one line."""
    late = [chunk({"index": 0, "delta": {"content": f" more {i}"}}) for i in range(300)]
    with structlog.testing.capture_logs() as logs:
        stream(chunk({"index": 0, "delta": {"content": "done"}, "finish_reason": "stop"}), *late)
    assert [e["event"] for e in logs].count("stream_text_after_finish") == 1


@pytest.mark.parametrize("extra", [
    {"created": 4111111111111111},
    {"created": 1733400000, "usage": {"prompt_tokens": 4111111111111111, "completion_tokens": 1}},
    {"created": 1733400000, "usage": {"prompt_tokens": 1, "completion_tokens_details": {"x": 4111111111111111}}},
], ids=["created", "a usage count beside choices", "a nested usage count"])
def test_a_chunks_numbers_hold_no_card(extra: dict[str, Any]) -> None:
    """A stream chunk's `created`, and the counts of a `usage` sent beside choices, were
    forwarded unread (a usage chunk without choices was read)."""
    out = stream(b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", **extra,
                                           "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
                 + b"\n\n")
    assert DIGITS not in out and per_choice(out)[(0, "content")] == "hi", out


def test_ordinary_timestamps_and_counts_go_out_as_sent() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
             "completion_tokens_details": {"reasoning_tokens": 0}, "prompt_tokens_details": None}
    out = stream(b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                                           "created": 1733400000, "usage": usage, "choices": [
                                               {"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
                 + b"\n\n")
    assert '"created":1733400000' in out and orjson.dumps(usage).decode() in out


def test_a_responses_streams_arguments_and_text_read_exponents_and_references() -> None:
    from gateway_extproc.policy.responses_output import ResponsesGuard

    def event(obj: dict[str, Any]) -> bytes:
        return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    guard = ResponsesGuard(POLICY, POLICY._params["enforce"], "t", {})
    args = "response.function_call_arguments.delta"
    events = [{"type": "response.created", "response": {"id": "r", "object": "response", "status": "in_progress",
                                                         "output": []}},
              {"type": args, "output_index": 0, "item_id": "fc", "delta": '{"c": 4.1111111'},
              {"type": args, "output_index": 0, "item_id": "fc", "delta": "11111111e15}"},
              {"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "item_id": "m",
               "delta": "card &#5"},
              {"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "item_id": "m",
               "delta": "2;111 1111 1111 1111 ok"},
              {"type": "response.completed", "response": {"id": "r", "object": "response", "status": "completed",
                                                           "output": []}}]
    out = (b"".join(guard.sse_event(event(e)) for e in events) + guard.flush()).decode()
    deltas = "".join(orjson.loads(line[6:])["delta"] for line in out.split("\n") if line.startswith("data: {")
                     and orjson.loads(line[6:])["type"].endswith(".delta"))
    assert "4.1111111" not in deltas and "111 1111" not in deltas and deltas.count("[CREDIT_CARD_1]") == 2, deltas


def test_strings_under_identifier_names_in_a_json_answer_are_read() -> None:
    """A JSON answer's scan skips `id`, `object` and `index` strings (a tool call's id must
    round-trip): a provider's `message.x.id` or an extension's `object` went out unread."""
    body = {"id": "chatcmpl-1", "object": "chat.completion", "ext": {"object": "jane@example.com"}, "choices": [
        {"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "ok", "x": {"id": "4111 1111 1111 1111"},
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    out = ResponseGuard(POLICY, POLICY._params["enforce"], "t").json_body(body)
    assert out is not None and b"4111" not in out and b"jane" not in out, out
    sent = orjson.loads(out)
    assert sent["choices"][0]["message"]["x"]["id"] == "[CREDIT_CARD_1]" and sent["ext"]["object"] == "[EMAIL_1]"
    assert sent["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1" and sent["id"] == "chatcmpl-1"
    assert sent["object"] == "chat.completion" and sent["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("text", ["write jane.doe@example. com now", "write jane.doe@example .com now",
                                  "write jane.doe@example.\ncom now", "to jane.doe@example.  org/x"])
@pytest.mark.parametrize("size", [0, 1, 3, 7])
def test_an_address_with_a_space_on_one_side_of_its_last_dot_never_reaches_the_client(text: str, size: int) -> None:
    """`jane.doe@example. com` (a space after the dot only, or before it only) went out: a
    dot needed spaces on both sides. Now on one side too, before com, org, net, edu, gov or io."""
    shown = streamed_content(text, size)
    assert "[EMAIL_1]" in shown and "jane" not in shown, shown


@pytest.mark.parametrize("text", ["reach me@work. it is late", "mail jane@example.com. Then we go"])
def test_a_sentence_after_an_at_sign_is_no_top_level_domain(text: str) -> None:
    """Not `me@work. it` (`it` begins a sentence more often than it ends an address), and an
    address at the end of a sentence ends where its own top-level domain does."""
    values = [text[f.start:f.end] for f in POLICY.scanner.scan_strings([text])]
    assert values == ([] if "work" in text else ["jane@example.com"]), values
