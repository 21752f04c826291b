"""Unit tests for the router-level ext_proc processor, driven message by message.

No gRPC server and no Envoy: each test builds the ProcessingRequest messages Envoy would
send on one stream and checks the ProcessingResponse the processor answers with.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from gateway_extproc._proto.envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from gateway_extproc._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from gateway_extproc import admission, api, config, keys
from gateway_extproc.budgets import settlements
from gateway_extproc.processors import responses, router
from gateway_extproc.processors.router import RouterProcessor
from gateway_extproc.render import chart_values, render_values
from gateway_extproc.runtime import Runtime
from tests.extproc_messages import set_headers

ALL = keys.generate("all-models")
LIMITED = keys.generate("limited")
EXPIRED = keys.generate("expired")
MAX_BYTES = 4096
CHAT_PATH = "/v1/chat/completions"
EMB_PATH = "/v1/embeddings"


def gateway_doc(max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    return {
        "version": 1,
        "listen": ["unix:///tmp/gw-test.sock"],
        "maxRequestBytes": max_bytes,
        "providers": [
            # A base path that differs from the client's /v1, so the router must set :path.
            {"name": "openai", "kind": "openai", "baseURL": "https://api.example.com/openai/v1",
             "credential": {"env": "GW_TEST_ROUTER_OPENAI_KEY"}},
            {"name": "backup", "kind": "openai", "baseURL": "http://backup.example:8081/v1",
             "credential": {"env": "GW_TEST_ROUTER_BACKUP_KEY"}},
            {"name": "claude", "kind": "anthropic", "baseURL": "https://api.anthropic.example/v1",
             "credential": {"env": "GW_TEST_ROUTER_BACKUP_KEY"}},
        ],
        "models": [
            {"name": "default-chat", "tokenizer": "o200k_base",
             "backends": [{"provider": "openai", "model": "gpt-4o-mini"}]},
            # Same name upstream and same /v1 base path: nothing to rewrite.
            {"name": "passthrough-chat", "tokenizer": "o200k_base",
             "backends": [{"provider": "backup", "model": "passthrough-chat"}]},
            {"name": "fallback-chat", "tokenizer": "o200k_base",
             "backends": [{"provider": "openai", "model": "gpt-4o", "priority": 0},
                          {"provider": "backup", "model": "gpt-4o-backup", "priority": 1}]},
            {"name": "default-embedding", "tokenizer": "cl100k_base",
             "backends": [{"provider": "openai", "model": "text-embedding-3-small"}]},
            # Falls back from Anthropic to OpenAI: the router learns per response which answered.
            {"name": "claude-chat", "tokenizer": "estimate",
             "backends": [{"provider": "claude", "model": "claude-x", "priority": 0},
                          {"provider": "backup", "model": "gpt-4o-backup", "priority": 1}]},
            {"name": "secret-chat", "tokenizer": "estimate",
             "backends": [{"provider": "openai", "model": "o1"}]},
        ],
        "teams": [{"name": "search"}, {"name": "ads"}],
        "keys": [
            {"id": "all-models", "sha256": keys.digest(ALL), "team": "search"},
            {"id": "limited", "sha256": keys.digest(LIMITED), "team": "ads",
             "models": ["default-chat", "passthrough-chat", "fallback-chat", "default-embedding"]},
            {"id": "expired", "sha256": keys.digest(EXPIRED), "team": "ads", "expiresAt": "2020-01-01T00:00:00Z"},
        ],
    }


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime.from_config(config.parse(gateway_doc(), "test-gateway.yaml"))


@pytest.fixture
def proc(runtime: Runtime) -> RouterProcessor:
    return RouterProcessor(runtime)


# -- message builders --------------------------------------------------------------------


def header_map(headers: dict[str, str]) -> HeaderMap:
    return HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def req_headers(method: str = "POST", path: str = CHAT_PATH, key: str | None = ALL,
                content_type: str | None = "application/json", end: bool = False,
                **extra: str) -> ep.ProcessingRequest:
    h = {":method": method, ":path": path, ":authority": "gateway.local", ":scheme": "http",
         "x-request-id": "req-123", "user-agent": "OpenAI/Python 1.50.0"}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    if content_type is not None:
        h["content-type"] = content_type
    h.update({k.replace("_", "-"): v for k, v in extra.items()})
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=header_map(h), end_of_stream=end))


def req_body(body: dict[str, Any] | bytes) -> ep.ProcessingRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True))


def resp_headers(status: int = 200, content_type: str = "application/json", backend: str | None = None,
                 end: bool = False) -> ep.ProcessingRequest:
    h = {":status": str(status), "content-type": content_type}
    if backend:
        h["x-gateway-backend"] = backend
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=header_map(h), end_of_stream=end))


def resp_body(data: bytes, end: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=end))


# -- response readers --------------------------------------------------------------------


def immediate(resp: ep.ProcessingResponse) -> tuple[int, dict[str, Any], str]:
    assert resp.WhichOneof("response") == "immediate_response"
    imm = resp.immediate_response
    headers = {o.header.key: o.header.raw_value.decode() for o in imm.headers.set_headers}
    assert headers["content-type"] == "application/json"  # (a 429 also carries retry-after)
    assert imm.details.startswith("gw_")
    return imm.status.code, orjson.loads(imm.body), imm.details


def assert_error(resp: ep.ProcessingResponse, status: int, code: str, param: str | None = None) -> None:
    got_status, body, details = immediate(resp)
    assert got_status == status
    assert details == f"gw_{code}"
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    assert set(body["error"]) == {"message", "type", "code", "param"}


def refusal(resp: ep.ProcessingResponse) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A refusal left to the chart's refusal route (responses.refusal_after_body): its
    status, body and the request headers it set."""
    assert resp.WhichOneof("response") == "request_headers"
    mode = resp.mode_override
    assert mode.request_body_mode == processing_mode_pb2.ProcessingMode.NONE  # the body never comes here
    assert mode.response_header_mode == processing_mode_pb2.ProcessingMode.SKIP
    common = resp.request_headers.response
    assert common.clear_route_cache
    sets = set_headers(common)
    assert set(sets) <= {"x-gateway-refusal", "x-gateway-refusal-status", "x-gateway-refusal-retry-after"}
    return int(sets["x-gateway-refusal-status"]), orjson.loads(sets["x-gateway-refusal"]), sets


def assert_refused(resp: ep.ProcessingResponse, status: int, code: str, after_body: bool) -> None:
    """An error in the OpenAI shape: at once, or (`after_body`) once the body is in."""
    if not after_body:
        assert_error(resp, status, code)
        return
    got_status, body, _ = refusal(resp)
    assert got_status == status and body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "code", "param"}


def sent_body(resp: ep.ProcessingResponse) -> dict[str, Any] | None:
    common = resp.request_body.response
    return orjson.loads(common.body_mutation.body) if common.HasField("body_mutation") else None


