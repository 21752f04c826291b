"""Golden tests for Anthropic-style clients on the OpenAI pivot (gateway_extproc.messages).

Requests are Anthropic's documented examples (Messages API "Hello, world", vision with a
base64 image, the tool use guide's `get_weather` conversation); answers are OpenAI's
documented Chat Completions examples (`chatcmpl-123`, the `get_current_weather` tool call,
the streaming and streamed function-call examples). Every translated answer must be
accepted by the anthropic SDK itself: `Message.model_validate` for JSON, and a real
`client.messages.stream(...)` over a mock transport for SSE."""

from __future__ import annotations

import re

from typing import Any

import anthropic
import orjson
import pytest

try:  # recent anthropic SDKs run on httpx2 and refuse httpx objects
    import httpx2 as http
except ImportError:
    import httpx as http  # type: ignore[no-redef]

from gateway_extproc.errors import GatewayError
from gateway_extproc.messages import ToMessagesStream, from_chat, to_chat

MODEL = "claude-sonnet-4-5"
NO_WRITES = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"}},
    "required": ["location"]}
TOOL_ID = "toolu_01A09q90qw90lq917835lq9"


# --- to_chat -----------------------------------------------------------------------------

def test_hello_world_from_messages_api_docs() -> None:
    body = {"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello, world"}]}
    assert to_chat(body) == {"model": MODEL, "max_tokens": 1024,
                             "messages": [{"role": "user", "content": "Hello, world"}]}


def test_system_parameters_and_carried_fields() -> None:
    """`top_k` and `thinking` have no OpenAI field: the pivot carries them by LiteLLM's names
    (until 2026-12 both were dropped, the request answered as if never sent)."""
    body = {"model": MODEL, "max_tokens": 256, "system": "You are a seasoned data scientist.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Analyze this dataset."}]}],
            "stop_sequences": ["\n\nHuman:"], "temperature": 0.5, "top_p": 0.9, "top_k": 40,
            "metadata": {"user_id": "13803d75-b4b5-4c3e-b2a2-6f21399b021b"}, "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert to_chat(body) == {
        "model": MODEL, "max_tokens": 256,
        "messages": [{"role": "system", "content": "You are a seasoned data scientist."},
                     {"role": "user", "content": "Analyze this dataset."}],
        "stop": ["\n\nHuman:"], "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "user": "13803d75-b4b5-4c3e-b2a2-6f21399b021b", "stream": True}
    blocks = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
              "system": [{"type": "text", "text": "Be brief."},
                         {"type": "text", "text": "<docs>...</docs>", "cache_control": {"type": "ephemeral"}}]}
    assert to_chat(blocks)["messages"][0] == {"role": "system", "content": [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "<docs>...</docs>", "cache_control": {"type": "ephemeral"}}]}


def test_vision_example_multi_part_content() -> None:
    """Vision docs: a base64 image then a question; a URL image source too."""
    body = {"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}},
        {"type": "image", "source": {"type": "url",
                                     "url": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"}},
        {"type": "text", "text": "Describe these images."}]}]}
    assert to_chat(body)["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
        {"type": "image_url", "image_url": {
            "url": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"}},
        {"type": "text", "text": "Describe these images."}]}]


