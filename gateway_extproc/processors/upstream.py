"""Upstream (per-attempt) processor: runs in a model cluster's upstream filter chain, once
per attempt, on its own gRPC stream.

Envoy tells it which backend this attempt goes to through endpoint metadata
(`request_attributes`), never through a client header. It turns the OpenAI-schema body the
router forwarded into that backend's request (path, credential, model name, translation,
SigV4 signature) and, for providers that speak another schema, turns their answer (JSON or
stream) back into the OpenAI schema before the router-level filters see it. The chart only
puts it on clusters that need it (several backends, a non-OpenAI provider, or a
file-sourced credential Envoy cannot inject natively); other clusters get the credential
from Envoy's header_mutation.
"""

from __future__ import annotations

import orjson
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from .. import api
from ..config import Backend
from ..errors import GatewayError
from ..providers import TRANSLATORS
from ..providers.base import GuardedStream, Target, Translator, guarded_response
from ..runtime import Runtime
from ..telemetry import metrics
from . import responses as r

log = structlog.get_logger("gateway_extproc.upstream")

BACKEND_ATTRIBUTE = "xds.upstream_host_metadata.filter_metadata['gw']['backend']"
_FILTER = "envoy.filters.http.ext_proc"
# Provider stream content types the translators read (SSE, Bedrock's AWS event-stream).
_STREAM_TYPES = ("text/event-stream", "application/vnd.amazon.eventstream")


def is_upstream(req: ep.ProcessingRequest) -> bool:
    attrs = req.attributes.get(_FILTER)
    return attrs is not None and BACKEND_ATTRIBUTE in attrs.fields


class UpstreamProcessor:
    __slots__ = ("runtime", "backend", "endpoint", "target", "translator", "status", "stream", "logged")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.backend: Backend | None = None
        self.endpoint: api.Endpoint | None = None
        self.target: Target | None = None
        self.translator: Translator | None = None
        self.status = 0
        self.stream: GuardedStream | None = None
        self.logged = False  # the stream's failure was logged

    async def handle(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self.request_headers(req)
            if kind == "request_body":
                return self.request_body(req.request_body)
        except GatewayError as err:
            return r.error(err)
        if kind == "response_headers":
            return self.response_headers(req.response_headers)
        if kind == "response_body":
            return self.response_body(req.response_body)
        raise ValueError(f"unexpected ext_proc message {kind}")

    def request_headers(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        backend_id = req.attributes[_FILTER].fields[BACKEND_ATTRIBUTE].string_value
        gw = req.metadata_context.filter_metadata.get("gw")
        request_id = gw.fields["request_id"].string_value if gw and "request_id" in gw.fields else ""
        endpoint = api.BY_NAME.get(gw.fields["api"].string_value) if gw and "api" in gw.fields else None
        backend = self.runtime.config.backends.get(backend_id)
        if backend is None or endpoint is None:
            log.error("upstream_config_mismatch", backend=backend_id, request_id=request_id)
            raise GatewayError("gateway_internal_error", "The gateway's Envoy and ext_proc configs disagree; "
                               "re-render both from the same values.")
        provider = backend.provider
        credential = self.runtime.credentials.get(provider.name)
        if credential is None:
            raise GatewayError("provider_credential_missing",
                               f"No credential is configured for provider {provider.name!r}.")
        self.backend, self.endpoint = backend, endpoint
        self.translator = TRANSLATORS[provider.kind]
        self.target = Target(backend.model, provider.base_url, provider.base_path, provider.host, credential,
                             provider.options)
        log.info("upstream_attempt", request_id=request_id, backend=backend.id)
        return r.request_headers()

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        """This attempt's request, built from the body the router forwarded (each attempt
        starts from that same body, so this is idempotent across retries)."""
        assert self.translator is not None and self.target is not None and self.endpoint is not None
        body = orjson.loads(msg.body)
        out = self.translator.request(self.target, self.endpoint.suffix, body, body.get("stream") is True)
        headers = {":path": out.path, **out.headers, "content-length": str(len(out.body))}
        return r.request_body(r.common(r.mutation(headers, out.remove), out.body))

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        """Records the attempt's status; for translated providers, streams bodies chunk by
        chunk and buffers JSON ones (others' bodies never come here)."""
        assert self.translator is not None and self.backend is not None
        h = r.header_map(msg)
        self.status = int(h.get(":status", "0") or 0)
        if msg.end_of_stream or not self.translator.TRANSLATES_RESPONSE:
            return r.response_headers()
        content_type = h.get("content-type", "").partition(";")[0].strip().lower()
        if 200 <= self.status < 300 and content_type in _STREAM_TYPES:
            self.stream = GuardedStream(self.translator.stream(self.backend.model))
            return r.response_headers(r.common(r.mutation({"content-type": "text/event-stream"}, ("content-length",))),
                                      stream_body=True)
        # The translated body has another length: drop the provider's content-length now
        # (Envoy refuses a body mutation that disagrees with it).
        return r.response_headers(r.common(r.mutation(remove=("content-length",))), buffer_body=True)

    def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        """A body the translator cannot read (a provider bug, garbage, a protocol change)
        becomes a `provider_error` in the OpenAI shape, not a broken stream or a 200 with
        junk (base.GuardedStream, base.guarded_response)."""
        assert self.translator is not None and self.backend is not None
        if self.stream is not None:
            out = self.stream.feed(msg.body, msg.end_of_stream)
            if self.stream.failure is not None and not self.logged:
                self.logged = True
                log.warning("provider_stream_unreadable", backend=self.backend.id,
                            error=type(self.stream.failure).__name__)
            return r.response_body(r.common(body=out))
        new, status, failure = guarded_response(self.translator, self.status, msg.body, self.backend.model)
        headers = {"content-type": "application/json"}
        if failure is not None:
            log.warning("provider_response_unreadable", backend=self.backend.id, status=self.status,
                        error=type(failure).__name__)
        if status != self.status:  # the headers are still held while the body is buffered
            headers[":status"] = str(status)
        return r.response_body(r.common(r.mutation(headers), new))

    def close(self) -> None:
        """One count per attempt, by backend and outcome: retries and fallbacks show as
        extra attempts, resets and per-try timeouts (no response headers) as errors."""
        if self.backend is not None:
            metrics.child(metrics.UPSTREAM_ATTEMPTS, self.runtime.labels.backend(self.backend.id),
                          metrics.attempt_outcome(self.status)).inc()
