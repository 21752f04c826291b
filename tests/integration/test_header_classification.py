"""Request headers are classified like the body, through real Envoy, driven by the openai and
anthropic SDKs and httpx: no restricted value reaches a provider in a header (see
docs/classification.md, "Request headers"). The mock provider records every header it got.

(The tests' own `x-mock-*` controls travel sealed: conftest `sealed_mock_controls`.)"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway_extproc import keys

from .conftest import Gateway, running_gateway

CARD = "4111 1111 1111 1111"  # a valid (Luhn) test Visa number: restricted, above default-chat's tier
CARD_FORMS = (CARD, CARD.replace(" ", ""), "4111-1111-1111-1111")
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # critical: blocks in every mode but monitor
EMAIL = "jane.doe@example.com"  # redacted; default-chat may receive the placeholder
ALLOWED = "support@example.com"
MONITOR_KEY = keys.generate("monitor")
QUESTION = [{"role": "user", "content": "Nothing sensitive here."}]


def chat(gw: Gateway, headers: Any, model: str = "default-chat", **body: Any) -> httpx.Response:
    """`headers`: a dict, or (name, value) pairs (repeated names, bytes values)."""
    auth = [("authorization", f"Bearer {body.pop('key', gw.key)}")]
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers=auth + pairs,
                      json={"model": model, "messages": QUESTION, **body})


def refused(resp: httpx.Response, code: str = "classification_violation") -> dict[str, Any]:
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == code, error
    assert not any(form in resp.text for form in CARD_FORMS) and "AKIA" not in resp.text
    return error


def nothing_sent(gw: Gateway) -> None:
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []


def sent_headers(gw: Gateway) -> dict[str, str]:
    [request] = gw.received(gw.primary)
    return request["headers"]


def no_card_anywhere(gw: Gateway) -> None:
    """No form of the card in what the providers received, nor in any log line."""
    text = str(gw.received(gw.primary)) + str(gw.received(gw.backup)) + gw.logs()
    assert not any(form in text for form in CARD_FORMS)


# -- a restricted value in a header never leaves -------------------------------------------


def test_a_card_in_a_header_never_reaches_the_provider(gw: Gateway) -> None:
    for name in ("user-agent", "x-anything", "openai-beta", "X-CaRd-NoTe", "idempotency-key"):
        error = refused(chat(gw, {name: f"client {CARD}"}))
        assert f"request header {name.lower()!r}" in error["message"]
    nothing_sent(gw)


def test_the_openai_sdk_default_and_extra_headers_are_classified(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-customer-card": CARD})
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="default-chat", messages=QUESTION)
    assert err.value.code == "classification_violation" and "4111" not in str(err.value)
    clean = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):  # streaming: refused before anything is sent
        clean.chat.completions.create(model="default-chat", messages=QUESTION, stream=True,
                                      extra_headers={"user-agent": f"agent/1.0 ({CARD})"})
    with pytest.raises(openai.PermissionDeniedError):
        clean.embeddings.create(model="default-embedding", input="hello", extra_headers={"x-card": CARD})
    with pytest.raises(openai.PermissionDeniedError) as blocked:
        clean.responses.create(model="default-chat", input="hello", extra_headers={"x-upload": AWS_KEY})
    assert blocked.value.code == "content_blocked"
    nothing_sent(gw)


def test_the_anthropic_messages_path_classifies_headers(gw: Gateway) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        client.messages.create(model="default-chat", max_tokens=50, messages=QUESTION,
                               extra_headers={"anthropic-beta": f"tools-2024-05-16,{CARD}"})
    assert "classification_violation" in str(err.value.body) and "4111" not in str(err.value.body)
    with pytest.raises(anthropic.PermissionDeniedError):
        with client.messages.stream(model="default-chat", max_tokens=50, messages=QUESTION,
                                    extra_headers={"x-ticket": f"card {CARD}"}) as stream:
            stream.get_final_message()
    nothing_sent(gw)


def test_repeated_encoded_and_long_headers(gw: Gateway) -> None:
    refused(chat(gw, {"x-retry": "7", "x-card": CARD, "x-count": "0"}))  # beside numeric headers
    refused(chat(gw, [("x-part", "first"), ("x-part", CARD)]))  # in a repeated header
    refused(chat(gw, {"x-data": base64.b64encode(CARD.encode()).decode()}))
    refused(chat(gw, {"x-data": urllib.parse.quote(f"card={CARD}")}))
    refused(chat(gw, {"x-data": base64.b64encode(base64.b64encode(CARD.encode())).decode()}))
    # Near the gateway's header limit (api.MAX_HEADER_BYTES): the card at the very end.
    long = "word " * 10_000
    refused(chat(gw, {"x-long": long + CARD}))
    nothing_sent(gw)
    assert chat(gw, {"x-long": long.strip()}).status_code == 200  # the same header, clean, passes
    assert sent_headers(gw)["x-long"] == long.strip()


def test_non_ascii_and_obs_text_header_bytes(gw: Gateway) -> None:
    # Latin-1 NBSP (obs-text) between the groups, and UTF-8 fullwidth digits: NFKC reads both.
    refused(chat(gw, [(b"x-latin", b"card 4111\xa01111\xa01111\xa01111")]))
    refused(chat(gw, [(b"x-wide", "card ４１１１ １１１１ １１１１ １１１１".encode())]))
    nothing_sent(gw)
    ok = chat(gw, [(b"x-latin", b"caf\xe9 cr\xe8me"), (b"x-utf8", "café ✓".encode())])
    assert ok.status_code == 200, ok.text
    headers = sent_headers(gw)  # the mock reads bytes as Latin-1: forwarded byte for byte
    assert headers["x-latin"] == "caf\xe9 cr\xe8me" and headers["x-utf8"] == "café ✓".encode().decode("latin-1")


def test_a_clean_body_with_a_secret_header_is_blocked_by_the_secret_rule(gw: Gateway) -> None:
    error = refused(chat(gw, {"x-upload-key": AWS_KEY}, model="private-chat"), "content_blocked")
    assert "aws_access_key" in error["message"] and "request header 'x-upload-key'" in error["message"]
    nothing_sent(gw)


def test_a_card_in_a_header_is_redacted_in_place_where_the_model_may_take_it(gw: Gateway) -> None:
    resp = chat(gw, {"user-agent": f"billing-bot ({CARD})", "x-note": f"{CARD} on file"}, model="private-chat")
    assert resp.status_code == 200, resp.text
    headers = sent_headers(gw)
    assert headers["user-agent"] == "billing-bot ([CREDIT_CARD_1])" and headers["x-note"] == "[CREDIT_CARD_1] on file"
    no_card_anywhere(gw)


def test_a_redact_rule_value_reaches_default_chat_as_its_placeholder(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-contact": f"mail {EMAIL}"})
    reply = client.chat.completions.create(model="default-chat",
                                           messages=[{"role": "user", "content": f"Write to {EMAIL}."}])
    assert reply.choices[0].message.content
    [request] = gw.received(gw.primary)
    assert request["headers"]["x-contact"] == "mail [EMAIL_1]"  # the body's placeholder for the same value
    assert request["body"]["messages"][0]["content"] == "Write to [EMAIL_1]."


# -- ordinary headers pass -----------------------------------------------------------------

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_ordinary_sdk_headers_pass_and_the_calls_succeed(gw: Gateway) -> None:
    extra = {"openai-beta": "assistants=v2", "traceparent": TRACEPARENT, "x-request-id": "req-123-abc"}
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, default_headers=extra)
    assert client.chat.completions.create(model="default-chat", messages=QUESTION).choices[0].message.content
    chunks = list(client.chat.completions.create(model="default-chat", messages=QUESTION, stream=True))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert client.embeddings.create(model="default-embedding", input="hello").data[0].embedding
    assert client.responses.create(model="default-chat", input="hello").output_text
    messages = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, default_headers={
        "anthropic-beta": "prompt-caching-2024-07-31,tools-2024-05-16", "traceparent": TRACEPARENT})
    assert messages.messages.create(model="default-chat", max_tokens=50, messages=QUESTION).content[0].text
    with messages.messages.stream(model="default-chat", max_tokens=50, messages=QUESTION) as stream:
        assert stream.get_final_message().content[0].text
    received = gw.received(gw.primary)
    assert len(received) == 6
    for request in received:
        sent = request["headers"]
        assert sent["traceparent"] == TRACEPARENT and sent["x-stainless-lang"] == "python"
        assert "x-stainless-package-version" in sent and "x-stainless-retry-count" in sent
    assert all(r["headers"]["openai-beta"] == "assistants=v2" for r in received[:4])
    assert all(re.fullmatch(r"20\d\d-\d\d-\d\d", r["headers"]["anthropic-version"]) and r["headers"]["anthropic-beta"]
               == "prompt-caching-2024-07-31,tools-2024-05-16" for r in received[4:])


def test_the_clients_network_path_does_not_reach_the_provider(gw: Gateway) -> None:
    assert chat(gw, {"x-forwarded-for": "10.1.2.3", "forwarded": "for=10.1.2.3", "via": "1.1 corp-proxy",
                     "x-real-ip": "10.1.2.3", "x-forwarded-host": "internal.corp"}).status_code == 200
    headers = sent_headers(gw)
    for name in ("x-forwarded-for", "forwarded", "via", "x-real-ip", "x-forwarded-host", "x-envoy-external-address",
                 "x-envoy-original-host"):  # (the client's Host, which Envoy copies when it rewrites the host)
        assert name not in headers, name


def test_a_raw_http1_request_with_a_card_header_is_refused(gw: Gateway) -> None:
    body = b'{"model": "default-chat", "messages": [{"role": "user", "content": "hi"}]}'
    host, port = gw.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + gw.key.encode() + b"\r\nX-Card:   " + CARD.encode() + b"  \r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403") and b"classification_violation" in reply and b"4111" not in reply
    nothing_sent(gw)


# -- modes and the allowlist -----------------------------------------------------------------


@pytest.fixture(scope="module")
def monitored() -> Iterator[Gateway]:
    def customize(values: dict[str, Any]) -> None:
        values["keys"].append({"id": "monitor", "sha256": keys.digest(MONITOR_KEY), "team": "demo",
                               "classification": {"mode": "monitor"}})
        values["classification"]["allowlist"] = [{"value": ALLOWED, "reason": "the public support address"}]
    with running_gateway("gw-headers-", customize=customize) as gw:
        yield gw


def test_monitor_mode_logs_a_header_finding_and_forwards(monitored: Gateway) -> None:
    monitored.reset()
    resp = chat(monitored, {"x-card": CARD}, key=MONITOR_KEY)
    assert resp.status_code == 200, resp.text
    assert sent_headers(monitored)["x-card"] == CARD  # monitor: nothing is changed, as for a body
    time.sleep(0.3)
    logs = monitored.logs()
    assert any("policy_decision" in line and "credit_card" in line and "monitor" in line for line in logs.splitlines())
    assert not any(form in logs for form in CARD_FORMS)  # logged, never quoted


def test_allowlisted_values_in_headers_pass_unchanged(monitored: Gateway) -> None:
    monitored.reset()
    assert chat(monitored, {"x-contact": ALLOWED}).status_code == 200
    assert sent_headers(monitored)["x-contact"] == ALLOWED
    refused(chat(monitored, {"x-card": CARD}))  # the enforce key still refuses


def test_no_card_in_any_log_line(gw: Gateway) -> None:
    time.sleep(0.3)
    assert not any(form in gw.logs() for form in CARD_FORMS)


def test_a_burst_of_mixed_requests_keeps_each_streams_headers_apart(gw: Gateway) -> None:
    """200 concurrent requests, every other one with a card in a header: each stream's
    headers are its own (no state shared between streams), so exactly the clean ones pass."""
    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            async def one(i: int) -> int:
                headers = {"authorization": f"Bearer {gw.key}", "x-trace-tag": f"run-{i}"}
                if i % 2:
                    headers["x-customer"] = f"card {CARD}"
                resp = await client.post(f"{gw.url}/v1/chat/completions", headers=headers,
                                         json={"model": "default-chat", "messages": QUESTION, "stream": i % 4 == 0})
                return resp.status_code
            return await asyncio.gather(*(one(i) for i in range(200)))
    statuses = asyncio.run(burst())
    assert [s for i, s in enumerate(statuses) if i % 2] == [403] * 100
    assert [s for i, s in enumerate(statuses) if not i % 2] == [200] * 100
    received = gw.received(gw.primary) + gw.received(gw.backup)
    assert sorted(int(r["headers"]["x-trace-tag"][4:]) for r in received) == list(range(0, 200, 2))
    assert not any("x-customer" in r["headers"] for r in received)
    no_card_anywhere(gw)