def metadata(resp: ep.ProcessingResponse) -> dict[str, Any]:
    return json_format.MessageToDict(resp.dynamic_metadata)


CHAT = {"model": "default-chat", "messages": [{"role": "user", "content": "hello world"}]}
CHAT_PROMPT_TOKENS = 9  # 3 priming + 3 framing + "user" (1) + "hello world" (2), o200k_base
EMB = {"model": "default-embedding", "input": "hello world"}
EMB_PROMPT_TOKENS = 2  # cl100k_base


async def send_request(proc: RouterProcessor, body: dict[str, Any] | bytes, path: str = CHAT_PATH,
                       key: str = ALL) -> ep.ProcessingResponse:
    first = await proc.handle(req_headers(path=path, key=key))
    assert first.WhichOneof("response") == "request_headers"
    return await proc.handle(req_body(body))


# -- GET /v1/models ----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "expected"), [
    (ALL, ["default-chat", "passthrough-chat", "fallback-chat", "default-embedding", "claude-chat", "secret-chat"]),
    (LIMITED, ["default-chat", "passthrough-chat", "fallback-chat", "default-embedding"]),
], ids=["all-models-key", "limited-key"])
async def test_models_list_shows_only_allowed_models(proc: RouterProcessor, key: str, expected: list[str]) -> None:
    resp = await proc.handle(req_headers("GET", "/v1/models?limit=10", key=key, content_type=None, end=True))
    status, body, details = immediate(resp)
    assert (status, details) == (200, "gw_answered")
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == expected
    assert all(m == {"id": m["id"], "object": "model", "created": 0, "owned_by": "gateway"} for m in body["data"])


# -- request header checks ---------------------------------------------------------------


@pytest.mark.parametrize(("message", "status", "code"), [
    (req_headers("GET", "/v1/nope"), 404, "unknown_endpoint"),
    (req_headers("POST", "/v1/completions"), 404, "unknown_endpoint"),
    (req_headers("POST", "/v1/chat/completions/"), 404, "unknown_endpoint"),
    (req_headers("POST", "/v1/nope", key=None), 404, "unknown_endpoint"),  # before auth
    (req_headers("GET", CHAT_PATH), 405, "method_not_allowed"),
    (req_headers("PUT", EMB_PATH), 405, "method_not_allowed"),
    (req_headers("POST", "/v1/models"), 405, "method_not_allowed"),
    (req_headers(key=None), 401, "missing_api_key"),
    (req_headers("GET", "/v1/models", key=None), 401, "missing_api_key"),
    (req_headers(key="gwk_all-models_wrong-secret"), 401, "invalid_api_key"),
    (req_headers(key="sk-proj-providerkey0123456789"), 401, "invalid_api_key"),
    (req_headers(key=EXPIRED), 401, "expired_api_key"),
    (req_headers(content_type="text/plain"), 415, "unsupported_media_type"),
    (req_headers(content_type="application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
    (req_headers(content_type=None), 415, "unsupported_media_type"),
    (req_headers(content_length=str(MAX_BYTES + 1)), 413, "request_too_large"),
    (req_headers(end=True), 400, "invalid_request"),  # POST without a body
], ids=["unknown-path", "legacy-completions", "trailing-slash", "unknown-path-no-key", "chat-get", "embeddings-put",
        "models-post", "no-key", "models-no-key", "wrong-secret", "provider-key", "expired", "text-plain", "form",
        "no-content-type", "too-large", "no-body"])
async def test_request_headers_rejections(proc: RouterProcessor, message: ep.ProcessingRequest, status: int,
                                          code: str) -> None:
    """A known caller's refusal with a body on its way goes out once the body is in (415
    here); an unknown caller's, or one over the body limit, at once."""
    after_body = status in responses.REFUSED_AFTER_BODY and not message.request_headers.end_of_stream
    assert_refused(await proc.handle(message), status, code, after_body)


async def test_a_refusal_after_the_body_keeps_retry_after_and_drops_the_callers_own(
        proc: RouterProcessor, monkeypatch: pytest.MonkeyPatch) -> None:
    """gateway_busy at the headers (the bodies announced ahead of this one fill the
    process's share) keeps its `Retry-After: 1`; a caller's own x-gateway-refusal-retry-after
    never becomes a refusal's retry-after; a body with no more to come, or headers with no
    room for the refusal's, are answered at once."""
    monkeypatch.setattr(admission, "LARGE_BYTES", 100)
    monkeypatch.setattr(router, "BODY_WORK", admission.BodyWork(budget=1000))
    first = await proc.handle(req_headers(content_length="900"))
    assert first.mode_override.request_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED  # let in
    status, body, sets = refusal(await RouterProcessor(proc.runtime).handle(
        req_headers(content_length="900", x_gateway_refusal_retry_after="evil")))
    assert (status, body["error"]["code"], sets["x-gateway-refusal-retry-after"]) == (503, "gateway_busy", "1")
    plain = await RouterProcessor(proc.runtime).handle(
        req_headers(content_type="text/plain", x_gateway_refusal_retry_after="evil"))
    assert refusal(plain)[0] == 415
    assert plain.request_headers.response.header_mutation.remove_headers == ["x-gateway-refusal-retry-after"]
    assert_error(await RouterProcessor(proc.runtime).handle(req_headers(content_type="text/plain", end=True)),
                 415, "unsupported_media_type")
    # Headers that leave no room for the refusal's: Envoy would fail the mutation (a 503).
    crowded = {f"x-h{i}": "v" for i in range(api.MAX_HEADER_COUNT)}
    assert_error(await RouterProcessor(proc.runtime).handle(req_headers(content_type="text/plain", **crowded)),
                 415, "unsupported_media_type")


async def test_unknown_endpoint_message_lists_the_endpoints_and_never_quotes_the_path(proc: RouterProcessor) -> None:
    """A path is caller text that may hold anything (`/v1/<key>`): the answer lists what the
    gateway serves instead of quoting it, and the access line and the span name carry no path."""
    secret = "gwk_someone_pasted_their_key_in_the_path"
    with structlog.testing.capture_logs() as logs:
        _, body, _ = immediate(await proc.handle(req_headers("DELETE", f"/v1/files/{secret}")))
    assert body["error"]["message"].startswith("Unknown endpoint DELETE: this gateway serves POST /v1/chat/completions")
    assert "GET /v1/models" in body["error"]["message"] and secret not in body["error"]["message"]
    assert body["error"]["type"] == "not_found_error"
    (event,) = access_events(logs)
    assert event["path"] == router.UNKNOWN_PATH and event["error_code"] == "unknown_endpoint"
    assert_no_key_in_logs(logs, secret)


@pytest.mark.parametrize("message", [
    req_headers(content_type="application/json; charset=utf-8"),
    req_headers(content_type="Application/JSON"),
    req_headers(content_length=str(MAX_BYTES)),
    req_headers(path=CHAT_PATH + "?api-version=2024-10-01"),
    req_headers(path=EMB_PATH),
    req_headers(key=None, x_api_key=LIMITED),
], ids=["charset", "case", "at-limit", "query-string", "embeddings", "x-api-key"])
async def test_request_headers_accepted(proc: RouterProcessor, message: ep.ProcessingRequest) -> None:
    resp = await proc.handle(message)
    assert resp.WhichOneof("response") == "request_headers"


async def test_request_headers_strip_caller_credentials_and_gateway_headers(proc: RouterProcessor) -> None:
    """Every header an SDK or a browser carries a credential in (OpenAI, Anthropic, Azure,
    Gemini, cookies, proxies): the caller's key must never reach a provider."""
    resp = await proc.handle(req_headers(
        key=ALL, x_api_key=ALL, x_gateway_model="secret-chat", x_gateway_backend="openai/o1",
        x_gateway_prompt_tokens="1", x_gatewayish="kept", x_custom="kept", api_key="caller-azure-secret",
        x_goog_api_key="caller-gemini-secret", proxy_authorization="Basic eA==", x_amz_security_token="t",
        openai_organization="org-other", openai_project="proj-other", anthropic_version="2023-06-01",
        cookie="session=abc"))
    common = resp.request_headers.response
    assert set(common.header_mutation.remove_headers) == {
        "authorization", "x-api-key", "x-gateway-model", "x-gateway-backend", "x-gateway-prompt-tokens",
        "api-key", "x-goog-api-key", "proxy-authorization", "x-amz-security-token", "openai-organization",
        "openai-project", "cookie"}
    assert not common.header_mutation.set_headers
    assert not common.HasField("body_mutation")
    # Envoy picked a route from the client's x-gateway-model before this answer: it must go
    # (an HTTP/2 request whose body is trailers alone gets no body answer to reroute it).
    assert common.clear_route_cache


@pytest.mark.parametrize("values", [[ALL, ALL], ["gwk_nope_x", ALL], [ALL, "gwk_nope_x"]])
async def test_a_repeated_key_header_is_one_joined_value_not_the_last(proc: RouterProcessor,
                                                                       values: list[str]) -> None:
    """Envoy passes a repeated x-api-key as separate entries: keeping the last let a second
    one win while the first went unchecked."""
    h = [HeaderValue(key=k, raw_value=v.encode()) for k, v in (
        (":method", "POST"), (":path", CHAT_PATH), ("content-type", "application/json"),
        *(("x-api-key", v) for v in values))]
    resp = await proc.handle(ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=HeaderMap(headers=h))))
    assert resp.immediate_response.status.code == 401
    assert json.loads(resp.immediate_response.body)["error"]["code"] == "invalid_api_key"


