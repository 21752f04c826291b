"""A streamed chat answer's labels the schema leaves to the provider (policy/classification.py
`ResponseGuard._labels`, `_tool_names`): each chunk's `model` is read once per value and
redacted in every chunk, those the gateway writes itself too (released text, a block's end);
a tool call's function `name` is read event by event, once per value, and dropped from its
chunk when it holds one."""

from __future__ import annotations

from typing import Any

import orjson

from gateway_extproc.config import Classification
from gateway_extproc.policy.classification import Policy, ResponseGuard

POLICY = Policy(Classification(("public", "internal", "confidential", "restricted"), "enforce", "public", {}, (), None,
                               (), True, 64, None))
CARD, EMAIL = "4111111111111111", "jane.doe@example.com"


def chunk(delta: dict[str, Any], model: str = "m", finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


def run(events: list[bytes]) -> tuple[str, ResponseGuard]:
    g = ResponseGuard(POLICY, POLICY._params["enforce"], "t")
    return (b"".join(g.sse_event(e) for e in events) + g.sse_event(b"data: [DONE]\n\n")).decode(), g


def test_a_value_in_the_model_goes_from_every_chunk_and_from_the_chunks_the_gateway_writes() -> None:
    out, _ = run([chunk({"content": "Hello, this text is held back"}, f"card {CARD}"),
                  chunk({"content": " a while."}, f"card {CARD}"), chunk({}, f"card {CARD}", "stop")])
    chunks = [orjson.loads(line[6:]) for line in out.split("\n\n") if line.startswith("data: {")]
    assert CARD not in out and {c["model"] for c in chunks} == {"card [CREDIT_CARD_1]"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        "Hello, this text is held back a while."


def test_a_blocked_value_in_the_model_ends_the_stream_without_it() -> None:
    key = "AKIAIOSFODNN7EXAMPLE"
    out, _ = run([chunk({"content": "Hello"}, key)])
    assert key not in out and '"finish_reason":"content_filter"' in out


def test_a_value_in_a_tool_name_goes_and_the_call_goes_on() -> None:
    out, _ = run([chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": EMAIL, "arguments": ""}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
                  chunk({}, finish="tool_calls")])
    assert "jane" not in out and '"id":"call_1"' in out and '"model":"m"' in out and "content_filter" not in out


def test_clean_labels_are_read_once() -> None:
    _, g = run([chunk({"content": "a"}, "gpt-4o"), chunk({"content": "b"}, "gpt-4o")])
    assert g.labels[("model", "gpt-4o")] == "gpt-4o"


def test_a_tool_calls_name_or_id_that_is_no_string_is_read() -> None:
    """A streamed tool call's `function.name` or `id` written as a number (or a list of numbers)
    went out unread: the guard read strings only there, the openai SDK builds chunks without
    validating them, and the Bedrock translator carries Converse's `name` and `toolUseId` as
    sent. Such a value is read as a field outside the schema: dropped when it holds a finding."""
    for call in ({"index": 0, "id": "call_1", "type": "function", "function": {"name": int(CARD), "arguments": ""}},
                 {"index": 0, "id": int(CARD), "type": "function", "function": {"name": "f", "arguments": ""}},
                 {"index": 0, "id": "call_1", "type": "function", "function": {"name": [int(CARD)], "arguments": ""}},
                 {"index": 0, "id": [float(CARD)], "type": "function", "function": {"name": "f", "arguments": ""}}):
        out, _ = run([chunk({"role": "assistant", "tool_calls": [call]}),
                      chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
                      chunk({}, finish="tool_calls")])
        assert CARD not in out and "4.111111111111111e15" not in out and "4111111111111111.0" not in out, out
        args = "".join(c["function"].get("arguments", "") for line in out.split("\n\n") if line.startswith("data: {")
                       for choice in orjson.loads(line[6:])["choices"]
                       for c in choice["delta"].get("tool_calls") or [])
        assert args == '{"a": 1}', out
    clean, _ = run([chunk({"tool_calls": [{"index": 0, "id": 7, "type": "function", "function": {"name": 5}}]}),
                    chunk({}, finish="tool_calls")])
    assert '"id":7' in clean and '"name":5' in clean, clean
