"""Deterministic mock LLM provider speaking the OpenAI and Anthropic HTTP APIs.

Why it exists: ``make run`` and the integration tests need an upstream behind
Envoy that behaves like OpenAI (chat completions, streaming, embeddings,
models) and Anthropic (messages, streaming) without network access, API
spend or nondeterminism.  Replies are derived only from the request, token
usage is counted with the real o200k_base BPE, and tests can inject failures
(error statuses, latency, slow or truncated streams) and inspect every request
the gateway forwarded.  See ``docs/mock-provider.md`` for the full contract.

It is a small asyncio + h11 HTTP/1.1 server rather than a web framework so it
starts fast, has no extra dependencies, and gives exact control over the wire
(one HTTP chunk per SSE event, abrupt connection drops mid-body).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import hashlib
import hmac
import itertools
import math
import re
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from http.client import responses
from typing import Any, Literal

import h11
import orjson
from bpe_openai import Encoding, get_encoding

try:
    from uvloop import run as _run_event_loop
except ImportError:  # pragma: no cover - uvloop is optional
    from asyncio import run as _run_event_loop

__all__ = ["MockProvider", "start", "run"]

Flavor = Literal["openai", "anthropic"]
JSON = dict[str, Any]

CONTROL_PREFIX = "/_mock/"
READ_SIZE = 65536
DEFAULT_EMBEDDING_DIMENSIONS = 8
REPLY_PROMPT_CHARS = 60
MODEL_CREATED = 1_700_000_000
MODELS = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "claude-sonnet-4-5")

_OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_ANTHROPIC_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
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


def _anthropic_error_body(error: HTTPError) -> JSON:
    default = "api_error" if error.status >= 500 else "invalid_request_error"
    kind = error.type or _ANTHROPIC_ERROR_TYPES.get(error.status, default)
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def _error_reply(flavor: Flavor, error: HTTPError) -> Reply:
    body = _anthropic_error_body(error) if flavor == "anthropic" else _openai_error_body(error)
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
        try:
            parsed = orjson.loads(raw_body)
        except orjson.JSONDecodeError:
            parsed = None
        return cls(head.method.decode("ascii"), head.target.decode("latin-1"), headers, raw_body, parsed)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def record(self) -> JSON:
        return {
            "method": self.method,
            "path": self.target,
            "headers": self.headers,
            "body": self.json,
            "raw_body_len": len(self.raw_body),
        }


@dataclass
class Reply:
    """A JSON response (``body``) or an SSE stream (``events``), plus wire-level controls."""

    status: int = 200
    body: Any = None
    events: list[bytes] | None = None
    latency_s: float = 0.0
    chunk_delay_s: float = 0.0
    drop_after: int | None = None


def _sse(data: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n".encode() if event else b""
    return prefix + b"data: " + orjson.dumps(data) + b"\n\n"


# --------------------------------------------------------------------------- text and tokens


@functools.cache
def _encoding() -> Encoding:
    return get_encoding("o200k_base")


def _tokens(text: str) -> list[int]:
    return _encoding().encode_ordinary(text)


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


def _last_user_text(messages: list[JSON]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return " ".join(_texts(message.get("content")))
    return ""


def _words(text: str) -> list[str]:
    """Split into words keeping leading whitespace, so ``"".join(_words(t)) == t``."""
    return _WORD_RE.findall(text)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    truncated: bool


# The reply text a request asked for with `x-mock-reply` (tests of output scanning).
_REPLY_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("mock_reply", default=None)


def _complete(model: str, messages: list[JSON], limit: int | None) -> Completion:
    prompt = _last_user_text(messages)[:REPLY_PROMPT_CHARS]
    text = _REPLY_OVERRIDE.get() or f"This is a mock reply from {model} to: {prompt}."
    tokens = _tokens(text)
    if limit is not None and limit < len(tokens):
        return Completion(_encoding().decode(tokens[:limit]), limit, True)
    return Completion(text, len(tokens), False)


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


def _optional_int(body: JSON, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise HTTPError(400, f"'{key}' must be a non-negative integer")
    return value


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


def chat_completions(body: JSON, serial: int) -> Reply:
    model = _model(body)
    messages = _messages(body)
    limit = _optional_int(body, "max_completion_tokens")
    if limit is None:
        limit = _optional_int(body, "max_tokens")
    completion = _complete(model, messages, limit)
    prompt_tokens = _chat_prompt_tokens(messages)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion.tokens,
        "total_tokens": prompt_tokens + completion.tokens,
    }
    finish_reason = "length" if completion.truncated else "stop"
    base = {"id": f"chatcmpl-mock-{serial}", "object": "chat.completion", "created": int(time.time()), "model": model}
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return Reply(events=_chat_chunks(base, completion.text, finish_reason, usage if include_usage else None))
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": completion.text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    return Reply(body={**base, "choices": [choice], "usage": usage})


def _chat_chunks(base: JSON, text: str, finish_reason: str, usage: JSON | None) -> list[bytes]:
    """OpenAI stream events; ``usage`` is given only when stream_options.include_usage is set."""
    base = {**base, "object": "chat.completion.chunk"}

    def chunk(delta: JSON, finish: str | None = None) -> JSON:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], **({"usage": None} if usage else {})}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": word}) for word in _words(text)]
    chunks.append(chunk({}, finish_reason))
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


def embeddings(body: JSON, serial: int) -> Reply:
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


def models(body: JSON, serial: int) -> Reply:
    data = [{"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "mock-provider"} for name in MODELS]
    return Reply(body={"object": "list", "data": data})


# --------------------------------------------------------------------------- Anthropic endpoint


def anthropic_messages(body: JSON, serial: int) -> Reply:
    model = _model(body)
    messages = _messages(body)
    max_tokens = _optional_int(body, "max_tokens")
    if max_tokens is None:
        raise HTTPError(400, "max_tokens: Field required")
    completion = _complete(model, messages, max_tokens)
    input_tokens = _count(_texts(body.get("system"))) + sum(_count(_texts(m.get("content"))) for m in messages)
    message = {
        "id": f"msg_mock_{serial}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": completion.text}],
        "stop_reason": "max_tokens" if completion.truncated else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": completion.tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    if body.get("stream") is True:
        return Reply(events=_anthropic_events(message, completion.text))
    return Reply(body=message)


def _anthropic_events(message: JSON, text: str) -> list[bytes]:
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events: list[JSON] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
        for word in _words(text)
    ]
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
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


def responses_api(body: JSON, serial: int) -> Reply:
    """OpenAI Responses API (`POST /v1/responses`), JSON and SSE."""
    model = _model(body)
    messages = _response_input(body)
    completion = _complete(model, messages, _optional_int(body, "max_output_tokens"))
    input_tokens = _count(_texts(body.get("instructions"))) + sum(_count(_texts(m["content"])) for m in messages)
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": completion.tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + completion.tokens}
    item_id = f"msg_mock_{serial}"
    text_part = {"type": "output_text", "text": completion.text, "annotations": []}
    item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [text_part]}
    done = {"id": f"resp_mock_{serial}", "object": "response", "created_at": int(time.time()), "model": model,
            "status": "incomplete" if completion.truncated else "completed", "output": [item], "usage": usage,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens")}
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
        {"type": "response.completed", "response": done},
    ]
    return Reply(events=[_sse({**e, "sequence_number": i}, e["type"]) for i, e in enumerate(events)])


# --------------------------------------------------------------------------- routing and controls


@dataclass(frozen=True)
class Route:
    handler: Callable[[JSON, int], Reply]
    flavor: Flavor = "openai"
    takes_body: bool = True


ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/v1/chat/completions"): Route(chat_completions),
    ("POST", "/v1/embeddings"): Route(embeddings),
    ("POST", "/v1/responses"): Route(responses_api),
    ("GET", "/v1/models"): Route(models, takes_body=False),
    ("POST", "/v1/messages"): Route(anthropic_messages, flavor="anthropic"),
}


def _authenticate(flavor: Flavor, headers: dict[str, str], api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    presented = [token.strip()] if scheme.lower() == "bearer" else []
    if flavor == "anthropic" and "x-api-key" in headers:
        presented.append(headers["x-api-key"])
    if any(hmac.compare_digest(key.encode(), api_key.encode()) for key in presented):
        return
    message = "Incorrect API key provided." if presented else "No API key provided."
    raise HTTPError(401, message, type="authentication_error", code="invalid_api_key")


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

    @classmethod
    def from_headers(cls, headers: dict[str, str]) -> Controls:
        status = _header_int(headers, "x-mock-status")
        return cls(
            status=None if status is None else _check_status(status, "x-mock-status"),
            latency_ms=_header_int(headers, "x-mock-latency-ms") or 0,
            chunk_delay_ms=_header_int(headers, "x-mock-chunk-delay-ms") or 0,
            drop_after=_header_int(headers, "x-mock-drop-after-chunks"),
        )

    def apply(self, reply: Reply) -> Reply:
        reply.latency_s = self.latency_ms / 1000
        reply.chunk_delay_s = self.chunk_delay_ms / 1000
        reply.drop_after = self.drop_after
        return reply


@dataclass
class Behaviour:
    """A scripted answer for requests whose body ``model`` matches; ``times=None`` means until reset."""

    model: str
    status: int = 200
    times: int | None = None
    latency_ms: int = 0

    @classmethod
    def from_json(cls, body: Any) -> Behaviour:
        if not isinstance(body, dict):
            raise HTTPError(400, "behaviour must be a JSON object")
        model, times, latency = body.get("model"), body.get("times"), body.get("latency_ms", 0)
        if not isinstance(model, str) or not model:
            raise HTTPError(400, "'model' must be a non-empty string")
        if times is not None and (not _is_int(times) or times < 1):
            raise HTTPError(400, "'times' must be a positive integer or null")
        if not _is_int(latency) or latency < 0:
            raise HTTPError(400, "'latency_ms' must be a non-negative integer")
        return cls(model, _check_status(body.get("status", 200), "'status'"), times, latency)


@dataclass
class MockState:
    """Everything the control API reads or resets."""

    records: list[JSON] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)

    def take_behaviour(self, body: Any) -> Behaviour | None:
        model = body.get("model") if isinstance(body, dict) else None
        behaviour = self.behaviours.get(model) if isinstance(model, str) else None
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
            return _error_reply("openai", HTTPError(500, "mock provider internal error"))

    def _api(self, request: Request) -> Reply:
        route = ROUTES.get((request.method, request.path))
        if route is None:
            return _error_reply("openai", HTTPError(404, f"Invalid URL ({request.method} {request.path})"))
        try:
            controls = Controls.from_headers(request.headers)
        except HTTPError as error:
            return _error_reply(route.flavor, error)
        try:
            reply = self._answer(route, request, controls)
        except HTTPError as error:
            reply = _error_reply(route.flavor, error)
        return controls.apply(reply)

    def _answer(self, route: Route, request: Request, controls: Controls) -> Reply:
        _authenticate(route.flavor, request.headers, self.api_key)
        if controls.status is not None and controls.status >= 300:
            raise HTTPError(controls.status, "Mock error requested via x-mock-status.")
        behaviour = self.state.take_behaviour(request.json)
        if behaviour is not None:
            controls.latency_ms += behaviour.latency_ms
            if behaviour.status >= 300:
                raise HTTPError(behaviour.status, f"Mock error configured for model {behaviour.model!r}.")
        _REPLY_OVERRIDE.set(request.headers.get("x-mock-reply"))
        body: JSON = {}
        if route.takes_body:
            if not isinstance(request.json, dict):
                raise HTTPError(400, "We could not parse the JSON body of your request.")
            body = request.json
        return route.handler(body, next(self._serials))

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
            return _error_reply("openai", error)


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
    if reply.events is None:
        await _send_json(conn, writer, reply, head_only=request.method == "HEAD")
        return True
    return await _send_stream(conn, writer, reply, reply.events)


async def _send_json(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, *, head_only: bool) -> None:
    payload = orjson.dumps(reply.body)
    headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
    body = [] if head_only else [h11.Data(data=payload)]
    await _send(writer, conn, _response(reply.status, headers), *body, h11.EndOfMessage())


async def _send_stream(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, events: list[bytes]) -> bool:
    """One HTTP chunk per SSE event, flushed; abort the connection mid-body when asked to drop."""
    headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
    await _send(writer, conn, _response(reply.status, headers))
    for index, event in enumerate(events if reply.drop_after is None else events[: reply.drop_after]):
        if index and reply.chunk_delay_s:
            await asyncio.sleep(reply.chunk_delay_s)
        await _send(writer, conn, h11.Data(data=event))
    if reply.drop_after is not None:
        writer.transport.abort()
        return False
    await _send(writer, conn, h11.EndOfMessage())
    return True


def _write_protocol_error(conn: h11.Connection, writer: asyncio.StreamWriter, error: h11.RemoteProtocolError) -> None:
    """Best-effort 4xx for unparseable HTTP; the connection is closed right after."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    payload = orjson.dumps(_openai_error_body(HTTPError(error.error_status_hint, str(error))))
    headers = [("content-type", "application/json"), ("content-length", str(len(payload))), ("connection", "close")]
    for event in (_response(error.error_status_hint, headers), h11.Data(data=payload), h11.EndOfMessage()):
        writer.write(conn.send(event) or b"")


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

    async def listen(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve_connection, host, port)

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
        conn = h11.Connection(h11.SERVER)
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


async def start(host: str, port: int, api_key: str | None = None) -> MockProvider:
    """Start serving on ``host:port`` (0 picks a free port, see ``.port``)."""
    _encoding()  # load the BPE ranks now rather than on the first request
    provider = MockProvider(api_key)
    await provider.listen(host, port)
    return provider


async def _serve_until_signalled(host: str, port: int, api_key: str | None) -> None:
    provider = await start(host, port, api_key)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"mock-provider listening on http://{shown_host}:{provider.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await provider.close()


def run(host: str, port: int, api_key: str | None) -> None:
    """Serve until SIGTERM/SIGINT (entry point of ``gateway-extproc mock-provider``)."""
    _run_event_loop(_serve_until_signalled(host, port, api_key))