# -- request body: shaping for the backend -----------------------------------------------


async def test_single_backend_body_renamed_path_set_and_metadata(proc: RouterProcessor) -> None:
    body = {**CHAT, "temperature": 0.2, "max_tokens": 50, "user": "u-1"}
    resp = await send_request(proc, body)

    assert resp.WhichOneof("response") == "request_body"
    common = resp.request_body.response
    new_raw = common.body_mutation.body
    assert orjson.loads(new_raw) == {**body, "model": "gpt-4o-mini"}  # only the model changes
    assert "stream_options" not in orjson.loads(new_raw)
    assert set_headers(common) == {
        "x-gateway-model": "default-chat",
        ":path": "/openai/v1/chat/completions",
        "content-length": str(len(new_raw)),
    }
    assert common.clear_route_cache is True
    assert metadata(resp) == {"gw": {"model": "default-chat", "api": "chat", "request_id": "req-123", "config": ""}}


async def test_path_with_query_string_gets_provider_path(proc: RouterProcessor) -> None:
    await proc.handle(req_headers(path=CHAT_PATH + "?x=1"))
    resp = await proc.handle(req_body(CHAT))
    assert set_headers(resp.request_body.response)[":path"] == "/openai/v1/chat/completions"


@pytest.mark.parametrize(("stream_options", "expected_options"), [
    (None, {"include_usage": True}),
    ({}, {"include_usage": True}),
    ({"include_usage": False}, {"include_usage": True}),
    ({"include_obfuscation": False}, {"include_obfuscation": False, "include_usage": True}),
], ids=["absent", "empty", "false", "other-option"])
async def test_streaming_asks_provider_for_usage(proc: RouterProcessor, stream_options: dict | None,
                                                 expected_options: dict) -> None:
    body = {**CHAT, "stream": True}
    if stream_options is not None:
        body["stream_options"] = stream_options
    resp = await send_request(proc, body)
    common = resp.request_body.response
    sent = orjson.loads(common.body_mutation.body)
    assert sent == {**body, "model": "gpt-4o-mini", "stream_options": expected_options}
    assert set_headers(common)["content-length"] == str(len(common.body_mutation.body))
    assert proc.drop_usage is True and proc.stream is True


async def test_streaming_client_already_asked_for_usage(proc: RouterProcessor) -> None:
    body = {**CHAT, "model": "passthrough-chat", "stream": True, "stream_options": {"include_usage": True}}
    resp = await send_request(proc, body)
    common = resp.request_body.response
    assert not common.HasField("body_mutation")  # nothing to change at all
    assert set_headers(common) == {"x-gateway-model": "passthrough-chat"}
    assert proc.drop_usage is False and proc.stream is True


async def test_nothing_to_rewrite_sends_no_body_and_no_path(proc: RouterProcessor) -> None:
    resp = await send_request(proc, {**CHAT, "model": "passthrough-chat"})
    common = resp.request_body.response
    assert not common.HasField("body_mutation")
    assert set_headers(common) == {"x-gateway-model": "passthrough-chat"}  # /v1 + suffix == client path
    assert common.clear_route_cache is True
    assert metadata(resp)["gw"]["model"] == "passthrough-chat"


async def test_multi_backend_keeps_logical_model_name(proc: RouterProcessor) -> None:
    resp = await send_request(proc, {**CHAT, "model": "fallback-chat"})
    common = resp.request_body.response
    assert not common.HasField("body_mutation")  # the upstream processor renames per attempt
    assert set_headers(common) == {"x-gateway-model": "fallback-chat"}  # and sets :path per attempt
    assert metadata(resp) == {"gw": {"model": "fallback-chat", "api": "chat", "request_id": "req-123", "config": ""}}


async def test_multi_backend_streaming_adds_usage_but_keeps_name(proc: RouterProcessor) -> None:
    resp = await send_request(proc, {**CHAT, "model": "fallback-chat", "stream": True})
    common = resp.request_body.response
    sent = orjson.loads(common.body_mutation.body)
    assert sent["model"] == "fallback-chat"
    assert sent["stream_options"] == {"include_usage": True}
    assert set_headers(common) == {"x-gateway-model": "fallback-chat",
                                   "content-length": str(len(common.body_mutation.body))}


