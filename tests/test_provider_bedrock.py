"""Golden tests for the Bedrock translator (OpenAI chat <-> Converse / ConverseStream).

The Converse shapes come from AWS's documented examples ("Call a tool with the Converse
API", Bedrock User Guide: the `top_song` tool, its toolUse response and the final answer;
ConverseStreamOutput for the event names). SigV4 and event-stream framing are checked
against botocore, which the runtime code must not import."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway_extproc.errors import GatewayError
from gateway_extproc.providers import bedrock, eventstream, sigv4
from gateway_extproc.providers.base import Target

AK, SK, TOKEN = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "FQoGZXIvYXdzEXAMPLETOKEN+/="
NOW = datetime(2024, 7, 1, 12, 34, 56, tzinfo=timezone.utc)
CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"

# AWS docs, "Call a tool with the Converse API", step 1: the tool definition and message.
TOP_SONG_TOOL_CONFIG = {"tools": [{"toolSpec": {
    "name": "top_song",
    "description": "Get the most popular song played on a radio station.",
    "inputSchema": {"json": {
        "type": "object",
        "properties": {"sign": {"type": "string", "description": (
            "The call sign for the radio station for which you want the most popular song. "
            "Example calls signs are WZPZ and WKRP.")}},
        "required": ["sign"]}}}}]}
OPENAI_TOOLS = [{"type": "function", "function": {
    "name": spec["toolSpec"]["name"], "description": spec["toolSpec"]["description"],
    "parameters": spec["toolSpec"]["inputSchema"]["json"]}} for spec in TOP_SONG_TOOL_CONFIG["tools"]]
QUESTION = "What is the most popular song on WZPZ?"
TOOL_USE_ID = "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
# Step 2: the model's documented answer, asking for the tool.
TOOL_USE_RESPONSE = {
    "output": {"message": {"role": "assistant", "content": [
        {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "top_song", "input": {"sign": "WZPZ"}}}]}},
    "stopReason": "tool_use",
    "usage": {"inputTokens": 375, "outputTokens": 56, "totalTokens": 431},
    "metrics": {"latencyMs": 1345},
}
FINAL_TEXT = "The most popular song on WZPZ is Elemental Hotel by 8 Storey Hike."
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n0000").decode()


def target(model: str = CLAUDE, credential: str = f"{AK}:{SK}",
           base_url: str = "https://bedrock-runtime.us-east-1.amazonaws.com",
           options: dict[str, str] | None = None) -> Target:
    scheme_less = base_url.split("://", 1)[1]
    host, _, path = scheme_less.partition("/")
    return Target(model=model, base_url=base_url, base_path=("/" + path).rstrip("/"), host=host,
                  credential=credential, options={"region": "us-east-1"} if options is None else options)


def botocore_authorization(monkeypatch: pytest.MonkeyPatch, url: str, headers: dict[str, str],
                           body: bytes, token: str | None, service: str = "bedrock",
                           region: str = "us-east-1", now: datetime = NOW) -> dict[str, str]:
    """The headers botocore's SigV4Auth adds to the same request at the same instant."""
    monkeypatch.setattr("botocore.auth.get_current_datetime",
                        lambda *a, **k: now.astimezone(timezone.utc).replace(tzinfo=None))
    req = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    SigV4Auth(Credentials(AK, SK, token), service, region).add_auth(req)
    return {k.lower(): v for k, v in req.headers.items() if k.lower() not in headers}


# --- SigV4 -----------------------------------------------------------------------------

def test_sigv4_matches_aws_test_suite_get_vanilla() -> None:
    """AWS SigV4 test suite, get-vanilla (same credentials, instant and expected signature)."""
    added = sigv4.sign("GET", "example.amazonaws.com", "/", "", {}, b"", access_key=AK, secret_key=SK,
                       session_token=None, region="us-east-1", service="service",
                       now=datetime(2015, 8, 30, 12, 36, 0))
    assert added == {
        "x-amz-date": "20150830T123600Z",
        "authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                         "SignedHeaders=host;x-amz-date, "
                         "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"}


