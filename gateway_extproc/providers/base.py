"""What a provider translator is: pure functions from the OpenAI Chat schema (the gateway's
pivot) to one provider's wire format and back. No gRPC, no I/O: the upstream processor
calls them once per attempt, and golden tests call them directly."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from ..errors import GatewayError, error_body, error_type, quoted

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Target:
    """What a translator needs to know about the attempt's backend."""

    model: str  # the provider's model name (Azure: the deployment; Bedrock: the model id)
    base_url: str  # provider baseURL from config, e.g. https://api.anthropic.com/v1
    base_path: str  # path part of base_url without trailing slash, e.g. "/v1"
    host: str  # host[:port] of base_url (what Envoy sends as :authority)
    credential: str  # secret value; never logged
    options: dict[str, str] = field(default_factory=dict)  # kind-specific: apiVersion, region, ...


@dataclass(frozen=True, slots=True)
class Outbound:
    """The request this attempt sends: Envoy applies it as header and body mutations."""

    path: str  # the new :path, query string included
    headers: dict[str, str]  # headers to set (credential, version, content-type); not content-length
    body: bytes
    remove: tuple[str, ...] = ()  # headers to drop, e.g. "authorization" for x-api-key providers


class StreamTranslator(Protocol):
    def feed(self, chunk: bytes, end: bool) -> bytes:
        """Provider stream bytes in, OpenAI `chat.completion.chunk` SSE bytes out (possibly
        b"" while an event is incomplete). At `end` flush everything and finish with
        `data: [DONE]\\n\\n` when the provider finished cleanly."""
        ...


class Translator(Protocol):
    """One module per provider kind implements these module-level functions."""

    # False for providers that already speak the OpenAI schema (openai, azure): the
    # upstream processor then leaves their responses alone.
    TRANSLATES_RESPONSE: bool

    def request(self, target: Target, suffix: str, body: JSON, stream: bool) -> Outbound:
        """`suffix` is the OpenAI path below /v1 ("/chat/completions", "/embeddings",
        "/responses"); a kind that cannot serve it raises GatewayError("unsupported_endpoint")."""
        ...

    def response(self, status: int, raw: bytes, model: str) -> bytes:
        """A provider JSON body (success or error) as an OpenAI chat completion or an
        OpenAI-shaped error `{"error": {"message", "type", "code", "param"}}`."""
        ...

    def stream(self, model: str) -> StreamTranslator: ...


def openai_error(status: int, message: str) -> bytes:
    """A provider's error as the OpenAI error shape every client of the gateway gets.
    `code` is always "provider_error" (docs/runbooks.md); the provider's own words stay
    in `message`."""
    return error_body(message, error_type(status), "provider_error")


# --- the OpenAI stream every translating StreamTranslator writes -------------------------

# The last event of a stream the provider finished cleanly; clients stop reading at it.
DONE = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    """One SSE event carrying `payload` (JSON bytes) as its single data line; OpenAI
    clients read nothing but data lines, so no event name or id is sent."""
    return b"data: " + payload + b"\n\n"


def delta_choice(delta: JSON, finish_reason: str | None = None, index: int = 0) -> JSON:
    """One entry of a chunk's `choices`; translators of single-choice providers leave
    `index` at 0."""
    return {"index": index, "delta": delta, "finish_reason": finish_reason}


