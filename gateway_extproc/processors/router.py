"""Router-level processor: one per client request, on one gRPC stream for all four phases.

Identity, request checks, prompt counting, the route header and the body as the backend
must see it happen here once; per-attempt work (credentials, per-backend renames for
models with fallback) belongs to the upstream processor, because Envoy retries never
re-run router-level filters. Per-request state lives on this object only for this stream;
anything another stream needs goes out as dynamic metadata in namespace `gw`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from functools import partial
from datetime import datetime, timezone
from typing import NamedTuple

import orjson
import structlog
from google.protobuf import json_format
from gateway_extproc._proto.envoy.config.core.v3 import base_pb2
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from .. import api, audit, identity, messages, tokens
from ..admission import BODY_WORK, LARGE_BYTES
from ..budgets import caps
from ..budgets.gate import Admission
from ..budgets.pricing import cost_nano
from ..budgets.store import MAX_NANO
from ..config import Backend, Limits, Model, VirtualKey, served_natively
from ..errors import GatewayError, error_body
from ..providers import SERVES, VERBATIM, fields
from ..providers.anthropic import DEFAULT_MAX_TOKENS
from ..providers.base import openai_error, sse
from ..policy.classification import (EmbeddingsGuard, Policy, ResponseGuard, Verdict, content_for_log,
                                     scanned_error_object, withheld_headers)
from ..policy.headers import Header, HeaderEdit, forwarded
from ..policy.responses_output import ResponsesGuard
from ..runtime import Runtime
from ..telemetry import metrics, tracing
from ..usage import SseUsageTap, Usage, usage_from_object
from . import responses as r
from .provider_response import CredentialCut, ProviderResponse, client_error, cut_pieces, echoed_headers

access_log = structlog.get_logger("gateway_extproc.access")
log = structlog.get_logger("gateway_extproc.router")

# Caller credentials, gateway-owned headers and the client certificate's details (XFCC)
# never travel past the router filter. Nor do a caller's credentials in other providers'
# schemes, a browser's cookie, or the provider account (OpenAI organization/project) a
# request is billed to: the gateway's credential decides that, and a provider may otherwise
# honour them.
CALLER_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization",
                             "x-amz-security-token", "openai-organization", "openai-project", "cookie")
# The client's network path (its addresses, proxies, the host it asked for) is no provider's
# business, and addresses are data the classification rules rate `internal`: Envoy's own
# x-forwarded-for entry would else raise every request's tier (docs/classification.md).
NETWORK_PATH_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-host", "x-forwarded-port", "forwarded", "via",
                                  "x-real-ip", "x-envoy-external-address"})
# What logs, audit records and spans carry instead of a path or method the gateway does not
# serve: both are caller text that may hold anything (`/v1/<key>`), and unbounded.
UNKNOWN_PATH = "(unknown)"
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
GATEWAY_HEADER_PREFIX = "x-gateway-"
ROUTE_HEADER = "x-gateway-model"
CLASSIFICATION_HEADER = "x-data-classification"


class Consumed(NamedTuple):
    cost: int  # nano$
    prompt: int
    completion: int
    processed: bool  # a provider processed the request (its tokens count in metrics)


# What a request billed above the backend's token prices is told (`api.billed_above_prices`).
_ABOVE_PRICES = {
    "service_tier": "`service_tier` \"priority\" is billed above the prices budgets are kept in, so no budget "
                    "could hold its cost: leave it out, or send \"auto\", \"default\" or \"flex\".",
    "modalities": "Spoken output (`modalities` with \"audio\") is billed at audio prices above the token prices "
                  "budgets are kept in, so no budget could hold its cost: ask for text only.",
}


class RouterProcessor:
    __slots__ = ("runtime", "started", "request_id", "method", "path", "key", "endpoint", "model",
                 "stream", "prompt_tokens", "drop_usage", "status", "backend", "usage", "tap",
                 "first_byte", "error_code", "logged", "trace", "trace_parent", "admission", "clamped",
                 "cut_after", "cut", "body_changed",
                 "declared", "tier", "eligible", "guard", "redacted", "content", "client", "to_client", "provider",
                 "requested", "answered", "headers", "header_edit", "echo", "forwarded", "cache_writes",
                 "broken", "choices", "announcement")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.started = time.monotonic()
        self.request_id = self.method = self.path = ""
        self.key: VirtualKey | None = None
        self.endpoint: api.Endpoint | None = None
        self.model: Model | None = None
        self.stream = self.drop_usage = self.logged = self.body_changed = False
        self.prompt_tokens: int | None = None
        self.status = 0
        self.answered = 0  # the provider's status, when the client gets another one
        self.backend: str | None = None
        self.usage: Usage | None = None
        self.tap: SseUsageTap | None = None
        self.first_byte: float | None = None
        self.error_code: str | None = None
        self.trace: tracing.RequestTrace | None = None
        # W3C trace context of the ext_proc stream itself (gRPC metadata), set by Envoy's tracer.
        self.trace_parent: dict[str, str] = {}
        self.admission: Admission | None = None
        self.announcement = 0  # of a large body at the headers (BODY_WORK.announce)
        self.clamped: int | None = None  # the output cap sent, when below what the request asked for
        self.cut_after: int | None = None  # output tokens after which a stream is ended (backstop)
        self.cut = False
        self.broken = False  # reading the answer failed (a bug): nothing more of it goes out
        self.declared: str | None = None  # x-data-classification sent by the client
        self.tier: str | None = None
        self.eligible: tuple[Backend, ...] = ()
        self.guard: ResponseGuard | ResponsesGuard | EmbeddingsGuard | None = None
        self.redacted = False
        self.content: str | None = None  # prompt text, only when the tier allows logging it
        # "anthropic" for POST /v1/messages: translated to the OpenAI pivot on the way in,
        # and back (JSON, or stream through `to_client`) on the way out.
        self.client: str | None = None
        self.to_client: messages.ToMessagesStream | None = None
        # Set when the answering backend's provider does not speak the OpenAI schema.
        self.provider: ProviderResponse | None = None
        self.requested: str | None = None  # the model the body asked for, kept for the audit trail
        # The header lines the provider will get, classified with the body; what redaction made of them.
        self.headers: tuple[Header, ...] = ()
        self.header_edit: HeaderEdit | None = None
        # Cuts every gateway credential from the answer (a provider echoing what it was presented).
        self.echo: CredentialCut | None = None
        self.forwarded = False  # the request went on to a provider (forward() answered Envoy)
        # The body asks for prompt-cache writes ("5m", "1h": api.cache_writes) of the backends its
        # markers reach (providers.CACHE_MARKED); an Anthropic client's keep theirs (messages.to_chat).
        self.cache_writes: str | None = None
        self.choices = 1  # chat's `n`: a stream's usage is its bill once that many choices finished

    async def handle(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                try:
                    return await self.request_headers(req.request_headers, req.metadata_context)
                except GatewayError as err:
                    # A known caller's body is on its way: refused once it is in (when its
                    # headers leave room for the refusal's: Envoy fails a mutation over its limits).
                    if self.key is not None and err.status in r.REFUSED_AFTER_BODY \
                            and not req.request_headers.end_of_stream \
                            and api.headers_fit(*r.header_load(r.header_pairs(req.request_headers))):
                        return self.reject(err, r.refusal_after_body(err))
                    raise
            if kind == "request_body":
                return await self.request_body(req.request_body)
        except GatewayError as err:
            return self.reject(err)
        if kind == "response_headers":
            return self.response_headers(req.response_headers)
        if kind == "response_body":
            return await self.response_body(req.response_body)
        raise ValueError(f"unexpected ext_proc message {kind}")

    # -- request -------------------------------------------------------------------------

    async def request_headers(self, msg: ep.HttpHeaders, metadata: base_pb2.Metadata | None = None
                              ) -> ep.ProcessingResponse:
        pairs = r.header_pairs(msg)
        h = r.header_map(pairs)
        self.request_id = h.get("x-request-id", "")
        method = h.get(":method", "")
        self.method = method if method in KNOWN_METHODS else "other"
        raw_path = h.get(":path", "")
        path = raw_path.partition("?")[0]
        self.path = path if path in api.FORWARDED or path in api.ANSWERED else UNKNOWN_PATH
        self.trace = tracing.start(h, self.method, self.path, self.trace_parent)
        self.declared = h.get(CLASSIFICATION_HEADER)
        endpoint = _endpoint_for(self.method, path)
        if self.path == api.MESSAGES_PATH:
            self.client = "anthropic"
        cfg = self.runtime.config
        self.key = await identity.authenticate(h, cfg, datetime.now(timezone.utc), _jwt_claims(metadata),
                                               self.runtime.keys)
        if endpoint == api.MODELS_PATH:
            return self.answer(200, _models_body(cfg.models, self.key))
        if endpoint == api.USAGE_PATH:
            gate = self.runtime.budget
            if gate is None:
                return self.answer(200, orjson.dumps({"object": "usage", "key_id": self.key.id, "team": self.key.team,
                                                      "budgets": [], "rate_limits": []}))
            return self.answer(200, orjson.dumps(await gate.report(self.key)))
        assert isinstance(endpoint, api.Endpoint)
        self.endpoint = endpoint
        content_type = h.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            raise GatewayError("unsupported_media_type", "Send the body as `Content-Type: application/json`.")
        if _encoded(h):
            # No decompressor in front: the body would be checked as sent but labelled for the provider.
            raise GatewayError("unsupported_media_type", "Send the body uncompressed (no `Content-Encoding`).")
        length = h.get("content-length")
        announced = int(length) if length is not None and length.isdigit() else 0
        if announced > cfg.max_request_bytes:
            raise _too_large(cfg.max_request_bytes)
        if msg.end_of_stream:
            raise GatewayError("invalid_request", "This endpoint needs a JSON request body.")
        api.check_header_room(*r.header_load(pairs))
        self.announcement = BODY_WORK.announce(announced, time.monotonic())
        strip = [k for k in h if k in CALLER_CREDENTIAL_HEADERS or k.startswith(GATEWAY_HEADER_PREFIX)
                 or k == CLASSIFICATION_HEADER or k == identity.XFCC or k in NETWORK_PATH_HEADERS]
        if self.runtime.policy is not None:
            self.headers = forwarded(pairs, strip)
        # No endpoint takes a query string, and a caller may put a key there (`?key=`, as
        # Gemini clients do): it goes neither to a provider nor into Envoy's spans and logs.
        unquery = {":path": path} if len(raw_path) != len(path) else None
        # Envoy chose a route from the client's own headers before this answer (its own
        # `x-gateway-model` included); forget it. A request whose body never reaches this
        # processor (an HTTP/2 body of trailers alone) would else go to a model the client picked.
        return r.request_headers(r.common(r.mutation(unquery, remove=strip), clear_route_cache=True),
                                 process_response=True)

    async def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        cfg = self.runtime.config
        assert self.endpoint is not None and self.key is not None
        raw = msg.body
        if len(raw) > cfg.max_request_bytes:
            raise _too_large(cfg.max_request_bytes)
        share = await BODY_WORK.acquire(len(raw), self.announcement)
        try:
            body = await self.read_body(raw)
        finally:
            BODY_WORK.release(share)
        thinking = fields.claude_thinking_budget(self.eligible, body) if self.endpoint is api.CHAT else None
        if self.runtime.budget is not None:
            await self.reserve(body, thinking)
        elif thinking is not None:  # no budgets: the client's cap goes out as sent, else Claude's default
            caps.check_thinking_room(caps.output_cap(body, api.CHAT.output_caps, None, DEFAULT_MAX_TOKENS),
                                     thinking, None)
        return self.forward(body)

    async def read_body(self, raw: bytes) -> dict:
        """Parse, validate, classify and count the body (the work `BODY_WORK` bounds); large
        bodies are worked on off the event loop, so other streams keep moving."""
        cfg = self.runtime.config
        assert self.endpoint is not None and self.key is not None
        large = len(raw) + sum(len(h.text) for h in self.headers) > LARGE_BYTES  # headers are scanned with it
        body = await asyncio.to_thread(api.parse_json, raw) if large else api.parse_json(raw)
        self.cache_writes = api.cache_writes(raw)
        client_paths: dict[str, str] | None = None
        if self.client == "anthropic":
            client_paths = {}
            body = messages.to_chat(body, client_paths)
        self.endpoint.validate(body)
        model = cfg.models.get(body["model"])
        if model is None:
            # Never quoted, logged or audited: the field is caller text (a key pasted into it).
            raise GatewayError("model_not_found", "The model in the request does not exist on this gateway; "
                               "GET /v1/models lists the models your key may use.", "model")
        self.requested = model.name
        if not self.key.allows(model.name):
            raise GatewayError("model_not_allowed", f"Your key may not use the model {model.name!r}.", "model")
        if self.client == "anthropic" and self.cache_writes and any(b.provider.kind in VERBATIM
                                                                     for b in model.backends):
            # A backend that gets the pivot as it is may refuse keys it does not know (strict
            # OpenAI-compatible servers do, on a content part): an Anthropic client's markers
            # reach a model served by Claude and Converse only, and ask for no writes elsewhere.
            messages.drop_cache_markers(body)
            self.cache_writes = None
        unserved = next((b for b in model.backends if self.endpoint.name not in SERVES[b.provider.kind]), None)
        if unserved is not None:
            kind = unserved.provider.kind
            raise GatewayError("unsupported_endpoint", f"The model {model.name!r} is served by "
                               f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} backend, which does not offer "
                               f"{self.path}.", "model")
        if self.endpoint is api.CHAT:
            # A field a backend cannot carry is refused before any attempt, not dropped by one.
            refused = next((e for b in model.backends if (e := fields.refusal(b, body, client_paths))), None)
            if refused is not None:
                raise refused
        self.model = model
        self.eligible = model.backends
        self.stream = self.endpoint.can_stream and body.get("stream") is True
        policy = self.runtime.policy
        if policy is not None:
            team = self.runtime.labels.team(self.key.team)
            args = (self.endpoint, body, self.key, cfg.teams.get(self.key.team), self.declared, model, team,
                    self.headers)
            verdict = await asyncio.to_thread(_check, policy, *args) if large else _check(policy, *args)
            self.tier, self.eligible, self.header_edit = verdict.tier, verdict.eligible, verdict.headers
            if verdict.body is not None:  # for embeddings sent as token IDs: the redacted text
                body, self.redacted = verdict.body, True
            if policy.cfg.output_scanning and self.endpoint is api.CHAT:
                self.guard = ResponseGuard(policy, verdict.params, team, in_order=self.client == "anthropic")
            elif policy.cfg.output_scanning and self.endpoint is api.RESPONSES:
                self.guard = ResponsesGuard(policy, verdict.params, team, body)
            elif policy.cfg.output_scanning and self.endpoint is api.EMBEDDINGS:
                self.guard = EmbeddingsGuard(policy, verdict.params, team)
            if policy.may_log_content(verdict.tier):
                self.content = content_for_log(body)
        if self.trace is not None:
            backend = self.only_backend()
            cap = next((body[f] for f in self.endpoint.output_caps if f in body), None)
            self.trace.request(model.name, backend.provider.kind if backend else None, cap, self.stream,
                               self.classified_session())
        count = tokens.counter(model.tokenizer)
        if large:
            self.prompt_tokens = await asyncio.to_thread(self.endpoint.prompt_tokens, body, count, model.image_tokens)
        else:
            self.prompt_tokens = self.endpoint.prompt_tokens(body, count, model.image_tokens)
        return body

    def classified_session(self) -> str | None:
        """The caller's `x-session-id` as classification left it (redacted in place, removed,
        or as sent when nothing was found or no policy is configured)."""
        assert self.trace is not None
        session = self.trace.session
        edit = self.header_edit
        if session is not None and edit is not None:
            if "x-session-id" in edit.remove:
                return None
            if "x-session-id" in edit.set:
                return edit.set["x-session-id"].decode("utf-8", "replace")
        return session

    async def reserve(self, body: dict, thinking: int | None = None) -> None:
        """Reserve the worst case at every level, and send the provider the output cap that
        worst case assumed (budgets/caps.py): the client's cap lowered to the model's limit
        and to what the budget affords, or one set by the gateway when the client sent none.
        A body with prompt-cache markers is reserved at the write price (BudgetGate.plan).
        `thinking`: a Claude thinking budget, which the cap sent must stay above."""
        gate, model, endpoint = self.runtime.budget, self.model, self.endpoint
        assert gate is not None and model is not None and endpoint is not None
        assert self.key is not None and self.prompt_tokens is not None
        if (held := api.provider_added_input(endpoint, body)) is not None:
            raise GatewayError("context_not_countable", f"`{held}` makes the provider add input of its own (an "
                               "earlier conversation, a stored item, file or prompt it keeps, a file it fetches, "
                               "what a hosted tool fetches or a search finds) whose tokens and fees the gateway "
                               "cannot count before the request leaves, so no budget could hold its cost: send the "
                               "conversation in `input` (`store: false`) and files inline (`file_data`), and use "
                               "function tools.",
                               held)
        if (above := api.billed_above_prices(endpoint, body)) is not None:
            raise GatewayError("invalid_request", _ABOVE_PRICES[above], above)
        choices = self.choices = (body.get("n") or 1) if endpoint is api.CHAT else 1
        cap = caps.output_cap(body, endpoint.output_caps, model.max_output_tokens,
                              gate.settings.default_output_tokens, choices)
        caps.check_thinking_room(cap, thinking, model.max_output_tokens)
        predicted = tokens.prediction_tokens(body, tokens.counter(model.tokenizer)) if endpoint is api.CHAT else 0
        self.admission = await gate.admit(gate.plan(self.key, model, self.prompt_tokens, cap.wanted, choices, predicted,
                                                    self.cache_writes, 0 if thinking is None else thinking + 1),
                                          self.runtime.labels.team(self.key.team))
        granted = self.admission.result.output_tokens
        self.body_changed = caps.apply_cap(body, endpoint.output_caps, cap, granted)
        self.clamped = caps.clamped(cap, granted)
        if endpoint is not api.EMBEDDINGS:
            # Backstop for a provider that ignores the cap: its stream (chat, Messages or
            # Responses) is ended for the client once the output passes what was reserved.
            self.cut_after = granted

    def only_backend(self) -> Backend | None:
        """The backend every attempt goes to, when just one is eligible (the router can then
        prepare the request for it once)."""
        return self.eligible[0] if len(self.eligible) == 1 else None

    def forward(self, body: dict) -> ep.ProcessingResponse:
        """Shape the body for the backend, set the route header, hand off to upstream filters."""
        assert self.model is not None and self.endpoint is not None
        changed = self.body_changed or self.redacted or self.client is not None
        subset = len(self.eligible) < len(self.model.backends)
        # Only the backends approved for the request's tier: a cluster the chart renders per tier.
        set_headers: dict[str, str | bytes] = {ROUTE_HEADER: f"{self.model.name}@{self.tier}" if subset
                                               else self.model.name}
        backend = self.only_backend()
        if backend is not None:
            # Every attempt goes to this backend, so the router can prepare it once.
            if body["model"] != backend.model:
                body["model"] = backend.model
                changed = True
            path = backend.provider.base_path + self.endpoint.suffix
            if path != self.path:
                set_headers[":path"] = path
        if self.stream and self.endpoint is api.CHAT:  # Responses streams end with usage anyway
            options = body.get("stream_options") or {}
            if options.get("include_usage") is not True:
                body["stream_options"] = {**options, "include_usage": True}
                changed = True
                # Anthropic clients get usage in message_delta: their translator reads the chunk.
                self.drop_usage = self.client is None
        if self.trace is not None:
            set_headers.update(self.trace.outgoing_headers())
        new_body = orjson.dumps(body) if changed else None
        if new_body is not None:
            set_headers["content-length"] = str(len(new_body))
        metadata = {"model": self.model.name, "api": self.endpoint.name, "request_id": self.request_id,
                    "config": self.runtime.version}
        if self.header_edit is not None:  # redacted in place (policy/headers.py)
            for k, v in self.header_edit.set.items():
                set_headers.setdefault(k, v)  # (not a trace header the gateway writes anyway)
        mutation = r.mutation(set_headers, self.header_edit.remove if self.header_edit else ())
        self.forwarded = True
        return r.request_body(r.common(mutation, new_body, clear_route_cache=True), metadata)

    # -- response ------------------------------------------------------------------------

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        pairs = r.header_pairs(msg)
        h = r.header_map(pairs)
        self.status = self.answered = int(h.get(":status", "0") or 0)
        self.backend = h.get("x-gateway-backend")
        if self.status >= 400 and (code := h.get("x-gateway-error-code")):
            self.error_code = code  # a reply Envoy made itself (the chart's local_reply_config)
        added = self.budget_headers()
        attempts = h.get("x-envoy-attempt-count")
        if attempts:
            added["x-gateway-attempts"] = attempts
        if self.backend and served_natively(self.eligible):  # else the upstream processor counts each attempt
            metrics.child(metrics.UPSTREAM_ATTEMPTS, self.runtime.labels.backend(self.backend),
                          metrics.attempt_outcome(self.status)).inc()
        remove: tuple[str, ...] = ("x-envoy-attempt-count",) if attempts else ()
        backend = self.answered_by()
        if backend is not None:
            # A provider that echoes what it was presented (a debug header, a `www-authenticate`
            # quoting the token, a body quoting the request) must not hand the gateway's
            # credential (any backend's) to the caller.
            self.echo = CredentialCut.of(self.runtime.secrets)
            if echoed := echoed_headers(h, self.runtime.secrets):
                log.warning("provider_echoed_credential", backend=backend.id, provider=backend.provider.name,
                            headers=len(echoed))
                remove = (*remove, *echoed)
        if self.guard is not None and backend is not None and self.error_code is None:
            guard = self.guard  # output scanning: a provider's headers reach the client like its body
            if withheld := withheld_headers(guard.policy, guard.params, guard.team, h):
                log.warning("provider_header_withheld", backend=backend.id, headers=len(withheld))
                remove = (*remove, *withheld)
        if self.error_code is None and backend is not None and not api.headers_fit(*r.header_load(pairs)):
            # The gateway's own headers (backend, attempts, tokens, budget) on an answer
            # already near Envoy's limits failed the request as Envoy's 503
            # `gateway_unavailable` (header_mutation_result_exceeds_limit), blaming a healthy
            # gateway, every time. Charged the reservation.
            log.warning("provider_reply_headers_too_large", backend=backend.id, headers=len(pairs))
            return self.reject(GatewayError("provider_error", "The provider answered with more headers than the "
                                            f"gateway can pass on ({api.MAX_HEADER_COUNT} lines, "
                                            f"{api.MAX_HEADER_BYTES} bytes); its answer was not forwarded."))
        if 300 <= self.status < 400 and self.error_code is None and backend is not None:
            # A provider's redirect is not followed (its target is no backend Envoy knows) nor
            # passed on: it would send the caller around the gateway to the provider's URL.
            return self.reject(GatewayError("provider_error", f"The provider answered HTTP {self.status}, a "
                                            "redirect the gateway does not follow; check the backend's baseURL."))
        if 200 <= self.status < 300 and msg.end_of_stream and self.error_code is None and backend is not None:
            # A 2xx with no body at all (204, `content-length: 0`) is no answer: an empty 200
            # is no JSON an SDK can read, and an empty stream no stream (no [DONE], no error).
            # The provider may have worked: charged at the reservation (no usage came).
            log.warning("provider_reply_empty", backend=self.backend, status=self.status)
            return self.reject(GatewayError("provider_error", f"The provider answered HTTP {self.status} with no "
                                            "body; there is no answer to forward."))
        if 200 <= self.status < 300 and not msg.end_of_stream and _encoded(h):
            # The chart asks providers for `identity`; a compressed answer anyway cannot be
            # accounted or scanned, so it is not forwarded (and is charged at its reservation).
            log.warning("provider_reply_compressed", backend=self.backend)
            return self.reject(GatewayError("provider_error", "The provider answered with a compressed body, which "
                                            "the gateway cannot read; it was not forwarded."))
        if msg.end_of_stream:
            self.log()
            return r.response_headers(r.common(r.mutation(added, remove)))
        content_type = h.get("content-type", "").partition(";")[0].strip().lower()
        if ProviderResponse.needed(backend):
            assert backend is not None
            self.provider = ProviderResponse(backend, self.status, self.stream)
            content_type = "text/event-stream" if self.provider.stream is not None else "application/json"
            added["content-type"] = content_type
        # A stream the client asked for is read as one whatever its label (a provider or proxy
        # that mislabels it must not slip past usage and output scanning), and labelled as one.
        # An answer to a request that did not ask for a stream is read whole whatever its label
        # (a JSON answer labelled SSE went out as an SSE error event the SDK returned as the
        # completion), as is a provider's error (`client_error`).
        if 200 <= self.status < 300 and not self.stream and content_type == "text/event-stream":
            added["content-type"] = "application/json"
        elif self.status < 400 and content_type == "text/event-stream" or (
                self.stream and 200 <= self.status < 300 and content_type != "application/json"):
            if 200 <= self.status < 300 and content_type != "text/event-stream":
                added["content-type"] = "text/event-stream"
            secrets = self.runtime.secrets
            self.tap = SseUsageTap(self.drop_usage, self.guard.sse_event if self.guard and self.status < 300 else None,
                                   self.cut_after, named=self.endpoint is api.RESPONSES, choices=self.choices,
                                   count=tokens.counter(self.model.tokenizer) if self.model is not None else None,
                                   cut=partial(cut_pieces, secrets=secrets) if secrets else None)
            if self.prompt_tokens is not None:
                added["x-gateway-prompt-tokens"] = str(self.prompt_tokens)
            # The stream may change length (translation, usage chunk dropped, redaction, budget cut): chunked.
            remove = (*remove, "content-length")
            if self.client == "anthropic" and 200 <= self.status < 300:
                self.to_client = messages.ToMessagesStream()
            return r.response_headers(r.common(r.mutation(added, remove)), stream_body=True)
        return r.response_headers(r.common(r.mutation(added, remove)) if added or remove else None)

    def cut_usage(self) -> dict[str, int] | None:
        """The usage chunk of a stream cut at its reservation, for a client that gets usage
        (it asked, or is an Anthropic client): the prompt as the gateway counted it and the
        output the reservation allowed, the most the request is charged (the provider's own
        usage comes after the cut, if at all)."""
        if self.drop_usage or self.cut_after is None:
            return None
        prompt = self.prompt_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": self.cut_after, "total_tokens": prompt + self.cut_after}

    def budget_headers(self) -> dict[str, str]:
        if self.admission is None or self.runtime.budget is None:
            return {}
        headers = self.runtime.budget.response_headers(self.admission)
        if self.clamped is not None:
            headers["x-gateway-max-tokens-clamped"] = str(self.clamped)
        return headers

    async def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        if self.broken:
            return r.response_body(r.common(body=b""))
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        if self.tap is not None:
            # A large event is read off the event loop too (1 MiB of text takes ~0.2 s to scan).
            out, cut_now = await asyncio.to_thread(self.stream_chunk, msg) if len(msg.body) > LARGE_BYTES \
                else self.stream_chunk(msg)
            if cut_now:
                log_budget_cut(self)
            self.log_echo()
            if msg.end_of_stream:
                self.usage = self.tap.usage
                self.log()
            return r.response_body(r.common(body=out) if out is not None else None)
        # A large answer is read off the event loop (10 MB of text takes seconds to scan),
        # as a large request is; the access line and the settlement stay on it.
        read = await asyncio.to_thread(self.read_whole, msg.body) if len(msg.body) > LARGE_BYTES \
            else self.read_whole(msg.body)
        new_body, status_changed = read
        self.log_echo()
        self.log()
        headers = self.token_headers()
        if status_changed:
            headers[":status"] = str(self.status)
        if new_body is not None:
            headers["content-length"] = str(len(new_body))
        return r.response_body(r.common(r.mutation(headers), new_body))

    def unread_answer(self) -> ep.ProcessingResponse:
        """After a bug while reading a piece of the answer: that piece could hold what output
        scanning or the credential cut would have removed, so it does not go out as it came,
        nor does anything after it. A JSON answer becomes a 500 `gateway_internal_error`; a
        stream ends there (its client sees it cut off). Charged as an unreadable answer."""
        self.broken = True
        err = GatewayError("gateway_internal_error", "The gateway failed to process the provider's answer; it was "
                           "not forwarded.")
        self.error_code = err.code
        if self.tap is None:
            self.status = err.status
            self.log()
            return r.response_body(r.common(r.mutation({":status": str(err.status), "content-type": "application/json",
                                                        "content-length": str(len(err.body()))}), err.body()))
        self.log()
        return r.response_body(r.common(body=b""))

    def stream_chunk(self, msg: ep.HttpBody) -> tuple[bytes | None, bool]:
        """What goes to the client for one piece of a streamed answer (None: as it came), and
        whether the budget cut the stream at it."""
        assert self.tap is not None
        body = msg.body
        data = body if self.echo is None else self.echo.feed(body, msg.end_of_stream)
        if self.provider is not None:
            data = self.provider.feed(data, msg.end_of_stream)
        out = self.tap.feed(data, msg.end_of_stream)
        cut_now = False
        if self.cut:
            out = b""  # the client's stream already ended; keep reading usage only
        elif self.tap.over:
            self.cut = cut_now = True
            out = (out or b"") + self.held_text() + _cut_events(self.cut_after or 0, self.cut_usage(),
                                                               self.endpoint is api.RESPONSES)
        elif msg.end_of_stream and self.endpoint in _ENDED_BY_EVENTS and 200 <= self.status < 300 \
                and not (self.tap.done or self.tap.ended):
            out = self.tap.whole(data if out is None else out) + self.held_text() + _interrupted_event(self)
        elif msg.end_of_stream and self.endpoint is api.RESPONSES and self.guard is not None \
                and 200 <= self.status < 300:  # text output scanning still holds back at the end
            out = self.tap.whole(data if out is None else out) + self.held_text()
        if self.to_client is not None:
            out = self.to_client.feed(data if out is None else out, msg.end_of_stream)
        if out is None and (self.provider is not None or data is not body):
            out = data
        return out, cut_now

    def log_echo(self) -> None:
        """The provider's answer quoted a credential (cut): logged once per answer."""
        if self.echo is not None and self.echo.found and not self.echo.reported:
            self.echo.reported = True
            backend = self.answered_by()
            log.warning("provider_echoed_credential", backend=self.backend,
                        provider=backend.provider.name if backend else None, body=True)

    def read_whole(self, body: bytes) -> tuple[bytes | None, bool]:
        """A whole (buffered) answer: its usage read, translated, scanned or, for an error,
        made fit for the client (`client_error`). The body to send instead, if any, and
        whether the status changed."""
        cut = body if self.echo is None else self.echo.whole(body)
        raw = cut if self.provider is None else self.provider.body(cut)
        new_body = None if self.provider is None and cut is body else raw
        # An unreadable provider answer under a 2xx goes out as 502 (provider_response.py).
        status = self.status if self.provider is None else self.provider.status
        status_changed, self.status = status != self.status, status
        if 200 <= self.status < 300:
            try:  # parsed once: usage first, then the guard may change it
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            self.usage = usage_from_object(parsed)
            if self.guard is not None:
                try:
                    new_body = self.guard.json_body(parsed) or new_body
                except GatewayError as err:
                    new_body, self.status, status_changed, self.error_code = err.body(), err.status, True, err.code
            if self.client == "anthropic" and self.endpoint is api.CHAT and 200 <= self.status < 300:
                new_body = messages.from_chat(raw if new_body is None else new_body)
                if new_body is None:  # no chat completion to translate: not an answer
                    new_body, self.status, status_changed = openai_error(
                        502, f"The provider answered HTTP {status} with a body the gateway could not read."), 502, True
        elif self.status >= 400 and self.error_code is None and (backend := self.answered_by()) is not None:
            guard = self.guard
            scan = None if guard is None else partial(scanned_error_object, guard.policy, guard.params, guard.team)
            try:
                new_body = client_error(self.status, raw, self.runtime.secrets, backend.id, scan)
            except GatewayError as err:
                log.warning("provider_refused_credential", backend=backend.id, provider=backend.provider.name)
                new_body, self.status, status_changed, self.error_code = err.body(), err.status, True, err.code
        return new_body, status_changed

    def answered_by(self) -> Backend | None:
        """The backend whose answer this is (Envoy's header from endpoint metadata), if any:
        the request's model's own entry, with that model's price. Another model may list the
        same `provider/model` at a price of its own (an alias); `config.backends` holds one of them."""
        if self.model is None or not self.backend:
            return None
        return next((b for b in self.model.backends if b.id == self.backend), None)

    def held_text(self) -> bytes:
        """What output scanning still holds back, scanned, when the gateway ends a stream early."""
        return self.guard.flush() if self.guard is not None else b""

    def token_headers(self) -> dict[str, str]:
        usage = self.usage or Usage()
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else self.prompt_tokens
        out = {}
        if prompt is not None:
            out["x-gateway-prompt-tokens"] = str(prompt)
        if usage.completion_tokens is not None:
            out["x-gateway-completion-tokens"] = str(usage.completion_tokens)
        return out

    # -- outcomes ------------------------------------------------------------------------

    def reject(self, err: GatewayError, reply: ep.ProcessingResponse | None = None) -> ep.ProcessingResponse:
        self.status, self.error_code = err.status, err.code
        if self.trace is not None:
            self.trace.event("gateway.rejected", code=err.code, status=err.status)
        self.log()
        return reply if reply is not None else r.error(err)

    def answer(self, status: int, body: bytes) -> ep.ProcessingResponse:
        self.status = status
        self.log()
        return r.immediate(status, body, "gw_answered")

    def log(self, outcome: str = "complete") -> None:
        """The one access-log line of this request (never a key, never content)."""
        if self.logged:
            return
        self.logged = True
        if self.usage is None and self.tap is not None:
            # The client left before the body's end reached us (SDKs stop reading at [DONE] or
            # the usage chunk and close): the provider's usage, if it went by, is still what counts.
            self.usage = self.tap.usage
        now = time.monotonic()
        usage = self.usage or Usage()
        backend = self.answered_by()
        duration = now - self.started
        ttft = self.first_byte - self.started if self.stream and self.first_byte else None
        spent = self.consumed(backend)
        content = self.logged_content()  # the access line and the audit record carry the same text
        if self.status == 0 and self.forwarded and served_natively(self.eligible):
            # The client left before any answer, while the provider had the attempt: counted as
            # the upstream processor counts one on the clusters it runs on (no status: `error`).
            metrics.child(metrics.UPSTREAM_ATTEMPTS, self.runtime.labels.backend(self.eligible[0].id),
                          metrics.attempt_outcome(0)).inc()
        genai = self.path not in api.ANSWERED  # `/v1/models`, `/v1/usage`: no GenAI request
        if genai:
            metrics.record_request(
                self.runtime.labels, team=self.key.team if self.key else None,
                model=self.model.name if self.model else None, provider=backend.provider.name if backend else None,
                status=self.status or 499, prompt_tokens=spent.prompt if spent.processed else None,
                completion_tokens=spent.completion if spent.processed else None, cached_tokens=usage.cached_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                duration_s=duration, ttft_s=ttft, generated_tokens=usage.completion_tokens)
        self.account(spent)
        if self.trace is not None:
            # The answer's labels come from the provider's bytes as they arrived: only clean ones
            # go on the span (a value the client got redacted must not reach the collector).
            label = self.runtime.policy.clean_label if self.runtime.policy is not None else lambda _n, v: v
            reasons = tuple(r for r in usage.finish_reasons if label("finish_reason", r) is not None)
            # A stream the budget cut short ended with a `budget_exceeded` error event: a failed
            # operation for the conventions, though its status (sent before the cut) is 2xx.
            self.trace.finish(
                status=self.status, error_code=self.error_code or ("budget_exceeded" if self.cut else None),
                provider=backend.provider.kind if backend else None,
                backend=self.backend, response_model=label("model", usage.response_model),
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens, duration_s=duration, ttft_s=ttft,
                request_model=self.model.name if self.model else None, team=self.key.team if self.key else None,
                server=backend.provider.base_url if backend else None, response_id=label("id", usage.response_id),
                finish_reasons=reasons, genai=genai)
        access_log.info(
            "access", outcome=outcome, request_id=self.request_id, method=self.method, path=self.path,
            key_id=self.key.id if self.key else None, team=self.key.team if self.key else None,
            model=self.model.name if self.model else None, backend=self.backend, status=self.status,
            error_code=self.error_code, stream=self.stream,
            prompt_tokens=usage.prompt_tokens if usage.prompt_tokens is not None else self.prompt_tokens,
            prompt_tokens_local=self.prompt_tokens, completion_tokens=usage.completion_tokens,
            duration_ms=round(duration * 1000, 2), ttft_ms=round(ttft * 1000, 2) if ttft is not None else None,
            tier=self.tier, **self.unreadable_events(), **content)
        audit.request(self, backend, outcome, spent, content)

    def unreadable_events(self) -> dict[str, int]:
        """How many stream events output scanning dropped unread, when any (logged once each
        stream, `stream_event_unreadable`, not once each event)."""
        count = self.guard.unreadable.count if self.guard is not None else 0
        return {"unreadable_events": count} if count else {}

    def logged_content(self) -> dict[str, str]:
        """Prompt and response text, only for requests whose tier the content-logging policy allows."""
        if self.content is None:
            return {}
        out = {"prompt": self.content}  # the body as forwarded: redacted
        response = self.guard.logged_response() if self.guard is not None else ""
        policy = self.runtime.policy
        if response and policy is not None and self.guard is not None \
                and (self.guard.clean or policy.may_log_text(response, self.guard.params)):
            out["response"] = response  # as the client got it: redacted, and within the logging tier
        return out

    def consumed(self, backend: Backend | None) -> Consumed:
        """What the provider processed, priced at the backend that answered (else the model's
        worst price): its usage when known; for a stream that ended itself without usage, the
        local prompt count and the tokens of its generated text (at least one per content
        event); else, when the provider may
        have worked (a stream cut off, garbled or left by its client before its end, a usage
        chunk whose counts cannot be read, a client gone before the answer, a 2xx JSON answer
        whose body was never read, a stream cut short after a running usage count rather than
        its bill, a provider that reset the connection or timed out after it
        had the request, an attempt whose ext_proc worker failed after the router forwarded
        the request), the reservation's
        worst case, the most it can bill with the cap it was sent (the output streamed so far
        undercounts: an event may carry many tokens, a Responses delta is no `content`, and
        the provider may have generated more than it sent); nothing when the provider was
        never reached, refused or failed. Without a reservation (no budget), the events."""
        usage = self.usage or Usage()
        if self.endpoint is api.EMBEDDINGS and usage.completion_tokens is None and usage.prompt_tokens is not None:
            # Embeddings produce no output, and their usage says so by leaving the count out:
            # a readable `prompt_tokens` is the whole bill, not an unknown one (the reservation).
            usage = replace(usage, completion_tokens=0)
        answered = self.answered or self.status
        if not (self.status == 0 or 200 <= answered < 300 or usage.completion_tokens is not None
                or self.error_code in _MAY_HAVE_BILLED) or self.model is None:
            return Consumed(0, 0, 0, False)
        price = backend.price if backend and backend.price else (
            self.admission.plan.price if self.admission else None)
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else (self.prompt_tokens or 0)
        # A running count is not what the provider bills (SseUsageTap.usage_final): on a stream
        # cut short, or one that went on with text after it; a chat stream that ended itself
        # with no text after its last count was billed that count.
        tap = self.tap
        running = tap is not None and not tap.usage_final and (tap.stale or tap.named or not tap.done)
        if usage.completion_tokens is not None and not (running and self.admission is not None):
            completion = usage.completion_tokens
        elif tap is not None and (tap.done and not running and not tap.over and not tap.usage_unread
                                  and not self.unreadable_stream() or self.admission is None):
            # A whole stream without usage: the tokens of the text it generated, at least one per
            # event (an event may carry many tokens: a server batching its output).
            completion = max(tap.content_events, tap.generated_tokens)
        elif self.admission is not None:  # the provider's bill is unknown: at most the reservation
            r = self.admission.result
            return Consumed(r.reserved_nano, self.prompt_tokens or 0, r.output_tokens, True)
        else:
            completion = 0
        long = usage.cache_write_1h_tokens
        if long is None and self.cache_writes == "1h" and backend is not None and backend.provider.kind in VERBATIM:
            long = usage.cache_write_tokens  # writes without their TTL split (OpenRouter), asked for an hour
        cost = cost_nano(price, prompt, completion, usage.cached_tokens or 0, usage.cache_write_tokens or 0,
                         long or 0) if price is not None else 0
        return Consumed(cost, prompt, completion, True)

    def unreadable_stream(self) -> bool:
        """The translator stopped at bytes it could not read (and ended the client's stream with
        a `provider_error`): what came after them, the provider's usage included, is unknown.
        Or the stream ended without a usage it could read (GuardedStream.usage_unknown)."""
        stream = self.provider.stream if self.provider is not None else None
        return stream is not None and (stream.failure is not None or stream.usage_unknown)

    def account(self, spent: Consumed) -> None:
        """Cost metrics for every priced request; budget settlement when one was reserved."""
        if self.model is None:
            return
        team = self.runtime.labels.team(self.key.team if self.key else None)
        if spent.cost:
            metrics.child(metrics.COST, team, self.runtime.labels.model(self.model.name)).inc(spent.cost / 1e9)
        if self.admission is None or self.runtime.budget is None:
            return
        charged = min(spent.cost, self.admission.result.reserved_nano)
        daily_team = next((lv for lv in self.admission.plan.levels if lv.name.startswith("team:")
                           and lv.window.kind == "daily" and lv.limit.limit_nano < MAX_NANO), None)
        if daily_team is not None:
            left = self.admission.result.remaining_nano.get(daily_team.limit.key, 0)
            metrics.child(metrics.TEAM_DAILY_REMAINING, team).set(
                max(0, left - (charged - self.admission.result.reserved_nano)) / 1e9)
        # More output than the cap sent is a provider ignoring it or misreporting: charged at
        # most the reservation (settle), and tallied at most the output tokens reserved.
        tallied = spent.prompt + min(spent.completion, self.admission.result.output_tokens)
        self.runtime.budget.settle(self.admission, spent.cost, tallied, team)

    def close(self) -> None:
        """The stream ended; if the response never completed, say so in the log."""
        self.log(outcome="incomplete")


