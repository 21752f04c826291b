"""Values in tool-call arguments as a JSON parser reads them, through real Envoy and the
ext_proc (values-local: output scanning on): a tool reads its arguments parsed, so
`4.111111111111111e15` is the card 4111111111111111 and `jane.doe\\u0040example.com` an
address, whatever other text the arguments hold. Until 2026-12-05 a number written with an
exponent was read as written, and arguments holding any character outside ASCII (`café`)
were read as text, their escapes undecoded: both reached the provider (request) and the
client (a JSON answer) as sent.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import httpx
import orjson
import pytest

from .conftest import Gateway

DIGITS = "4111111111111111"
EMAIL = "jane.doe@example.com"
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
