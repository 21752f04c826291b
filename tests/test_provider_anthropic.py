"""Golden tests for the Anthropic translator (OpenAI chat <-> Anthropic Messages backend).

Fixtures are Anthropic's documented examples: the Messages API "Hello" exchange, the tool
use guide (`get_weather`, its tool_use answer and the "15 degrees" tool_result), prompt
caching usage, the error shape, and the streaming guide (basic text stream, tool use stream
with input_json_delta, extended thinking stream, `overloaded_error` event). OpenAI's side
uses the Chat Completions docs examples (developer message, vision, `get_current_weather`),
and every translated answer must parse with the openai SDK's own types."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway_extproc.errors import GatewayError
from gateway_extproc.providers import anthropic
from gateway_extproc.providers.base import Target

NOW = 1_700_000_000
MODEL = "claude-opus-4-6"
TARGET = Target(model="claude-sonnet-4-5", base_url="https://api.anthropic.com/v1", base_path="/v1",
                host="api.anthropic.com", credential="sk-ant-test")

# Anthropic docs, tool use guide: the tool, the question, Claude's tool_use answer.
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                 "description": "The unit of temperature, either 'celsius' or 'fahrenheit'"}},
    "required": ["location"]}
WEATHER_DESCRIPTION = "Get the current weather in a given location"
TOOL_ID = "toolu_01A09q90qw90lq917835lq9"
TOOL_USE_MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": MODEL,
    "content": [
        {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
        {"type": "tool_use", "id": TOOL_ID, "name": "get_weather",
         "input": {"location": "San Francisco, CA", "unit": "celsius"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 384, "output_tokens": 75}}


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anthropic.time, "time", lambda: NOW + 0.25)


def translate(body: dict[str, Any], stream: bool = False, target: Target = TARGET) -> dict[str, Any]:
    out = anthropic.request(target, "/chat/completions", body, stream)
    assert out.path == "/v1/messages"
    assert out.remove == ("authorization",)
    return orjson.loads(out.body)


# --- request -----------------------------------------------------------------------------

def test_request_headers_and_path() -> None:
    out = anthropic.request(TARGET, "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, False)
    assert out.headers == {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01",
                           "content-type": "application/json"}
    custom = Target(model="m", base_url="https://proxy.example/anthropic/v1", base_path="/anthropic/v1",
                    host="proxy.example", credential="k",
                    options={"anthropicVersion": "2024-01-01"})
    out = anthropic.request(custom, "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, True)
    assert out.path == "/anthropic/v1/messages"
    assert out.headers["anthropic-version"] == "2024-01-01"
    assert orjson.loads(out.body) == {"model": "m", "max_tokens": anthropic.DEFAULT_MAX_TOKENS, "stream": True,
                                      "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}


def test_openai_docs_default_example_system_prompt_and_parameters() -> None:
    """OpenAI docs "Default" example (developer + user), plus the sampling knobs."""
    body = {"model": "gpt-4.1", "messages": [
        {"role": "developer", "content": "You are a helpful assistant."},
        {"role": "system", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": "Hello!"}],
        "max_completion_tokens": 1024, "max_tokens": 9, "temperature": 0.2, "top_p": 0.9, "stop": "END",
        "user": "user-1234", "n": 1, "stream_options": {"include_usage": True}, "seed": 7,
        "frequency_penalty": 0.5}
    assert translate(body, stream=True) == {
        "model": "claude-sonnet-4-5",
        "system": "You are a helpful assistant.\n\nAnswer in English.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}],
        "max_tokens": 1024, "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
        "metadata": {"user_id": "user-1234"}, "stream": True}
    assert translate({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stop": ["a", "b"]}) == {
        "model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        "max_tokens": 5, "stop_sequences": ["a", "b"]}


def test_openai_docs_vision_example_and_base64_image() -> None:
    """OpenAI docs "Image input" example (an https URL), plus a base64 data URL."""
    url = ("https://upload.wikimedia.org/wikipedia/commons/thumb/d/dd/Gfp-wisconsin-madison-the-nature-boardwalk.jpg/"
           "2560px-Gfp-wisconsin-madison-the-nature-boardwalk.jpg")
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What's in this image?"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "low"}}]}]}
    assert translate(body)["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What's in this image?"},
        {"type": "image", "source": {"type": "url", "url": url}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]}]


def test_tool_use_round_trip_from_anthropic_docs() -> None:
    """The docs' get_weather conversation as an OpenAI client sends it: assistant tool_calls
    become tool_use blocks, the tool message a tool_result in a user turn."""
    body = {
        "messages": [
            {"role": "user", "content": "What's the weather like in San Francisco?"},
            {"role": "assistant", "content": "I'll check the current weather in San Francisco for you.",
             "tool_calls": [{"id": TOOL_ID, "type": "function", "function": {
                 "name": "get_weather", "arguments": '{"location": "San Francisco, CA", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": TOOL_ID, "content": "15 degrees"}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": WEATHER_DESCRIPTION, "parameters": WEATHER_SCHEMA}}],
        "tool_choice": "auto"}
    assert translate(body) == {
        "model": "claude-sonnet-4-5", "max_tokens": 4096,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What's the weather like in San Francisco?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
                {"type": "tool_use", "id": TOOL_ID, "name": "get_weather",
                 "input": {"location": "San Francisco, CA", "unit": "celsius"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": TOOL_ID, "content": "15 degrees"}]}],
        "tools": [{"name": "get_weather", "description": WEATHER_DESCRIPTION, "input_schema": WEATHER_SCHEMA}],
        "tool_choice": {"type": "auto"}}


def test_parallel_tool_results_and_same_role_turns_are_merged() -> None:
    """Anthropic requires alternating roles: two tool messages and a follow-up user message
    become one user turn; an assistant turn with only tool calls has no empty text block."""
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "user", "content": [{"type": "text", "text": "Celsius please."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
            {"id": "t2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": [{"type": "text", "text": "18"}]},
        {"role": "tool", "tool_call_id": "t2", "content": "21"},
        {"role": "user", "content": "Thanks"}]}
    assert translate(body)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"},
                                     {"type": "text", "text": "Celsius please."}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "t2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18"},
                                     {"type": "tool_result", "tool_use_id": "t2", "content": "21"},
                                     {"type": "text", "text": "Thanks"}]}]


TOOL = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(("extra", "expected"), [
    ({"tool_choice": "auto"}, {"type": "auto"}),
    ({"tool_choice": "required"}, {"type": "any"}),
    ({"tool_choice": "none"}, {"type": "none"}),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, {"type": "tool", "name": "get_weather"}),
    ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
    ({"tool_choice": "required", "parallel_tool_calls": False}, {"type": "any", "disable_parallel_tool_use": True}),
    ({"tool_choice": "none", "parallel_tool_calls": False}, {"type": "none"}),
    ({"parallel_tool_calls": True}, None),
    ({}, None),
])
def test_tool_choice(extra: dict[str, Any], expected: dict[str, Any] | None) -> None:
    out = translate({"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], **extra})
    assert out["tools"] == [{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}]
    assert out.get("tool_choice") == expected


def test_tool_choice_without_tools_is_not_sent() -> None:
    """Anthropic rejects tool_choice without tools; OpenAI clients often send it anyway."""
    out = translate({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "none",
                     "parallel_tool_calls": False})
    assert "tool_choice" not in out and "tools" not in out


@pytest.mark.parametrize(("suffix", "body", "code", "param"), [
    ("/embeddings", {"input": "x"}, "unsupported_endpoint", None),
    ("/responses", {"input": "x"}, "unsupported_endpoint", None),
    ("/chat/completions", {"messages": [], "n": 2}, "invalid_request", "n"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, "invalid_request", "messages"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]}]}, "invalid_request", "messages"),
    ("/chat/completions", {"messages": [{"role": "function", "content": "x"}]}, "invalid_request", "messages"),
    ("/chat/completions", {"messages": [], "tools": [{"type": "custom", "custom": {"name": "x"}}]},
     "invalid_request", "tools"),
])
def test_request_errors(suffix: str, body: dict[str, Any], code: str, param: str | None) -> None:
    with pytest.raises(GatewayError) as info:
        anthropic.request(TARGET, suffix, body, False)
    assert (info.value.code, info.value.param) == (code, param)


# --- response ----------------------------------------------------------------------------

def completion(raw: dict[str, Any], status: int = 200) -> dict[str, Any]:
    out = anthropic.response(status, orjson.dumps(raw), "claude-sonnet-4-5")
    ChatCompletion.model_validate_json(out)
    return orjson.loads(out)


def test_response_text_from_messages_api_docs() -> None:
    raw = {"id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
           "content": [{"type": "text", "text": "Hello!"}], "model": MODEL,
           "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 6}}
    assert completion(raw) == {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "object": "chat.completion", "created": NOW, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18,
                  "prompt_tokens_details": {"cached_tokens": 0, "cache_creation_tokens": 0}}}


def test_response_tool_use_from_tool_use_docs() -> None:
    assert completion(TOOL_USE_MESSAGE)["choices"] == [{
        "index": 0, "finish_reason": "tool_calls", "logprobs": None,
        "message": {"role": "assistant", "content": "I'll check the current weather in San Francisco for you.",
                    "tool_calls": [{"id": TOOL_ID, "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"location":"San Francisco, CA","unit":"celsius"}'}}]}}]


def test_response_thinking_carried_tool_only_content_is_null_and_cache_usage() -> None:
    """Prompt caching docs usage: cache reads and writes are part of OpenAI's prompt_tokens. The
    thinking block comes back as `reasoning_content` and, signed, as `thinking_blocks` (until
    2026-12 it was dropped, and with it the signature the next turn needs)."""
    raw = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "stop_reason": "tool_use",
           "content": [{"type": "thinking", "thinking": "Let me look it up.", "signature": "sig"},
                       {"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}],
           "usage": {"input_tokens": 21, "cache_creation_input_tokens": 188086, "cache_read_input_tokens": 3,
                     "output_tokens": 393}}
    out = completion(raw)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        "reasoning_content": "Let me look it up.",
        "thinking_blocks": [{"type": "thinking", "thinking": "Let me look it up.", "signature": "sig"}]}
    assert out["usage"] == {"prompt_tokens": 188110, "completion_tokens": 393, "total_tokens": 188503,
                            "prompt_tokens_details": {"cached_tokens": 3, "cache_creation_tokens": 188086}}


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
    ("tool_use", "stop"), ("refusal", "content_filter")])  # tool_use without a tool call: base.finish_with_calls
def test_finish_reasons(stop_reason: str, finish: str) -> None:
    raw = {"id": "m", "type": "message", "role": "assistant", "model": MODEL, "content": [{"type": "text", "text": "x"}],
           "stop_reason": stop_reason, "usage": {"input_tokens": 1, "output_tokens": 1}}
    assert completion(raw)["choices"][0]["finish_reason"] == finish


UNREADABLE_200 = "The provider answered HTTP 200 with a body the gateway could not read."


@pytest.mark.parametrize(("status", "raw", "expected"), [
    # Anthropic docs, errors: the JSON error shape.
    (404, b'{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."},'
          b'"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}',
     {"message": "The requested resource could not be found.", "type": "not_found_error"}),
    (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
     {"message": "Overloaded", "type": "server_error"}),
    (502, b"<html>Bad Gateway</html>", {"message": "<html>Bad Gateway</html>", "type": "server_error"}),
    (500, b"x" * 600, {"message": "x" * 500, "type": "server_error"}),
    (429, b"", {"message": "provider answered HTTP 429", "type": "rate_limit_error"}),
    # A 2xx body that is no message may be an answer cut off or mislabelled: never quoted.
    (200, b"not json", {"message": UNREADABLE_200, "type": "server_error"}),
    (200, b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"card 4111 1111 1111 1111',
     {"message": UNREADABLE_200, "type": "server_error"}),
    (200, b'{"type":"error","error":"card 4111 1111 1111 1111"}', {"message": UNREADABLE_200, "type": "server_error"}),
])
def test_error_responses(status: int, raw: bytes, expected: dict[str, Any]) -> None:
    out = orjson.loads(anthropic.response(status, raw, "claude"))
    assert out == {"error": {**expected, "code": "provider_error", "param": None}}


# --- stream ------------------------------------------------------------------------------

def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


# Anthropic streaming docs, "Basic streaming request".
TEXT_STREAM = sse(
    {"type": "message_start", "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [],
        "model": MODEL, "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
     "usage": {"output_tokens": 15}},
    {"type": "message_stop"})

# Anthropic streaming docs, "Streaming request with tool use" (text, then get_weather).
TOOL_STREAM = sse(
    {"type": "message_start", "message": {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant", "model": MODEL,
        "stop_sequence": None, "usage": {"input_tokens": 472, "output_tokens": 2,
                                          "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
        "content": [], "stop_reason": None}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}},
    {"type": "content_block_delta", "index": 0,
     "delta": {"type": "text_delta", "text": ", let's check the weather for San Francisco, CA:"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"location":'}},
    {"type": "content_block_delta", "index": 1,
     "delta": {"type": "input_json_delta", "partial_json": ' "San Francisco, CA", "unit": "fahrenheit"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 89}},
    {"type": "message_stop"})


def chunks(out: bytes) -> list[Any]:
    """The OpenAI SSE events as objects (or "[DONE]"), each checked against the openai SDK."""
    assert out.endswith(b"\n\n")
    events: list[Any] = []
    for event in out.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event
        payload = event[6:]
        if payload == b"[DONE]":
            events.append("[DONE]")
            continue
        obj = orjson.loads(payload)
        if "error" not in obj:
            ChatCompletionChunk.model_validate(obj)
        events.append(obj)
    return events


def chunk(id_: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion.chunk", "created": NOW, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_text_stream_from_streaming_docs() -> None:
    mid = "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
    assert chunks(anthropic.stream("requested").feed(TEXT_STREAM, True)) == [
        chunk(mid, {"role": "assistant", "content": ""}),
        chunk(mid, {"content": "Hello"}),
        chunk(mid, {"content": "!"}),
        chunk(mid, {}, "stop"),
        {"id": mid, "object": "chat.completion.chunk", "created": NOW, "model": MODEL, "choices": [],
         "usage": {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40,
                   "prompt_tokens_details": {"cached_tokens": 0, "cache_creation_tokens": 0}}},
        "[DONE]"]


def test_an_output_count_before_more_output_is_no_bill() -> None:
    """A `message_delta` whose count came before more text (Claude sends it last) was the
    usage chunk's completion count until 2026-12-08 (1 token for the whole answer): the
    count there is unknown, so the router charges the reservation."""
    events = TEXT_STREAM.split(b"\n\n")
    early = b"\n\n".join([events[0], events[6].replace(b'"output_tokens":15', b'"output_tokens":1'), *events[1:6],
                           events[7], b""])
    usage = [c for c in chunks(anthropic.stream("requested").feed(early, True)) if isinstance(c, dict) and "usage" in c]
    assert usage == [] or usage[0]["usage"].get("completion_tokens") is None
    whole = [c for c in chunks(anthropic.stream("requested").feed(TEXT_STREAM, True)) if isinstance(c, dict)
             and "usage" in c]
    assert whole[0]["usage"]["completion_tokens"] == 15
    events.insert(7, events[6].replace(b'"output_tokens":15', b'"output_tokens":2'))  # (a later, smaller count)
    again = [c for c in chunks(anthropic.stream("requested").feed(b"\n\n".join(events), True))
             if isinstance(c, dict) and "usage" in c]
    assert again[0]["usage"]["completion_tokens"] == 15
    final = b"\n\n".join([*events[:6], events[6].replace(b'"output_tokens":15', b'"output_tokens":0'), events[8], b""])
    zero = [c for c in chunks(anthropic.stream("requested").feed(final, True)) if isinstance(c, dict) and "usage" in c]
    assert zero[0]["usage"]["completion_tokens"] == 0  # (message_start's placeholder 1 is no count so far)
    events[7] = events[6].replace(b'"output_tokens":15', b'"output_tokens":-3')  # (no count at all: no bill)
    negative = [c for c in chunks(anthropic.stream("requested").feed(b"\n\n".join(events), True))
                if isinstance(c, dict) and "usage" in c]
    assert negative == [] or negative[0]["usage"].get("completion_tokens") is None, negative


def test_tool_use_stream_from_streaming_docs() -> None:
    mid = "msg_014p7gG3wDgGV9EUtLvnow3U"
    out = chunks(anthropic.stream("requested").feed(TOOL_STREAM, True))
    assert out == [
        chunk(mid, {"role": "assistant", "content": ""}),
        chunk(mid, {"content": "Okay"}),
        chunk(mid, {"content": ", let's check the weather for San Francisco, CA:"}),
        chunk(mid, {"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk(mid, {"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}),
        chunk(mid, {"tool_calls": [{"index": 0, "function": {
            "arguments": ' "San Francisco, CA", "unit": "fahrenheit"}'}}]}),
        chunk(mid, {}, "tool_calls"),
        {"id": mid, "object": "chat.completion.chunk", "created": NOW, "model": MODEL, "choices": [],
         "usage": {"prompt_tokens": 592, "completion_tokens": 89, "total_tokens": 681,
                   "prompt_tokens_details": {"cached_tokens": 100, "cache_creation_tokens": 20}}},
        "[DONE]"]
    arguments = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                        for c in out[3:6])
    assert orjson.loads(arguments) == {"location": "San Francisco, CA", "unit": "fahrenheit"}


def test_second_tool_call_gets_the_next_index() -> None:
    raw = sse(
        {"type": "message_start", "message": {"id": "m", "model": MODEL, "usage": {"input_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "a", "name": "f"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "b", "name": "g"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}})
    out = chunks(anthropic.stream(MODEL).feed(raw, False))
    assert [c["choices"][0]["delta"].get("tool_calls") for c in out[1:]] == [
        [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}],
        [{"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}],
        [{"index": 1, "function": {"arguments": "{}"}}]]


def test_thinking_deltas_are_carried() -> None:
    """Streaming docs, extended thinking: thinking deltas are `reasoning_content`, the signature
    a `thinking_blocks` delta ending the block, a redacted block one whole."""
    raw = sse(
        {"type": "message_start", "message": {"id": "msg_01", "model": MODEL, "usage": {"input_tokens": 10}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "Let me solve this step by step:"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "ZW5j"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "27 * 453 = 12,231"}})
    out = chunks(anthropic.stream(MODEL).feed(raw, False))
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": ""}, {"reasoning_content": "Let me solve this step by step:"},
        {"thinking_blocks": [{"index": 0, "type": "thinking", "thinking": "", "signature": "EqQBCgIYAhIM"}]},
        {"thinking_blocks": [{"index": 1, "type": "redacted_thinking", "data": "ZW5j"}]},
        {"content": "27 * 453 = 12,231"}]


def test_each_thinking_block_entry_has_its_blocks_index() -> None:
    """The openai SDK's stream helper merges a delta's list entries by `index`: a block's
    signature in pieces is one entry, two blocks are two (until 2026-12-05 the entries had no
    index and the helper raised on the second)."""
    events: list[dict] = [{"type": "message_start", "message": {"id": "msg_01", "model": MODEL, "usage": {}}}]
    for block, pieces in ((0, ["c2ln", "LW9uZQ=="]), (3, ["c2lnLXR3bw=="])):
        events += [{"type": "content_block_delta", "index": block, "delta": {"type": "signature_delta", "signature": p}}
                   for p in pieces]
    out = chunks(anthropic.stream(MODEL).feed(sse(*events), False))
    assert [(e["index"], e["signature"]) for c in out for e in c["choices"][0]["delta"].get("thinking_blocks", [])] \
        == [(0, "c2ln"), (0, "LW9uZQ=="), (1, "c2lnLXR3bw==")]


def test_error_event_from_streaming_docs() -> None:
    raw = TEXT_STREAM.split(b"event: content_block_stop")[0] + (
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    out = chunks(anthropic.stream(MODEL).feed(raw, True))
    assert out[-1] == {"error": {"message": "Overloaded", "type": "server_error", "code": "provider_error",
                                 "param": None}}
    assert "[DONE]" not in out and len(out) == 4


def test_interrupted_stream_emits_nothing_extra() -> None:
    raw = TEXT_STREAM.split(b"event: message_delta")[0]
    translator = anthropic.stream(MODEL)
    out = translator.feed(raw, False)
    assert translator.feed(b"", True) == b""
    assert b"[DONE]" not in out and len(chunks(out)) == 3


def feed_in_pieces(raw: bytes, size: int) -> bytes:
    translator = anthropic.stream(MODEL)
    pieces = [raw[i:i + size] for i in range(0, len(raw), size)]
    return b"".join(translator.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces))


@pytest.mark.parametrize("raw", [TEXT_STREAM, TOOL_STREAM])
def test_chunk_boundaries_and_crlf_do_not_change_the_output(raw: bytes) -> None:
    whole = anthropic.stream(MODEL).feed(raw, True)
    crlf = raw.replace(b"\n", b"\r\n")
    for size in (1, 2, 7, 64):
        assert feed_in_pieces(raw, size) == whole
        assert feed_in_pieces(crlf, size) == whole


def test_nothing_is_emitted_until_an_event_is_complete() -> None:
    translator = anthropic.stream(MODEL)
    first_event_end = TEXT_STREAM.index(b"\n\n") + 2
    assert translator.feed(TEXT_STREAM[:first_event_end - 1], False) == b""
    assert chunks(translator.feed(TEXT_STREAM[first_event_end - 1:first_event_end], False))[0]["choices"][0][
        "delta"] == {"role": "assistant", "content": ""}


def test_request_gemini_call_ids_keep_to_anthropic_id_rules() -> None:
    long_id = "fc-1__thought__" + "A" * 200
    body = {"messages": [{"role": "user", "content": "time?"},
                         {"role": "assistant", "tool_calls": [{"id": long_id, "type": "function",
                                                               "function": {"name": "now", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": long_id, "content": "noon"}]}
    sent = translate(body)
    assert sent["messages"][1]["content"][0]["id"] == "fc-1"
    assert sent["messages"][2]["content"][0]["tool_use_id"] == "fc-1"


def test_cache_writes_by_ttl_reach_the_usage_block() -> None:
    """The 1-hour writes (`cache_creation.ephemeral_1h_input_tokens`, billed at 2x input,
    the 5-minute ones at 1.25x) go on as cache_creation_1h_tokens; a breakdown alone still
    counts; an unreadable 1-hour share makes every write a 1-hour one, the dearer."""
    def details(usage: dict[str, Any]) -> dict[str, Any]:
        return completion({"id": "m", "type": "message", "role": "assistant", "model": MODEL, "content": [],
                           "stop_reason": "end_turn", "usage": {"input_tokens": 10, "output_tokens": 5, **usage}}
                          )["usage"]["prompt_tokens_details"]

    split = {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 400}
    assert details({"cache_creation_input_tokens": 500, "cache_read_input_tokens": 0, "cache_creation": split}) == {
        "cached_tokens": 0, "cache_creation_tokens": 500, "cache_creation_1h_tokens": 400}
    assert details({"cache_creation": split}) == {"cached_tokens": 0, "cache_creation_tokens": 500,
                                                  "cache_creation_1h_tokens": 400}
    assert details({"cache_creation_input_tokens": 500, "cache_creation": {"ephemeral_1h_input_tokens": "x"}}) == {
        "cached_tokens": 0, "cache_creation_tokens": 500, "cache_creation_1h_tokens": 500}
    assert details({"cache_creation_input_tokens": 0, "cache_creation": {
        "ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}) == {"cached_tokens": 0,
                                                                              "cache_creation_tokens": 0}


def test_stream_cache_writes_by_ttl_from_message_start() -> None:
    stream = sse(
        {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": [], "stop_reason": None,
            "usage": {"input_tokens": 4, "output_tokens": 1, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 1000,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1000}}}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 3}},
        {"type": "message_stop"})
    usage = chunks(anthropic.stream("m").feed(stream, True))[-2]["usage"]
    assert usage == {"prompt_tokens": 1004, "completion_tokens": 3, "total_tokens": 1007, "prompt_tokens_details": {
        "cached_tokens": 0, "cache_creation_tokens": 1000, "cache_creation_1h_tokens": 1000}}


def test_anthropic_only_fields_reach_anthropic() -> None:
    """top_k, thinking, service_tier, a tool result's is_error, an assistant's signed thinking
    and structured outputs: each reaches Claude with its meaning (until 2026-12 all were dropped)."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    sent = translate({"model": "claude", "max_tokens": 2048, "top_k": 5, "reasoning_effort": "low",
                      "thinking": {"type": "enabled",
                      "budget_tokens": 1024}, "service_tier": "default",
                      "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
                      "messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "ok", "tool_calls": [
                                       {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                                    "thinking_blocks": [{"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                                                        {"type": "redacted_thinking", "data": "ZW5j"}]},
                                   {"role": "tool", "tool_call_id": "t1", "content": "boom", "is_error": True}]})
    assert sent["top_k"] == 5 and sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["service_tier"] == "standard_only"
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}, "effort": "low"}
    assert sent["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "hm", "signature": "c2ln"}, {"type": "redacted_thinking", "data": "ZW5j"},
        {"type": "text", "text": "ok"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "boom", "is_error": True}]
