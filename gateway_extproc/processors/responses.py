"""Builders for ext_proc ProcessingResponse messages, so processors speak in intent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import duration_pb2
from gateway_extproc._proto.envoy.config.core.v3 import base_pb2
from gateway_extproc._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc._proto.envoy.type.v3 import http_status_pb2

from ..errors import GatewayError

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = (("content-type", "application/json"),)
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
SEND = processing_mode_pb2.ProcessingMode.SEND
SKIP = processing_mode_pb2.ProcessingMode.SKIP
NONE = processing_mode_pb2.ProcessingMode.NONE
# The router filter's processing once its request headers are answered (the chart's filter
# config skips the response until then): request and response bodies buffered, response
# headers sent, no trailers.
_PROCESS_RESPONSE = processing_mode_pb2.ProcessingMode(
    request_header_mode=SEND, request_body_mode=BUFFERED, response_header_mode=SEND, response_body_mode=BUFFERED,
    request_trailer_mode=SKIP, response_trailer_mode=SKIP)
METADATA_NAMESPACE = "gw"  # the chart's metadata_options.receiving_namespaces
# Statuses the chart has a refusal route for (`refusal_after_body`), and the request header
# its route answers with as `retry-after`.
REFUSED_AFTER_BODY = (415, 503)
REFUSAL_RETRY_AFTER = "x-gateway-refusal-retry-after"
# Neither the rest of a refused request nor its answer comes to the ext_proc.
_NOTHING_MORE = processing_mode_pb2.ProcessingMode(
    request_header_mode=SEND, request_body_mode=NONE, response_header_mode=SKIP, response_body_mode=NONE,
    request_trailer_mode=SKIP, response_trailer_mode=SKIP)


def header_pairs(msg: ep.HttpHeaders) -> list[tuple[str, bytes]]:
    """Envoy's header list as (name, raw value) pairs, read once: every read of a protobuf
    entry builds its Python objects again, and a request's headers are read three ways."""
    return [(h.key, h.raw_value) for h in msg.headers.headers]


def header_load(pairs: list[tuple[str, bytes]]) -> tuple[int, int]:
    """The header lines and their bytes (names and values), as Envoy counts them against its limits."""
    return len(pairs), sum(len(k) + len(v) for k, v in pairs)


def header_map(pairs: list[tuple[str, bytes]]) -> dict[str, str]:
    """The headers (`header_pairs`) as a dict (names arrive lower-cased; Envoy 1.40 sends
    every value in raw_value and leaves `value` empty). A header sent several times is one
    value joined with ',' (RFC 9110), as Envoy itself joins a repeated `Authorization`:
    keeping only the last let a second `x-api-key` win unchecked."""
    out = {k: v.decode("utf-8", "replace") for k, v in pairs}
    if len(out) < len(pairs):
        out = {}
        for k, raw in pairs:
            value = raw.decode("utf-8", "replace")
            out[k] = f"{out[k]},{value}" if k in out else value
    return out


# `mutation` and `common` return the messages' fields as nested dicts, and each reply below
# builds the whole ProcessingResponse from them in one upb call: a message object per level,
# copied into its parent, cost twice as much (every ext_proc message pays it).
Fields = dict[str, Any]


def mutation(set_: Mapping[str, str | bytes] | None = None, remove: Iterable[str] = ()) -> Fields:
    """A HeaderMutation: `set_` overwrites (or adds) each header, `remove` removes."""
    return {"set_headers": [{"header": {"key": k, "raw_value": v if isinstance(v, bytes) else v.encode()},
                             "append_action": _OVERWRITE} for k, v in set_.items()] if set_ else (),
            "remove_headers": remove}


def common(headers: Fields | None = None, body: bytes | None = None, clear_route_cache: bool = False) -> Fields:
    """A CommonResponse."""
    out: Fields = {"clear_route_cache": clear_route_cache}
    if headers is not None:
        out["header_mutation"] = headers
    if body is not None:
        out["body_mutation"] = {"body": body}
    return out


# Envoy's message timer for a large request body (admission.py: the body may wait its turn
# up to WAIT_S, then take seconds of work on a busy process) or a large piece of an answer
# (output scanning: ~0.6 s per MB of text dense in numbers): at most the chart's
# `max_message_timeout` for the router filter.
LARGE_BODY_TIME = ep.ProcessingResponse(override_message_timeout=duration_pb2.Duration(seconds=20))


def request_headers(c: Fields | None = None, process_response: bool = False) -> ep.ProcessingResponse:
    """`process_response` turns the router filter's response processing on (its config skips
    it, so that Envoy's replies to requests it never parsed are not held for the ext_proc:
    the chart's comment)."""
    return ep.ProcessingResponse(request_headers=_reply(c),
                                 mode_override=_PROCESS_RESPONSE if process_response else None)


def request_body(c: Fields | None = None, metadata: Mapping[str, str] | None = None) -> ep.ProcessingResponse:
    """`metadata`: string values for Envoy's dynamic metadata namespace `gw`."""
    resp = ep.ProcessingResponse(request_body=_reply(c))
    if metadata:
        fields = resp.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
        for k, v in metadata.items():
            fields[k].string_value = v  # field by field: half the cost of Struct.update
    return resp


def response_headers(c: Fields | None = None, stream_body: bool = False,
                     buffer_body: bool = False) -> ep.ProcessingResponse:
    """`stream_body` / `buffer_body` override the filter's response body mode for this
    response (needs `allow_mode_override` in the filter config)."""
    resp = ep.ProcessingResponse(response_headers=_reply(c))
    if stream_body:
        resp.mode_override.response_body_mode = STREAMED
    elif buffer_body:
        resp.mode_override.response_body_mode = BUFFERED
    return resp


def response_body(c: Fields | None = None) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(response_body=_reply(c))


def _reply(c: Fields | None) -> Fields:
    """A HeadersResponse or BodyResponse (the same fields): set even when empty, since the
    reply's kind says which message it answers."""
    return {"response": c} if c is not None else {}


def immediate(status: int, body: bytes, details: str,
              headers: Iterable[tuple[str, str]] = _JSON) -> ep.ProcessingResponse:
    """A response Envoy sends itself. `details` starts with gw_ so Envoy's local-reply
    mapper (which rewrites Envoy's own errors into the OpenAI shape) leaves it alone."""
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=mutation(dict(headers)),
        body=body,
        details=details))


def error(err: GatewayError) -> ep.ProcessingResponse:
    return immediate(err.status, err.body(), f"gw_{err.code}", (*_JSON, *err.headers.items()))


def refusal_after_body(err: GatewayError) -> ep.ProcessingResponse:
    """`err` (a status in REFUSED_AFTER_BODY) for a client still sending its body. Answered
    at once, Envoy closes an HTTP/1 connection with the body unread (the kernel resets it) or
    resets the HTTP/2 stream, and a client that writes its whole body before it reads (httpx,
    the SDKs) sees the break, not the answer. The chart's refusal route for the status reads
    the body to its end (the buffer filter; the body never comes here), then answers with
    this error's body and `retry-after`."""
    refusal = {"x-gateway-refusal": err.body(), "x-gateway-refusal-status": str(err.status)}
    retry_after = err.headers.get("retry-after")
    if retry_after is not None:
        refusal[REFUSAL_RETRY_AFTER] = retry_after
    # (a caller's own x-gateway-refusal-retry-after would else be its refusal's retry-after)
    edit = mutation(refusal, remove=() if retry_after is not None else (REFUSAL_RETRY_AFTER,))
    return ep.ProcessingResponse(request_headers=_reply(common(edit, clear_route_cache=True)),
                                 mode_override=_NOTHING_MORE)


