"""Token prices and what a request costs, in integer nano-dollars.

Money is counted in nano-dollars (1e-9 USD) so budgets are exact integers that Redis can
INCRBY. Per-token prices are kept as `Decimal` because real price lists have sub-nano
prices ($0.01875 per 1M tokens is 18.75 nano$ per token); rounding each token would
overcharge, so a request's cost is computed exactly and rounded up once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal

_PER_MILLION_TO_NANO_PER_TOKEN = Decimal(1000)  # 1 USD / 1M tokens == 1000 nano$ / token


@dataclass(frozen=True, slots=True)
class Price:
    """Nano-dollars per token. `long_context` is `(above_prompt_tokens, Price)`: a request
    whose prompt is longer than `above_prompt_tokens` pays the tier's prices for every
    token, prompt and completion alike (how Gemini and Claude long-context pricing work)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    long_context: tuple[int, Price] | None = None

    def __post_init__(self) -> None:
        if min(self.input, self.output, self.cached_input) < 0:
            raise ValueError("prices must not be negative")
        if self.long_context is not None:
            above, tier = self.long_context
            if above < 0 or tier.long_context is not None:
                raise ValueError("long_context needs above_prompt_tokens >= 0 and a tier without its own tier")

    @classmethod
    def from_usd_per_million(
        cls,
        input: float | str | Decimal,
        output: float | str | Decimal,
        cached_input: float | str | Decimal | None = None,
        long_context: tuple[int, Price] | None = None,
    ) -> Price:
        """Build from the USD-per-1M-tokens figures price pages list. Floats go through
        `str` so 0.15 becomes exactly 150 nano$ per token, not 150.00000000000003."""
        def nano(usd: float | str | Decimal) -> Decimal:
            return Decimal(str(usd)) * _PER_MILLION_TO_NANO_PER_TOKEN

        return cls(nano(input), nano(output), nano(input if cached_input is None else cached_input), long_context)

    def for_prompt(self, prompt_tokens: int) -> Price:
        """The prices that apply to a request with this many prompt tokens."""
        if self.long_context is not None and prompt_tokens > self.long_context[0]:
            return self.long_context[1]
        return self


def cost_nano(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """What a request costs, rounded up to a whole nano-dollar.

    `cached_tokens` are part of `prompt_tokens` (OpenAI's usage shape) and billed at the
    cached price. A provider reporting more cached than prompt tokens is capped rather than
    rejected: accounting must not fail on a usage block we did not write.
    """
    if min(prompt_tokens, completion_tokens, cached_tokens) < 0:
        raise ValueError("token counts must not be negative")
    p = price.for_prompt(prompt_tokens)
    cached = min(cached_tokens, prompt_tokens)
    exact = (prompt_tokens - cached) * p.input + cached * p.cached_input + completion_tokens * p.output
    return math.ceil(exact)


def worst(prices: Iterable[Price]) -> Price:
    """Element-wise maximum: a price no backend of a model exceeds, for any prompt length.

    The router reserves at this price because Envoy may fall back to any backend. With
    long-context tiers the result starts its tier at the lowest threshold and charges the
    maximum of every price there, an upper bound for all prompt lengths.
    """
    prices = tuple(prices)
    if not prices:
        raise ValueError("worst() needs at least one price")

    def top(candidates: Iterable[Price]) -> Price:
        c = tuple(candidates)
        return Price(max(p.input for p in c), max(p.output for p in c), max(p.cached_input for p in c))

    tiers = [p.long_context for p in prices if p.long_context is not None]
    if not tiers:
        return top(prices)
    everything = [*prices, *(tier for _, tier in tiers)]
    return replace(top(prices), long_context=(min(above for above, _ in tiers), top(everything)))
