"""Texts streamed inside a chat delta's structured fields (policy/classification.py
`_nested_texts`): an audio answer's `audio.transcript` and OpenRouter's `reasoning_details`
entries each get a hold-back window like `content`, and what a window still holds when the
stream ends goes out in the same field it came in."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from gateway_extproc.config import Classification
from gateway_extproc.policy.classification import Policy, ResponseGuard

POLICY = Policy(Classification(("public", "internal", "confidential", "restricted"), "enforce", "public", {}, (), None,
                               (), True, 64, None))


def chunk(delta: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + b"\n\n"


def stream(deltas: list[dict[str, Any]], in_order: bool = False) -> list[dict[str, Any]]:
    """The deltas the client gets; the stream ends with `[DONE]` and no finish_reason."""
    g = ResponseGuard(POLICY, POLICY._params["enforce"], "t", in_order)
    out = b"".join(g.sse_event(chunk(d)) for d in deltas) + g.sse_event(b"data: [DONE]\n\n")
    return [c["delta"] for line in out.decode().split("\n\n") if line.startswith("data: {")
            for c in orjson.loads(line[6:])["choices"]]


def transcript(delta: dict[str, Any]) -> str:
    return (delta.get("audio") or {}).get("transcript") or ""


def details(delta: dict[str, Any]) -> str:
    return "".join(d.get("text") or d.get("summary") or "" for d in delta.get("reasoning_details") or [])


@pytest.mark.parametrize("in_order", [False, True], ids=["openai", "anthropic order"])
@pytest.mark.parametrize("make, read", [
    (lambda t: {"audio": {"id": "audio_1", "transcript": t}}, transcript),
    (lambda t: {"reasoning_details": [{"type": "reasoning.text", "text": t, "index": 0}]}, details),
    (lambda t: {"reasoning_details": [{"type": "reasoning.summary", "summary": t, "index": 2}]}, details),
], ids=["audio transcript", "reasoning text", "reasoning summary"])
def test_a_value_split_over_a_structured_text_goes_out_redacted_in_its_field(make: Any, read: Any,
                                                                             in_order: bool) -> None:
    deltas = stream([make("my card is 4111 1111 "), make("1111 1111, and jane.doe"), make("@example.com")],
                    in_order)
    said = "".join(read(d) for d in deltas)
    assert said == "my card is [CREDIT_CARD_1], and [EMAIL_1]", deltas
    assert all(isinstance(d.get("reasoning_details", []), list) for d in deltas)
    assert not re.search(r"4111|jane", orjson.dumps(deltas).decode())


def test_the_other_fields_of_a_structured_text_are_scanned_event_by_event() -> None:
    deltas = stream([{"audio": {"id": "jane.doe@example.com", "transcript": "Hello there.", "data": "AAAA"}}])
    assert "jane" not in orjson.dumps(deltas).decode()
    assert "".join(map(transcript, deltas)) == "Hello there."


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_details_repeating_the_reasoning_string_are_read_as_one_text(field: str) -> None:
    """OpenRouter's two copies of one text get the same redaction, and the held tail goes out in
    both (no seam between them: that ended the stream, and cost 5x)."""
    def delta(text: str) -> dict[str, Any]:
        return {field: text, "reasoning_details": [{"type": "reasoning.text", "text": text, "index": 0}]}
    deltas = stream([delta("my card is 4111 1111 "), delta("1111 1111, and jane.doe"), delta("@example.com")])
    assert "".join(d.get(field) or "" for d in deltas) == "".join(map(details, deltas)) == \
        "my card is [CREDIT_CARD_1], and [EMAIL_1]"
