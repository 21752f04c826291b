"""Texts a provider streams piecewise inside a delta's structured fields, through real Envoy
and the ext_proc (values-local: output scanning on): an audio answer's transcript (OpenAI,
`modalities: ["text", "audio"]`: `choices[].delta.audio.transcript`) and OpenRouter's
`reasoning_details` (`[{"type": "reasoning.text", "text": ..., "index": 0}]`, beside its
`reasoning` string). The gateway scanned such fields event by event (outside its text
windows), so a value split over two events reached the client whole. The provider's stream
is scripted with `x-mock-raw-events`.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import httpx
import orjson
import pytest

from .conftest import Gateway

AUDIO = base64.b64encode(bytes(range(48))).decode()  # (a piece of PCM: not text)


def chunk(audio: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-audio", "object": "chat.completion.chunk", "created": 1,
                                     "model": "gpt-4o-audio-preview", "choices": [
                                         {"index": 0, "delta": {"audio": audio} if audio else {},
                                          "finish_reason": finish}]}) + b"\n\n"


def choices(gw: Gateway, body: dict[str, Any], events: list[bytes]) -> list[dict[str, Any]]:
    """Every choice of every chunk the client got for `body`, the provider streaming `events`."""
    raw = orjson.dumps([base64.b64encode(e).decode() for e in events]).decode()
    out: list[dict[str, Any]] = []
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {gw.key}", "x-mock-raw-events": raw}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out += orjson.loads(line[6:]).get("choices") or []
    return out


def streamed(gw: Gateway, pieces: list[str]) -> tuple[str, list[str], set[str]]:
    """(the transcript the client got, the audio data pieces, the finish reasons)."""
    events = [chunk({"id": "audio_1", "transcript": pieces[0], "data": AUDIO}),
              *(chunk({"transcript": p, "data": AUDIO}) for p in pieces[1:]),
              chunk({"id": "audio_1", "expires_at": 1}), chunk({}, "stop"), b"data: [DONE]\n\n"]
    # (text asked for: under the demo key's budget spoken output is refused, docs/budgets.md;
    # output scanning reads what the provider sends, whatever was asked)
    body = {"model": "default-chat", "stream": True, "messages": [{"role": "user", "content": "Read it out."}]}
    said, data, finishes = "", [], set()
    for choice in choices(gw, body, events):
        audio = (choice.get("delta") or {}).get("audio") or {}
        said += audio.get("transcript") or ""
        data += [audio["data"]] if "data" in audio else []
        if choice.get("finish_reason"):
            finishes.add(choice["finish_reason"])
    return said, data, finishes


@pytest.mark.parametrize("pieces", [
    ["Your card is 4111 1111 ", "1111 1111, read back."],
    ["Write to jane.doe", "@example.com today."],
], ids=["card", "email"])
def test_a_value_split_over_a_streamed_transcript_reaches_the_client_redacted(gw: Gateway, pieces: list[str]) -> None:
    said, data, _ = streamed(gw, pieces)
    assert "4111111111111111" not in re.sub(r"\D", "", said) and "jane.doe" not in said, said
    assert "[CREDIT_CARD_1]" in said or "[EMAIL_1]" in said, said
    assert data == [AUDIO, AUDIO]  # the audio itself goes on, piece by piece


def test_a_clean_streamed_transcript_reaches_the_client_as_sent(gw: Gateway) -> None:
    said, data, finishes = streamed(gw, ["Hello, ", "this is your ", "order 1234, ready."])
    assert said == "Hello, this is your order 1234, ready." and data == [AUDIO] * 3 and finishes == {"stop"}


def details(text: str, alone: bool = False) -> dict[str, Any]:
    entries = [{"type": "reasoning.text", "text": text, "index": 0, "format": "unknown"}]
    return {"reasoning_details": entries} if alone else {"reasoning": text, "reasoning_details": entries}


def reasoned(gw: Gateway, pieces: list[str], alone: bool = False) -> tuple[str, str, set[str]]:
    """(the `reasoning` text the client got, the `reasoning_details` text, the finish reasons)."""
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "gen-1", "object": "chat.completion.chunk", "created": 1,
                                         "model": "deepseek/deepseek-r1", "choices": [
                                             {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"
    events = [event({"role": "assistant", **details(pieces[0], alone)}),
              *(event(details(p, alone)) for p in pieces[1:]),
              event({"content": "Done."}), event({}, "stop"), b"data: [DONE]\n\n"]
    body = {"model": "default-chat", "stream": True, "messages": [{"role": "user", "content": "Think it over."}]}
    reasoning, detail, finishes = "", "", set()
    for choice in choices(gw, body, events):
        delta = choice.get("delta") or {}
        reasoning += delta.get("reasoning") or ""
        detail += "".join(d.get("text") or "" for d in delta.get("reasoning_details") or [])
        if choice.get("finish_reason"):
            finishes.add(choice["finish_reason"])
    return reasoning, detail, finishes


def test_a_value_split_over_streamed_reasoning_details_reaches_the_client_redacted(gw: Gateway) -> None:
    reasoning, detail, finishes = reasoned(gw, ["The card is 4111 1111 ", "1111 1111, so I will"])
    assert reasoning == detail == "The card is [CREDIT_CARD_1], so I will" and finishes == {"stop"}


def test_a_value_split_over_reasoning_details_alone_never_reaches_the_client(gw: Gateway) -> None:
    """(Without the `reasoning` string beside it: the entries' text is a window of its own.)"""
    reasoning, detail, _ = reasoned(gw, ["The card is 4111 1111 ", "1111 1111, so I will"], alone=True)
    assert reasoning == "" and detail == "The card is [CREDIT_CARD_1], so I will", detail


def test_clean_streamed_reasoning_details_reach_the_client_as_sent(gw: Gateway) -> None:
    pieces = ["Let me think. The order ", "number is 1234 5678 ", "and the total is 99."]
    assert reasoned(gw, pieces) == ("".join(pieces), "".join(pieces), {"stop"})
