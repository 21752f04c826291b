"""Deterministic mock LLM provider speaking the OpenAI, Azure OpenAI, Anthropic, AWS
Bedrock (Converse) and Google Gemini HTTP APIs.

Why it exists: ``make run`` and the integration tests need an upstream behind
Envoy that behaves like each provider the gateway can route to (chat, streaming,
embeddings, models) without network access, API spend or nondeterminism.
Replies are derived only from the request, token usage is counted with the real
o200k_base BPE, and tests can inject failures (error statuses, latency, slow or
truncated streams) and inspect every request the gateway forwarded.  See
``docs/mock-provider.md`` for the full contract.

It is a small asyncio + h11 HTTP/1.1 server rather than a web framework so it
starts fast, has no extra dependencies, and gives exact control over the wire
(one HTTP chunk per SSE event or event-stream message, abrupt connection drops
mid-body).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import hashlib
import hmac
import itertools
import json
import math
import re
import signal
import ssl
import struct
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from http.client import responses
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import h11
import orjson
from bpe_openai import Encoding, get_encoding

from gateway_extproc import tokens
from gateway_extproc.providers import eventstream

try:
    from uvloop import run as _run_event_loop
except ImportError:  # pragma: no cover - uvloop is optional
    from asyncio import run as _run_event_loop

__all__ = ["MockProvider", "start", "run"]

JSON = dict[str, Any]

CONTROL_PREFIX = "/_mock/"
READ_SIZE = 65536
DEFAULT_EMBEDDING_DIMENSIONS = 8
REPLY_PROMPT_CHARS = 60
MODEL_CREATED = 1_700_000_000
MODELS = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "claude-sonnet-4-5")
# The behaviour `model` that matches every request (one line makes a whole instance fail).
WILDCARD = "*"
EVENTSTREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"

_OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_ANTHROPIC_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_BEDROCK_ERROR_TYPES = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    503: "ServiceUnavailableException",
}
_GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_WORD_RE = re.compile(r"\s*\S+|\s+")


# --------------------------------------------------------------------------- errors


class HTTPError(Exception):
    """An API error answered in the shape of the endpoint's provider."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code


def _openai_error_body(error: HTTPError) -> JSON:
    default = "server_error" if error.status >= 500 else "invalid_request_error"
    kind = error.type or _OPENAI_ERROR_TYPES.get(error.status, default)
    return {"error": {"message": error.message, "type": kind, "code": error.code, "param": None}}


def _openai_error(error: HTTPError) -> Reply:
    return Reply(status=error.status, body=_openai_error_body(error))


def _azure_error(error: HTTPError) -> Reply:
    """Azure keeps OpenAI's error object but always fills ``code`` (its own code, else the status)."""
    body = _openai_error_body(error)
    body["error"]["code"] = error.code or str(error.status)
    return Reply(status=error.status, body=body)


def _anthropic_error(error: HTTPError) -> Reply:
    default = "api_error" if error.status >= 500 else "invalid_request_error"
    kind = error.type or _ANTHROPIC_ERROR_TYPES.get(error.status, default)
    return Reply(status=error.status, body={"type": "error", "error": {"type": kind, "message": error.message}})


def _bedrock_error(error: HTTPError) -> Reply:
    """AWS REST-JSON: the body only has ``message``; the error name travels in ``x-amzn-errortype``,
    which is where botocore (and the gateway) read it from."""
    default = "InternalServerException" if error.status >= 500 else "ValidationException"
    kind = error.type or _BEDROCK_ERROR_TYPES.get(error.status, default)
    return Reply(status=error.status, body={"message": error.message}, headers=[("x-amzn-errortype", kind)])


def _gemini_error(error: HTTPError) -> Reply:
    """Google's ``{"error": {code, message, status}}`` with the canonical status name for the HTTP code."""
    default = "INTERNAL" if error.status >= 500 else "INVALID_ARGUMENT"
    status = error.type or _GOOGLE_STATUSES.get(error.status, default)
    body = {"error": {"code": error.status, "message": error.message, "status": status}}
    return Reply(status=error.status, body=body)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Request:
    """A fully read HTTP request."""

    method: str
    target: str
    headers: dict[str, str]
    raw_body: bytes
    json: Any

    @classmethod
    def build(cls, head: h11.Request, raw_body: bytes) -> Request:
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if SEALED in headers:
            headers.update(unseal(headers.pop(SEALED)))
        try:
            parsed = orjson.loads(raw_body)
        except orjson.JSONDecodeError:
            parsed = None
        return cls(head.method.decode("ascii"), head.target.decode("latin-1"), headers, raw_body, parsed)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        """Percent-decoded query parameters; the last value wins for a repeated name."""
        return dict(parse_qsl(self.target.partition("?")[2], keep_blank_values=True))

    def record(self) -> JSON:
        """What ``GET /_mock/requests`` shows; the exact body bytes let tests check request signatures."""
        return {
            "method": self.method,
            "path": self.target,
            "headers": self.headers,
            "body": self.json,
            "raw_body_len": len(self.raw_body),
            "raw_body_base64": base64.b64encode(self.raw_body).decode("ascii"),
        }


@dataclass
class Reply:
    """A JSON response (``body``) or a stream (``events``, one HTTP chunk each), plus wire-level controls."""

    status: int = 200
    body: Any = None
    events: list[bytes] | None = None
    # None: application/json for a body, text/event-stream for events (what most routes send).
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    latency_s: float = 0.0
    chunk_delay_s: float = 0.0
    drop_after: int | None = None
    # The connection drops after the request was read, before any answer (after latency_s):
    # a provider that got the request, may be billing it, and went away.
    reset: bool = False
    # Like drop_after, but the HTTP body ends cleanly: a provider that stops mid-answer.
    end_after: int | None = None
    # Bytes sent instead of ``body`` (x-mock-garbage on a JSON reply).
    raw: bytes | None = None
    # Re-slice the stream into HTTP chunks of this many bytes (tiny: events split anywhere;
    # huge: many events per chunk) instead of one chunk per event.
    chunk_bytes: int | None = None
    # Compress the body with this content-coding (gzip, deflate) whatever the client accepts.
    content_encoding: str | None = None
    # Informational (1xx) answers sent before this one (x-mock-interim), with these headers.
    interim: tuple[int, ...] = ()
    interim_headers: tuple[tuple[str, str], ...] = ()
    # Trailers after a stream's last chunk (x-mock-trailers).
    trailers: tuple[tuple[str, str], ...] = ()
    # Hand-written framing h11 refuses to write (x-mock-wire): "chunk-ext" (chunk sizes with
    # extensions), "body-despite-no-body" (a body after a 204/304/HEAD head); the
    # connection closes after it, as nothing after such an answer could be framed.
    wire: str | None = None


SSE_FRAMINGS = ("crlf", "cr", "nospace", "multiline", "comments", "fields")
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")


def _reframe(event: bytes, framing: str, serial: int) -> bytes:
    """One SSE event (as the handlers write it: `field: value` lines, then a blank line)
    written in another framing the SSE standard allows (x-mock-sse-framing): every SSE
    client reads the same event from it, a parser that assumes `data: <json>\\n\\n` does not.
    `serial` is the event's number (its `id` in the `fields` framing)."""
    fields = [line.partition(b":")[::2] for line in _LINE_END_RE.split(event.strip(b"\r\n"))]
    fields = [(name, value[1:] if value.startswith(b" ") else value) for name, value in fields]
    if framing == "multiline":  # the JSON split between its tokens, one data line each
        fields = [(name, piece) for name, value in fields
                  for piece in (_json_lines(value) if name == b"data" else [value])]
    elif framing == "fields":
        named = [] if any(name == b"event" for name, _ in fields) else [(b"event", b"completion")]
        fields = [*named, (b"id", str(serial).encode()), (b"retry", b"1000"), *fields]
    lines = [name + (b":" if framing == "nospace" else b": ") + value for name, value in fields]
    if framing == "comments":
        return b": keep-alive\n\n" + b"\n".join([lines[0], b": keep-alive", *lines[1:]]) + b"\n\n"
    end = {"crlf": b"\r\n", "cr": b"\r"}.get(framing, b"\n")
    return end.join(lines) + end + end


def _json_lines(value: bytes) -> list[bytes]:
    """A JSON value as several lines (one token per line); anything else as it is."""
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return [value]
    return [line.encode() for line in json.dumps(parsed, indent=1, ensure_ascii=False).split("\n")]


def _sse(data: Any, event: str | None = None, *, end: bytes = b"\n\n") -> bytes:
    """One SSE event; Gemini ends its events with ``\\r\\n\\r\\n`` where the others use ``\\n\\n``."""
    prefix = f"event: {event}\n".encode() if event else b""
    return prefix + b"data: " + orjson.dumps(data) + end


# --------------------------------------------------------------------------- text and tokens


@functools.cache
def _encoding() -> Encoding:
    return get_encoding("o200k_base")


def _tokens(text: str) -> list[int]:
    enc = _encoding()  # in pieces: bpe-openai refuses 1,000,000 characters at once
    return [t for piece in tokens.pieces(text, tokens.BPE_PIECE_CHARS) for t in enc.encode_ordinary(piece)]


def _count(texts: Iterable[str]) -> int:
    return sum(len(_tokens(text)) for text in texts)


def _texts(content: Any) -> list[str]:
    """Text of a string or of the ``{"type": "text", "text": ...}`` parts of a list."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ]
    return []


def _text_parts(blocks: list[JSON]) -> list[JSON]:
    """Bedrock content blocks and Gemini parts (untyped ``{"text": ...}``) as the parts ``_texts`` reads;
    other blocks (images, tool use) carry no text the mock answers to."""
    return [{"type": "text", "text": block["text"]} for block in blocks if isinstance(block.get("text"), str)]


def _input_tokens(system: Any, messages: list[JSON]) -> int:
    """Prompt tokens as Anthropic, Bedrock, Gemini and the Responses API count them here:
    the system text plus every message's text, with no per-message framing."""
    return _count(_texts(system)) + sum(_count(_texts(message.get("content"))) for message in messages)


# What the mock bills for each page of a PDF sent inline, as providers bill a page image plus
# its text (Gemini 258 tokens a page and up; Claude an image and 1,500-3,000 tokens of text).
PDF_PAGE_TOKENS = 1000
_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_STREAM_DATA = re.compile(rb"stream\r?\n")


