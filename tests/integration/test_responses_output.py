"""Output scanning of the OpenAI Responses API (`POST /v1/responses`) through real Envoy and
the ext_proc workers, values-local's output scanning on (e-mail and cards redacted, AWS keys
blocked), openai and azure backends (the bundled mock providers), JSON and SSE.

The invariants are the chat path's (test_provider_framing.py): no restricted value leaves
(raw bytes, the text an SSE client reassembles, the `*.done` events and the final response
that repeat the text), its placeholder arrives instead and the rest of the text whole; a
blocked answer carries no generated text and says why in the Responses API's own terms
(`status: "incomplete"`, `incomplete_details.reason: "content_filter"`); spend is accounted
whatever the framing; the openai SDK reads every answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from .conftest import Gateway
from .test_provider_framing import (ANY_TEXT, AWS_KEY, BLOCKED_REPLY, EXAMPLES, FRAMINGS, KEYS, REDACTED_REPLY,
                                    REDACTED_TEXT, Stack, _decoded, checked, framed, framing_gw, leaks, sliced_reply,
                                    spent)

__all__ = ["framing_gw"]  # the module's own gateway (module-scoped fixture)

QUESTION = "What is on file for me?"
# The Responses API is served by openai-kind backends only (an azure one answers 400
# unsupported_endpoint); the chat tests cover both kinds' shared passthrough path.
MODELS = ["default-chat"]


@pytest.fixture
def gw(framing_gw: Stack) -> Iterator[Gateway]:
    yield from checked(framing_gw)


@dataclass
class Events:
    """A Responses stream as an SSE client reads it."""

    status: int
    headers: httpx.Headers
    raw: bytes
    events: list[dict[str, Any]] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)  # the SSE `event:` field of each
    unreadable: list[str] = field(default_factory=list)

    def deltas(self, kind: str = "response.output_text") -> str:
        return "".join(e["delta"] for e in self.events if e.get("type") == f"{kind}.delta")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1] if self.events else {}

    def leaked(self) -> list[str]:
        seen = [self.raw.decode("utf-8", "replace"), self.deltas(), *self.unreadable,
                *(orjson.dumps(e).decode() for e in self.events)]
        return sorted({v for s in seen for v in leaks(s)})


def receive(gw: Gateway, body: dict[str, Any], headers: dict[str, str], key: str | None = None) -> Events:
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{gw.url}/v1/responses", json=body,
            headers={"authorization": f"Bearer {key or gw.key}", "accept-encoding": "identity", **headers}) as resp:
        wire = b"".join(resp.iter_raw())
    got = Events(resp.status_code, resp.headers, wire)
    decoded = _decoded(wire)
    if decoded is not wire:
        got.raw = wire + b"\n" + decoded
    for sse in SSEDecoder().iter_bytes(iter([decoded.decode("utf-8", "replace").encode()])):
        try:
            obj = orjson.loads(sse.data)
        except orjson.JSONDecodeError:
            got.unreadable.append(sse.data)
            continue
        if not isinstance(obj, dict):
            got.unreadable.append(sse.data)
            continue
        got.events.append(obj)
        got.names.append(sse.event)
    return got


def stream_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": QUESTION, "stream": True, **extra}


def sdk(gw: Gateway, headers: dict[str, str], key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key or gw.key, max_retries=0, timeout=60,
                         default_headers=headers)


def assert_consistent(got: Events, text: str, where: str) -> None:
    """The deltas, the done events and the final response all hold the same (redacted) text."""
    assert got.deltas() == text, f"{where}: {got.deltas()!r}"
    [done] = got.of("response.output_text.done")
    assert done["text"] == text, where
    [part] = got.of("response.content_part.done")
    assert part["part"]["text"] == text, where
    [item] = got.of("response.output_item.done")
    assert item["item"]["content"][0]["text"] == text, where
    final = got.last
    assert final["type"] == "response.completed", f"{where}: {final}"
    assert final["response"]["output"][0]["content"][0]["text"] == text, where
    assert final["response"]["usage"]["output_tokens"] > 0, where
    # Deltas come before their done event; events are numbered in order.
    types = [e["type"] for e in got.events]
    assert max(i for i, t in enumerate(types) if t == "response.output_text.delta") \
        < types.index("response.output_text.done"), where
    numbers = [e["sequence_number"] for e in got.events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), where
    assert got.names == types, where  # the SSE event names match the data's type, as OpenAI sends them


# -- JSON -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_json_answer_is_redacted(gw: Gateway, model: str) -> None:
    raw = sdk(gw, {"x-mock-reply": REDACTED_REPLY}).responses.with_raw_response.create(model=model, input=QUESTION)
    assert leaks(raw.http_response.text) == [], raw.http_response.text
    response = raw.parse()
    assert response.output_text == REDACTED_TEXT
    assert response.status == "completed"
    assert int(raw.headers["x-gateway-prompt-tokens"]) == response.usage.input_tokens > 0
    assert int(raw.headers["x-gateway-completion-tokens"]) == response.usage.output_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_json_answer_with_a_blocked_value_carries_no_text(gw: Gateway, model: str) -> None:
    raw = sdk(gw, {"x-mock-reply": BLOCKED_REPLY}).responses.with_raw_response.create(model=model, input=QUESTION)
    assert raw.http_response.status_code == 200
    assert leaks(raw.http_response.text) == [] and "noon" not in raw.http_response.text, raw.http_response.text
    response = raw.parse()
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "content_filter"
    assert response.output == [] and response.output_text == ""
    assert response.usage is not None and response.usage.output_tokens > 0  # still accounted
    assert int(raw.headers["x-gateway-completion-tokens"]) == response.usage.output_tokens


@pytest.mark.parametrize("model", MODELS)
def test_json_answer_that_cannot_be_read_is_a_provider_error(gw: Gateway, model: str) -> None:
    resp = httpx.post(f"{gw.url}/v1/responses", json={"model": model, "input": QUESTION}, timeout=60, headers={
        "authorization": f"Bearer {gw.key}", "x-mock-reply": f"the card {REDACTED_REPLY} and more words to cut",
        "x-mock-garbage-after-chunks": "0", "x-mock-garbage": "json"})
    assert leaks(resp.text) == [], resp.text[:400]
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "provider_error", resp.text[:400]


# -- streams ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("framing", [None, *FRAMINGS])
def test_stream_is_redacted_in_every_framing(gw: Gateway, framing: str | None, model: str) -> None:
    where = f"{model} {framing}"
    got = receive(gw, stream_body(model), framed(framing, **{"x-mock-reply": REDACTED_REPLY}))
    assert got.status == 200, where
    assert got.leaked() == [], f"{where}: {got.raw[:600]!r}"
    assert got.unreadable == [], where
    assert_consistent(got, REDACTED_TEXT, where)
    assert int(got.headers["x-gateway-prompt-tokens"]) > 0


@pytest.mark.parametrize("model", MODELS)
def test_stream_read_by_the_sdk(gw: Gateway, model: str) -> None:
    client = sdk(gw, {"x-mock-reply": REDACTED_REPLY})
    with client.responses.stream(model=model, input=QUESTION) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == REDACTED_TEXT
    assert final.usage is not None and final.usage.output_tokens > 0
    events = list(client.responses.create(model=model, input=QUESTION, stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == REDACTED_TEXT


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("framing", [None, "multiline", "crlf"])
def test_stream_with_a_blocked_value_ends_incomplete(gw: Gateway, model: str, framing: str | None) -> None:
    where = f"{model} {framing}"
    got = receive(gw, stream_body(model), framed(framing, **{"x-mock-reply": BLOCKED_REPLY}))
    assert got.status == 200, where
    assert got.leaked() == [], f"{where}: {got.raw[:600]!r}"
    assert got.last["type"] == "response.incomplete", f"{where}: {got.last}"
    assert got.last["response"]["incomplete_details"] == {"reason": "content_filter"}, where
    assert got.last["response"]["output"] == [], where
    assert [e["type"] for e in got.events].count("response.incomplete") == 1, where
    assert not any(e["type"] == "response.completed" for e in got.events), where
    assert AWS_KEY[:8] not in got.deltas(), where
    client = sdk(gw, {"x-mock-reply": BLOCKED_REPLY})
    events = list(client.responses.create(model=model, input=QUESTION, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    with client.responses.stream(model=model, input=QUESTION) as stream:  # the SDK's accumulating helper
        seen = list(stream)
    assert seen[-1].type == "response.incomplete" and seen[-1].response.output == []
    assert leaks("".join(e.model_dump_json() for e in seen)) == []


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(framing=st.sampled_from([None, *FRAMINGS]), model=st.sampled_from(MODELS), **ANY_TEXT)
def test_stream_any_framing_any_slicing_any_text(framing_gw: Stack, framing: str | None, model: str,
                                                 chunk_bytes: int | None, before: str, after: str,
                                                 value: tuple[str, str | None]) -> None:
    gw, watch = framing_gw
    secret, placeholder = value
    reply, headers = sliced_reply(before, secret, after, chunk_bytes)
    where = f"{model} {framing} {chunk_bytes} {reply!r}"
    got = receive(gw, stream_body(model), framed(framing, **headers))
    assert got.status == 200, where
    assert got.leaked() == [], where
    if placeholder:
        assert placeholder in got.deltas(), f"{where}: {got.deltas()!r}"
        assert_consistent(got, got.deltas(), where)
    else:
        assert got.last["type"] == "response.incomplete", where
    watch.alive()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=st.sampled_from(MODELS), kind=st.sampled_from(["json", "shape", "bytes"]), after=st.integers(0, 30),
       carries=st.booleans(), reply=st.sampled_from([REDACTED_REPLY, BLOCKED_REPLY]),
       framing=st.sampled_from([None, None, *FRAMINGS]), chunk_bytes=st.sampled_from([None, None, 5, 1_000_000]))
def test_stream_garbage_never_carries_a_value_out(framing_gw: Stack, model: str, kind: str, after: int,
                                                  carries: bool, reply: str, framing: str | None,
                                                  chunk_bytes: int | None) -> None:
    gw, watch = framing_gw
    headers = framed(framing, **{"x-mock-reply": reply, "x-mock-garbage-after-chunks": str(after),
                                 "x-mock-garbage": kind, "x-mock-garbage-reply": "1" if carries else "0",
                                 **({"x-mock-chunk-bytes": str(chunk_bytes)} if chunk_bytes else {})})
    where = f"{model} {kind} after={after} carries={carries} {framing} {chunk_bytes}"
    got = receive(gw, stream_body(model), headers)
    assert got.leaked() == [], f"{where}: {got.raw[-600:]!r}"
    assert got.status in (200, 502) and b"gateway_internal_error" not in got.raw, where
    watch.alive()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_compressed_answer_is_a_provider_error(gw: Gateway, model: str, encoding: str, stream: bool) -> None:
    body = stream_body(model) if stream else {"model": model, "input": QUESTION}
    got = receive(gw, body, {"x-mock-reply": REDACTED_REPLY, "x-mock-content-encoding": encoding})
    assert got.leaked() == [], got.raw[:400]
    assert got.status == 502 and b"provider_error" in got.raw, got.raw[:400]


# -- accounting -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_spend_is_the_same_whatever_the_framing(gw: Gateway, model: str) -> None:
    headers = {"x-mock-reply": REDACTED_REPLY}
    before = {name: spent(gw, name) for name in KEYS}
    canonical = receive(gw, stream_body(model), headers, key=KEYS["canonical"])
    others = {f: receive(gw, stream_body(model), framed(f, **headers), key=KEYS[f]) for f in FRAMINGS}
    time.sleep(0.5)  # settlement runs after the response
    costs = {name: spent(gw, name) - before[name] for name in KEYS}
    assert costs["canonical"] > 0
    usage = canonical.last["response"]["usage"]
    for framing, got in others.items():
        assert got.headers["x-gateway-prompt-tokens"] == canonical.headers["x-gateway-prompt-tokens"], framing
        assert got.last["response"]["usage"] == usage, framing
        assert costs[framing] == costs["canonical"], framing
