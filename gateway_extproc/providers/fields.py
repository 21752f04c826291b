"""Which request fields each backend kind carries, checked before any attempt.

A field a client sent must reach the provider with its meaning or be refused (400
`invalid_request` naming it and the backend kind): a translator that skipped a field it has
no place for (`top_k`, `thinking`, a `tool_result`'s `is_error`, `seed`, `logprobs`...)
answered as if it had never been sent. The pivot (OpenAI chat) carries what OpenAI's schema
has no place for under the names LiteLLM and vLLM give them: `top_k`, `thinking` (Anthropic's
extended-thinking config) at the top level, a tool message's `is_error` and an assistant
message's `thinking_blocks` (the model's earlier reasoning with its signatures, in order)."""

from __future__ import annotations

from typing import Any

from ..config import Backend
from ..errors import GatewayError, plain_word
from . import azure

JSON = dict[str, Any]

# Pivot fields every translating kind carries (or the router consumes: `stream_options`).
_COMMON = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
                     "temperature", "top_p", "stop", "tools", "tool_choice", "cache_control"})
# The pivot's own extensions (not OpenAI's schema): what an OpenAI-schema backend would get
# from an Anthropic client as a key it does not know (OpenAI refuses it; others ignore it).
EXTENSIONS = ("top_k", "thinking")
_MESSAGE_EXTENSIONS = ("is_error", "thinking_blocks")

# Top-level fields each translating kind carries whatever their value, beyond _COMMON.
_TOP: dict[str, frozenset[str]] = {
    "anthropic": _COMMON | {"top_k", "user"},  # (user: metadata.user_id)
    "bedrock": _COMMON | {"top_k", "user"},  # (user: requestMetadata)
    "gemini": _COMMON | {"top_k", "seed", "presence_penalty", "frequency_penalty", "n", "response_format"},
}
_MESSAGE: dict[str, frozenset[str]] = {
    "anthropic": frozenset(_MESSAGE_EXTENSIONS),
    "bedrock": frozenset(_MESSAGE_EXTENSIONS),
    "gemini": frozenset({"is_error"}),  # (another provider's signed reasoning means nothing to Gemini)
}
# Anthropic's service tiers, by the OpenAI value the pivot carries them as (messages.to_chat).
ANTHROPIC_TIERS = {"auto": "auto", "default": "standard_only"}
# OpenAI's reasoning efforts Claude has too (`output_config.effort`; "max" is Claude's own).
_ANTHROPIC_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})


# OpenAI's defaults of fields other kinds have no place for: sent as such (frameworks fill
# them in), they ask for nothing, so nothing is lost where they cannot go.
_ZERO = frozenset({"presence_penalty", "frequency_penalty", "top_logprobs"})
_DEFAULTS: dict[str, Any] = {"logit_bias": {}, "store": False, "modalities": ["text"], "metadata": {}}


def _default(name: str, value: Any) -> bool:
    if name in _ZERO:
        return type(value) in (int, float) and value == 0
    return name in _DEFAULTS and type(value) is type(_DEFAULTS[name]) and value == _DEFAULTS[name]


def _carried_value(name: str, value: Any, kind: str) -> bool:
    """Whether a kind carries this value of a field it carries some values of: the provider's
    default (nothing to carry), or a value it has an equivalent for."""
    if name == "n":
        return value == 1
    if name == "logprobs":
        return value is False
    if name == "parallel_tool_calls":
        return value is True or kind == "anthropic"  # (disable_parallel_tool_use)
    if name == "response_format":
        return isinstance(value, dict) and (value.get("type") == "text" or (
            kind == "anthropic" and value.get("type") == "json_schema"))  # (output_config.format)
    if name == "service_tier":  # (a caller's value: of any JSON type, hashable or not)
        return kind == "anthropic" and isinstance(value, str) and value in ANTHROPIC_TIERS
    if name == "reasoning_effort":
        return kind == "anthropic" and isinstance(value, str) and value in _ANTHROPIC_EFFORTS
    if name == "thinking":  # (Gemini: a budget, its thoughts never shown; between_tools is Claude's own)
        return kind != "gemini" or value.get("type") in ("enabled", "disabled", "adaptive") and not value.get(
            "display")
    return False