def test_tool_use_conversation_from_tool_use_docs() -> None:
    """The get_weather conversation: assistant tool_use -> tool_calls, the user's
    tool_result -> a tool message placed before the rest of that user turn."""
    body = {
        "model": MODEL, "max_tokens": 1024,
        "tools": [{"name": "get_weather", "description": "Get the current weather in a given location",
                   "input_schema": WEATHER_SCHEMA}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "What's the weather like in San Francisco?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should call get_weather.", "signature": "sig"},
                {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
                {"type": "tool_use", "id": TOOL_ID, "name": "get_weather",
                 "input": {"location": "San Francisco, CA", "unit": "celsius"}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Also, is that warm?"},
                {"type": "tool_result", "tool_use_id": TOOL_ID, "content": "15 degrees"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                                               "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2",
                                          "content": [{"type": "text", "text": "18"}, {"type": "text", "text": "sunny"}],
                                          "is_error": False}]}]}
    assert to_chat(body) == {
        "model": MODEL, "max_tokens": 1024,
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather in a given location",
            "parameters": WEATHER_SCHEMA}}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "messages": [
            {"role": "user", "content": "What's the weather like in San Francisco?"},
            {"role": "assistant", "content": "I'll check the current weather in San Francisco for you.",
             "tool_calls": [{"id": TOOL_ID, "type": "function", "function": {
                 "name": "get_weather", "arguments": '{"location":"San Francisco, CA","unit":"celsius"}'}}],
             "thinking_blocks": [{"type": "thinking", "thinking": "I should call get_weather.", "signature": "sig"}]},
            {"role": "tool", "tool_call_id": TOOL_ID, "content": "15 degrees"},
            {"role": "user", "content": "Also, is that warm?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_2", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"location":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "18\nsunny"}]}


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"}, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "any", "disable_parallel_tool_use": True}, {"tool_choice": "required", "parallel_tool_calls": False}),
])
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}], "tool_choice": choice}
    out = to_chat(body)
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    assert {k: out[k] for k in ("tool_choice", "parallel_tool_calls") if k in out} == expected


VALID: dict[str, Any] = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"model": None}, "model", "model"),
    ({"model": 3}, "model", "string"),
    ({"max_tokens": None}, "max_tokens", "positive integer"),
    ({"max_tokens": 0}, "max_tokens", "positive integer"),
    ({"max_tokens": True}, "max_tokens", "positive integer"),
    ({"max_tokens": "10"}, "max_tokens", "positive integer"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role", "'user' or 'assistant'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "string or a list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "tool_use"}]}]},
     "messages.1.content.0", "'tool_use' is not supported in a user message"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages.0.content.0", "'document'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages.0.content.0.source", "base64 or url"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}]},
     "messages.0.content.0.content", "only contain text"),
    ({"system": [{"type": "image"}]}, "system", "text blocks"),
    ({"system": 5}, "system", "text blocks"),
    ({"stream": "yes"}, "stream", "boolean"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0", "input_schema"),
    ({"tools": [{"name": "f", "input_schema": {}}, {"name": "g", "input_schema": "x"}]}, "tools.1.input_schema",
     "JSON Schema"),
    ({"tools": [{"name": "f", "input_schema": {}, "description": 5}]}, "tools.0.description", "string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": 7, "name": "f", "input": {}}]}]}, "messages.1.content.0.id", "string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]}, "messages.1.content.0.input", "object"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": ["t"], "content": "ok"}]}]},
     "messages.0.content.0.tool_use_id", "string"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice", "auto, any, tool or none"),
])
def test_validation_errors(change: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(GatewayError) as info:
        to_chat({**VALID, **change})
    assert (info.value.code, info.value.status, info.value.param) == ("invalid_request", 400, param)
    assert words in info.value.message


# --- from_chat ---------------------------------------------------------------------------

def message(out: bytes) -> dict[str, Any]:
    anthropic.types.Message.model_validate(orjson.loads(out))
    return orjson.loads(out)


def test_chat_completion_example_from_openai_docs() -> None:
    raw = {"id": "chatcmpl-123", "object": "chat.completion", "created": 1677652288, "model": "gpt-4o-mini",
           "system_fingerprint": "fp_44709d6fcb",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "\n\nHello there, how may I assist you today?"},
                        "logprobs": None, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                     "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0,
                                                   "rejected_prediction_tokens": 0}}}
    assert message(from_chat(orjson.dumps(raw))) == {
        "id": "chatcmpl-123", "type": "message", "role": "assistant", "model": "gpt-4o-mini",
        "content": [{"type": "text", "text": "\n\nHello there, how may I assist you today?"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 12, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0, "cache_creation": NO_WRITES}}


def test_tool_call_example_from_openai_docs_with_cached_tokens() -> None:
    raw = {"id": "chatcmpl-abc123", "object": "chat.completion", "created": 1699896916, "model": "gpt-4o-mini",
           "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
               "role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_abc123", "type": "function", "function": {
                       "name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}},
                   {"id": "call_bad", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}}],
           "usage": {"prompt_tokens": 2006, "completion_tokens": 17, "total_tokens": 2023,
                     "prompt_tokens_details": {"cached_tokens": 1920}}}
    assert message(from_chat(orjson.dumps(raw))) == {
        "id": "chatcmpl-abc123", "type": "message", "role": "assistant", "model": "gpt-4o-mini",
        "content": [{"type": "tool_use", "id": "call_abc123", "name": "get_current_weather",
                     "input": {"location": "Boston, MA"}},
                    {"type": "tool_use", "id": "call_bad", "name": "f", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 86, "output_tokens": 17, "cache_read_input_tokens": 1920,
                  "cache_creation_input_tokens": 0, "cache_creation": NO_WRITES}}


def test_anthropic_backend_cache_writes_survive_the_round_trip() -> None:
    """The Anthropic translator reports cache writes as prompt_tokens_details.cache_creation_tokens,
    their 1-hour share as cache_creation_1h_tokens; Anthropic clients get both back as Anthropic
    reports them (`cache_creation` split by TTL)."""
    raw = {"id": "msg_1", "model": "claude", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 188110, "completion_tokens": 393,
                     "prompt_tokens_details": {"cached_tokens": 3, "cache_creation_tokens": 188086,
                                               "cache_creation_1h_tokens": 188000}}}
    assert message(from_chat(orjson.dumps(raw)))["usage"] == {
        "input_tokens": 21, "output_tokens": 393, "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 188086,
        "cache_creation": {"ephemeral_5m_input_tokens": 86, "ephemeral_1h_input_tokens": 188000}}


