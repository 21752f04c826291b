"""A provider's answer in the OpenAI schema, translated where the router-level filter sees it.

Why here and not in the upstream (per-attempt) filter: Envoy 1.40 segfaults when an
ext_proc running as an upstream filter has its gRPC side stream go over the ext_proc
cluster's buffer limit, which a streamed response body does after ~1 MiB
(docs/architecture.md, "Why responses are translated at the router"). The router-level
filter survives the same pressure, and it knows which backend answered from the
`x-gateway-backend` response header that Envoy's header_mutation writes from endpoint
metadata (overwriting any such header from the provider).

A translator that fails on a provider's bytes never breaks the client's stream: the
answer becomes a `provider_error` (JSON) or ends with one error event (stream).
"""

from __future__ import annotations

import structlog

from ..config import Backend
from ..providers import TRANSLATORS
from ..providers.base import GuardedStream, guarded_response

log = structlog.get_logger("gateway_extproc.provider_response")

class ProviderResponse:
    """Translation of one response from a backend whose provider does not speak OpenAI."""

    __slots__ = ("backend", "status", "stream", "_logged")

    def __init__(self, backend: Backend, status: int, streamed: bool) -> None:
        """`streamed`: the provider was asked for a stream (the client asked for one). A 2xx
        answer is read as what was asked for, whatever its content type: a provider (or a proxy)
        that mislabels a valid answer still gets it across, translated and scanned, and an
        answer of the other kind is unreadable either way (a `provider_error`)."""
        self.backend = backend
        self.status = status  # what the client gets: 502 for an unreadable 2xx body (see `body`)
        self.stream: GuardedStream | None = None
        self._logged = False
        if 200 <= status < 300 and streamed:
            self.stream = GuardedStream(TRANSLATORS[backend.provider.kind].stream(backend.model))

    @staticmethod
    def needed(backend: Backend | None) -> bool:
        return backend is not None and TRANSLATORS[backend.provider.kind].TRANSLATES_RESPONSE

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """Provider stream bytes in, OpenAI SSE out; at unreadable bytes (any exception in
        the translator), what came before them, one error event, and nothing more."""
        assert self.stream is not None
        out = self.stream.feed(chunk, end)
        if self.stream.failure is not None and not self._logged:
            self._logged = True
            log.warning("provider_stream_unreadable", backend=self.backend.id, exc_info=self.stream.failure)
        return out

    def body(self, raw: bytes) -> bytes:
        """A provider JSON body (success or error) as an OpenAI completion or error; an
        unreadable one, or an error under a 2xx, sets `status` to 502."""
        out, self.status, failure = guarded_response(TRANSLATORS[self.backend.provider.kind], self.status, raw,
                                                     self.backend.model)
        if failure is not None:
            log.warning("provider_response_unreadable", backend=self.backend.id, status=self.status,
                        exc_info=failure)
        return out
