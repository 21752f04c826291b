"""No input makes a processor fail, past what test_router_processor's property test reaches.

1. The upstream (per-attempt) processor, fed the bodies the router admitted and forwarded,
   for every backend of values-local and of a fallback model whose attempts cross every
   provider kind: handle() never raises, and answers either a valid mutation (path,
   credential, body and a content-length that matches it) or a clear 4xx.
2. The router's stream path as a whole (provider translator -> usage tap -> output guard
   -> Anthropic-client translation), with replies cut at random boundaries, odd events,
   garbage, truncation and huge events, for every provider dialect and client kind: it
   never raises, the client gets well-formed SSE in its own dialect with at most one error
   event and nothing after it, and usage the provider sent is read.

tests/test_provider_properties.py covers the provider translators alone.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from gateway_extproc._proto.envoy.config.core.v3.base_pb2 import Metadata
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway_extproc import config
from gateway_extproc.processors import upstream
from gateway_extproc.providers import eventstream
from gateway_extproc.processors.router import RouterProcessor
from gateway_extproc.processors.upstream import UpstreamProcessor
from gateway_extproc.render import chart_values, render_values
from gateway_extproc.runtime import Runtime
from tests.extproc_messages import set_headers
from tests.test_provider_corpus import frame
from tests.test_router_processor import (_CHAOS, _EXTRA, _GOOD_MESSAGE, _JSON, _NEAR_VALID, _TEXT, LOCAL_KEY,
                                         req_body, req_headers, resp_body, resp_headers)

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"bedrock": "AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}
JSON = dict[str, Any]
CROSS = "cross-chat"  # a fallback model whose attempts go to every provider kind in turn


def _local_doc() -> dict[str, Any]:
    values = chart_values([ROOT / "helm" / "values-local.yaml"])
    doc: dict[str, Any] = yaml.safe_load(render_values(values)["gateway.yaml"])
    providers = {p["kind"]: p["name"] for p in reversed(doc["providers"])}  # first of each kind
    doc["models"].append({"name": CROSS, "tokenizer": "o200k_base", "backends": [
        {"provider": providers[kind], "model": f"{kind}-model", "priority": i, "maxTier": "internal",
         "pricing": {"input": 1, "output": 2}}
        for i, kind in enumerate(["anthropic", "bedrock", "gemini", "azure", "openai"])]})
    # Requests left without an answer are charged their reservation (docs/budgets.md): the
    # thousands generated here would spend values-local's $5 a day (and its tokens per
    # minute) and be refused.
    for team in doc["teams"]:
        team["budget"] = {**team["budget"], "daily": 10 ** 6, "monthly": 10 ** 6}
        team["rateLimits"] = {"requestsPerMinute": 10 ** 6, "tokensPerMinute": 10 ** 9}
    doc["budgets"]["orgLimit"] = {"daily": 10 ** 6}
    return doc


@pytest.fixture(scope="module")
def local_runtime() -> Runtime:
    """values-local plus CROSS, with a credential for every provider (the files it names do
    not exist in a test run)."""
    rt = Runtime.from_config(config.parse(_local_doc(), "values-local"))
    for name, provider in rt.config.providers.items():
        rt.credentials[name] = CREDENTIALS.get(provider.kind, f"sk-test-{name}-0123456789")
    return rt


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # any int, NaN and Infinity too (orjson refuses them)


async def _admit(rt: Runtime, path: str, body: bytes) -> tuple[RouterProcessor, ep.ProcessingResponse]:
    proc = RouterProcessor(rt)
    first = await proc.handle(req_headers(path=path, key=LOCAL_KEY))
    assert first.WhichOneof("response") == "request_headers"
    return proc, await proc.handle(req_body(body))


# -- 1. the upstream processor over what the router forwards ---------------------------------

_MODEL = st.sampled_from(["default-chat", "claude-chat", "gemini-chat", "azure-chat", "fallback-chat", CROSS])
_ODD = _JSON | st.integers(-3, 10**6) | st.text(max_size=10)
_TOOL = st.fixed_dictionaries({"type": st.just("function") | _ODD, "function": st.fixed_dictionaries(
    {"name": st.text(min_size=1, max_size=10) | _ODD},
    optional={"description": _TEXT | _ODD, "parameters": _JSON | st.just({"type": "object", "properties": {
        "a": {"type": "string"}}, "required": ["a"]}), "strict": _ODD}) | _ODD})
_CALL = st.fixed_dictionaries({"id": st.text(max_size=12) | _ODD, "type": st.just("function") | _ODD,
                               "function": st.fixed_dictionaries({"name": st.text(max_size=10) | _ODD,
                                                                  "arguments": st.just('{"a": "b"}') | _ODD}) | _ODD})
_PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT | _ODD}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.sampled_from(["https://x.example/a.png", "data:image/png;base64,iVBORw0KGgo=", "data:,",
                                 "data:image/png;base64", ""]) | _ODD}, optional={"detail": _ODD}) | _ODD}),
    st.fixed_dictionaries({"type": st.sampled_from(["input_audio", "file", "refusal", "x"]) | _ODD},
                          optional={"text": _ODD, "file": _ODD, "input_audio": _ODD, "refusal": _ODD}),
    _ODD)
_CONTENT = st.none() | _TEXT | st.lists(_PART, max_size=3)
_CHAT_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": _CONTENT},
                          optional={"name": _ODD}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": _CONTENT},
                          optional={"tool_calls": st.lists(_CALL, max_size=2) | _ODD, "refusal": _ODD,
                                    "function_call": _ODD}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": _CONTENT},
                          optional={"tool_call_id": st.text(max_size=12) | _ODD}),
    st.fixed_dictionaries({"role": st.sampled_from(["function", "x", ""]), "content": _CONTENT}),
)
_OPTIONS = st.fixed_dictionaries({}, optional={
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({}, optional={"include_usage": _ODD}),
    "max_tokens": st.integers(1, 10**6), "max_completion_tokens": st.integers(1, 10**6), "n": st.integers(1, 2),
    "temperature": _ODD, "top_p": _ODD, "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | _ODD,
    "user": _ODD, "seed": _ODD, "tools": st.lists(_TOOL, max_size=2) | _ODD,
    "tool_choice": st.sampled_from(["auto", "none", "required"]) | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=5)}) | _ODD}) | _ODD,
    "parallel_tool_calls": _ODD, "response_format": st.sampled_from([
        {"type": "json_object"}, {"type": "text"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}]) | st.fixed_dictionaries(
        {"type": st.just("json_schema") | _ODD, "json_schema": _ODD}) | _ODD,
    "reasoning_effort": _ODD, "logprobs": _ODD, "presence_penalty": _ODD, "frequency_penalty": _ODD,
    "metadata": _ODD, "modalities": _ODD, "extra": _ODD})
_RICH_CHAT = st.tuples(st.fixed_dictionaries({"model": _MODEL, "messages": st.lists(_CHAT_MESSAGE, min_size=1,
                                                                                       max_size=4)}),
                       _OPTIONS).map(lambda b: {**b[0], **b[1]})
# Anthropic-client bodies: the router translates them to chat before the upstream sees them.
_BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
    st.fixed_dictionaries({"type": st.just("image"), "source": st.fixed_dictionaries(
        {"type": st.sampled_from(["base64", "url"]), "media_type": st.just("image/png") | _ODD,
         "data": st.just("iVBORw0KGgo=") | _ODD, "url": st.just("https://x.example/a.png") | _ODD})}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.text(max_size=8) | _ODD,
                           "name": st.text(max_size=8) | _ODD, "input": _JSON}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.text(max_size=8) | _ODD,
                           "content": st.none() | _TEXT | st.lists(st.fixed_dictionaries(
                               {"type": st.just("text"), "text": _ODD}), max_size=2)}))
_ANTHROPIC = st.fixed_dictionaries(
    {"model": _MODEL, "max_tokens": st.integers(1, 4096), "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": _TEXT | st.lists(_BLOCK, max_size=3)}),
        min_size=1, max_size=4)},
    optional={"system": _TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
                                         max_size=2),
              "stream": st.booleans(), "stop_sequences": st.lists(st.text(max_size=5), max_size=2),
              "temperature": _ODD, "top_p": _ODD, "metadata": st.fixed_dictionaries({}, optional={"user_id": _ODD}),
              "tools": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8), "input_schema": _JSON},
                                                      optional={"description": _ODD}), max_size=2),
              "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none"])},
                                                   optional={"name": _ODD, "disable_parallel_tool_use": _ODD})})
_RESPONSES = st.fixed_dictionaries(
    {"model": st.sampled_from(["default-chat", "fallback-chat"]), "input": _TEXT | st.lists(
        _GOOD_MESSAGE | _JSON, min_size=1, max_size=3)},
    optional={"instructions": _TEXT, "stream": st.booleans(), "max_output_tokens": st.integers(1, 10**6),
              "tools": _JSON, "text": _JSON, "reasoning": _JSON})
_UPSTREAM_REQUEST = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _RICH_CHAT),
    st.tuples(st.just("/v1/chat/completions"), _CHAOS.map(lambda b: {**b, "model": CROSS})),
    st.tuples(st.just("/v1/messages"), _ANTHROPIC),
    st.tuples(st.just("/v1/responses"), _RESPONSES),
    st.tuples(st.just("/v1/embeddings"), _NEAR_VALID["/v1/embeddings"]),
    st.sampled_from(sorted(_NEAR_VALID)).flatmap(lambda path: st.tuples(st.just(path), st.tuples(
        _NEAR_VALID[path], _EXTRA).map(lambda b: {**b[0], **b[1]}))))


# Bodies the OpenAI schema allows (the Anthropic-client ones too, as the router translates
# them): every backend must translate them, not refuse them.
_ID = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=20)
_SCHEMA = st.sampled_from([{"type": "object", "properties": {}}, {"type": "object", "properties": {
    "city": {"type": "string", "description": "x"}, "n": {"type": "integer"}, "tags": {"type": "array", "items": {
        "type": "string", "enum": ["a", "b"]}}}, "required": ["city"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                       "b": {"$ref": "#/$defs/b"}}, "$defs": {"b": {"type": "number"}}}])
_VALID_TEXT = st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT})
_VALID_IMAGE = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.sampled_from(["https://x.example/a.png", "data:image/png;base64,iVBORw0KGgo="])},
    optional={"detail": st.sampled_from(["auto", "low", "high"])})})
_VALID_CALL = st.fixed_dictionaries({"id": _ID, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": _ID, "arguments": st.sampled_from(["{}", '{"city": "Paris"}', '{"a": [1, {"b": null}]}'])})})
_VALID_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]),
                           "content": _TEXT | st.lists(_VALID_TEXT, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": _TEXT | st.lists(_VALID_TEXT | _VALID_IMAGE,
                                                                                  min_size=1, max_size=3)},
                          optional={"name": _ID}),
    st.fixed_dictionaries({"role": st.just("assistant")}, optional={
        "content": st.none() | _TEXT | st.lists(_VALID_TEXT, min_size=1, max_size=2),
        "tool_calls": st.lists(_VALID_CALL, min_size=1, max_size=2), "refusal": st.none() | _TEXT}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": _ID,
                           "content": _TEXT | st.lists(_VALID_TEXT, min_size=1, max_size=2)}))
_VALID_TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": _ID}, optional={"description": _TEXT, "parameters": _SCHEMA, "strict": st.booleans()})})
_VALID_OPTIONS = st.fixed_dictionaries({}, optional={
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(1, 10**5), "max_completion_tokens": st.integers(1, 10**5), "n": st.just(1),
    "temperature": st.none() | st.floats(0, 2), "top_p": st.none() | st.floats(0, 1), "seed": st.none(),
    "stop": st.none() | st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=4),
    "user": st.none(), "tools": st.lists(_VALID_TOOL, min_size=1, max_size=2, unique_by=lambda t: t["function"]["name"]),
    "tool_choice": st.sampled_from(["auto", "none", "required"]), "parallel_tool_calls": st.just(True),
    # (What every backend kind carries: `seed`, `user`, penalties, JSON modes, parallel_tool_calls false
    # are refused up front for a model with a backend that has no place for them, fields.py.)
    "response_format": st.just({"type": "text"})})
_VALID_CHAT = st.tuples(st.fixed_dictionaries({"model": st.just(CROSS), "messages": st.lists(
    _VALID_MESSAGE, min_size=1, max_size=5)}), _VALID_OPTIONS).map(lambda b: {**b[0], **b[1]})
_VALID_ANTHROPIC = st.fixed_dictionaries(
    {"model": st.just(CROSS), "max_tokens": st.integers(1, 4096), "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": _TEXT | st.lists(st.fixed_dictionaries(
            {"type": st.just("text"), "text": _TEXT}), min_size=1, max_size=2)}), min_size=1, max_size=4)},
    optional={"system": _TEXT, "stream": st.booleans(), "stop_sequences": st.lists(st.text(min_size=1, max_size=5),
                                                                                    max_size=2),
              "temperature": st.floats(0, 1), "tools": st.lists(st.fixed_dictionaries(
                  {"name": _ID, "input_schema": _SCHEMA}), max_size=2, unique_by=lambda t: t["name"])})
_VALID_REQUEST = st.one_of(st.tuples(st.just("/v1/chat/completions"), _VALID_CHAT),
                           st.tuples(st.just("/v1/messages"), _VALID_ANTHROPIC))


def attempt_headers(backend: str, api: str, model: str) -> ep.ProcessingRequest:
    """request_headers as Envoy sends them to the upstream filter for one attempt."""
    req = ep.ProcessingRequest(request_headers=ep.HttpHeaders())
    attrs = struct_pb2.Struct()
    attrs.update({upstream.BACKEND_ATTRIBUTE: backend})
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    gw = struct_pb2.Struct()
    gw.update({"model": model, "api": api, "request_id": "req-fuzz"})
    req.metadata_context.CopyFrom(Metadata(filter_metadata={"gw": gw}))
    return req


async def _attempts(rt: Runtime, path: str, raw: bytes, valid: bool = False) -> None:
    proc, out = await _admit(rt, path, raw)
    proc.close()
    if out.WhichOneof("response") == "immediate_response":
        assert 400 <= out.immediate_response.status.code < 500 and not valid, out.immediate_response.body
        event(f"router refused: {orjson.loads(out.immediate_response.body)['error']['code']}")
        return
    common = out.request_body.response
    forwarded = common.body_mutation.body if common.HasField("body_mutation") else raw
    api = out.dynamic_metadata.fields["gw"].struct_value.fields["api"].string_value
    assert proc.model is not None
    for backend in proc.eligible:  # Envoy may send an attempt to any of them
        attempt = UpstreamProcessor(rt)
        try:
            first = await attempt.handle(attempt_headers(backend.id, api, proc.model.name))
            assert first.WhichOneof("response") == "request_headers", first
            resp = await attempt.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=forwarded,
                                                                                      end_of_stream=True)))
        finally:
            attempt.close()
        if resp.WhichOneof("response") == "immediate_response":
            imm = resp.immediate_response
            assert 400 <= imm.status.code < 500, (backend.id, imm.body)
            error = orjson.loads(imm.body)["error"]
            assert set(error) == {"message", "type", "code", "param"}
            # A body the router admitted may meet a backend's documented limit (Bedrock takes
            # data: images only), never the catch-all for a field of the wrong type.
            assert error["param"] is not None, (backend.id, error)
            event(f"{backend.provider.kind} refused: {error['code']}")
            continue
        assert resp.WhichOneof("response") == "request_body", resp
        done = resp.request_body.response
        headers = set_headers(done)
        body = done.body_mutation.body
        assert headers["content-length"] == str(len(body))
        assert headers[":path"].startswith("/") and not any(c in headers[":path"] for c in " \r\n\x00")
        assert all("\r" not in v and "\n" not in v and "\x00" not in v for v in headers.values()), headers
        assert isinstance(orjson.loads(body), dict)
        event(f"{backend.provider.kind} translated")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(request=_UPSTREAM_REQUEST)
def test_no_forwarded_body_makes_an_attempt_fail(local_runtime: Runtime, request: tuple[str, dict]) -> None:
    path, body = request
    asyncio.run(_attempts(local_runtime, path, _dumps(body)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(request=_VALID_REQUEST)
def test_every_backend_translates_a_valid_body(local_runtime: Runtime, request: tuple[str, dict]) -> None:
    path, body = request
    asyncio.run(_attempts(local_runtime, path, _dumps(body), valid=True))


@pytest.mark.parametrize(("model", "field", "param"), [
    ("claude-chat", {"stop": 5}, "stop"), ("claude-chat", {"tools": {"a": 1}}, "tools"),
    ("gemini-chat", {"tools": 67}, "tools"),
    ("gemini-chat", {"messages": [{"role": "user", "content": [1517]}]}, "messages[0].content[0]"),
    (CROSS, {"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]}, "messages[0].tool_calls"),
    ("default-chat", {"temperature": "hot"}, "temperature")])
def test_a_field_of_the_wrong_type_is_refused_by_the_router(local_runtime: Runtime, model: str, field: dict,
                                                            param: str) -> None:
    """Fields a translator must read: each once raised in the translator (the attempt became
    a 500), then was refused per attempt without naming the field. Now the router refuses
    them, whatever the backend, before any attempt."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **field}

    async def one() -> None:
        proc, out = await _admit(local_runtime, "/v1/chat/completions", orjson.dumps(body))
        proc.close()
        assert out.WhichOneof("response") == "immediate_response", out
        assert out.immediate_response.status.code == 400
        error = orjson.loads(out.immediate_response.body)["error"]
        assert (error["code"], error["param"]) == ("invalid_request", param)

    asyncio.run(one())


