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

import functools
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from ..config import Backend
from ..errors import GatewayError, completed_error, error_object, error_type
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


CREDENTIAL_CUT = "[credential removed]"
_MESSAGE_KEYS = ("message", "detail", "error")  # where non-OpenAI error bodies put their words


# The gateway's provider credentials (`Runtime.secrets`). Every provider answer is cut of
# all of them, not only of the key its backend was presented: a provider, or a proxy before
# it, that quotes another backend's key (shared config, a misrouted debug echo) hands out a
# gateway secret just the same.
Secrets = tuple[str, ...]


def credential_parts(secrets: Secrets) -> tuple[str, ...]:
    """What of the provider credentials must never reach a client: each value and, for
    Bedrock's "key id:secret", each part (parts under 8 characters would match innocent text)."""
    return tuple(dict.fromkeys(p for credential in secrets for p in (credential, *credential.split(":"))
                               if len(p) >= 8))


PIECE = 8  # a run of this many of a credential's characters is a piece of it (as logs are grepped)


# Every run of PIECE characters holds one of the runs of _ANCHOR characters that start at a
# multiple of _STEP (_ANCHOR + _STEP - 1 == PIECE): a few searches rule most texts out.
_STEP, _ANCHOR = 4, 5


# A key's leading label (`sk-`, `sk-proj-`, `sk-backup-`: up to its last `-` or `_` among the
# first _LABEL characters) is no secret, and a piece of it is everyday text (`mock-backup`).
_LABEL = 16


def _secret(part: str) -> str:
    """The part without its leading label."""
    cut = max(part.rfind("-", 0, _LABEL), part.rfind("_", 0, _LABEL))
    return part[cut + 1:]