def _jwt_claims(metadata: base_pb2.Metadata | None) -> dict | None:
    """Payloads jwt_authn verified, by provider name (its `payload_in_metadata`)."""
    if metadata is None or identity.JWT_NAMESPACE not in metadata.filter_metadata:
        return None
    return json_format.MessageToDict(metadata.filter_metadata[identity.JWT_NAMESPACE])


def _check(policy: Policy, endpoint: api.Endpoint, body: dict, key: VirtualKey, team: Limits | None,
           declared: str | None, model: Model, team_label: str, headers: tuple[Header, ...]) -> Verdict:
    """The policy's verdict on what the provider will read: embeddings' token IDs are
    checked as the text they stand for (decoded with the model's tokenizer)."""
    if endpoint is api.EMBEDDINGS:
        decode = tokens.decoder(model.tokenizer)
        try:
            text = tokens.embedding_text(body, decode)
        except ValueError as exc:
            if decode is None:
                raise GatewayError("token_input_unreadable", f"The model {model.name!r} cannot take token IDs "
                                   "here: the gateway reads a request to classify it, and this model's tokenizer "
                                   "cannot decode them. Send the input as text.", "input") from None
            raise GatewayError("invalid_request", f"`input`: {exc}.", "input") from None
        if text is not None:
            body = text
    return policy.check_request(body, key, team, declared, model, team_label, headers)