async def test_embeddings_body(proc: RouterProcessor) -> None:
    # `stream` means nothing for embeddings: no stream_options are added.
    resp = await send_request(proc, {**EMB, "stream": True}, path=EMB_PATH)
    common = resp.request_body.response
    sent = orjson.loads(common.body_mutation.body)
    assert sent == {"model": "text-embedding-3-small", "input": "hello world", "stream": True}
    assert set_headers(common) == {"x-gateway-model": "default-embedding", ":path": "/openai/v1/embeddings",
                                   "content-length": str(len(common.body_mutation.body))}
    assert metadata(resp)["gw"]["api"] == "embeddings"
    assert proc.stream is False and proc.prompt_tokens == EMB_PROMPT_TOKENS


@pytest.mark.parametrize(("body", "key", "status", "code", "param"), [
    ({**CHAT, "model": "gpt-5"}, ALL, 404, "model_not_found", "model"),
    ({**CHAT, "model": "secret-chat"}, LIMITED, 403, "model_not_allowed", "model"),
    (b'{"model": "default-chat", "messages": [', ALL, 400, "invalid_json", None),
    (b'{"model": "\xff"}', ALL, 400, "invalid_encoding", None),
    (b"[]", ALL, 400, "invalid_request", None),
    ({"model": "default-chat", "messages": []}, ALL, 400, "invalid_request", "messages"),
    ({**CHAT, "max_tokens": 0}, ALL, 400, "invalid_request", "max_tokens"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * MAX_BYTES}]}, ALL, 413, "request_too_large", None),
], ids=["unknown-model", "not-allowed", "bad-json", "bad-utf8", "array", "no-messages", "max-tokens", "too-large"])
async def test_request_body_rejections(proc: RouterProcessor, body: Any, key: str, status: int, code: str,
                                       param: str | None) -> None:
    assert_error(await send_request(proc, body, key=key), status, code, param)


async def test_model_not_found_message_points_to_models_list(proc: RouterProcessor) -> None:
    """The model field is caller text (a key pasted into it, a card): never quoted back."""
    _, body, _ = immediate(await send_request(proc, {**CHAT, "model": "gwk_pasted-into-the-model-field"}))
    assert "GET /v1/models" in body["error"]["message"] and "gwk_" not in body["error"]["message"]
    assert proc.requested is None  # nor kept for the audit trail


async def test_a_configured_model_the_key_may_not_use_is_kept_for_the_audit_trail(proc: RouterProcessor) -> None:
    assert_error(await send_request(proc, {**CHAT, "model": "secret-chat"}, key=LIMITED), 403, "model_not_allowed",
                 "model")
    assert proc.requested == "secret-chat"


async def test_large_body_is_tokenized_off_loop() -> None:
    """Bodies above LARGE_BYTES take the to_thread path and count the same."""
    runtime = Runtime.from_config(config.parse(gateway_doc(max_bytes=1 << 20), "big.yaml"))
    proc = RouterProcessor(runtime)
    text = "hello world " * (router.LARGE_BYTES // 12 + 10)
    body = {"model": "default-chat", "messages": [{"role": "user", "content": text}]}
    assert len(orjson.dumps(body)) > router.LARGE_BYTES
    await send_request(proc, body)
    import bpe_openai

    enc = bpe_openai.get_encoding("o200k_base")
    assert proc.prompt_tokens == 3 + 3 + 1 + len(enc.encode_ordinary(text))


# -- responses ---------------------------------------------------------------------------


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": choices, "usage": usage}


STREAM_USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
STREAM_EVENTS = [
    sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])),
    sse(chunk([{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}])),
    sse(chunk([{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}])),
]
USAGE_EVENT = sse(chunk([], STREAM_USAGE))
DONE = sse(b"[DONE]")


async def test_sse_response_headers_switch_to_streamed(proc: RouterProcessor) -> None:
    await send_request(proc, {**CHAT, "stream": True})
    resp = await proc.handle(resp_headers(content_type="text/event-stream; charset=utf-8",
                                          backend="openai/gpt-4o-mini"))
    assert resp.WhichOneof("response") == "response_headers"
    assert resp.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.STREAMED
    assert set_headers(resp.response_headers.response) == {"x-gateway-prompt-tokens": str(CHAT_PROMPT_TOKENS)}


async def test_json_response_headers_stay_buffered(proc: RouterProcessor) -> None:
    await send_request(proc, CHAT)
    resp = await proc.handle(resp_headers())
    assert resp.WhichOneof("response") == "response_headers"
    assert not resp.HasField("mode_override")
    assert not resp.response_headers.HasField("response")


def forwarded(resp: ep.ProcessingResponse, original: bytes) -> bytes:
    assert resp.WhichOneof("response") == "response_body"
    if not resp.response_body.HasField("response"):
        return original
    common = resp.response_body.response
    assert not common.header_mutation.set_headers
    return common.body_mutation.body


async def test_stream_drops_usage_chunk_client_did_not_ask_for(proc: RouterProcessor) -> None:
    await send_request(proc, {**CHAT, "stream": True})
    await proc.handle(resp_headers(content_type="text/event-stream"))
    chunks = [*STREAM_EVENTS, USAGE_EVENT, DONE]
    out = [forwarded(await proc.handle(resp_body(c, end=i == len(chunks) - 1)), c) for i, c in enumerate(chunks)]
    assert out == [*STREAM_EVENTS, b"", DONE]
    assert proc.usage is not None and (proc.usage.prompt_tokens, proc.usage.completion_tokens) == (11, 2)


async def test_stream_drops_usage_chunk_split_across_messages(proc: RouterProcessor) -> None:
    await send_request(proc, {**CHAT, "stream": True})
    await proc.handle(resp_headers(content_type="text/event-stream"))
    whole = b"".join([*STREAM_EVENTS, USAGE_EVENT, DONE])
    cut = len(b"".join(STREAM_EVENTS)) + 20  # inside the usage event
    parts = [whole[:cut], whole[cut:cut + 7], whole[cut + 7:]]
    out = b"".join([forwarded(await proc.handle(resp_body(p, end=i == 2)), p) for i, p in enumerate(parts)])
    assert out == b"".join([*STREAM_EVENTS, DONE])