def _pdf_tokens(value: Any) -> int:
    """What the inline PDFs anywhere in a request body bill (a data URL or bare base64: chat
    `file_data`, Responses `input_file`, Gemini `inlineData`): PDF_PAGE_TOKENS for each page,
    counted on its own terms: `/Type /Page` in the file and in every Flate stream it holds."""
    if isinstance(value, dict):
        return sum(_pdf_tokens(v) for v in value.values())
    if isinstance(value, list):
        return sum(_pdf_tokens(v) for v in value)
    if not isinstance(value, str):
        return 0
    data = value.partition(";base64,")[2] if value.startswith("data:") else value
    if not data.startswith("JVBER"):  # "%PDF" in base64
        return 0
    raw = base64.b64decode(data + "==")
    pages, budget = len(_PAGE.findall(raw)), 64 << 20
    for match in _STREAM_DATA.finditer(raw):
        if budget <= 0:
            break
        inflater = zlib.decompressobj()
        try:
            inflated = inflater.decompress(raw[match.end():], budget)
        except zlib.error:
            continue
        budget -= len(inflated)
        pages += len(_PAGE.findall(inflated))
    return pages * PDF_PAGE_TOKENS


def _last_user_text(messages: list[JSON]) -> str:
    """The last user message with text (a turn of tool results only has none)."""
    for message in reversed(messages):
        if message.get("role") == "user" and (texts := _texts(message.get("content"))):
            return " ".join(texts)
    return ""


def _words(text: str) -> list[str]:
    """Split into words keeping leading whitespace, so ``"".join(_words(t)) == t``; with
    `x-mock-token-chars: N`, words longer than N characters in pieces of N, as providers
    stream a long word (a URL, a base64 blob) token by token; with `x-mock-event-words: N`,
    N of them joined in each piece, as a server that batches its output streams them."""
    words = _WORD_RE.findall(text)
    quirks = _QUIRKS.get()
    size = quirks.token_chars
    if size and any(len(w) > size for w in words):
        words = [w[i:i + size] for w in words for i in range(0, len(w), size)]
    if quirks.event_words > 1:  # a server that batches its output: many tokens an event
        n = quirks.event_words
        words = ["".join(words[i:i + n]) for i in range(0, len(words), n)]
    return words


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    truncated: bool


# `x-mock-sealed`: other `x-mock-*` controls as a JSON object, each byte XORed with SEAL_BYTE,
# base64url. The gateway classifies request headers like the body (policy/headers.py), so a
# reply a test wants the provider to send (a card, to see output scanning redact it) cannot
# travel in plain `x-mock-reply`: this one the scanner cannot read, as it could not read an
# encrypted value (tests/integration/conftest.py seals every client's controls).
SEALED = "x-mock-sealed"
SEAL_BYTE = 0xA5


