from decimal import Decimal

import pytest

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
