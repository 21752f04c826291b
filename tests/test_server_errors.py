"""A bug inside a processor (fault injected: its handler raises) is refused closed with the
OpenAI-shaped 500 before the request is sent, passed through after, and counted per phase in
genai_gateway_extproc_errors_total, which GatewayExtProcErrors alerts on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from gateway_extproc import config
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc.processors.router import RouterProcessor
from gateway_extproc.reload import RuntimeRef
from gateway_extproc.runtime import Runtime
from gateway_extproc.server import ExternalProcessor

from .test_router_processor import gateway_doc, req_headers


def errors(phase: str) -> float:
    return REGISTRY.get_sample_value("genai_gateway_extproc_errors_total", {"phase": phase}) or 0.0


async def run(*requests: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    async def stream() -> AsyncIterator[ep.ProcessingRequest]:
        for req in requests:
            yield req
    ref = RuntimeRef(Runtime.from_config(config.parse(gateway_doc(), "test-gateway.yaml")), "test-gateway.yaml")
    return [resp async for resp in ExternalProcessor(ref).Process(stream(), None)]


async def test_a_bug_before_the_request_is_sent_is_refused_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: RouterProcessor, req: ep.ProcessingRequest) -> None:
        raise RuntimeError("injected fault")
    monkeypatch.setattr(RouterProcessor, "handle", bug)
    before = errors("request_headers")
    [resp] = await run(req_headers())
    assert resp.immediate_response.status.code == 500
    assert json.loads(resp.immediate_response.body)["error"]["code"] == "gateway_internal_error"
    assert errors("request_headers") == before + 1


async def test_a_bug_on_the_response_lets_it_pass_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: RouterProcessor, req: ep.ProcessingRequest) -> None:
        raise RuntimeError("injected fault")
    monkeypatch.setattr(RouterProcessor, "handle", bug)
    before = errors("response_headers")
    [resp] = await run(ep.ProcessingRequest(response_headers=ep.HttpHeaders()))
    assert resp.WhichOneof("response") == "response_headers"
    assert errors("response_headers") == before + 1
