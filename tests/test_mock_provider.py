"""Tests for the bundled mock LLM provider (gateway_extproc.mock_provider).

The provider runs in a subprocess exactly as `make run` starts it and is driven with
httpx, raw sockets, the real openai / anthropic SDKs and botocore (Bedrock: SigV4 signing,
Converse parsing, event-stream decoding).  All tests are synchronous so
they work with or without pytest-asyncio's auto mode.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anthropic
import botocore.session
import bpe_openai
import h11
import httpx
import openai
import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError

from gateway_extproc.mock_provider import start
from gateway_extproc.providers import eventstream

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-mock"
AUTH = {"authorization": f"Bearer {API_KEY}"}
ENC = bpe_openai.get_encoding("o200k_base")


def n_tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def spawn(api_key: str | None = API_KEY) -> tuple[subprocess.Popen[str], str]:
    code = f"from gateway_extproc.mock_provider import run; run('127.0.0.1', 0, {api_key!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("mock-provider listening on http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"mock provider did not start: {line!r} {proc.communicate()[1]}")
    return proc, line.split()[-1]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    proc, url = spawn()
    yield url
    proc.terminate()
    proc.communicate(timeout=10)


@pytest.fixture(autouse=True)
def reset(base_url: str) -> None:
    httpx.post(f"{base_url}/_mock/reset").raise_for_status()


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=10) as client:
        yield client


@pytest.fixture
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)


@pytest.fixture
def claude(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=API_KEY, base_url=base_url, max_retries=0)


def chat_body(text: str = "Hello, mock!", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def mock_reply(model: str, prompt: str) -> str:
    return f"This is a mock reply from {model} to: {prompt}."


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body ([DONE] kept as a string)."""
    payloads = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    return [p if p == "[DONE]" else orjson.loads(p) for p in payloads]


def sse_events(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        events.append((name_line.removeprefix("event: "), orjson.loads(data_line.removeprefix("data: "))))
    return events


# --------------------------------------------------------------------------- OpenAI chat


def test_chat_completion_with_openai_sdk(oai: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, mock!", "name": "ann"},
    ]
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=messages)

    text = "This is a mock reply from gpt-4o-mini to: Hello, mock!."
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.model == "gpt-4o-mini"
    assert reply.id.startswith("chatcmpl-mock-")
    prompt = 3 + (3 + n_tokens("system") + n_tokens("Be brief.")) + (3 + n_tokens("user") + n_tokens("Hello, mock!"))
    prompt += n_tokens("ann") + 1
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, n_tokens(text))
    assert reply.usage.total_tokens == prompt + n_tokens(text)


def test_reply_quotes_first_60_chars_of_last_user_message_parts(http: httpx.Client) -> None:
    long_text = "x" * 70
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": [{"type": "text", "text": long_text}]},
        ],
    }
    reply = http.post("/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"] == f"This is a mock reply from m to: {'x' * 60}."
    parts_prompt = 3 + sum(3 + n_tokens(m["role"]) for m in body["messages"])
    parts_prompt += n_tokens("earlier question") + n_tokens("earlier answer") + n_tokens(long_text)
    assert reply["usage"]["prompt_tokens"] == parts_prompt


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_truncates_with_finish_reason_length(http: httpx.Client, limit_field: str) -> None:
    full = http.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["message"]["content"]
    reply = http.post("/v1/chat/completions", json=chat_body(**{limit_field: 3})).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["message"]["content"] == ENC.decode(ENC.encode_ordinary(full)[:3])
    assert reply["usage"]["completion_tokens"] == 3


def test_stream_concatenation_equals_non_stream(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Tell me something,   please"}]
    plain = oai.chat.completions.create(model="gpt-4o", messages=messages)
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=messages, stream=True))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.usage is None for c in chunks)
    assert len(chunks) == 2 + len(plain.choices[0].message.content.split())  # role + words + finish


def test_stream_wire_format_without_usage(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    events = sse_data(response.text)
    *chunks, done = events
    assert done == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "This"}
    assert chunks[2]["choices"][0]["delta"] == {"content": " is"}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert len({c["id"] for c in chunks}) == 1


def test_stream_include_usage(http: httpx.Client, oai: openai.OpenAI) -> None:
    plain = http.post("/v1/chat/completions", json=chat_body(max_tokens=4)).json()
    body = chat_body(max_tokens=4, stream=True, stream_options={"include_usage": True})
    *chunks, usage_chunk, done = sse_data(http.post("/v1/chat/completions", json=body).text)

    assert done == "[DONE]"
    assert all("usage" in c and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]

    sdk_chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hello, mock!"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert sdk_chunks[-1].usage is not None
    assert sdk_chunks[-1].usage.completion_tokens == 4
    assert "".join(c.choices[0].delta.content or "" for c in sdk_chunks if c.choices) == (
        plain["choices"][0]["message"]["content"]
    )


def test_each_sse_event_is_its_own_http_chunk(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    conn = h11.Connection(h11.CLIENT)
    body = orjson.dumps(chat_body(stream=True))
    headers = [("host", "mock"), ("content-length", str(len(body))), *AUTH.items()]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers)))
        sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        raw = b""
        while not raw.endswith(b"0\r\n\r\n"):
            raw += sock.recv(65536)
    chunks = []
    rest = raw.split(b"\r\n\r\n", 1)[1]
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        rest = rest[size + 2 :]
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"data: ") == 1 for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- embeddings and models


def test_embeddings_with_openai_sdk(oai: openai.OpenAI) -> None:
    first = oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])  # base64 on the wire
    again = oai.embeddings.create(model="text-embedding-3-small", input="alpha")

    vectors = [d.embedding for d in first.data]
    assert [len(v) for v in vectors] == [8, 8]
    assert vectors[0] != vectors[1]
    assert again.data[0].embedding == vectors[0]
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-5)
    assert first.usage.prompt_tokens == first.usage.total_tokens == n_tokens("alpha") + n_tokens("beta")
    assert len(oai.embeddings.create(model="e", input="alpha", dimensions=32).data[0].embedding) == 32