def test_openrouter_cache_writes_reach_anthropic_clients() -> None:
    """An OpenAI-compatible backend in front of Claude (OpenRouter) reports writes as
    `cache_write_tokens`, inside prompt_tokens as OpenAI counts."""
    raw = {"id": "gen-1", "model": "anthropic/claude-sonnet-4.5",
           "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 194, "completion_tokens": 2,
                     "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 100, "audio_tokens": 0}}}
    assert message(from_chat(orjson.dumps(raw)))["usage"] == {
        "input_tokens": 94, "output_tokens": 2, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 100,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 0}}


@pytest.mark.parametrize(("finish", "stop_reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")])
def test_stop_reasons(finish: str, stop_reason: str) -> None:
    raw = {"id": "c", "model": "m", "choices": [{"message": {"content": "x"}, "finish_reason": finish}]}
    assert message(from_chat(orjson.dumps(raw)))["stop_reason"] == stop_reason


@pytest.mark.parametrize(("choice", "stop"), [
    ({"finish_reason": "stop", "native_finish_reason": "pause_turn"}, ("pause_turn", None)),
    ({"finish_reason": "length", "native_finish_reason": "model_context_window_exceeded"},
     ("model_context_window_exceeded", None)),
    ({"finish_reason": "stop", "native_finish_reason": "stop_sequence", "stop_reason": "###"}, ("stop_sequence", "###")),
    ({"finish_reason": "stop", "stop_reason": "###"}, ("stop_sequence", "###")),  # vLLM's matched stop string
    ({"finish_reason": "stop", "stop_reason": 128009}, ("end_turn", None)),  # (vLLM: a stop token id)
    # a native reason the finish_reason disagrees with (tool calls overrule it) is not believed
    ({"finish_reason": "tool_calls", "native_finish_reason": "stop_sequence", "stop_reason": "#"}, ("tool_use", None)),
    ({"finish_reason": "stop", "native_finish_reason": ["x"]}, ("end_turn", None)),
])
def test_stop_reasons_finish_reason_says_less_about(choice: dict[str, Any], stop: tuple[str, str | None]) -> None:
    """Before 2026-12-05 an Anthropic client got end_turn for stop_sequence and pause_turn, and
    max_tokens for model_context_window_exceeded; `stop_sequence` was always null. Same in streams."""
    raw = {"id": "c", "model": "m", "choices": [{"message": {"content": "x"}, **choice}]}
    answer = message(from_chat(orjson.dumps(raw)))
    assert (answer["stop_reason"], answer["stop_sequence"]) == stop
    events = ToMessagesStream().feed(data({"id": "c", "model": "m", "choices": [
        {"index": 0, "delta": {"content": "x"}, "finish_reason": None}]},
        {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {}, **choice}]}, b"[DONE]"), True)
    [delta] = [orjson.loads(line[6:]) for line in events.split(b"\n") if line.startswith(b"data: ")
               and b"message_delta" in line]
    assert (delta["delta"]["stop_reason"], delta["delta"]["stop_sequence"]) == stop


