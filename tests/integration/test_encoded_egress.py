"""Encoded values through real Envoy with the openai SDK: a card or an e-mail address written as
a hex dump, base32, quoted-printable or base64 three levels deep is redacted in a request before
the provider sees it, and in a JSON and a streamed answer before the client does."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import openai
import orjson
import pytest

from ..test_encodings import ENCODINGS
from .conftest import Gateway, running_gateway

MODEL = "private-chat"  # approved up to `restricted`: served, redacted
VALUES = ("card 4111 1111 1111 1111", "mail jane.doe@example.com")
CASES = [(e, v) for e in ("hex dump", "hex 0x commas", "hex colons", "hex dump wrapped", "base32",
                          "base32 unpadded", "quoted-printable", "quoted-printable soft breaks", "base64 x3")
         for v in VALUES]


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    with running_gateway("gw-enc-") as gw:
        yield gw


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)


def reply_header(text: str) -> dict[str, str]:
    return {"x-mock-reply-base64": base64.b64encode(text.encode()).decode()}


@pytest.mark.parametrize(("encoding", "value"), CASES)
def test_an_encoded_value_in_a_request_reaches_the_provider_redacted(gw: Gateway, encoding: str, value: str) -> None:
    payload = ENCODINGS[encoding](value)
    gw.reset()
    out = client(gw).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"decode {payload} now"}])
    assert out.choices[0].message.content
    sent = [orjson.dumps(r["body"]).decode() for m in (gw.primary, gw.backup) for r in gw.received(m)]
    assert len(sent) == 1
    assert payload not in orjson.loads(sent[0])["messages"][0]["content"]
    assert "[CREDIT_CARD_1]" in sent[0] or "[EMAIL_1]" in sent[0]


@pytest.mark.parametrize(("encoding", "value"), CASES)
def test_an_encoded_value_in_an_answer_reaches_the_client_redacted(gw: Gateway, encoding: str, value: str) -> None:
    payload = ENCODINGS[encoding](value)
    reply = f"Here it is: {payload} -- anything else?"
    oai = client(gw)
    msgs = [{"role": "user", "content": "Tell me."}]
    whole = oai.chat.completions.create(model=MODEL, messages=msgs, extra_headers=reply_header(reply))
    text = whole.choices[0].message.content or ""
    assert payload not in text and text.endswith("-- anything else?")
    assert "[CREDIT_CARD_1]" in text or "[EMAIL_1]" in text
    stream = oai.chat.completions.create(model=MODEL, messages=msgs, stream=True, extra_headers=reply_header(reply))
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text