@pytest.mark.parametrize("model", [CLAUDE, "amazon.nova-lite-v1:0", "meta.llama3-8b-instruct-v1",
                                   "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.x:0"])
@pytest.mark.parametrize("token", [None, TOKEN])
@pytest.mark.parametrize("base_url", ["https://bedrock-runtime.us-east-1.amazonaws.com",
                                      "http://127.0.0.1:4566"])
@pytest.mark.parametrize("stream", [False, True])
def test_request_signature_is_botocores(monkeypatch: pytest.MonkeyPatch, model: str, token: str | None,
                                        base_url: str, stream: bool) -> None:
    credential = f"{AK}:{SK}" + (f":{token}" if token else "")
    out = bedrock.request(target(model, credential, base_url), "/chat/completions",
                          {"messages": [{"role": "user", "content": QUESTION}]}, stream, now=NOW)
    expected = botocore_authorization(monkeypatch, base_url + out.path,
                                      {"content-type": "application/json"}, out.body, token)
    assert expected.pop("x-amz-security-token", None) == token
    assert out.headers.get("x-amz-security-token") == token
    assert {k: out.headers[k] for k in expected} == expected
    assert "x-amz-content-sha256" not in out.headers


def test_sigv4_canonical_uri_and_query_match_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dot segments, empty segments, an encoded ':' and a query string, as botocore signs them."""
    path, query = "/a/./b/../model//x%3Ay/converse/", "b=2&a=1&a=0"
    headers = {"content-type": "application/json", "x-custom": "  two   spaces "}
    expected = botocore_authorization(monkeypatch, f"https://h.example{path}?{query}", headers, b"{}",
                                      TOKEN, service="svc", region="eu-west-3")
    added = sigv4.sign("POST", "h.example", path, query, headers, b"{}", access_key=AK, secret_key=SK,
                       session_token=TOKEN, region="eu-west-3", service="svc", now=NOW)
    assert added == expected


# --- request ---------------------------------------------------------------------------

def test_request_documented_tool_call_with_forced_tool() -> None:
    out = bedrock.request(target(), "/chat/completions", {
        "model": "claude", "messages": [{"role": "system", "content": "You are a radio DJ."},
                                        {"role": "user", "content": QUESTION}],
        "tools": OPENAI_TOOLS, "tool_choice": {"type": "function", "function": {"name": "top_song"}},
        "max_tokens": 512, "temperature": 0.5, "top_p": 0.9, "stop": "END"}, False, now=NOW)
    assert out.path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert orjson.loads(out.body) == {
        "messages": [{"role": "user", "content": [{"text": QUESTION}]}],
        "system": [{"text": "You are a radio DJ."}],
        "inferenceConfig": {"maxTokens": 512, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]},
        # Step 1's toolConfig plus its documented forced choice {"tool": {"name": "top_song"}}.
        "toolConfig": {**TOP_SONG_TOOL_CONFIG, "toolChoice": {"tool": {"name": "top_song"}}},
    }
    assert set(out.headers) == {"content-type", "accept", "x-amz-date", "authorization"}
    assert out.headers["content-type"] == out.headers["accept"] == "application/json"
    assert out.headers["x-amz-date"] == "20240701T123456Z"
    assert out.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={AK}/20240701/us-east-1/bedrock/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, Signature=")
    assert out.remove == ("x-api-key",)


def test_request_documented_tool_result_turn_merges_roles() -> None:
    """Step 3 of the doc: the assistant's toolUse, then the tool result as a user turn;
    consecutive user content (tool result + a follow-up) lands in one Converse message."""
    out = bedrock.request(target(base_url="https://bedrock-runtime.us-east-1.amazonaws.com/base"),
                          "/chat/completions", {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None, "tool_calls": [{"id": TOOL_USE_ID, "type": "function",
             "function": {"name": "top_song", "arguments": "{\"sign\": \"WZPZ\"}"}}]},
            {"role": "tool", "tool_call_id": TOOL_USE_ID,
             "content": "{\"song\": \"Elemental Hotel\", \"artist\": \"8 Storey Hike\"}"},
            {"role": "user", "content": [{"type": "text", "text": "And this cover?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        ],
        "tools": OPENAI_TOOLS, "tool_choice": "required", "max_completion_tokens": 100, "max_tokens": 5,
    }, True, now=NOW)
    assert out.path == "/base/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream"
    assert out.headers["accept"] == "application/vnd.amazon.eventstream"
    assert orjson.loads(out.body) == {
        "system": [{"text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [{"text": QUESTION}]},
            {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "top_song", "input": {"sign": "WZPZ"}}}]},
            {"role": "user", "content": [
                {"toolResult": {"toolUseId": TOOL_USE_ID, "content": [
                    {"text": "{\"song\": \"Elemental Hotel\", \"artist\": \"8 Storey Hike\"}"}]}},
                {"text": "And this cover?"},
                {"image": {"format": "png", "source": {"bytes": PNG}}}]},
        ],
        "inferenceConfig": {"maxTokens": 100},
        "toolConfig": {**TOP_SONG_TOOL_CONFIG, "toolChoice": {"any": {}}},
    }


@pytest.mark.parametrize(("choice", "with_history", "expected"), [
    ("auto", False, {**TOP_SONG_TOOL_CONFIG, "toolChoice": {"auto": {}}}),
    (None, False, TOP_SONG_TOOL_CONFIG),
    ("none", False, None),
    ("none", True, TOP_SONG_TOOL_CONFIG),
])
def test_request_tool_choice(choice: str | None, with_history: bool, expected: dict[str, Any] | None) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
    if with_history:
        messages += [{"role": "assistant", "tool_calls": [{"id": TOOL_USE_ID, "type": "function",
                      "function": {"name": "top_song", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": TOOL_USE_ID, "content": "no data"}]
    body: dict[str, Any] = {"messages": messages, "tools": OPENAI_TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    sent = orjson.loads(bedrock.request(target(), "/chat/completions", body, False, now=NOW).body)
    assert sent.get("toolConfig") == expected


@pytest.mark.parametrize(("credential", "options"), [
    ("AKIDONLY", {"region": "us-east-1"}), (f":{SK}", {"region": "us-east-1"}), (f"{AK}:", {"region": "us-east-1"}),
    (f"{AK}:{SK}", {})])
def test_request_bad_credential_or_region(credential: str, options: dict[str, str]) -> None:
    with pytest.raises(GatewayError) as err:
        bedrock.request(target(credential=credential, options=options), "/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}]}, False, now=NOW)
    assert err.value.code == "provider_credential_missing"
    assert SK not in err.value.message and SK not in err.value.body().decode()


def test_request_unsupported_endpoint() -> None:
    with pytest.raises(GatewayError) as err:
        bedrock.request(target(), "/embeddings", {"input": "x"}, False, now=NOW)
    assert err.value.code == "unsupported_endpoint"


@pytest.mark.parametrize(("message", "fragment"), [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}]},
     "data: URLs"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/bmp;base64,{PNG}"}}]},
     "png, jpeg"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]},
     "base64"),
    ({"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
                                           "function": {"name": "f", "arguments": "{oops"}}]}, "JSON"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "input_audio"),
    ("just a string", "object"),
])
def test_request_rejects_what_converse_cannot_take(message: Any, fragment: str) -> None:
    with pytest.raises(GatewayError) as err:
        bedrock.request(target(), "/chat/completions", {"messages": [message]}, False, now=NOW)
    assert err.value.code == "invalid_request" and fragment in err.value.message
    assert err.value.param == "messages[0]"


# --- response --------------------------------------------------------------------------

def _completion(raw: bytes) -> dict[str, Any]:
    parsed = orjson.loads(raw)
    ChatCompletion.model_validate(parsed)
    assert parsed.pop("id").startswith("chatcmpl-") and isinstance(parsed.pop("created"), int)
    return parsed


def test_response_documented_tool_use() -> None:
    assert _completion(bedrock.response(200, orjson.dumps(TOOL_USE_RESPONSE), "claude")) == {
        "object": "chat.completion", "model": "claude",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{"id": TOOL_USE_ID, "type": "function",
                                                                   "function": {"name": "top_song",
                                                                                "arguments": "{\"sign\":\"WZPZ\"}"}}]}}],
        "usage": {"prompt_tokens": 375, "completion_tokens": 56, "total_tokens": 431,
                  "prompt_tokens_details": {"cached_tokens": 0, "cache_creation_tokens": 0}},
    }


def test_response_documented_final_answer_with_cache_usage() -> None:
    raw = orjson.dumps({
        "output": {"message": {"role": "assistant", "content": [
            {"reasoningContent": {"reasoningText": {"text": "thinking"}}}, {"text": FINAL_TEXT}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 10, "outputTokens": 20, "totalTokens": 330,
                  "cacheReadInputTokens": 200, "cacheWriteInputTokens": 100},
        "metrics": {"latencyMs": 100}})
    assert _completion(bedrock.response(200, raw, "m")) == {
        "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": FINAL_TEXT,
                                                                      "reasoning_content": "thinking"}}],
        "usage": {"prompt_tokens": 310, "completion_tokens": 20, "total_tokens": 330,
                  "prompt_tokens_details": {"cached_tokens": 200, "cache_creation_tokens": 100}},
    }


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "stop"),  # without a toolUse block: base.finish_with_calls
    ("guardrail_intervened", "content_filter"), ("content_filtered", "content_filter")])
def test_response_finish_reasons(stop_reason: str, finish: str) -> None:
    raw = orjson.dumps({"output": {"message": {"role": "assistant", "content": [{"text": "x"}]}},
                        "stopReason": stop_reason, "usage": {"inputTokens": 1, "outputTokens": 1}})
    assert orjson.loads(bedrock.response(200, raw, "m"))["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize(("status", "raw", "kind", "message"), [
    (400, b'{"message":"Malformed input request, please reformat your input and try again."}',
     "invalid_request_error", "Malformed input request, please reformat your input and try again."),
    (403, b'{"Message":"User is not authorized to perform: bedrock:InvokeModel"}',
     "permission_error", "User is not authorized to perform: bedrock:InvokeModel"),
    (429, b'{"message":"Too many requests, please wait before trying again."}',
     "rate_limit_error", "Too many requests, please wait before trying again."),
    (503, b"<html>Service Unavailable</html>", "server_error", "Bedrock returned HTTP 503"),
    (200, b'{"output": {}}', "server_error", "Bedrock returned a malformed Converse response"),
])
def test_response_errors(status: int, raw: bytes, kind: str, message: str) -> None:
    assert orjson.loads(bedrock.response(status, raw, "m")) == {
        "error": {"message": message, "type": kind, "code": "provider_error", "param": None}}


# --- stream ----------------------------------------------------------------------------

def event(kind: str, payload: dict[str, Any]) -> bytes:
    return eventstream.encode({":event-type": kind, ":content-type": "application/json",
                               ":message-type": "event"}, orjson.dumps(payload))


def exception(kind: str, message: str) -> bytes:
    return eventstream.encode({":exception-type": kind, ":content-type": "application/json",
                               ":message-type": "exception"}, orjson.dumps({"message": message}))


# The documented tool-use turn streamed: text, then the top_song call split in two deltas.
TOOL_STREAM = [
    event("messageStart", {"role": "assistant"}),
    event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Let me check. "}, "p": "abcd"}),
    event("contentBlockStop", {"contentBlockIndex": 0}),
    event("contentBlockStart", {"contentBlockIndex": 1, "start": {"toolUse": {
        "toolUseId": TOOL_USE_ID, "name": "top_song"}}}),
    event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "{\"sign\": "}}}),
    event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "\"WZPZ\"}"}}}),
    event("contentBlockStop", {"contentBlockIndex": 1}),
    event("messageStop", {"stopReason": "tool_use"}),
    event("metadata", {"usage": {"inputTokens": 375, "outputTokens": 56, "totalTokens": 431,
                                 "cacheReadInputTokens": 5},
                       "metrics": {"latencyMs": 1345}}),
]


def sse(out: bytes) -> list[Any]:
    """SSE data payloads; chunks validated against the OpenAI SDK, id/created checked and dropped."""
    assert out.endswith(b"\n\n")
    events: list[Any] = []
    for block in out[:-2].split(b"\n\n"):
        assert block.startswith(b"data: ")
        data = block[6:]
        if data == b"[DONE]":
            events.append("[DONE]")
            continue
        parsed = orjson.loads(data)
        if "error" not in parsed:
            ChatCompletionChunk.model_validate(parsed)
            assert parsed.pop("id").startswith("chatcmpl-") and isinstance(parsed.pop("created"), int)
            assert parsed.pop("object") == "chat.completion.chunk" and parsed.pop("model") == "claude"
        events.append(parsed)
    return events


def feed_bytewise(raw: bytes) -> bytes:
    translator = bedrock.stream("claude")
    return b"".join(translator.feed(raw[i:i + 1], i == len(raw) - 1) for i in range(len(raw)))


def test_stream_documented_tool_use_turn() -> None:
    raw = b"".join(TOOL_STREAM)
    whole = bedrock.stream("claude").feed(raw, True)
    expected = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Let me check. "}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": TOOL_USE_ID, "type": "function",
                                                             "function": {"name": "top_song", "arguments": ""}}]},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"sign\": "}}]},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"WZPZ\"}"}}]},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 380, "completion_tokens": 56, "total_tokens": 436,
                                  "prompt_tokens_details": {"cached_tokens": 5, "cache_creation_tokens": 0}}},
        "[DONE]",
    ]
    assert sse(whole) == expected
    assert sse(feed_bytewise(raw)) == expected


def test_stream_returns_nothing_until_an_event_is_complete() -> None:
    translator = bedrock.stream("claude")
    first = TOOL_STREAM[0]
    assert translator.feed(first[:-1], False) == b""
    assert sse(translator.feed(first[-1:], False))[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert translator.feed(TOOL_STREAM[2], False) == b""  # contentBlockStop says nothing


def test_stream_ids_are_stable_within_a_stream() -> None:
    out = bedrock.stream("claude").feed(b"".join(TOOL_STREAM), True)
    ids = {orjson.loads(b[6:])["id"] for b in out.split(b"\n\n") if b.startswith(b"data: {")}
    assert len(ids) == 1


@pytest.mark.parametrize(("kind", "error_type"), [("throttlingException", "rate_limit_error"),
                                                  ("modelStreamErrorException", "server_error"),
                                                  ("validationException", "server_error")])
def test_stream_exception_event(kind: str, error_type: str) -> None:
    raw = TOOL_STREAM[0] + TOOL_STREAM[1] + exception(kind, "Too many tokens, please wait.") + TOOL_STREAM[7]
    expected = [{"error": {"message": "Too many tokens, please wait.", "type": error_type,
                           "code": "provider_error", "param": None}}]
    assert sse(bedrock.stream("claude").feed(raw, True))[2:] == expected
    assert sse(feed_bytewise(raw))[2:] == expected


def test_stream_corrupt_framing_is_an_error_event() -> None:
    corrupt = bytearray(TOOL_STREAM[1])
    corrupt[-1] ^= 0xFF  # message CRC
    translator = bedrock.stream("claude")
    out = translator.feed(TOOL_STREAM[0] + bytes(corrupt), False)
    assert sse(out)[1] == {"error": {"message": "Bedrock sent a malformed event stream", "type": "server_error",
                                     "code": "provider_error", "param": None}}
    assert translator.feed(b"".join(TOOL_STREAM[2:]), True) == b""  # nothing after the error
    assert translator.usage_unknown  # (the reservation: what came after the bad bytes is unknown)


def test_stream_protocol_error_message_is_an_error_event() -> None:
    """`:message-type: error` is event-stream's own error frame (codes in headers, no payload)."""
    raw = TOOL_STREAM[0] + eventstream.encode(
        {":message-type": "error", ":error-code": "InternalFailure", ":error-message": "stream broke"}, b"")
    assert sse(bedrock.stream("claude").feed(raw, True))[1:] == [
        {"error": {"message": "stream broke", "type": "server_error", "code": "provider_error", "param": None}}]


