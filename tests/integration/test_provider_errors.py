"""A provider's error answer reaches the client without the gateway's credential and scanned
like its answers, on every provider path, JSON and streamed requests alike.

Providers word errors carelessly: OpenAI quotes the last characters of a key it refuses,
some OpenAI-compatible servers the whole key, and any of them may quote text. The caller
never sent that key (the gateway did), so:
- a 401 is the gateway's problem, never the caller's: 502 `provider_auth_failed`, without
  the provider's words;
- any other error keeps its status, with the credential's value cut and, under output
  scanning, its strings scanned as an answer's are;
- an error body that is no OpenAI error object (a proxy's HTML) arrives in the OpenAI shape.

Nor do the headers in which providers name the account that called them, or its cookies.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway_extproc.mock_provider import ACCOUNT_HEADERS

from .conftest import Gateway, add_provider_models, running_gateway
from .test_output_leaks import card

# Each provider path of values-local (plus bedrock and gemini), with the credential its
# mock provider is presented.
MODELS = ["private-chat", "default-chat", "azure-chat", "gemini-chat", "claude-chat", "bedrock-chat"]


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    with running_gateway("gw-provider-errors-", customize=add_provider_models) as gateway:
        yield gateway


def chat(gw: Gateway, model: str, headers: dict[str, str], stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", **headers})


def credentials(gw: Gateway) -> list[str]:
    """Every secret a mock provider is presented (Bedrock's is the backup key, signed with)."""
    return [gw.primary_key, gw.backup_key]


def assert_no_credential(gw: Gateway, text: str) -> None:
    for key in credentials(gw):
        assert key not in text and key[-12:] not in text, "a provider credential reached the client"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_a_provider_that_refuses_the_gateways_key_is_the_platforms_problem(gw: Gateway, model: str,
                                                                          stream: bool) -> None:
    r = chat(gw, model, {"x-mock-status": "401", "x-mock-error-echo-credential": "1"}, stream)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "provider_auth_failed"
    assert r.json()["error"]["type"] == "server_error"
    assert "Presented" not in r.text  # the provider's words are not passed on
    assert_no_credential(gw, r.text)


@pytest.mark.parametrize("model", MODELS)
def test_the_openai_sdk_does_not_blame_the_callers_key(gw: Gateway, model: str) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-mock-status": "401"})
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "provider_auth_failed"


@pytest.mark.parametrize("status", [400, 403, 404, 422, 429, 500])
@pytest.mark.parametrize("model", MODELS)
def test_an_error_quoting_the_credential_keeps_its_status_without_it(gw: Gateway, model: str, status: int) -> None:
    r = chat(gw, model, {"x-mock-status": str(status), "x-mock-error-echo-credential": "1"})
    if status >= 500 or status == 429:  # retried on the model's other backends, if any: still an error
        assert r.status_code >= 429, r.text
    else:
        assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert_no_credential(gw, r.text)
    if "bedrock" not in model and not (model == "claude-chat" and status in (429, 500)):  # (SigV4 signs, sends no key)
        assert "Presented: [credential removed]" in error["message"] or "Bearer [credential removed]" in error["message"]


@pytest.mark.parametrize("model", MODELS)
def test_a_card_in_a_providers_error_message_is_redacted(gw: Gateway, model: str) -> None:
    number = card(random.Random(model))
    said = f"Invalid value for messages: {number} is not allowed"
    r = chat(gw, model, {"x-mock-status": "400", "x-mock-error-message-base64": base64.b64encode(said.encode()).decode()})
    assert r.status_code == 400, r.text
    assert number not in r.text and number[-8:] not in r.text
    assert "Invalid value for messages" in r.json()["error"]["message"]


def test_a_proxys_html_error_arrives_in_the_openai_shape(gw: Gateway) -> None:
    r = chat(gw, "private-chat", {"x-mock-status": "400", "x-mock-garbage": "bytes", "x-mock-garbage-after-chunks": "0"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "provider_error" and error["type"] == "invalid_request_error"
    assert "<html>" not in r.text


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=_TEXT, after=_TEXT, status=st.sampled_from([400, 403, 409, 422]),
       model=st.sampled_from(["private-chat", "default-chat", "claude-chat"]))
def test_whatever_a_provider_says_around_the_key_the_key_never_arrives(gw: Gateway, before: str, after: str,
                                                                        status: int, model: str) -> None:
    said = f"{before} key {gw.backup_key if model != 'private-chat' else gw.primary_key} {after}"
    r = chat(gw, model, {"x-mock-status": str(status),
                         "x-mock-error-message-base64": base64.b64encode(said.encode()).decode()})
    assert r.status_code in (status, 502), r.text  # 502: the message withheld by output scanning
    r.json()["error"]["message"]  # always the OpenAI shape
    assert_no_credential(gw, r.text)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_a_provider_quoting_another_backends_key_gives_it_away_no_more(gw: Gateway, model: str, stream: bool) -> None:
    """The gateway's credentials are cut from every provider answer, not only the answering
    backend's own: each provider path, quoting each key, in an error and in a streamed one."""
    for key in credentials(gw):
        said = f" key {key} "
        r = chat(gw, model, {"x-mock-status": "400",
                             "x-mock-error-message-base64": base64.b64encode(said.encode()).decode()}, stream)
        assert r.status_code in (400, 502), r.text
        assert_no_credential(gw, r.text)


@pytest.mark.parametrize("status", [200, 400, 429])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_what_a_provider_says_about_the_gateways_account_never_reaches_the_caller(gw: Gateway, model: str,
                                                                                   stream: bool, status: int) -> None:
    """Providers name the account that called them (OpenAI's organization and project,
    Anthropic's organization) and set cookies for it on every answer: that is the gateway's
    account, not the caller's."""
    r = chat(gw, model, {} if status == 200 else {"x-mock-status": str(status)}, stream)
    assert r.status_code == status or status == 429, r.text
    for name, value in ACCOUNT_HEADERS:
        assert name not in r.headers, name
        assert value.split(";")[0] not in r.text


@pytest.mark.parametrize("status", [401, 400, 503])
def test_an_error_labelled_as_a_stream_is_read_whole_like_any_error(gw: Gateway, status: int) -> None:
    r = chat(gw, "private-chat", {"x-mock-status": str(status), "x-mock-error-echo-credential": "1",
                                  "x-mock-content-type": "text/event-stream"}, stream=True)
    assert r.status_code == (502 if status == 401 else status), r.text
    assert r.json()["error"]["code"] in ("provider_auth_failed", "provider_error", None)
    assert_no_credential(gw, r.text)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("model", ["private-chat", "default-chat", "claude-chat"])
def test_a_providers_redirect_is_neither_followed_nor_passed_on(gw: Gateway, model: str, status: int) -> None:
    r = chat(gw, model, {"x-mock-status": str(status), "x-mock-error-echo-credential": "1"})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "provider_error" and "location" not in r.headers
    assert_no_credential(gw, r.text)


SPOOFED = {"x-gateway-error-code": "budget_exceeded", "x-gateway-attempts": "9", "x-gateway-prompt-tokens": "987654",
           "x-gateway-completion-tokens": "987654", "x-gateway-max-tokens-clamped": "987654",
           "x-gateway-budget-remaining-usd": "1000000", "x-gateway-budget-warning": "none"}


@pytest.mark.parametrize("status", [200, 400, 401])
@pytest.mark.parametrize("model", ["private-chat", "default-chat", "claude-chat"])
def test_a_provider_cannot_speak_for_the_gateway(gw: Gateway, model: str, status: int) -> None:
    """A provider's `x-gateway-*` answer headers are removed as the answer arrives: its
    `x-gateway-error-code` passed its error off as Envoy's own reply (so its credential echo
    went out uncut), and the rest would reach the caller as the gateway's word."""
    headers = {"x-mock-response-headers": json.dumps(SPOOFED), "x-mock-error-echo-credential": "1"}
    if status != 200:
        headers["x-mock-status"] = str(status)
    r = chat(gw, model, headers)
    assert r.status_code == (502 if status == 401 else status), r.text
    assert_no_credential(gw, r.text)
    for name, value in SPOOFED.items():
        assert r.headers.get(name) != value, name


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [200, 400, 429])
@pytest.mark.parametrize("model", MODELS)
def test_a_provider_echoing_the_credential_in_a_header_does_not_hand_it_out(gw: Gateway, model: str, status: int,
                                                                          stream: bool) -> None:
    """A provider that quotes what it was presented in an answer header (a debug header, a
    `www-authenticate` naming the token): the header is removed, the rest of the answer goes
    on, and the log names the backend, never the value."""
    echo = {"x-debug-presented": "{credential}", "www-authenticate": 'Bearer realm="mock", token="{credential}"',
            "x-innocent": "kept"}
    headers = {"x-mock-response-headers": json.dumps(echo)}
    if status != 200:
        headers["x-mock-status"] = str(status)
    r = chat(gw, model, headers, stream)
    text = "\n".join(f"{k}: {v}" for k, v in r.headers.items()) + "\n" + r.text
    assert_no_credential(gw, text)
    if status == 200:
        assert r.status_code == 200, r.text
        assert r.headers.get("x-innocent") == "kept"
    if "bedrock" not in model:  # (SigV4 signs, sends no key: nothing to echo)
        assert "x-debug-presented" not in r.headers and "www-authenticate" not in r.headers
        log = gw.stack.log_path("extproc").read_text(errors="replace")
        assert "provider_echoed_credential" in log
        assert_no_credential(gw, log)


@pytest.mark.parametrize("chunk_bytes", [None, "5", "13"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_a_provider_echoing_the_credential_in_its_answer_does_not_hand_it_out(gw: Gateway, model: str, stream: bool,
                                                                            chunk_bytes: str | None) -> None:
    """A provider (or a proxy before it) whose answer quotes the request it got: the gateway's
    credential is cut from the answer, also when the stream splits it over pieces anywhere."""
    headers = {"x-mock-reply": "I was called with {credential} today."}
    if chunk_bytes:
        headers["x-mock-chunk-bytes"] = chunk_bytes
    r = chat(gw, model, headers, stream)
    assert r.status_code == 200, r.text
    assert_no_credential(gw, r.text)
    if "bedrock" not in model:  # (SigV4 signs, sends no key: nothing to echo)
        assert "[credential removed]" in r.text or "[OPENAI_KEY" in r.text or "withheld" in r.text, r.text[:500]