# --- ToMessagesStream --------------------------------------------------------------------

def data(*objs: Any) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n\n" for o in objs)


def delta(d: dict[str, Any], finish: str | None = None, id_: str = "chatcmpl-123") -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
            "system_fingerprint": "fp_44709d6fcb", "choices": [{"index": 0, "delta": d, "logprobs": None,
                                                               "finish_reason": finish}]}


USAGE = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
         "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49,
                                  "prompt_tokens_details": {"cached_tokens": 32}}}
# OpenAI docs, chat completion chunk streaming example, with the include_usage chunk.
TEXT_STREAM = data(delta({"role": "assistant", "content": ""}), delta({"content": "Hello"}),
                   delta({"content": " there!"}), delta({}, "stop"), USAGE, b"[DONE]")
# OpenAI docs, function calling with streaming: arguments arrive in pieces.
TOOL_ARGS = ['{"', "location", '":"', "Paris", ",", " France", '"}']
TOOL_STREAM = data(
    delta({"role": "assistant", "content": "Let me check."}),
    delta({"tool_calls": [{"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    *(delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in TOOL_ARGS),
    delta({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                           "function": {"name": "get_time", "arguments": "{}"}}]}),
    delta({}, "tool_calls"), USAGE, b"[DONE]")


def events(out: bytes) -> list[tuple[str, dict[str, Any]]]:
    parsed = []
    for event in out.split(b"\n\n")[:-1]:
        name, payload = event.split(b"\n")
        assert name.startswith(b"event: ") and payload.startswith(b"data: ")
        obj = orjson.loads(payload[6:])
        assert obj["type"] == name[7:].decode()
        parsed.append((obj.pop("type"), obj))
    return parsed


def sdk_final_message(out: bytes) -> anthropic.types.Message:
    """What a real anthropic SDK client makes of the translated stream."""
    transport = http.MockTransport(lambda request: http.Response(
        200, headers={"content-type": "text/event-stream"}, content=out))
    client = anthropic.Anthropic(api_key="test", base_url="http://gateway.test",
                                 http_client=http.Client(transport=transport), max_retries=0)
    with client.messages.stream(model="claude", max_tokens=100, messages=[{"role": "user", "content": "x"}]) as stream:
        return stream.get_final_message()


START = ("message_start", {"message": {"id": "chatcmpl-123", "type": "message", "role": "assistant",
                                       "model": "gpt-4o-mini", "content": [], "stop_reason": None,
                                       "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})
END_USAGE = {"input_tokens": 8, "output_tokens": 9, "cache_read_input_tokens": 32, "cache_creation_input_tokens": 0,
             "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}


# Azure's first chunk: its prompt filter's verdict, before any choice, with no id or model.
AZURE_PROMPT_FILTER = {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": [
    {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}]}


def test_an_azure_stream_starts_the_message_at_its_first_choice() -> None:
    """`message_start` (the message's id and model) was made from Azure's annotation chunk:
    an Anthropic client got id "" and model ""."""
    out = ToMessagesStream().feed(data(AZURE_PROMPT_FILTER) + TEXT_STREAM, True)
    assert events(out)[0] == START
    final = sdk_final_message(out)
    assert final.id == "chatcmpl-123" and final.model == "gpt-4o-mini" and final.content[0].text == "Hello there!"


def test_text_stream() -> None:
    out = ToMessagesStream().feed(TEXT_STREAM, True)
    assert events(out) == [
        START,
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": " there!"}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": END_USAGE}),
        ("message_stop", {})]
    final = sdk_final_message(out)
    assert final.content[0].type == "text" and final.content[0].text == "Hello there!"
    assert (final.stop_reason, final.usage.output_tokens, final.usage.cache_read_input_tokens) == ("end_turn", 9, 32)


def test_a_chunk_that_never_ends_ends_the_anthropic_stream_with_an_error_event() -> None:
    """Without output scanning the router passes on a provider event past its 1 MiB hold in
    pieces, and this reader held it whole without bound (quadratic, as providers.base.SseReader
    did): past 16 MiB the Anthropic client's stream now ends with one error event."""
    translator = ToMessagesStream()
    out = translator.feed(data(delta({"role": "assistant", "content": "Hello"})) + b'data: {"choices": [', False)
    filler = b" " * 65536
    for _ in range((16 << 20) // len(filler) + 2):
        out += translator.feed(filler, False)
    out += translator.feed(filler, False) + translator.feed(b"]}\n\n", True)
    kinds = [kind for kind, _ in events(out)]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"] and kinds[-1] == "error", kinds
    assert kinds.count("error") == 1, kinds


def test_tool_call_stream() -> None:
    out = ToMessagesStream().feed(TOOL_STREAM, True)
    json_delta = [("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}})
                  for p in TOOL_ARGS]
    assert events(out) == [
        START,
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Let me check."}}),
        ("content_block_stop", {"index": 0}),
        ("content_block_start", {"index": 1, "content_block": {
            "type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "name": "get_weather", "input": {}}}),
        *json_delta,
        ("content_block_stop", {"index": 1}),
        ("content_block_start", {"index": 2, "content_block": {
            "type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}}),
        ("content_block_delta", {"index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        ("content_block_stop", {"index": 2}),
        ("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": END_USAGE}),
        ("message_stop", {})]
    final = sdk_final_message(out)
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("text", None), ("tool_use", {"location": "Paris, France"}), ("tool_use", {})]
    assert final.stop_reason == "tool_use"


def test_finish_is_held_until_done_so_usage_is_included() -> None:
    stream = ToMessagesStream()
    head, tail = TEXT_STREAM.split(b"data: " + orjson.dumps(USAGE))
    assert [name for name, _ in events(stream.feed(head, False))][-1] == "content_block_delta"
    rest = events(stream.feed(b"data: " + orjson.dumps(USAGE) + tail, True))
    assert [name for name, _ in rest] == ["content_block_stop", "message_delta", "message_stop"]
    assert rest[1][1]["usage"] == END_USAGE


def test_error_event() -> None:
    """A gateway or provider error mid-stream: the SDK raises it instead of returning half an answer."""
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": "provider_error",
                       "param": None}}
    out = ToMessagesStream().feed(data(delta({"content": "Hi"}), error, b"[DONE]"), True)
    assert events(out)[-1] == ("error", {"error": {"type": "api_error", "message": "The server had an error",
                                                   "code": "provider_error", "param": None}})
    assert b"message_stop" not in out
    with pytest.raises(anthropic.APIStatusError, match="The server had an error"):
        sdk_final_message(out)


@pytest.mark.parametrize(("error", "kind"), [
    ({"message": "slow down", "type": "rate_limit_error", "code": "rate_limited"}, "rate_limit_error"),
    ({"message": "busy", "type": "server_error", "code": "overloaded"}, "overloaded_error"),
    ({"message": "bad", "type": "invalid_request_error", "code": "provider_error"}, "invalid_request_error"),
    ({"message": "cut", "type": "rate_limit_error", "code": "budget_exceeded"}, "rate_limit_error"),
    ({"message": "odd", "type": "server_error", "code": None}, "api_error"),
])
def test_error_types(error: dict[str, Any], kind: str) -> None:
    """Anthropic's error type, and the gateway's runbook code (until 2026-12-05 dropped: a stream
    cut at its budget and a provider's failure looked alike to Anthropic clients)."""
    out = ToMessagesStream().feed(data({"error": error}), True)
    assert events(out) == [("error", {"error": {"type": kind, "message": error["message"],
                                                "code": error["code"] or "provider_error", "param": None}})]


def test_end_without_done() -> None:
    """A finished backend stream missing only [DONE] still ends cleanly; one cut before its
    finish_reason ends with nothing made up (the router reports the interruption)."""
    finished = ToMessagesStream().feed(TEXT_STREAM.replace(b"data: [DONE]\n\n", b""), True)
    assert finished == ToMessagesStream().feed(TEXT_STREAM, True)
    cut = ToMessagesStream().feed(data(delta({"content": "Hel"})), True)
    assert [name for name, _ in events(cut)] == ["message_start", "content_block_start", "content_block_delta"]


def feed_in_pieces(raw: bytes, size: int) -> bytes:
    stream = ToMessagesStream()
    pieces = [raw[i:i + size] for i in range(0, len(raw), size)]
    return b"".join(stream.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces))


@pytest.mark.parametrize("raw", [TEXT_STREAM, TOOL_STREAM])
def test_chunk_boundaries_do_not_change_the_output(raw: bytes) -> None:
    whole = ToMessagesStream().feed(raw, True)
    for size in (1, 3, 50):
        assert feed_in_pieces(raw, size) == whole
        assert feed_in_pieces(raw.replace(b"\n", b"\r\n"), size) == whole


# --- wrong types the translation used to coerce, drop or forward ---------------------------

IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
RESULT = {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "ok"}]}
TOOLS = {"tools": [{"name": "f", "input_schema": {}}]}


def _user(*blocks: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(blocks)}]}


@pytest.mark.parametrize(("change", "param"), [
    # silently dropped: a wrong type where an object or list belongs
    ({"tool_choice": "auto"}, "tool_choice"), ({"tool_choice": 5}, "tool_choice"),
    ({"tool_choice": ["auto"]}, "tool_choice"), ({**TOOLS, "tool_choice": "any"}, "tool_choice"),
    ({**TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice.name"),  # sent on as a function named ""
    ({**TOOLS, "tool_choice": {"type": "tool", "name": 5}}, "tool_choice.name"),
    ({**TOOLS, "tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"}},
     "tool_choice.disable_parallel_tool_use"),
    ({"system": {}}, "system"), ({"system": 0}, "system"), ({"system": False}, "system"),
    ({"stop_sequences": {}}, "stop_sequences"), ({"stop_sequences": ""}, "stop_sequences"),
    ({"stop_sequences": 0}, "stop_sequences"),
    ({"tools": {}}, "tools"), ({"tools": 0}, "tools"), ({"tools": ""}, "tools"),
    ({"metadata": {"user_id": []}}, "metadata.user_id"), ({"metadata": {"user_id": 0}}, "metadata.user_id"),
    # named by the pivot's field (`user`), which an Anthropic client never sent
    ({"metadata": {"user_id": 5}}, "metadata.user_id"), ({"metadata": {"user_id": {"id": "u"}}}, "metadata.user_id"),
    # "content block type 'text' is not supported in a user message"
    (_user({"type": "text", "text": 5}), "messages.0.content.0.text"),
    (_user({"type": "text"}), "messages.0.content.0.text"),
    # stringified into the data URL sent on: `data:5;base64,[1]`
    (_user({**IMAGE, "source": {**IMAGE["source"], "data": [1]}}), "messages.0.content.0.source.data"),
    (_user({**IMAGE, "source": {**IMAGE["source"], "data": None}}), "messages.0.content.0.source.data"),
    (_user({**IMAGE, "source": {**IMAGE["source"], "media_type": 5}}), "messages.0.content.0.source.media_type"),
    (_user({**IMAGE, "source": {"type": "base64", "data": "iVBORw0KGgo="}}), "messages.0.content.0.source.media_type"),
    (_user({"type": "image", "source": {"type": "url", "url": {"href": "https://x/a.png"}}}),
     "messages.0.content.0.source.url"),
    (_user({"type": "image", "source": {"type": "url"}}), "messages.0.content.0.source.url"),
    # str() of the value sent as the tool's answer: "{'a': 1}"
    (_user({**RESULT, "content": [{"type": "text", "text": {"a": 1}}]}), "messages.0.content.0.content.0.text"),
    (_user({**RESULT, "content": [{"type": "text", "text": "a"}, {"type": "text"}]}),
     "messages.0.content.0.content.1.text"),
    (_user({**RESULT, "content": [{"type": "text", "text": 5, "cache_control": {"type": "ephemeral"}}]}),
     "messages.0.content.0.content.0.text"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_wrong_type_is_refused_by_its_anthropic_path(change: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        to_chat({**VALID, **change})
    assert (info.value.code, info.value.status, info.value.param) == ("invalid_request", 400, param)
    assert info.value.message.startswith(f"{param}: ")


def test_what_the_messages_schema_allows_still_translates() -> None:
    body = {**VALID, "system": "", "stop_sequences": [], "tools": [], "metadata": {"user_id": None},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": ""}, IMAGE, {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
                {**RESULT, "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": False}}
    out = to_chat(body)
    assert out["messages"][0] == {"role": "tool", "tool_call_id": "t", "content": "a\nb"}
    assert out["messages"][1]["content"][1] == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}
    assert "user" not in out and "stop" not in out and "tools" not in out and out["tool_choice"] == "auto"
    assert to_chat({**VALID, "system": None, "stop_sequences": None, "tools": None, "tool_choice": None}) \
        == to_chat(VALID)


# --- every Messages field reaches the pivot, or is refused by name ------------------------

THINKING_TURN = [{"role": "user", "content": "weather?"},
                 {"role": "assistant", "content": [
                     {"type": "thinking", "thinking": "Call the tool.", "signature": "c2ln"},
                     {"type": "redacted_thinking", "data": "ZW5j"},
                     {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "boom",
                                               "is_error": True}]}]


def test_thinking_blocks_is_error_and_service_tier_are_carried_with_their_client_paths() -> None:
    paths: dict[str, str] = {}
    out = to_chat({**VALID, "messages": THINKING_TURN, "service_tier": "standard_only",
                   "thinking": {"type": "adaptive"}}, paths)
    assert out["messages"][1]["thinking_blocks"] == [
        {"type": "thinking", "thinking": "Call the tool.", "signature": "c2ln"},
        {"type": "redacted_thinking", "data": "ZW5j"}]
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "boom", "is_error": True}
    assert out["service_tier"] == "default" and out["thinking"] == {"type": "adaptive"}
    assert paths["messages[1].thinking_blocks"] == "messages.1.content.0"
    assert paths["messages[2].is_error"] == "messages.2.content.0.is_error"
    assert paths["user"] == "metadata.user_id" and paths["stop"] == "stop_sequences"


@pytest.mark.parametrize(("change", "param"), [
    ({"container": "c1"}, "container"),
    ({"mcp_servers": [{"type": "url"}]}, "mcp_servers"),
    ({"metadata": {"user_id": "u", "tenant": "t"}}, "metadata.tenant"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "on", "budget_tokens": 2000}}, "thinking"),
    ({"thinking": {"type": "disabled", "budget_tokens": 2000}}, "thinking.budget_tokens"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"system": [{"type": "text", "text": "x", "citations": [{}]}]}, "system.0.citations"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://x/a.png", "detail": "high"}}]}]}, "messages.0.content.0.source.detail"),
    ({"output_config": {"effort": "high", "verbosity": "low"}}, "output_config.verbosity"),
    ({"thinking": {"type": "adaptive", "budget_tokens": 10}}, "thinking.budget_tokens"),
    ({"tools": [{"name": "f", "input_schema": {}, "strict": True}]}, "tools.0.strict"),
    ({"tool_choice": {"type": "auto", "parallel": False}}, "tool_choice.parallel"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "citations": [{}]}]}]},
     "messages.0.content.0.citations"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": "yes"}]}]},
     "messages.0.content.0.is_error"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "x"}]}]}, "messages.1.content.0.signature"),
])
def test_a_field_the_translation_would_drop_is_refused_by_name(change: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        to_chat({**VALID, **change})
    assert (info.value.code, info.value.status, info.value.param) == ("invalid_request", 400, param)


CLAUDE_THINKING = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                                          "content": [], "usage": {"input_tokens": 10, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "ZW5j"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "42."}},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 30}},
    {"type": "message_stop"}]
