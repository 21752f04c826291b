"""Azure OpenAI through real Envoy, with the mock provider answering as Azure does: its
content-filter annotations (a first stream chunk of `prompt_filter_results` with empty
`choices`, `id` and `model`; `content_filter_results` on choices), api-versions older than
2024-09-01 refusing `stream_options`, and Azure's own request extensions (On Your Data)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway_extproc import tokens

from .conftest import Gateway, running_gateway

LEGACY_VERSION = "2024-06-01"  # Azure's stable api-version before 2024-10-21: no `stream_options`
HI = [{"role": "user", "content": "hello azure"}]
PRICE = {"input": 5.0, "output": 20.0}  # dollars per 1M tokens, as values-local prices azure-chat


def _legacy(values: dict[str, Any]) -> None:
    """values-local plus an Azure provider pinned to an older api-version and its model, and an
    Azure embedding model."""
    azure = next(p for p in values["providers"] if p["name"] == "mock-azure")
    values["providers"].append({**azure, "name": "mock-azure-legacy", "apiVersion": LEGACY_VERSION})
    values["models"].append({"name": "azure-legacy-chat", "tokenizer": "o200k_base", "maxOutputTokens": 1024,
                             "backends": [{"provider": "mock-azure-legacy", "model": "legacy-deployment",
                                           "pricing": PRICE, "maxTier": "internal"}]})
    values["models"].append({"name": "azure-embedding", "tokenizer": "cl100k_base", "backends": [
        {"provider": "mock-azure", "model": "embed-deployment", "pricing": {"input": 100.0, "output": 0},
         "maxTier": "internal"}]})


@pytest.fixture(scope="module")
def azure_gw() -> Iterator[Gateway]:
    with running_gateway("gw-azure-", customize=_legacy) as gw:
        yield gw


@pytest.fixture
def gw(azure_gw: Gateway) -> Gateway:
    azure_gw.reset()
    return azure_gw


def oai(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)


def reply(deployment: str, prompt: str = "hello azure") -> str:
    return f"This is a mock reply from {deployment} to: {prompt}."


def _spent(gw: Gateway) -> float:
    budgets = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {gw.key}"}).json()["budgets"]
    return next(b["spent_usd"] for b in budgets if b["level"] == "key:demo" and b["window"] == "daily")


def _settled(gw: Gateway, before: float) -> float:
    """The key's spend since `before`, once settlement (in the background) has moved it and it
    stops moving."""
    last = -1.0
    for _ in range(50):
        now = _spent(gw) - before
        if now > 0 and now == last:
            return now
        last = now
        time.sleep(0.1)
    return _spent(gw) - before


def test_an_anthropic_stream_from_azure_carries_the_answers_id_and_model(gw: Gateway) -> None:
    """Azure's first chunk is its prompt filter's verdict, with empty `choices`, `id` and
    `model`: the Messages stream's `message_start` was made from it, so an Anthropic client's
    message had id "" and model "". It now starts at the first chunk with choices."""
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    with client.messages.stream(model="azure-chat", max_tokens=60, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == reply("mock-gpt-4o-deployment")
    assert final.id.startswith("chatcmpl-mock-") and final.model == "mock-gpt-4o-deployment"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    sent = gw.received(gw.backup)[-1]
    assert sent["path"].startswith("/openai/deployments/mock-gpt-4o-deployment/chat/completions?api-version=")


def test_the_openai_sdk_reads_azure_annotated_streams_and_answers(gw: Gateway) -> None:
    """Held: the annotation chunk and `content_filter_results` pass to OpenAI clients as Azure
    sends them (the openai SDK and its stream helper read them), usage is settled."""
    client = oai(gw)
    chunks = list(client.chat.completions.create(model="azure-chat", messages=HI, stream=True))
    assert chunks[0].choices == [] and chunks[0].model_dump()["prompt_filter_results"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply("mock-gpt-4o-deployment")
    assert all(c.usage is None for c in chunks)  # the gateway's own usage chunk is not shown
    with client.chat.completions.stream(model="azure-chat", messages=HI) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == reply("mock-gpt-4o-deployment")
    answer = client.chat.completions.create(model="azure-chat", messages=HI)
    assert answer.model_dump()["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False


def test_streams_to_an_azure_api_version_without_stream_options_are_served_and_charged(gw: Gateway) -> None:
    """The gateway asks every chat stream's provider for usage (`stream_options`), and Azure
    api-versions before 2024-09-01 (2024-06-01, stable until 2024-10-21) refuse that field: every
    streamed request to such a deployment failed with the provider's 400, JSON ones worked. Such
    a backend is now sent no `stream_options`; the stream, which then ends without usage, is
    charged the prompt the gateway counted and the text generated."""
    before = _spent(gw)
    raw = oai(gw).chat.completions.with_raw_response.create(model="azure-legacy-chat", messages=HI, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == reply("legacy-deployment")
    sent = gw.received(gw.backup)[-1]
    assert sent["path"] == f"/openai/deployments/legacy-deployment/chat/completions?api-version={LEGACY_VERSION}"
    assert sent["body"]["stream"] is True and "stream_options" not in sent["body"]
    prompt = int(raw.headers["x-gateway-prompt-tokens"])
    owed = (prompt * PRICE["input"] + tokens.counter("o200k_base")(text) * PRICE["output"]) / 1e6
    assert _settled(gw, before) == pytest.approx(owed, abs=2e-6)
    # An Anthropic client's stream too; a JSON answer as before.
    claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    with claude.messages.stream(model="azure-legacy-chat", max_tokens=60, messages=HI) as stream:
        assert "".join(stream.text_stream) == reply("legacy-deployment")
    assert oai(gw).chat.completions.create(model="azure-legacy-chat", messages=HI).choices[0].message.content \
        == reply("legacy-deployment")


def test_a_callers_stream_options_to_an_older_azure_api_version_are_refused_before_any_attempt(gw: Gateway) -> None:
    """The field cannot reach that deployment with its meaning (Azure would refuse it after the
    reservation): 400 naming it, nothing sent."""
    with pytest.raises(openai.BadRequestError) as info:
        oai(gw).chat.completions.create(model="azure-legacy-chat", messages=HI, stream=True,
                                        stream_options={"include_usage": True})
    body = info.value.body
    assert body["code"] == "invalid_request" and body["param"] == "stream_options"
    assert gw.received(gw.backup) == []
    usage = [c.usage for c in oai(gw).chat.completions.create(model="azure-chat", messages=HI, stream=True,
                                                               stream_options={"include_usage": True})]
    assert usage[-1] is not None and usage[-1].completion_tokens > 0  # (a current api-version takes it)


@pytest.mark.parametrize("field", ["data_sources", "dataSources"])
def test_azure_on_your_data_is_refused_under_a_budget(gw: Gateway, field: str) -> None:
    """Azure's On Your Data (`data_sources`; `dataSources` in its older extensions API) makes
    the deployment search an index and add what it retrieved to the prompt, billed as input
    tokens the gateway never saw: the request went out reserved for its own few tokens. It is
    refused as `context_not_countable` under budgets, as web search is."""
    source = [{"type": "azure_search", "parameters": {"endpoint": "https://contoso.search.windows.net",
                                                      "index_name": "handbook",
                                                      "authentication": {"type": "system_assigned_managed_identity"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        oai(gw).chat.completions.create(model="azure-chat", messages=HI, extra_body={field: source})
    body = info.value.body
    assert body["code"] == "context_not_countable" and body["param"] == field
    assert gw.received(gw.backup) == []


def test_azure_embeddings_are_charged_their_usage_with_the_gateways_credential(gw: Gateway) -> None:
    """Held: embeddings reach the deployment's path with the gateway's `api-key` (the caller's
    `api-key` and Bearer never), and are charged the prompt tokens Azure reports."""
    before = _spent(gw)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0,
                           default_headers={"api-key": "caller-azure-secret"})
    vectors = client.embeddings.create(model="azure-embedding", input=["alpha beta", "gamma"])
    assert len(vectors.data) == 2 and vectors.usage.prompt_tokens > 0
    sent = gw.received(gw.backup)[-1]
    assert sent["path"] == "/openai/deployments/embed-deployment/embeddings?api-version=2024-10-21"
    assert sent["headers"]["api-key"] == gw.backup_key and "authorization" not in sent["headers"]
    assert _settled(gw, before) == pytest.approx(vectors.usage.prompt_tokens * 100.0 / 1e6, abs=2e-6)
    assert "caller-azure-secret" not in gw.logs() and gw.backup_key not in gw.logs()


# What OpenAI and Azure send on every answer about the calling account's own rate limits.
PROVIDER_LIMITS = {"x-ratelimit-limit-requests": "7001", "x-ratelimit-remaining-requests": "7002",
                   "x-ratelimit-reset-requests": "7003ms", "x-ratelimit-limit-tokens": "7004",
                   "x-ratelimit-remaining-tokens": "7005", "x-ratelimit-reset-tokens": "7006ms",
                   # Anthropic's (priority tier included)
                   **{f"anthropic-{kind}-{what}": f"71{i}{j}" for i, kind in enumerate(
                       ("ratelimit-requests", "ratelimit-tokens", "ratelimit-input-tokens", "ratelimit-output-tokens",
                        "priority-input-tokens", "priority-output-tokens"))
                      for j, what in enumerate(("limit", "remaining", "reset"))}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["azure-chat", "default-chat", "claude-chat"])
def test_the_providers_rate_limit_headers_about_the_gateways_account_never_reach_the_caller(
        gw: Gateway, model: str, stream: bool) -> None:
    """OpenAI, Azure and Anthropic report the calling account's rate limits on every answer: the gateway's
    account, shared by every team. Their `-requests` headers reached the caller beside the
    gateway's own `-tokens` ones (which overwrote the provider's, where token buckets apply):
    one caller read every team's load, and a client pacing itself on them paced on the wrong
    numbers. The caller now gets only the gateway's own."""
    headers = {"x-mock-response-headers": orjson.dumps(PROVIDER_LIMITS).decode()}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}", **headers},
                      json={"model": model, "messages": HI, "stream": stream}, timeout=30) as r:
        r.read()
    assert r.status_code == 200
    seen = {k: v for k, v in r.headers.items() if "ratelimit" in k or k.startswith("anthropic-priority")}
    assert not set(seen.values()) & set(PROVIDER_LIMITS.values()), seen
    assert set(seen) == {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}