def test_embeddings_float_and_token_inputs(http: httpx.Client) -> None:
    floats = http.post("/v1/embeddings", json={"model": "e", "input": "alpha", "encoding_format": "float"}).json()
    packed = http.post("/v1/embeddings", json={"model": "e", "input": "alpha", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert floats["data"][0]["embedding"] == pytest.approx(decoded, rel=1e-6)
    assert floats["object"] == "list" and floats["model"] == "e"

    tokens = http.post("/v1/embeddings", json={"model": "e", "input": [[1, 2, 3], [4, 5]]}).json()
    assert [d["index"] for d in tokens["data"]] == [0, 1]
    assert tokens["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    single = http.post("/v1/embeddings", json={"model": "e", "input": [1, 2, 3]}).json()
    assert single["data"][0]["embedding"] == tokens["data"][0]["embedding"]
    assert http.post("/v1/embeddings", json={"model": "e", "input": []}).status_code == 400


def test_models(oai: openai.OpenAI) -> None:
    ids = [model.id for model in oai.models.list()]
    assert "gpt-4o-mini" in ids and "text-embedding-3-small" in ids


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_messages_with_sdk(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="claude-test",
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": "Hi Claude"}],
    )
    text = mock_reply("claude-test", "Hi Claude")
    assert message.id.startswith("msg_mock_")
    assert (message.type, message.role, message.model) == ("message", "assistant", "claude-test")
    assert message.content[0].type == "text" and message.content[0].text == text
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert message.usage.input_tokens == n_tokens("Be brief.") + n_tokens("Hi Claude")
    assert message.usage.output_tokens == n_tokens(text)
    assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (0, 0)


def test_anthropic_max_tokens_stop_reason(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="c", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2


def test_anthropic_stream_with_sdk(claude: anthropic.Anthropic) -> None:
    kwargs: Any = {"model": "claude-test", "max_tokens": 100, "system": "Be brief.", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi Claude"}]}
    ]}
    plain = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == plain.content[0].text == mock_reply("claude-test", "Hi Claude")
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens


def test_anthropic_stream_wire_format(http: httpx.Client) -> None:
    body = {"model": "c", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    response = http.post("/v1/messages", json=body, headers={"x-api-key": API_KEY})
    assert response.headers["content-type"] == "text/event-stream"
    events = sse_events(response.text)
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert names == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * deltas,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert all(data["type"] == name for name, data in events)
    start_message = events[0][1]["message"]
    assert start_message["content"] == [] and start_message["stop_reason"] is None
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "This"}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": n_tokens(mock_reply("c", "Hi"))},
    }


# --------------------------------------------------------------------------- auth and errors


def test_openai_bad_key_is_401_without_echoing_key(base_url: str) -> None:
    client = openai.OpenAI(api_key="sk-wrong-secret", base_url=f"{base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    wrong = {"authorization": "Bearer sk-wrong-secret"}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), headers=wrong)
    assert response.status_code == 401
    assert "sk-wrong-secret" not in response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("authentication_error", "invalid_api_key", None)
    assert httpx.get(f"{base_url}/v1/models").status_code == 401


def test_anthropic_auth(base_url: str, claude: anthropic.Anthropic) -> None:
    body = {"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    wrong = httpx.post(f"{base_url}/v1/messages", json=body, headers={"x-api-key": "sk-wrong-secret"})
    assert wrong.status_code == 401
    assert wrong.json()["type"] == "error" and wrong.json()["error"]["type"] == "authentication_error"
    assert "sk-wrong-secret" not in wrong.text
    assert httpx.post(f"{base_url}/v1/messages", json=body, headers=AUTH).status_code == 200
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="nope", base_url=base_url, max_retries=0).messages.create(**body)


def test_x_mock_status(http: httpx.Client, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    failed = http.post("/v1/chat/completions", json=chat_body(), headers={"x-mock-status": "503"})
    assert failed.status_code == 503
    assert failed.json()["error"]["type"] == "server_error"
    with pytest.raises(openai.RateLimitError):
        oai.models.list(extra_headers={"x-mock-status": "429"})
    with pytest.raises(anthropic.InternalServerError) as caught:
        claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-status": "529"}
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert http.post("/v1/chat/completions", json=chat_body(), headers={"x-mock-status": "201"}).status_code == 200
    assert http.get("/v1/models", headers={"x-mock-status": "abc"}).status_code == 400


def test_unknown_path_is_404_and_malformed_json_is_400(http: httpx.Client) -> None:
    missing = http.post("/v1/nope", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/v1/chat/completions").status_code == 404
    malformed = http.post("/v1/chat/completions", content=b"{not json")
    assert malformed.status_code == 400
    assert set(malformed.json()["error"]) == {"message", "type", "code", "param"}
    assert http.post("/v1/messages", content=b"[1,", headers={"x-api-key": API_KEY}).json()["type"] == "error"


# --------------------------------------------------------------------------- test controls


def test_behaviour_applies_given_number_of_times(http: httpx.Client, base_url: str) -> None:
    behaviour = {"model": "flaky", "status": 500, "times": 2}
    assert httpx.post(f"{base_url}/_mock/behaviour", json=behaviour).json() == behaviour | {"latency_ms": 0, "reset": False}

    statuses = [http.post("/v1/chat/completions", json={**chat_body(), "model": "flaky"}).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_behaviour_without_times_lasts_until_reset(http: httpx.Client, base_url: str) -> None:
    httpx.post(f"{base_url}/_mock/behaviour", json={"model": "down", "status": 429}).raise_for_status()
    body = {"model": "down", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    assert [http.post("/v1/messages", json=body).status_code for _ in range(3)] == [429] * 3
    assert http.post("/v1/messages", json=body).json()["error"]["type"] == "rate_limit_error"
    httpx.post(f"{base_url}/_mock/reset").raise_for_status()
    assert http.post("/v1/messages", json=body).status_code == 200


def test_behaviour_latency_and_validation(http: httpx.Client, base_url: str) -> None:
    httpx.post(f"{base_url}/_mock/behaviour", json={"model": "slow", "latency_ms": 300, "times": 1}).raise_for_status()
    started = time.monotonic()
    assert http.post("/v1/chat/completions", json={**chat_body(), "model": "slow"}).status_code == 200
    assert time.monotonic() - started >= 0.3
    for bad in ({"model": ""}, {"model": 5}, {"model": "m", "status": 99}, {"model": "m", "times": 0}, [1]):
        assert httpx.post(f"{base_url}/_mock/behaviour", json=bad).status_code == 400


def test_latency_and_chunk_delay_headers(http: httpx.Client) -> None:
    started = time.monotonic()
    http.get("/v1/models", headers={"x-mock-latency-ms": "300"}).raise_for_status()
    assert time.monotonic() - started >= 0.3

    started = time.monotonic()
    response = http.post("/v1/chat/completions", json=chat_body(stream=True), headers={"x-mock-chunk-delay-ms": "50"})
    events = sse_data(response.text)
    assert time.monotonic() - started >= 0.05 * (len(events) - 1)


def test_drop_after_chunks(http: httpx.Client, oai: openai.OpenAI) -> None:
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers={"x-mock-drop-after-chunks": "2"}
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(line)
    assert len(received) == 2

    with pytest.raises((httpx.TransportError, openai.APIError)):
        stream = oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-mock-drop-after-chunks": "3"},
        )
        list(stream)


def test_end_after_chunks_ends_the_body_cleanly(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json=chat_body(stream=True), headers={"x-mock-end-after-chunks": "2"})
    events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    assert resp.status_code == 200 and len(events) == 2 and "data: [DONE]" not in events


def test_requests_are_recorded_before_controls(http: httpx.Client, base_url: str) -> None:
    http.post("/v1/chat/completions", json=chat_body(), headers={"x-trace": "abc"})
    httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), headers={"x-mock-status": "500"})  # no auth
    http.post("/v1/embeddings", content=b"{oops")
    httpx.get(f"{base_url}/_mock/requests")  # control calls are not recorded

    records = httpx.get(f"{base_url}/_mock/requests").json()
    assert [(r["method"], r["path"]) for r in records] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
    ]
    first = records[0]
    assert first["headers"]["x-trace"] == "abc"
    assert first["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert first["body"] == chat_body()
    assert first["raw_body_len"] == int(first["headers"]["content-length"])
    assert orjson.loads(base64.b64decode(first["raw_body_base64"])) == chat_body()
    assert "authorization" not in records[1]["headers"]
    assert records[2]["body"] is None and records[2]["raw_body_len"] == 5

    httpx.delete(f"{base_url}/_mock/requests").raise_for_status()
    assert httpx.get(f"{base_url}/_mock/requests").json() == []


# --------------------------------------------------------------------------- HTTP plumbing and lifecycle


def test_chunked_request_body_and_keep_alive(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    conn = h11.Connection(h11.CLIENT)
    body = orjson.dumps(chat_body("chunked"))
    requests = [
        [("transfer-encoding", "chunked")],
        [("content-length", str(len(body)))],
    ]
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for framing in requests:
            headers = [("host", "m"), *AUTH.items(), *framing]
            sock.sendall(conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers)))
            if framing[0][0] == "transfer-encoding":
                sock.sendall(conn.send(h11.Data(data=body[:10])) + conn.send(h11.Data(data=body[10:])))
            else:
                sock.sendall(conn.send(h11.Data(data=body)))
            sock.sendall(conn.send(h11.EndOfMessage()))
            payload = b""
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Data):
                    payload += event.data
            replies.append(orjson.loads(payload))
            conn.start_next_cycle()
    assert [r["choices"][0]["message"]["content"] for r in replies] == [mock_reply("gpt-4o-mini", "chunked")] * 2


def test_sigterm_exits_cleanly() -> None:
    proc, url = spawn()
    assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
    proc.terminate()
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert stderr == ""


def test_start_in_process_without_api_key() -> None:
    async def scenario() -> tuple[int, int]:
        provider = await start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{provider.port}") as client:
                chat = await client.post("/v1/chat/completions", json=chat_body())
                models = await client.get("/v1/models")
            return chat.status_code, models.status_code
        finally:
            await provider.close()

    assert asyncio.run(scenario()) == (200, 200)


# --------------------------------------------------------------------------- Azure OpenAI

AZURE_VERSION = "2024-06-01"
AZURE_AUTH = {"api-key": API_KEY}


def azure_path(deployment: str, operation: str = "chat/completions", version: str | None = AZURE_VERSION) -> str:
    query = f"?api-version={version}" if version is not None else ""
    return f"/openai/deployments/{deployment}/{operation}{query}"


@pytest.fixture
def azure(base_url: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(api_key=API_KEY, azure_endpoint=base_url, api_version=AZURE_VERSION, max_retries=0)


def test_azure_chat_and_embeddings_with_sdk(azure: openai.AzureOpenAI, base_url: str) -> None:
    messages: Any = [{"role": "user", "content": "Hello, Azure!"}]
    reply = azure.chat.completions.create(model="my-deployment", messages=messages)
    chunks = list(azure.chat.completions.create(model="my-deployment", messages=messages, stream=True))
    vectors = azure.embeddings.create(model="embed-deployment", input="alpha")

    assert reply.model == "my-deployment"
    assert reply.choices[0].message.content == mock_reply("my-deployment", "Hello, Azure!")
    assert reply.usage is not None and reply.usage.completion_tokens == n_tokens(reply.choices[0].message.content)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert vectors.model == "embed-deployment" and len(vectors.data[0].embedding) == 8
    records = httpx.get(f"{base_url}/_mock/requests").json()
    assert [r["path"] for r in records] == [
        azure_path("my-deployment"), azure_path("my-deployment"), azure_path("embed-deployment", "embeddings"),
    ]  # fmt: skip
    assert all(r["headers"]["api-key"] == API_KEY for r in records)


def test_azure_answers_for_the_deployment_not_the_body_model(base_url: str) -> None:
    openai_reply = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), headers=AUTH).json()
    azure_reply = httpx.post(f"{base_url}{azure_path('prod-gpt')}", json=chat_body(), headers=AZURE_AUTH).json()
    assert azure_reply["model"] == "prod-gpt"
    assert azure_reply["choices"][0]["message"]["content"] == mock_reply("prod-gpt", "Hello, mock!")
    assert azure_reply["usage"]["prompt_tokens"] == openai_reply["usage"]["prompt_tokens"]
    no_model = {"input": "alpha"}  # Azure needs no body model: the path names the deployment
    embedded = httpx.post(f"{base_url}{azure_path('emb', 'embeddings')}", json=no_model, headers=AZURE_AUTH).json()
    assert embedded["model"] == "emb"
    encoded = httpx.post(f"{base_url}{azure_path('a%20b')}", json=chat_body(), headers=AZURE_AUTH).json()
    assert encoded["model"] == "a b"


def test_azure_requires_api_version_then_api_key(base_url: str) -> None:
    unversioned = httpx.post(f"{base_url}{azure_path('d', version=None)}", json=chat_body(), headers=AZURE_AUTH)
    assert unversioned.status_code == 400
    assert unversioned.json()["error"]["code"] == "MissingApiVersionParameter"
    assert "api-version" in unversioned.json()["error"]["message"]
    empty = httpx.post(f"{base_url}{azure_path('d', version='')}", json=chat_body(), headers=AZURE_AUTH)
    assert empty.status_code == 400

    for headers in ({"api-key": "sk-wrong-secret"}, AUTH, {}):  # a Bearer token is not Azure's api-key
        denied = httpx.post(f"{base_url}{azure_path('d')}", json=chat_body(), headers=headers)
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "401"
        assert denied.json()["error"]["type"] == "authentication_error"
        assert "sk-wrong-secret" not in denied.text
    with pytest.raises(openai.AuthenticationError):
        openai.AzureOpenAI(
            api_key="nope", azure_endpoint=base_url, api_version=AZURE_VERSION, max_retries=0
        ).chat.completions.create(model="d", messages=[{"role": "user", "content": "x"}])


def test_azure_annotates_answers_with_its_content_filter(base_url: str, azure: openai.AzureOpenAI) -> None:
    """As Azure's default content filter does: `prompt_filter_results` beside the choices, and
    in a stream as a first chunk with empty `choices`, `id` and `model`; `content_filter_results`
    on each choice and on each chunk with text. The openai SDK reads both."""
    messages: Any = [{"role": "user", "content": "Hello, Azure!"}]
    reply = httpx.post(f"{base_url}{azure_path('d')}", json=chat_body(), headers=AZURE_AUTH).json()
    assert reply["prompt_filter_results"][0]["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
    assert reply["choices"][0]["content_filter_results"]["violence"]["filtered"] is False
    chunks = list(azure.chat.completions.create(model="d", messages=messages, stream=True))
    first = chunks[0].model_dump()
    assert first["choices"] == [] and first["id"] == "" and first["model"] == ""
    assert first["prompt_filter_results"][0]["prompt_index"] == 0
    texts = [c.model_dump()["choices"][0] for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert texts and all(t["content_filter_results"]["hate"]["severity"] == "safe" for t in texts)
    assert "".join(t["delta"]["content"] for t in texts) == mock_reply("d", "Hello, Azure!")


def test_azure_refuses_stream_options_before_api_version_2024_09_01(base_url: str) -> None:
    """Azure api-versions before 2024-09-01(-preview) answer 400 to `stream_options`; later
    dated ones, and undated ones (the v1 API's `preview`, `latest`), take it."""
    body = {**chat_body(), "stream": True, "stream_options": {"include_usage": True}}
    for version in ("2024-06-01", "2024-08-01-preview", "2023-05-15"):
        refused = httpx.post(f"{base_url}{azure_path('d', version=version)}", json=body, headers=AZURE_AUTH)
        assert refused.status_code == 400, version
        assert refused.json()["error"]["message"] == "Unrecognized request argument supplied: stream_options"
    for version in ("2024-09-01-preview", "2024-10-21", "2025-04-01-preview", "preview"):
        served = httpx.post(f"{base_url}{azure_path('d', version=version)}", json=body, headers=AZURE_AUTH)
        assert served.status_code == 200 and '"usage":{"prompt_tokens"' in served.text, version
    plain = httpx.post(f"{base_url}{azure_path('d', version='2024-06-01')}", json={**chat_body(), "stream": True},
                       headers=AZURE_AUTH)
    assert plain.status_code == 200 and plain.text.endswith("data: [DONE]\n\n")


def test_azure_errors_and_malformed_body(base_url: str, azure: openai.AzureOpenAI) -> None:
    throttled = httpx.post(
        f"{base_url}{azure_path('d')}", json=chat_body(), headers={**AZURE_AUTH, "x-mock-status": "429"}
    )
    assert throttled.status_code == 429
    assert throttled.json()["error"] | {"message": ""} == {
        "message": "", "type": "rate_limit_error", "code": "429", "param": None,
    }  # fmt: skip
    with pytest.raises(openai.InternalServerError):
        azure.chat.completions.create(
            model="d", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-status": "503"}
        )
    malformed = httpx.post(f"{base_url}{azure_path('d')}", content=b"{oops", headers=AZURE_AUTH)
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    no_messages = httpx.post(f"{base_url}{azure_path('d')}", json={"model": "x"}, headers=AZURE_AUTH)
    assert no_messages.status_code == 400
    assert httpx.get(f"{base_url}{azure_path('d')}", headers=AZURE_AUTH).status_code == 404


# --------------------------------------------------------------------------- AWS Bedrock Converse

BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
AWS_CREDENTIALS = Credentials("AKIDMOCKEXAMPLE", "mock-secret-access-key")
AWS_REGION = "us-east-1"


def bedrock_path(model: str = BEDROCK_MODEL, *, stream: bool = False) -> str:
    return f"/model/{quote(model, safe='')}/" + ("converse-stream" if stream else "converse")


def bedrock_body(text: str = "Hi Bedrock", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"text": text}]}], **extra}