async def test_stream_keeps_usage_chunk_client_asked_for(proc: RouterProcessor) -> None:
    await send_request(proc, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    await proc.handle(resp_headers(content_type="text/event-stream"))
    chunks = [*STREAM_EVENTS, USAGE_EVENT, DONE]
    responses = [await proc.handle(resp_body(c, end=i == len(chunks) - 1)) for i, c in enumerate(chunks)]
    assert all(not r.response_body.HasField("response") for r in responses)  # everything forwarded as is
    assert proc.usage is not None and proc.usage.completion_tokens == 2


@pytest.mark.parametrize(("body", "path", "response", "expected"), [
    (CHAT, CHAT_PATH,
     {"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
      "usage": {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21,
                "prompt_tokens_details": {"cached_tokens": 0}}},
     {"x-gateway-prompt-tokens": "14", "x-gateway-completion-tokens": "7"}),  # provider's count wins
    (EMB, EMB_PATH,
     {"object": "list", "data": [], "usage": {"prompt_tokens": 3, "total_tokens": 3}},
     {"x-gateway-prompt-tokens": "3"}),
    (CHAT, CHAT_PATH, {"id": "chatcmpl-1", "choices": []},  # no usage: the local count
     {"x-gateway-prompt-tokens": str(CHAT_PROMPT_TOKENS)}),
], ids=["chat", "embeddings", "no-usage"])
async def test_buffered_response_token_headers(proc: RouterProcessor, body: dict, path: str, response: dict,
                                               expected: dict[str, str]) -> None:
    await send_request(proc, body, path=path)
    await proc.handle(resp_headers())
    resp = await proc.handle(resp_body(orjson.dumps(response)))
    assert resp.WhichOneof("response") == "response_body"
    common = resp.response_body.response
    assert set_headers(common) == expected
    assert not common.HasField("body_mutation")  # the body itself is never touched


async def test_error_response_usage_is_not_trusted(proc: RouterProcessor) -> None:
    await send_request(proc, CHAT)
    await proc.handle(resp_headers(status=500))
    resp = await proc.handle(resp_body(b'{"error": {"message": "boom"}, "usage": {"prompt_tokens": 999}}'))
    assert set_headers(resp.response_body.response) == {"x-gateway-prompt-tokens": str(CHAT_PROMPT_TOKENS)}


async def test_unexpected_message_kind(proc: RouterProcessor) -> None:
    with pytest.raises(ValueError, match="request_trailers"):
        await proc.handle(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))


# -- access log --------------------------------------------------------------------------


def access_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "access"]


def assert_no_key_in_logs(logs: list[dict[str, Any]], *secrets: str) -> None:
    text = repr(logs)
    for secret in secrets:
        assert secret not in text
        tail = secret.rsplit("_", 1)[-1]  # the random part; a short one ("k") matches any word
        assert len(tail) < 8 or tail not in text


async def test_access_log_complete_buffered_request(proc: RouterProcessor) -> None:
    with structlog.testing.capture_logs() as logs:
        await send_request(proc, CHAT)
        await proc.handle(resp_headers(backend="openai/gpt-4o-mini"))
        await proc.handle(resp_body(orjson.dumps({"usage": {"prompt_tokens": 14, "completion_tokens": 7}})))
        proc.close()  # the stream ends: must not log a second line
    (event,) = access_events(logs)
    expected = {
        "event": "access", "log_level": "info", "outcome": "complete", "request_id": "req-123",
        "method": "POST", "path": CHAT_PATH, "key_id": "all-models", "team": "search",
        "model": "default-chat", "backend": "openai/gpt-4o-mini", "status": 200, "error_code": None,
        "stream": False, "prompt_tokens": 14, "prompt_tokens_local": CHAT_PROMPT_TOKENS,
        "completion_tokens": 7, "ttft_ms": None,
    }
    assert {k: event.get(k, "<absent>") for k in expected} == expected
    assert isinstance(event["duration_ms"], float) and event["duration_ms"] >= 0
    assert_no_key_in_logs(logs, ALL)


async def test_access_log_streamed_request(proc: RouterProcessor) -> None:
    with structlog.testing.capture_logs() as logs:
        await send_request(proc, {**CHAT, "stream": True}, key=LIMITED)
        await proc.handle(resp_headers(content_type="text/event-stream", backend="openai/gpt-4o-mini"))
        chunks = [*STREAM_EVENTS, USAGE_EVENT, DONE]
        for i, c in enumerate(chunks):
            await proc.handle(resp_body(c, end=i == len(chunks) - 1))
        proc.close()
    (event,) = access_events(logs)
    assert event["outcome"] == "complete"
    assert (event["key_id"], event["team"], event["model"], event["stream"]) == ("limited", "ads", "default-chat", True)
    assert (event["prompt_tokens"], event["prompt_tokens_local"], event["completion_tokens"]) == (
        11, CHAT_PROMPT_TOKENS, 2)
    assert event["ttft_ms"] is not None and event["ttft_ms"] >= 0
    assert_no_key_in_logs(logs, LIMITED)


@pytest.mark.parametrize(("messages", "status", "code", "key_id", "model", "secret"), [
    ([req_headers(key="gwk_all-models_thisIsTheWrongSecretValue")], 401, "invalid_api_key", None, None,
     "gwk_all-models_thisIsTheWrongSecretValue"),
    ([req_headers(key=None, x_api_key="sk-live-providerSecret123456")], 401, "invalid_api_key", None, None,
     "sk-live-providerSecret123456"),
    ([req_headers(key=EXPIRED)], 401, "expired_api_key", None, None, EXPIRED),
    ([req_headers(content_type="text/plain")], 415, "unsupported_media_type", "all-models", None, ALL),
    ([req_headers(), req_body({**CHAT, "model": "nope"})], 404, "model_not_found", "all-models", None, ALL),
    ([req_headers(key=LIMITED), req_body({**CHAT, "model": "secret-chat"})], 403, "model_not_allowed",
     "limited", None, LIMITED),
], ids=["wrong-secret", "provider-key", "expired", "media-type", "unknown-model", "not-allowed"])
async def test_access_log_rejections(proc: RouterProcessor, messages: list[ep.ProcessingRequest], status: int,
                                     code: str, key_id: str | None, model: str | None, secret: str) -> None:
    with structlog.testing.capture_logs() as logs:
        for m in messages:
            await proc.handle(m)
        proc.close()
    (event,) = access_events(logs)
    assert (event["outcome"], event["status"], event["error_code"]) == ("complete", status, code)
    assert (event["key_id"], event["model"]) == (key_id, model)
    assert event["prompt_tokens"] is None and event["completion_tokens"] is None
    assert_no_key_in_logs(logs, secret)


async def test_access_log_models_list(proc: RouterProcessor) -> None:
    with structlog.testing.capture_logs() as logs:
        await proc.handle(req_headers("GET", "/v1/models", key=LIMITED, content_type=None, end=True))
        proc.close()
    (event,) = access_events(logs)
    assert (event["status"], event["path"], event["key_id"], event["error_code"]) == (200, "/v1/models", "limited",
                                                                                     None)
    assert_no_key_in_logs(logs, LIMITED)


async def test_access_log_incomplete_when_stream_closes_early(proc: RouterProcessor) -> None:
    with structlog.testing.capture_logs() as logs:
        await send_request(proc, CHAT)
        proc.close()
        proc.close()
    (event,) = access_events(logs)
    assert event["outcome"] == "incomplete"
    assert event["status"] == 0 and event["model"] == "default-chat"
    assert event["prompt_tokens"] == CHAT_PROMPT_TOKENS


