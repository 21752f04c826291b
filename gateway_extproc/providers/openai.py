"""OpenAI and OpenAI-compatible backends (vLLM, Ollama, Together, Groq): they already
speak the pivot schema, so only the path, the credential and the model name change."""

from __future__ import annotations

import orjson

from .base import JSON, Outbound, Target

TRANSLATES_RESPONSE = False


def with_model(body: JSON, model: str) -> bytes:
    """The client's body addressed to the backend's own model name (the client sent the
    gateway's alias, which the backend does not know)."""
    return orjson.dumps({**body, "model": model})


def request(target: Target, suffix: str, body: JSON, stream: bool) -> Outbound:
    return Outbound(path=target.base_path + suffix,
                    headers={"authorization": f"Bearer {target.credential}"},
                    body=with_model(body, target.model))


def response(status: int, raw: bytes, model: str) -> bytes:
    """Identity: never called while TRANSLATES_RESPONSE is False; here so the kind
    satisfies the Translator contract."""
    return raw


class _Passthrough:
    """Identity stream, for the same reason as `response`."""

    __slots__ = ()

    def feed(self, chunk: bytes, end: bool) -> bytes:
        return chunk


def stream(model: str) -> _Passthrough:
    return _Passthrough()
