"""The output cap every admitted request carries, so a provider cannot bill past its reservation.

A reservation covers the prompt plus a number of output tokens; it holds only if the
provider is told to stop there. So every request with an output-cap field (chat, Responses,
Messages) leaves the gateway with one: the client's own (lowered to the model's limit and
to what the budget affords), or, when the client sent none, the model's `maxOutputTokens`
(`defaultOutputTokens` for models without one), again lowered to what the budget affords.
Chat's `n` asks for that many choices of up to the cap each, so the reservation covers
`n` times the cap.

Pure functions: the router applies them to the request body it forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import GatewayError

# A client cap above this on a model without `maxOutputTokens` is lowered to it: no model
# writes a million tokens in one answer, and it keeps every worst case an exact integer
# of nano-dollars (store.MAX_NANO) at any price up to $9,000 per 1M output tokens.
OUTPUT_TOKENS_CEILING = 1_000_000


@dataclass(frozen=True, slots=True)
class OutputCap:
    """What a request may produce: `per_choice` tokens for each of `choices` choices.

    `field` is the body field the cap is written to (the client's, else the endpoint's
    first); None when the endpoint produces no output (embeddings). `client` is the cap the
    client sent, if any."""

    field: str | None
    client: int | None
    per_choice: int
    choices: int

    @property
    def wanted(self) -> int:
        """Output tokens the reservation starts from (before the budget lowers it)."""
        return self.per_choice * self.choices


def output_cap(body: dict[str, Any], fields: Sequence[str], model_max: int | None, default: int,
               choices: int = 1) -> OutputCap:
    """The cap a request asks for. `fields` are the endpoint's cap fields (validated positive
    integers by api.py), `model_max` the model's `maxOutputTokens`, `default` the budgets'
    `defaultOutputTokens`, `choices` chat's `n`."""
    if not fields:
        return OutputCap(None, None, 0, 1)
    sent = next((f for f in fields if body.get(f) is not None), None)
    client = body[sent] if sent is not None else None
    if client is not None:
        per_choice = min(client, model_max or OUTPUT_TOKENS_CEILING)
    else:
        per_choice = model_max or default
    return OutputCap(sent or fields[0], client, per_choice, choices)


def apply_cap(body: dict[str, Any], fields: Sequence[str], cap: OutputCap, granted_total: int) -> bool:
    """Write the per-choice cap the budget granted into the forwarded body (into every cap
    field the client sent, so no provider reads an older, larger one; a cap field sent as
    null is removed, since a translator reading `max_completion_tokens` first found it null
    and sent no cap at all). True if the body changed."""
    if cap.field is None:
        return False
    per_choice = granted_total // cap.choices
    changed = False
    for f in fields:
        if f in body and body[f] is None and f != cap.field:
            del body[f]
            changed = True
        elif (f == cap.field or body.get(f) is not None) and body.get(f) != per_choice:
            body[f] = per_choice
            changed = True
    return changed


def clamped(cap: OutputCap, granted_total: int) -> int | None:
    """The cap sent when it is below what the request asked for: the client's own cap, or
    when it sent none the model's limit (`x-gateway-max-tokens-clamped`)."""
    per_choice = granted_total // cap.choices
    asked = cap.client if cap.client is not None else cap.per_choice
    return per_choice if per_choice < asked else None


def check_thinking_room(cap: OutputCap, thinking_budget: int | None, model_max: int | None) -> None:
    """Refuse a Claude thinking budget not below the output cap the gateway will send (Claude
    refuses it: the caller got a 502 `provider_error` after the reservation). Checked before
    anything is reserved; the reservation then grants at least `thinking_budget + 1` output
    tokens or refuses (`BudgetGate.plan`'s `min_output`), so a budget clamp never causes it."""
    if thinking_budget is None or cap.field is None or thinking_budget < cap.per_choice:
        return
    if cap.client is not None and cap.per_choice == cap.client:
        sent = f"`{cap.field}` as sent"
    elif cap.client is not None or model_max is not None:
        sent = f"the model's output limit of {cap.per_choice} tokens, which the gateway sends"
    else:
        sent = f"the gateway's default output cap of {cap.per_choice} tokens (no `{cap.field}` was sent)"
    raise GatewayError("thinking_budget_too_large", f"`thinking.budget_tokens` must be below the output cap "
                       f"Claude gets: {sent}. Nothing was sent or charged; lower the budget or raise "
                       f"`{cap.field}`.", "thinking.budget_tokens")
