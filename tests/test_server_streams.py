"""The ext_proc stops reading a gRPC stream after the last message Envoy sends on it.

Envoy closes an ext_proc stream with a half-close and an immediate reset; a grpc aio
handler that reads on until then leaks native memory per stream (grpc/grpc#43360,
bench/SOAK.md). After its last reply the handler only waits for that reset (server.py
`_write_last`), and ends the call itself with OK after RESET_WAIT_S if none comes. Driven
here over a real grpc aio server and client, with that wait shortened: after the reply to
the last message the call ends with OK without the client sending or closing anything (a
handler still reading would wait for ever), and a stream that is not at its end stays open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import orjson
import pytest
import yaml
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from gateway_extproc import config, server
from gateway_extproc.reload import RuntimeRef
from gateway_extproc.render import chart_values, render_values
from gateway_extproc.runtime import Runtime
from gateway_extproc.server import ExternalProcessor, _last_message

from . import test_router_processor as rt
from . import test_upstream_processor as up
from .test_chart import LOCAL

CHAT = {"model": "default-chat", "messages": [{"role": "user", "content": "Hello"}]}
ANSWER = orjson.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}})


@pytest.fixture
async def stub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ep_grpc.ExternalProcessorStub]:
    """A real grpc aio server with the gateway's servicer; one config serves both filters."""
    monkeypatch.setenv("GW_TEST_ROUTER_OPENAI_KEY", "sk-test-router-credential")
    monkeypatch.setattr(server, "RESET_WAIT_S", 0.05)
    ref = RuntimeRef(Runtime.from_config(config.parse(rt.gateway_doc(), "test-gateway.yaml")), "test-gateway.yaml")
    grpc_server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(ref), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield ep_grpc.ExternalProcessorStub(channel)
    await grpc_server.stop(None)


async def exchange(call: grpc.aio.StreamStreamCall, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
    await call.write(req)
    resp = await call.read()
    assert isinstance(resp, ep.ProcessingResponse)
    return resp


async def ends_with_ok(call: grpc.aio.StreamStreamCall) -> None:
    """The server finished the call: no more replies, status OK; the client closed nothing.
    (The timeout only turns a regression, a server waiting for the client, into a failure.)"""
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_router_stream_ends_after_the_response_body_end(stub: ep_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    assert (await exchange(call, rt.req_headers())).HasField("request_headers")
    assert (await exchange(call, rt.req_body(CHAT))).HasField("request_body")
    assert (await exchange(call, rt.resp_headers())).HasField("response_headers")
    assert not call.done()  # the body is still to come
    assert (await exchange(call, rt.resp_body(ANSWER))).HasField("response_body")
    await ends_with_ok(call)


async def test_router_stream_without_a_response_body_ends_after_its_headers(
        stub: ep_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    await exchange(call, rt.req_headers())
    await exchange(call, rt.req_body(CHAT))
    assert (await exchange(call, rt.resp_headers(status=204, end=True))).HasField("response_headers")
    await ends_with_ok(call)


async def test_a_refused_request_ends_its_stream(stub: ep_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    resp = await exchange(call, rt.req_headers(key=None))
    assert resp.immediate_response.status.code == 401
    await ends_with_ok(call)


async def test_after_the_last_reply_envoys_reset_ends_the_call(stub: ep_grpc.ExternalProcessorStub,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "RESET_WAIT_S", 3600)
    call = stub.Process()
    assert (await exchange(call, rt.req_headers(key=None))).immediate_response.status.code == 401
    assert not call.done()  # waiting for the client's reset, as Envoy sends it
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_a_stream_envoy_half_closes_early_waits_for_its_reset(stub: ep_grpc.ExternalProcessorStub,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that leaves mid-request (or mid-response) makes Envoy half-close and reset
    the stream before its usual last message. Returning at the half-close sent a status
    that raced the reset and leaked in grpc (~110 bytes per aborted request, measured
    through Envoy); the handler now waits for the reset with no batch open, as after a
    last reply."""
    monkeypatch.setattr(server, "RESET_WAIT_S", 3600)
    call = stub.Process()
    assert (await exchange(call, rt.req_headers())).HasField("request_headers")
    await call.done_writing()  # Envoy's half-close; the body never comes
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(call.read()), 1)  # no status: the call stays open
    assert not call.done()
    call.cancel()  # Envoy's reset ends it
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_upstream_attempt_stream_ends_after_the_response_headers(stub: ep_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    headers = up.attempt_headers(backend="openai/gpt-4o-mini")
    headers.metadata_context.filter_metadata["gw"]["model"] = "default-chat"
    assert (await exchange(call, headers)).HasField("request_headers")
    assert (await exchange(call, up.attempt_body(CHAT))).HasField("request_body")
    assert not call.done()
    assert (await exchange(call, up.response_headers(200))).HasField("response_headers")
    await ends_with_ok(call)


@pytest.mark.parametrize(("req", "upstream", "last"), [
    (rt.req_headers(), False, False),
    (rt.req_body(CHAT), False, False),
    (rt.resp_headers(), False, False),
    (rt.resp_headers(end=True), False, True),
    (rt.resp_headers(), True, True),  # the upstream filter never gets a response body
    (rt.resp_body(b"data: {}\n\n", end=False), False, False),  # a streamed chunk
    (rt.resp_body(ANSWER), False, True),
], ids=["req-headers", "req-body", "resp-headers", "resp-headers-end", "upstream-resp-headers", "stream-chunk",
        "resp-body-end"])
def test_last_message(req: ep.ProcessingRequest, upstream: bool, last: bool) -> None:
    kind = req.WhichOneof("request")
    reply = ep.ProcessingResponse(**{kind: ep.BodyResponse() if kind.endswith("body") else ep.HeadersResponse()})
    assert _last_message(req, kind, reply, upstream) is last
    refused = ep.ProcessingResponse(immediate_response=ep.ImmediateResponse())
    assert _last_message(req, kind, refused, upstream) is (last or kind.startswith("request"))


def test_the_chart_sends_what_last_message_expects() -> None:
    """_last_message relies on these processing modes: trailers never sent; the upstream
    filter's last phase is the response headers (a change here must change it too)."""
    envoy = yaml.safe_load(render_values(chart_values([LOCAL]))["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [router] = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    attempts = [f["typed_config"] for c in envoy["static_resources"]["clusters"]
                for f in c.get("typed_extension_protocol_options", {}).get(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {}).get("http_filters", [])
                if f["name"] == "envoy.filters.http.ext_proc"]
    assert attempts, "values-local has models whose attempts use the upstream ext_proc"
    for cfg in [router, *attempts]:
        mode = cfg["processing_mode"]
        assert (mode["request_trailer_mode"], mode["response_trailer_mode"]) == ("SKIP", "SKIP")
    for cfg in attempts:
        assert cfg["processing_mode"]["response_body_mode"] == "NONE" and "allow_mode_override" not in cfg
