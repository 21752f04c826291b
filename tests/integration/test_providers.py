"""Every provider kind through real Envoy: each attempt translated by the upstream ext_proc
for the backend Envoy picked (Anthropic, Bedrock with SigV4, Gemini, Azure), answers turned
back into the OpenAI schema, and Anthropic-style clients (`POST /v1/messages`) served by
any backend. The mock provider plays each provider's wire API."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from unittest import mock

import anthropic
import httpx
import openai
import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .conftest import BEDROCK_KEY_ID, Gateway

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


def oai(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)


def claude(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def only_request(gw: Gateway, mock_url: str) -> dict[str, Any]:
    [req] = gw.received(mock_url)
    return req


def reply(model: str, prompt: str = "hello") -> str:
    return f"This is a mock reply from {model} to: {prompt}."


# -- OpenAI clients, Anthropic backend --------------------------------------------------


def test_openai_sdk_to_anthropic_backend(gw: Gateway) -> None:
    raw = oai(gw).chat.completions.with_raw_response.create(model="claude-chat", messages=HELLO, max_tokens=50)
    done = raw.parse()
    assert done.choices[0].message.content == reply("claude-mock-sonnet")
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    assert raw.headers["x-gateway-backend"] == "mock-anthropic/claude-mock-sonnet"
    assert raw.headers["x-gateway-completion-tokens"] == str(done.usage.completion_tokens)
    sent = only_request(gw, gw.backup)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == gw.backup_key and "authorization" not in sent["headers"]
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"] == {"model": "claude-mock-sonnet", "system": "Be brief.", "max_tokens": 50,
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}


def test_openai_sdk_streams_from_anthropic_backend(gw: Gateway) -> None:
    chunks = list(oai(gw).chat.completions.create(model="claude-chat", messages=HELLO, stream=True,
                                                  stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply("claude-mock-sonnet")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert only_request(gw, gw.backup)["body"]["stream"] is True


def test_provider_errors_arrive_in_the_openai_shape(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai(gw).chat.completions.create(model="claude-chat", messages=HELLO, extra_headers={"x-mock-status": "400"})
    assert info.value.status_code == 400
    assert info.value.body["code"] == "provider_error" and info.value.body["type"] == "invalid_request_error"


def test_endpoints_a_provider_lacks_are_refused_up_front(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai(gw).embeddings.create(model="claude-chat", input="hello")
    assert info.value.body["code"] == "unsupported_endpoint"
    assert gw.received(gw.backup) == []


# -- fallback across providers: Anthropic down, Bedrock (SigV4) answers ----------------


def assert_sigv4(gw: Gateway, sent: dict[str, Any]) -> None:
    """botocore, AWS's own signer, signs the same request to the same signature."""
    headers = sent["headers"]
    when = datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    oracle = AWSRequest("POST", f"{gw.backup}{sent['path']}", data=orjson.dumps(sent["body"]),
                        headers={"content-type": headers["content-type"]})
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        SigV4Auth(Credentials(BEDROCK_KEY_ID, gw.backup_key), "bedrock", "us-east-1").add_auth(oracle)
    assert headers["authorization"] == oracle.headers["Authorization"]
    assert gw.backup_key not in headers["authorization"]


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_down_falls_back_to_bedrock_signed_with_sigv4(gw: Gateway, stream: bool) -> None:
    httpx.post(f"{gw.backup}/_mock/behaviour", json={"model": "claude-mock-sonnet", "status": 529}).raise_for_status()
    bedrock_model = "anthropic.claude-mock-sonnet-v1:0"
    if stream:
        with oai(gw).chat.completions.with_streaming_response.create(
                model="claude-chat", messages=HELLO, stream=True) as raw:
            backend, attempts = raw.headers["x-gateway-backend"], raw.headers["x-gateway-attempts"]
            chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        raw = oai(gw).chat.completions.with_raw_response.create(model="claude-chat", messages=HELLO)
        backend, attempts = raw.headers["x-gateway-backend"], raw.headers["x-gateway-attempts"]
        text = raw.parse().choices[0].message.content
    assert text == reply(bedrock_model)
    assert (backend, attempts) == (f"mock-bedrock/{bedrock_model}", "2")
    first, second = gw.received(gw.backup)
    assert first["path"] == "/v1/messages"
    suffix = "converse-stream" if stream else "converse"
    assert second["path"] == f"/model/anthropic.claude-mock-sonnet-v1%3A0/{suffix}"
    assert second["body"]["system"] == [{"text": "Be brief."}]
    assert second["body"]["messages"] == [{"role": "user", "content": [{"text": "hello"}]}]
    assert_sigv4(gw, second)