def seal(controls: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(bytes(b ^ SEAL_BYTE for b in orjson.dumps(controls))).decode("ascii")


def unseal(value: str) -> dict[str, str]:
    """The controls in an `x-mock-sealed` value ({} when it is not one: no control applies)."""
    try:
        controls = orjson.loads(bytes(b ^ SEAL_BYTE for b in base64.urlsafe_b64decode(value)))
    except (ValueError, orjson.JSONDecodeError):
        return {}
    return {k: v for k, v in controls.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(controls, dict) else {}


# The reply text a request asked for with `x-mock-reply` (or `x-mock-reply-base64`: UTF-8,
# base64-encoded) (tests of output scanning).
_REPLY_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("mock_reply", default=None)


@dataclass(frozen=True)
class Quirks:
    """A misbehaving provider, per request: `x-mock-reply-words: N` replies with N one-token
    words (long replies without a long header), `x-mock-ignore-max-tokens: 1` ignores the
    output cap, `x-mock-usage-completion-tokens: N` reports N completion tokens in a chat
    usage block whatever was produced, `x-mock-choice-replies: ["a", "b"]` answers a chat
    request with one choice per text (whatever `n` says), `x-mock-merge-choices: 1`
    streams each step's choices in one chunk, `x-mock-token-chars: N` streams long words
    in pieces and `x-mock-event-words: N` streams N words an event (`_words`).
    `x-mock-cache-write-tokens: N` and `x-mock-cache-write-1h-tokens: M` report N and M of
    the prompt's tokens as written to the prompt cache with a 5-minute and a 1-hour lifetime
    (`_cache_writes`), when the request marks something for caching, as a provider writes
    only what is marked. `x-mock-stop-reason: R` ends a Claude answer with
    stop reason R (`stop_sequence`: with the request's first stop sequence as the match) and
    an OpenAI chat answer with finish_reason R, except `stop_sequence`: "stop" with vLLM's
    `stop_reason` naming the request's first `stop` string (`_stop_fields`)."""

    reply_words: int | None = None
    ignore_cap: bool = False
    completion_tokens: int | None = None
    choice_replies: tuple[str, ...] | None = None
    merge_choices: bool = False
    token_chars: int | None = None
    cache_write: int = 0
    cache_write_1h: int = 0
    stop_reason: str | None = None
    event_words: int = 1


# What marks a prompt for caching, per API: Anthropic's `cache_control` (OpenRouter takes it on
# chat requests too), Converse's `cachePoint` block.
CACHE_MARKER = "cache_control"
CACHE_POINT = "cachePoint"


def _holds_key(value: Any, key: str) -> bool:
    """Whether `key` is a key of any object inside `value`."""
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if key in node:
                return True
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return False


def _cache_writes(prompt_tokens: int, marked: bool) -> tuple[int, int]:
    """The prompt's tokens reported as cache writes, (5-minute, 1-hour), at most the prompt:
    the 1-hour ones first (Anthropic orders longer TTLs first), then the 5-minute ones. None
    without a marker in the request (`marked`): a provider writes only what is marked."""
    quirks = _QUIRKS.get()
    if not marked:
        return 0, 0
    long = min(quirks.cache_write_1h, prompt_tokens)
    return min(quirks.cache_write, prompt_tokens - long), long


# What `x-mock-stop-reason` may ask for: Anthropic's stop reasons and OpenAI's finish reasons.
STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                "model_context_window_exceeded", "stop", "length", "tool_calls", "content_filter")


def _stop_fields(body: JSON, field: str, default: str, openai: bool) -> JSON:
    """The stop reason (`field`) a reply ends with, `x-mock-stop-reason`'s when given, and the
    stop string matched when that is `stop_sequence`: Claude's `stop_sequence`, vLLM's `stop_reason`."""
    asked = _QUIRKS.get().stop_reason
    if asked is None:
        return {field: default} if openai else {field: default, "stop_sequence": None}
    stops = body.get("stop" if openai else "stop_sequences")
    first = stops if isinstance(stops, str) else next(iter(stops), None) if isinstance(stops, list) else None
    if openai:
        return {field: "stop", "stop_reason": first} if asked == "stop_sequence" else {field: asked}
    return {field: asked, "stop_sequence": first if asked == "stop_sequence" else None}


_QUIRKS: contextvars.ContextVar[Quirks] = contextvars.ContextVar("mock_quirks", default=Quirks())


# JSON mode asked for: True (any JSON object) or the schema the reply must fit.
JsonMode = bool | JSON


def _complete(model: str, messages: list[JSON], limit: int | None, json_mode: JsonMode = False) -> Completion:
    quirks = _QUIRKS.get()
    if quirks.ignore_cap:
        limit = None
    if quirks.reply_words:  # " the" is one o200k token: no need to tokenize megabytes
        n = quirks.reply_words if limit is None else min(limit, quirks.reply_words)
        return Completion("the" + " the" * (n - 1), n, n < quirks.reply_words)
    prompt = _last_user_text(messages)[:REPLY_PROMPT_CHARS]
    text = _REPLY_OVERRIDE.get() or f"This is a mock reply from {model} to: {prompt}."
    if json_mode is not False:
        text = _json_text(json_mode, text)
    return _capped(text, limit)


def _capped(text: str, limit: int | None) -> Completion:
    """The text cut to `limit` tokens (truncated) or whole."""
    ids = _tokens(text)
    if limit is not None and limit < len(ids):
        return Completion(_encoding().decode(ids[:limit]), limit, True)
    return Completion(text, len(ids), False)


# --------------------------------------------------------------------------- tool calls and JSON mode


@dataclass(frozen=True)
class ToolCall:
    """The call the mock makes: the chosen tool and arguments that fit its schema."""

    name: str
    arguments: JSON

    @property
    def text(self) -> str:
        return orjson.dumps(self.arguments).decode()

    @property
    def tokens(self) -> int:
        return len(_tokens(self.name)) + len(_tokens(self.text))

    def pieces(self) -> list[str]:
        """The arguments text cut in three, as providers stream them."""
        text = self.text
        cuts = [0, len(text) // 3, 2 * len(text) // 3, len(text)]
        return [text[a:b] for a, b in zip(cuts, cuts[1:]) if text[a:b]]


def _schema_value(schema: Any, defs: JSON | None = None, depth: int = 0) -> Any:
    """A value that fits a JSON Schema (the subset tool parameters and response formats use):
    the first enum value or const, the minimum of numbers, "mock" strings, one-item arrays
    (or minItems), objects with their required properties (every property when none is
    required), the first of anyOf/oneOf; `$ref`s into `$defs`/`definitions` are followed."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    if defs is None:
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    if isinstance(schema.get("$ref"), str):
        return _schema_value(defs.get(schema["$ref"].rpartition("/")[2]), defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _schema_value(schema[key][0], defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    kind = kind.lower() if isinstance(kind, str) else ("object" if "properties" in schema else "string")
    if kind == "object":
        properties = schema.get("properties") or {}
        names = [n for n in schema.get("required") or [] if n in properties] or list(properties)
        return {name: _schema_value(properties[name], defs, depth + 1) for name in names}
    if kind == "array":
        return [_schema_value(schema.get("items"), defs, depth + 1)
                for _ in range(max(1, _as_int(schema.get("minItems"), 1)))]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 1))
        value = low if isinstance(low, (int, float)) and not isinstance(low, bool) else 1
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "mock" * max(1, -(-_as_int(schema.get("minLength"), 1) // 4))


def _as_int(value: Any, default: int) -> int:
    return value if _is_int(value) else default


def _tool_call(tools: list[tuple[str, Any]], choice: str | None, answered: bool) -> ToolCall | None:
    """The call to make, if any: when tools are offered, the last turn is not a tool result
    (`answered`) and `choice` is not "none" (a tool name forces that tool), the first tool
    is called with arguments fitting its schema. Deterministic, so tests can predict it."""
    if not tools or answered or choice == "none":
        return None
    by_name = dict(tools)
    name = choice if choice in by_name else tools[0][0]
    return ToolCall(name, _schema_value(by_name[name] or {"type": "object"}) or {})


def _json_text(schema: Any, text: str) -> str:
    """The reply in JSON mode: a value fitting the requested schema, or {"reply": text}."""
    if isinstance(schema, dict):
        return orjson.dumps(_schema_value(schema)).decode()
    return orjson.dumps({"reply": text}).decode()


# --------------------------------------------------------------------------- request validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model(body: JSON) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "you must provide a model parameter")
    return model


def _messages(body: JSON) -> list[JSON]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise HTTPError(400, "'messages' must be a list of message objects")
    return messages


def _optional_int(body: JSON, key: str, minimum: int = 0) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < minimum:
        raise HTTPError(400, f"'{key}' must be an integer >= {minimum}")
    return value


def _is_block_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(block, dict) for block in value)


def _optional_object(body: JSON, key: str) -> JSON:
    """A nested config object such as Bedrock's ``inferenceConfig``; absent means empty."""
    value = body.get(key, {})
    if not isinstance(value, dict):
        raise HTTPError(400, f"'{key}' must be an object")
    return value


@dataclass(frozen=True)
class Call:
    """One API request as a handler sees it."""

    body: JSON  # the JSON object body ({} for routes without one)
    serial: int  # unique per reply, for ids
    params: dict[str, str]  # percent-decoded path parameters, e.g. {"model": <Bedrock model id>}
    query: dict[str, str]


Handler = Callable[[Call], Reply]


# --------------------------------------------------------------------------- OpenAI endpoints


def _chat_prompt_tokens(messages: list[JSON]) -> int:
    """OpenAI's chat formula: 3 per message + role/name/content tokens (+1 with a name), + 3 reply priming."""
    total = 3
    for message in messages:
        role, name = message.get("role"), message.get("name")
        total += 3 + _count(_texts(message.get("content")))
        total += len(_tokens(role)) if isinstance(role, str) else 0
        total += len(_tokens(name)) + 1 if isinstance(name, str) else 0
    return total


def _openai_tool_call(body: JSON, messages: list[JSON]) -> ToolCall | None:
    tools = [(t["function"].get("name", ""), t["function"].get("parameters"))
             for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name")
    answered = bool(messages) and messages[-1].get("role") == "tool"
    return _tool_call(tools, choice if isinstance(choice, str) else None, answered)


def _openai_json_mode(body: JSON) -> JsonMode:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else True
    return kind == "json_object"


def chat_completions(call: Call) -> Reply:
    body, serial = call.body, call.serial
    model = _model(body)
    messages = _messages(body)
    limit = _optional_int(body, "max_completion_tokens")
    if limit is None:
        limit = _optional_int(body, "max_tokens")
    base = {"id": f"chatcmpl-mock-{serial}", "object": "chat.completion", "created": int(time.time()), "model": model}
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    quirks = _QUIRKS.get()
    marked = _holds_key(body, CACHE_MARKER)
    prompt_tokens = _chat_prompt_tokens(messages) + _pdf_tokens(messages)
    if quirks.choice_replies is not None:
        texts = [_capped(text, None if quirks.ignore_cap else limit) for text in quirks.choice_replies]
        usage = _chat_usage(prompt_tokens, marked, sum(c.tokens for c in texts))
        if body.get("stream") is True:
            return Reply(events=_choice_chunks(base, texts, usage if include_usage else None, quirks.merge_choices))
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": None, "finish_reason": "length" if c.truncated else "stop"}
                   for i, c in enumerate(texts)]
        return Reply(body={**base, "choices": choices, "usage": usage})
    completion = _complete(model, messages, limit, _openai_json_mode(body))
    tool = _openai_tool_call(body, messages)
    usage = _chat_usage(prompt_tokens, marked, tool.tokens if tool else completion.tokens)
    finish = _stop_fields(body, "finish_reason", "tool_calls" if tool else "length" if completion.truncated
                          else "stop", True)
    tool_id = f"call_mock_{serial}"
    if body.get("stream") is True:
        return Reply(events=_chat_chunks(base, completion.text, finish, usage if include_usage else None,
                                         (tool_id, tool) if tool else None))
    message: JSON = {"role": "assistant", "content": completion.text, "refusal": None}
    if tool:
        message.update(content=None, tool_calls=[{"id": tool_id, "type": "function",
                                                  "function": {"name": tool.name, "arguments": tool.text}}])
    choice = {"index": 0, "message": message, "logprobs": None, **finish}
    return Reply(body={**base, "choices": [choice], "usage": usage})


def _chat_usage(prompt_tokens: int, marked: bool, output_tokens: int) -> JSON:
    written = sum(_cache_writes(prompt_tokens, marked))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
        **({} if (lie := _QUIRKS.get().completion_tokens) is None else {"completion_tokens": lie}),
        # as OpenAI reports it (the mock caches nothing); cache writes asked for as OpenAI and OpenRouter do
        "prompt_tokens_details": {"cached_tokens": 0, **({"cache_write_tokens": written} if written else {})},
    }


def _choice_chunks(base: JSON, texts: list[Completion], usage: JSON | None, merge: bool) -> list[bytes]:
    """A stream of several choices in steps (the role, then word k of every choice that has
    one, then every finish_reason): one chunk per choice per step as OpenAI sends them, or
    each step's choices in one chunk (`merge`)."""
    base = {**base, "object": "chat.completion.chunk"}
    words = [_words(c.text) for c in texts]
    steps: list[list[JSON]] = [[{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                for i in range(len(texts))]]
    steps += [[{"index": i, "delta": {"content": w[k]}, "finish_reason": None}
               for i, w in enumerate(words) if k < len(w)] for k in range(max(map(len, words), default=0))]
    steps.append([{"index": i, "delta": {}, "finish_reason": "length" if c.truncated else "stop"}
                  for i, c in enumerate(texts)])
    extra = {"usage": None} if usage else {}
    chunks = [{**base, "choices": [{**c, "logprobs": None} for c in group], **extra}
              for step in steps for group in ([step] if merge else [[c] for c in step])]
    if usage:
        chunks.append({**base, "choices": [], "usage": usage})
    return [_sse(c) for c in chunks] + [b"data: [DONE]\n\n"]


def _chat_chunks(base: JSON, text: str, finish: JSON, usage: JSON | None,
                 tool: tuple[str, ToolCall] | None = None) -> list[bytes]:
    """OpenAI stream events; ``usage`` is given only when stream_options.include_usage is set.
    A tool call streams as OpenAI does: id and name with empty arguments, then argument pieces.
    `finish`: the last chunk's choice fields (finish_reason, vLLM's stop_reason)."""
    base = {**base, "object": "chat.completion.chunk"}

    def chunk(delta: JSON, ending: JSON | None = None) -> JSON:
        choice = {"index": 0, "delta": delta, "logprobs": None, **(ending or {"finish_reason": None})}
        return {**base, "choices": [choice], **({"usage": None} if usage else {})}

    if tool:
        tool_id, call = tool
        chunks = [chunk({"role": "assistant", "content": None, "tool_calls": [{
            "index": 0, "id": tool_id, "type": "function", "function": {"name": call.name, "arguments": ""}}]})]
        chunks += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in call.pieces()]
    else:
        chunks = [chunk({"role": "assistant", "content": ""})]
        chunks += [chunk({"content": word}) for word in _words(text)]
    chunks.append(chunk({}, finish))
    if usage:
        chunks.append({**base, "choices": [], "usage": usage})
    return [_sse(c) for c in chunks] + [b"data: [DONE]\n\n"]


def _is_embedding_item(item: Any) -> bool:
    if isinstance(item, str):
        return bool(item)
    return isinstance(item, list) and bool(item) and all(_is_int(token) for token in item)


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """Normalise ``input``: a string, a token array, or a list of either."""
    items = [value] if isinstance(value, str) or _is_embedding_item(value) else value
    if isinstance(items, list) and items and all(_is_embedding_item(item) for item in items):
        return items
    raise HTTPError(400, "'input' must be a non-empty string, array of strings, or array of token arrays")


def _embedding_vector(item: str | list[int], dimensions: int) -> list[float]:
    """Unit-length vector derived from a hash of the input."""
    key = item.encode() if isinstance(item, str) else orjson.dumps(item)
    raw = struct.unpack(f"<{dimensions}I", hashlib.shake_256(key).digest(4 * dimensions))
    vector = [value / 2**31 - 1.0 for value in raw]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def embeddings(call: Call) -> Reply:
    body = call.body
    model = _model(body)
    inputs = _embedding_inputs(body.get("input"))
    dimensions = _optional_int(body, "dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise HTTPError(400, "'encoding_format' must be 'float' or 'base64'")
    data = []
    for index, item in enumerate(inputs):
        vector: Any = _embedding_vector(item, dimensions)
        if encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(item) if isinstance(item, list) else len(_tokens(item)) for item in inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return Reply(body={"object": "list", "data": data, "model": model, "usage": usage})


def models(call: Call) -> Reply:
    data = [{"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "mock-provider"} for name in MODELS]
    return Reply(body={"object": "list", "data": data})


# --------------------------------------------------------------------------- Anthropic endpoint


def _anthropic_tool_call(body: JSON, messages: list[JSON]) -> ToolCall | None:
    tools = [(t.get("name", ""), t.get("input_schema")) for t in body.get("tools") or []
             if isinstance(t, dict) and "input_schema" in t]  # server tools (web_search, ...) are not called
    choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
    named = choice.get("name") if choice.get("type") == "tool" else "none" if choice.get("type") == "none" else None
    last = messages[-1].get("content") if messages else None
    answered = isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in last)
    return _tool_call(tools, named, answered)


def _anthropic_json_mode(body: JSON) -> JsonMode:
    """Structured outputs: ``output_config.format`` (or the beta's ``output_format``),
    ``{"type": "json_schema", "schema": ...}``."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return fmt.get("schema") if isinstance(fmt.get("schema"), dict) else True
    return False


# Extended thinking: the block the mock thinks with, signed as Claude signs its thinking (an
# opaque value the next turn must send back with the block unchanged).
MOCK_THINKING = "The user asked; a short answer will do."
MOCK_SIGNATURE = base64.b64encode(b"mock-signature:" + MOCK_THINKING.encode()).decode()


def _anthropic_thinking(body: JSON, messages: list[JSON]) -> bool:
    """Whether the request thinks (``thinking`` enabled or adaptive), refusing what Claude
    refuses then: a budget of 1,024 or more below max_tokens, and an assistant turn with
    tool_use that does not start with the thinking block (its signature intact) it was sent.
    (Claude's minimum budget, 1,024, is not held: the local models cap output at 1,024.)"""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return False
    budget = thinking.get("budget_tokens")
    if thinking["type"] == "enabled" and not (_is_int(budget) and 0 < budget < (body.get("max_tokens") or 0)):
        raise HTTPError(400, "`max_tokens` must be greater than `thinking.budget_tokens`")
    for i, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, list) or not any(
                isinstance(b, dict) and b.get("type") == "tool_use" for b in content):
            continue
        first = content[0] if isinstance(content[0], dict) else {}
        if first.get("type") != "thinking" or first.get("signature") != MOCK_SIGNATURE \
                or first.get("thinking") != MOCK_THINKING:
            raise HTTPError(400, f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but "
                            "found another block (or an altered signature). When `thinking` is enabled, a final "
                            "`assistant` message must start with a thinking block.")
    return True


def anthropic_messages(call: Call) -> Reply:
    body, serial = call.body, call.serial
    model = _model(body)
    messages = _messages(body)
    max_tokens = _optional_int(body, "max_tokens")
    if max_tokens is None:
        raise HTTPError(400, "max_tokens: Field required")
    thinks = _anthropic_thinking(body, messages)
    completion = _complete(model, messages, max_tokens, _anthropic_json_mode(body))
    tool = _anthropic_tool_call(body, messages)
    input_tokens = _input_tokens(body.get("system"), messages)
    short, long = _cache_writes(input_tokens, _holds_key(body, CACHE_MARKER))
    content: list[JSON] = [{"type": "text", "text": completion.text}]
    if tool:
        content = [{"type": "tool_use", "id": f"toolu_mock_{serial}", "name": tool.name, "input": tool.arguments}]
    if thinks:
        content.insert(0, {"type": "thinking", "thinking": MOCK_THINKING, "signature": MOCK_SIGNATURE})
    message = {
        "id": f"msg_mock_{serial}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        **_stop_fields(body, "stop_reason", "tool_use" if tool else "max_tokens" if completion.truncated
                       else "end_turn", False),
        "usage": {
            "input_tokens": input_tokens - short - long,
            "output_tokens": tool.tokens if tool else completion.tokens,
            "cache_creation_input_tokens": short + long,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": short, "ephemeral_1h_input_tokens": long},
        },
    }
    if body.get("stream") is True:
        return Reply(events=_anthropic_events(message, completion.text, tool))
    return Reply(body=message)


def _anthropic_events(message: JSON, text: str, tool: ToolCall | None = None) -> list[bytes]:
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events: list[JSON] = [{"type": "message_start", "message": start}]
    at = 0  # the answer's block: after a thinking block, when there is one
    if message["content"][0]["type"] == "thinking":
        at = 1
        events += [{"type": "content_block_start", "index": 0, "content_block": {
                       "type": "thinking", "thinking": "", "signature": ""}},
                   *({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": w}}
                     for w in _words(MOCK_THINKING)),
                   {"type": "content_block_delta", "index": 0, "delta": {
                       "type": "signature_delta", "signature": MOCK_SIGNATURE}},
                   {"type": "content_block_stop", "index": 0}]
    if tool:
        block = {**message["content"][at], "input": {}}
        events += [{"type": "content_block_start", "index": at, "content_block": block}, {"type": "ping"}]
        events += [{"type": "content_block_delta", "index": at, "delta": {"type": "input_json_delta",
                                                                        "partial_json": p}}
                   for p in tool.pieces()]
    else:
        events += [{"type": "content_block_start", "index": at, "content_block": {"type": "text", "text": ""}},
                   {"type": "ping"}]
        events += [
            {"type": "content_block_delta", "index": at, "delta": {"type": "text_delta", "text": word}}
            for word in _words(text)
        ]
    events += [
        {"type": "content_block_stop", "index": at},
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
        {"type": "message_stop"},
    ]
    return [_sse(event, event["type"]) for event in events]


def _response_input(body: JSON) -> list[JSON]:
    """The Responses API `input` (a string or a list of items) as chat-like messages."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        items = [item for item in value if isinstance(item, dict) and "role" in item]
        if items:
            return [{"role": item["role"], "content": [
                {"type": "text", "text": part.get("text", "")} for part in item["content"] if isinstance(part, dict)]
                if isinstance(item.get("content"), list) else item.get("content", "")} for item in items]
    raise HTTPError(400, "input: must be a string or a non-empty list of input items")


def responses_api(call: Call) -> Reply:
    """OpenAI Responses API (`POST /v1/responses`), JSON and SSE."""
    body, serial = call.body, call.serial
    model = _model(body)
    messages = _response_input(body)
    completion = _complete(model, messages, _optional_int(body, "max_output_tokens"))
    input_tokens = _input_tokens(body.get("instructions"), messages) + _pdf_tokens(body.get("input"))
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": completion.tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + completion.tokens}
    item_id = f"msg_mock_{serial}"
    text_part = {"type": "output_text", "text": completion.text, "annotations": []}
    item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [text_part]}
    done = {"id": f"resp_mock_{serial}", "object": "response", "created_at": int(time.time()), "model": model,
            "status": "incomplete" if completion.truncated else "completed", "output": [item], "usage": usage,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "incomplete_details": {"reason": "max_output_tokens"} if completion.truncated else None}
    if body.get("stream") is not True:
        return Reply(body=done)
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[JSON] = [
        {"type": "response.created", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "status": "in_progress",
                                                                          "content": []}},
        {"type": "response.content_part.added", **where, "part": {**text_part, "text": ""}},
        *({"type": "response.output_text.delta", **where, "delta": word} for word in _words(completion.text)),
        {"type": "response.output_text.done", **where, "text": completion.text},
        {"type": "response.content_part.done", **where, "part": text_part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        # (cut at `max_output_tokens`, OpenAI ends with `response.incomplete` instead)
        {"type": "response.incomplete" if completion.truncated else "response.completed", "response": done},
    ]
    return Reply(events=[_sse({**e, "sequence_number": i}, e["type"]) for i, e in enumerate(events)])


# --------------------------------------------------------------------------- Azure OpenAI endpoints


def _on_deployment(handler: Handler) -> Handler:
    """Azure answers like OpenAI for the deployment named in the path, ignoring the body's ``model``."""

    def answer(call: Call) -> Reply:
        return handler(replace(call, body={**call.body, "model": call.params["model"]}))

    return answer


# The first api-version whose chat completions take `stream_options` (stable 2024-10-21,
# preview 2024-09-01-preview); older ones refuse the field.
AZURE_STREAM_OPTIONS_SINCE = "2024-09-01"
_DATED_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
# What Azure's default content filter reports for a prompt and an answer it let through.
AZURE_FILTER = {category: {"filtered": False, "severity": "safe"}
                for category in ("hate", "self_harm", "sexual", "violence")}


def _azure_chat(call: Call) -> Reply:
    """Chat completions as an Azure deployment answers them: refused with `stream_options`
    on an api-version older than AZURE_STREAM_OPTIONS_SINCE (as Azure does), and annotated
    by its content filter: `prompt_filter_results` beside the choices of a JSON answer, and
    in a stream as a first chunk of its own with empty `choices`, `id`, `model` and `object`
    (`created` 0); `content_filter_results` on every choice, and on every chunk with text."""
    version = call.query.get("api-version", "")
    if "stream_options" in call.body and (dated := _DATED_VERSION.match(version)) \
            and dated.group() < AZURE_STREAM_OPTIONS_SINCE:
        raise HTTPError(400, "Unrecognized request argument supplied: stream_options")
    reply = _on_deployment(chat_completions)(call)
    prompt_filter = [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}]
    if isinstance(reply.body, dict):
        for choice in reply.body.get("choices", []):
            choice["content_filter_results"] = AZURE_FILTER
        reply.body["prompt_filter_results"] = prompt_filter
    elif reply.events is not None:
        reply.events = [_sse({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                              "prompt_filter_results": prompt_filter}), *map(_azure_filtered, reply.events)]
    return reply


def _azure_filtered(event: bytes) -> bytes:
    """A chat stream event with Azure's `content_filter_results` on each choice carrying text."""
    if not event.startswith(b"data: {"):
        return event
    chunk = orjson.loads(event[len(b"data: "):])
    for choice in chunk.get("choices", []):
        delta = choice.get("delta") or {}
        choice["content_filter_results"] = AZURE_FILTER if delta.get("content") else {}
    return _sse(chunk)


# --------------------------------------------------------------------------- AWS Bedrock Converse endpoints


def _bedrock_messages(body: JSON) -> list[JSON]:
    """Converse ``messages`` as chat-like messages; 400 unless each is ``{role, content: [blocks]}``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") and _is_block_list(m.get("content"))
        for m in messages
    ):
        raise HTTPError(400, "messages: must be a non-empty list of {role: user|assistant, content: [blocks]}")
    return [{"role": m["role"], "content": _text_parts(m["content"])} for m in messages]


def _bedrock_tool_call(body: JSON) -> ToolCall | None:
    config = _optional_object(body, "toolConfig")
    specs = [t["toolSpec"] for t in config.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("toolSpec"), dict)]
    tools = [(spec.get("name", ""), (spec.get("inputSchema") or {}).get("json")) for spec in specs]
    choice = config.get("toolChoice") if isinstance(config.get("toolChoice"), dict) else {}
    named = (choice.get("tool") or {}).get("name") if isinstance(choice.get("tool"), dict) else None
    last = body["messages"][-1]["content"]
    answered = any(isinstance(block, dict) and "toolResult" in block for block in last)
    return _tool_call(tools, named, answered)


def bedrock_converse(call: Call, *, stream: bool) -> Reply:
    """``/model/{id}/converse`` (JSON) and ``/converse-stream`` (AWS event-stream), for the path's model id.
    Converse has no JSON mode field; with ``toolConfig`` the first tool is called (see _tool_call)."""
    model, body = call.params["model"], call.body
    messages = _bedrock_messages(body)
    system = body.get("system", [])
    if not _is_block_list(system):
        raise HTTPError(400, "system: must be a list of {text} blocks")
    completion = _complete(model, messages, _optional_int(_optional_object(body, "inferenceConfig"), "maxTokens", 1))
    tool = _bedrock_tool_call(body)
    input_tokens = _input_tokens(_text_parts(system), messages)
    output_tokens = tool.tokens if tool else completion.tokens
    usage: JSON = {"inputTokens": input_tokens, "outputTokens": output_tokens,
                   "totalTokens": input_tokens + output_tokens}
    short, long = _cache_writes(input_tokens, _holds_key(body, CACHE_POINT))
    if short or long:  # Converse counts writes apart from inputTokens, with a 1h-first breakdown
        usage.update(inputTokens=input_tokens - short - long, cacheWriteInputTokens=short + long,
                     cacheDetails=[{"ttl": ttl, "inputTokens": n} for ttl, n in (("1h", long), ("5m", short)) if n])
    stop_reason = "tool_use" if tool else "max_tokens" if completion.truncated else "end_turn"
    metrics = {"latencyMs": 0}  # the mock does no work; injected latency is not the model's
    tool_id = f"tooluse_mock_{call.serial}"
    if not stream:
        content = ([{"toolUse": {"toolUseId": tool_id, "name": tool.name, "input": tool.arguments}}] if tool
                   else [{"text": completion.text}])
        return Reply(body={"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop_reason,
                           "usage": usage, "metrics": metrics})
    events: list[tuple[str, JSON]] = [("messageStart", {"role": "assistant"})]
    if tool:
        events.append(("contentBlockStart", {"start": {"toolUse": {"toolUseId": tool_id, "name": tool.name}},
                                             "contentBlockIndex": 0}))
        events += [("contentBlockDelta", {"delta": {"toolUse": {"input": piece}}, "contentBlockIndex": 0})
                   for piece in tool.pieces()]
    else:
        events += [("contentBlockDelta", {"delta": {"text": word}, "contentBlockIndex": 0})
                   for word in _words(completion.text)]
    events += [
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("messageStop", {"stopReason": stop_reason}),
        ("metadata", {"usage": usage, "metrics": metrics}),
    ]
    messages_out = [
        eventstream.encode(
            {":event-type": name, ":content-type": "application/json", ":message-type": "event"},
            orjson.dumps(payload),
        )
        for name, payload in events
    ]
    return Reply(events=messages_out, content_type=EVENTSTREAM_CONTENT_TYPE)


# --------------------------------------------------------------------------- Google Gemini endpoints


def _gemini_contents(body: JSON) -> list[JSON]:
    """``contents`` as chat-like messages (role ``model`` is the assistant; a missing role is the user)."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents or not all(
        isinstance(c, dict) and c.get("role", "user") in ("user", "model") and _is_block_list(c.get("parts"))
        for c in contents
    ):
        raise HTTPError(400, "contents: must be a non-empty list of {role: user|model, parts: [...]}")
    return [
        {"role": "assistant" if c.get("role") == "model" else "user", "content": _text_parts(c["parts"])}
        for c in contents
    ]


def _gemini_system(body: JSON) -> list[JSON]:
    system = body.get("systemInstruction")
    if system is None:
        return []
    if not isinstance(system, dict) or not _is_block_list(system.get("parts")):
        raise HTTPError(400, "systemInstruction: must be a Content object with parts")
    return _text_parts(system["parts"])


def _gemini_signature(name: str) -> str:
    """The thought signature the mock puts on a Gemini 3 model's function call."""
    return base64.b64encode(f"mock-signature:{name}".encode()).decode()


def _check_gemini_signatures(model: str, contents: list[JSON]) -> None:
    """Gemini 3 refuses a request whose current turn (since the last user text) holds a
    model functionCall without the thoughtSignature it was sent with (the first call of
    each model message carries one)."""
    if "gemini-3" not in model:
        return
    start = 0
    for i, content in enumerate(contents):
        if content.get("role", "user") == "user" and any("text" in p for p in content["parts"]):
            start = i
    for content in contents[start:]:
        if content.get("role") != "model":
            continue
        calls = [p for p in content["parts"] if isinstance(p.get("functionCall"), dict)]
        if calls and calls[0].get("thoughtSignature") != _gemini_signature(calls[0]["functionCall"].get("name", "")):
            raise HTTPError(400, "Function call is missing a thought_signature in functionCall parts. This is "
                            "required for tools to work correctly.")


def _gemini_tool_call(body: JSON, contents: list[JSON]) -> ToolCall | None:
    tools = [(d.get("name", ""), d.get("parameters", d.get("parametersJsonSchema")))
             for t in body.get("tools") or [] if isinstance(t, dict)
             for d in t.get("functionDeclarations") or [] if isinstance(d, dict)]
    config = (_optional_object(body, "toolConfig").get("functionCallingConfig") or {})
    allowed = config.get("allowedFunctionNames") or [None]
    choice = "none" if config.get("mode") == "NONE" else allowed[0]
    answered = any("functionResponse" in part for part in contents[-1]["parts"])
    return _tool_call(tools, choice, answered)


def _gemini_json_mode(config: JSON) -> JsonMode:
    if config.get("responseMimeType") != "application/json":
        return False
    schema = config.get("responseJsonSchema", config.get("responseSchema"))
    return schema if isinstance(schema, dict) else True


def gemini_generate(call: Call, *, stream: bool) -> Reply:
    """``models/{model}:generateContent`` and ``:streamGenerateContent`` (SSE with ``alt=sse``,
    otherwise a JSON array streamed one element per chunk, as Google does)."""
    model, body = call.params["model"], call.body
    messages = _gemini_contents(body)
    _check_gemini_signatures(model, body["contents"])
    system = _gemini_system(body)
    config = _optional_object(body, "generationConfig")
    limit = _optional_int(config, "maxOutputTokens", 1)
    completion = _complete(model, messages, limit, _gemini_json_mode(config))
    tool = _gemini_tool_call(body, body["contents"])
    prompt_tokens = _input_tokens(system, messages) + _pdf_tokens(body["contents"])
    output_tokens = tool.tokens if tool else completion.tokens
    usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": output_tokens,
             "totalTokenCount": prompt_tokens + output_tokens}
    finish_reason = "MAX_TOKENS" if completion.truncated and not tool else "STOP"

    def response(parts: list[JSON], finish: str | None) -> JSON:
        candidate: JSON = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish is not None:
            candidate["finishReason"] = finish
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
                "responseId": f"mock-{call.serial}"}

    if tool:
        part: JSON = {"functionCall": {"name": tool.name, "args": tool.arguments}}
        if "gemini-3" in model:
            part["thoughtSignature"] = _gemini_signature(tool.name)
        chunks = [response([part], finish_reason)]
    elif not stream:
        return Reply(body=response([{"text": completion.text}], finish_reason))
    else:
        words = _words(completion.text)
        chunks = [response([{"text": word}], finish_reason if i == len(words) - 1 else None)
                  for i, word in enumerate(words)]
    if not stream:
        return Reply(body=chunks[0])
    if call.query.get("alt") == "sse":
        return Reply(events=[_sse(chunk, end=b"\r\n\r\n") for chunk in chunks])
    array = [(b"," if i else b"[") + orjson.dumps(chunk) for i, chunk in enumerate(chunks)]
    array[-1] += b"]"
    return Reply(events=array, content_type="application/json")