CLAUDE_THINKING_BLOCKS = [{"type": "thinking", "thinking": "Let me think.", "signature": "EqQBCgIYAhIM"},
                          {"type": "redacted_thinking", "data": "ZW5j"}]


def test_claude_thinking_reaches_an_anthropic_client_signed_json_and_stream() -> None:
    """Thinking blocks cross the pivot both ways (until 2026-12 they were dropped, and with
    them the signatures Claude needs back on the next turn of a tool loop)."""
    from gateway_extproc.providers import anthropic as claude

    answer = {**CLAUDE_THINKING[0]["message"], "stop_reason": "end_turn", "stop_sequence": None,
              "content": [*CLAUDE_THINKING_BLOCKS, {"type": "text", "text": "42."}],
              "usage": {"input_tokens": 10, "output_tokens": 30}}
    out = message(from_chat(claude.response(200, orjson.dumps(answer), MODEL)))
    assert out["content"] == answer["content"]
    raw = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in CLAUDE_THINKING)
    final = sdk_final_message(ToMessagesStream().feed(claude.stream(MODEL).feed(raw, True), True))
    assert [b.model_dump(exclude_none=True) for b in final.content] == answer["content"]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 30


def test_output_config_is_carried_as_openai_says_it() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    paths: dict[str, str] = {}
    out = to_chat({**VALID, "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "max"},
                   "thinking": {"type": "enabled", "budget_tokens": 2000, "display": "omitted"}}, paths)
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert out["reasoning_effort"] == "max" and out["thinking"]["display"] == "omitted"
    assert paths["response_format"] == "output_config.format" and paths["reasoning_effort"] == "output_config.effort"