_PARTIAL = frozenset({"n", "logprobs", "parallel_tool_calls", "response_format", "service_tier", "reasoning_effort",
                      "thinking"})


def refusal(backend: Backend, body: JSON, client_paths: dict[str, str] | None = None) -> GatewayError | None:
    """The refusal for the first field of the chat pivot `body` that `backend` cannot carry,
    or None. `client_paths` (an Anthropic client's request: messages.py) names a pivot field as
    the client sent it; an OpenAI client's body goes to OpenAI-schema backends as sent."""
    kind = backend.provider.kind
    top = _TOP.get(kind)
    found: str | None = None
    if top is None:  # OpenAI-schema kinds: only the pivot's own extensions would lose their meaning
        if client_paths is not None:
            found = next((k for k in EXTENSIONS if body.get(k) is not None), None) or _message_field(
                body, frozenset())
        elif kind == "azure" and "stream_options" in body and \
                not azure.takes_stream_options(backend.provider.options["apiVersion"]):
            found = "stream_options"  # (the deployment's api-version refuses it: Azure's 400 after the reservation)
    else:
        claude = kind != "bedrock" or _claude(backend)  # Converse's Claude-only fields

        def carried(name: str, value: Any) -> bool:
            if name in EXTENSIONS and not claude:
                return False
            return name in top and name not in _PARTIAL or name in _PARTIAL and (
                name in top or _carried_value(name, value, kind)) or _default(name, value)

        found = next((k for k, v in body.items() if v is not None and not carried(k, v)), None)
        found = found or _message_field(body, _MESSAGE[kind] if claude else frozenset({"is_error"}))
    if found is None:
        return None
    if not plain_word(found.partition("[")[0]):  # (a key is caller text: named only when a plain word)
        return GatewayError("invalid_request", f"The request has a field (name not shown) that {kind} backends, "
                            "which serve this model, have no equivalent for; nothing was sent.")
    param = (client_paths or {}).get(found, found)
    claude_only = found.rpartition(".")[2] in (*EXTENSIONS, *_MESSAGE_EXTENSIONS)
    where = "Bedrock models other than Claude" if kind == "bedrock" and claude_only else f"{kind} backends"
    return GatewayError("invalid_request", f"`{param}` has no equivalent at {where}, which serve this model; "
                        "nothing was sent (leave it out, or use a model served by a provider that takes it).", param)


def claude_thinking_budget(backends: tuple[Backend, ...] | list[Backend], body: JSON) -> int | None:
    """The `thinking.budget_tokens` a Claude backend of the model would get (the Messages API or
    Converse's Claude), or None. Claude refuses a budget not below the request's `max_tokens`,
    so the router checks it against the cap it sends before reserving anything (budgets/caps.py)."""
    thinking = body.get("thinking")
    if not (isinstance(thinking, dict) and thinking.get("type") == "enabled"):
        return None
    budget = thinking.get("budget_tokens")
    if type(budget) is not int or not any(_claude(b) for b in backends):
        return None
    return budget


def _claude(backend: Backend) -> bool:
    """Whether a backend is a Claude model (Converse carries Claude's own fields only there)."""
    kind = backend.provider.kind
    return kind == "anthropic" or kind == "bedrock" and "anthropic.claude" in backend.model


def _message_field(body: JSON, carried: frozenset[str]) -> str | None:
    """The path of the first message extension (`messages[3].is_error`) the kind cannot carry."""
    for i, message in enumerate(body.get("messages") or ()):
        if isinstance(message, dict):
            for name in _MESSAGE_EXTENSIONS:
                if name not in carried and message.get(name) not in (None, False, []):
                    return f"messages[{i}].{name}"
    return None
