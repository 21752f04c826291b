"""Hostile replies on the translated provider paths (Gemini `alt=sse`, Bedrock ConverseStream
event-stream frames), through real Envoy and the ext_proc with values-local's output scanning
on, read by openai-SDK and anthropic-SDK clients and by httpx.

Each test reproduces a broken promise the egress-5 attack round found, or pins one that held:
- a client gets a clean answer or an OpenAI-shaped error with a documented code, in bounded
  time, and the other streams of the worker keep moving (never a hang, a 500
  `gateway_internal_error` or an Envoy crash);
- no restricted value leaves.

Replies are scripted with the mock provider's raw controls (`x-mock-raw-events`, and
`x-mock-raw-repeat` for megabytes of stream; docs/mock-provider.md), sealed by conftest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import openai
import pytest

from gateway_extproc import keys
from gateway_extproc.providers import eventstream

from .conftest import Gateway, add_provider_models, envoy_survives, no_budgets, raw_events, running_gateway

KEYS = {f"k{i}": keys.generate(f"wire5-k{i}") for i in range(20)}
_next = iter(KEYS)


@pytest.fixture(scope="module")
def wgw() -> Iterator[Gateway]:
    def customize(values: dict[str, Any]) -> None:
        add_provider_models(values)
        values["keys"] += [{"id": f"wire5-{name}", "sha256": keys.digest(key), "team": "demo",
                            "budget": {"daily": 5}} for name, key in KEYS.items()]
    with running_gateway("gw-wire5-", customize=customize) as gw:
        yield gw


@pytest.fixture
def gw(wgw: Gateway) -> Iterator[Gateway]:
    with envoy_survives(wgw) as gw:
        yield gw


def frame(name: str, payload: dict[str, Any]) -> bytes:
    return eventstream.encode({":event-type": name, ":content-type": "application/json", ":message-type": "event"},
                              orjson.dumps(payload))


def stream_events(gw: Gateway, model: str, controls: dict[str, str], key: str | None = None,
                  timeout: float = 120) -> tuple[int, list[Any], float]:
    """(status, the data payloads of a streamed chat answer, seconds it took)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"authorization": f"Bearer {key or gw.key}", **controls}) as r:
        raw = r.read()
    took = time.monotonic() - started
    assert b"gateway_internal_error" not in raw, raw[-500:]
    events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    return r.status_code, [e.decode() if e == b"[DONE]" else orjson.loads(e) for e in events], took


def errors(events: list[Any]) -> list[dict[str, Any]]:
    return [e["error"] for e in events if isinstance(e, dict) and "error" in e]


# -- 1. an SSE event larger than any buffer, or one that never ends -----------------------------


GEMINI_OPEN = b'data: {"candidates": [{"content": {"role": "model", "parts": [{"text": "'
FILLER = b"lorem ipsum " * 682  # 8,184 bytes


def test_a_gemini_event_that_never_ends_is_a_provider_error_and_other_streams_keep_moving(gw: Gateway) -> None:
    """32 MiB of one `data:` line without its blank line: the translator re-read everything it
    held on every chunk (quadratic: ~30 s of a worker's event loop, every other stream on it
    stalled, memory without bound). It now stops at 16 MiB with a provider_error event."""
    controls = {"x-mock-raw-events": raw_events(GEMINI_OPEN, FILLER), "x-mock-raw-repeat": "[1, 4096]",
                "x-mock-chunk-delay-ms": "1"}
    slowest: list[float] = []
    stop = threading.Event()

    def others() -> None:  # small answers meanwhile, on every worker
        while not stop.is_set():
            started = time.monotonic()
            r = httpx.post(gw.url + "/v1/chat/completions", timeout=120, headers={"authorization": f"Bearer {gw.key}"},
                           json={"model": "default-chat", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            slowest.append(time.monotonic() - started)
            time.sleep(0.05)

    threads = [threading.Thread(target=others) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        status, events, took = stream_events(gw, "gemini-chat", controls)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert status == 200
    assert [e["code"] for e in errors(events)] == ["provider_error"], events[-2:]
    assert took < 15, took
    assert max(slowest) < 3, sorted(slowest)[-5:]


# -- 2. a tool call's name or id that is no string ----------------------------------------------


CARD = 4111111111111111


def converse_tool_stream(name: Any, tool_id: Any) -> list[bytes]:
    return [frame("messageStart", {"role": "assistant"}),
            frame("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": tool_id,
                                                                                     "name": name}}}),
            frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": '{"city": "Paris"}'}}}),
            frame("contentBlockStop", {"contentBlockIndex": 0}), frame("messageStop", {"stopReason": "tool_use"}),
            frame("metadata", {"usage": {"inputTokens": 5, "outputTokens": 7}, "metrics": {"latencyMs": 1}})]


