"""What a provider translator is: pure functions from the OpenAI Chat schema (the gateway's
pivot) to one provider's wire format and back. No gRPC, no I/O: the upstream processor
calls them once per attempt, and golden tests call them directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