def sigv4_headers(url: str, payload: bytes) -> dict[str, str]:
    """A JSON POST's headers signed with SigV4 exactly as botocore signs them."""
    request = AWSRequest(method="POST", url=url, data=payload, headers={"content-type": "application/json"})
    SigV4Auth(AWS_CREDENTIALS, "bedrock", AWS_REGION).add_auth(request)
    return dict(request.headers.items())


def post_bedrock(base_url: str, body: Any, *, stream: bool = False, headers: dict[str, str] | None = None,
                 model: str = BEDROCK_MODEL) -> httpx.Response:
    """A signed Converse call; ``headers`` (the ``x-mock-*`` controls) are added unsigned."""
    url = base_url + bedrock_path(model, stream=stream)
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(url, content=payload, headers={**sigv4_headers(url, payload), **(headers or {})})


def assert_sigv4_valid(base_url: str, record: dict[str, Any]) -> None:
    """Recompute the request's SigV4 signature from what the mock recorded (headers + raw body)."""
    headers = record["headers"]
    signed = headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    request = AWSRequest(
        method=record["method"],
        url=base_url + record["path"],
        data=base64.b64decode(record["raw_body_base64"]),
        headers={name: headers[name] for name in signed},
    )
    request.context["timestamp"] = headers["x-amz-date"]
    auth = SigV4Auth(AWS_CREDENTIALS, "bedrock", AWS_REGION)
    signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    assert headers["authorization"].endswith(f"Signature={signature}")


