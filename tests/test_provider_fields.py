"""Which request fields each backend kind carries (providers/fields.py): everything a client
sent reaches the provider with its meaning, or the request is refused before any attempt,
naming the field (as the client wrote it) and the backend kind."""

from __future__ import annotations

from typing import Any

import pytest

from gateway_extproc.config import Backend, Provider
from gateway_extproc.errors import GatewayError
from gateway_extproc.messages import to_chat
from gateway_extproc.providers.fields import refusal


def backend(kind: str, model: str = "m") -> Backend:
    return Backend(f"p/{model}", Provider("p", kind, "https://x", "", None, None), model, 0, 1)


CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TOOL_TURN = [{"role": "user", "content": "q"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
              "thinking_blocks": [{"type": "thinking", "thinking": "hm", "signature": "c2ln"}]},
             {"role": "tool", "tool_call_id": "t", "content": "x", "is_error": True}]


@pytest.mark.parametrize(("kind", "change", "param"), [
    # OpenAI clients (the reverse direction): OpenAI fields a translating backend has no place for.
    ("anthropic", {"reasoning_effort": "minimal"}, "reasoning_effort"),
    ("bedrock", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("gemini", {"thinking": {"type": "between_tools"}}, "thinking"),
    ("gemini", {"thinking": {"type": "adaptive", "display": "summarized"}}, "thinking"),
    ("anthropic", {"logprobs": True}, "logprobs"),
    ("anthropic", {"top_logprobs": 3}, "top_logprobs"),
    ("anthropic", {"n": 2}, "n"),
    ("anthropic", {"seed": 1}, "seed"),
    ("anthropic", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("anthropic", {"presence_penalty": 0.5}, "presence_penalty"),
    ("anthropic", {"response_format": {"type": "json_object"}}, "response_format"),
    ("anthropic", {"service_tier": "flex"}, "service_tier"),
    ("anthropic", {"modalities": ["audio"]}, "modalities"),
    ("bedrock", {"seed": 1}, "seed"),
    ("bedrock", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ("bedrock", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("bedrock", {"service_tier": "default"}, "service_tier"),
    ("gemini", {"user": "u"}, "user"),
    ("gemini", {"logprobs": True}, "logprobs"),
    ("gemini", {"messages": TOOL_TURN}, "messages[1].thinking_blocks"),
])
def test_a_field_the_backend_cannot_carry_is_refused(kind: str, change: dict[str, Any], param: str) -> None:
    error = refusal(backend(kind), {**CHAT, **change})
    assert error is not None and (error.code, error.status, error.param) == ("invalid_request", 400, param)
    assert f"`{param}`" in error.message and f"{kind} backends" in error.message


@pytest.mark.parametrize(("kind", "change"), [
    ("anthropic", {"n": 1, "logprobs": False, "reasoning_effort": "high", "parallel_tool_calls": False, "service_tier": "auto",
                   "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}, "seed": None,
                   "top_k": 3, "thinking": {"type": "disabled"}, "messages": TOOL_TURN, "user": "u"}),
    ("bedrock", {"n": 1, "response_format": {"type": "text"}, "parallel_tool_calls": True, "user": "u",
                 "messages": TOOL_TURN, "top_k": 3, "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ("gemini", {"n": 2, "seed": 4, "presence_penalty": 1, "top_k": 3, "response_format": {"type": "json_object"},
                "thinking": {"type": "adaptive"}, "messages": [TOOL_TURN[0], {**TOOL_TURN[1], "thinking_blocks": None},
                                                              TOOL_TURN[2]]}),
    ("openai", {"reasoning_effort": "high", "top_k": 3, "logprobs": True, "messages": TOOL_TURN}),  # as sent
])
def test_what_a_backend_carries_passes(kind: str, change: dict[str, Any]) -> None:
    assert refusal(backend(kind, "anthropic.claude-x" if kind == "bedrock" else "m"), {**CHAT, **change}) is None


# What OpenAI frameworks fill in when the caller set nothing: asks for nothing, so passes.
_OPENAI_DEFAULTS = {"presence_penalty": 0, "frequency_penalty": 0.0, "top_logprobs": 0, "logit_bias": {},
                    "store": False, "modalities": ["text"], "metadata": {}, "n": 1, "logprobs": False,
                    "parallel_tool_calls": True}


@pytest.mark.parametrize("kind", ["anthropic", "bedrock", "gemini"])
def test_openai_defaults_pass_and_anything_else_in_them_is_refused(kind: str) -> None:
    model = "anthropic.claude-x" if kind == "bedrock" else "m"
    assert refusal(backend(kind, model), {**CHAT, **_OPENAI_DEFAULTS}) is None
    for name, value in {"presence_penalty": 0.5, "logit_bias": {"50256": -100}, "store": True,
                        "modalities": ["text", "audio"], "metadata": {"k": "v"}, "top_logprobs": 2,
                        "frequency_penalty": False}.items():
        if kind == "gemini" and name in ("presence_penalty", "frequency_penalty"):
            continue  # (Gemini has penalties)
        error = refusal(backend(kind, model), {**CHAT, name: value})
        assert error is not None and f"`{name}`" in error.message, (kind, name)


def test_claude_fields_on_bedrock_go_to_claude_models_only() -> None:
    error = refusal(backend("bedrock", "amazon.nova-pro-v1:0"), {**CHAT, "top_k": 3})
    assert error is not None and error.param == "top_k" and "Bedrock models other than Claude" in error.message
    error = refusal(backend("bedrock", "amazon.nova-pro-v1:0"), {**CHAT, "messages": TOOL_TURN})
    assert error is not None and error.param == "messages[1].thinking_blocks"


@pytest.mark.parametrize(("kind", "change", "param"), [
    ("openai", {"top_k": 5}, "top_k"),
    ("azure", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ("openai", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "x", "is_error": True}]}]},
     "messages.2.content.0.is_error"),
    ("gemini", {"metadata": {"user_id": "u"}}, "metadata.user_id"),
    ("bedrock", {"service_tier": "auto"}, "service_tier"),
    ("bedrock", {"output_config": {"format": {"type": "json_schema", "schema": {}}}}, "output_config.format"),
    ("bedrock", {"output_config": {"effort": "high"}}, "output_config.effort"),
    ("gemini", {"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {
        "type": "auto", "disable_parallel_tool_use": True}}, "tool_choice.disable_parallel_tool_use"),
])
def test_an_anthropic_client_is_told_its_own_path(kind: str, change: dict[str, Any], param: str) -> None:
    paths: dict[str, str] = {}
    chat = to_chat({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **change}, paths)
    error = refusal(backend(kind), chat, paths)
    assert error is not None and error.param == param and f"`{param}`" in error.message