async def test_a_client_gone_after_the_usage_chunk_is_logged_with_that_usage(proc: RouterProcessor) -> None:
    """SDKs stop reading at [DONE] (or the usage chunk) and close: the body's end may never
    reach the processor, but the provider's usage went by and is what counts."""
    with structlog.testing.capture_logs() as logs:
        await send_request(proc, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        await proc.handle(resp_headers(content_type="text/event-stream"))
        for chunk in [*STREAM_EVENTS, USAGE_EVENT]:
            await proc.handle(resp_body(chunk, end=False))
        proc.close()
    (event,) = access_events(logs)
    assert event["outcome"] == "incomplete"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (11, 2)


async def test_access_log_headers_only_response(proc: RouterProcessor) -> None:
    with structlog.testing.capture_logs() as logs:
        await send_request(proc, CHAT)
        resp = await proc.handle(resp_headers(status=503, end=True))
        proc.close()
    assert resp.WhichOneof("response") == "response_headers"
    (event,) = access_events(logs)
    assert (event["outcome"], event["status"]) == ("complete", 503)


async def test_sse_response_loses_content_length_because_the_gateway_may_change_its_length(
        proc: RouterProcessor) -> None:
    sent = await send_request(proc, {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}],
                                     "stream": True})
    assert not sent.HasField("immediate_response")
    msg = resp_headers(content_type="text/event-stream")
    msg.response_headers.headers.headers.append(HeaderValue(key="content-length", raw_value=b"1234"))
    resp = await proc.handle(msg)
    assert "content-length" in resp.response_headers.response.header_mutation.remove_headers


# -- answers from providers that do not speak OpenAI (translated here, not per attempt) ----

CLAUDE = {"model": "claude-chat", "messages": [{"role": "user", "content": "hello world"}]}
CLAUDE_MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                  "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
                  "usage": {"input_tokens": 5, "output_tokens": 2}}


async def test_anthropic_json_answer_is_translated_at_the_router(proc: RouterProcessor) -> None:
    await send_request(proc, CLAUDE)
    head = await proc.handle(resp_headers(200, backend="claude/claude-x"))
    assert not head.HasField("mode_override")  # the router's own BUFFERED mode
    assert set_headers(head.response_headers.response)["content-type"] == "application/json"
    out = (await proc.handle(resp_body(orjson.dumps(CLAUDE_MESSAGE)))).response_body.response
    done = orjson.loads(out.body_mutation.body)
    assert done["choices"][0]["message"]["content"] == "Hello!"
    assert {k: done["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    headers = set_headers(out)
    assert headers["content-length"] == str(len(out.body_mutation.body))
    assert headers["x-gateway-completion-tokens"] == "2"  # usage read from the translated answer


async def test_openai_backend_of_the_same_model_is_not_translated(proc: RouterProcessor) -> None:
    await send_request(proc, CLAUDE)
    await proc.handle(resp_headers(200, backend="backup/gpt-4o-backup"))
    body = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    out = (await proc.handle(resp_body(body))).response_body.response
    assert not out.HasField("body_mutation")


async def test_anthropic_stream_is_translated_chunk_by_chunk_at_the_router(proc: RouterProcessor) -> None:
    await send_request(proc, {**CLAUDE, "stream": True})
    head = await proc.handle(resp_headers(200, "text/event-stream", backend="claude/claude-x"))
    assert head.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.STREAMED
    assert "content-length" in head.response_headers.response.header_mutation.remove_headers
    start = b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-x",' \
            b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n'
    out = (await proc.handle(resp_body(start, end=False))).response_body.response.body_mutation.body
    assert orjson.loads(out.removeprefix(b"data: "))["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # A provider event split across chunks yields nothing until it is whole.
    assert (await proc.handle(resp_body(b"event: content_block_delta\ndata: {", end=False))
            ).response_body.response.body_mutation.body == b""


async def test_unreadable_provider_answers_become_provider_errors(proc: RouterProcessor) -> None:
    await send_request(proc, CLAUDE)
    await proc.handle(resp_headers(200, backend="claude/claude-x"))
    out = (await proc.handle(resp_body(b"<html>oops</html>"))).response_body.response.body_mutation.body
    assert orjson.loads(out)["error"]["code"] == "provider_error"


# -- invariant: no request or reply makes the router fail -----------------------------------
# A processor that raises becomes server.py's 500 gateway_internal_error (request phases) or
# a reply passed through unaccounted (response phases). Bad input must get its own 4xx.

def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # any int, NaN and Infinity too (orjson refuses them)


_SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
_JSON = st.recursive(_SCALAR, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.sampled_from(["role", "content", "type", "text", "name", "tool_calls", "image_url", "url", "source",
                     "id", "arguments", "function", "input", "parameters", "x"]) | st.text(max_size=8),
    kids, max_size=4), max_leaves=16)
_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "image", "input_text", "tool_use",
                                                        "tool_result", "document"]) | _JSON},
                              optional={"text": _JSON, "image_url": _JSON, "source": _JSON, "content": _JSON,
                                        "input": _JSON, "id": _JSON})
_MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "function"]) | _JSON,
    "content": st.text(max_size=60) | st.lists(_PART | _JSON, max_size=3) | _JSON,
    "name": _JSON, "tool_calls": _JSON, "tool_call_id": _JSON})
_CHAOS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["default-chat", "claude-chat", "fallback-chat", "default-embedding", "nope"]) | _JSON,
    "messages": st.lists(_MESSAGE, max_size=4) | _JSON,
    "input": st.text(max_size=40) | st.lists(st.text(max_size=20) | st.integers() | _MESSAGE, max_size=3) | _JSON,
    "instructions": _JSON, "system": st.text(max_size=20) | st.lists(_PART, max_size=2) | _JSON,
    "stream": st.booleans() | _JSON, "stream_options": _JSON, "max_tokens": st.integers() | _JSON,
    "max_completion_tokens": _JSON, "max_output_tokens": _JSON, "n": _JSON, "tools": _JSON, "user": _JSON})
_CHAT_MODEL = st.sampled_from(["default-chat", "claude-chat", "fallback-chat", "passthrough-chat", "secret-chat",
                               "private-chat", "gemini-chat", "azure-chat"])  # this file's config and values-local
_TEXT = st.text(max_size=80)
_GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                       "content": _TEXT | st.lists(st.fixed_dictionaries(
                                           {"type": st.just("text"), "text": _TEXT}), min_size=1, max_size=2)})
_EXTRA = st.fixed_dictionaries({}, optional={"stream": st.booleans(), "max_tokens": st.integers(-5, 10**7),
                                             "stream_options": _JSON, "tools": _JSON, "temperature": _JSON})
