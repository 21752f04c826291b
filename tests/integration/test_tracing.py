"""Traces and GenAI metrics over OTLP, received by an in-test OTLP gRPC collector."""

from __future__ import annotations

from contextlib import contextmanager

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import orjson
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from gateway_extproc import keys

from .conftest import Gateway, running_gateway

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
PROMPT = "Summarize this quarter's earnings report."


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []
        self.metrics: list = []
        self.service: dict[bytes, str] = {}  # span_id -> the exporting resource's service.name

    def Export(self, request, context):  # noqa: N802 (gRPC name); both services share the method name
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for rs in request.resource_spans:
                service = next((kv.value.string_value for kv in rs.resource.attributes if kv.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.spans += ss.spans
                    self.service.update({s.span_id: service for s in ss.spans})
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metrics += [m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        return metrics_service_pb2.ExportMetricsServiceResponse()


@contextmanager
def otlp_collector(metric_interval_ms: int | None = 300) -> Iterator[tuple[Collector, int, dict[str, str]]]:
    """An in-test OTLP/gRPC collector: (collector, port, env for the ext_proc)."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    if metric_interval_ms is not None:
        env["OTEL_METRIC_EXPORT_INTERVAL"] = str(metric_interval_ms)
    try:
        yield collector, port, env
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Gateway, Collector]]:
    with otlp_collector() as (collector, _, env), running_gateway("gw-otel-", env=env) as gw:
        yield gw, collector


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value or v.int_value or v.bool_value or v.double_value
    return out


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("not received in time")


def test_request_span_continues_the_client_trace_and_reaches_the_provider(traced) -> None:
    gw, collector = traced
    resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, json={
        "model": "default-chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 50},
        headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                 "x-session-id": "sess-42"})
    assert resp.status_code == 200
    span = wait_for(lambda: next((s for s in collector.spans if s.trace_id.hex() == TRACE_ID), None))
    assert span.parent_span_id.hex() == PARENT_ID and span.name == "chat default-chat"
    a = attrs(span)
    usage = resp.json()["usage"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "default-chat"
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.response.model"] == "mock-gpt-4o-mini"
    assert a["gateway.team"] == "demo"
    assert a["gen_ai.response.id"] == resp.json()["id"]
    assert finish_reasons(span) == [resp.json()["choices"][0]["finish_reason"]]
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", int(gw.primary.rsplit(":", 1)[1]))
    assert span.status.code == span.status.STATUS_CODE_UNSET
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.request.max_tokens"] == 50 and a["session.id"] == "sess-42"
    assert PROMPT not in str(span)  # no content in spans
    [sent] = httpx.get(f"{gw.primary}/_mock/requests").json()
    assert sent["headers"]["traceparent"] == f"00-{TRACE_ID}-{span.span_id.hex()}-01"


def test_rejections_are_span_events(traced) -> None:
    gw, collector = traced
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "nope", "messages": []},
               headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
    span = wait_for(lambda: next((s for s in collector.spans if s.trace_id.hex() == trace_id), None))
    [event] = [e for e in span.events if e.name == "gateway.rejected"]
    assert {kv.key: kv.value.string_value or kv.value.int_value for kv in event.attributes} == {
        "code": "invalid_request", "status": 400}
    # A refusal is a failed operation: error.type and an ERROR status, as the conventions ask.
    assert attrs(span)["error.type"] == "invalid_request"
    assert span.status.code == span.status.STATUS_CODE_ERROR and span.status.message == "invalid_request"


def test_genai_semconv_metrics_are_exported(traced) -> None:
    gw, collector = traced
    httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, json={
        "model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"authorization": f"Bearer {gw.key}"}).raise_for_status()
    names = wait_for(lambda: (lambda n: n if {"gen_ai.client.token.usage", "gen_ai.server.request.duration",
                                              "gen_ai.server.time_to_first_token"} <= n else None)(
        {m.name for m in collector.metrics}))
    assert "gen_ai.server.time_per_output_token" in names
    usage = [m for m in collector.metrics if m.name == "gen_ai.client.token.usage"]
    token_types = {kv.value.string_value for m in usage for p in m.histogram.data_points for kv in p.attributes
                   if kv.key == "gen_ai.token.type"}
    assert token_types == {"input", "output"}


def test_models_and_usage_get_a_span_but_no_genai_metric(traced) -> None:
    """Answered by the gateway, no LLM call: their duration went into
    gen_ai.server.request.duration as operations `models` and `usage`."""
    gw, collector = traced
    trace_id = "a" + TRACE_ID[1:]
    for path in ("/v1/models", "/v1/usage"):
        httpx.get(f"{gw.url}{path}", timeout=10, headers={"authorization": f"Bearer {gw.key}",
                                                           "traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
                  ).raise_for_status()
    spans = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(
        [s for s in collector.spans if s.trace_id.hex() == trace_id]))
    assert sorted(attrs(s)["gen_ai.operation.name"] for s in spans) == ["models", "usage"]
    seen = len(collector.metrics)
    httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, json={
        "model": "default-chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {gw.key}"}).raise_for_status()

    def operations() -> set[str] | None:  # every operation in the exports after the chat's was recorded
        later = [m for m in collector.metrics[seen:] if m.name == "gen_ai.server.request.duration"]
        ops = {kv.value.string_value for m in later for p in m.histogram.data_points for kv in p.attributes
               if kv.key == "gen_ai.operation.name"}
        return ops if "chat" in ops else None
    assert not wait_for(operations) & {"models", "usage"}


@pytest.mark.parametrize(("model", "provider"), [("gemini-chat", "gcp.gemini"), ("azure-chat", "azure.ai.openai")])
def test_provider_names_are_spelt_as_the_conventions_spell_them(traced, model: str, provider: str) -> None:
    gw, collector = traced
    trace_id = ("6" if model.startswith("gemini") else "7") + TRACE_ID[1:]
    resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
        headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
    assert resp.status_code == 200, resp.text
    span = wait_for(lambda: next((s for s in collector.spans if s.trace_id.hex() == trace_id), None))
    assert attrs(span)["gen_ai.provider.name"] == provider
    assert attrs(span)["gateway.team"] == "demo"


def finish_reasons(span) -> list[str]:
    [kv] = [kv for kv in span.attributes if kv.key == "gen_ai.response.finish_reasons"]
    return [v.string_value for v in kv.value.array_value.values]


def test_streamed_response_id_and_finish_reasons_reach_the_span(traced) -> None:
    gw, collector = traced
    trace_id = "8" + TRACE_ID[1:]
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, json={
            "model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01"}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: {")]
    chunks = [orjson.loads(line[6:]) for line in lines]
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    span = wait_for(lambda: next((s for s in collector.spans if s.trace_id.hex() == trace_id), None))
    assert attrs(span)["gen_ai.response.id"] == chunks[0]["id"]
    assert finish_reasons(span) == reasons and reasons


@pytest.fixture(scope="module")
def envoy_traced() -> Iterator[tuple[Gateway, Collector]]:
    """Envoy's tracer on (tracing.otlp) and the ext_proc exporting to the same collector."""
    with otlp_collector(None) as (collector, port, env):
        def customize(values: dict) -> None:
            values["tracing"]["otlp"] = {"address": "127.0.0.1", "port": port}
        with running_gateway("gw-envoy-otel-", env=env, customize=customize) as gw:
            yield gw, collector


def test_envoy_and_extproc_spans_form_one_trace(envoy_traced) -> None:
    gw, collector = envoy_traced
    trace_id = "9" + TRACE_ID[1:]
    resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, json={
        "model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
        headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
    assert resp.status_code == 200, resp.text

    def complete() -> tuple | None:
        spans = [s for s in collector.spans if s.trace_id.hex() == trace_id]
        mine = [s for s in spans if collector.service[s.span_id] == "gateway-extproc"]
        envoy = {s.span_id: s for s in spans if collector.service[s.span_id] == "gateway-envoy"}
        attempts = [s for s in envoy.values() if s.name == "router model.default-chat egress"]
        if mine and attempts and mine[0].parent_span_id in envoy:
            return mine[0], envoy, attempts
        return None
    gateway_span, envoy, attempts = wait_for(complete, 20)
    [root] = [s for s in envoy.values() if s.parent_span_id.hex() == PARENT_ID]  # the client's trace continues
    # The ext_proc's span hangs under Envoy's span of the ext_proc stream, inside the request's.
    stream_span = envoy[gateway_span.parent_span_id]
    assert stream_span.name == "async envoy.service.ext_proc.v3.ExternalProcessor.Process egress"
    assert stream_span.parent_span_id == root.span_id
    # One span per upstream attempt, under the request's, naming the backend that answered.
    [attempt] = attempts
    assert attempt.parent_span_id == root.span_id
    assert attrs(attempt)["upstream_address"] == gw.primary.removeprefix("http://")
    assert attrs(attempt)["http.status_code"] == "200"


def test_envoy_spans_carry_no_caller_path_query_or_agent(envoy_traced) -> None:
    """Envoy's tracer tags its spans with the request's URL, user agent and x-client-trace-id
    as the caller sent them; a caller may put a key in any of them (a query string, a path of
    its making). The chart overrides those tags (custom tags, applied after the standard ones):
    the endpoint's path or (unknown), never the caller's text."""
    gw, collector = envoy_traced
    secret = keys.generate("in-span")
    trace_ids = []
    for i, path in enumerate((f"/v1/chat/completions?key={secret}", f"/v1/{secret}/chat")):
        trace_id = f"{i + 1:x}" + TRACE_ID[1:]
        trace_ids.append(trace_id)
        httpx.post(f"{gw.url}{path}", timeout=30, json={"model": "default-chat", "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 5},
            headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01",
                     "user-agent": f"agent/{secret}", "x-client-trace-id": secret})

    def envoy_spans() -> list | None:
        spans = [s for s in collector.spans if s.trace_id.hex() in trace_ids
                 and collector.service[s.span_id] == "gateway-envoy"]
        roots = [s for s in spans if s.parent_span_id.hex() == PARENT_ID]
        return spans if len(roots) == 2 else None
    spans = wait_for(envoy_spans, 20)
    assert secret not in "\n".join(str(s) for s in spans)
    urls = {attrs(s).get("http.url") for s in spans if s.parent_span_id.hex() == PARENT_ID}
    assert urls <= {"/v1/chat/completions", "(unknown)"}, urls


def test_failed_streams_are_no_first_token_and_their_duration_says_error_type(traced) -> None:
    """The conventions: time to first token is for successful responses; a failed request's
    duration carries error.type."""
    gw, collector = traced
    resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, json={
        "model": "private-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"authorization": f"Bearer {gw.key}", "x-mock-status": "503"})
    assert resp.status_code == 503

    def points(name: str) -> list:
        return [p for m in collector.metrics if m.name == name for p in m.histogram.data_points
                if any(kv.key == "gen_ai.request.model" and kv.value.string_value == "private-chat"
                       for kv in p.attributes)]

    [duration, *_] = wait_for(lambda: points("gen_ai.server.request.duration"))
    assert {kv.key: kv.value.string_value for kv in duration.attributes}["error.type"] == "503"
    time.sleep(0.5)  # another export or two
    assert points("gen_ai.server.time_to_first_token") == []


def test_a_stream_the_budget_cut_short_is_an_error_span(traced) -> None:
    """docs/observability.md: an answer cut short is a failed operation. A provider that ignores
    the output cap has its stream ended by the gateway with a `budget_exceeded` error event
    (the SDKs raise it): the span has that error.type and an ERROR status."""
    gw, collector = traced
    trace_id = "9" + TRACE_ID[1:]
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, json={
            "model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 5},
            headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01",
                     "x-mock-ignore-max-tokens": "1", "x-mock-reply-words": "60"}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert '"code":"budget_exceeded"' in lines[-2]
    span = wait_for(lambda: next((s for s in collector.spans if s.trace_id.hex() == trace_id), None))
    assert attrs(span)["error.type"] == "budget_exceeded"
    assert span.status.code == span.status.STATUS_CODE_ERROR