# --------------------------------------------------------------------------- routing and controls


def _key_accepted(presented: list[str], api_key: str | None) -> bool:
    """Constant-time comparison of every presented key; no key configured admits everyone."""
    return api_key is None or any(hmac.compare_digest(key.encode(), api_key.encode()) for key in presented)


def _bearer(headers: dict[str, str]) -> list[str]:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return [token.strip()] if scheme.lower() == "bearer" else []


_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


def _presented(headers: dict[str, str]) -> str:
    """The credential(s) the mock was presented, as a provider echoing them would write them."""
    return ", ".join(headers[h] for h in _CREDENTIAL_HEADERS if h in headers)


def _told(error: HTTPError, headers: dict[str, str]) -> HTTPError:
    """An error as a careless provider words it: `x-mock-error-message-base64` replaces the
    message (a provider quoting anything), `x-mock-error-echo-credential: 1` appends the
    credential it was presented, whole (as some OpenAI-compatible servers do)."""
    told = headers.get("x-mock-error-message-base64")
    message = base64.b64decode(told).decode() if told else error.message
    if _header_flag(headers, "x-mock-error-echo-credential"):
        message += " Presented: " + _presented(headers)
    error.message = message
    return error


def _header(headers: dict[str, str], name: str) -> list[str]:
    return [headers[name]] if name in headers else []


