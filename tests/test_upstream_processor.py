"""Unit tests for the per-attempt upstream ext_proc processor, driven message by message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from gateway_extproc._proto.envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from prometheus_client import REGISTRY

from gateway_extproc import config
from gateway_extproc.processors import responses as r
from gateway_extproc.processors import upstream
from gateway_extproc.processors.upstream import UpstreamProcessor, is_upstream
from gateway_extproc.runtime import Runtime
from tests.extproc_messages import set_headers

OPENAI_KEY = "sk-test-openai-credential-0123456789"
BACKUP_KEY = "sk-test-backup-credential-9876543210"
OPENAI_ENV = "GW_TEST_UPSTREAM_OPENAI_KEY"
MISSING_ENV = "GW_TEST_UPSTREAM_UNSET_KEY"


def gateway_doc(backup_file: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "listen": ["unix:///tmp/gw-test.sock"],
        "providers": [
            {"name": "openai", "kind": "openai", "baseURL": "https://api.example.com/openai/v1",
             "credential": {"env": OPENAI_ENV}},
            {"name": "backup", "kind": "openai", "baseURL": "http://backup.example:8081/v1/",
             "credential": {"file": str(backup_file)}},
            {"name": "nokey", "kind": "openai", "baseURL": "http://nokey.example",
             "credential": {"env": MISSING_ENV}},
            {"name": "claude", "kind": "anthropic", "baseURL": "https://api.anthropic.example/v1",
             "credential": {"env": OPENAI_ENV}},
        ],
        "models": [
            {"name": "fallback-chat", "tokenizer": "estimate",
             "backends": [{"provider": "openai", "model": "gpt-4o", "priority": 0},
                          {"provider": "backup", "model": "gpt-4o-backup", "priority": 1},
                          {"provider": "nokey", "model": "last-resort", "priority": 2}]},
            {"name": "claude-chat", "tokenizer": "estimate",
             "backends": [{"provider": "claude", "model": "claude-x"}]},
            {"name": "default-embedding", "tokenizer": "estimate",
             "backends": [{"provider": "backup", "model": "embed-small"}]},
        ],
    }


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv(OPENAI_ENV, f"  {OPENAI_KEY}\n")  # surrounding whitespace is trimmed
    monkeypatch.delenv(MISSING_ENV, raising=False)
    key_file = tmp_path / "backup.key"
    key_file.write_text(BACKUP_KEY + "\n", encoding="utf-8")
    return Runtime.from_config(config.parse(gateway_doc(key_file), "test-gateway.yaml"))


@pytest.fixture
def proc(runtime: Runtime) -> UpstreamProcessor:
    return UpstreamProcessor(runtime)


def attempt_headers(backend: str | None = "openai/gpt-4o", api: str | None = "chat",
                    request_id: str | None = "req-9", path: str = "/v1/chat/completions") -> ep.ProcessingRequest:
    """request_headers as Envoy sends them to an upstream ext_proc filter for one attempt."""
    headers = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in {
        ":method": "POST", ":path": path, "content-type": "application/json",
        "x-gateway-model": "fallback-chat"}.items()])
    req = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=headers))
    if backend is not None:
        attrs = struct_pb2.Struct()
        attrs.update({upstream.BACKEND_ATTRIBUTE: backend})
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    gw = {k: v for k, v in {"model": "fallback-chat", "api": api, "request_id": request_id}.items() if v is not None}
    gw_struct = struct_pb2.Struct()
    gw_struct.update(gw)
    req.metadata_context.CopyFrom(Metadata(filter_metadata={"gw": gw_struct}))
    return req


def attempt_body(body: dict[str, Any]) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(body), end_of_stream=True))


def assert_immediate_error(resp: ep.ProcessingResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.WhichOneof("response") == "immediate_response"
    imm = resp.immediate_response
    assert imm.status.code == status
    assert imm.details == f"gw_{code}"
    body = orjson.loads(imm.body)
    assert body["error"]["code"] == code and body["error"]["type"] == "server_error"
    return body


# -- is_upstream -------------------------------------------------------------------------


def test_is_upstream() -> None:
    assert is_upstream(attempt_headers()) is True
    assert is_upstream(attempt_headers(backend=None)) is False
    plain = ep.ProcessingRequest(request_headers=ep.HttpHeaders())
    assert is_upstream(plain) is False
    other_attrs = ep.ProcessingRequest(request_headers=ep.HttpHeaders())
    other_attrs.attributes["envoy.filters.http.ext_proc"].update({"request.path": "/v1/chat/completions"})
    assert is_upstream(other_attrs) is False


# -- request headers ---------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "api", "path", "credential"), [
    ("openai/gpt-4o", "chat", "/openai/v1/chat/completions", OPENAI_KEY),  # env credential
    ("backup/gpt-4o-backup", "chat", "/v1/chat/completions", BACKUP_KEY),  # file credential
    ("backup/embed-small", "embeddings", "/v1/embeddings", BACKUP_KEY),
])
async def test_attempt_sets_path_and_credential(proc: UpstreamProcessor, backend: str, api: str, path: str,
                                                credential: str) -> None:
    resp = await proc.handle(attempt_headers(backend=backend, api=api))
    assert resp.WhichOneof("response") == "request_headers"
    # OpenAI-schema backends: the response passes through untouched (no response phases).
    assert not resp.HasField("mode_override")
    assert proc.backend is not None and proc.backend.id == backend
    common = (await proc.handle(attempt_body({"model": "m", "input": "x"}))).request_body.response
    new = common.body_mutation.body
    assert set_headers(common) == {":path": path, "authorization": f"Bearer {credential}",
                                   "content-length": str(len(new))}
    assert not common.header_mutation.remove_headers


async def test_headers_do_not_log_the_credential(proc: UpstreamProcessor) -> None:
    with structlog.testing.capture_logs() as logs:
        await proc.handle(attempt_headers())
    assert logs == []  # Envoy logs each attempt (upstream_log); the ext_proc adds no line per attempt
    assert OPENAI_KEY not in repr(logs)


async def test_missing_request_id_is_tolerated(proc: UpstreamProcessor) -> None:
    resp = await proc.handle(attempt_headers(request_id=None))
    assert resp.WhichOneof("response") == "request_headers"


@pytest.mark.parametrize(("backend", "api"), [
    ("openai/gpt-5", "chat"),  # Envoy names a backend the ext_proc config does not have
    ("", "chat"),
    ("openai/gpt-4o", "completions"),  # unknown api in the router's metadata
    ("openai/gpt-4o", None),  # no api in the metadata at all
], ids=["unknown-backend", "empty-backend", "unknown-api", "no-api"])
async def test_config_mismatch_is_internal_error(proc: UpstreamProcessor, backend: str, api: str | None) -> None:
    with structlog.testing.capture_logs() as logs:
        resp = await proc.handle(attempt_headers(backend=backend, api=api))
    body = assert_immediate_error(resp, 500, "gateway_internal_error")
    assert "re-render" in body["error"]["message"]
    assert [e["event"] for e in logs] == ["upstream_config_mismatch"]
    assert logs[0]["log_level"] == "error"
    assert proc.backend is None


async def test_missing_gw_metadata_is_internal_error(proc: UpstreamProcessor) -> None:
    req = attempt_headers()
    req.ClearField("metadata_context")
    assert_immediate_error(await proc.handle(req), 500, "gateway_internal_error")


async def test_missing_credential(proc: UpstreamProcessor) -> None:
    resp = await proc.handle(attempt_headers(backend="nokey/last-resort"))
    body = assert_immediate_error(resp, 500, "provider_credential_missing")
    assert "'nokey'" in body["error"]["message"]
    assert proc.backend is None


async def test_empty_credential_file_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPENAI_ENV, OPENAI_KEY)
    empty = tmp_path / "empty.key"
    empty.write_text("\n", encoding="utf-8")
    runtime = Runtime.from_config(config.parse(gateway_doc(empty), "t.yaml"))
    assert runtime.credentials == {"openai": OPENAI_KEY, "backup": None, "nokey": None, "claude": OPENAI_KEY}
    resp = await UpstreamProcessor(runtime).handle(attempt_headers(backend="backup/gpt-4o-backup"))
    assert_immediate_error(resp, 500, "provider_credential_missing")


async def test_unreadable_credential_file_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPENAI_ENV, OPENAI_KEY)
    runtime = Runtime.from_config(config.parse(gateway_doc(tmp_path / "does-not-exist"), "t.yaml"))
    assert runtime.credentials["backup"] is None


# -- request body ------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "model"), [
    ("openai/gpt-4o", "gpt-4o"),
    ("backup/gpt-4o-backup", "gpt-4o-backup"),
])
async def test_body_renames_model_for_this_attempt(proc: UpstreamProcessor, backend: str, model: str) -> None:
    forwarded = {"model": "fallback-chat", "messages": [{"role": "user", "content": "h\u00e9llo"}],
                 "stream": True, "stream_options": {"include_usage": True}}
    await proc.handle(attempt_headers(backend=backend))
    resp = await proc.handle(attempt_body(forwarded))
    assert resp.WhichOneof("response") == "request_body"
    common = resp.request_body.response
    new = common.body_mutation.body
    assert orjson.loads(new) == {**forwarded, "model": model}  # everything else is kept
    assert set_headers(common)["content-length"] == str(len(new))
    assert not resp.HasField("dynamic_metadata")


async def test_body_rename_is_idempotent(proc: UpstreamProcessor) -> None:
    """A retry starts from the router's body; an already-renamed body comes out the same."""
    await proc.handle(attempt_headers())
    first = (await proc.handle(attempt_body({"model": "fallback-chat", "input": "x"}))).request_body.response
    again = (await proc.handle(attempt_body(orjson.loads(first.body_mutation.body)))).request_body.response
    assert again.body_mutation.body == first.body_mutation.body