# Bodies the router admits or nearly so, per endpoint (so the reply phases are reached too).
_NEAR_VALID = {
    CHAT_PATH: st.fixed_dictionaries({"model": _CHAT_MODEL, "messages": st.lists(_GOOD_MESSAGE, min_size=1,
                                                                                 max_size=3)}),
    "/v1/messages": st.fixed_dictionaries({"model": _CHAT_MODEL, "max_tokens": st.integers(1, 4096),
                                           "messages": st.lists(_GOOD_MESSAGE, min_size=1, max_size=3)},
                                          optional={"system": _TEXT}),
    "/v1/responses": st.fixed_dictionaries({"model": _CHAT_MODEL,
                                            "input": _TEXT | st.lists(_GOOD_MESSAGE, min_size=1, max_size=2)},
                                           optional={"instructions": _TEXT}),
    EMB_PATH: st.fixed_dictionaries({"model": st.just("default-embedding"),
                                     "input": _TEXT | st.lists(_TEXT | st.lists(st.integers(0, 10**6), max_size=3),
                                                               min_size=1, max_size=3)}),
}
_REQUEST = st.sampled_from(sorted(_NEAR_VALID)).flatmap(lambda path: st.tuples(st.just(path), st.one_of(
    st.tuples(_NEAR_VALID[path], _EXTRA).map(lambda b: {**b[0], **b[1]}), _CHAOS)))
_COUNT = st.integers(-3, 10**12) | _JSON
_USAGE = st.fixed_dictionaries({}, optional={"prompt_tokens": _COUNT, "completion_tokens": _COUNT,
                                             "input_tokens": _COUNT, "output_tokens": _COUNT,
                                             "total_tokens": _COUNT, "prompt_tokens_details": _JSON})
_REPLY = st.one_of(
    _JSON.map(_dumps),
    st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({}, optional={
        "message": st.fixed_dictionaries({}, optional={"role": _JSON, "content": _TEXT | _JSON}),
        "delta": st.fixed_dictionaries({}, optional={"content": _TEXT | _JSON}),
        "finish_reason": _JSON, "index": _JSON}), max_size=2) | _JSON}, optional={"usage": _USAGE | _JSON}
    ).map(_dumps),
    st.fixed_dictionaries({"type": st.sampled_from(["message", "message_start", "content_block_delta",
                                                    "message_delta", "error"]) | _JSON},
                          optional={"content": st.lists(st.fixed_dictionaries(
                              {"type": st.just("text"), "text": _TEXT}), max_size=2) | _JSON,
                              "usage": _USAGE, "message": _JSON, "delta": _JSON, "error": _JSON}).map(_dumps),
    st.fixed_dictionaries({}, optional={"output": _JSON, "usage": _USAGE, "error": _JSON, "model": _JSON}
                          ).map(_dumps),
    st.binary(max_size=64))


@pytest.fixture(scope="module")
def local_runtime() -> Runtime:
    """helm/values-local.yaml as rendered: every provider kind, output scanning, budgets."""
    values = chart_values([Path(__file__).resolve().parents[1] / "helm" / "values-local.yaml"])
    return Runtime.from_config(config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "values-local"))


LOCAL_KEY = "gwk_demo_local-only-demo-key-not-for-production"  # its hash is in values-local.yaml


@pytest.mark.parametrize("which", ["this file's config", "values-local"])
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(request=_REQUEST, stream=st.booleans(), status=st.sampled_from([200, 400, 429, 500]), reply=_REPLY,
       data=st.data())
def test_no_body_or_reply_makes_the_router_fail(runtime: Runtime, local_runtime: Runtime, which: str,
                                               request: tuple[str, dict], stream: bool, status: int, reply: bytes,
                                               data: st.DataObject) -> None:
    rt, key = (runtime, ALL) if which != "values-local" else (local_runtime, LOCAL_KEY)
    backend = data.draw(st.sampled_from([*sorted(rt.config.backends), "bogus"]), label="backend")
    path, body = request

    async def one() -> None:
        proc = RouterProcessor(rt)
        try:
            out = await send_request(proc, _dumps(body), path=path, key=key)
            if out.WhichOneof("response") == "immediate_response":
                code, error, _ = immediate(out)
                assert 400 <= code < 500, error
                event(f"refused: {error['error']['code']}")
                return
            event("admitted")
            ctype = "text/event-stream" if stream else "application/json"
            await proc.handle(resp_headers(status, ctype, backend=backend))
            await proc.handle(resp_body(b"data: " + reply + b"\n\n" if stream else reply))
        finally:
            proc.close()
            await settlements.settled(5.0)  # no budget settlement outlives this example's event loop

    asyncio.run(one())



@pytest.mark.parametrize(("stream", "label", "read_as", "sent_label"), [
    (False, "text/event-stream", "whole", "application/json"),  # a JSON answer mislabelled: read whole
    (True, "text/plain", "stream", "text/event-stream"),  # a stream mislabelled: read and labelled as one
    (True, "text/event-stream", "stream", None),
    (False, "application/json", "whole", None),
])
async def test_an_answer_is_read_as_the_request_asked_whatever_its_label(
        proc: RouterProcessor, stream: bool, label: str, read_as: str, sent_label: str | None) -> None:
    """A non-streamed request whose provider labelled its JSON answer `text/event-stream` got
    200 with an SSE error event (the SDK returned that text as the completion)."""
    await send_request(proc, {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}],
                              "stream": stream})
    head = await proc.handle(resp_headers(content_type=label))
    assert (head.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.STREAMED) == (
        read_as == "stream")
    assert set_headers(head.response_headers.response).get("content-type") == sent_label
    if read_as == "whole":
        answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        out = (await proc.handle(resp_body(orjson.dumps(answer)))).response_body.response
        assert not out.body_mutation.body or orjson.loads(out.body_mutation.body)["choices"][0]["message"][
            "content"] == "Hello"
        assert set_headers(out)["x-gateway-completion-tokens"] == "1"


@pytest.mark.parametrize("case", ["client-gone-before-the-answer", "responses-stream-left", "chat-stream-left",
                                  "chat-stream-whole-without-usage"])
async def test_an_answer_whose_bill_is_unknown_is_charged_the_reservation(local_runtime: Runtime, case: str) -> None:
    """The provider's usage never came: charged the reservation (the most it can bill with the
    cap it was sent), not the prompt plus one token per event streamed (spend ran 12-287x past
    budgets under attack: multi-token events, Responses deltas counted as nothing, clients
    gone before the answer charged the prompt only). A stream that ended itself without usage
    is charged what it streamed: the tokens of its text, not one per event."""
    path = "/v1/responses" if case.startswith("responses") else CHAT_PATH
    body = ({"model": "default-chat", "input": "hi", "stream": True} if path != CHAT_PATH else
            {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
             "stream": case != "client-gone-before-the-answer"})
    # values-local: budgets in memory; a store of its own, which the property tests before it
    # (hundreds of requests on the module's runtime) have not spent
    proc = RouterProcessor(Runtime.from_config(local_runtime.config))
    sent = await send_request(proc, body, path=path, key=LOCAL_KEY)
    assert not sent.HasField("immediate_response") and proc.admission is not None
    reserved = proc.admission.result
    if case != "client-gone-before-the-answer":
        await proc.handle(resp_headers(content_type="text/event-stream"))
        if case == "responses-stream-left":
            events = b"".join(b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                              b'"delta":"many words at once"}\n\n' for _ in range(3))
        else:
            events = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"many words at once"}}]}\n\n'
                              for _ in range(3))
        whole = case == "chat-stream-whole-without-usage"
        await proc.handle(resp_body(events + (b"data: [DONE]\n\n" if whole else b""), end=whole))
    spent = proc.consumed(None)
    if case == "chat-stream-whole-without-usage":
        assert spent.completion == 3 * 4 and spent.cost < reserved.reserved_nano  # 4 tokens an event
    else:
        assert (spent.cost, spent.completion) == (reserved.reserved_nano, reserved.output_tokens)