# -- 2. the router's stream path, composed ----------------------------------------------------

# (model, backend) per provider dialect, all in values-local.
_DIALECTS = {"openai": ("default-chat", "mock/mock-gpt-4o-mini"),
             "azure": ("azure-chat", "mock-azure/mock-gpt-4o-deployment"),
             "anthropic": ("claude-chat", "mock-anthropic/claude-mock-sonnet"),
             "bedrock": ("claude-chat", "mock-bedrock/anthropic.claude-mock-sonnet-v1:0"),
             "gemini": ("gemini-chat", "mock-gemini/gemini-mock-flash")}
_CLIENTS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
_WORDS = st.lists(st.sampled_from(["Hello", " world", ",", " the", " cat", " sat", "\n", " ünï", " 🐱", ' "q"']),
                  min_size=0, max_size=12)


def _sse_json(obj: Any, name: str | None = None) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _bedrock(name: str, payload: Any) -> bytes:
    return eventstream.encode({":event-type": name, ":content-type": "application/json", ":message-type": "event"},
                              orjson.dumps(payload))


def provider_stream(dialect: str, client: str, words: list[str], usage: tuple[int, int] | None) -> list[bytes]:
    """A clean answer in the provider's own stream framing, one element per event."""
    p, c = usage or (0, 0)
    if client == "responses":  # OpenAI backends only
        out = [_sse_json({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
                         "response.created")]
        out += [_sse_json({"type": "response.output_text.delta", "delta": w}, "response.output_text.delta")
                for w in words]
        done: JSON = {"id": "resp_1", "status": "completed", "model": "m"}
        if usage:
            done["usage"] = {"input_tokens": p, "output_tokens": c, "total_tokens": p + c}
        return out + [_sse_json({"type": "response.completed", "response": done}, "response.completed")]
    if dialect in ("openai", "azure"):
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        out = [_sse_json({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}]})]
        out += [_sse_json({**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]})
                for w in words]
        out.append(_sse_json({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if usage:
            out.append(_sse_json({**base, "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c,
                                                                    "total_tokens": p + c}}))
        return out + [b"data: [DONE]\n\n"]
    if dialect == "anthropic":
        out = [_sse_json({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": None,
            "usage": {"input_tokens": p, "output_tokens": 1} if usage else {}}}, "message_start"),
            _sse_json({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                      "content_block_start")]
        out += [_sse_json({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
                          "content_block_delta") for w in words]
        out += [_sse_json({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                _sse_json({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           **({"usage": {"output_tokens": c}} if usage else {})}, "message_delta"),
                _sse_json({"type": "message_stop"}, "message_stop")]
        return out
    if dialect == "bedrock":
        out = [_bedrock("messageStart", {"role": "assistant"})]
        out += [_bedrock("contentBlockDelta", {"delta": {"text": w}, "contentBlockIndex": 0}) for w in words]
        out += [_bedrock("contentBlockStop", {"contentBlockIndex": 0}),
                _bedrock("messageStop", {"stopReason": "end_turn"})]
        if usage:
            out.append(_bedrock("metadata", {"usage": {"inputTokens": p, "outputTokens": c, "totalTokens": p + c},
                                             "metrics": {"latencyMs": 1}}))
        return out
    parts = [{"candidates": [{"content": {"role": "model", "parts": [{"text": w}]}, "index": 0}]} for w in words]
    last: JSON = {"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP",
                                  "index": 0}], "modelVersion": "m"}
    if usage:
        last["usageMetadata"] = {"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c}
    return [b"data: " + orjson.dumps(x) + b"\r\n\r\n" for x in [*parts, last]]


def openai_tool_stream(calls: int, choices: int) -> list[bytes]:
    """An OpenAI stream of tool calls (arguments in pieces) on `choices` interleaved choices."""
    base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = []
    for k in range(calls):
        for i in range(choices):
            call = {"index": k, "id": f"call_{k}", "type": "function", "function": {"name": "f", "arguments": ""}}
            out.append(_sse_json({**base, "choices": [{"index": i, "delta": {"tool_calls": [call]}}]}))
            for piece in ('{"a":', ' "b"}'):
                out.append(_sse_json({**base, "choices": [{"index": i, "delta": {"tool_calls": [
                    {"index": k, "function": {"arguments": piece}}]}}]}))
    out += [_sse_json({**base, "choices": [{"index": i, "delta": {}, "finish_reason": "tool_calls"}]})
            for i in range(choices)]
    return out + [b"data: [DONE]\n\n"]


_CORPUS = {d: [orjson.loads(f.read_bytes()) for f in sorted((ROOT / "tests" / "provider_corpus" / d).glob("stream_*"))]
           for d in ("anthropic", "bedrock", "gemini")}


def corpus_stream(dialect: str, n: int) -> list[bytes]:
    """A recorded-shape answer from tests/provider_corpus (tools, thinking, errors...)."""
    if dialect in ("openai", "azure"):
        return openai_tool_stream(1 + n % 2, 1 + n // 2 % 2)
    cases = _CORPUS[dialect]
    return [frame(dialect, e) for e in cases[n % len(cases)]["events"]]


def odd_event(dialect: str, value: Any, name: str) -> bytes:
    """An event in the provider's framing whose payload is any JSON at all."""
    if dialect == "bedrock":
        return eventstream.encode({":event-type": name, ":content-type": "application/json",
                                   ":message-type": "event"}, _dumps(value))
    return (b"event: " + name.encode() + b"\n" if dialect == "anthropic" else b"") + b"data: " + _dumps(value) + b"\n\n"


_EVENT_NAMES = st.sampled_from(["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                                "message_delta", "message_stop", "error", "ping", "messageStart",
                                "contentBlockDelta", "contentBlockStart", "messageStop", "metadata", "x"])
_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
_ODD_PAYLOAD = st.one_of(
    _JSON,
    st.fixed_dictionaries({"choices": _SCALARS | st.dictionaries(st.sampled_from(["0", "delta"]), _JSON, max_size=2)
                           | st.lists(_SCALARS | st.fixed_dictionaries({"delta": _SCALARS | st.fixed_dictionaries(
                               {"content": _SCALARS}), "finish_reason": _SCALARS}), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"choices": _JSON | st.lists(st.fixed_dictionaries({}, optional={
        "index": _JSON, "delta": _JSON | st.fixed_dictionaries({}, optional={"content": _JSON, "tool_calls": _JSON}),
        "finish_reason": _JSON}), max_size=2)}, optional={"usage": _JSON, "error": _JSON, "id": _JSON}),
    st.fixed_dictionaries({"type": _EVENT_NAMES | _JSON}, optional={
        "index": _JSON, "delta": _JSON, "content_block": _JSON, "message": _JSON, "usage": _JSON, "error": _JSON}),
    st.fixed_dictionaries({}, optional={"candidates": _JSON, "usageMetadata": _JSON, "error": _JSON,
                                        "delta": _JSON, "contentBlockIndex": _JSON, "start": _JSON,
                                        "stopReason": _JSON, "usage": _JSON}))
# What may happen to a clean stream on its way: (kind, position, payload).
_FAULT = st.one_of(
    st.tuples(st.just("garbage"), st.integers(0, 40), st.binary(max_size=40) | st.sampled_from([
        b"\n\n", b"data: [DONE]\n\n", b"data: \n\n", b"event: ping\n\n", b": comment\n\n", b"\r\n\r\n",
        b'data: {"error": {"message": "overloaded"}}\n\n', b"data: {\n\n", b"\x00\x00\x00\x10\x00\x00\x00\x00"])),
    st.tuples(st.just("odd"), st.integers(0, 40), st.tuples(_ODD_PAYLOAD, _EVENT_NAMES)),
    st.tuples(st.just("truncate"), st.integers(0, 10**5), st.none()),
    st.tuples(st.just("drop"), st.integers(0, 40), st.none()))


def apply_faults(dialect: str, events: list[bytes], faults: list[tuple[str, int, Any]]) -> bytes:
    events = list(events)
    truncate = None
    for kind, at, payload in faults:
        if kind == "truncate":
            truncate = at
            continue
        at = min(at, len(events))
        if kind == "garbage":
            events.insert(at, payload)
        elif kind == "odd":
            events.insert(at, odd_event(dialect, *payload))
        elif kind == "drop" and at < len(events):
            del events[at]
    raw = b"".join(events)
    return raw if truncate is None else raw[:truncate]


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]


def client_bytes(chunks: list[bytes], answers: list[ep.ProcessingResponse]) -> bytes:
    """What Envoy sends the client: each chunk as the processor replaced it, or as it was."""
    out = []
    for chunk, answer in zip(chunks, answers, strict=True):
        assert answer.WhichOneof("response") == "response_body", answer
        common = answer.response_body.response
        replaced = common.HasField("body_mutation") and common.body_mutation.WhichOneof("mutation") == "body"
        out.append(common.body_mutation.body if replaced else chunk)
    return b"".join(out)


def openai_events(out: bytes) -> list[Any]:
    """The data of every event of an OpenAI stream: a JSON object, or "[DONE]"; whole events only."""
    assert out == b"" or out.endswith(b"\n\n"), out[-200:]
    events = []
    for event in out.split(b"\n\n")[:-1]:
        lines = event.split(b"\n")
        data = b"\n".join(line[6:] for line in lines if line.startswith(b"data: "))
        assert all(line.startswith((b"data: ", b":", b"event: ")) for line in lines), event
        if not any(line.startswith(b"data: ") for line in lines):
            continue  # a comment: SSE clients dispatch nothing
        events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
        assert events[-1] == "[DONE]" or isinstance(events[-1], dict), event
    return events


def check_openai_client(out: bytes) -> None:
    events = openai_events(out)
    assert events, "a stream ends with [DONE] or an error event, never with nothing"
    ends = [i for i, e in enumerate(events) if e == "[DONE]" or "error" in e]
    assert ends, events[-3:]
    first = ends[0]
    rest = events[first + 1:]
    # Nothing after the end, but the [DONE] that may follow an error event.
    assert rest in ([], ["[DONE]"]) and (not rest or events[first] != "[DONE]"), events[first:]
    if events[first] != "[DONE]":
        assert set(events[first]["error"]) == {"message", "type", "code", "param"}, events[first]


def check_anthropic_client(out: bytes) -> None:
    assert out.endswith(b"\n\n"), out[-200:]
    kinds, open_block, blocks = [], None, 0
    for event in out.split(b"\n\n")[:-1]:
        head, _, data = event.partition(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: ") and b"\n" not in data, event
        obj = orjson.loads(data[6:])
        kind = head[7:].decode()
        assert obj["type"] == kind
        assert not kinds or kinds[-1] not in ("message_stop", "error"), (kinds, kind)
        assert kinds or kind in ("message_start", "error"), kind
        if kind == "content_block_start":
            assert open_block is None and obj["index"] == blocks
            open_block, blocks = obj["index"], blocks + 1
        elif kind == "content_block_delta":
            assert obj["index"] == open_block or open_block is None and obj["index"] < blocks
        elif kind == "content_block_stop":
            assert obj["index"] == open_block
            open_block = None
        elif kind == "message_delta":
            assert open_block is None
        elif kind == "error":
            # Anthropic's error, with the gateway's runbook `code` and `param` (a budget cut, an
            # interrupted stream and a provider's error are told apart)
            assert set(obj["error"]) == {"type", "message", "code", "param"} and obj["error"]["code"], obj
        kinds.append(kind)
    assert kinds and kinds[-1] in ("message_stop", "error"), kinds[-3:]


def answer_text(client: str, out: bytes) -> str:
    if client == "messages":
        return "".join(e["delta"].get("text", "") for e in (orjson.loads(line[6:]) for line in out.split(b"\n")
                                                             if line.startswith(b"data: "))
                       if e["type"] == "content_block_delta")
    if client == "responses":
        return "".join(e["delta"] for e in openai_events(out) if e.get("type") == "response.output_text.delta")
    return "".join(c["delta"].get("content") or "" for e in openai_events(out) if e != "[DONE]"
                   for c in e.get("choices", []))


async def run_stream(rt: Runtime, client: str, dialect: str, include_usage: bool, raw: bytes, cuts: list[int],
                     empty_end: bool, status: int = 200, cap: int | None = None) -> tuple[RouterProcessor, bytes]:
    model, backend = _DIALECTS[dialect]
    body: JSON = {"model": model, "stream": True}
    if client == "messages":
        body.update(max_tokens=cap or 200, messages=[{"role": "user", "content": "hi"}])
    elif client == "responses":
        body["input"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
        if cap:
            body["max_tokens"] = cap  # a provider that ignores it is cut at the reservation
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    proc, out = await _admit(rt, _CLIENTS[client], orjson.dumps(body))
    try:
        assert out.WhichOneof("response") == "request_body", out
        ctype = "application/vnd.amazon.eventstream" if dialect == "bedrock" else "text/event-stream"
        head = await proc.handle(resp_headers(status, ctype, backend=backend))
        chunks = split(raw, cuts)
        if not head.HasField("mode_override"):
            chunks = [raw]  # not streamed: Envoy buffers the body and sends it once
        elif empty_end:
            chunks.append(b"")
        answers = [await proc.handle(resp_body(c, end=i == len(chunks) - 1)) for i, c in enumerate(chunks)]
        return proc, client_bytes(chunks, answers)
    finally:
        proc.close()


_COMBOS = [(c, d) for c in _CLIENTS for d in _DIALECTS if c != "responses" or d == "openai"]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(combo=st.sampled_from(_COMBOS), words=_WORDS, usage=st.none() | st.tuples(st.integers(0, 10**6),
                                                                                     st.integers(0, 10**6)),
       include_usage=st.booleans(), faults=st.lists(_FAULT, max_size=3), cuts=st.lists(st.integers(0, 10**5),
                                                                                         max_size=8),
       empty_end=st.booleans(), corpus=st.none() | st.integers(0, 100),
       status=st.sampled_from([200, 200, 200, 200, 400, 429, 500, 503]), cap=st.none() | st.integers(1, 6))
def test_no_reply_stream_makes_the_router_fail(local_runtime: Runtime, combo: tuple[str, str], words: list[str],
                                              usage: tuple[int, int] | None, include_usage: bool,
                                              faults: list[tuple[str, int, Any]], cuts: list[int],
                                              empty_end: bool, corpus: int | None, status: int,
                                              cap: int | None) -> None:
    client, dialect = combo
    corpus = None if client == "responses" else corpus
    events = provider_stream(dialect, client, words, usage) if corpus is None else corpus_stream(dialect, corpus)
    raw = apply_faults(dialect, events, faults)
    proc, out = asyncio.run(run_stream(local_runtime, client, dialect, include_usage, raw, cuts, empty_end, status,
                                       cap))
    event(f"{client}<-{dialect} {'corpus' if corpus is not None else ''}")
    if status != 200:  # an error status with a stream body: only that the router reads it without failing
        event(f"status {status}")
        return
    clean = not faults and corpus is None
    if client == "messages":
        check_anthropic_client(out)
    elif client == "chat" and (dialect not in ("openai", "azure") or clean):
        # OpenAI-schema providers' events pass through as they are: only theirs are unchecked.
        check_openai_client(out)
    if proc.cut:
        event("cut at the reservation")
    if proc.cut and clean:
        assert "".join(words).startswith(answer_text(client, out))
    elif clean:  # the answer arrives whole (the words hold nothing output scanning redacts)
        assert answer_text(client, out) == "".join(words)
    if clean and usage is not None:
        assert proc.usage is not None and (proc.usage.prompt_tokens, proc.usage.completion_tokens) == usage
    if clean and client == "chat" and not proc.cut:  # the usage chunk reaches the client exactly when it asked for it
        sent = [e["usage"] for e in openai_events(out) if e != "[DONE]" and e.get("usage")]
        assert len(sent) == (1 if include_usage and usage else 0) or include_usage and len(sent) == 1, sent
        assert not sent or usage is None or (sent[0]["prompt_tokens"], sent[0]["completion_tokens"]) == usage
    if clean and client == "messages" and usage is not None and not proc.cut:
        [delta] = [orjson.loads(line[6:]) for line in out.split(b"\n")
                   if line.startswith(b'data: {"type":"message_delta"')]
        assert delta["usage"]["output_tokens"] == usage[1]


@pytest.mark.parametrize("client", ["chat", "messages"])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("cut", [4, 30, -3])
def test_a_stream_cut_mid_event_still_ends_with_one_whole_error_event(local_runtime: Runtime, client: str,
                                                                      dialect: str, cut: int) -> None:
    """The provider's connection ends inside an event: the partial event was glued to the
    `upstream_stream_interrupted` event, so clients saw neither (Anthropic clients got an
    empty body when nothing else had come)."""
    events = provider_stream(dialect, client, ["Hello", " world"], (3, 2))
    raw = b"".join(events[:-1]) if cut < 0 else b""
    raw += events[-1][:cut] if cut < 0 else events[0][:cut]
    _, out = asyncio.run(run_stream(local_runtime, client, dialect, False, raw, [len(raw) // 2], False))
    if client == "messages":
        check_anthropic_client(out)
        assert out.count(b"event: error\n") == 1 and out.endswith(b'"param":null}}\n\n')
    else:
        check_openai_client(out)
        assert openai_events(out)[-1]["error"]["code"] in ("upstream_stream_interrupted", "provider_error")


@pytest.mark.parametrize("client", ["chat", "messages"])
def test_a_done_without_its_blank_line_ends_the_stream_cleanly(local_runtime: Runtime, client: str) -> None:
    """`data: [DONE]` as the last bytes, unterminated, is the end, not an interruption (an
    error event was glued to it)."""
    raw = b"".join(provider_stream("openai", client, ["Hi"], (3, 1)))[:-2]
    proc, out = asyncio.run(run_stream(local_runtime, client, "openai", True, raw, [], False))
    assert proc.error_code is None
    assert b"error" not in out
    assert out.endswith(b"data: [DONE]" if client == "chat" else b'{"type":"message_stop"}\n\n')


ODD_CHOICES = [5, "abc", {"0": {"message": {"content": "x"}}},
               [5, {"message": {"content": "mail me at a.b@example.com"}}],
               [{"message": "x"}, {"message": {"content": "mail me at a.b@example.com"}}], [None]]


@pytest.mark.parametrize("choices", ODD_CHOICES)
def test_output_scanning_reads_any_choices_a_provider_sends(local_runtime: Runtime, choices: Any) -> None:
    """`choices` of another shape than a list of objects made the output guard raise, in a
    stream (the reply then went on unscanned and unaccounted) and in a JSON answer."""
    event_ = b"data: " + orjson.dumps({"choices": choices}) + b"\n\ndata: [DONE]\n\n"
    for client in ("chat", "messages"):
        _, out = asyncio.run(run_stream(local_runtime, client, "openai", False, event_, [], False))
        if client == "chat":
            check_openai_client(out)
        else:
            check_anthropic_client(out)

    async def json_reply() -> ep.ProcessingResponse:
        body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}]}
        proc, _ = await _admit(local_runtime, "/v1/chat/completions", orjson.dumps(body))
        try:
            await proc.handle(resp_headers(200, backend=_DIALECTS["openai"][1]))
            return await proc.handle(resp_body(orjson.dumps({"choices": choices, "usage": {"prompt_tokens": 1}})))
        finally:
            proc.close()

    out = asyncio.run(json_reply())
    sent = out.response_body.response.body_mutation.body
    assert b"a.b@example.com" not in sent


@pytest.mark.parametrize("client", ["chat", "messages"])
@pytest.mark.parametrize("end", [b"data: [DONE]\n\n", b""] + [
    b'data: {"error": {"message": "overloaded", "type": "server_error", "code": null, "param": null}}\n\n'])
def test_text_held_back_by_output_scanning_reaches_the_client(local_runtime: Runtime, client: str,
                                                              end: bytes) -> None:
    """A stream that ends (with [DONE], an error event, or nothing) without the
    finish_reason chunk that flushes the output guard's hold-back window lost the answer's
    tail: here all of it."""
    events = provider_stream("openai", client, ["Hello", " world"], None)
    raw = b"".join(e for e in events if b'"finish_reason":"stop"' not in e and b"[DONE]" not in e) + end
    _, out = asyncio.run(run_stream(local_runtime, client, "openai", False, raw, [len(raw) // 3], False))
    check_anthropic_client(out) if client == "messages" else check_openai_client(out)
    assert answer_text(client, out) == "Hello world"


@pytest.mark.parametrize(("client", "dialect"), _COMBOS)
def test_an_event_too_large_to_hold_is_never_forwarded_unscanned(local_runtime: Runtime, client: str,
                                                                 dialect: str) -> None:
    """One provider event over 1 MiB, arriving in 16 KiB pieces: the usage tap used to
    forward what it could not hold as it was, so an OpenAI-schema provider's text went out
    unscanned (and ahead of the text held back before it). Now that stream ends with one
    provider_error event; translated providers' events come whole and are scanned."""
    words = ["Hello", " mail a.b@example.com " + "x" * (3 << 19), " end"]
    raw = b"".join(provider_stream(dialect, client, words, (3, 4)))
    proc, out = asyncio.run(run_stream(local_runtime, client, dialect, False, raw,
                                       list(range(1 << 14, len(raw), 1 << 14)), False))
    if client == "messages":
        check_anthropic_client(out)
    elif client == "chat":
        check_openai_client(out)
    assert b"a.b@example.com" not in out  # output scanning covers chat and Responses API answers
    assert answer_text(client, out).startswith("Hello")
    assert proc.usage is not None and (proc.usage.prompt_tokens, proc.usage.completion_tokens) == (3, 4)


def test_output_scanning_keeps_the_choices_of_an_n_2_stream_apart(local_runtime: Runtime) -> None:
    """Interleaved choices shared one hold-back window: a choice's text went out in the
    other's chunk, and text after choice 0's finish_reason made the guard raise."""
    base = {"object": "chat.completion.chunk", "model": "m"}

    def chunk(index: int, text: str | None, finish: str | None = None) -> bytes:
        delta = {"content": text} if text is not None else {}
        return _sse_json({**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

    raw = b"".join([chunk(0, "Hello"), chunk(1, "Mail me at"), chunk(0, " there"), chunk(0, None, "stop"),
                    chunk(1, " a.b@example.com please"), chunk(1, None, "stop"), b"data: [DONE]\n\n"])
    _, out = asyncio.run(run_stream(local_runtime, "chat", "openai", False, raw, [], False))
    check_openai_client(out)
    texts: dict[int, str] = {}
    for e in openai_events(out)[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert texts[0] == "Hello there"
    assert texts[1].startswith("Mail me at ") and texts[1].endswith(" please") and "a.b@example.com" not in texts[1]


EMAIL = "a.b@example.com"
# Every framing of one event that SSE allows and clients (the openai SDK's SSEDecoder) read the same.
_FRAMINGS = {
    "lf": lambda e: e,
    "crlf": lambda e: e.replace(b"\n", b"\r\n"),
    "cr": lambda e: e.replace(b"\n", b"\r"),
    "nospace": lambda e: e.replace(b"data: ", b"data:", 1),
    "multiline": lambda e: e if e.startswith(b"data: [DONE]") else b"".join(
        b"data: " + line.encode() + b"\n" for line in json.dumps(json.loads(e[6:]), indent=1).split("\n")) + b"\n",
    "comments": lambda e: b": keep-alive\n" + e + b": ping " + EMAIL.encode() + b"\n\n",
    "fields": lambda e: b"event: completion\nid: 7\nretry: 1000\n" + e,
}
_FIELDS = ["content", "refusal", "reasoning_content", "tool"]


@st.composite
def _guarded_answers(draw: st.DrawFn) -> tuple[dict[tuple[int, str], str], list[bytes]]:
    """An answer of 1-2 choices, each streaming texts of several kinds in pieces (one of
    which holds an e-mail address, a value values-local redacts), the events in random
    framings, choices sometimes merged into one chunk, logprobs sometimes."""
    texts: dict[tuple[int, str], str] = {}
    pieces: dict[tuple[int, str], list[tuple[int, str, str]]] = {}
    for index in range(draw(st.integers(1, 2))):
        for field in draw(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=3, unique=True)):
            words = draw(st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta"]), min_size=1, max_size=6))
            text = " ".join(words[:len(words) // 2] + ["mail", EMAIL, "now"] + words[len(words) // 2:])
            if field == "tool":
                text = json.dumps({"note": text})
            texts[(index, field)] = text
            cuts = sorted(draw(st.lists(st.integers(1, len(text) - 1), max_size=6, unique=True)))
            bounds = [0, *cuts, len(text)]
            pieces[(index, field)] = [(index, field, text[a:b]) for a, b in zip(bounds, bounds[1:])]
    # The texts of one choice one after the other, or even interleaved; choices interleave.
    if draw(st.booleans()):
        streams = list(pieces.values())
    else:
        streams = [[p for (i, _), ps in pieces.items() if i == index for p in ps] for index in {i for i, _ in pieces}]
    turns = draw(st.permutations([i for i, stream in enumerate(streams) for _ in stream]))
    ordered = [streams[i].pop(0) for i in turns]
    base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    choices_out: list[list[dict[str, Any]]] = []
    for index, field, piece in ordered:
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": piece}}
        delta = {"tool_calls": [call]} if field == "tool" else {field: piece}
        choice = {"index": index, "delta": delta, "finish_reason": None}
        if draw(st.booleans()):
            choice["logprobs"] = {"content": [{"token": piece, "logprob": -0.1, "bytes": list(piece.encode())}]}
        if choices_out and draw(st.booleans()) and all(c["index"] != index for c in choices_out[-1]):
            choices_out[-1].append(choice)  # several choices in one chunk
        else:
            choices_out.append([choice])
    choices_out += [[{"index": i, "delta": {}, "finish_reason": "stop"}] for i in sorted({i for i, _ in texts})]
    events = [b"data: " + orjson.dumps({**base, "choices": c}) + b"\n\n" for c in choices_out]
    events.append(b"data: [DONE]\n\n")
    return texts, [_FRAMINGS[draw(st.sampled_from(sorted(_FRAMINGS)))](e) for e in events]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(answer=_guarded_answers(), cuts=st.lists(st.integers(0, 10**4), max_size=8))
def test_output_scanning_reads_every_text_of_every_choice_in_any_framing(
        local_runtime: Runtime, answer: tuple[dict[tuple[int, str], str], list[bytes]], cuts: list[int]) -> None:
    """A value output scanning redacts never reaches the client, whatever an OpenAI-schema
    provider's framing (CR/CRLF line ends, `data:` without its space, data over several
    lines, comments, event fields), however its choices share chunks, and in whichever text
    it streams (content, refusal, reasoning, tool-call arguments); the rest of each text
    arrives whole, in its own choice and field. Before: only `data: {`-framed events and only
    `choices[0].delta.content` were scanned."""
    texts, events = answer
    _, out = asyncio.run(run_stream(local_runtime, "chat", "openai", False, b"".join(events), cuts, False))
    check_openai_client(out)
    assert EMAIL.encode() not in out
    got: dict[tuple[int, str], str] = {}
    for e in openai_events(out)[:-1]:
        for c in e["choices"]:
            assert c.get("logprobs") is None  # tokens would spell the value out unscanned
            for field in _FIELDS:
                if field == "tool":
                    for call in c["delta"].get("tool_calls") or []:
                        got[(c["index"], field)] = got.get((c["index"], field), "") + call["function"]["arguments"]
                elif c["delta"].get(field):
                    got[(c["index"], field)] = got.get((c["index"], field), "") + c["delta"][field]
    assert got.keys() == texts.keys()
    for key, text in texts.items():
        assert EMAIL not in got[key]
        assert re.sub(r"\[EMAIL_\d+\]", "E", got[key]) == text.replace(EMAIL, "E"), key


def test_output_scanning_reads_every_text_of_a_json_answer(local_runtime: Runtime) -> None:
    """Only `message.content` was scanned: a value in a tool call's arguments, a refusal or a
    second choice's reasoning went out as it came, and logprobs spelled the content out."""
    answer = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "logprobs": {"content": [{"token": EMAIL, "logprob": 0.0}]},
         "message": {"role": "assistant", "content": "Sure.", "tool_calls": [
             {"id": "call_1", "type": "function",
              "function": {"name": "send", "arguments": json.dumps({"to": EMAIL})}}]}},
        {"index": 1, "finish_reason": "stop",
         "message": {"role": "assistant", "content": None, "refusal": f"not to {EMAIL}",
                     "reasoning_content": f"they asked for {EMAIL}"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 9}}

    async def reply() -> ep.ProcessingResponse:
        body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}]}
        proc, _ = await _admit(local_runtime, "/v1/chat/completions", orjson.dumps(body))
        try:
            await proc.handle(resp_headers(200, backend=_DIALECTS["openai"][1]))
            return await proc.handle(resp_body(orjson.dumps(answer)))
        finally:
            proc.close()

    sent = orjson.loads(asyncio.run(reply()).response_body.response.body_mutation.body)
    first, second = sent["choices"]
    assert first["logprobs"] is None and first["message"]["content"] == "Sure."
    assert orjson.loads(first["message"]["tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL_1]"}
    assert second["message"]["refusal"] == "not to [EMAIL_1]"
    assert second["message"]["reasoning_content"] == "they asked for [EMAIL_1]"
    assert sent["usage"] == answer["usage"]


@pytest.mark.parametrize("raw", [
    b'{"choices": [{"message": {"content": "mail ' + EMAIL.encode() + b'"}}]}',  # a JSON answer labelled a stream
    b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\nplain text ' + EMAIL.encode(),
    b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\nid: 1\ndata:{"choices":[{"delta":{"content":"' +
    EMAIL.encode() + b'"}}]}',  # the last event unterminated, in another framing
    b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\nplain text ' + EMAIL.encode(),
], ids=["json", "text", "unterminated", "after-done"])
def test_a_streams_last_bytes_are_never_forwarded_unscanned(local_runtime: Runtime, raw: bytes) -> None:
    """What follows a stream's last blank line went out as it came when it did not start
    with `data:` and the stream had ended itself (after `[DONE]`); otherwise the gateway drops
    an unterminated tail before its interrupted-stream event. Either way it is not forwarded
    unscanned."""
    for cuts in ([], [len(raw) // 2]):
        _, out = asyncio.run(run_stream(local_runtime, "chat", "openai", False, raw, cuts, False))
        check_openai_client(out)
        assert EMAIL.encode() not in out


def test_parallel_tool_calls_in_one_chunk_reach_anthropic_clients_in_order(local_runtime: Runtime) -> None:
    """Gemini sends parallel calls in one chunk: the first call's held arguments went out after
    the second call's block had started, so an Anthropic client saw interleaved blocks."""
    raw = b"".join(corpus_stream("gemini", 88))  # stream_parallel_tools
    assert raw.count(b'"functionCall"') == 2
    _, out = asyncio.run(run_stream(local_runtime, "messages", "gemini", False, raw, [], False))
    check_anthropic_client(out)
    assert out.count(b'"partial_json":"{}"') == 2


def test_fields_outside_the_chat_schema_never_carry_a_value_out(local_runtime: Runtime) -> None:
    """A provider's own fields (an audio transcript, a legacy `text`, junk) are scanned too;
    one that holds a value is dropped, and the schema's fields go on."""
    mail = EMAIL.encode()
    raw = (b'data: {"id":"c","note":"' + mail + b'","choices":[{"index":0,"text":"' + mail + b'","delta":{"content":'
           b'"Hello","audio":{"transcript":"mail ' + mail + b'"},"tool_calls":[{"index":0,"id":"t","x":"' + mail +
           b'","function":{"name":"f","arguments":"","y":"' + mail + b'"}}]}}]}\n\n'
           b'data: {"id":"c","vendor":{"ok":true},"choices":[{"index":0,"delta":{"content":" world"},'
           b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    _, out = asyncio.run(run_stream(local_runtime, "chat", "openai", False, raw, [], False))
    check_openai_client(out)
    assert mail not in out and answer_text("chat", out) == "Hello world"
    assert b'"vendor":{"ok":true}' in out  # fields holding nothing to redact go on as they came


@pytest.mark.parametrize("field", ["reasoning", "thinking"])
def test_a_value_split_over_chunks_of_a_providers_own_text_field_never_leaves(local_runtime: Runtime,
                                                                              field: str) -> None:
    """A delta's string fields outside the chat schema (OpenRouter's and vLLM's `reasoning`)
    were scanned chunk by chunk: a value split over two chunks went out in halves. Each now has
    its own hold-back window, like `content`."""
    name, domain = EMAIL.split("@")
    parts = [f"write to {name}", f"@{domain} today"]
    events = [b'data: {"id":"c","choices":[{"index":0,"delta":{"' + field.encode() + b'":' + orjson.dumps(p) + b'}}]}\n\n'
              for p in parts]
    raw = b"".join(events) + (b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Done."},'
                              b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    _, out = asyncio.run(run_stream(local_runtime, "chat", "openai", False, raw, [], False))
    check_openai_client(out)
    assert name.encode() not in out and domain.encode() not in out
    said = "".join(c["delta"].get(field, "") for e in openai_events(out)[:-1] for c in e["choices"])
    assert re.sub(r"\[EMAIL_\d+\]", "E", said) == "write to E today"
    assert answer_text("chat", out) == "Done."


def test_output_scanning_refuses_a_json_answer_it_cannot_read(local_runtime: Runtime) -> None:
    """A 2xx answer that is not a JSON object (here text holding a value output scanning
    redacts) went to the client as it came, unscanned; now it is a 502 provider_error, charged
    like an answer."""
    async def reply(raw: bytes) -> tuple[ep.ProcessingResponse, RouterProcessor]:
        body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}]}
        proc, _ = await _admit(local_runtime, "/v1/chat/completions", orjson.dumps(body))
        try:
            await proc.handle(resp_headers(200, backend=_DIALECTS["openai"][1]))
            return await proc.handle(resp_body(raw)), proc
        finally:
            proc.close()

    for raw in [b"mail " + EMAIL.encode(), b'{"choices": [{"message": {"content": "' + EMAIL.encode() + b'"}}',
                orjson.dumps(["mail " + EMAIL])]:
        out, proc = asyncio.run(reply(raw))
        sent = out.response_body.response.body_mutation.body
        assert EMAIL.encode() not in sent and orjson.loads(sent)["error"]["code"] == "provider_error"
        assert (proc.status, proc.error_code) == (502, "provider_error")
        assert proc.consumed(None).processed  # the provider answered: its work is charged


@pytest.mark.parametrize("client", ["chat", "messages"])
def test_an_error_key_that_is_no_error_object_does_not_end_the_stream(local_runtime: Runtime, client: str) -> None:
    """`data: {"error": []...}` counted as the stream's end, so a stream cut off after it got
    no upstream_stream_interrupted event (an Anthropic client: no end at all)."""
    events = provider_stream("openai", client, ["Hi"], None)
    raw = b"".join(events[:2]) + b'data: {"error": [], "choices": []}\n\n'
    _, out = asyncio.run(run_stream(local_runtime, client, "openai", False, raw, [], False))
    if client == "messages":
        check_anthropic_client(out)
        assert out.count(b"event: error\n") == 1
    else:
        assert openai_events(out)[-1]["error"]["code"] == "upstream_stream_interrupted"


@pytest.mark.parametrize("client", ["chat", "messages"])
def test_nothing_is_read_after_a_gemini_error_event(local_runtime: Runtime, client: str) -> None:
    """An unreadable event after Gemini's error event added a second error event."""
    raw = (b'data: {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}, "index": 0}]}\r\n\r\n'
           b'data: {"error": {"code": 503, "message": "The model is overloaded."}}\r\n\r\ndata: {oops\r\n\r\n')
    _, out = asyncio.run(run_stream(local_runtime, client, "gemini", False, raw, [], False))
    if client == "messages":
        check_anthropic_client(out)
        assert out.count(b"event: error\n") == 1 and b"overloaded" in out
    else:
        check_openai_client(out)
        assert openai_events(out)[-1]["error"]["message"] == "The model is overloaded."


def test_n_null_is_the_default_not_a_500(local_runtime: Runtime) -> None:
    """`"n": null` (what SDKs send for "not given" when asked to be explicit) raised in the
    router's check of n against its maximum."""
    body = {"model": "default-chat", "n": None, "messages": [{"role": "user", "content": "hi"}]}

    async def one() -> ep.ProcessingResponse:
        proc, out = await _admit(local_runtime, "/v1/chat/completions", orjson.dumps(body))
        proc.close()
        return out

    assert asyncio.run(one()).WhichOneof("response") == "request_body"
