"""Every stop reason crosses the Messages <-> Chat pivot as the client's API says it, in JSON
and in streams, through real Envoy with the anthropic and openai SDKs; the mock provider
plays the backend and ends its answer as `x-mock-stop-reason` asks."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from .conftest import Gateway

STOP = "###"
HI = [{"role": "user", "content": "hi"}]
# Claude's stop reason -> what an OpenAI client reads
CLAUDE_TO_OPENAI = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                    "model_context_window_exceeded": "length", "refusal": "content_filter"}
# An OpenAI backend's finish reason (stop_sequence: "stop" with vLLM's matched `stop_reason`) -> Anthropic's
OPENAI_TO_CLAUDE = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens",
                    "content_filter": "refusal"}


def ask_claude(gw: Gateway, model: str, reason: str, stream: bool) -> tuple[Any, Any]:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    args: dict[str, Any] = dict(model=model, max_tokens=200, stop_sequences=[STOP], messages=HI,
                                extra_headers={"x-mock-stop-reason": reason})
    if not stream:
        answer = client.messages.create(**args)
        return answer.stop_reason, answer.stop_sequence
    with client.messages.stream(**args) as events:
        answer = events.get_final_message()
    return answer.stop_reason, answer.stop_sequence


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("reason", sorted(CLAUDE_TO_OPENAI))
def test_an_anthropic_client_gets_claudes_stop_reason_back(gw: Gateway, reason: str, stream: bool) -> None:
    """Before 2026-12-05 stop_sequence and pause_turn came back as end_turn, and
    model_context_window_exceeded as max_tokens; stop_sequence was always null."""
    assert ask_claude(gw, "claude-chat", reason, stream) == (reason, STOP if reason == "stop_sequence" else None)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("reason", sorted(OPENAI_TO_CLAUDE))
def test_an_anthropic_client_on_an_openai_backend_gets_the_matching_stop_reason(gw: Gateway, reason: str,
                                                                                 stream: bool) -> None:
    expected = OPENAI_TO_CLAUDE[reason]
    assert ask_claude(gw, "default-chat", reason, stream) == (expected, STOP if expected == "stop_sequence" else None)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("reason", sorted(CLAUDE_TO_OPENAI))
def test_an_openai_client_on_claude_gets_the_matching_finish_reason(gw: Gateway, reason: str, stream: bool) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    args: dict[str, Any] = dict(model="claude-chat", max_tokens=200, stop=[STOP], messages=HI,
                                extra_headers={"x-mock-stop-reason": reason})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **args))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [CLAUDE_TO_OPENAI[reason]]
    else:
        assert client.chat.completions.create(**args).choices[0].finish_reason == CLAUDE_TO_OPENAI[reason]