def _running_usage(n: int, finish: str | None = None, content: str = " word") -> bytes:
    """A chunk of a server that reports usage so far on every chunk (vLLM's
    `stream_options.continuous_usage_stats`, which a client may ask for: the router keeps
    the client's stream options), `n` output tokens in."""
    return sse(chunk([{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
                     {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}))


@pytest.mark.parametrize(("case", "events", "end", "charged"), [
    # Cut after a running count: the provider may have gone on generating (the count is not its bill).
    ("client gone mid-stream", [_running_usage(1), _running_usage(2)], None, "reservation"),
    ("provider ended mid-stream", [_running_usage(1), _running_usage(2)], b"", "reservation"),
    ("text after a usage-only chunk", [sse(chunk([], {"prompt_tokens": 8, "completion_tokens": 0,
                                                      "total_tokens": 8})), 
                                      sse(chunk([{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]))],
     None, "reservation"),
    # A stream that ends itself after text that followed its last count: that count was no
    # bill either (until 2026-12-08 it was: 1 token charged for 800 of text).
    ("text after the count, then [DONE]", [_running_usage(1), *[sse(chunk([{"index": 0, "delta": {
        "content": " word"}, "finish_reason": None}]))] * 3, sse(chunk([{"index": 0, "delta": {},
                                                                          "finish_reason": "stop"}])), DONE],
     b"", "reservation"),
    ("text after the count, then an error event", [_running_usage(1), sse(chunk([{"index": 0, "delta": {
        "content": " word"}, "finish_reason": None}])), b'data: {"error": {"message": "overloaded"}}\n\n'],
     b"", "reservation"),
    # The count on the chunk that finished the answer, or on the usage-only chunk, is the bill.
    ("whole stream", [_running_usage(1), _running_usage(2, "stop"), DONE], b"", 2),
    ("count, then the finish without text, then [DONE]", [_running_usage(1), _running_usage(2), sse(chunk([{
        "index": 0, "delta": {}, "finish_reason": "stop"}])), DONE], b"", 2),
    ("client gone after the finishing chunk", [_running_usage(1), _running_usage(2, "stop")], None, 2),
    ("client gone after the usage chunk", [_running_usage(1), _running_usage(2, "stop"),
                                           sse(chunk([], {"prompt_tokens": 8, "completion_tokens": 3,
                                                          "total_tokens": 11}))], None, 3),
])
async def test_a_running_usage_count_is_no_bill_for_a_stream_cut_short(
        local_runtime: Runtime, case: str, events: list[bytes], end: bytes | None, charged: str | int) -> None:
    """A stream whose provider reports usage on every chunk and that is cut off (the client
    hangs up after the first chunk, or the provider's connection drops) was charged the
    count of its last chunk (2 tokens of a 500-token reservation: 1/125th), though the
    provider may have generated up to the cap it was sent before it noticed. Only a count
    sent with the answer's finish (or on the usage-only chunk) is the provider's bill."""
    proc = RouterProcessor(Runtime.from_config(local_runtime.config))
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    sent = await send_request(proc, body, key=LOCAL_KEY)
    assert not sent.HasField("immediate_response") and proc.admission is not None
    await proc.handle(resp_headers(content_type="text/event-stream", backend="mock/mock-gpt-4o-mini"))
    for e in events:
        await proc.handle(resp_body(e, end=False))
    if end is not None:
        await proc.handle(resp_body(end, end=True))
    proc.close()
    spent, reserved = proc.consumed(proc.answered_by()), proc.admission.result
    if charged == "reservation":
        assert (spent.cost, spent.completion) == (reserved.reserved_nano, reserved.output_tokens), case
    else:
        assert spent.completion == charged and spent.cost < reserved.reserved_nano, case


async def test_an_answer_is_priced_at_its_models_backend_not_another_models_of_the_same_name() -> None:
    """Two models may list the same provider model (an alias for another team, a model of its
    own tier) at prices of their own; Envoy names the backend that answered `provider/model`.
    The answer was priced at whichever model the config listed last: a request to the dear
    model, answered by its backend, was charged the alias's price (1/1000th here)."""
    values = chart_values([Path(__file__).resolve().parents[1] / "helm" / "values-local.yaml"])
    values["models"].append({"name": "cheap-alias", "tokenizer": "o200k_base", "backends": [
        {"provider": "mock", "model": "mock-primary", "pricing": {"input": 0.005, "output": 0.02},
         "maxTier": "internal"}]})
    cfg = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "values-local")
    proc = RouterProcessor(Runtime.from_config(cfg))
    sent = await send_request(proc, {"model": "fallback-chat", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 100}, key=LOCAL_KEY)
    assert not sent.HasField("immediate_response") and proc.admission is not None
    await proc.handle(resp_headers(backend="mock/mock-primary"))
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "mock-primary", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050}}
    await proc.handle(resp_body(orjson.dumps(answer)))
    spent = proc.consumed(proc.answered_by())
    assert spent.cost == 1000 * 5_000 + 50 * 20_000  # fallback-chat's primary: $5 / $20 per 1M tokens


@pytest.mark.parametrize(("cap", "budget", "refused"), [
    ({}, 4096, True),  # no cap sent: Claude gets the translator's default, 4,096
    ({}, 4095, False),
    ({"max_tokens": 3000}, 3000, True),
    ({"max_completion_tokens": 3000, "max_tokens": 9000}, 5000, True),  # (max_completion_tokens goes out)
    ({"max_tokens": 3000}, 2999, False),
])
async def test_without_budgets_a_thinking_budget_not_below_the_cap_sent_is_refused(
        proc: RouterProcessor, cap: dict[str, int], budget: int, refused: bool) -> None:
    """Claude refuses budget_tokens >= max_tokens; without budgets the cap sent is the client's."""
    resp = await send_request(proc, {**CLAUDE, **cap, "thinking": {"type": "enabled", "budget_tokens": budget}})
    if refused:
        assert_error(resp, 400, "thinking_budget_too_large", "thinking.budget_tokens")
    else:
        assert resp.WhichOneof("response") == "request_body"