def completion_chunk(id_: str, created: int, model: str, choices: list[JSON], usage: JSON | None = None) -> bytes:
    """One `chat.completion.chunk` SSE event. The usage chunk OpenAI ends a stream with is
    the one with `choices=[]` and `usage`; other chunks carry no `usage` key at all."""
    out: JSON = {"id": id_, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return sse(orjson.dumps(out))


def error_event(status: int, message: str) -> bytes:
    """A provider error that arrives after the 200 headers went out: the status can no
    longer change, so the OpenAI error shape travels as the stream's last data event,
    typed by the HTTP status the provider would have answered with."""
    return sse(openai_error(status, message))


UNREADABLE_STREAM = "The provider sent a stream the gateway could not read."


class StreamBroken(Exception):
    """Raised by a stream translator for an event it cannot translate, carrying the
    output of the events before it in the same `feed` (so it is not lost); the cause is
    the original exception."""

    def __init__(self, out: bytes) -> None:
        super().__init__("provider stream event could not be translated")
        self.out = out


class GuardedStream:
    """A provider stream translator that never raises: the first exception of any type
    (garbage, a shape the translator does not expect, a translator bug) becomes one
    `provider_error` event and every later byte of that stream is dropped, so the client
    sees a clean end instead of junk or a broken connection. `failure` keeps the
    exception for the caller's log line."""

    __slots__ = ("_inner", "failure")

    def __init__(self, inner: StreamTranslator) -> None:
        self._inner: StreamTranslator | None = inner
        self.failure: Exception | None = None

    @property
    def usage_unknown(self) -> bool:
        """The stream ended without a usage the translator could read (its usage chunk was
        left out): the provider's bill is unknown, not absent."""
        return bool(getattr(self._inner, "usage_unknown", False))

    def feed(self, chunk: bytes, end: bool) -> bytes:
        if self._inner is None:
            return b""
        try:
            return self._inner.feed(chunk, end)
        except StreamBroken as err:
            self._inner, self.failure = None, err.__cause__ or err
            return err.out + error_event(502, UNREADABLE_STREAM)
        except Exception as err:
            self._inner, self.failure = None, err
            return error_event(502, UNREADABLE_STREAM)


def guarded_response(translator: Translator, status: int, raw: bytes,
                     model: str) -> tuple[bytes, int, Exception | None]:
    """`translator.response` that never raises, as (body, status for the client,
    exception for the log line). An unreadable body (of any exception type) becomes a
    `provider_error`; an error answered under a 2xx status (a body that is no answer)
    goes out as 502, so clients do not take an error body for a completion."""
    try:
        out, failure = translator.response(status, raw, model), None
    except Exception as err:
        out, failure = openai_error(502, f"The provider answered HTTP {status} with a body the gateway "
                                         "could not read."), err
    if 200 <= status < 300 and out.startswith(b'{"error":'):
        status = 502
    return out, status, failure


# The largest SSE event a provider stream may hold (as eventstream.MAX_MESSAGE_BYTES bounds a
# Bedrock frame): a Gemini event with inline image bytes runs to megabytes, but an event past
# this is a provider (or a proxy) sending without end, and holding it would grow without bound.
MAX_EVENT_BYTES = 16 << 20


class EventTooLarge(ValueError):
    """A provider's SSE event went past MAX_EVENT_BYTES without ending."""


class SseReader:
    """Reassembles SSE events across arbitrary chunk boundaries (LF, CRLF or CR line ends)
    and yields each event's `data` payload; event names and comments are not needed
    because the Anthropic, Gemini and OpenAI payloads all say what they are.

    Each byte is searched for the blank line once, as it arrives: re-reading the whole held
    event on every chunk made an event of 32 MiB, trickled in 8 KiB chunks, cost a worker
    ~30 s of CPU (quadratic), and nothing bounded it."""

    __slots__ = ("_carry", "_text")

    def __init__(self) -> None:
        self._carry = b""  # a trailing b"\r" that may be the first half of b"\r\n"
        self._text = bytearray()  # normalised (LF-only) bytes of the incomplete event

    def feed(self, chunk: bytes, end: bool) -> list[bytes]:
        """The data of every event completed by `chunk`; at `end` also of the unterminated
        last event, which a caller that must tell it apart reads with `feed(b"", True)`.
        Raises EventTooLarge once an event has gone past MAX_EVENT_BYTES (at the call after
        the one that returned the events completed before it)."""
        if len(self._text) > MAX_EVENT_BYTES:
            raise EventTooLarge(f"an SSE event went past {MAX_EVENT_BYTES} bytes without ending")
        raw = self._carry + chunk
        cut = len(raw) - 1 if raw.endswith(b"\r") and not end else len(raw)
        self._carry = raw[cut:]
        held = len(self._text)  # holds no blank line: only its last byte may start one
        self._text += raw[:cut].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[bytes] = []
        if self._text.find(b"\n\n", max(held - 1, 0)) >= 0:
            *events, rest = bytes(self._text).split(b"\n\n")
            self._text = bytearray(rest)
        if end:
            events.append(bytes(self._text))
            self._text = bytearray()
        return [data for event in events if (data := event_data(event)) is not None]


_LINE_END = re.compile(rb"\r\n|\r|\n")


def event_field(event: bytes, name: bytes) -> list[bytes]:
    """The values of one field (`data`, `event`...) of an SSE event, in order, as an SSE
    client reads them: one leading space dropped, whatever the line ends."""
    prefix = name + b":"
    return [line[len(prefix):].removeprefix(b" ") for line in _LINE_END.split(event) if line.startswith(prefix)]


def event_data(event: bytes) -> bytes | None:
    """One SSE event's `data` as an SSE client dispatches it: its `data:` lines joined by LF;
    None when it has none (a comment, or only `event:`/`id:`/`retry:` fields: clients
    dispatch nothing)."""
    data = event_field(event, b"data")
    return b"\n".join(data) if data else None


def output_cap(body: JSON) -> Any:
    """The chat request's output cap: `max_completion_tokens`, else `max_tokens` (either may
    be sent as null; `body.get(a, body.get(b))` read a null first one as no cap at all)."""
    cap = body.get("max_completion_tokens")
    return cap if cap is not None else body.get("max_tokens")


# The largest token count read from a provider's usage: no answer bills 2**31 tokens (128
# choices of a million each is 2**27). Past it a count is unknown and the request is charged
# its reservation: 2**53 was believed, and ~500 such answers overflowed the Redis token tally
# (and a bill of 2**53 output tokens failed the answer with a 500 while pricing it).
MAX_TOKENS = 1 << 31


def token_count(required: tuple[Any, ...], optional: tuple[Any, ...] = ()) -> int | None:
    """A provider's token count as the sum of its usage fields: None (the bill is unknown,
    and the router charges the reservation, docs/budgets.md) when a `required` field is
    missing or any field present is no non-negative integer (or is past `MAX_TOKENS`, as is
    the sum). Reading a missing count as 0 charged an answer with no usage block $0, and a
    negative part cancelled the others."""
    if any(v is None for v in required):
        return None
    values = (*required, *(v for v in optional if v is not None))
    if any(type(v) is not int or not 0 <= v <= MAX_TOKENS for v in values):
        return None
    total = sum(values)
    return total if total <= MAX_TOKENS else None


def openai_usage(prompt: int | None, completion: int | None) -> JSON | None:
    """OpenAI's usage block, or None when a count is unknown: the translated answer then
    carries no usage (charged the reservation), rather than a 0 or a null no SDK reads."""
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def append_turn(turns: list[JSON], role: str, field: str, items: list[JSON]) -> None:
    """Adds a message's blocks as a turn, merged into the previous turn of the same role:
    Anthropic, Converse and Gemini want user and assistant turns to alternate, while OpenAI
    histories often hold several messages of one role in a row (e.g. tool results)."""
    if turns and turns[-1]["role"] == role:
        turns[-1][field].extend(items)
    else:
        turns.append({"role": role, field: items})


def arguments_text(value: Any) -> str:
    """A provider's tool input object as OpenAI's JSON-string arguments: never "" (clients
    json.loads it), and {} for anything that is not an object."""
    return orjson.dumps(value if isinstance(value, dict) else {}).decode()


def arguments_object(raw: Any) -> JSON | None:
    """A tool call's `arguments` (a JSON string in OpenAI's schema) as the object other
    schemas want; None when it is not valid JSON or not an object."""
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# --- tool-call ids across the pivot ------------------------------------------------------

# Gemini 3 refuses the next turn of a function-calling conversation unless each function
# call comes back with the opaque `thoughtSignature` it was sent with. OpenAI's schema has
# no place for it, but every client echoes a tool call's id verbatim (in the assistant
# message and in the tool message answering it), so the signature rides in the id:
# "<id>__thought__<signature as unpadded base64url>". Only [A-Za-z0-9_-] is used, the
# alphabet Anthropic and Bedrock allow in their own tool ids (other translators send just
# the "<id>" part: see `plain_call_id`).
_THOUGHT_MARK = "__thought__"


def call_id(base: str, signature: Any = None) -> str:
    """The OpenAI tool-call id for a provider's call id and its thought signature. A
    signature that is not canonical base64 (so would not survive the re-encoding) is left
    out rather than corrupted."""
    if not isinstance(signature, str) or not signature:
        return base
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return base
    if base64.b64encode(raw).decode() != signature:
        return base
    return base + _THOUGHT_MARK + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def split_call_id(value: Any) -> tuple[str, str | None]:
    """(provider call id, thought signature or None) of an OpenAI tool-call id."""
    text = value if isinstance(value, str) else ""
    base, mark, encoded = text.partition(_THOUGHT_MARK)
    if not mark or not encoded:
        return text, None
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return text, None
    return base, base64.b64encode(raw).decode()


def plain_call_id(value: Any) -> str:
    """A tool-call id without the Gemini thought signature riding in it: what providers
    with their own id rules (Anthropic, Bedrock: [A-Za-z0-9_-], at most 64 characters) get."""
    return split_call_id(value)[0]


def chosen_function(choice: JSON, kind: str) -> str:
    """The function an object `tool_choice` forces (`{"type": "function", "function": {"name"}}`;
    the router checked its types). Other objects OpenAI takes (`allowed_tools`, `custom`) have no
    equivalent here: refused, not sent as a choice of no function."""
    if choice.get("type") != "function" or "function" not in choice:
        raise GatewayError("invalid_request", f"tool_choice type {quoted(choice.get('type'))} is not supported by "
                           f"{kind} backends", "tool_choice")
    return choice["function"]["name"]


# Anthropic's (and Converse's) stop reasons that OpenAI's finish_reason says less about: carried
# beside it as OpenRouter's `native_finish_reason`, and the stop string matched as vLLM's
# `stop_reason`, so an Anthropic client gets them back (messages.py) and OpenAI clients may read them.
# Each with the finish_reason it goes with.
NATIVE_STOPS = {"stop_sequence": "stop", "pause_turn": "stop", "model_context_window_exceeded": "length"}


def native_stop(stop_reason: Any, matched: Any) -> JSON:
    """A choice's extension fields for a provider's `stop_reason` ({} when finish_reason says it all)."""
    if stop_reason not in NATIVE_STOPS:
        return {}
    if stop_reason == "stop_sequence" and isinstance(matched, str):
        return {"native_finish_reason": stop_reason, "stop_reason": matched}
    return {"native_finish_reason": stop_reason}


def finish_with_calls(finish: str, called: bool) -> str:
    """`finish_reason` is "tool_calls" exactly when the answer holds client tool calls
    (OpenAI clients run tools on it, and expect some), unless it was cut short
    (`length`, `content_filter`): a provider stop reason saying otherwise (a tool_use
    stop after server tools only, an end_turn after a tool_use block) is overruled."""
    if called:
        return "tool_calls" if finish == "stop" else finish
    return "stop" if finish == "tool_calls" else finish
