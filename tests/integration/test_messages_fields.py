"""Every field an Anthropic client sends to `POST /v1/messages` reaches the provider with its
meaning or is refused by name, through real Envoy with the anthropic SDK (and the reverse:
the openai SDK to a Claude-backed model); the mock provider records what it received, and
checks thinking signatures on the next turn as Claude does."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from gateway_extproc.mock_provider import MOCK_SIGNATURE, MOCK_THINKING

from .conftest import Gateway

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
THINK = {"type": "enabled", "budget_tokens": 512}


def claude(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def first_turn(gw: Gateway, stream: bool) -> anthropic.types.Message:
    args: dict[str, Any] = dict(model="claude-chat", max_tokens=1000, thinking=THINK, tools=[WEATHER],
                                metadata={"user_id": "user-7"},
                                messages=[{"role": "user", "content": "weather in Paris?"}],
                                extra_body={"top_k": 5})  # (this SDK release has no top_k argument)
    if not stream:
        return claude(gw).messages.create(**args)
    with claude(gw).messages.stream(**args) as events:
        return events.get_final_message()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_thinking_tool_loop_reaches_claude_with_every_field(gw: Gateway, stream: bool) -> None:
    """Before 2026-12: top_k, thinking and is_error never reached Claude, and
    its thinking blocks (and the signatures the next turn must carry) never reached the client."""
    answer = first_turn(gw, stream)
    thinking, call = answer.content
    assert thinking.type == "thinking" and (thinking.thinking, thinking.signature) == (MOCK_THINKING, MOCK_SIGNATURE)
    assert call.type == "tool_use" and answer.stop_reason == "tool_use"
    [sent] = gw.received(gw.backup)
    assert {k: sent["body"].get(k) for k in ("top_k", "thinking", "metadata")} == {
        "top_k": 5, "thinking": THINK, "metadata": {"user_id": "user-7"}}
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in answer.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "city not found", "is_error": True}]}]
    final = claude(gw).messages.create(model="claude-chat", max_tokens=1000, thinking=THINK, tools=[WEATHER],
                                       messages=history)  # the mock refuses a turn without its signed block
    assert final.stop_reason == "end_turn" and final.content[0].type == "thinking"
    second = gw.received(gw.backup)[1]["body"]["messages"]
    assert second[1]["content"][0] == {"type": "thinking", "thinking": MOCK_THINKING, "signature": MOCK_SIGNATURE}
    assert second[2]["content"][0]["is_error"] is True


@pytest.mark.parametrize(("model", "extra", "param", "kind"), [
    ("default-chat", {"top_k": 5}, "top_k", "openai"),
    ("default-chat", {"thinking": THINK}, "thinking", "openai"),
    ("gemini-chat", {"metadata": {"user_id": "u"}}, "metadata.user_id", "gemini"),
    ("gemini-chat", {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": MOCK_THINKING, "signature": MOCK_SIGNATURE},
                                          {"type": "text", "text": "a"}]},
        {"role": "user", "content": "more"}]}, "messages.1.content.0", "gemini"),
    ("claude-chat", {"container": "container_1"}, "container", None),
    # claude-chat falls back to Bedrock (Converse), which has no service tier to send it as
    ("claude-chat", {"service_tier": "standard_only"}, "service_tier", "bedrock"),
    ("claude-chat", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "q", "citations": [{"type": "char_location"}]}]}]}, "messages.0.content.0.citations",
     None),
])
def test_a_field_a_backend_cannot_carry_is_a_400_naming_it(gw: Gateway, model: str, extra: dict[str, Any],
                                                           param: str, kind: str | None) -> None:
    args: dict[str, Any] = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(gw).messages.create(**{k: v for k, v in args.items() if k in ("model", "max_tokens", "messages")},
                                   extra_body={k: v for k, v in args.items()
                                               if k not in ("model", "max_tokens", "messages")})
    error = info.value.body["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param) and f"`{param}`" in error["message"] \
        or error["message"].startswith(f"{param}: ")
    if kind is not None:
        assert f"{kind} backends" in error["message"]
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []


@pytest.mark.parametrize(("extra", "param", "kind"), [
    ({"seed": 7}, "seed", "anthropic"), ({"logprobs": True}, "logprobs", "anthropic"),
    ({"reasoning_effort": "minimal"}, "reasoning_effort", "anthropic"), ({"n": 2}, "n", "anthropic"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "anthropic"),
    ({"response_format": {"type": "json_object"}}, "response_format", "anthropic"),
    # Claude takes these (output_config), its Bedrock fallback does not: a fallback would drop them
    ({"reasoning_effort": "high"}, "reasoning_effort", "bedrock"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
     "response_format", "bedrock")])
def test_openai_fields_a_claude_model_has_no_place_for_are_refused(gw: Gateway, extra: dict[str, Any], param: str,
                                                                    kind: str) -> None:
    """Before 2026-12 each was dropped on the way to Claude (and Bedrock), the answer as if
    never asked."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="claude-chat", messages=[{"role": "user", "content": "hi"}],
                                       extra_body=extra)
    assert info.value.body["param"] == param and f"{kind} backends" in info.value.body["message"]
    assert gw.received(gw.backup) == []


