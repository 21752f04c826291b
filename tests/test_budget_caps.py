"""The output cap every admitted request carries (budgets/caps.py), as pure functions."""

from __future__ import annotations

import pytest

from gateway_extproc.budgets.caps import OUTPUT_TOKENS_CEILING, apply_cap, clamped, output_cap
from gateway_extproc.budgets.store import MAX_NANO

CHAT = ("max_completion_tokens", "max_tokens")


@pytest.mark.parametrize(("body", "model_max", "field", "client", "per_choice"), [
    ({}, 1024, "max_completion_tokens", None, 1024),  # none sent: the model's limit
    ({}, None, "max_completion_tokens", None, 4096),  # ... or the default
    ({"max_tokens": 50}, 1024, "max_tokens", 50, 50),
    ({"max_tokens": 10**12}, 1024, "max_tokens", 10**12, 1024),  # lowered to the model's limit
    ({"max_tokens": 10**12}, None, "max_tokens", 10**12, OUTPUT_TOKENS_CEILING),
    ({"max_completion_tokens": 30, "max_tokens": 900}, None, "max_completion_tokens", 30, 30),
    ({"max_tokens": None}, 1024, "max_completion_tokens", None, 1024),
])
def test_the_cap_a_request_asks_for(body, model_max, field, client, per_choice) -> None:
    cap = output_cap(body, CHAT, model_max, 4096)
    assert (cap.field, cap.client, cap.per_choice, cap.wanted) == (field, client, per_choice, per_choice)


def test_choices_multiply_what_is_reserved_and_divide_what_is_granted() -> None:
    cap = output_cap({"max_tokens": 100}, CHAT, None, 4096, choices=3)
    assert cap.wanted == 300
    body = {"max_tokens": 100}
    assert apply_cap(body, CHAT, cap, 200) and body == {"max_tokens": 66}
    assert clamped(cap, 200) == 66
    assert clamped(cap, 300) is None


def test_a_gateway_set_cap_below_the_models_limit_is_reported_as_clamped() -> None:
    cap = output_cap({}, CHAT, 1024, 4096)
    assert clamped(cap, 500) == 500 and clamped(cap, 1024) is None


def test_the_granted_cap_is_written_to_every_field_the_client_sent() -> None:
    body = {"max_completion_tokens": 500, "max_tokens": 700}
    cap = output_cap(body, CHAT, None, 4096)
    apply_cap(body, CHAT, cap, 120)
    assert body == {"max_completion_tokens": 120, "max_tokens": 120}


def test_an_unchanged_body_is_reported_as_such() -> None:
    body = {"max_tokens": 64}
    assert not apply_cap(body, CHAT, output_cap(body, CHAT, 1024, 4096), 64)
    assert not apply_cap({}, (), output_cap({}, (), None, 4096), 0)  # embeddings: no output


def test_the_ceiling_keeps_every_worst_case_exact() -> None:
    # $9,000 per 1M output tokens = 9,000,000 nano$ per token
    assert OUTPUT_TOKENS_CEILING * 9_000_000 < MAX_NANO


@pytest.mark.parametrize("kind", ["gemini", "bedrock"])
def test_a_cap_field_sent_as_null_never_leaves_a_translated_request_uncapped(kind: str) -> None:
    """`"max_completion_tokens": null, "max_tokens": 20`: the gateway reserved for 20, the
    Gemini and Bedrock translators read the null first and sent no cap (20,000 tokens against
    a $0.001 budget)."""
    from gateway_extproc.providers import bedrock, gemini
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": None,
            "max_tokens": 20}
    fields = ("max_completion_tokens", "max_tokens")
    cap = output_cap(body, fields, 4096, 1024)
    assert cap.per_choice == 20
    assert apply_cap(body, fields, cap, 20) and body == {"model": "m", "messages": body["messages"], "max_tokens": 20}
    body["max_completion_tokens"] = None  # and a translator reading it directly (not through apply_cap)
    read = {"gemini": lambda b: gemini._generation_config(b)["maxOutputTokens"],
            "bedrock": lambda b: bedrock._body(b)["inferenceConfig"]["maxTokens"]}[kind]
    assert read(body) == 20


@pytest.mark.parametrize(("body", "model_max", "budget", "says"), [
    ({"max_tokens": 600}, 1024, 600, "`max_tokens` as sent"),
    ({"max_tokens": 2000}, 1024, 1500, "the model's output limit of 1024 tokens"),
    ({}, 1024, 1024, "the model's output limit of 1024 tokens"),
    ({}, None, 5000, "the gateway's default output cap of 4096 tokens"),
])
def test_a_thinking_budget_not_below_the_cap_sent_is_refused(body, model_max, budget, says) -> None:
    """Claude refuses budget_tokens >= max_tokens: the gateway refuses it first, naming the cap."""
    from gateway_extproc.budgets.caps import check_thinking_room
    from gateway_extproc.errors import GatewayError
    with pytest.raises(GatewayError) as info:
        check_thinking_room(output_cap(body, CHAT, model_max, 4096), budget, model_max)
    assert (info.value.code, info.value.status, info.value.param) == (
        "thinking_budget_too_large", 400, "thinking.budget_tokens")
    assert says in info.value.message


def test_a_thinking_budget_below_the_cap_sent_passes() -> None:
    from gateway_extproc.budgets.caps import check_thinking_room
    check_thinking_room(output_cap({"max_tokens": 2000}, CHAT, 1024, 4096), 1023, 1024)
    check_thinking_room(output_cap({"max_tokens": 2000}, CHAT, 1024, 4096), None, 1024)