def decode_eventstream(raw: bytes) -> list[tuple[dict[str, str], Any]]:
    """Complete messages decoded by the gateway's decoder, checked against botocore's."""
    ours = [(headers, orjson.loads(payload)) for headers, payload in eventstream.Decoder().feed(raw)]
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    theirs = [(dict(message.headers), orjson.loads(message.payload)) for message in buffer]
    assert ours == theirs
    return ours


def dropped_body(method: str, url: str, **kwargs: Any) -> bytes:
    """The bytes received before the mock aborted the connection mid-body."""
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream(method, url, **kwargs) as response:
            for chunk in response.iter_raw():
                received += chunk
    return bytes(received)


@pytest.fixture
def bedrock(base_url: str) -> Any:
    return botocore.session.get_session().create_client(
        "bedrock-runtime",
        region_name=AWS_REGION,
        endpoint_url=base_url,
        aws_access_key_id=AWS_CREDENTIALS.access_key,
        aws_secret_access_key=AWS_CREDENTIALS.secret_key,
        config=Config(retries={"total_max_attempts": 1}),
    )


def test_bedrock_converse_with_botocore(bedrock: Any, base_url: str) -> None:
    reply = bedrock.converse(
        modelId=BEDROCK_MODEL,
        system=[{"text": "Be brief."}],
        messages=[{"role": "user", "content": [{"text": "Hi Bedrock"}]}],
        inferenceConfig={"maxTokens": 100},
    )
    text = mock_reply(BEDROCK_MODEL, "Hi Bedrock")
    assert reply["output"]["message"] == {"role": "assistant", "content": [{"text": text}]}
    assert reply["stopReason"] == "end_turn"
    input_tokens = n_tokens("Be brief.") + n_tokens("Hi Bedrock")
    assert reply["usage"] == {
        "inputTokens": input_tokens, "outputTokens": n_tokens(text), "totalTokens": input_tokens + n_tokens(text),
    }  # fmt: skip
    assert reply["metrics"] == {"latencyMs": 0}

    [record] = httpx.get(f"{base_url}/_mock/requests").json()
    assert record["path"] == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert record["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDMOCKEXAMPLE/")
    assert_sigv4_valid(base_url, record)


def test_bedrock_max_tokens_and_non_text_blocks(base_url: str) -> None:
    body = bedrock_body(inferenceConfig={"maxTokens": 2})
    body["messages"][0]["content"].insert(0, {"image": {"format": "png", "source": {"bytes": "AAAA"}}})
    reply = post_bedrock(base_url, body).json()
    assert reply["stopReason"] == "max_tokens"
    assert reply["usage"]["outputTokens"] == 2 and reply["usage"]["inputTokens"] == n_tokens("Hi Bedrock")
    assert reply["output"]["message"]["content"][0]["text"] == ENC.decode(
        ENC.encode_ordinary(mock_reply(BEDROCK_MODEL, "Hi Bedrock"))[:2]
    )


