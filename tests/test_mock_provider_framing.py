"""The mock provider's controls for odd but valid provider replies (docs/mock-provider.md):
other SSE framings, several choices per chunk, compressed bodies, wrong content types and
garbage events carrying the reply text. Each framing must read back, with the openai SDK,
as the same text and usage the usual framing gives."""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from .test_mock_provider import API_KEY, AUTH, base_url  # noqa: F401 (base_url: the module's mock provider)

FRAMINGS = ["crlf", "cr", "nospace", "multiline", "comments", "fields"]
REPLY = "Card 4111 1111 1111 1111, mail jane.doe@example.com, done."
MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=10) as client:
        yield client


def sdk_stream(base_url: str, headers: dict[str, str], path: str = "/v1", **kwargs: Any) -> tuple[list[str], Any]:
    """Each choice's text and the usage, as the openai SDK reads the stream."""
    client = openai.OpenAI(base_url=base_url + path, api_key=API_KEY, max_retries=0, default_headers=headers)
    texts: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        usage = chunk.usage or usage
    return [texts[i] for i in sorted(texts)], usage


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("chunk_bytes", [None, "7"])
def test_every_framing_reads_back_as_the_same_stream(base_url: str, http: httpx.Client, framing: str,
                                                     chunk_bytes: str | None) -> None:
    headers = {"x-mock-reply": REPLY, **({"x-mock-chunk-bytes": chunk_bytes} if chunk_bytes else {})}
    assert sdk_stream(base_url, headers) == sdk_stream(base_url, {**headers, "x-mock-sse-framing": framing})
    texts, usage = sdk_stream(base_url, {**headers, "x-mock-sse-framing": framing})
    assert texts == [REPLY] and usage is not None and usage.completion_tokens > 0
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    raw = http.post("/v1/chat/completions", json=body, headers={"x-mock-sse-framing": framing}).content
    assert {"crlf": b"\r\n\r\n", "cr": b"\r\r", "nospace": b"data:{", "multiline": b"\ndata: ",
            "comments": b": keep-alive\n", "fields": b"retry: 1000\n"}[framing] in raw


def test_every_framing_on_azure_and_the_data_lines_of_multiline_join_to_json(base_url: str, http: httpx.Client) -> None:
    for framing in FRAMINGS:
        texts, _ = sdk_stream(base_url, {"x-mock-reply": REPLY, "x-mock-sse-framing": framing, "api-key": API_KEY},
                              path="/openai/deployments/dep", extra_query={"api-version": "2024-10-21"})
        assert texts == [REPLY], framing
    raw = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
                    headers={"x-mock-sse-framing": "multiline"}).content
    events = [e for e in raw.split(b"\n\n") if e]
    datas = ["\n".join(line[6:] for line in e.decode().split("\n")) for e in events]
    assert datas[-1] == "[DONE]" and all(len(e.split(b"\n")) > 3 for e in events[:-1])
    assert [orjson.loads(d)["object"] for d in datas[:-1]] == ["chat.completion.chunk"] * (len(datas) - 1)


def test_framing_keeps_the_event_count_for_the_cut_controls(http: httpx.Client) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    raw = http.post("/v1/chat/completions", json=body, headers={
        "x-mock-sse-framing": "comments", "x-mock-end-after-chunks": "2"}).content
    assert raw.count(b"data: ") == 2
    assert http.post("/v1/chat/completions", json=body, headers={"x-mock-sse-framing": "lf"}).status_code == 400


