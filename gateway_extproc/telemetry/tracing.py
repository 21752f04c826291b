"""OpenTelemetry: one span per request with GenAI semantic-convention attributes, plus the
GenAI semconv metrics, exported over OTLP.

Off unless the standard variables say where to send (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); then the SDK reads the rest of `OTEL_*` itself
(headers, protocol, sampler, batch delays). When off, no span objects are created at all.
Spans never carry prompt or response text: only metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
# Span attribute values are cut to this many characters unless OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT
# or OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise (the SDK's default is no limit). A
# provider writes the answer's `id`, `model` and finish reasons as long as it likes; one span
# over a collector's message limit (4 MiB by default) loses its whole batch.
ATTRIBUTE_CHARS = 256
_state: dict[str, Any] = {}
# gen_ai.provider.name as the semantic conventions spell it, by chart provider kind.
SEMCONV_PROVIDER = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic",
                    "bedrock": "aws.bedrock", "gemini": "gcp.gemini"}


def provider_name(kind: str | None) -> str | None:
    return SEMCONV_PROVIDER.get(kind, kind) if kind else None


def enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service_name: str = "gateway-extproc") -> None:
    """Install OTLP exporters for traces and metrics in this process, if configured."""
    if not enabled():
        return
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    limited = os.environ.get("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT") or \
        os.environ.get("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")
    tracer_provider = TracerProvider(resource=resource, span_limits=SpanLimits() if limited else SpanLimits(
        max_span_attribute_length=ATTRIBUTE_CHARS))
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    meter_provider = MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
    meter = meter_provider.get_meter("gateway_extproc")
    _state.update(
        tracer=tracer_provider.get_tracer("gateway_extproc"), tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        token_usage=meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                           description="Tokens used per request, by gen_ai.token.type."),
        duration=meter.create_histogram("gen_ai.server.request.duration", unit="s",
                                        description="Request duration as seen by the gateway."),
        ttft=meter.create_histogram("gen_ai.server.time_to_first_token", unit="s",
                                    description="Time to the first response byte of a stream."),
        tpot=meter.create_histogram("gen_ai.server.time_per_output_token", unit="s",
                                    description="Time per output token after the first."),
    )


def shutdown() -> None:
    for name in ("tracer_provider", "meter_provider"):
        provider = _state.get(name)
        if provider is not None:
            provider.shutdown()


class RequestTrace:
    """The span of one request, started at request headers and ended with the access log."""

    __slots__ = ("span", "operation", "session")

    def __init__(self, headers: Mapping[str, str], method: str, path: str,
                 stream_context: Mapping[str, str] | None = None) -> None:
        # With Envoy's tracer on, the parent is Envoy's span of this ext_proc stream (itself a
        # child of the client's); without it, the client's traceparent header. Only the
        # `traceparent` is continued: a `tracestate` is free text of the caller's (a key put
        # there would be exported with every span and sent on to the provider).
        carrier = stream_context if stream_context else headers
        parent = _PROPAGATOR.extract(carrier={"traceparent": carrier["traceparent"]} if "traceparent" in carrier
                                     else {})
        self.operation = "chat" if path.endswith("/chat/completions") else path.rsplit("/", 1)[-1]
        self.span = _state["tracer"].start_span(
            f"{self.operation}", context=parent, kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.path": path, "gen_ai.operation.name": self.operation})
        # `session.id` is set once the header passed classification (`request`): a key sent
        # as a session id is refused there and must not be exported with the span either.
        self.session = headers.get("x-session-id") or None

    def outgoing_headers(self) -> dict[str, str]:
        """`traceparent` (and `tracestate`) for the request the provider receives."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier

    def request(self, model: str, provider: str | None, max_tokens: Any, stream: bool,
                session: str | None = None) -> None:
        """The admitted request's facts; `session` is the `x-session-id` as the provider gets
        it (after classification redacted it, if it did)."""
        self.span.update_name(f"{self.operation} {model}")
        attrs: dict[str, Any] = {"gen_ai.request.model": model, "gen_ai.request.stream": stream}
        if session:
            attrs["session.id"] = session[:128]
        if provider:
            attrs["gen_ai.provider.name"] = provider_name(provider)
        if type(max_tokens) is int:
            attrs["gen_ai.request.max_tokens"] = max_tokens
        self.span.set_attributes(attrs)

    def event(self, name: str, **attributes: Any) -> None:
        self.span.add_event(name, {k: v for k, v in attributes.items() if v is not None})

    def finish(self, *, status: int, error_code: str | None, provider: str | None, backend: str | None,
               response_model: str | None, input_tokens: int | None, output_tokens: int | None,
               duration_s: float, ttft_s: float | None, request_model: str | None, team: str | None = None,
               server: str | None = None, response_id: str | None = None,
               finish_reasons: tuple[str, ...] = (), genai: bool = True) -> None:
        """`provider` is the chart kind; `server` the backend provider's base URL. `genai` false:
        a request the gateway answered itself (`/v1/models`), whose span ends without GenAI metrics."""
        provider = provider_name(provider)
        url = urlsplit(server) if server else None
        attrs: dict[str, Any] = {"http.response.status_code": status}
        for key, value in (("gen_ai.provider.name", provider), ("gateway.backend", backend),
                           ("gateway.team", team), ("server.address", url.hostname if url else None),
                           ("server.port", (url.port or (443 if url.scheme == "https" else 80)) if url else None),
                           ("gen_ai.response.model", response_model), ("gen_ai.response.id", response_id),
                           ("gen_ai.response.finish_reasons", list(finish_reasons) or None),
                           ("gen_ai.usage.input_tokens", input_tokens),
                           ("gen_ai.usage.output_tokens", output_tokens)):
            if value is not None:
                attrs[key] = value
        # The conventions: a failed operation (any 4xx/5xx, a refusal, an incomplete answer)
        # has error.type and an ERROR status.
        failed = bool(error_code or status >= 400 or status == 0)
        if failed:
            attrs["error.type"] = error_code or str(status or "incomplete")
            self.span.set_status(Status(StatusCode.ERROR, attrs["error.type"]))
        self.span.set_attributes(attrs)
        self.span.end()
        if not genai:
            return
        metric_attrs = {"gen_ai.operation.name": self.operation}
        if provider:
            metric_attrs["gen_ai.provider.name"] = provider
        if request_model:
            metric_attrs["gen_ai.request.model"] = request_model
        # error.type on a failed request's duration, as the conventions ask (gateway error codes
        # and HTTP statuses: a bounded set), so failures are not averaged into the latency.
        _state["duration"].record(duration_s, {**metric_attrs, "error.type": attrs["error.type"]} if failed
                                  else metric_attrs)
        for kind, value in (("input", input_tokens), ("output", output_tokens)):
            if value:
                _state["token_usage"].record(value, {**metric_attrs, "gen_ai.token.type": kind})
        # Time to first token and per output token: 2xx answers only (the conventions' "successful
        # responses", as genai_time_to_first_token_seconds counts them); an error body is no token.
        if ttft_s is not None and 200 <= status < 300:
            _state["ttft"].record(ttft_s, metric_attrs)
            if output_tokens and output_tokens > 1:
                _state["tpot"].record(max(duration_s - ttft_s, 0.0) / (output_tokens - 1), metric_attrs)


def on() -> bool:
    """Spans are being made in this process (setup found an OTLP endpoint)."""
    return "tracer" in _state


def start(headers: Mapping[str, str], method: str, path: str,
          stream_context: Mapping[str, str] | None = None) -> RequestTrace | None:
    return RequestTrace(headers, method, path, stream_context) if "tracer" in _state else None