async def test_unexpected_message_kind(proc: UpstreamProcessor) -> None:
    with pytest.raises(ValueError, match="request_trailers"):
        await proc.handle(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))


def test_close_before_any_backend_counts_nothing(proc: UpstreamProcessor) -> None:
    proc.close()


# -- responses: translation and per-attempt counts -------------------------------------------


def response_headers(status: int, content_type: str = "application/json",
                     end: bool = False) -> ep.ProcessingRequest:
    headers = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in {
        ":status": str(status), "content-type": content_type, "content-length": "10"}.items()])
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=headers, end_of_stream=end))


def response_body(body: bytes, end: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end))


def attempts(backend: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("genai_upstream_attempts_total", {"backend": backend, "outcome": outcome}) or 0


async def test_openai_schema_answers_pass_untouched(proc: UpstreamProcessor) -> None:
    await proc.handle(attempt_headers())
    resp = await proc.handle(response_headers(200))
    assert resp.WhichOneof("response") == "response_headers"
    assert not resp.HasField("mode_override") and not resp.response_headers.HasField("response")


async def test_anthropic_attempt_is_translated_and_its_answer_left_to_the_router(proc: UpstreamProcessor) -> None:
    """The attempt's request is built here; its answer is translated by the router-level
    processor, because an upstream-filter stream carrying a response body crashes Envoy 1.40."""
    await proc.handle(attempt_headers(backend="claude/claude-x"))
    sent = (await proc.handle(attempt_body({"model": "claude-chat", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}))).request_body.response
    headers = set_headers(sent)
    assert headers[":path"] == "/v1/messages" and headers["x-api-key"] == OPENAI_KEY
    assert list(sent.header_mutation.remove_headers) == ["authorization"]
    assert orjson.loads(sent.body_mutation.body)["system"] == "Be brief."
    for content_type in ("application/json", "text/event-stream"):
        resp = await proc.handle(response_headers(200, content_type))
        assert not resp.HasField("mode_override") and not resp.response_headers.HasField("response")


@pytest.mark.parametrize(("status", "outcome"), [(200, "success"), (429, "throttled"), (400, "rejected"),
                                                 (503, "error"), (None, "error")])
async def test_each_attempt_is_counted_by_outcome(runtime: Runtime, status: int | None, outcome: str) -> None:
    """`None`: the attempt never got response headers (reset, per-try timeout)."""
    proc = UpstreamProcessor(runtime)
    before = attempts("openai/gpt-4o", outcome)
    await proc.handle(attempt_headers())
    if status is not None:
        await proc.handle(response_headers(status, end=True))
    proc.close()
    assert attempts("openai/gpt-4o", outcome) == before + 1


async def test_an_untranslatable_request_is_a_400_logged_in_one_line_without_its_values(proc: UpstreamProcessor) -> None:
    """A field of the wrong type a translator reads is the caller's mistake: a 400, and one
    short log line (its type and place), not a traceback per request that may quote the body."""
    await proc.handle(attempt_headers(backend="claude/claude-x"))
    with structlog.testing.capture_logs() as logs:
        resp = await proc.handle(attempt_body({"model": "claude-chat", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "secret-ish 4111"}, 5]}]}))
    assert resp.immediate_response.status.code == 400
    assert orjson.loads(resp.immediate_response.body)["error"]["code"] == "invalid_request"
    [line] = logs
    assert line["event"] == "request_untranslatable" and set(line) >= {"error", "at"}
    assert "exc_info" not in line and "4111" not in repr(line)


def test_an_attempt_admitted_before_a_reload_that_dropped_its_backend_is_still_built(runtime: Runtime) -> None:
    """A reload removed a backend of fallback-chat; a request the router admitted under the old config
    (its `gw.config` names that config) still gets its attempts built. Any other request
    naming that backend is a config mismatch, as before."""
    import dataclasses

    old = dataclasses.replace(runtime, version="old-config")
    cfg = dataclasses.replace(old.config, backends={k: v for k, v in old.config.backends.items()
                                                    if k != "backup/gpt-4o-backup"})
    new = Runtime.from_config(cfg, old)
    found = new.backend("backup/gpt-4o-backup", "old-config")
    assert found is not None and found[0].model == "gpt-4o-backup" and found[1] == old.credentials["backup"]
    assert new.backend("backup/gpt-4o-backup", "") is None
    assert new.backend("backup/gpt-4o-backup", "another") is None
    newer = Runtime.from_config(cfg, new)  # only the one config before is kept
    assert newer.backend("backup/gpt-4o-backup", "old-config") is None