def test_bedrock_converse_stream_with_botocore(bedrock: Any) -> None:
    kwargs: Any = {"modelId": BEDROCK_MODEL, "messages": [{"role": "user", "content": [{"text": "Hi Bedrock"}]}]}
    plain = bedrock.converse(**kwargs)
    events = list(bedrock.converse_stream(**kwargs)["stream"])

    kinds = [next(iter(event)) for event in events]
    deltas = kinds.count("contentBlockDelta")
    assert kinds == ["messageStart", *["contentBlockDelta"] * deltas, "contentBlockStop", "messageStop", "metadata"]
    assert events[0]["messageStart"] == {"role": "assistant"}
    streamed = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert streamed == plain["output"]["message"]["content"][0]["text"]
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"
    assert events[-1]["metadata"]["usage"] == plain["usage"]


def test_bedrock_stream_wire_format(base_url: str) -> None:
    response = post_bedrock(base_url, bedrock_body(), stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
    messages = decode_eventstream(response.content)
    assert all(
        {k: v for k, v in headers.items() if k != ":event-type"} == {
            ":content-type": "application/json", ":message-type": "event",
        }
        for headers, _ in messages
    )  # fmt: skip
    names = [headers[":event-type"] for headers, _ in messages]
    words = mock_reply(BEDROCK_MODEL, "Hi Bedrock").split(" ")
    assert names == ["messageStart", *["contentBlockDelta"] * len(words), "contentBlockStop", "messageStop", "metadata"]
    assert messages[1][1] == {"delta": {"text": "This"}, "contentBlockIndex": 0}
    assert messages[2][1] == {"delta": {"text": " is"}, "contentBlockIndex": 0}
    assert messages[-3][1] == {"contentBlockIndex": 0}
    assert messages[-1][1]["metrics"] == {"latencyMs": 0}


def test_bedrock_auth(base_url: str) -> None:
    url = base_url + bedrock_path()
    unsigned = httpx.post(url, json=bedrock_body())
    assert unsigned.status_code == 403
    assert unsigned.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
    assert set(unsigned.json()) == {"message"}
    bearer = httpx.post(url, json=bedrock_body(), headers={**AUTH, "x-amz-date": "20240101T000000Z"})
    assert bearer.status_code == 403
    assert bearer.headers["x-amzn-errortype"] == "IncompleteSignatureException"
    assert post_bedrock(base_url, bedrock_body()).status_code == 200


@pytest.mark.parametrize("body", [
    b"{oops",
    {"messages": []},
    {"messages": [{"role": "system", "content": [{"text": "x"}]}]},
    {"messages": [{"role": "user", "content": "plain string"}]},
    bedrock_body(system="Be brief."),
    bedrock_body(inferenceConfig={"maxTokens": 0}),
    bedrock_body(inferenceConfig=[]),
])  # fmt: skip
def test_bedrock_malformed_body_is_validation_exception(base_url: str, body: Any) -> None:
    response = post_bedrock(base_url, body)
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    assert set(response.json()) == {"message"}


@pytest.mark.parametrize(("status", "error_type"), [
    (400, "ValidationException"),
    (403, "AccessDeniedException"),
    (429, "ThrottlingException"),
    (500, "InternalServerException"),
    (503, "ServiceUnavailableException"),
    (529, "InternalServerException"),
])  # fmt: skip
def test_bedrock_x_mock_status(base_url: str, status: int, error_type: str) -> None:
    for stream in (False, True):
        response = post_bedrock(base_url, bedrock_body(), stream=stream, headers={"x-mock-status": str(status)})
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-amzn-errortype"] == error_type
        assert response.json() == {"message": "Mock error requested via x-mock-status."}


def test_bedrock_errors_parse_with_botocore(bedrock: Any) -> None:
    def add_status(request: AWSRequest, **_: Any) -> None:
        request.headers["x-mock-status"] = "429"

    bedrock.meta.events.register("before-sign.bedrock-runtime.Converse", add_status)
    with pytest.raises(ClientError) as caught:
        bedrock.converse(modelId=BEDROCK_MODEL, messages=[{"role": "user", "content": [{"text": "x"}]}])
    assert caught.value.response["Error"]["Code"] == "ThrottlingException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429


def test_bedrock_stream_drop_after_and_chunk_delay(base_url: str) -> None:
    url = base_url + bedrock_path(stream=True)
    payload = orjson.dumps(bedrock_body())
    headers = sigv4_headers(url, payload)

    raw = dropped_body("POST", url, content=payload, headers={**headers, "x-mock-drop-after-chunks": "3"})
    messages = decode_eventstream(raw)
    assert [h[":event-type"] for h, _ in messages] == ["messageStart", "contentBlockDelta", "contentBlockDelta"]
    assert len(raw) == sum(len(eventstream.encode(h, orjson.dumps(p))) for h, p in messages)  # whole messages

    started = time.monotonic()
    response = httpx.post(url, content=payload, headers={**headers, "x-mock-chunk-delay-ms": "40"})
    count = len(decode_eventstream(response.content))
    assert time.monotonic() - started >= 0.04 * (count - 1)


# --------------------------------------------------------------------------- Google Gemini

GEMINI_MODEL = "gemini-2.0-flash"
GEMINI_AUTH = {"x-goog-api-key": API_KEY}


def gemini_path(method: str = "generateContent", model: str = GEMINI_MODEL, version: str = "v1beta") -> str:
    return f"/{version}/models/{model}:{method}"


def gemini_body(text: str = "Hi Gemini", **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def gemini_sse(text: str) -> list[Any]:
    """Gemini's SSE: every event is `data: {...}\\r\\n\\r\\n`."""
    *events, tail = text.split("\r\n\r\n")
    assert tail == "" and all(event.startswith("data: ") and "\n" not in event for event in events)
    return [orjson.loads(event.removeprefix("data: ")) for event in events]


def test_gemini_generate_content(base_url: str) -> None:
    body = gemini_body(
        systemInstruction={"parts": [{"text": "Be brief."}]},
        generationConfig={"maxOutputTokens": 100, "temperature": 0.2},
    )
    body["contents"] = [
        {"role": "user", "parts": [{"text": "earlier"}]},
        {"role": "model", "parts": [{"text": "answer"}]},
        {"parts": [{"text": "Hi Gemini"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]},
    ]
    response = httpx.post(f"{base_url}{gemini_path()}", json=body, headers=GEMINI_AUTH)
    assert response.status_code == 200
    text = mock_reply(GEMINI_MODEL, "Hi Gemini")
    prompt = sum(n_tokens(t) for t in ("Be brief.", "earlier", "answer", "Hi Gemini"))
    reply = response.json()
    assert reply["candidates"] == [
        {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}
    ]
    assert reply["usageMetadata"] == {
        "promptTokenCount": prompt, "candidatesTokenCount": n_tokens(text), "totalTokenCount": prompt + n_tokens(text),
    }  # fmt: skip
    assert reply["modelVersion"] == GEMINI_MODEL
    assert reply["responseId"].startswith("mock-")

    v1 = httpx.post(f"{base_url}{gemini_path(version='v1')}", json=gemini_body(), headers=AUTH)  # Bearer works too
    assert v1.json()["candidates"][0]["content"]["parts"][0]["text"] == text


def test_gemini_max_output_tokens(base_url: str) -> None:
    body = gemini_body(generationConfig={"maxOutputTokens": 3})
    reply = httpx.post(f"{base_url}{gemini_path()}", json=body, headers=GEMINI_AUTH).json()
    assert reply["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert reply["usageMetadata"]["candidatesTokenCount"] == 3


def test_gemini_stream_sse(base_url: str) -> None:
    body = gemini_body(generationConfig={"maxOutputTokens": 5})
    plain = httpx.post(f"{base_url}{gemini_path()}", json=body, headers=GEMINI_AUTH).json()
    url = f"{base_url}{gemini_path('streamGenerateContent')}?alt=sse"
    response = httpx.post(url, json=body, headers=GEMINI_AUTH)
    assert response.headers["content-type"] == "text/event-stream"
    events = gemini_sse(response.text)

    text = plain["candidates"][0]["content"]["parts"][0]["text"]
    assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in events] == text.split(" ")[:1] + [
        f" {word}" for word in text.split(" ")[1:]
    ]
    assert all(e["usageMetadata"] == plain["usageMetadata"] for e in events)
    assert [e["candidates"][0].get("finishReason") for e in events] == [None] * (len(events) - 1) + ["MAX_TOKENS"]
    assert all(e["candidates"][0]["content"]["role"] == "model" and e["modelVersion"] == GEMINI_MODEL for e in events)
    assert len({e["responseId"] for e in events}) == 1


def test_gemini_stream_without_alt_is_a_json_array(base_url: str) -> None:
    url = f"{base_url}{gemini_path('streamGenerateContent')}"
    response = httpx.post(url, json=gemini_body(), headers=GEMINI_AUTH)
    assert response.headers["content-type"] == "application/json"
    sse = gemini_sse(httpx.post(f"{url}?alt=sse", json=gemini_body(), headers=GEMINI_AUTH).text)
    array = orjson.loads(response.content)
    assert [{**item, "responseId": ""} for item in array] == [{**item, "responseId": ""} for item in sse]


def test_gemini_auth(base_url: str) -> None:
    url = f"{base_url}{gemini_path()}"
    missing = httpx.post(url, json=gemini_body())
    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED" and missing.json()["error"]["code"] == 403
    for headers in ({"x-goog-api-key": "sk-wrong-secret"}, {"authorization": "Bearer sk-wrong-secret"}):
        wrong = httpx.post(url, json=gemini_body(), headers=headers)
        assert wrong.status_code == 401
        assert wrong.json()["error"]["status"] == "UNAUTHENTICATED"
        assert "sk-wrong-secret" not in wrong.text


@pytest.mark.parametrize("body", [
    b"{oops",
    {"contents": []},
    {"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]},
    {"contents": [{"role": "user", "parts": "x"}]},
    gemini_body(systemInstruction="Be brief."),
    gemini_body(generationConfig={"maxOutputTokens": -1}),
])  # fmt: skip
def test_gemini_malformed_body_is_invalid_argument(base_url: str, body: Any) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = httpx.post(f"{base_url}{gemini_path()}", content=content, headers=GEMINI_AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (set(error), error["code"], error["status"]) == ({"code", "message", "status"}, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize(("status", "google_status"), [
    (404, "NOT_FOUND"), (429, "RESOURCE_EXHAUSTED"), (500, "INTERNAL"), (503, "UNAVAILABLE"),
    (504, "DEADLINE_EXCEEDED"), (529, "INTERNAL"),
])  # fmt: skip
def test_gemini_x_mock_status(base_url: str, status: int, google_status: str) -> None:
    for method in ("generateContent", "streamGenerateContent?alt=sse"):
        headers = {**GEMINI_AUTH, "x-mock-status": str(status)}
        response = httpx.post(f"{base_url}{gemini_path(method)}", json=gemini_body(), headers=headers)
        assert response.status_code == status
        assert response.json() == {
            "error": {"code": status, "message": "Mock error requested via x-mock-status.", "status": google_status}
        }


def test_gemini_stream_drop_after_and_chunk_delay(base_url: str) -> None:
    url = f"{base_url}{gemini_path('streamGenerateContent')}?alt=sse"
    headers = {**GEMINI_AUTH, "x-mock-drop-after-chunks": "2"}
    raw = dropped_body("POST", url, json=gemini_body(), headers=headers)
    events = gemini_sse(raw.decode())
    assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in events] == ["This", " is"]

    started = time.monotonic()
    response = httpx.post(url, json=gemini_body(), headers={**GEMINI_AUTH, "x-mock-chunk-delay-ms": "40"})
    assert time.monotonic() - started >= 0.04 * (len(gemini_sse(response.text)) - 1)


# --------------------------------------------------------------------------- behaviours across providers


def every_api_status(base_url: str) -> dict[str, int]:
    """One request to each API of the mock (all for model ``m``), by name -> HTTP status."""
    anthropic_body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    return {
        "openai": httpx.post(f"{base_url}/v1/chat/completions", json={**chat_body(), "model": "m"},
                             headers=AUTH).status_code,
        "models": httpx.get(f"{base_url}/v1/models", headers=AUTH).status_code,
        "anthropic": httpx.post(f"{base_url}/v1/messages", json=anthropic_body, headers=AUTH).status_code,
        "azure": httpx.post(f"{base_url}{azure_path('m')}", json=chat_body(), headers=AZURE_AUTH).status_code,
        "bedrock": post_bedrock(base_url, bedrock_body(), model="m").status_code,
        "gemini": httpx.post(f"{base_url}{gemini_path(model='m')}", json=gemini_body(),
                             headers=GEMINI_AUTH).status_code,
    }


def test_behaviour_without_model_fails_the_whole_instance(base_url: str) -> None:
    created = httpx.post(f"{base_url}/_mock/behaviour", json={"status": 500})
    assert created.json() == {"model": "*", "status": 500, "times": None, "latency_ms": 0, "reset": False}
    assert set(every_api_status(base_url).values()) == {500}
    bedrock = post_bedrock(base_url, bedrock_body())
    assert bedrock.headers["x-amzn-errortype"] == "InternalServerException"
    assert bedrock.json() == {"message": "Mock error configured for every model."}
    gemini = httpx.post(f"{base_url}{gemini_path()}", json=gemini_body(), headers=GEMINI_AUTH)
    assert gemini.json()["error"]["status"] == "INTERNAL"

    httpx.post(f"{base_url}/_mock/reset").raise_for_status()
    assert set(every_api_status(base_url).values()) == {200}


def test_model_behaviour_wins_over_wildcard(base_url: str) -> None:
    httpx.post(f"{base_url}/_mock/behaviour", json={"model": "*", "status": 503, "times": 2}).raise_for_status()
    httpx.post(f"{base_url}/_mock/behaviour", json={"model": "m", "status": 200}).raise_for_status()
    statuses = every_api_status(base_url)
    assert statuses.pop("models") == 503  # no model: only the wildcard matches (and uses one of its times)
    assert set(statuses.values()) == {200}  # model "m" has its own behaviour, which wins
    chat = [httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), headers=AUTH) for _ in range(2)]
    assert [r.status_code for r in chat] == [503, 200]


def test_behaviour_model_is_the_path_model(base_url: str) -> None:
    for model in (BEDROCK_MODEL, "prod-deployment", GEMINI_MODEL):
        httpx.post(f"{base_url}/_mock/behaviour", json={"model": model, "status": 429}).raise_for_status()
    throttled = post_bedrock(base_url, bedrock_body())
    assert (throttled.status_code, throttled.headers["x-amzn-errortype"]) == (429, "ThrottlingException")
    azure = httpx.post(f"{base_url}{azure_path('prod-deployment')}", json=chat_body(), headers=AZURE_AUTH)
    assert azure.status_code == 429  # the body's model (gpt-4o-mini) plays no part on Azure
    assert httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), headers=AUTH).status_code == 200
    gemini = httpx.post(f"{base_url}{gemini_path()}", json=gemini_body(), headers=GEMINI_AUTH)
    assert gemini.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


# --------------------------------------------------------------------------- tool calls and JSON mode

WEATHER_PARAMETERS = {
    "type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1}, "note": {"type": ["string", "null"]},
                   "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}},
    "$defs": {"tag": {"type": "string"}}}
WEATHER_ARGS = {"city": "mock", "unit": "celsius", "days": 1}
OPENAI_TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
                     {"type": "function", "function": {"name": "get_time"}}]


