"""OpenAI Responses API (`POST /v1/responses`) through the gateway: same identity, token
accounting, budgets and fallback as chat, JSON and SSE, with the openai SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from .conftest import Gateway


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)


def test_responses_json_with_accounting_headers(gw: Gateway) -> None:
    raw = client(gw).responses.with_raw_response.create(model="default-chat", input="Summarize the quarter.",
                                                        instructions="Be brief.")
    response = raw.parse()
    assert response.output_text.startswith("This is a mock reply from mock-gpt-4o-mini")
    assert int(raw.headers["x-gateway-prompt-tokens"]) == response.usage.input_tokens
    assert int(raw.headers["x-gateway-completion-tokens"]) == response.usage.output_tokens
    assert raw.headers["x-gateway-backend"] == "mock/mock-gpt-4o-mini"
    [sent] = gw.received(gw.primary)
    assert sent["path"] == "/v1/responses" and sent["body"]["model"] == "mock-gpt-4o-mini"
    assert sent["headers"]["authorization"] == f"Bearer {gw.primary_key}"
    assert "stream_options" not in sent["body"]


def test_responses_stream_is_accounted_and_untouched(gw: Gateway) -> None:
    with client(gw).responses.stream(model="default-chat", input="Stream a short answer.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.usage.output_tokens > 0
    time.sleep(0.2)
    log = [line for line in gw.stack.log_path("extproc").read_text().splitlines()
           if '"path":"/v1/responses"' in line and '"stream":true' in line]
    assert log and f'"completion_tokens":{final.usage.output_tokens}' in log[-1]


def test_responses_fall_back_like_chat(gw: Gateway) -> None:
    httpx.post(f"{gw.primary}/_mock/behaviour", json={"model": "mock-primary", "status": 503}).raise_for_status()
    raw = client(gw).responses.with_raw_response.create(model="fallback-chat", input="hello")
    assert raw.headers["x-gateway-backend"] == "mock-backup/mock-secondary"
    [second] = gw.received(gw.backup)
    assert second["path"] == "/v1/responses" and second["body"]["model"] == "mock-secondary"


def test_responses_validation_and_budget_clamp(gw: Gateway) -> None:
    bad = httpx.post(f"{gw.url}/v1/responses", json={"model": "default-chat"},
                     headers={"authorization": f"Bearer {gw.key}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
    # $20 of output at most: more than the demo team's $5 a day, so the gateway clamps it.
    raw = client(gw).responses.with_raw_response.create(model="default-chat", input="hi", max_output_tokens=10**6)
    clamped = int(raw.headers["x-gateway-max-tokens-clamped"])
    assert 0 < clamped < 10**6 and gw.received(gw.primary)[-1]["body"]["max_output_tokens"] == clamped


@pytest.mark.parametrize(("field", "value"), [
    ("previous_response_id", "resp_0123456789"), ("conversation", "conv_0123456789"),
    ("prompt", {"id": "pmpt_0123456789", "version": "2"}),
    ("tools", [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}]),
    ("tools", [{"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example.com"}]),
    ("web_search_options", {})])
def test_input_the_provider_adds_itself_is_refused_under_a_budget(gw: Gateway, field: str, value: object) -> None:
    """The provider bills the earlier turns of a stored conversation (or a stored prompt, or
    what a hosted tool fetched) as input, but they are not in the request: the gateway could
    reserve only the new input, and a one-word follow-up to a long conversation would run far
    past its budget. Nothing leaves; function tools (run by the caller) pass."""
    before = len(gw.received(gw.primary))
    with pytest.raises(openai.BadRequestError) as info:
        if field == "web_search_options":  # (chat: search models)
            client(gw).chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "news?"}],
                                               extra_body={field: value})
        else:
            client(gw).responses.create(model="default-chat", input="and then?", extra_body={field: value})
    assert info.value.status_code == 400
    assert info.value.body["code"] == "context_not_countable" and info.value.body["param"] == field
    assert len(gw.received(gw.primary)) == before
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]
    assert client(gw).responses.create(model="default-chat", input="hi", tools=tools).status == "completed"