@pytest.mark.parametrize("raw", [b"".join(TOOL_STREAM[:7]), b"".join(TOOL_STREAM)[:-3]])
def test_stream_cut_short_is_an_error_event_without_done(raw: bytes) -> None:
    """... and its usage is unknown (the router charges the reservation: until 2026-12-08 ~one
    token an event, as for a stream that ended itself without usage)."""
    translator = bedrock.stream("claude")
    events = sse(translator.feed(raw, True))
    assert "[DONE]" not in events
    assert events[-1]["error"]["message"] == "Bedrock stream ended before the message was complete"
    assert translator.usage_unknown



def test_stream_without_metadata_still_finishes_cleanly() -> None:
    events = sse(bedrock.stream("claude").feed(b"".join(TOOL_STREAM[:8]), True))
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == "[DONE]"


def test_eventstream_encode_parses_with_botocore() -> None:
    buf = EventStreamBuffer()
    buf.add_data(b"".join(TOOL_STREAM) + exception("throttlingException", "slow down"))
    messages = list(buf)
    assert [m.headers[":event-type"] for m in messages[:-1]] == [
        "messageStart", "contentBlockDelta", "contentBlockStop", "contentBlockStart", "contentBlockDelta",
        "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"]
    assert messages[-1].headers == {":exception-type": "throttlingException", ":content-type": "application/json",
                                    ":message-type": "exception"}
    assert orjson.loads(messages[3].payload)["start"]["toolUse"]["name"] == "top_song"
    decoded = list(eventstream.Decoder().feed(b"".join(TOOL_STREAM)))
    assert [(h, p) for h, p in decoded] == [(m.headers, m.payload) for m in messages[:-1]]


