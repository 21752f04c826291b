"""What a provider translator is: pure functions from the OpenAI Chat schema (the gateway's
pivot) to one provider's wire format and back. No gRPC, no I/O: the upstream processor
calls them once per attempt, and golden tests call them directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from ..errors import error_body, error_type

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


class SseReader:
    """Reassembles SSE events across arbitrary chunk boundaries (LF, CRLF or CR line ends)
    and yields each event's `data` payload; event names and comments are not needed
    because the Anthropic, Gemini and OpenAI payloads all say what they are."""

    __slots__ = ("_carry", "_text")

    def __init__(self) -> None:
        self._carry = b""  # a trailing b"\r" that may be the first half of b"\r\n"
        self._text = b""  # normalised (LF-only) bytes of the incomplete event

    def feed(self, chunk: bytes, end: bool) -> list[bytes]:
        """The data of every event completed by `chunk`; at `end` also of the unterminated
        last event, which a caller that must tell it apart reads with `feed(b"", True)`."""
        raw = self._carry + chunk
        cut = len(raw) - 1 if raw.endswith(b"\r") and not end else len(raw)
        self._carry = raw[cut:]
        self._text += raw[:cut].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, self._text = self._text.split(b"\n\n")
        if end:
            events.append(self._text)
            self._text = b""
        out: list[bytes] = []
        for event in events:
            data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if data:
                out.append(b"\n".join(data))
        return out


def append_turn(turns: list[JSON], role: str, field: str, items: list[JSON]) -> None:
    """Adds a message's blocks as a turn, merged into the previous turn of the same role:
    Anthropic, Converse and Gemini want user and assistant turns to alternate, while OpenAI
    histories often hold several messages of one role in a row (e.g. tool results)."""
    if turns and turns[-1]["role"] == role:
        turns[-1][field].extend(items)
    else:
        turns.append({"role": role, field: items})


def arguments_object(raw: Any) -> JSON | None:
    """A tool call's `arguments` (a JSON string in OpenAI's schema) as the object other
    schemas want; None when it is not valid JSON or not an object."""
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
