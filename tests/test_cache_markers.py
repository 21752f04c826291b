"""Prompt-cache markers (`cache_control`) across the pivot, without gRPC: the request contract
(api.check_cache_control, at most four), an Anthropic client's markers on the chat pivot
(messages.to_chat), and both back in place for a Claude backend (Anthropic Messages) and as
`cachePoint` blocks for a Converse one. The shapes are Anthropic's prompt caching guide and
the Converse API reference (CachePointBlock: `type: default`, optional `ttl` 5m | 1h)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway_extproc import api
from gateway_extproc.errors import GatewayError
from gateway_extproc.messages import to_chat
from gateway_extproc.providers import anthropic, bedrock
from gateway_extproc.providers.base import Target

EPHEMERAL = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}
CLAUDE = Target(model="claude-sonnet-4-5", base_url="https://api.anthropic.com/v1", base_path="/v1",
                host="api.anthropic.com", credential="sk-ant-test")
CONVERSE = Target(model="anthropic.claude-sonnet-4-5-v1:0", base_url="https://bedrock-runtime.us-east-1.amazonaws.com",
                  base_path="", host="bedrock-runtime.us-east-1.amazonaws.com", credential="AKID:SECRET",
                  options={"region": "us-east-1"})
SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}}
PNG = "data:image/png;base64,iVBORw0KGgo="

# An Anthropic client's request with a marker on every kind of block that takes one.
MESSAGES_REQUEST: dict[str, Any] = {
    "model": "claude-chat", "max_tokens": 64,
    "system": [{"type": "text", "text": "You review code."},
               {"type": "text", "text": "<guide>...</guide>", "cache_control": HOUR}],
    "tools": [{"name": "get_weather", "input_schema": SCHEMA, "cache_control": EPHEMERAL}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"location": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 C",
                                      "cache_control": {"type": "ephemeral", "ttl": "5m"}},
                                     {"type": "text", "text": "And now?"}]}]}


def claude_body(chat: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(anthropic.request(CLAUDE, "/chat/completions", chat, False).body)


def converse_body(chat: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(bedrock.request(CONVERSE, "/chat/completions", chat, False).body)


# -- the contract ------------------------------------------------------------------------

def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("marker", [EPHEMERAL, HOUR, {"type": "ephemeral", "ttl": "5m"}])
def test_markers_anthropic_takes_pass(marker: dict[str, Any]) -> None:
    api.CHAT.validate(chat(
        messages=[{"role": "system", "content": [{"type": "text", "text": "s", "cache_control": marker}]},
                  {"role": "user", "content": "hi", "cache_control": marker},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"},
                       "cache_control": marker}]}],
        tools=[{"type": "function", "function": {"name": "f"}, "cache_control": marker}]))


@pytest.mark.parametrize("marker", [None, "ephemeral", {}, {"type": "persistent"}, {"type": "ephemeral", "ttl": "2h"},
                                    {"type": "ephemeral", "ttl": None}, {"type": "ephemeral", "ttl": 3600},
                                    {"type": "ephemeral", "scope": "org"}, [EPHEMERAL]])
@pytest.mark.parametrize("where, param", [
    (lambda m: chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": m}]}]),
     "messages[0].content[0].cache_control"),
    (lambda m: chat(messages=[{"role": "user", "content": "x"}, {"role": "user", "content": "y", "cache_control": m}]),
     "messages[1].cache_control"),
    (lambda m: chat(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}, "cache_control": m}]}]),
     "messages[0].tool_calls[0].cache_control"),
    (lambda m: chat(tools=[{"type": "function", "function": {"name": "f"}}, {"type": "function",
                                                                           "function": {"name": "g"},
                                                                           "cache_control": m}]),
     "tools[1].cache_control")])
def test_a_marker_of_another_shape_is_refused_by_its_path(marker: Any, where: Any, param: str) -> None:
    with pytest.raises(GatewayError) as err:
        api.CHAT.validate(where(marker))
    assert (err.value.code, err.value.status, err.value.param) == ("invalid_request", 400, param)
    assert '"ephemeral"' in err.value.message


def test_a_fifth_marker_is_refused_naming_it() -> None:
    part = {"type": "text", "text": "x", "cache_control": EPHEMERAL}
    four = chat(messages=[{"role": "user", "content": [part, part, part, part]}])
    api.CHAT.validate(four)
    with pytest.raises(GatewayError) as err:
        api.CHAT.validate({**four, "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": HOUR}]})
    assert (err.value.code, err.value.param) == ("invalid_request", "tools[0].cache_control")
    assert "at most 4" in err.value.message


# -- an Anthropic client on the pivot ----------------------------------------------------

def test_an_anthropic_clients_markers_stay_on_their_blocks_in_the_pivot() -> None:
    pivot = to_chat(MESSAGES_REQUEST)
    api.CHAT.validate(pivot)
    assert pivot["messages"][0] == {"role": "system", "content": [
        {"type": "text", "text": "You review code."},
        {"type": "text", "text": "<guide>...</guide>", "cache_control": HOUR}]}
    assert pivot["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA},
                               "cache_control": EPHEMERAL}]
    assert pivot["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "15 C",
                                    "cache_control": {"type": "ephemeral", "ttl": "5m"}}
    assert pivot["messages"][4] == {"role": "user", "content": "And now?"}  # unmarked: a string, as before


def test_an_anthropic_clients_marked_image_tool_use_and_tool_result_text() -> None:
    pivot = to_chat({"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "iVBORw0KGgo="}, "cache_control": HOUR}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {},
                                           "cache_control": EPHEMERAL}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": EPHEMERAL}]}]}]})
    assert pivot["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": PNG}, "cache_control": HOUR}]
    assert pivot["messages"][1]["tool_calls"][0]["cache_control"] == EPHEMERAL
    assert pivot["messages"][2]["content"] == [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b", "cache_control": EPHEMERAL}]


@pytest.mark.parametrize("body, param", [
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1d"}}]},
     "system.0.cache_control"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": True}]}]},
     "messages.0.content.0.cache_control"),
    ({"tools": [{"name": "f", "input_schema": SCHEMA, "cache_control": {"type": "auto"}}]}, "tools.0.cache_control"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": EPHEMERAL}] * 5}]},
     "messages.0.content.4.cache_control")])
def test_an_anthropic_clients_bad_marker_is_named_in_its_own_terms(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as err:
        to_chat({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], **body})
    assert (err.value.code, err.value.param) == ("invalid_request", param)


# -- back in place for Claude --------------------------------------------------------------

def test_a_claude_backend_gets_an_anthropic_clients_markers_where_it_put_them() -> None:
    sent = claude_body(to_chat(MESSAGES_REQUEST))
    assert sent["system"] == MESSAGES_REQUEST["system"]
    assert sent["tools"] == [{"name": "get_weather", "input_schema": SCHEMA, "cache_control": EPHEMERAL}]
    assert sent["messages"][1:] == [
        MESSAGES_REQUEST["messages"][1],
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 C",
                                      "cache_control": {"type": "ephemeral", "ttl": "5m"}},
                                     {"type": "text", "text": "And now?"}]}]


def test_a_claude_backend_gets_an_openai_clients_markers() -> None:
    sent = claude_body(chat(
        messages=[{"role": "system", "content": "Be brief.", "cache_control": HOUR},
                  {"role": "user", "content": [{"type": "text", "text": "doc", "cache_control": EPHEMERAL},
                                               {"type": "image_url", "image_url": {"url": PNG},
                                                "cache_control": EPHEMERAL},
                                               {"type": "text", "text": "Summarise."}]},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"},
                       "cache_control": EPHEMERAL}]},
                  {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "ok",
                                                                      "cache_control": HOUR}]}],
        tools=[{"type": "function", "function": {"name": "f"}, "cache_control": EPHEMERAL}]))
    assert sent["system"] == [{"type": "text", "text": "Be brief.", "cache_control": HOUR}]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "doc", "cache_control": EPHEMERAL},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
         "cache_control": EPHEMERAL},
        {"type": "text", "text": "Summarise."}]
    assert sent["messages"][1]["content"][0]["cache_control"] == EPHEMERAL
    assert sent["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "c", "content": [
        {"type": "text", "text": "ok", "cache_control": HOUR}]}]
    assert sent["tools"][0]["cache_control"] == EPHEMERAL


def test_an_unmarked_request_reaches_claude_as_before() -> None:
    sent = claude_body(chat(messages=[{"role": "system", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]},
                                      {"role": "user", "content": "hi"}]))
    assert sent["system"] == "a\n\nb" and "cache_control" not in str(sent)


# -- cachePoint blocks for Converse -----------------------------------------------------------

def test_a_converse_backend_gets_a_cache_point_after_each_marked_block() -> None:
    sent = converse_body(to_chat(MESSAGES_REQUEST))
    assert sent["system"] == [{"text": "You review code."}, {"text": "<guide>...</guide>"},
                              {"cachePoint": {"type": "default", "ttl": "1h"}}]
    assert sent["toolConfig"]["tools"] == [
        {"toolSpec": {"name": "get_weather", "inputSchema": {"json": SCHEMA}}}, {"cachePoint": {"type": "default"}}]
    assert sent["messages"][2] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "toolu_1", "content": [{"text": "15 C"}]}},
        {"cachePoint": {"type": "default", "ttl": "5m"}}, {"text": "And now?"}]}


def test_converse_cache_points_for_an_openai_clients_parts_calls_and_messages() -> None:
    point = {"cachePoint": {"type": "default"}}
    sent = converse_body(chat(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}, "cache_control": EPHEMERAL},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A dot.", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}, "cache_control": EPHEMERAL}]},
        {"role": "tool", "tool_call_id": "c", "content": "done"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks", "cache_control": EPHEMERAL}],
         "cache_control": EPHEMERAL}]))
    assert sent["messages"][0]["content"] == [
        {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}}, point, {"text": "What is it?"}]
    assert sent["messages"][1]["content"] == [{"text": "A dot."}, {"toolUse": {
        "toolUseId": "c", "name": "f", "input": {}}}, point]
    # the tool result and the marked user turn merge; one cachePoint after the marked text
    assert sent["messages"][2]["content"] == [{"toolResult": {"toolUseId": "c", "content": [{"text": "done"}]}},
                                              {"text": "Thanks"}, point]


def test_an_unmarked_request_reaches_converse_as_before() -> None:
    sent = converse_body(chat(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
                              tools=[{"type": "function", "function": {"name": "f"}}]))
    assert "cachePoint" not in str(sent)


# -- a top-level marker (OpenRouter's; Anthropic's automatic caching) ----------------------
# Anthropic's Messages API takes `cache_control` at the top level too: the breakpoint goes on
# the last cacheable block, and moves on as the conversation grows. OpenRouter takes it on chat
# requests for Claude. Claude and Converse backends get it as a marker on the last block of
# the last turn (the same breakpoint, in the form every Anthropic-compatible server and
# Converse take); OpenAI-schema backends the body as sent, as with the other markers.

def test_a_top_level_marker_is_checked_and_counts_among_the_four() -> None:
    api.CHAT.validate(chat(cache_control=EPHEMERAL))
    api.CHAT.validate(chat(cache_control=HOUR))
    with pytest.raises(GatewayError) as err:
        api.CHAT.validate(chat(cache_control={"type": "ephemeral", "ttl": "2h"}))
    assert (err.value.code, err.value.param) == ("invalid_request", "cache_control")
    part = {"type": "text", "text": "x", "cache_control": EPHEMERAL}
    four = chat(messages=[{"role": "user", "content": [part, part, part, part]}])
    with pytest.raises(GatewayError) as err:
        api.CHAT.validate({**four, "cache_control": EPHEMERAL})
    assert (err.value.code, err.value.param) == ("invalid_request", "cache_control")
    assert "at most 4" in err.value.message


def test_an_anthropic_clients_top_level_marker_rides_on_the_pivot() -> None:
    request = {"model": "m", "max_tokens": 1, "cache_control": HOUR, "messages": [{"role": "user", "content": "x"}]}
    pivot = to_chat(request)
    assert pivot["cache_control"] == HOUR
    api.CHAT.validate(pivot)
    with pytest.raises(GatewayError) as err:
        to_chat({**request, "cache_control": {"type": "ephemeral", "ttl": "1d"}})
    assert (err.value.code, err.value.param) == ("invalid_request", "cache_control")
    from gateway_extproc.messages import drop_cache_markers
    drop_cache_markers(pivot)
    assert "cache_control" not in pivot


def test_a_claude_backend_gets_a_top_level_marker_on_the_last_block() -> None:
    sent = claude_body(chat(cache_control=EPHEMERAL, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "doc"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Summarise."}]))
    assert "cache_control" not in sent and sent["system"] == "Be brief."
    assert sent["messages"][:2] == [{"role": "user", "content": [{"type": "text", "text": "doc"}]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    assert sent["messages"][2]["content"] == [{"type": "text", "text": "Summarise.", "cache_control": EPHEMERAL}]


def test_a_claude_backend_keeps_the_last_blocks_own_marker_and_marks_a_tool_result() -> None:
    sent = claude_body(chat(cache_control=HOUR, messages=[
        {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPHEMERAL}]}]))
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "a", "cache_control": EPHEMERAL}]
    sent = claude_body(chat(cache_control=HOUR, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "15 C"}]))
    assert sent["messages"][-1]["content"] == [{"type": "tool_result", "tool_use_id": "c", "content": "15 C",
                                                "cache_control": HOUR}]


def test_an_anthropic_clients_top_level_marker_reaches_claude_on_the_last_block() -> None:
    sent = claude_body(to_chat({**MESSAGES_REQUEST, "system": "s", "tools": [], "cache_control": EPHEMERAL}))
    assert sent["messages"][-1]["content"][-1] == {"type": "text", "text": "And now?", "cache_control": EPHEMERAL}


def test_a_converse_backend_gets_a_top_level_marker_as_a_cache_point_after_the_last_block() -> None:
    sent = converse_body(chat(cache_control=HOUR, messages=[
        {"role": "system", "content": "s"}, {"role": "user", "content": "doc"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Summarise."}]))
    assert sent["system"] == [{"text": "s"}] and "cachePoint" not in str(sent["messages"][:2])
    assert sent["messages"][2]["content"] == [{"text": "Summarise."}, {"cachePoint": {"type": "default", "ttl": "1h"}}]
    # the last block marked already: one cachePoint, its own
    sent = converse_body(chat(cache_control=HOUR, messages=[
        {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPHEMERAL}]}]))
    assert sent["messages"][0]["content"] == [{"text": "a"}, {"cachePoint": {"type": "default"}}]


def test_a_top_level_marker_goes_to_an_openai_schema_backend_as_sent() -> None:
    from gateway_extproc.providers import openai as openai_provider

    body = chat(cache_control=EPHEMERAL)
    target = Target(model="gpt-x", base_url="https://api.openai.com/v1", base_path="/v1", host="api.openai.com",
                    credential="sk-test")
    sent = orjson.loads(openai_provider.request(target, "/chat/completions", body, False).body)
    assert sent["cache_control"] == EPHEMERAL
