"""Upstream (per-attempt) processor: runs in a model cluster's upstream filter chain, once
per attempt, on its own gRPC stream.

Envoy tells it which backend this attempt goes to through endpoint metadata
(`request_attributes`), never through a client header. It turns the OpenAI-schema body the
router forwarded into that backend's request (path, credential, model name, translation,
SigV4 signature), and counts the attempt by the status it got. It never sees a response
body: an upstream-filter ext_proc whose gRPC stream carries more than the ext_proc
cluster's buffer limit crashes Envoy 1.40, so answers are translated at the router
(provider_response.py; docs/architecture.md). The chart only puts it on clusters that need
it (several backends, a non-OpenAI provider, or a file-sourced credential Envoy cannot
inject natively); other clusters get the credential from Envoy's header_mutation.
"""

from __future__ import annotations

import orjson
import structlog
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from .. import api
from ..config import Backend
from ..errors import GatewayError
from ..providers import TRANSLATORS
from ..providers.base import Target, Translator
from ..runtime import Runtime
from ..telemetry import metrics
from . import responses as r

log = structlog.get_logger("gateway_extproc.upstream")

BACKEND_ATTRIBUTE = "xds.upstream_host_metadata.filter_metadata['gw']['backend']"
_FILTER = "envoy.filters.http.ext_proc"


def is_upstream(req: ep.ProcessingRequest) -> bool:
    attrs = req.attributes.get(_FILTER)
    return attrs is not None and BACKEND_ATTRIBUTE in attrs.fields


class UpstreamProcessor:
    __slots__ = ("runtime", "backend", "endpoint", "target", "translator", "status")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.backend: Backend | None = None
        self.endpoint: api.Endpoint | None = None
        self.target: Target | None = None
        self.translator: Translator | None = None
        self.status = 0

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
        raise ValueError(f"unexpected ext_proc message {kind}")

    def request_headers(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        backend_id = req.attributes[_FILTER].fields[BACKEND_ATTRIBUTE].string_value
        gw = req.metadata_context.filter_metadata.get("gw")
        request_id = gw.fields["request_id"].string_value if gw and "request_id" in gw.fields else ""
        endpoint = api.BY_NAME.get(gw.fields["api"].string_value) if gw and "api" in gw.fields else None
        version = gw.fields["config"].string_value if gw and "config" in gw.fields else ""
        found = self.runtime.backend(backend_id, version)
        if found is None or endpoint is None:
            log.error("upstream_config_mismatch", backend=backend_id, request_id=request_id)
            raise GatewayError("gateway_internal_error", "The gateway's Envoy and ext_proc configs disagree; "
                               "re-render both from the same values.")
        backend, credential = found
        provider = backend.provider
        if credential is None:
            raise GatewayError("provider_credential_missing",
                               f"No credential is configured for provider {provider.name!r}.")
        self.backend, self.endpoint = backend, endpoint
        self.translator = TRANSLATORS[provider.kind]
        self.target = Target(backend.model, provider.base_url, provider.base_path, provider.host, credential,
                             provider.options)
        # No log line here: Envoy's router writes one per attempt (`upstream_attempt`, with
        # its status and timing), which costs this process nothing.
        return r.request_headers()

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        """This attempt's request, built from the body the router forwarded (each attempt
        starts from that same body, so this is idempotent across retries)."""
        assert self.translator is not None and self.target is not None and self.endpoint is not None
        body = orjson.loads(msg.body)
        try:
            out = self.translator.request(self.target, self.endpoint.suffix, body, body.get("stream") is True)
        except GatewayError:
            raise
        except Exception as err:
            # The router checked the type of every field a translator reads (api.py), so this
            # is a translator's bug meeting a shape it did not expect: still refused as the
            # request's (nothing was sent), not a 500 per attempt, and logged to be fixed.
            assert self.backend is not None
            log.warning("request_untranslatable", backend=self.backend.id, **_raised_at(err))
            raise GatewayError("invalid_request", f"The request could not be translated for the model's "
                               f"{self.backend.provider.kind} backend; nothing was sent to it.") from None
        headers = {":path": out.path, **out.headers, "content-length": str(len(out.body))}
        return r.request_body(r.common(r.mutation(headers, out.remove), out.body))

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        """Records the attempt's status (for the per-attempt count). Bodies never come
        here: the router-level processor translates answers (provider_response.py)."""
        self.status = int(r.header_map(r.header_pairs(msg)).get(":status", "0") or 0)
        return r.response_headers()

    def close(self) -> None:
        """One count per attempt, by backend and outcome: retries and fallbacks show as
        extra attempts, resets and per-try timeouts (no response headers) as errors."""
        if self.backend is not None:
            metrics.child(metrics.UPSTREAM_ATTEMPTS, self.runtime.labels.backend(self.backend.id),
                          metrics.attempt_outcome(self.status)).inc()


def _raised_at(err: BaseException) -> dict[str, str]:
    """Where a translator failed, for the log line: the error's type and innermost frame,
    not its message or a traceback (both may quote the caller's values, and every caller
    can send such a request: one traceback per request grew the log without bound)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"
    return {"error": type(err).__name__, "at": where}