def test_openai_tool_call_fits_the_first_tool_then_answers_its_result(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "weather?"}]
    done = oai.chat.completions.create(model="gpt-4o", messages=messages, tools=OPENAI_TOOLS)
    [call] = done.choices[0].message.tool_calls or []
    assert done.choices[0].finish_reason == "tool_calls" and done.choices[0].message.content is None
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == WEATHER_ARGS
    forced = oai.chat.completions.create(model="gpt-4o", messages=messages, tools=OPENAI_TOOLS,
                                         tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (forced.choices[0].message.tool_calls or [])[0].function.arguments == "{}"
    none = oai.chat.completions.create(model="gpt-4o", messages=messages, tools=OPENAI_TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    answered = oai.chat.completions.create(model="gpt-4o", tools=OPENAI_TOOLS, messages=[
        *messages, {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert answered.choices[0].message.content == mock_reply("gpt-4o", "weather?")
    with oai.chat.completions.stream(model="gpt-4o", messages=messages, tools=OPENAI_TOOLS) as stream:
        final = stream.get_final_completion()
    streamed = (final.choices[0].message.tool_calls or [])[0]
    assert (streamed.function.name, orjson.loads(streamed.function.arguments)) == ("get_weather", WEATHER_ARGS)
    assert final.choices[0].finish_reason == "tool_calls"


def test_openai_json_modes(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    plain = oai.chat.completions.create(model="gpt-4o", messages=messages, response_format={"type": "json_object"})
    assert orjson.loads(plain.choices[0].message.content or "") == {"reply": mock_reply("gpt-4o", "hi")}
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "number"}},
              "required": ["answer", "score"], "additionalProperties": False}
    fitted = oai.chat.completions.create(model="gpt-4o", messages=messages, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": schema}})
    assert orjson.loads(fitted.choices[0].message.content or "") == {"answer": "mock", "score": 1.0}


def test_anthropic_tool_use_with_sdk(claude: anthropic.Anthropic) -> None:
    tools: Any = [{"name": "get_weather", "input_schema": WEATHER_PARAMETERS}]
    messages: Any = [{"role": "user", "content": "weather?"}]
    msg = claude.messages.create(model="claude-x", max_tokens=100, tools=tools, messages=messages)
    assert msg.stop_reason == "tool_use" and msg.content[0].type == "tool_use"
    assert msg.content[0].name == "get_weather" and msg.content[0].input == WEATHER_ARGS
    with claude.messages.stream(model="claude-x", max_tokens=100, tools=tools, messages=messages) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == WEATHER_ARGS
    answered = claude.messages.create(model="claude-x", max_tokens=100, tools=tools, messages=[
        *messages, {"role": "assistant", "content": [msg.content[0].model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": msg.content[0].id, "content": "sunny"}]}])
    assert answered.stop_reason == "end_turn" and answered.content[0].type == "text"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    structured = claude.messages.create(model="claude-x", max_tokens=100, messages=messages, extra_body={
        "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    assert structured.content[0].type == "text" and orjson.loads(structured.content[0].text) == {"ok": True}


def test_bedrock_tool_use_with_botocore(bedrock: Any) -> None:
    kwargs: Any = {"modelId": BEDROCK_MODEL, "messages": [{"role": "user", "content": [{"text": "weather?"}]}],
                   "toolConfig": {"tools": [{"toolSpec": {"name": "get_weather",
                                                          "inputSchema": {"json": WEATHER_PARAMETERS}}}]}}
    reply = bedrock.converse(**kwargs)
    [block] = reply["output"]["message"]["content"]
    assert reply["stopReason"] == "tool_use"
    assert block["toolUse"]["name"] == "get_weather" and block["toolUse"]["input"] == WEATHER_ARGS
    events = list(bedrock.converse_stream(**kwargs)["stream"])
    streamed = "".join(e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in events if "contentBlockDelta" in e)
    assert orjson.loads(streamed) == WEATHER_ARGS
    assert events[1]["contentBlockStart"]["start"]["toolUse"]["name"] == "get_weather"


def test_gemini_function_call_json_mode_and_gemini_3_signatures(base_url: str) -> None:
    tools = [{"functionDeclarations": [{"name": "get_weather", "parameters": WEATHER_PARAMETERS}]}]
    reply = httpx.post(f"{base_url}{gemini_path()}", json=gemini_body(tools=tools), headers=GEMINI_AUTH).json()
    assert reply["candidates"][0]["content"]["parts"] == [{"functionCall": {"name": "get_weather",
                                                                            "args": WEATHER_ARGS}}]
    config = {"responseMimeType": "application/json", "responseJsonSchema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}
    fitted = httpx.post(f"{base_url}{gemini_path()}", json=gemini_body(generationConfig=config),
                        headers=GEMINI_AUTH).json()
    assert orjson.loads(fitted["candidates"][0]["content"]["parts"][0]["text"]) == {"ok": True}
    path = gemini_path(model="gemini-3-pro-preview")
    signed = httpx.post(f"{base_url}{path}", json=gemini_body(tools=tools), headers=GEMINI_AUTH).json()
    part = signed["candidates"][0]["content"]["parts"][0]
    assert part["thoughtSignature"]
    history = gemini_body(tools=tools)
    history["contents"] += [{"role": "model", "parts": [part]},
                            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                                             "response": {"t": 20}}}]}]
    assert httpx.post(f"{base_url}{path}", json=history, headers=GEMINI_AUTH).status_code == 200
    del part["thoughtSignature"]
    refused = httpx.post(f"{base_url}{path}", json=history, headers=GEMINI_AUTH)
    assert refused.status_code == 400 and "thought_signature" in refused.json()["error"]["message"]


@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
def test_garbage_mid_stream_then_the_stream_carries_on(http: httpx.Client, kind: str) -> None:
    body = chat_body(stream=True)
    clean = http.post("/v1/chat/completions", json=body).content
    dirty = http.post("/v1/chat/completions", json=body, headers={
        "x-mock-garbage-after-chunks": "2", "x-mock-garbage": kind}).content
    events = re.sub(rb"chatcmpl-mock-\d+", b"id", clean).split(b"\n\n")
    broken = re.sub(rb"chatcmpl-mock-\d+", b"id", dirty).split(b"\n\n")
    assert len(broken) == len(events) + 1 and broken[:2] == events[:2] and broken[3:] == events[2:]
    assert http.post("/v1/chat/completions", json=body, headers={"x-mock-garbage": "nonsense"}).status_code == 400


@pytest.mark.parametrize(("path", "body", "headers"), [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": 5}}], "tool_choice": 7}, {}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": 5}, {}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "f", "input_schema": {"type": "object", "properties": 5}}]},
     {"x-api-key": API_KEY}),
])
def test_a_body_of_the_wrong_shape_is_a_400_as_providers_answer(http: httpx.Client, path: str, body: dict,
                                                                 headers: dict) -> None:
    """It crashed the mock (a 500), so the gateway retried a caller's mistake on the next backend."""
    response = http.post(path, json=body, headers=headers)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert "error" in response.json()


def test_cache_writes_are_reported_as_each_api_does(base_url: str, claude: anthropic.Anthropic,
                                                    oai: openai.OpenAI) -> None:
    """`x-mock-cache-write-tokens` / `x-mock-cache-write-1h-tokens`: part of the prompt written
    to the cache, at most all of it, 1-hour first, in each API's own usage fields; only for a
    request that marks something for caching (`cache_control`, Converse's `cachePoint`)."""
    prompt = n_tokens("Be brief.") + n_tokens("Hi Claude")
    headers = {"x-mock-cache-write-tokens": "1000", "x-mock-cache-write-1h-tokens": "2"}
    system: Any = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    message = claude.messages.create(model="claude-test", max_tokens=100, system=system,
                                     messages=[{"role": "user", "content": "Hi Claude"}], extra_headers=headers)
    assert (message.usage.input_tokens, message.usage.cache_creation_input_tokens) == (0, prompt)
    assert message.usage.cache_creation is not None
    assert (message.usage.cache_creation.ephemeral_5m_input_tokens,
            message.usage.cache_creation.ephemeral_1h_input_tokens) == (prompt - 2, 2)
    unmarked = claude.messages.create(model="claude-test", max_tokens=100, system="Be brief.",
                                      messages=[{"role": "user", "content": "Hi Claude"}], extra_headers=headers)
    assert (unmarked.usage.input_tokens, unmarked.usage.cache_creation_input_tokens) == (prompt, 0)
    part: Any = {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}
    chat = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": [part]}],
                                       extra_headers={"x-mock-cache-write-tokens": "3"})
    assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cache_write_tokens == 3
    chat = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                       extra_headers={"x-mock-cache-write-tokens": "3"})
    assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cache_write_tokens is None
    marked = bedrock_body(system=[{"text": "Be brief."}, {"cachePoint": {"type": "default", "ttl": "1h"}}])
    converse = post_bedrock(base_url, marked, headers={"x-mock-cache-write-1h-tokens": "2"})
    usage = converse.json()["usage"]
    assert (usage["cacheWriteInputTokens"], usage["cacheDetails"]) == (2, [{"ttl": "1h", "inputTokens": 2}])
    assert usage["inputTokens"] + 2 == n_tokens("Be brief.") + n_tokens("Hi Bedrock")
    usage = post_bedrock(base_url, bedrock_body(), headers={"x-mock-cache-write-1h-tokens": "2"}).json()["usage"]
    assert "cacheWriteInputTokens" not in usage and usage["inputTokens"] == n_tokens("Hi Bedrock")


