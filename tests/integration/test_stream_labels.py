"""The labels of a streamed chat answer that the schema leaves to the provider, through real
Envoy and the ext_proc (values-local: output scanning on): a chunk's `model` (on every chunk,
the usage chunk too) and a tool call's function `name`. A JSON answer's are scanned with it;
a stream's were not read at all, so a card or an address a provider put there reached the
client whole (the openai SDK's chunks, the anthropic SDK's `message_start` and `tool_use`
block), from an OpenAI-schema backend and through the Anthropic translation alike. The
provider's stream is scripted with `x-mock-raw-events`.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import orjson
import pytest

from .conftest import Gateway

CARD, EMAIL = "4111111111111111", "jane.doe@example.com"


def raw(events: list[bytes]) -> str:
    return orjson.dumps([base64.b64encode(e).decode() for e in events]).decode()


def openai_events(model: str, name: str) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, choices: bool = True) -> bytes:
        data: dict[str, Any] = {"id": "chatcmpl-l", "object": "chat.completion.chunk", "created": 1, "model": model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if not choices:
            data["usage"] = {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}
        return b"data: " + orjson.dumps(data) + b"\n\n"
    return [chunk({"role": "assistant", "content": "Saving."}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ok": true}'}}]}),
            chunk({}, "tool_calls"), chunk({}, choices=False), b"data: [DONE]\n\n"]


def anthropic_events(model: str, name: str) -> list[bytes]:
    def event(data: dict[str, Any]) -> bytes:
        return f"event: {data['type']}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"
    return [event({"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "usage": {"input_tokens": 8, "output_tokens": 1}}}),
            event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Saving."}}),
            event({"type": "content_block_stop", "index": 0}),
            event({"type": "content_block_start", "index": 1,
                   "content_block": {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}}}),
            event({"type": "content_block_delta", "index": 1,
                   "delta": {"type": "input_json_delta", "partial_json": '{"ok": true}'}}),
            event({"type": "content_block_stop", "index": 1}),
            event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}}),
            event({"type": "message_stop"})]


BACKENDS = {"openai": ("default-chat", openai_events), "anthropic": ("claude-chat", anthropic_events)}
LABELS = {"model": (f"card {CARD}", "save"), "tool name": ("gpt-4o-mini", EMAIL)}
TOOLS = [{"type": "function", "function": {"name": "save", "parameters": {"type": "object"}}}]


def streamed(gw: Gateway, path: str, model: str, events: list[bytes]) -> bytes:
    if path == "/v1/messages":
        body: dict[str, Any] = {"model": model, "max_tokens": 100, "stream": True,
                                "tools": [{"name": "save", "input_schema": {"type": "object"}}],
                                "messages": [{"role": "user", "content": "Save it."}]}
    else:
        body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "tools": TOOLS,
                "messages": [{"role": "user", "content": "Save it."}]}
    with httpx.stream("POST", gw.url + path, json=body, timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", "x-mock-raw-events": raw(events)}) as r:
        assert r.status_code == 200, r.read()
        return r.read()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("label", list(LABELS))
def test_a_value_in_a_streamed_label_never_reaches_the_client(gw: Gateway, label: str, backend: str,
                                                              path: str) -> None:
    model, events = BACKENDS[backend]
    said = streamed(gw, path, model, events(*LABELS[label]))
    assert CARD.encode() not in said and EMAIL.encode() not in said, said


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_clean_streamed_labels_reach_the_client_as_sent(gw: Gateway, backend: str) -> None:
    model, events = BACKENDS[backend]
    said = streamed(gw, "/v1/chat/completions", model, events("gpt-4o-mini", "save"))
    chunks = [orjson.loads(line[6:]) for line in said.split(b"\n") if line.startswith(b"data: {")]
    assert {c.get("model") for c in chunks} == {"gpt-4o-mini"}
    assert [t["function"]["name"] for c in chunks for ch in c["choices"] for t in ch["delta"].get("tool_calls") or []
            if "name" in t["function"]] == ["save"]