def test_choice_replies_one_chunk_per_choice_or_merged(base_url: str, http: httpx.Client) -> None:
    texts = ["First choice text.", "Second one, longer than the first one."]
    headers = {"x-mock-choice-replies": orjson.dumps(texts).decode()}
    assert sdk_stream(base_url, headers, n=2)[0] == texts
    merged, usage = sdk_stream(base_url, {**headers, "x-mock-merge-choices": "1"}, n=2)
    assert merged == texts and usage is not None
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "n": 2}
    raw = http.post("/v1/chat/completions", json=body, headers={**headers, "x-mock-merge-choices": "1"}).text
    chunks = [orjson.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert [c["index"] for c in chunks[0]["choices"]] == [0, 1]
    assert max(len(c["choices"]) for c in chunks) == 2
    split = http.post("/v1/chat/completions", json=body, headers=headers).text
    assert all(len(orjson.loads(line[6:])["choices"]) <= 1 for line in split.splitlines() if line.startswith("data: {"))
    whole = http.post("/v1/chat/completions", json={**body, "stream": False}, headers=headers).json()
    assert [c["message"]["content"] for c in whole["choices"]] == texts
    assert whole["usage"]["completion_tokens"] == usage.completion_tokens
    for bad in ("[]", '["a", 1]', "nope", '{"a": 1}'):
        assert http.post("/v1/chat/completions", json=body, headers={"x-mock-choice-replies": bad}).status_code == 400
    assert http.post("/v1/chat/completions", json=body, headers={"x-mock-merge-choices": "yes"}).status_code == 400


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True])
def test_content_encoding_compresses_whatever_was_asked(base_url: str, encoding: str, stream: bool) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": stream}
    headers = {**AUTH, "x-mock-reply": REPLY, "accept-encoding": "identity"}
    plain = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers).content
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={**headers,
                                                                             "x-mock-content-encoding": encoding})
    assert resp.headers["content-encoding"] == encoding
    raw = resp.content  # httpx decodes gzip and deflate itself
    assert re.sub(rb"chatcmpl-mock-\d+|\"created\":\d+", b"", raw) == re.sub(rb"chatcmpl-mock-\d+|\"created\":\d+",
                                                                           b"", plain)
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      headers={**headers, "x-mock-content-encoding": encoding}) as wire:
        compressed = b"".join(wire.iter_raw())
    assert b"jane.doe@example.com" not in compressed
    decoded = gzip.decompress(compressed) if encoding == "gzip" else zlib.decompress(compressed)
    assert b"jane.doe@example.com" in decoded
    bad = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={**AUTH, "x-mock-content-encoding": "br"})
    assert bad.status_code == 400


def test_content_type_relabels_the_reply(http: httpx.Client) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    resp = http.post("/v1/chat/completions", json=body, headers={"x-mock-content-type": "text/plain"})
    assert resp.headers["content-type"] == "text/plain" and resp.text.startswith("data: {")
    whole = http.post("/v1/chat/completions", json={**body, "stream": False},
                      headers={"x-mock-content-type": "text/event-stream"})
    assert whole.headers["content-type"] == "text/event-stream" and whole.json()["object"] == "chat.completion"


@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
def test_a_garbage_event_can_carry_the_reply_text(http: httpx.Client, kind: str) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"x-mock-reply": REPLY, "x-mock-garbage-after-chunks": "1", "x-mock-garbage": kind}
    plain = http.post("/v1/chat/completions", json=body, headers=headers).content.split(b"\n\n")[1]
    assert b"4111" not in plain
    carried = http.post("/v1/chat/completions", json=body, headers={**headers, "x-mock-garbage-reply": "1"}
                        ).content.split(b"\n\n")[1]
    assert b"4111 1111 1111 1111" in carried
    if kind == "json":
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(carried[6:])


BEDROCK_AUTH = {"authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/bedrock/aws4_request, "
                                 "SignedHeaders=host, Signature=0", "x-amz-date": "20260101T000000Z"}
TRANSLATED_STREAMS = {
    "anthropic": ("/v1/messages", {"model": "claude", "max_tokens": 100, "messages": MESSAGES, "stream": True}, {}),
    "gemini": ("/v1beta/models/gemini-mock:streamGenerateContent?alt=sse",
               {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, {}),
    "bedrock": ("/model/amazon.nova-mock/converse-stream", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                BEDROCK_AUTH),
}


@pytest.mark.parametrize("provider", list(TRANSLATED_STREAMS))
@pytest.mark.parametrize("kind", ["json", "shape", "bytes", "error"])
def test_every_providers_garbage_can_carry_the_reply_text(http: httpx.Client, provider: str, kind: str) -> None:
    """The words of a reply go out one per event, so the whole card is only ever in the
    broken event, and only when it is asked to carry the reply."""
    path, body, auth = TRANSLATED_STREAMS[provider]
    headers = {"x-mock-reply": REPLY, "x-mock-garbage-after-chunks": "2", "x-mock-garbage": kind, **auth}
    plain = http.post(path, json=body, headers=headers)
    carried = http.post(path, json=body, headers={**headers, "x-mock-garbage-reply": "1"})
    assert plain.status_code == carried.status_code == 200, carried.text
    assert b"4111 1111 1111 1111" not in plain.content
    assert b"4111 1111 1111 1111" in carried.content
    if kind == "error":
        assert {"anthropic": b"event: error", "gemini": b'"status":"INTERNAL"',
                "bedrock": b"internalServerException"}[provider] in carried.content