@pytest.mark.parametrize("scanned", [True, False], ids=["output scanning", "none"])
def test_two_signed_thinking_blocks_reach_an_anthropic_client_as_two(scanned: bool) -> None:
    """Claude's two thinking blocks, each signed, streamed to an anthropic client: two blocks,
    each with its text and signature. Output scanning holds reasoning text back in its window
    while a signature (no text) passes; until 2026-12-05 the first block's held tail came after
    its signature, the translation could not tell where the block ended, and the client got one
    block with both texts and the second signature (which Claude refuses on the next turn). A
    signed block without text (display omitted) is still a block of its own."""
    from gateway_extproc.policy.classification import ResponseGuard
    from gateway_extproc.providers import anthropic as claude

    from .test_stream_seams import POLICY

    texts = ("Step one: the user asks for six times seven, which is a product.",
             "Step two: six sevens are forty-two, so answer 42.")
    events = [CLAUDE_THINKING[0]]
    for i, (text, signature) in enumerate(zip(("", *texts), ("c2ln", "c2lnLW9uZQ==", "c2lnLXR3bw=="))):
        events += [{"type": "content_block_start", "index": i,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
                   *({"type": "content_block_delta", "index": i, "delta": {"type": "thinking_delta", "thinking": w}}
                     for w in re.findall(r"\S+\s*", text)),
                   {"type": "content_block_delta", "index": i, "delta": {"type": "signature_delta", "signature": signature}},
                   {"type": "content_block_stop", "index": i}]
    events += CLAUDE_THINKING[-5:]
    raw = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)
    pivot = claude.stream(MODEL).feed(raw, True)
    if scanned:
        guard = ResponseGuard(POLICY, POLICY._params["enforce"], "t", in_order=True)
        pivot = b"".join(guard.sse_event(e + b"\n\n") for e in pivot.split(b"\n\n") if e)
    final = sdk_final_message(ToMessagesStream().feed(pivot, True))
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {"type": "thinking", "thinking": "", "signature": "c2ln"},
        {"type": "thinking", "thinking": texts[0], "signature": "c2lnLW9uZQ=="},
        {"type": "thinking", "thinking": texts[1], "signature": "c2lnLXR3bw=="},
        {"type": "text", "text": "42."}]


def test_a_signature_in_pieces_of_one_thinking_block_is_joined() -> None:
    """`thinking_blocks` entries of one `index` are one block's (its signature in pieces, as a
    provider may stream it): the anthropic client gets the whole signature, not its last piece."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "model": "m", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"
    raw = b"".join([chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Let me think."}),
                    *(chunk({"thinking_blocks": [{"index": 0, "type": "thinking", "thinking": "", "signature": p}]})
                      for p in ("c2ln", "LW9uZQ==")),
                    chunk({"content": "42."}), chunk({}, "stop"), b"data: [DONE]\n\n"])
    final = sdk_final_message(ToMessagesStream().feed(raw, True))
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "c2lnLW9uZQ=="}, {"type": "text", "text": "42."}]