def test_openai_thinking_and_top_k_reach_claude(gw: Gateway) -> None:
    """LiteLLM's names for Claude's own fields, from an OpenAI client: carried, and the answer's
    thinking comes back as reasoning_content with its signed block."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    done = client.chat.completions.create(model="claude-chat", max_tokens=1000,
                                          messages=[{"role": "user", "content": "hi"}],
                                          extra_body={"thinking": THINK, "top_k": 3})
    message = done.model_dump()["choices"][0]["message"]
    assert message["reasoning_content"] == MOCK_THINKING
    assert message["thinking_blocks"] == [{"type": "thinking", "thinking": MOCK_THINKING, "signature": MOCK_SIGNATURE}]
    [sent] = gw.received(gw.backup)
    assert sent["body"]["thinking"] == THINK and sent["body"]["top_k"] == 3


def demo_spent(gw: Gateway) -> float:
    """What the demo key has spent today (the memory store settles after the answer)."""
    import time

    import httpx
    time.sleep(0.3)
    levels = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {gw.key}"}).json()["budgets"]
    return next(b["spent_usd"] for b in levels if b["level"] == "key:demo" and b["window"] == "daily")


@pytest.mark.parametrize(("client", "max_tokens", "budget"), [
    ("anthropic", 600, 600),  # a budget equal to max_tokens
    ("anthropic", 2000, 1500),  # under the client's max_tokens, over the model's 1024 the gateway sends
    ("openai", None, 1024),  # no cap sent: the gateway sends the model's 1024
])
def test_a_thinking_budget_at_or_over_the_cap_sent_is_a_400_before_any_charge(
        gw: Gateway, client: str, max_tokens: int | None, budget: int) -> None:
    """Before 2026-12-05 Claude refused it after the reservation: a 502 provider_error."""
    before = demo_spent(gw)
    think = {"type": "enabled", "budget_tokens": budget}
    hi = [{"role": "user", "content": "hi"}]
    if client == "anthropic":
        with pytest.raises(anthropic.BadRequestError) as info:
            claude(gw).messages.create(model="claude-chat", max_tokens=max_tokens, thinking=think, messages=hi)
        error = info.value.body["error"]
    else:
        with pytest.raises(openai.BadRequestError) as oinfo:
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0).chat.completions.create(
                model="claude-chat", messages=hi, extra_body={"thinking": think})
        error = oinfo.value.body
    assert (error["code"], error["param"], error["type"]) == (
        "thinking_budget_too_large", "thinking.budget_tokens", "invalid_request_error")
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []
    assert demo_spent(gw) == before