def _require_key(presented: list[str], api_key: str | None) -> None:
    """OpenAI's (and Anthropic's) 401; the presented key is never echoed."""
    if not _key_accepted(presented, api_key):
        message = "Incorrect API key provided." if presented else "No API key provided."
        raise HTTPError(401, message, type="authentication_error", code="invalid_api_key")


def _admit_openai(request: Request, api_key: str | None) -> None:
    _require_key(_bearer(request.headers), api_key)


def _admit_anthropic(request: Request, api_key: str | None) -> None:
    _require_key(_bearer(request.headers) + _header(request.headers, "x-api-key"), api_key)


def _admit_azure(request: Request, api_key: str | None) -> None:
    """Azure rejects a request without ``?api-version=`` before looking at the ``api-key`` header."""
    if not request.query.get("api-version"):
        raise HTTPError(400, "The api-version query parameter (?api-version=) is required for all requests.",
                        code="MissingApiVersionParameter")
    if not _key_accepted(_header(request.headers, "api-key"), api_key):
        raise HTTPError(401, "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
                        "provide a valid key for an active subscription and use a correct regional API endpoint "
                        "for your resource.", code="401")


def _admit_bedrock(request: Request, api_key: str | None) -> None:
    """Only the SigV4 shape is checked (the mock has no AWS secret); tests verify the signature itself
    from the recorded headers and raw body."""
    if api_key is None:
        return
    if "x-amz-date" not in request.headers:
        raise HTTPError(403, "Missing Authentication Token", type="MissingAuthenticationTokenException")
    if not request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 Credential="):
        raise HTTPError(403, "Authorization header requires 'Credential' parameter.",
                        type="IncompleteSignatureException")