def test_inline_pdfs_bill_every_page(http: httpx.Client, base_url: str) -> None:
    """A PDF sent inline bills PDF_PAGE_TOKENS a page, as providers bill a page image and its
    text, whatever its size: chat `file_data`, Responses `input_file`, Gemini `inlineData`."""
    from gateway_extproc.mock_provider import PDF_PAGE_TOKENS

    from .pdf_files import build

    def billed(data: bytes) -> list[int]:
        b64 = base64.b64encode(data).decode()
        uri = f"data:application/pdf;base64,{b64}"
        chat = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": "a.pdf", "file_data": uri}}]}]}).json()["usage"]["prompt_tokens"]
        responses = http.post("/v1/responses", json={"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "hi"},
            {"type": "input_file", "filename": "a.pdf", "file_data": uri}]}]}).json()["usage"]["input_tokens"]
        gemini = httpx.post(f"{base_url}{gemini_path()}", headers=GEMINI_AUTH, json={"contents": [{"parts": [
            {"text": "hi"}, {"inlineData": {"mimeType": "application/pdf", "data": b64}}]}]}).json()
        return [chat, responses, gemini["usageMetadata"]["promptTokenCount"]]

    one, many = billed(build(1, object_stream=True)), billed(build(500, object_stream=True))
    assert all(m - o == 499 * PDF_PAGE_TOKENS for o, m in zip(one, many))
    assert billed(build(3)) == [o + 2 * PDF_PAGE_TOKENS for o in one]


