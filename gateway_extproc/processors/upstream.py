"""Upstream (per-attempt) processor: runs in a model cluster's upstream filter chain, once
per attempt, on its own gRPC stream.

Envoy tells it which backend this attempt goes to through endpoint metadata
(`request_attributes`), never through a client header. It sets that backend's path and
credential and, for models with fallback, renames the model in the body. The chart only
puts it on clusters that need it (several backends, or a file-sourced credential Envoy
cannot inject natively); other clusters get the credential from Envoy's header_mutation.
"""

from __future__ import annotations

import orjson
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from .. import api
from ..config import Backend
from ..errors import GatewayError
from ..runtime import Runtime
from . import responses as r

log = structlog.get_logger("gateway_extproc.upstream")

BACKEND_ATTRIBUTE = "xds.upstream_host_metadata.filter_metadata['gw']['backend']"
_FILTER = "envoy.filters.http.ext_proc"


def is_upstream(req: ep.ProcessingRequest) -> bool:
    attrs = req.attributes.get(_FILTER)
    return attrs is not None and BACKEND_ATTRIBUTE in attrs.fields


class UpstreamProcessor:
    __slots__ = ("runtime", "backend")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.backend: Backend | None = None

    async def handle(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self.request_headers(req)
            if kind == "request_body":
                return self.request_body(req.request_body)
        except GatewayError as err:
            return r.error(err)
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
        credential = self.runtime.credentials.get(backend.provider.name)
        if credential is None:
            raise GatewayError("provider_credential_missing",
                               f"No credential is configured for provider {backend.provider.name!r}.")
        self.backend = backend
        log.info("upstream_attempt", request_id=request_id, backend=backend.id)
        headers = {":path": backend.provider.base_path + endpoint.suffix, "authorization": f"Bearer {credential}"}
        return r.request_headers(r.common(r.mutation(headers)))

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        """Rename the model for this attempt's backend (idempotent: each attempt starts
        from the body the router forwarded)."""
        assert self.backend is not None
        body = orjson.loads(msg.body)
        body["model"] = self.backend.model
        new = orjson.dumps(body)
        return r.request_body(r.common(r.mutation({"content-length": str(len(new))}), new))

    def close(self) -> None:
        """Nothing to settle per attempt yet."""
