"""Inline PDFs under a budget, through real Envoy and a Valkey budget store, with the OpenAI
and Anthropic SDKs.

Providers bill an inline PDF as its extracted text plus an image of every page (the mock
provider bills 1,000 tokens a page). The gateway reserved a PDF as the length of its base64:
500 empty pages are 7 KB, so a budget that admits a one-page PDF of that size admitted the
500-page one, and its bill (500,000 tokens) was charged at the reservation, the excess
escaping the budget. Now a PDF reserves its pages, and one whose pages cannot be told
reserves the most pages a provider accepts."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis as redis_py

from gateway_extproc import keys
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..pdf_files import build
from ..redis_server import RedisServer
from .conftest import Gateway, nothing_held, running_gateway

KEY = keys.generate("pdf")
BUDGET = 0.10  # USD a day: a one-page PDF's reservation fits, 500 pages' does not
MANY = build(500, object_stream=True)
ONE = build(1, size=len(MANY))  # the same size: only the page count tells them apart
ENCRYPTED = ONE.replace(b"/Root", b"/Encrypt 9 0 R /Root")
PRICES = {"default-chat": Price.from_usd_per_million(5, 20), "gemini-chat": Price.from_usd_per_million(0.3, 2.5)}


def pdf_values(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["teams"].append({"name": "pdf", "budget": {"daily": 1}})  # (no token rate limit to hit first)
    values["keys"].append({"id": "pdf", "sha256": keys.digest(KEY), "team": "pdf", "budget": {"daily": BUDGET}})


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[RedisServer, Gateway]]:
    with RedisServer() as redis, running_gateway("gw-pdf-", customize=lambda v: pdf_values(v, redis.url)) as gw:
        yield redis, gw


@pytest.fixture
def gw(setup: tuple[RedisServer, Gateway]) -> Iterator[Gateway]:
    redis, gw = setup
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()
    gw.reset()
    yield gw
    client.close()
    nothing_held(redis)


def spent_nano(gw: Gateway) -> int:
    """The key's daily spend, after checking that no level is above its limit."""
    budgets = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEY}"}, timeout=10).json()["budgets"]
    for b in budgets:
        assert b["limit_usd"] is None or round(b["spent_usd"] * 1e9) <= round(b["limit_usd"] * 1e9), b
    return round(next(b for b in budgets if b["level"] == "key:pdf" and b["window"] == "daily")["spent_usd"] * 1e9)


def settled_spend(gw: Gateway, owed: int) -> int:
    deadline = time.monotonic() + 10
    while (spent := spent_nano(gw)) < owed and time.monotonic() < deadline:
        time.sleep(0.1)
    return spent


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat(c: openai.OpenAI, data: bytes) -> tuple[int, int]:
    uri = f"data:application/pdf;base64,{b64(data)}"
    reply = c.chat.completions.create(model="default-chat", max_tokens=16, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Summarize."}, {"type": "file", "file": {"filename": "report.pdf", "file_data": uri}}]}])
    assert reply.usage is not None
    return reply.usage.prompt_tokens, reply.usage.completion_tokens


def responses(c: openai.OpenAI, data: bytes) -> tuple[int, int]:
    reply = c.responses.create(model="default-chat", max_output_tokens=16, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Summarize."},
        {"type": "input_file", "filename": "report.pdf", "file_data": f"data:application/pdf;base64,{b64(data)}"}]}])
    assert reply.usage is not None
    return reply.usage.input_tokens, reply.usage.output_tokens


def messages(c: anthropic.Anthropic, data: bytes) -> tuple[int, int]:
    """An Anthropic client's PDF as an image block: a Gemini backend sends it as a PDF."""
    reply = c.messages.create(model="gemini-chat", max_tokens=16, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Summarize."},
        {"type": "image", "source": {"type": "base64", "media_type": "application/pdf",  # type: ignore[typeddict-item]
                                     "data": b64(data)}}]}])
    return reply.usage.input_tokens, reply.usage.output_tokens


SHAPES = {"chat file": ("default-chat", chat), "responses input_file": ("default-chat", responses),
          "messages to gemini": ("gemini-chat", messages)}


def send(gw: Gateway, shape: str, data: bytes) -> tuple[int, int]:
    if shape == "messages to gemini":
        return messages(anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0), data)
    return SHAPES[shape][1](openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0), data)


def refused(gw: Gateway, shape: str, data: bytes) -> dict[str, Any]:
    before = [len(gw.received(m)) for m in (gw.primary, gw.backup)]
    with pytest.raises((openai.RateLimitError, anthropic.RateLimitError)) as info:
        send(gw, shape, data)
    assert [len(gw.received(m)) for m in (gw.primary, gw.backup)] == before  # nothing reached a provider
    body = info.value.body
    return body["error"] if "error" in body else body


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_budget_that_admits_a_one_page_pdf_refuses_500_pages_of_the_same_size(gw: Gateway, shape: str) -> None:
    assert abs(len(ONE) - len(MANY)) < 100
    prompt, completion = send(gw, shape, ONE)
    owed = cost_nano(PRICES[SHAPES[shape][0]], prompt, completion)
    assert settled_spend(gw, owed) == owed  # charged its bill: nothing past the reservation
    assert refused(gw, shape, MANY)["code"] == "budget_exceeded"
    assert spent_nano(gw) == owed <= BUDGET * 1e9


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_pdf_whose_pages_cannot_be_told_is_refused_under_a_small_budget(gw: Gateway, shape: str) -> None:
    """Encrypted: reserved as the most pages a provider accepts (fail closed)."""
    assert refused(gw, shape, ENCRYPTED)["code"] == "budget_exceeded"
    assert spent_nano(gw) == 0
