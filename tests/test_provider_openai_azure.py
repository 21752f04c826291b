"""Golden tests for the OpenAI(-compatible) and Azure OpenAI translators: the request each
backend documents (path, credential header, body), and the identity response path."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway_extproc.errors import GatewayError
from gateway_extproc.providers import azure, openai
from gateway_extproc.providers.base import Target

CHAT = {"model": "fast", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": "Hello!"}], "stream": False}


def _target(base_url: str, base_path: str, host: str, model: str, **options: str) -> Target:
    return Target(model=model, base_url=base_url, base_path=base_path, host=host,
                  credential="sk-secret", options=options)


OPENAI = _target("https://api.openai.com/v1", "/v1", "api.openai.com", "gpt-4o-mini")
# vLLM / Ollama serve the same API under their own base path.
OLLAMA = _target("http://ollama:11434/v1", "/v1", "ollama:11434", "llama3.2")
# https://{resource}.openai.azure.com/openai/deployments/{deployment}/chat/completions?api-version=...
AZURE = _target("https://contoso.openai.azure.com", "", "contoso.openai.azure.com", "gpt-4o-prod",
                apiVersion="2024-10-21")


@pytest.mark.parametrize("suffix", ["/chat/completions", "/embeddings", "/responses"])
def test_openai_request(suffix: str) -> None:
    out = openai.request(OPENAI, suffix, CHAT, False)
    assert out.path == f"/v1{suffix}"
    assert out.headers == {"authorization": "Bearer sk-secret"}
    assert out.remove == ()
    assert orjson.loads(out.body) == {**CHAT, "model": "gpt-4o-mini"}


def test_openai_compatible_backend_gets_its_own_model_name() -> None:
    out = openai.request(OLLAMA, "/chat/completions", {**CHAT, "stream": True}, True)
    assert out.path == "/v1/chat/completions"
    assert orjson.loads(out.body) == {**CHAT, "model": "llama3.2", "stream": True}


def test_request_does_not_mutate_the_client_body() -> None:
    body = dict(CHAT)
    openai.request(OPENAI, "/chat/completions", body, False)
    azure.request(AZURE, "/chat/completions", body, False)
    assert body == CHAT


@pytest.mark.parametrize("module", [openai, azure])
def test_responses_pass_through(module: Any) -> None:
    assert module.TRANSLATES_RESPONSE is False
    raw = b'{"id":"chatcmpl-1","object":"chat.completion"}'
    assert module.response(200, raw, "m") == raw
    s = module.stream("m")
    assert s.feed(b"data: {\"x\":1}\n\n", False) == b"data: {\"x\":1}\n\n"
    assert s.feed(b"data: [DONE]\n\n", True) == b"data: [DONE]\n\n"


@pytest.mark.parametrize("suffix", ["/chat/completions", "/embeddings"])
def test_azure_request(suffix: str) -> None:
    out = azure.request(AZURE, suffix, CHAT, False)
    assert out.path == f"/openai/deployments/gpt-4o-prod{suffix}?api-version=2024-10-21"
    assert out.headers == {"api-key": "sk-secret"}
    assert out.remove == ("authorization",)
    assert orjson.loads(out.body) == {**CHAT, "model": "gpt-4o-prod"}


def test_azure_deployment_name_is_one_path_segment() -> None:
    target = _target("https://gw.example.com/azure", "/azure", "gw.example.com", "team a/gpt 4o",
                     apiVersion="2025-01-01-preview")
    out = azure.request(target, "/chat/completions", CHAT, True)
    assert out.path == "/azure/openai/deployments/team%20a%2Fgpt%204o/chat/completions?api-version=2025-01-01-preview"


def test_azure_refuses_the_responses_api() -> None:
    with pytest.raises(GatewayError) as err:
        azure.request(AZURE, "/responses", {"model": "fast", "input": "hi"}, False)
    assert err.value.code == "unsupported_endpoint"
    assert err.value.status == 400
    assert "/v1/responses" in err.value.message


@pytest.mark.parametrize(("version", "kept"), [("2024-06-01", False), ("2024-08-01-preview", False),
                                               ("2024-09-01-preview", True), ("2024-10-21", True), ("preview", True)])
def test_azure_sends_stream_options_only_to_api_versions_that_take_them(version: str, kept: bool) -> None:
    """Azure api-versions before 2024-09-01 answer 400 to `stream_options`, which the router
    adds to every chat stream (to read usage): those get the stream without it."""
    target = _target("https://contoso.openai.azure.com", "", "contoso.openai.azure.com", "d", apiVersion=version)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    sent = orjson.loads(azure.request(target, "/chat/completions", body, True).body)
    assert ("stream_options" in sent) is kept
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {**CHAT, "stream": True, "model": "d"}