def _raw_exchange(base_url: str, headers: dict[str, str], stream: bool = False) -> bytes:
    """The mock's answer bytes as they were written (the connection is closed after them)."""
    host, port = base_url.split("//")[1].split(":")
    body = orjson.dumps(chat_body(stream=stream))
    head = "".join(f"{k}: {v}\r\n" for k, v in {**AUTH, **headers}.items())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\nconnection: close\r\n{head}\r\n".encode() + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_wire_shapes_for_chaos(base_url: str) -> None:
    """x-mock-wire, x-mock-trailers, x-mock-response-header-list, x-mock-header-pad-bytes."""
    ext = _raw_exchange(base_url, {"x-mock-wire": "chunk-ext", "x-mock-trailers": '{"x-t": "1"}'})
    assert b"transfer-encoding: chunked" in ext and b';a=1;b="x y";c\r\n' in ext
    assert ext.endswith(b"0;end=1\r\nx-t: 1\r\n\r\n")
    no_body = _raw_exchange(base_url, {"x-mock-raw-status": "204", "x-mock-wire": "body-despite-no-body"})
    assert no_body.startswith(b"HTTP/1.1 204 ") and no_body.endswith(b"}")
    trailers = _raw_exchange(base_url, {"x-mock-trailers": '{"x-t": "2"}'}, stream=True)
    assert trailers.endswith(b"0\r\nx-t: 2\r\n\r\n")
    dup = _raw_exchange(base_url, {"x-mock-response-header-list": '[["x-dup", "a", 3]]',
                                   "x-mock-header-pad-bytes": "70000"})
    assert dup.count(b"x-dup: a\r\n") == 3 and b"x-mock-pad: " + b"p" * 70000 + b"\r\n" in dup