def test_request_tool_without_description_and_gemini_call_ids() -> None:
    """Converse refuses description "" (minimum length 1) and ids outside [A-Za-z0-9_-]{1,64}:
    a Gemini thought signature riding in an OpenAI tool-call id stays behind."""
    long_id = "fc-1__thought__" + "A" * 200
    body = {"messages": [{"role": "user", "content": "time?"},
                         {"role": "assistant", "tool_calls": [{"id": long_id, "type": "function",
                                                               "function": {"name": "now", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": long_id, "content": "noon"}],
            "tools": [{"type": "function", "function": {"name": "now", "description": ""}}]}
    sent = orjson.loads(bedrock.request(target(), "/chat/completions", body, False, now=NOW).body)
    assert sent["toolConfig"]["tools"] == [{"toolSpec": {"name": "now", "inputSchema": {
        "json": {"type": "object", "properties": {}}}}}]
    assert sent["messages"][1]["content"][0]["toolUse"]["toolUseId"] == "fc-1"
    assert sent["messages"][2]["content"][0]["toolResult"]["toolUseId"] == "fc-1"


def test_cache_writes_by_ttl_from_cache_details() -> None:
    """Converse lists writes per TTL in `cacheDetails` (1h before 5m)."""
    def details(usage: dict[str, Any]) -> dict[str, Any]:
        raw = orjson.dumps({"output": {"message": {"role": "assistant", "content": [{"text": "hi"}]}},
                            "stopReason": "end_turn", "usage": {"inputTokens": 10, "outputTokens": 2, **usage}})
        return _completion(bedrock.response(200, raw, "m"))["usage"]["prompt_tokens_details"]

    assert details({"cacheWriteInputTokens": 300, "cacheDetails": [
        {"ttl": "1h", "inputTokens": 200}, {"ttl": "5m", "inputTokens": 100}]}) == {
        "cached_tokens": 0, "cache_creation_tokens": 300, "cache_creation_1h_tokens": 200}
    assert details({"cacheWriteInputTokens": 300, "cacheDetails": [{"ttl": "1h", "inputTokens": None}]}) == {
        "cached_tokens": 0, "cache_creation_tokens": 300, "cache_creation_1h_tokens": 300}
    assert details({"cacheWriteInputTokens": 300}) == {"cached_tokens": 0, "cache_creation_tokens": 300}


def test_claude_fields_reach_claude_on_bedrock_and_its_reasoning_comes_back() -> None:
    """top_k, thinking, a failed tool result, earlier signed reasoning and the user id reach
    Converse with their meaning (until 2026-12 all were dropped); reasoningContent comes back
    as the pivot's reasoning, signed, in JSON and in streams."""
    body = {"model": "m", "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024}, "user": "u-1",
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                          "thinking_blocks": [{"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                                              {"type": "redacted_thinking", "data": "ZW5j"}]},
                         {"role": "tool", "tool_call_id": "t1", "content": "boom", "is_error": True}]}
    sent = orjson.loads(bedrock.request(target(), "/chat/completions", body, False, now=NOW).body)
    assert sent["additionalModelRequestFields"] == {"top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert sent["requestMetadata"] == {"user_id": "u-1"}
    assert sent["messages"][1]["content"] == [
        {"reasoningContent": {"reasoningText": {"text": "hm", "signature": "c2ln"}}},
        {"reasoningContent": {"redactedContent": "ZW5j"}},
        {"toolUse": {"toolUseId": "t1", "name": "f", "input": {}}}]
    assert sent["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": "boom"}], "status": "error"}}]
    answer = {"output": {"message": {"role": "assistant", "content": [
        {"reasoningContent": {"reasoningText": {"text": "hm", "signature": "c2ln"}}}, {"text": "42"}]}},
        "stopReason": "end_turn", "usage": {"inputTokens": 3, "outputTokens": 4}}
    message = orjson.loads(bedrock.response(200, orjson.dumps(answer), "m"))["choices"][0]["message"]
    assert message["reasoning_content"] == "hm" and message["content"] == "42"
    assert message["thinking_blocks"] == [{"type": "thinking", "thinking": "hm", "signature": "c2ln"}]
    frames = [event("messageStart", {"role": "assistant"}),
              event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "hm"}}}),
              event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "c2ln"}}}),
              event("contentBlockStop", {"contentBlockIndex": 0}),
              event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "42"}}),
              event("messageStop", {"stopReason": "end_turn"})]
    out = bedrock.stream("m").feed(b"".join(frames), False)
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in out.split(b"\n\n") if e]
    assert deltas == [{"role": "assistant", "content": ""}, {"reasoning_content": "hm"},
                      {"thinking_blocks": [{"index": 0, "type": "thinking", "thinking": "", "signature": "c2ln"}]},
                      {"content": "42"}, {}]  # (the last: the finish reason's)


@pytest.mark.parametrize(("extra", "fields"), [
    ({"stopReason": "stop_sequence", "additionalModelResponseFields": {"stop_sequence": "###"}},
     {"native_finish_reason": "stop_sequence", "stop_reason": "###"}),
    ({"stopReason": "stop_sequence", "additionalModelResponseFields": "x"}, {"native_finish_reason": "stop_sequence"}),
    ({"stopReason": "model_context_window_exceeded"}, {"native_finish_reason": "model_context_window_exceeded"}),
    ({"stopReason": "end_turn"}, {})])
def test_a_stop_reason_finish_reason_says_less_about_is_carried_beside_it(extra: dict[str, Any],
                                                                         fields: dict[str, Any]) -> None:
    """So an Anthropic client gets Converse's stop_sequence (and the string matched) back."""
    raw = orjson.dumps({"output": {"message": {"role": "assistant", "content": [{"text": "x"}]}},
                        "usage": {"inputTokens": 1, "outputTokens": 1}, **extra})
    choice = orjson.loads(bedrock.response(200, raw, "m"))["choices"][0]
    assert {k: choice[k] for k in ("native_finish_reason", "stop_reason") if k in choice} == fields
