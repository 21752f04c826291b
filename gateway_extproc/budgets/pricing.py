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
# Anthropic's prices for prompt-cache writes, as multiples of the input price (5-minute and
# 1-hour TTL; Bedrock bills Claude the same): the defaults of Claude backends (config.py).
CACHE_WRITE_FACTOR, CACHE_WRITE_1H_FACTOR = Decimal("1.25"), Decimal(2)


@dataclass(frozen=True, slots=True)
class Price:
    """Nano-dollars per token. `long_context` is `(above_prompt_tokens, Price)`: a request
    whose prompt is longer than `above_prompt_tokens` pays the tier's prices for every
    token, prompt and completion alike (how Gemini and Claude long-context pricing work).
    `cache_write` / `cache_write_1h`: prompt tokens the provider wrote to its prompt cache
    with a 5-minute / 1-hour lifetime (Anthropic bills them above the input price)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    long_context: tuple[int, Price] | None = None

    def __post_init__(self) -> None:
        if min(self.input, self.output, self.cached_input, self.cache_write, self.cache_write_1h) < 0:
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
        cache_write: float | str | Decimal | None = None,
        cache_write_1h: float | str | Decimal | None = None,
    ) -> Price:
        """Build from the USD-per-1M-tokens figures price pages list. Floats go through
        `str` so 0.15 becomes exactly 150 nano$ per token, not 150.00000000000003. Unnamed,
        cached input and cache writes cost the input price."""
        def nano(usd: float | str | Decimal) -> Decimal:
            return Decimal(str(usd)) * _PER_MILLION_TO_NANO_PER_TOKEN

        base = nano(input)
        return cls(base, nano(output), base if cached_input is None else nano(cached_input),
                   base if cache_write is None else nano(cache_write),
                   base if cache_write_1h is None else nano(cache_write_1h), long_context)

    def for_prompt(self, prompt_tokens: int) -> Price:
        """The prices that apply to a request with this many prompt tokens."""
        if self.long_context is not None and prompt_tokens > self.long_context[0]:
            return self.long_context[1]
        return self


def cost_nano(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
              cache_write_tokens: int = 0, cache_write_1h_tokens: int = 0) -> int:
    """What a request costs, rounded up to a whole nano-dollar.

    `cached_tokens` (cache reads) and `cache_write_tokens` (cache writes, of which
    `cache_write_1h_tokens` had the 1-hour lifetime) are part of `prompt_tokens` (OpenAI's
    usage shape) and billed at their own prices; the rest of the prompt at the input price.
    A provider reporting more of them than prompt tokens is capped rather than rejected
    (reads first, then 1-hour writes, then the other writes): accounting must not fail on a
    usage block we did not write.
    """
    if min(prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens) < 0:
        raise ValueError("token counts must not be negative")
    p = price.for_prompt(prompt_tokens)
    cached = min(cached_tokens, prompt_tokens)
    long_writes = min(cache_write_1h_tokens, cache_write_tokens, prompt_tokens - cached)
    writes = min(cache_write_tokens - long_writes, prompt_tokens - cached - long_writes)
    exact = ((prompt_tokens - cached - long_writes - writes) * p.input + cached * p.cached_input
             + writes * p.cache_write + long_writes * p.cache_write_1h + completion_tokens * p.output)
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
        return Price(max(p.input for p in c), max(p.output for p in c), max(p.cached_input for p in c),
                     max(p.cache_write for p in c), max(p.cache_write_1h for p in c))

    tiers = [p.long_context for p in prices if p.long_context is not None]
    if not tiers:
        return top(prices)
    everything = [*prices, *(tier for _, tier in tiers)]
    return replace(top(prices), long_context=(min(above for above, _ in tiers), top(everything)))