@pytest.mark.parametrize(("name", "tool_id"), [(CARD, "tooluse_1"), ("get_weather", CARD), ([CARD], "tooluse_1")],
                         ids=["name", "id", "name-list"])
def test_a_card_as_a_converse_tool_name_or_id_never_reaches_the_openai_sdk(gw: Gateway, name: Any,
                                                                           tool_id: Any) -> None:
    """Converse's `toolUse.name` and `toolUseId` are carried into the chunk as sent, and the
    stream guard read a tool call's name only when a string (its id never): a number went out
    unread, and the openai SDK builds chunks without validating them."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    raw = b""
    with client.chat.completions.with_streaming_response.create(
            model="bedrock-chat", messages=[{"role": "user", "content": "weather?"}], stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-mock-raw-events": raw_events(*converse_tool_stream(name, tool_id))}) as r:
        raw = r.read()
    assert r.status_code == 200 and b"4111111111111111" not in raw and b"4.111111111111111e" not in raw, raw
    chunks = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    args = "".join(c["function"].get("arguments") or "" for chunk in chunks for choice in chunk["choices"]
                   for c in choice["delta"].get("tool_calls") or [])
    assert args == '{"city": "Paris"}' and chunks[-1]["usage"]["completion_tokens"] == 7, raw


# -- 3. broken wire shapes: a clean answer or one documented error, never a 500 or a hang ---------


def gemini_event(doc: Any) -> bytes:
    return b"data: " + (doc if isinstance(doc, bytes) else orjson.dumps(doc)) + b"\n\n"


def converse_text(text: str) -> bytes:
    return frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})


def deep(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


_CANDIDATE = {"content": {"role": "model", "parts": [{"text": "Hello there"}]}, "index": 0}
_USAGE = {"promptTokenCount": 3, "candidatesTokenCount": 2}
_GOOD_FRAME = converse_text("Hello there")
_CRC_BROKEN = _GOOD_FRAME[:-1] + bytes([_GOOD_FRAME[-1] ^ 1])
WIRE_CASES: dict[str, tuple[str, list[bytes], str | None]] = {
    # model, raw chunks, the one error code expected (None: a clean end)
    "gemini-no-finish-reason": ("gemini-chat", [gemini_event({"candidates": [_CANDIDATE], "usageMetadata": _USAGE})],
                                "upstream_stream_interrupted"),
    "gemini-1e400": ("gemini-chat", [gemini_event({"candidates": [_CANDIDATE]}), gemini_event(
        b'{"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {"x": 1e400}}}]},'
        b' "finishReason": "STOP"}]}')], "provider_error"),
    "gemini-minus-zero-duplicate-keys": ("gemini-chat", [gemini_event(
        b'{"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {"x": -0, "x": -0.0}}}]},'
        b' "finishReason": "STOP", "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 3,'
        b' "candidatesTokenCount": 2}}')], None),
    "gemini-utf8-split-over-chunks": ("gemini-chat", [
        b'data: {"candidates": [{"content": {"parts": [{"text": "caf\xc3', b'\xa9 ok"}], "role": "model"},'
        b' "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2}}\n\n'], None),
    "gemini-invalid-utf8": ("gemini-chat", [gemini_event({"candidates": [_CANDIDATE]}),
                                            b'data: {"candidates": [{"content": {"parts": [{"text": "\xc3\x28"}]}}]}\n\n'],
                            "provider_error"),
    "gemini-args-past-max-depth": ("gemini-chat", [gemini_event(
        b'{"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": ' + deep(300)
        + b'}}]}, "finishReason": "STOP"}]}')], "provider_error"),
    "gemini-args-deep": ("gemini-chat", [gemini_event(
        b'{"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": ' + deep(200)
        + b'}}]}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2}}')],
                         None),
    "gemini-function-name-no-string": ("gemini-chat", [gemini_event({"candidates": [_CANDIDATE]}), gemini_event(
        {"candidates": [{"content": {"parts": [{"functionCall": {"name": 4111111111111111, "args": {}}}]},
                         "finishReason": "STOP"}]})], "provider_error"),
    "bedrock-crc-corrupt": ("bedrock-chat", [frame("messageStart", {"role": "assistant"}), _CRC_BROKEN],
                            "provider_error"),
    "bedrock-truncated": ("bedrock-chat", [frame("messageStart", {"role": "assistant"}), _GOOD_FRAME[:-7]],
                          "provider_error"),
    "bedrock-length-past-bound": ("bedrock-chat", [frame("messageStart", {"role": "assistant"}),
                                                   b"\x02\x00\x00\x00\x00\x00\x00\x10" + b"\x00" * 8], "provider_error"),
    "bedrock-no-message-stop": ("bedrock-chat", [frame("messageStart", {"role": "assistant"}), _GOOD_FRAME],
                                "provider_error"),
    "bedrock-exception": ("bedrock-chat", [frame("messageStart", {"role": "assistant"}), _GOOD_FRAME,
                                           eventstream.encode({":message-type": "exception",
                                                               ":exception-type": "modelStreamErrorException"},
                                                              b'{"message": "the model failed"}')],
                          "provider_error"),
}


@pytest.mark.parametrize("case", list(WIRE_CASES))
def test_a_broken_translated_stream_ends_in_one_documented_error(gw: Gateway, case: str) -> None:
    model, chunks, code = WIRE_CASES[case]
    status, events, took = stream_events(gw, model, {"x-mock-raw-events": raw_events(*chunks)})
    assert status == 200 and took < 10, (status, took)
    assert [e["code"] for e in errors(events)] == ([code] if code else []), events
    assert events[-1] == ("[DONE]" if code is None else {"error": errors(events)[0]}), events


@pytest.fixture(scope="module")
def unbudgeted() -> Iterator[Gateway]:
    def customize(values: dict[str, Any]) -> None:
        add_provider_models(values)
        no_budgets(values)
    with running_gateway("gw-wire5-free-", customize=customize) as gw:
        yield gw


def test_a_converse_frame_of_megabytes_trickled_in_arrives_scanned(unbudgeted: Gateway) -> None:
    """One contentBlockDelta frame of 8 MiB (CRCs right) in 8 KiB pieces, more than any Envoy
    buffer, with a card at its end: the answer arrives whole, the card redacted. Without
    budgets: under one, 8 MiB of text in one event is cut at the grant (docs/budgets.md)."""
    gw = unbudgeted
    filler = b"lorem ipsum " * 682
    text = filler * 1024 + b" card 4111 1111 1111 1111"
    whole = frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text.decode()}})
    at = whole.index(filler)
    head, tail = whole[:at], whole[at + len(filler) * 1024:]
    assert head + filler * 1024 + tail == whole
    controls = {"x-mock-raw-events": raw_events(frame("messageStart", {"role": "assistant"}), head, filler, tail,
                                                frame("contentBlockStop", {"contentBlockIndex": 0}),
                                                frame("messageStop", {"stopReason": "end_turn"}),
                                                frame("metadata", {"usage": {"inputTokens": 3, "outputTokens": 9}})),
                "x-mock-raw-repeat": "[1, 1, 1024]", "x-mock-chunk-delay-ms": "1"}
    status, events, took = stream_events(gw, "bedrock-chat", controls)
    assert status == 200 and took < 20, (status, took)
    assert errors(events) == [] and events[-1] == "[DONE]", events[-2:]
    got = "".join(c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e["choices"])
    assert got == text.decode().replace("4111 1111 1111 1111", "[CREDIT_CARD_1]"), got[-80:]


# -- 4. usage -----------------------------------------------------------------------------------


def daily_tokens(gw: Gateway, key: str) -> int:
    """The key's daily tokens once settled (settlement is asynchronous)."""
    tokens = 0
    for _ in range(50):
        r = httpx.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        if tokens := r.json()["tokens_used"]["daily"]:
            return tokens
        time.sleep(0.1)
    return tokens


def test_a_gemini_stream_with_usage_before_more_text_is_charged_the_reservation(gw: Gateway) -> None:
    """usageMetadata on the first event only (1 output token), then 2,000 words: the translator
    took that running count as the bill, so the answer cost one output token. Now the reservation."""
    key = KEYS[next(_next)]
    chunks = [gemini_event({"candidates": [{"content": {"role": "model", "parts": [{"text": "word "}]}, "index": 0}],
                            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 1}}),
              gemini_event({"candidates": [{"content": {"role": "model", "parts": [{"text": "word " * 2000}]},
                                            "index": 0}]}),
              gemini_event({"candidates": [{"content": {"role": "model", "parts": [{"text": "end"}]}, "index": 0,
                                            "finishReason": "STOP"}]})]
    status, events, _ = stream_events(gw, "gemini3-chat", {"x-mock-raw-events": raw_events(*chunks)}, key=key)
    assert status == 200 and errors(events) == [] and events[-1] == "[DONE]", events[-2:]
    assert daily_tokens(gw, key) >= 1000  # the prompt + the 1,024-token cap
