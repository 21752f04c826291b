"""A bug inside a processor (fault injected: its handler raises) is refused closed with the
OpenAI-shaped 500 before the request is sent; after, response headers pass but no piece of the
answer goes out unread; each is counted per phase in genai_gateway_extproc_errors_total, which
GatewayExtProcErrors alerts on."""

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


async def test_a_request_refused_for_a_bug_is_recorded_as_the_500_the_client_got(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The client gets `500 gateway_internal_error`: the access line, the metrics and the span say
    so (not a status 0 'incomplete' counted as 4xx, out of the 5xx error rate), and a request that
    never left is not charged (the cost counter, the budget settlement)."""
    import orjson
    import structlog

    from gateway_extproc.telemetry import metrics

    from .test_router_processor import req_body

    def bug(self: RouterProcessor, body: dict) -> ep.ProcessingResponse:
        raise RuntimeError("injected fault")
    monkeypatch.setattr(RouterProcessor, "forward", bug)
    doc = gateway_doc()
    doc["models"][0]["backends"][0]["pricing"] = {"input": 5.0, "output": 20.0}

    def value(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    five = {"team": "search", "model": "default-chat", "provider": "other", "status_class": "5xx"}
    cost = {"team": "search", "model": "default-chat"}
    before = value("genai_requests_total", five), value("genai_request_cost_dollars_total", cost)

    async def stream() -> AsyncIterator[ep.ProcessingRequest]:
        yield req_headers()
        yield req_body({"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}]})
    ref = RuntimeRef(Runtime.from_config(config.parse(doc, "test-gateway.yaml")), "test-gateway.yaml")
    with structlog.testing.capture_logs() as logs:
        resps = [resp async for resp in ExternalProcessor(ref).Process(stream(), None)]
    assert resps[-1].immediate_response.status.code == 500
    [line] = [e for e in logs if e["event"] == "access"]
    assert (line["status"], line["error_code"], line["outcome"]) == (500, "gateway_internal_error", "complete")
    assert value("genai_requests_total", five) == before[0] + 1
    assert value("genai_request_cost_dollars_total", cost) == before[1]
    assert metrics.status_class(500) == "5xx" and orjson.loads(resps[-1].immediate_response.body)["error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_bug_reading_the_answer_lets_no_piece_of_it_out(monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """A piece of the answer that output scanning or the credential cut failed to read (a bug)
    could hold what they remove: it never goes out as it came, nor does anything after it. A
    JSON answer becomes the OpenAI-shaped 500; a stream is cut off there."""
    from .test_router_processor import req_body, resp_body, resp_headers

    def bug(self: RouterProcessor, *_: object) -> None:
        raise RuntimeError("injected fault")
    monkeypatch.setattr(RouterProcessor, "stream_chunk" if stream else "read_whole", bug)
    secret = b"card 4111 1111 1111 1111"
    if stream:
        pieces = [resp_body(b'data: {"choices":[{"index":0,"delta":{"content":"' + secret + b'"}}]}\n\n', end=False),
                  resp_body(b"data: [DONE]\n\n", end=True)]
    else:
        pieces = [resp_body(b'{"choices":[{"index":0,"message":{"role":"assistant","content":"' + secret + b'"}}]}')]
    before = errors("response_body")
    resps = await run(req_headers(), req_body({"model": "default-chat", "stream": stream,
                                               "messages": [{"role": "user", "content": "Hi"}]}),
                      resp_headers(content_type="text/event-stream" if stream else "application/json"), *pieces)
    answers = resps[3:]
    assert len(answers) == len(pieces) and errors("response_body") == before + len(pieces) - (1 if stream else 0)
    for a in answers:
        assert a.response_body.response.body_mutation.body == b"" or not stream
        assert secret not in a.SerializeToString()
    if not stream:
        sent = answers[0].response_body.response
        assert json.loads(sent.body_mutation.body)["error"]["code"] == "gateway_internal_error"
        assert {h.header.key: h.header.raw_value for h in sent.header_mutation.set_headers}[":status"] == b"500"
