"""Who is calling: caller key -> virtual key entry (and so its team)."""

from __future__ import annotations

from datetime import datetime

from . import keys
from .config import GatewayConfig, VirtualKey
from .errors import GatewayError


def presented_key(headers: dict[str, str]) -> str | None:
    """The caller's key from `Authorization: Bearer` (OpenAI SDKs) or `x-api-key` (Anthropic)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None


def authenticate(headers: dict[str, str], config: GatewayConfig, now: datetime) -> VirtualKey:
    key = presented_key(headers)
    if key is None:
        raise GatewayError("missing_api_key", "No API key: send `Authorization: Bearer <key>`.")
    id_ = keys.key_id(key)
    entry = config.keys.get(id_) if id_ else None
    if not keys.matches(key, entry.sha256 if entry else None) or entry is None:
        raise GatewayError("invalid_api_key", "The API key is not valid for this gateway.")
    if entry.expires_at is not None and entry.expires_at <= now:
        raise GatewayError("expired_api_key", f"The API key {entry.id!r} has expired; ask for a new one.")
    return entry