def _admit_gemini(request: Request, api_key: str | None) -> None:
    """Google answers a wrong key with UNAUTHENTICATED and a missing one with PERMISSION_DENIED."""
    presented = _header(request.headers, "x-goog-api-key") + _bearer(request.headers)
    if _key_accepted(presented, api_key):
        return
    if presented:
        raise HTTPError(401, "API key not valid. Please pass a valid API key.")
    raise HTTPError(403, "Method doesn't allow unregistered callers (callers without established identity). "
                    "Please use API Key or other form of API consumer identity to call this API.")


# What real providers send on every answer about the account that called them (OpenAI's
# organization and project, Anthropic's organization, a CDN's session cookie), which the
# gateway's callers must not see: it is the gateway's account.
ACCOUNT_HEADERS = [("openai-organization", "mock-org-7f3a"), ("openai-project", "proj_mock7f3a"),
                   ("anthropic-organization-id", "mock-org-id-7f3a"),
                   ("set-cookie", "__cf_bm=mock-provider-session-7f3a; path=/; HttpOnly")]
GARBAGE_KINDS = ("json", "shape", "bytes", "error")
_ERROR_TEXT = "The server had an error while processing your request."
CONTENT_ENCODINGS = ("gzip", "deflate")
_JUNK_BYTES = b"\xff\xfe\x00<html>502 Bad Gateway</html>\n\n"


def _openai_garbage(kind: str, text: str | None) -> bytes:
    """OpenAI's broken events; with `text` (x-mock-garbage-reply) each carries it: a content
    delta cut off after the text, the text where an object belongs, the text inside the junk,
    the text as the message of an error event."""
    if kind == "error":
        return b"data: " + orjson.dumps({"error": {"message": text or _ERROR_TEXT, "type": "server_error",
                                                   "code": None, "param": None}}) + b"\n\n"
    if text is None:
        return {"json": b'data: {"id": "chatcmpl-x", "choices": [\n\n',
                "shape": b'data: {"choices": "oops"}\n\n'}.get(kind, _JUNK_BYTES)
    quoted = orjson.dumps(text)
    return {"json": b'data: {"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": ' + quoted + b"\n\n",
            "shape": b'data: {"choices": ' + quoted + b"}\n\n"}.get(
        kind, _JUNK_BYTES[:-2] + text.encode() + b"\n\n")


def _anthropic_garbage(kind: str, text: str | None) -> bytes:
    """Anthropic's broken events; with `text` (x-mock-garbage-reply) a text delta cut off
    right after the text, the text where the delta object belongs, the text inside the junk,
    the text as the message of an `error` event."""
    if kind == "error":
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": {
            "type": "api_error", "message": text or _ERROR_TEXT}}) + b"\n\n"
    head = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta'
    if text is None:
        return {"json": head + b"\n\n", "shape": head + b'": "oops"}\n\n'}.get(kind, _JUNK_BYTES)
    quoted = orjson.dumps(text)
    return {"json": head + b'": {"type": "text_delta", "text": ' + quoted + b"\n\n",
            "shape": head + b'": ' + quoted + b"}\n\n"}.get(kind, _JUNK_BYTES[:-2] + text.encode() + b"\n\n")


def _gemini_garbage(kind: str, text: str | None) -> bytes:
    """Gemini's broken `alt=sse` events; with `text` a candidate part cut off right after the
    text, the text where the content object belongs, the text inside the junk, the text as
    the message of an error event."""
    if kind == "error":
        return b"data: " + orjson.dumps({"error": {"code": 500, "message": text or _ERROR_TEXT,
                                                   "status": "INTERNAL"}}) + b"\r\n\r\n"
    if text is None:
        return {"json": b'data: {"candidates": [oops\r\n\r\n',
                "shape": b'data: {"candidates": [{"content": "oops"}]}\r\n\r\n'}.get(kind, _JUNK_BYTES)
    quoted = orjson.dumps(text)
    return {"json": b'data: {"candidates": [{"content": {"role": "model", "parts": [{"text": ' + quoted + b"\r\n\r\n",
            "shape": b'data: {"candidates": [{"content": ' + quoted + b"}]}\r\n\r\n"}.get(
        kind, _JUNK_BYTES[:-2] + text.encode() + b"\r\n\r\n")


def _bedrock_garbage(kind: str, text: str | None) -> bytes:
    """Bedrock's broken messages: a well-framed message whose payload is cut off (after the
    text, with `text`), or has the text where the delta object belongs, or junk whose prelude
    CRC cannot match (followed by the text), or an exception message carrying the text."""
    if kind == "error":
        return eventstream.encode({":message-type": "exception", ":exception-type": "internalServerException",
                                   ":content-type": "application/json"},
                                  orjson.dumps({"message": text or _ERROR_TEXT}))
    headers = {":event-type": "contentBlockDelta", ":content-type": "application/json", ":message-type": "event"}
    quoted = orjson.dumps(text if text is not None else "oops")
    if kind == "json":
        return eventstream.encode(headers, b'{"delta": {"text": ' + (quoted if text is not None else b""))
    if kind == "shape":
        return eventstream.encode(headers, b'{"delta": ' + quoted + b', "contentBlockIndex": 0}')
    return b"\x00\x00\x00\x20" + b"garbage!" * 4 + (text or "").encode()  # a prelude whose CRC cannot match


@dataclass(frozen=True)
class Dialect:
    """A provider's conventions the app applies around every handler of its routes: who is admitted
    (credentials, mandatory parameters), what its errors look like on the wire, and what a broken
    stream event of each kind (``x-mock-garbage``) looks like in its framing."""

    admit: Callable[[Request, str | None], None]
    error: Callable[[HTTPError], Reply]
    # (kind, the reply text the broken event must carry, or None) -> the broken event
    garbage: Callable[[str, str | None], bytes]


OPENAI = Dialect(_admit_openai, _openai_error, _openai_garbage)
AZURE = Dialect(_admit_azure, _azure_error, _openai_garbage)
ANTHROPIC = Dialect(_admit_anthropic, _anthropic_error, _anthropic_garbage)
BEDROCK = Dialect(_admit_bedrock, _bedrock_error, _bedrock_garbage)
GEMINI = Dialect(_admit_gemini, _gemini_error, _gemini_garbage)


@dataclass(frozen=True)
class Route:
    handler: Handler
    dialect: Dialect = OPENAI
    takes_body: bool = True


ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/v1/chat/completions"): Route(chat_completions),
    ("POST", "/v1/embeddings"): Route(embeddings),
    ("POST", "/v1/responses"): Route(responses_api),
    ("GET", "/v1/models"): Route(models, takes_body=False),
    ("POST", "/v1/messages"): Route(anthropic_messages, ANTHROPIC),
}


def _pattern(template: str) -> re.Pattern[str]:
    """``{name}`` matches one non-empty path segment (still percent-encoded); the rest is literal."""
    pieces = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(f"(?P<{p}>[^/]+)" if i % 2 else re.escape(p) for i, p in enumerate(pieces)))


# Tried in order after the exact ROUTES lookup misses, so the common routes stay a dict hit.
PATTERN_ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    ("POST", _pattern("/openai/deployments/{model}/chat/completions"), Route(_azure_chat, AZURE)),
    ("POST", _pattern("/openai/deployments/{model}/embeddings"), Route(_on_deployment(embeddings), AZURE)),
    ("POST", _pattern("/model/{model}/converse"), Route(functools.partial(bedrock_converse, stream=False), BEDROCK)),
    ("POST", _pattern("/model/{model}/converse-stream"),
     Route(functools.partial(bedrock_converse, stream=True), BEDROCK)),
    *(
        ("POST", _pattern(f"/{version}/models/{{model}}:{method}"),
         Route(functools.partial(gemini_generate, stream=stream), GEMINI))
        for version in ("v1beta", "v1")
        for method, stream in (("generateContent", False), ("streamGenerateContent", True))
    ),
]


