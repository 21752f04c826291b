"""Provider translators, one module per provider kind (base.py holds the contract).

OpenAI Chat Completions is the pivot: the router works on it, each module here turns it
into one provider's wire format for an attempt and turns that provider's answer back."""

from __future__ import annotations

from typing import cast

from . import anthropic, azure, bedrock, gemini, openai
from .base import Translator

TRANSLATORS: dict[str, Translator] = {
    kind: cast(Translator, module)
    for kind, module in (("openai", openai), ("azure", azure), ("anthropic", anthropic), ("bedrock", bedrock),
                         ("gemini", gemini))}

# The gateway endpoints (api.Endpoint.name) each kind can serve; the router refuses the
# others up front with `unsupported_endpoint` instead of failing per attempt.
SERVES: dict[str, frozenset[str]] = {
    "openai": frozenset({"chat", "embeddings", "responses"}),
    "azure": frozenset({"chat", "embeddings"}),
    "anthropic": frozenset({"chat"}),
    "bedrock": frozenset({"chat"}),
    "gemini": frozenset({"chat"}),
}

# The kinds whose request is the client's body as it came (model name aside): a provider's
# cache writes it reports without their TTL were asked for with the body's markers.
VERBATIM: frozenset[str] = frozenset({"openai", "azure"})
# The kinds a request's prompt-cache markers (`cache_control`) reach: as sent, or put back in
# place by the translator (Anthropic blocks, Converse cachePoints). Gemini's body carries none.
CACHE_MARKED: frozenset[str] = VERBATIM | {"anthropic", "bedrock"}