def test_an_anthropic_client_reaches_an_openai_backend_with_what_it_carries() -> None:
    paths: dict[str, str] = {}
    chat = to_chat({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                    "service_tier": "standard_only", "metadata": {"user_id": "u"}}, paths)
    assert refusal(backend("openai"), chat, paths) is None and chat["service_tier"] == "default"


def test_an_unknown_field_is_named_only_when_it_is_a_plain_word() -> None:
    """A key is caller text (a pasted key may land there): not quoted back unless a plain word."""
    error = refusal(backend("anthropic"), {**CHAT, "sk-ant-api03-Secret": 1})
    assert error is not None and error.param is None and "sk-ant" not in error.message
    with pytest.raises(GatewayError) as info:
        to_chat({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                 "metadata": {"user_id": "u", "sk-ant-api03-Secret": 1}})
    assert info.value.param == "metadata" and "sk-ant" not in info.value.message


@pytest.mark.parametrize("name", ["reasoning_effort", "service_tier", "response_format", "n", "logprobs",
                                  "parallel_tool_calls", "presence_penalty", "logit_bias", "top_logprobs"])
@pytest.mark.parametrize("value", [[], {}, ["high"], {"a": 1}, 3.5, "x"])
def test_a_field_of_any_json_type_is_refused_or_carried_never_raises(name: str, value: Any) -> None:
    """`reasoning_effort: []` towards Claude raised TypeError (unhashable) in the check: a 500."""
    for kind in ("anthropic", "bedrock", "gemini"):
        error = refusal(backend(kind, "anthropic.claude-x" if kind == "bedrock" else "m"), {**CHAT, name: value})
        assert error is None or f"`{name}`" in error.message


def _azure(api_version: str) -> Backend:
    return Backend("p/d", Provider("p", "azure", "https://x", "", None, None, options={"apiVersion": api_version}),
                   "d", 0, 1)


@pytest.mark.parametrize("version", ["2024-06-01", "2024-08-01-preview", "2023-05-15"])
def test_a_callers_stream_options_are_refused_for_an_azure_api_version_that_refuses_them(version: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "stream_options": {"include_usage": True}}
    found = refusal(_azure(version), body)
    assert found is not None and (found.code, found.param) == ("invalid_request", "stream_options")
    assert refusal(_azure(version), {k: v for k, v in body.items() if k != "stream_options"}) is None


@pytest.mark.parametrize("version", ["2024-09-01-preview", "2024-10-21", "2025-04-01-preview", "preview", "latest"])
def test_stream_options_pass_to_azure_api_versions_that_take_them(version: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "stream_options": {"include_usage": True}}
    assert refusal(_azure(version), body) is None