# -- Gemini and Azure --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_backend(gw: Gateway, stream: bool) -> None:
    if stream:
        chunks = list(oai(gw).chat.completions.create(model="gemini-chat", messages=HELLO, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in chunks)
    else:
        done = oai(gw).chat.completions.create(model="gemini-chat", messages=HELLO)
        text = done.choices[0].message.content
        assert done.usage is not None and done.usage.prompt_tokens > 0
    assert text == reply("gemini-mock-flash")
    sent = only_request(gw, gw.backup)
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    assert sent["path"] == f"/v1beta/models/gemini-mock-flash:{action}"
    assert sent["headers"]["x-goog-api-key"] == gw.backup_key and "authorization" not in sent["headers"]
    assert sent["body"]["systemInstruction"] == {"parts": [{"text": "Be brief."}]}


def test_azure_backend(gw: Gateway) -> None:
    raw = oai(gw).chat.completions.with_raw_response.create(model="azure-chat", messages=HELLO)
    assert raw.parse().choices[0].message.content == reply("mock-gpt-4o-deployment")
    sent = only_request(gw, gw.backup)
    assert sent["path"] == "/openai/deployments/mock-gpt-4o-deployment/chat/completions?api-version=2024-10-21"
    assert sent["headers"]["api-key"] == gw.backup_key and "authorization" not in sent["headers"]


# -- Anthropic clients -------------------------------------------------------------------


@pytest.mark.parametrize(("model", "backend_model", "mock_attr"), [
    ("default-chat", "mock-gpt-4o-mini", "primary"),  # OpenAI backend
    ("claude-chat", "claude-mock-sonnet", "backup"),  # Anthropic backend, through the OpenAI pivot
    ("gemini-chat", "gemini-mock-flash", "backup"),
])
def test_anthropic_sdk_against_any_backend(gw: Gateway, model: str, backend_model: str, mock_attr: str) -> None:
    msg = claude(gw).messages.create(model=model, max_tokens=60, system="Be brief.",
                                     messages=[{"role": "user", "content": "hello"}])
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == reply(backend_model)
    assert msg.stop_reason == "end_turn" and msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    with claude(gw).messages.stream(model=model, max_tokens=60,
                                    messages=[{"role": "user", "content": "hello"}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == reply(backend_model)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    sent = gw.received(getattr(gw, mock_attr))
    assert len(sent) == 2 and all(gw.key not in orjson.dumps(s["headers"]).decode() for s in sent)


def test_anthropic_sdk_reaches_an_openai_backend_as_chat(gw: Gateway) -> None:
    claude(gw).messages.create(model="default-chat", max_tokens=60, system="Be brief.",
                               messages=[{"role": "user", "content": "hello"}])
    sent = only_request(gw, gw.primary)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {gw.primary_key}"
    assert sent["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "hello"}]
    assert sent["body"]["max_tokens"] == 60 and sent["body"]["model"] == "mock-gpt-4o-mini"


def test_anthropic_sdk_bad_request_is_a_clear_400(gw: Gateway) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(gw).messages.create(model="default-chat", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 400
    assert info.value.body["error"]["code"] == "invalid_request"
    assert gw.received(gw.primary) == []
