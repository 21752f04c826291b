"""Output scanning on the paths beside OpenAI chat streams, through real Envoy and the ext_proc
(values-local: output scanning on), read with what the anthropic and openai SDKs assemble:

- an Anthropic client (`messages.stream()`: `text_stream`, `get_final_text()`) whose answer's
  text is split around a tool_use block, on a Claude backend and on an OpenAI-schema one;
- a stream chunk's `id` / `model` of another type than a string (a Claude `message_start`
  carries them to OpenAI clients as sent);
- a Responses stream whose text begins in the event that opens it (`content_part.added`,
  `output_item.added`), continued in deltas, read by `responses.stream()`.

Provider answers are scripted with the mock provider's `x-mock-raw-events` (sealed by conftest),
docs/mock-provider.md.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import anthropic
import openai
import orjson
import pytest

from ..test_responses_output import provider_events
from .conftest import Gateway

DIGITS = "4111111111111111"


def raw_events(events: list[bytes]) -> dict[str, str]:
    return {"x-mock-raw-events": orjson.dumps([base64.b64encode(e).decode() for e in events]).decode()}


def claude_event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n"


def claude_stream(blocks: list[bytes], message: dict[str, Any] | None = None) -> list[bytes]:
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
             "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}, **(message or {})}
    return [claude_event("message_start", {"message": start}), *blocks,
            claude_event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
            claude_event("message_stop", {})]


def claude_text(i: int, text: str) -> list[bytes]:
    return [claude_event("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}}),
            claude_event("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": text}}),
            claude_event("content_block_stop", {"index": i})]


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **head: Any) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", **head,
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


CALL = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "save", "arguments": "{}"}}]}
AROUND_A_TOOL = {
    "claude-chat": claude_stream([
        *claude_text(0, "card 4111 1111"),
        claude_event("content_block_start", {"index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "save", "input": {}}}),
        claude_event("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        claude_event("content_block_stop", {"index": 1}),
        *claude_text(2, " 1111 1111 thanks")]),
    "default-chat": [chat_chunk({"role": "assistant", "content": "card 4111 1111"}), chat_chunk(CALL),
                     chat_chunk({"content": " 1111 1111 thanks"}), chat_chunk({}, "tool_calls"), b"data: [DONE]\n\n"],
}


@pytest.mark.parametrize("model", list(AROUND_A_TOOL))
def test_a_card_split_around_a_tool_use_block_never_reaches_the_anthropic_stream_helper(gw: Gateway,
                                                                                        model: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0,
                                 default_headers=raw_events(AROUND_A_TOOL[model]))
    with client.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": "pay"}],
                                tools=[{"name": "save", "input_schema": {"type": "object", "properties": {}}}]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    joined = "".join(b.text for b in final.content if b.type == "text")
    assert DIGITS not in re.sub(r"\D", "", streamed) and DIGITS not in re.sub(r"\D", "", joined), (streamed, joined)
    assert final.stop_reason == "refusal"


@pytest.mark.parametrize("model, events", [
    ("claude-chat", claude_stream(claude_text(0, "ok"), {"id": int(DIGITS), "model": {"name": DIGITS}})),
    ("default-chat", [chat_chunk({"role": "assistant", "content": "ok"}, id=int(DIGITS), model=[DIGITS]),
                      chat_chunk({}, "stop", id=int(DIGITS), model=[DIGITS]), b"data: [DONE]\n\n"]),
], ids=["claude message_start", "openai chunks"])
def test_a_card_in_a_chunks_id_or_model_of_another_type_never_reaches_the_openai_sdk(gw: Gateway, model: str,
                                                                                   events: list[bytes]) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0, default_headers=raw_events(events))
    chunks = list(client.chat.completions.create(model=model, stream=True, messages=[{"role": "user", "content": "hi"}]))
    heads = [repr((c.id, c.model)) for c in chunks]
    assert chunks and all(DIGITS not in h for h in heads), heads
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"


def test_a_card_begun_in_a_content_part_added_never_reaches_the_responses_stream_helper(gw: Gateway) -> None:
    events = provider_events([("message", [" 1111 1111 thanks"])])
    for e in events:
        if e["type"] == "response.content_part.added":
            e["part"]["text"] = "card 4111 1111"
    wire = [b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0,
                           default_headers=raw_events([*wire, b"data: [DONE]\n\n"]))
    snapshots, status = [], None
    with client.responses.stream(model="default-chat", input="pay") as s:
        for event in s:
            snapshots += [event.snapshot] if event.type == "response.output_text.delta" else []
            status = event.response.status if event.type == "response.incomplete" else status
    assert all(DIGITS not in re.sub(r"\D", "", x) for x in snapshots), snapshots
    assert status == "incomplete"