@functools.lru_cache(maxsize=64)
def _windows(secrets: Secrets) -> tuple[frozenset[str], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Every run of PIECE characters of the credentials' parts past their labels; the parts;
    the runs' anchors (`_ANCHOR` characters at every `_STEP`-th offset); the parts lower-cased."""
    parts = credential_parts(secrets)
    pieced = [_secret(p) for credential in secrets for p in _pieced(credential)]
    return (frozenset(s[i:i + PIECE] for s in pieced for i in range(len(s) - PIECE + 1)), parts,
            tuple({s[i:i + _ANCHOR] for s in pieced for i in range(0, len(s) - _ANCHOR + 1, _STEP)}),
            tuple(p.lower() for p in parts))


def _pieced(credential: str) -> tuple[str, ...]:
    """What a credential's pieces are read from: a Bedrock "key id:secret" by its parts, each
    past its own label (the whole value's label would end at the id, and a label inside the
    secret, `sk-backup-`, would be read as secret: `k-backup` is in `mock-backup`)."""
    split = tuple(p for p in credential.split(":") if len(p) >= PIECE) if ":" in credential else ()
    return split or ((credential,) if len(credential) >= PIECE else ())


def cut_pieces(text: str, secrets: Secrets) -> str:
    """`text` with every run of PIECE or more characters of a credential replaced: a
    provider (or a proxy before it) quoting a key in part, around asterisks or as "the key
    ending …", gives away no more than PIECE - 1 of its characters."""
    if not secrets or len(text) < PIECE:
        return text
    windows, parts, _, _ = _windows(secrets)
    for part in parts:  # the whole value, label included
        text = text.replace(part, CREDENTIAL_CUT)
    if not windows:
        return text
    out, start, i, n = [], 0, 0, len(text)
    while i <= n - PIECE:
        if text[i:i + PIECE] not in windows:
            i += 1
            continue
        end = i + PIECE  # extend while the run is still a piece of some part
        while end < n and any(text[i:end + 1] in p for p in parts):
            end += 1
        out += (text[start:i], CREDENTIAL_CUT)
        start = i = end
    out.append(text[start:])
    return "".join(out)


def holds_piece(text: str, secrets: Secrets) -> bool:
    """Whether `text` holds a run of PIECE characters of a credential (C-speed substring
    searches: the anchors, then, only when one is there, every run)."""
    if not secrets:
        return False
    windows, _, anchors, _ = _windows(secrets)
    return any(a in text for a in anchors) and any(w in text for w in windows)


@functools.lru_cache(maxsize=64)
def _needles(secrets: Secrets) -> tuple[bytes, ...]:
    """The credentials' parts as they may appear in an answer's bytes: as is, and escaped as
    JSON may escape them (`\\/` included); longest first."""
    out: set[bytes] = set()
    for part in credential_parts(secrets):
        escaped = orjson.dumps(part)[1:-1]
        out |= {part.encode(), escaped, escaped.replace(b"/", b"\\/")}
    return tuple(sorted(out, key=len, reverse=True))


class CredentialCut:
    """The credentials cut from a provider's answer bytes, whole or piece by piece (a
    provider, or a proxy before it, echoing what it was presented). A piece's tail that could
    begin a credential waits for the next piece, so a value split over pieces is cut too;
    an SSE piece ends in a blank line, so normally nothing waits."""

    __slots__ = ("_needles", "_carry", "found", "reported")

    def __init__(self, needles: tuple[bytes, ...]) -> None:
        self._needles = needles
        self._carry = b""
        self.found = False  # set when something was cut
        # Set by the caller once it logged the cut: once per answer, not once per piece (a
        # stream echoing the credential in every chunk wrote a line each).
        self.reported = False

    @classmethod
    def of(cls, secrets: Secrets) -> CredentialCut | None:
        needles = _needles(secrets) if secrets else ()
        return cls(needles) if needles else None

    def whole(self, body: bytes) -> bytes:
        """`body` without the credentials (the same object when it holds none)."""
        for needle in self._needles:
            if needle in body:
                body = body.replace(needle, CREDENTIAL_CUT.encode())
                self.found = True
        return body

    def feed(self, chunk: bytes, end: bool) -> bytes:
        data = self.whole(self._carry + chunk if self._carry else chunk)
        self._carry = b""
        if not end and (keep := self._begun(data)):
            data, self._carry = data[:-keep], data[-keep:]
        return data

    def _begun(self, data: bytes) -> int:
        """The length of the longest tail of `data` that begins some needle."""
        best, n = 0, len(data)
        for needle in self._needles:
            first = needle[:1]
            i = data.find(first, max(0, n - len(needle) + 1))
            while 0 <= i < n - best:
                if needle.startswith(data[i:]):
                    best = n - i
                    break
                i = data.find(first, i + 1)
        return best


def echoed_headers(headers: dict[str, str], secrets: Secrets) -> tuple[str, ...]:
    """The names of a provider's answer headers that carry a credential (in the value, or
    in the name as Envoy lower-cased it)."""
    if not secrets:
        return ()
    _, parts, _, lowered = _windows(secrets)
    if not parts:
        return ()
    pieces = holds_piece("\n".join(headers.values()), secrets)  # once for all: the usual answer is no
    return tuple(k for k, v in headers.items() if k[0] != ":" and ((pieces and holds_piece(v, secrets))
                                                                   or any(p in k for p in lowered)))


def client_error(status: int, raw: bytes, secrets: Secrets, backend: str,
                 scan: Callable[[dict[str, Any]], dict[str, Any]] | None) -> bytes:
    """A provider's error answer (status >= 400) as the client gets it, or `GatewayError`
    `provider_auth_failed` for a 401.

    - 401: the provider refused the gateway's own credential (callers never present theirs to
      a provider), so the caller's SDK must not report its own key as wrong; the provider's
      words are dropped, since providers quote the key they refused (OpenAI its last four
      characters, others all of it).
    - Any other status: an OpenAI error object goes on with every credential's value, and any
      run of 8 or more of its characters (a key quoted in part), cut wherever it appears, and
      a missing field or code filled in (`errors.completed_error`);
      anything else (an HTML page from a proxy, FastAPI's `{"detail": ...}`) becomes a
      `provider_error` carrying the provider's message, so every client reads one error shape.
    - `scan`: output scanning's check of the object (`classification.scanned_error_object`)."""
    if status == 401:
        raise GatewayError("provider_auth_failed", f"The provider refused the gateway's credential for backend "
                           f"{backend!r}; the platform team must replace it (docs/runbooks.md).")
    text = raw.decode("utf-8", "replace")
    try:  # JSON in one spelling (a provider may escape `/` or any character as \uXXXX)
        body, text = None, orjson.dumps(orjson.loads(text)).decode()
    except orjson.JSONDecodeError:
        body = None
    text = cut_pieces(text, secrets)  # the whole value, and any piece of PIECE characters or more
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        said = next((v for k in _MESSAGE_KEYS if isinstance(v := (body or {}).get(k), str) and v.strip()), None) \
            if isinstance(body, dict) else None
        message = f"The provider answered HTTP {status}" + (f": {said}" if said else " with no OpenAI error object.")
        body = error_object(message, error_type(status), "provider_error")
    else:
        body["error"] = completed_error(body["error"], error_type(status), f"The provider answered HTTP {status}.")
    if scan is not None:
        body = scan(body)
    return orjson.dumps(body)
