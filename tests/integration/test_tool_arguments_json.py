"""Values in tool-call arguments as a JSON parser reads them, through real Envoy and the
ext_proc (values-local: output scanning on): a tool reads its arguments parsed, so
`4.111111111111111e15` is the card 4111111111111111 and `jane.doe\\u0040example.com` an
address, whatever other text the arguments hold. Until 2026-12-05 a number written with an
exponent was read as written, and arguments holding any character outside ASCII (`café`)
were read as text, their escapes undecoded: both reached the provider (request) and the
client (a JSON answer) as sent; and streamed arguments were read delta by delta as text, so a
card written one group per line (`4111\\n1111\\n…`, JSON's line breaks) reached the client.
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

DIGITS = "4111111111111111"
EMAIL = "jane.doe@example.com"
TOOLS = [{"type": "function", "function": {"name": "pay", "parameters": {"type": "object"}}}]
ARGUMENTS = {
    "card as a float": '{"amount": 12.5, "card": 4.111111111111111e15}',
    "card as a float, non-ASCII": '{"note": "caf\u00e9", "card": 4.111111111111111E+15}',
    "escaped @, non-ASCII": '{"note": "caf\u00e9", "to": "jane.doe\\u0040example.com"}',
    "escaped digit, non-ASCII": '{"note": "\u00fcber", "card": "4111 \\u0031111 1111 1111"}',
}


def parsed_values(arguments: str) -> str:
    """The arguments as the tool reads them: every value, parsed, as text (floats as integers
    where they are)."""
    def flat(v: Any) -> list[str]:
        if isinstance(v, dict):
            return [x for k, w in v.items() for x in (k, *flat(w))]
        if isinstance(v, list):
            return [x for w in v for x in flat(w)]
        if isinstance(v, float) and v.is_integer():
            return [str(int(v))]
        return [str(v)]
    try:
        return " ".join(flat(json.loads(arguments)))
    except ValueError:
        return arguments


def leaked(text: str) -> bool:
    return DIGITS in re.sub(r"\D", "", text.replace(" ", "")) or EMAIL in text


@pytest.mark.parametrize("arguments", list(ARGUMENTS.values()), ids=list(ARGUMENTS))
def test_a_value_in_tool_call_arguments_does_not_reach_the_provider(gw: Gateway, arguments: str) -> None:
    body = {"model": "private-chat", "messages": [
        {"role": "user", "content": "Pay the invoice."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "pay", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}]}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {gw.key}"})
    assert r.status_code == 200, r.text
    (sent,) = gw.received(gw.primary)
    forwarded = sent["body"]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert not leaked(parsed_values(forwarded)), forwarded


def answer(arguments: str) -> dict[str, Any]:
    return {"id": "chatcmpl-args", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
                "role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "pay", "arguments": arguments}}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}


@pytest.mark.parametrize("arguments", list(ARGUMENTS.values()), ids=list(ARGUMENTS))
def test_a_value_in_tool_call_arguments_of_an_answer_does_not_reach_the_client(gw: Gateway, arguments: str) -> None:
    raw = base64.b64encode(orjson.dumps(answer(arguments))).decode()
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}",
                                                             "x-mock-raw-body": raw},
                   json={"model": "default-chat", "messages": [{"role": "user", "content": "Pay the invoice."}]})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert not leaked(parsed_values(got)), got


STREAMED = {
    "card one group per line": '{"card": "4111\\n1111\\n1111\\n1111"}',
    "card between tabs": '{"card": "4111\\t1111\\t1111\\t1111"}',
    "escaped @": '{"to": "jane.doe\\u0040example.com", "cc": "ops"}',
    "escaped digit": '{"card": "4111 \\u0031111 1111 1111"}',
}


def chat_chunks(arguments: str, cuts: list[int]) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "chatcmpl-args", "object": "chat.completion.chunk", "created": 1,
                                         "model": "gpt-4o-mini", "choices": [
                                             {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"
    bounds = [0, *cuts, len(arguments)]
    pieces = [arguments[a:b] for a, b in zip(bounds, bounds[1:])]
    return [chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                        "function": {"name": "pay", "arguments": ""}}]}),
            *(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces),
            chunk({}, "tool_calls"), b"data: [DONE]\n\n"]


def anthropic_chunks(arguments: str, cuts: list[int]) -> list[bytes]:
    def event(data: dict[str, Any]) -> bytes:
        return f"event: {data['type']}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"
    bounds = [0, *cuts, len(arguments)]
    return [event({"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
                "stop_reason": None, "usage": {"input_tokens": 8, "output_tokens": 1}}}),
            event({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "tool_use", "id": "toolu_1", "name": "pay", "input": {}}}),
            *(event({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "input_json_delta", "partial_json": arguments[a:b]}})
              for a, b in zip(bounds, bounds[1:])),
            event({"type": "content_block_stop", "index": 0}),
            event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            event({"type": "message_stop"})]


@pytest.mark.parametrize("backend", ["default-chat", "claude-chat"])
@pytest.mark.parametrize("arguments", list(STREAMED.values()), ids=list(STREAMED))
def test_a_value_in_streamed_tool_call_arguments_does_not_reach_the_client(gw: Gateway, arguments: str,
                                                                          backend: str) -> None:
    """Each delta was read as text: `4111\\n1111…` (how JSON writes a card one group per line)
    and `jane.doe\\u0040example.com` were no values there, and the tool parsed them whole. The
    deltas cut inside the escapes too."""
    cut = arguments.index("\\") + 1
    events = (chat_chunks if backend == "default-chat" else anthropic_chunks)(arguments, [cut, cut + 2])
    raw = orjson.dumps([base64.b64encode(e).decode() for e in events]).decode()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-mock-raw-events": raw})
    got = ""
    for c in client.chat.completions.create(model=backend, stream=True, tools=TOOLS,
                                            messages=[{"role": "user", "content": "Pay the invoice."}]):
        for choice in c.choices:
            got += "".join(t.function.arguments or "" for t in choice.delta.tool_calls or [] if t.function)
    assert not leaked(parsed_values(got)), got
    assert got.startswith("{") and json.loads(got)  # still the arguments, a value redacted in place