def _endpoint_for(method: str, path: str) -> api.Endpoint | str:
    """The forwarded endpoint for a request line, or the path of one the gateway answers
    itself (`/v1/models`, `/v1/usage`)."""
    if path in api.ANSWERED:
        if method not in ("GET", "HEAD"):  # (HEAD: GET's answer without its body, as HTTP has it)
            raise GatewayError("method_not_allowed", f"{path} supports GET.")
        return path
    endpoint = api.FORWARDED.get(path)
    if endpoint is None:
        # The path is never quoted back (nor logged): it may hold anything, a key included.
        raise GatewayError("unknown_endpoint", f"Unknown endpoint {method}: this gateway serves POST "
                           f"{', '.join(api.FORWARDED)} and GET {api.MODELS_PATH}, {api.USAGE_PATH}.")
    if method != "POST":
        raise GatewayError("method_not_allowed", f"{path} supports POST.")
    return endpoint


def _encoded(h: dict[str, str]) -> bool:
    """A body with a content coding (gzip, br...): the gateway has no decompressor to read it."""
    return h.get("content-encoding", "identity").strip().lower() not in ("identity", "")


def _cut_events(output_tokens: int, usage: dict[str, int] | None, responses: bool = False) -> bytes:
    """How a stream that outgrew its reservation ends (a provider that ignored the output
    cap): a `finish_reason: "length"` chunk, the usage chunk when the client gets one, an
    OpenAI-shaped error event (the openai SDK raises it as APIError), then [DONE]. A
    Responses stream has no chunks nor [DONE]: it ends with the error event alone, as the
    gateway ends it on any other error."""
    error = {"error": {"message": f"The provider went past the {output_tokens} output tokens your budget reserved "
                                  "for this request; the stream was ended by the gateway.",
                       "type": "rate_limit_error", "code": "budget_exceeded", "param": None}}
    if responses:
        return b"data: " + orjson.dumps(error) + b"\n\n"
    finish = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    counted = b"" if usage is None else b"data: " + orjson.dumps(
        {"object": "chat.completion.chunk", "choices": [], "usage": usage}) + b"\n\n"
    return b"data: " + orjson.dumps(finish) + b"\n\n" + counted + b"data: " + orjson.dumps(error) + \
        b"\n\ndata: [DONE]\n\n"


