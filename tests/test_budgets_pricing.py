import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_extproc.budgets.pricing import Price, cost_nano, worst

MINI = Price.from_usd_per_million("0.15", "0.60", "0.075")
# Gemini-style: prompts above 200k tokens pay the higher tier for the whole request.
TIERED = Price.from_usd_per_million(1.25, 10, 0.3125, long_context=(200_000, Price.from_usd_per_million(2.5, 15, 0.625)))


def test_usd_per_million_becomes_exact_nano_per_token():
    assert (MINI.input, MINI.output, MINI.cached_input) == (150, 600, 75)
    assert Price.from_usd_per_million(0.15, 0.6).input == Decimal(150)  # no float residue
    assert Price.from_usd_per_million(0.01875, 1).input == Decimal("18.75")


def test_cached_input_defaults_to_input():
    assert Price.from_usd_per_million(3, 15).cached_input == 3000


def test_cost_bills_prompt_and_completion():
    assert cost_nano(MINI, 1000, 500) == 1000 * 150 + 500 * 600


def test_cached_tokens_are_part_of_the_prompt_at_the_cached_price():
    assert cost_nano(MINI, 1000, 0, cached_tokens=400) == 600 * 150 + 400 * 75


def test_cached_tokens_above_prompt_tokens_are_capped():
    assert cost_nano(MINI, 100, 0, cached_tokens=500) == 100 * 75


def test_cost_rounds_up_once_per_request():
    sub_nano = Price.from_usd_per_million("0.01875", "0.01875")
    assert cost_nano(sub_nano, 1, 0) == 19
    assert cost_nano(sub_nano, 4, 0) == 75  # exact, not 4 * 19


def test_long_context_tier_applies_to_the_whole_request_above_the_threshold():
    assert cost_nano(TIERED, 200_000, 1000) == 200_000 * 1250 + 1000 * 10_000
    assert cost_nano(TIERED, 200_001, 1000) == 200_001 * 2500 + 1000 * 15_000
    assert TIERED.for_prompt(200_001) is TIERED.long_context[1]


def test_worst_is_element_wise_max():
    a = Price.from_usd_per_million(1, 8, 0.5)
    b = Price.from_usd_per_million(2, 4, 0.25)
    assert worst([a, b]) == Price.from_usd_per_million(2, 8, 0.5)


@pytest.mark.parametrize("prompt_tokens", [0, 1000, 128_000, 128_001, 200_000, 200_001, 1_000_000])
def test_worst_with_tiers_bounds_every_backend_at_every_prompt_length(prompt_tokens):
    other = Price.from_usd_per_million(2, 12, 1, long_context=(128_000, Price.from_usd_per_million(2.2, 12, 1)))
    plain = Price.from_usd_per_million(3, 9)
    w = worst([TIERED, other, plain])
    for p in (TIERED, other, plain):
        for cached in (0, prompt_tokens // 2):
            assert cost_nano(w, prompt_tokens, 500, cached) >= cost_nano(p, prompt_tokens, 500, cached)


def test_invalid_input_is_rejected():
    with pytest.raises(ValueError):
        worst([])
    with pytest.raises(ValueError):
        Price.from_usd_per_million(-1, 1)
    with pytest.raises(ValueError):
        cost_nano(MINI, -1, 0)
    with pytest.raises(ValueError):
        Price.from_usd_per_million(1, 1, long_context=(10, TIERED))  # a tier with its own tier


# Claude Sonnet 4.5 list prices: writes 1.25x (5 minutes) and 2x (1 hour) the input price, reads 0.1x.
SONNET = Price.from_usd_per_million(3, 15, "0.30", cache_write="3.75", cache_write_1h=6)


def test_cache_writes_default_to_the_input_price():
    """As OpenAI and Gemini bill them (config.py gives Claude backends Anthropic's multipliers)."""
    assert (MINI.cache_write, MINI.cache_write_1h) == (150, 150)
    assert (SONNET.cache_write, SONNET.cache_write_1h) == (3750, 6000)


def test_cache_writes_are_part_of_the_prompt_at_their_own_prices():
    # Anthropic's bill: 100 read, 1,000 written for 5 minutes, 400 for an hour, 50 plain, 20 output.
    assert cost_nano(SONNET, 1550, 20, cached_tokens=100, cache_write_tokens=1400, cache_write_1h_tokens=400) == (
        50 * 3000 + 100 * 300 + 1000 * 3750 + 400 * 6000 + 20 * 15_000)


def test_cache_writes_above_the_prompt_are_capped_reads_first_then_1h():
    assert cost_nano(SONNET, 100, 0, cached_tokens=30, cache_write_tokens=500, cache_write_1h_tokens=50) == (
        30 * 300 + 50 * 6000 + 20 * 3750)
    assert cost_nano(SONNET, 100, 0, cache_write_tokens=10, cache_write_1h_tokens=99) == 10 * 6000 + 90 * 3000


def test_worst_takes_the_dearest_cache_writes():
    a = Price.from_usd_per_million(1, 8, cache_write=5)
    b = Price.from_usd_per_million(2, 4, cache_write_1h=3)
    w = worst([a, b])
    assert (w.cache_write, w.cache_write_1h) == (5000, 3000)  # b's unnamed 5-minute write is its input, 2


counts = st.integers(0, 2_000_000)


@given(st.sampled_from([SONNET, MINI, TIERED, Price.from_usd_per_million(1, 2, 0, cache_write=0, cache_write_1h=0)]),
       counts, counts, counts, counts, counts)
def test_cost_is_never_negative_and_never_above_every_prompt_token_at_its_dearest(price, prompt, completion, read,
                                                                                  write, write_1h):
    """Whatever a provider reports: no token is billed twice (the prompt is split, never
    added to), so the cost lies between the cheapest and the dearest price for every token."""
    cost = cost_nano(price, prompt, completion, read, write, write_1h)
    p = price.for_prompt(prompt)
    dearest = max(p.input, p.cached_input, p.cache_write, p.cache_write_1h)
    cheapest = min(p.input, p.cached_input, p.cache_write, p.cache_write_1h)
    assert prompt * cheapest + completion * p.output <= cost <= math.ceil(prompt * dearest + completion * p.output)