def _match(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route for a request and its percent-decoded path parameters."""
    route = ROUTES.get((method, path))
    if route is not None:
        return route, {}
    for verb, pattern, route in PATTERN_ROUTES:
        if verb == method and (found := pattern.fullmatch(path)):
            return route, {name: unquote(value) for name, value in found.groupdict().items()}
    return None


def _request_model(params: dict[str, str], body: Any) -> str | None:
    """The model a behaviour is looked up by: the path's (Azure deployment, Bedrock model id, Gemini
    model) when the route has one, else the JSON body's ``model``."""
    if "model" in params:
        return params["model"]
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _header_int(headers: dict[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise HTTPError(400, f"{name} must be a non-negative integer")
    return number


def _choice_replies(headers: dict[str, str]) -> tuple[str, ...] | None:
    """x-mock-choice-replies: a JSON array of strings, one per choice."""
    value = headers.get("x-mock-choice-replies")
    if value is None:
        return None
    try:
        texts = orjson.loads(value)
    except orjson.JSONDecodeError:
        texts = None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise HTTPError(400, "x-mock-choice-replies must be a JSON array of non-empty strings")
    return tuple(texts)


def _extra_headers(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """x-mock-response-headers: a JSON object of header names and values to answer with too;
    `{credential}` in a value is the credential the mock was presented (a provider echoing it)."""
    value = headers.get("x-mock-response-headers")
    if value is None:
        return ()
    try:
        extra = orjson.loads(value)
    except orjson.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise HTTPError(400, "x-mock-response-headers must be a JSON object of strings")
    return tuple((k, v.replace("{credential}", _presented(headers))) for k, v in extra.items())


def _header_flag(headers: dict[str, str], name: str) -> bool:
    """A `0` / `1` switch (absent is 0)."""
    value = headers.get(name, "0")
    if value not in ("0", "1"):
        raise HTTPError(400, f"{name} must be 0 or 1")
    return value == "1"


def _header_choice(headers: dict[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    value = headers.get(name)
    if value is not None and value not in allowed:
        raise HTTPError(400, f"{name} must be one of {', '.join(allowed)}")
    return value


def _check_status(value: Any, name: str) -> int:
    if not _is_int(value) or not 200 <= value <= 599:
        raise HTTPError(400, f"{name} must be an HTTP status between 200 and 599")
    return value


@dataclass
class Controls:
    """Per-request test controls from ``x-mock-*`` headers (plus a matched behaviour's latency)."""

    status: int | None = None
    latency_ms: int = 0
    chunk_delay_ms: int = 0
    drop_after: int | None = None
    end_after: int | None = None
    garbage_after: int | None = None
    garbage: str = "json"
    chunk_bytes: int | None = None
    garbage_reply: bool = False
    framing: str | None = None
    content_encoding: str | None = None
    content_type: str | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()
    reset: bool = False  # a matched behaviour's: the connection drops before any answer

    @classmethod
    def from_headers(cls, headers: dict[str, str]) -> Controls:
        status = _header_int(headers, "x-mock-status")
        garbage = _header_choice(headers, "x-mock-garbage", GARBAGE_KINDS) or "json"
        content_type = headers.get("x-mock-content-type")
        if content_type is not None and not content_type.strip():
            raise HTTPError(400, "x-mock-content-type must not be empty")
        return cls(
            status=None if status is None else _check_status(status, "x-mock-status"),
            latency_ms=_header_int(headers, "x-mock-latency-ms") or 0,
            chunk_delay_ms=_header_int(headers, "x-mock-chunk-delay-ms") or 0,
            drop_after=_header_int(headers, "x-mock-drop-after-chunks"),
            end_after=_header_int(headers, "x-mock-end-after-chunks"),
            garbage_after=_header_int(headers, "x-mock-garbage-after-chunks"),
            garbage=garbage,
            chunk_bytes=_header_int(headers, "x-mock-chunk-bytes") or None,
            garbage_reply=_header_flag(headers, "x-mock-garbage-reply"),
            framing=_header_choice(headers, "x-mock-sse-framing", SSE_FRAMINGS),
            content_encoding=_header_choice(headers, "x-mock-content-encoding", CONTENT_ENCODINGS),
            content_type=content_type,
            extra_headers=_extra_headers(headers),
        )

    def apply(self, reply: Reply, dialect: Dialect) -> Reply:
        reply.headers += [*ACCOUNT_HEADERS, *self.extra_headers]
        reply.latency_s = self.latency_ms / 1000
        reply.reset = self.reset
        reply.chunk_delay_s = self.chunk_delay_ms / 1000
        reply.drop_after = self.drop_after
        reply.end_after = self.end_after
        if self.framing is not None and reply.events is not None and reply.content_type is None:  # SSE
            reply.events = [_reframe(event, self.framing, i) for i, event in enumerate(reply.events, 1)]
        if self.garbage_after is not None and reply.events is not None:
            # The broken event goes in as its own chunk and the stream then carries on,
            # as a provider (or a proxy in front of it) that recovers would.
            text = (_REPLY_OVERRIDE.get() or "") if self.garbage_reply else None
            reply.events.insert(self.garbage_after, dialect.garbage(self.garbage, text))
        elif self.garbage_after is not None and reply.body is not None:  # an answer or an error
            whole = orjson.dumps(reply.body)
            reply.raw = {"json": whole[:len(whole) // 2], "shape": b'["oops"]'}.get(self.garbage, _JUNK_BYTES)
        reply.chunk_bytes = self.chunk_bytes
        reply.content_encoding = self.content_encoding
        if self.content_type is not None:
            reply.content_type = self.content_type
        return reply


MAX_RAW_REPEAT = 1 << 16


def _raw_reply(reply: Reply, headers: dict[str, str]) -> Reply:
    """Raw replies for wire-shape tests, applied after every other control:
    `x-mock-raw-status: N` answers with status N (100-599, 2xx included: 204, 206...);
    `x-mock-raw-body: <base64>` sends exactly these bytes as a JSON-labelled body (empty allowed);
    `x-mock-raw-events: <JSON array of base64 strings>` sends a stream, one HTTP chunk each
    (`x-mock-raw-repeat: <JSON array of counts>`: event i that many times)."""
    status = _header_int(headers, "x-mock-raw-status")
    if status is not None:
        if not 100 <= status <= 599:
            raise HTTPError(400, "x-mock-raw-status must be between 100 and 599")
        reply.status = status
    body = headers.get("x-mock-raw-body")
    if body is not None:
        reply.raw, reply.body, reply.events = base64.b64decode(body), None, None
    events = headers.get("x-mock-raw-events")
    if events is not None:
        reply.events = [base64.b64decode(e) for e in orjson.loads(events)]
        repeats = orjson.loads(headers.get("x-mock-raw-repeat") or "[]")
        if not isinstance(repeats, list) or not all(_is_int(n) and 0 <= n <= MAX_RAW_REPEAT for n in repeats):
            raise HTTPError(400, f"x-mock-raw-repeat must be a JSON list of counts from 0 to {MAX_RAW_REPEAT}")
        # Event i goes out repeats[i] times (1 past the list): a stream of megabytes (an event
        # that never ends) from a few bytes of header.
        counts = [*repeats, *[1] * (len(reply.events) - len(repeats))]
        reply.events = [event for event, n in zip(reply.events, counts) for _ in range(n)]
    interim = headers.get("x-mock-interim")  # e.g. "103,100": 1xx answers first
    if interim:
        reply.interim = tuple(int(v) for v in interim.split(","))
        if not all(100 <= v <= 199 and v != 101 for v in reply.interim):
            raise HTTPError(400, "x-mock-interim must list 1xx statuses other than 101")
        reply.interim_headers = tuple(orjson.loads(headers.get("x-mock-interim-headers") or "{}").items())
    reply.headers += _header_list(headers)
    reply.trailers = tuple(orjson.loads(headers.get("x-mock-trailers") or "{}").items())
    reply.wire = _header_choice(headers, "x-mock-wire", WIRE_SHAPES)
    return reply


WIRE_SHAPES = ("chunk-ext", "body-despite-no-body")
MAX_HEADER_COPIES = 1000


def _header_list(headers: dict[str, str]) -> list[tuple[str, str]]:
    """x-mock-response-header-list: `[[name, value, copies], ...]`, each header `copies` times
    (duplicated headers), and x-mock-header-pad-bytes: N, one `x-mock-pad` header of N bytes
    (a huge header from a short control)."""
    listed = orjson.loads(headers.get("x-mock-response-header-list") or "[]")
    if not isinstance(listed, list) or not all(
            isinstance(h, list) and len(h) == 3 and isinstance(h[0], str) and isinstance(h[1], str)
            and _is_int(h[2]) and 0 <= h[2] <= MAX_HEADER_COPIES for h in listed):
        raise HTTPError(400, "x-mock-response-header-list must be [[name, value, copies], ...]")
    pad = _header_int(headers, "x-mock-header-pad-bytes")
    return [(n, v) for n, v, copies in listed for _ in range(copies)] + ([("x-mock-pad", "p" * pad)] if pad else [])


@dataclass
class Behaviour:
    """A scripted answer for requests to ``model`` (see ``_request_model``), or to every model when it is
    ``WILDCARD``; ``times=None`` means until reset."""

    model: str = WILDCARD
    status: int = 200
    times: int | None = None
    latency_ms: int = 0
    reset: bool = False  # read the request, then drop the connection before any answer

    @classmethod
    def from_json(cls, body: Any) -> Behaviour:
        if not isinstance(body, dict):
            raise HTTPError(400, "behaviour must be a JSON object")
        model, times, latency = body.get("model"), body.get("times"), body.get("latency_ms", 0)
        if model is None:
            model = WILDCARD
        if not isinstance(model, str) or not model:
            raise HTTPError(400, "'model' must be a non-empty string (or omitted for every model)")
        if times is not None and (not _is_int(times) or times < 1):
            raise HTTPError(400, "'times' must be a positive integer or null")
        if not _is_int(latency) or latency < 0:
            raise HTTPError(400, "'latency_ms' must be a non-negative integer")
        reset = body.get("reset", False)
        if not isinstance(reset, bool):
            raise HTTPError(400, "'reset' must be true or false")
        return cls(model, _check_status(body.get("status", 200), "'status'"), times, latency, reset)


@dataclass
class MockState:
    """Everything the control API reads or resets."""

    records: list[JSON] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)

    def take_behaviour(self, model: str | None) -> Behaviour | None:
        """The model's own behaviour, else the wildcard's; a use counts against its ``times``."""
        behaviour = self.behaviours.get(model) if model is not None else None
        if behaviour is None:
            behaviour = self.behaviours.get(WILDCARD)
        if behaviour is not None and behaviour.times is not None:
            behaviour.times -= 1
            if behaviour.times == 0:
                del self.behaviours[behaviour.model]
        return behaviour


class MockApp:
    """Protocol-independent request handling: routing, auth, test controls, control API."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.state = MockState()
        self._serials = itertools.count(1)

    def handle(self, request: Request) -> Reply:
        try:
            if request.path.startswith(CONTROL_PREFIX):
                return self._control(request)
            self.state.records.append(request.record())
            return self._api(request)
        except Exception:  # pragma: no cover - a bug in the mock itself
            traceback.print_exc(file=sys.stderr)
            return _openai_error(HTTPError(500, "mock provider internal error"))

    def _api(self, request: Request) -> Reply:
        matched = _match(request.method, request.path)
        if matched is None:
            return _openai_error(HTTPError(404, f"Invalid URL ({request.method} {request.path})"))
        route, params = matched
        try:
            controls = Controls.from_headers(request.headers)
        except HTTPError as error:
            return route.dialect.error(error)
        try:
            reply = self._answer(route, params, request, controls)
        except HTTPError as error:
            reply = route.dialect.error(error)
        except (TypeError, AttributeError, KeyError, ValueError) as error:
            # A field of the wrong type (`tools[0].function.name: 5`): real providers answer
            # 400, and so does the mock (it crashed with a 500, which made the gateway retry
            # the caller's mistake on the next backend).
            reply = route.dialect.error(HTTPError(400, f"Invalid request body: {type(error).__name__}."))
        return _raw_reply(controls.apply(reply, route.dialect), request.headers)

    def _answer(self, route: Route, params: dict[str, str], request: Request, controls: Controls) -> Reply:
        try:
            return self._admitted(route, params, request, controls)
        except HTTPError as error:
            raise _told(error, request.headers) from None

    def _admitted(self, route: Route, params: dict[str, str], request: Request, controls: Controls) -> Reply:
        route.dialect.admit(request, self.api_key)
        if controls.status is not None and controls.status >= 300:
            raise HTTPError(controls.status, "Mock error requested via x-mock-status.")
        behaviour = self.state.take_behaviour(_request_model(params, request.json))
        if behaviour is not None:
            controls.latency_ms += behaviour.latency_ms
            controls.reset = behaviour.reset
            if behaviour.status >= 300:
                target = "every model" if behaviour.model == WILDCARD else f"model {behaviour.model!r}"
                raise HTTPError(behaviour.status, f"Mock error configured for {target}.")
        reply_b64 = request.headers.get("x-mock-reply-base64")  # any Unicode reply (headers are ASCII)
        reply = base64.b64decode(reply_b64).decode() if reply_b64 else request.headers.get("x-mock-reply")
        if reply:
            reply = reply.replace("{credential}", _presented(request.headers))
        _REPLY_OVERRIDE.set(reply * (_header_int(request.headers, "x-mock-reply-repeat") or 1) if reply else reply)
        h = request.headers
        _QUIRKS.set(Quirks(_header_int(h, "x-mock-reply-words"), _header_int(h, "x-mock-ignore-max-tokens") == 1,
                           _header_int(h, "x-mock-usage-completion-tokens"), _choice_replies(h),
                           _header_flag(h, "x-mock-merge-choices"), _header_int(h, "x-mock-token-chars"),
                           _header_int(h, "x-mock-cache-write-tokens") or 0,
                           _header_int(h, "x-mock-cache-write-1h-tokens") or 0,
                           _header_choice(h, "x-mock-stop-reason", STOP_REASONS),
                           _header_int(h, "x-mock-event-words") or 1))
        body: JSON = {}
        if route.takes_body:
            if not isinstance(request.json, dict):
                raise HTTPError(400, "We could not parse the JSON body of your request.")
            body = request.json
        return route.handler(Call(body, next(self._serials), params, request.query))

    def _control(self, request: Request) -> Reply:
        action = request.method, request.path.removeprefix(CONTROL_PREFIX)
        try:
            if action == ("POST", "behaviour"):
                behaviour = Behaviour.from_json(request.json)
                self.state.behaviours[behaviour.model] = behaviour
                return Reply(body=asdict(behaviour))
            if action == ("GET", "requests"):
                return Reply(body=self.state.records)
            if action == ("DELETE", "requests"):
                self.state.records.clear()
                return Reply(body={"ok": True})
            if action == ("POST", "reset"):
                self.state = MockState()
                return Reply(body={"ok": True})
            raise HTTPError(404, f"Unknown control endpoint ({request.method} {request.path})")
        except HTTPError as error:
            return _openai_error(error)


# --------------------------------------------------------------------------- HTTP/1.1 (h11)


async def _send(writer: asyncio.StreamWriter, conn: h11.Connection, *events: h11.Event) -> None:
    for event in events:
        writer.write(conn.send(event) or b"")
    await writer.drain()


def _response(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    return h11.Response(status_code=status, headers=headers, reason=responses.get(status, ""))


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """Read one request (Content-Length or chunked body); None when the client closed."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await _send(writer, conn, h11.InformationalResponse(status_code=100, headers=[]))
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return Request.build(head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send_reply(
    conn: h11.Connection, writer: asyncio.StreamWriter, request: Request, reply: Reply
) -> bool:
    """Write the reply; False when the connection was deliberately dropped."""
    if reply.latency_s:
        await asyncio.sleep(reply.latency_s)
    if reply.reset:
        writer.transport.abort()
        return False
    for status in reply.interim:  # x-mock-interim: 1xx answers before the final one
        await _send(writer, conn, h11.InformationalResponse(status_code=status, headers=list(reply.interim_headers)))
    if reply.wire is not None:
        await _send_wire(writer, reply)
        return False
    if reply.events is None:
        await _send_json(conn, writer, reply, head_only=request.method == "HEAD")
        return True
    return await _send_stream(conn, writer, reply, reply.events)


async def _send_wire(writer: asyncio.StreamWriter, reply: Reply) -> None:
    """x-mock-wire: the answer framed by hand, then the connection closed. `chunk-ext`: the
    body (JSON or every event) chunked, each chunk size carrying extensions (`;a=1;b="x y"`),
    trailers after the last; `body-despite-no-body`: the head says no body (its status, 204 or
    304 by x-mock-raw-status, forbids one) and the body follows anyway."""
    chunks = reply.events if reply.events is not None else [
        reply.raw if reply.raw is not None else orjson.dumps(reply.body)]
    ctype = reply.content_type or ("text/event-stream" if reply.events is not None else "application/json")
    head = [f"HTTP/1.1 {reply.status} {responses.get(reply.status, '')}", f"content-type: {ctype}",
            *(f"{n}: {v}" for n, v in reply.headers)]
    if reply.wire == "chunk-ext":
        head.append("transfer-encoding: chunked")
        body = b"".join(b"%x;a=1;b=\"x y\";c\r\n%s\r\n" % (len(c), c) for c in chunks if c)
        body += b"0;end=1\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in reply.trailers) + b"\r\n"
    else:
        body = b"".join(chunks)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
    writer.close()


def _compressor(encoding: str | None) -> Any:
    """A zlib stream for the content-coding: gzip, or HTTP's deflate (zlib-wrapped, RFC 9110)."""
    return None if encoding is None else zlib.compressobj(wbits=31 if encoding == "gzip" else 15)


def _encoding_header(reply: Reply) -> list[tuple[str, str]]:
    return [("content-encoding", reply.content_encoding)] if reply.content_encoding else []


async def _send_json(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, *, head_only: bool) -> None:
    payload = reply.raw if reply.raw is not None else orjson.dumps(reply.body)
    if (compressor := _compressor(reply.content_encoding)) is not None:
        payload = compressor.compress(payload) + compressor.flush()
    headers = [("content-type", reply.content_type or "application/json"), ("content-length", str(len(payload))),
               *_encoding_header(reply), *reply.headers]
    if reply.status in (204, 304):  # no body, no content-length (x-mock-raw-status)
        headers = [h for h in headers if h[0] != "content-length"]
    body = [] if head_only or not payload else [h11.Data(data=payload)]
    await _send(writer, conn, _response(reply.status, headers), *body, h11.EndOfMessage())


async def _send_stream(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, events: list[bytes]) -> bool:
    """One HTTP chunk per event (SSE event, event-stream message or JSON array element), flushed;
    abort the connection mid-body when asked to drop, or end the body early when asked to end."""
    headers = [("content-type", reply.content_type or "text/event-stream"), ("cache-control", "no-cache"),
               *_encoding_header(reply), *reply.headers]
    await _send(writer, conn, _response(reply.status, headers))
    cut = reply.drop_after if reply.drop_after is not None else reply.end_after
    chunks = events if cut is None else events[:cut]
    if (compressor := _compressor(reply.content_encoding)) is not None:
        # Flushed per event, so the compressed stream still streams; ended unless dropped.
        chunks = [compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH) for chunk in chunks]
        if reply.drop_after is None:
            chunks.append(compressor.flush())
    if reply.chunk_bytes:
        data, size = b"".join(chunks), reply.chunk_bytes
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
    for index, event in enumerate(chunks):
        if index and reply.chunk_delay_s:
            await asyncio.sleep(reply.chunk_delay_s)
        await _send(writer, conn, h11.Data(data=event))
    if reply.drop_after is not None:
        writer.transport.abort()
        return False
    await _send(writer, conn, h11.EndOfMessage(headers=list(reply.trailers)))
    return True


def _write_protocol_error(conn: h11.Connection, writer: asyncio.StreamWriter, error: h11.RemoteProtocolError) -> None:
    """Best-effort 4xx for unparseable HTTP; the connection is closed right after."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    payload = orjson.dumps(_openai_error_body(HTTPError(error.error_status_hint, str(error))))
    headers = [("content-type", "application/json"), ("content-length", str(len(payload))), ("connection", "close")]
    for event in (_response(error.error_status_hint, headers), h11.Data(data=payload), h11.EndOfMessage()):
        writer.write(conn.send(event) or b"")


MAX_HEADER_BYTES = 128 * 1024


class MockProvider:
    """A listening mock provider; create it with :func:`start`."""

    def __init__(self, api_key: str | None) -> None:
        self.app = MockApp(api_key)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def listen(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve_connection, host, port, ssl=tls)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        writer.transport.set_write_buffer_limits(high=0)  # drain() then means "flushed to the socket"
        # Headers as large as Envoy forwards (tests send 60 KB x-mock-reply values), even when
        # they arrive over several reads; h11's default gives up past 16 KiB.
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while (request := await _read_request(conn, reader, writer)) is not None:
                if not await _send_reply(conn, writer, request, self.app.handle(request)):
                    break
                if (conn.our_state, conn.their_state) != (h11.DONE, h11.DONE):
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as error:
            _write_protocol_error(conn, writer, error)
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def start(host: str, port: int, api_key: str | None = None,
                tls: ssl.SSLContext | None = None) -> MockProvider:
    """Start serving on ``host:port`` (0 picks a free port, see ``.port``); HTTPS with ``tls``."""
    _encoding()  # load the BPE ranks now rather than on the first request
    provider = MockProvider(api_key)
    await provider.listen(host, port, tls)
    return provider


async def _serve_until_signalled(host: str, port: int, api_key: str | None, tls: ssl.SSLContext | None) -> None:
    provider = await start(host, port, api_key, tls)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"mock-provider listening on {'https' if tls else 'http'}://{shown_host}:{provider.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await provider.close()


def run(host: str, port: int, api_key: str | None, tls_files: tuple[Path, Path] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (entry point of ``gateway-extproc mock-provider``).
    ``tls_files`` (certificate chain, key): serve HTTPS, as hosted providers do, so
    Envoy's upstream TLS (CA, SNI, SAN checks) can be exercised locally."""
    tls = None
    if tls_files is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*tls_files)
    _run_event_loop(_serve_until_signalled(host, port, api_key, tls))
