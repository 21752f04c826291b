"""A card or an SSN a provider sends as a JSON number, through real Envoy and the ext_proc
(values-local: output scanning on). A request's long numbers are read (docs/classification.md,
"JSON numbers"); an answer's were not: output scanning read strings only, so
`"x_card": 4111111111111111` beside the choices, a number in a message, a stream chunk's
extension field or a provider's error object reached the client as sent. The provider's
answers are scripted with `x-mock-raw-body`, `x-mock-raw-events` and `x-mock-raw-status`.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import orjson
import pytest

from .conftest import Gateway

CARD = 4111111111111111
SSN = 123456789


def b64(data: Any) -> str:
    return base64.b64encode(orjson.dumps(data)).decode()


def chat_json(**extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-n", "object": "chat.completion", "created": 1733400000, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "Here it is.", **extra.pop("message", {})}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}, **extra}


def responses_json(**extra: Any) -> dict[str, Any]:
    return {"id": "resp_n", "object": "response", "created_at": 1733400000, "status": "completed",
            "model": "gpt-4o-mini", "output": [{"type": "message", "id": "msg_1", "role": "assistant",
                                                "status": "completed", "content": [
                                                    {"type": "output_text", "text": "Here it is.",
                                                     "annotations": []}]}],
            "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}, **extra}


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-n", "object": "chat.completion.chunk", "created": 1,
                                     "model": "gpt-4o-mini", "choices": [
                                         {"index": 0, "delta": delta, "finish_reason": finish}], **extra}) + b"\n\n"


CASES: dict[str, tuple[str, bool, dict[str, str]]] = {
    "chat JSON, extension field": ("/v1/chat/completions", False,
                                   {"x-mock-raw-body": b64(chat_json(x_card=CARD))}),
    "chat JSON, in the message": ("/v1/chat/completions", False,
                                  {"x-mock-raw-body": b64(chat_json(message={"card": CARD}))}),
    "chat JSON, an exponent": ("/v1/chat/completions", False,
                               {"x-mock-raw-body": b64(chat_json(x_card=float(CARD)))}),
    "chat JSON, SSN by name": ("/v1/chat/completions", False,
                               {"x-mock-raw-body": b64(chat_json(x_meta={"ssn": SSN}))}),
    "chat stream, extension field": ("/v1/chat/completions", True, {"x-mock-raw-events": orjson.dumps(
        [base64.b64encode(e).decode() for e in (chunk({"content": "Here it is."}), chunk({}, "stop", x_card=CARD),
                                                  b"data: [DONE]\n\n")]).decode()}),
    "responses JSON, extension field": ("/v1/responses", False,
                                        {"x-mock-raw-body": b64(responses_json(x_card=CARD))}),
    "provider error": ("/v1/chat/completions", False, {
        "x-mock-raw-status": "400",
        "x-mock-raw-body": b64({"error": {"message": "bad card", "type": "invalid_request_error", "card": CARD}})}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_value_sent_as_a_json_number_never_reaches_the_client(gw: Gateway, case: str) -> None:
    path, stream, controls = CASES[case]
    body: dict[str, Any] = {"model": "default-chat", "stream": stream}
    body.update({"input": "Read it."} if path == "/v1/responses" else
                {"messages": [{"role": "user", "content": "Read it."}]})
    r = httpx.post(gw.url + path, json=body, headers={"authorization": f"Bearer {gw.key}", **controls}, timeout=30)
    assert str(CARD).encode() not in r.content and str(SSN).encode() not in r.content, r.content
    assert b"Here it is." in r.content or r.status_code == 400, r.content


def test_an_answers_own_numbers_reach_the_client_as_sent(gw: Gateway) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                   json={"model": "default-chat", "messages": [{"role": "user", "content": "Read it."}]},
                   headers={"authorization": f"Bearer {gw.key}",
                            "x-mock-raw-body": b64(chat_json(x_order=123456789012345, x_ts=1733400000123))})
    got = r.json()
    assert got["created"] == 1733400000 and got["x_ts"] == 1733400000123 and got["usage"]["total_tokens"] == 8
    assert got["x_order"] == 123456789012345
