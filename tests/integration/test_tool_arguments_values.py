"""A value sent as a JSON number in a tool call's arguments is redacted into valid JSON, through
real Envoy and the ext_proc (values-local: output scanning on), read by the openai and
anthropic SDKs the way tool loops read them. Until 2026-12-05 `{"a": 4111111111111111}`
reached the client as `{"a": [CREDIT_CARD_1]}`: the anthropic SDK's `messages.stream()` raised
"Unable to parse tool parameter JSON" and an openai tool loop's `json.loads` failed.

The provider's answers are scripted with the mock provider's `x-mock-raw-events` /
`x-mock-raw-body` (sealed by conftest), docs/mock-provider.md.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from ..test_responses_output import provider_events
from .conftest import Gateway
from .test_tool_arguments_json import TOOLS, anthropic_chunks, answer, chat_chunks

DIGITS = "4111111111111111"
CASES = {
    "whole": ('{"a": 4111111111111111}', []),
    "split in the number": ('{"a": 4111111111111111}', [9, 15]),
    "nested, signed, compact": ('{"order":{"items":[{"card":-4111111111111111,"qty":2}]}}', [30, 33, 40]),
    "in a string too": ('{"note": "card 4111111111111111", "n": 4111111111111111}', [20, 45]),
    "compact, longer than the word hold": (
        '{"pad":[' + ",".join(['"abcdefghij"'] * 100) + '],"card":4111111111111111,"z":['
        + ",".join(['"klmnopqrst"'] * 100) + "]}", [700, 1310, 1315, 2000]),
}
ANTHROPIC_TOOLS = [{"name": "pay", "description": "Pay.", "input_schema": {"type": "object"}}]
PROMPT = "Pay the invoice."


def controls(events: list[bytes]) -> dict[str, str]:
    return {"x-mock-raw-events": orjson.dumps([base64.b64encode(e).decode() for e in events]).decode()}


def scripted(backend: str, arguments: str, cuts: list[int]) -> dict[str, str]:
    return controls((chat_chunks if backend == "default-chat" else anthropic_chunks)(arguments, cuts))


def redacted(value: Any) -> None:
    """The arguments as the tool reads them: no digit of the card, its placeholder a string."""
    text = json.dumps(value)
    assert DIGITS not in text and "[CREDIT_CARD_" in text, text


def openai_client(gw: Gateway, headers: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0, default_headers=headers)


@pytest.mark.parametrize("backend", ["default-chat", "claude-chat"])
@pytest.mark.parametrize("case", list(CASES))
def test_openai_stream_tool_arguments_parse(gw: Gateway, backend: str, case: str) -> None:
    client = openai_client(gw, scripted(backend, *CASES[case]))
    got = ""
    for c in client.chat.completions.create(model=backend, stream=True, tools=TOOLS,
                                            messages=[{"role": "user", "content": PROMPT}]):
        for choice in c.choices:
            got += "".join(t.function.arguments or "" for t in choice.delta.tool_calls or [] if t.function)
    redacted(json.loads(got))


@pytest.mark.parametrize("backend", ["default-chat", "claude-chat"])
@pytest.mark.parametrize("case", list(CASES))
def test_openai_stream_helper_tool_arguments_parse(gw: Gateway, backend: str, case: str) -> None:
    client = openai_client(gw, scripted(backend, *CASES[case]))
    with client.chat.completions.stream(model=backend, tools=TOOLS,
                                        messages=[{"role": "user", "content": PROMPT}]) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    redacted(json.loads(call.function.arguments))


@pytest.mark.parametrize("backend", ["default-chat", "claude-chat"])
@pytest.mark.parametrize("case", list(CASES))
def test_anthropic_messages_stream_tool_input_parses(gw: Gateway, backend: str, case: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0,
                                 default_headers=scripted(backend, *CASES[case]))
    # (room for the longest case's ~800 tokens of arguments: a provider streaming far more than
    # it was granted is cut at the budget, docs/budgets.md)
    with client.messages.stream(model=backend, max_tokens=2000, tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                messages=[{"role": "user", "content": PROMPT}]) as stream:
        message = stream.get_final_message()
    (tool_use,) = [b for b in message.content if b.type == "tool_use"]
    redacted(tool_use.input)


@pytest.mark.parametrize("case", list(CASES))
def test_responses_stream_function_call_arguments_parse(gw: Gateway, case: str) -> None:
    arguments, cuts = CASES[case]
    bounds = [0, *cuts, len(arguments)]
    sent = provider_events([("function_call", [arguments[a:b] for a, b in zip(bounds, bounds[1:])])])
    client = openai_client(gw, controls([b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
                                         for e in sent] + [b"data: [DONE]\n\n"]))
    deltas = ""
    with client.responses.stream(model="default-chat", input=PROMPT) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas += event.delta
        final = stream.get_final_response()
    (call,) = [o for o in final.output if o.type == "function_call"]
    redacted(json.loads(deltas))
    redacted(json.loads(call.arguments))


@pytest.mark.parametrize("case", list(CASES))
def test_json_answer_tool_arguments_parse(gw: Gateway, case: str) -> None:
    raw = base64.b64encode(orjson.dumps(answer(CASES[case][0]))).decode()
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}",
                                                             "x-mock-raw-body": raw},
                   json={"model": "default-chat", "messages": [{"role": "user", "content": PROMPT}]})
    assert r.status_code == 200, r.text
    redacted(json.loads(r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]))
