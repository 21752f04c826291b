"""Client-facing errors: one exception type, rendered in the OpenAI error shape.

Every `code` here is explained in docs/runbooks.md; tests check that the two agree, so a
client that sees a code can always find what it means and what to do.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# OpenAI's error `type` for each HTTP status we answer with.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
}

# code -> HTTP status. The single list of codes the ext_proc itself can answer with.
CODES: dict[str, int] = {
    "invalid_json": 400,
    "invalid_encoding": 400,
    "invalid_request": 400,
    "too_many_choices": 400,
    "thinking_budget_too_large": 400,  # Claude's thinking budget not below the output cap sent
    "context_not_countable": 400,  # Responses state the provider keeps, under a budget
    "token_input_unreadable": 400,  # embeddings as token IDs for a model whose tokenizer is `estimate`
    "missing_api_key": 401,
    "invalid_api_key": 401,
    "expired_api_key": 401,
    "identity_not_mapped": 403,  # a verified certificate or token that maps to no principal
    "identity_conflict": 403,
    "admin_unauthorized": 401,  # key admin API only
    "key_not_found": 404,  # key admin API only
    "key_conflict": 409,  # key admin API only
    "key_store_unavailable": 503,
    "audit_not_enabled": 404,  # key admin API's reports only
    "model_not_allowed": 403,
    "classification_violation": 403,
    "content_blocked": 403,
    "model_not_found": 404,
    "unknown_endpoint": 404,
    "unsupported_endpoint": 400,
    "method_not_allowed": 405,
    "request_too_large": 413,
    "request_headers_too_large": 431,
    "unsupported_media_type": 415,
    "budget_exceeded": 429,
    "rate_limited": 429,
    "budget_store_unavailable": 503,
    "gateway_busy": 503,  # large-body work over this process's share (admission.py)
    "provider_credential_missing": 500,
    "gateway_internal_error": 500,
    "upstream_stream_interrupted": 502,  # only ever sent as a stream's last event
    "provider_auth_failed": 502,  # the provider refused the gateway's own credential
    "provider_error": 502,  # a provider error put in the OpenAI shape; clients get the provider's own status
}


class GatewayError(Exception):
    """A request the gateway refuses; carries everything the error response needs."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = CODES[code]
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return error_type(self.status)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (the gateway's or a provider's)."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_object(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape, as an object (to scan or edit before it is sent)."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    return orjson.dumps(error_object(message, type_, code, param))


def completed_error(error: dict[str, Any], type_: str, message: str) -> dict[str, Any]:
    """A provider's OpenAI-schema error object with the four fields every client reads: its
    own `code` when it names one (`context_length_exceeded`: the provider's docs explain it),
    else `provider_error` (OpenAI sends `"code": null` with a 5xx, in a JSON answer and in a
    stream's error event alike); `type_` and `message` fill in a missing type and message."""
    msg, kind, code, param = (error.get(k) for k in ("message", "type", "code", "param"))
    return {**error, "message": msg if isinstance(msg, str) and msg else message,
            "type": kind if isinstance(kind, str) and kind else type_,
            "code": code if isinstance(code, str) and code else "provider_error",
            "param": param if isinstance(param, str) else None}


_PLAIN_WORD = re.compile(r"[a-z][a-z_]{0,31}")


def plain_word(value: object) -> bool:
    """Whether a caller's value may be shown in an error (`quoted`): a field name a client sent
    that the gateway does not know is named only then."""
    return isinstance(value, str) and _PLAIN_WORD.fullmatch(value) is not None


def quoted(value: object) -> str:
    """A caller's value for an error message: quoted when it is a plain word (`'developer'`,
    `'input_audio'`: what an enum field holds, and what helps most), else not shown. Error
    bodies never carry caller text that could be a key, a token or a card."""
    return repr(value) if plain_word(value) else "(value not shown)"