# The endpoints whose streams end with an event of their own ([DONE]; Responses:
# `response.completed`, `.incomplete` or `.failed`), so a stream ending without it was cut off.
_ENDED_BY_EVENTS = (api.CHAT, api.RESPONSES)


def _interrupted_event(p: RouterProcessor) -> bytes:
    """How a stream the provider ended without finishing (no [DONE]; a Responses stream
    without its last event) ends for the client: an OpenAI-shaped error event, so SDKs raise
    instead of returning half an answer as if it were whole. Nothing is retried after the
    first byte, so nothing is repeated."""
    p.error_code = "upstream_stream_interrupted"
    access_log.warning("stream_interrupted", request_id=p.request_id, backend=p.backend,
                       events=p.tap.events if p.tap else None)
    return sse(error_body("The provider ended the stream before it finished; the answer above is incomplete.",
                          "server_error", "upstream_stream_interrupted"))


def log_budget_cut(p: RouterProcessor) -> None:
    metrics.child(metrics.BUDGET_EVENTS, p.runtime.labels.team(p.key.team if p.key else None), "stream_cut").inc()
    access_log.warning("stream_cut_at_budget", request_id=p.request_id, key_id=p.key.id if p.key else None,
                       output_tokens=max(p.tap.content_events, p.tap.generated_tokens) if p.tap else None)


def _models_body(models: dict[str, Model], key: VirtualKey) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
        for name in models if key.allows(name)]})


# Envoy's own errors after a provider had the request (the chart's local replies): it may be
# working on it and bill it, so its bill is unknown, not nothing. `gateway_unavailable` reaches
# this (healthy) router stream only from an attempt's upstream ext_proc, on another worker,
# that died or froze after the router forwarded the request: most often while the provider
# worked on it or at its answer's headers, which the provider bills.
_MAY_HAVE_BILLED = frozenset({"upstream_reset", "upstream_timeout", "gateway_unavailable"})


def _too_large(limit: int) -> GatewayError:
    return GatewayError("request_too_large", f"Request body exceeds the gateway limit of {limit} bytes.")
