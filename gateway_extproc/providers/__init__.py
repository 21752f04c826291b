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

# The kinds whose request is the client's body as it came (model name aside), prompt-cache
# markers included; the others build their own body, which carries none.
VERBATIM: frozenset[str] = frozenset({"openai", "azure"})
