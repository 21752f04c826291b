"""A Claude answer with two signed thinking blocks, streamed to an OpenAI client through real
Envoy and the ext_proc, read with the openai SDK's `chat.completions.stream()` helper. Its
accumulator merges list entries of a delta by their `index`; until 2026-12-05 the translated
`thinking_blocks` entries carried none, and the second one raised `RuntimeError: Expected list
delta entry to have an index key`. The provider's answer is scripted with the mock provider's
`x-mock-raw-events` (sealed by conftest), docs/mock-provider.md.
"""

from __future__ import annotations

import base64
from typing import Any

import openai
import orjson
import pytest

from .conftest import Gateway

SIGNATURES = ("c2lnLW9uZQ==", "c2lnLXR3bw==")


def event(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


def claude_events(signature_pieces: int) -> list[bytes]:
    """Two thinking blocks, each signed (its signature in `signature_pieces` deltas), then text."""
    out = [event({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 8, "output_tokens": 1}}})]
    for i, signature in enumerate(SIGNATURES):
        step = -(-len(signature) // signature_pieces)
        out += [event({"type": "content_block_start", "index": i,
                       "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
                event({"type": "content_block_delta", "index": i,
                       "delta": {"type": "thinking_delta", "thinking": f"Step {i + 1}: look it up."}}),
                *(event({"type": "content_block_delta", "index": i,
                         "delta": {"type": "signature_delta", "signature": signature[a:a + step]}})
                  for a in range(0, len(signature), step)),
                event({"type": "content_block_stop", "index": i})]
    return out + [event({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
                  event({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "42"}}),
                  event({"type": "content_block_stop", "index": 2}),
                  event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
                  event({"type": "message_stop"})]


@pytest.mark.parametrize("signature_pieces", [1, 2], ids=["one signature delta a block", "two"])
def test_the_openai_stream_helper_reads_two_signed_thinking_blocks(gw: Gateway, signature_pieces: int) -> None:
    raw = orjson.dumps([base64.b64encode(e).decode() for e in claude_events(signature_pieces)]).decode()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-mock-raw-events": raw})
    with client.chat.completions.stream(model="claude-chat",
                                        messages=[{"role": "user", "content": "What is six times seven?"}]) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "42"
    blocks = (message.model_extra or {}).get("thinking_blocks")
    assert [(b["type"], b["signature"]) for b in blocks] == [("thinking", s) for s in SIGNATURES], blocks


@pytest.mark.parametrize("signature_pieces", [1, 2], ids=["one signature delta a block", "two"])
def test_an_anthropic_client_gets_both_signed_thinking_blocks(gw: Gateway, signature_pieces: int) -> None:
    """The same answer to the anthropic SDK: two thinking blocks, each with its own text and
    signature (Claude checks them when the client sends them back on the next turn). Until
    2026-12-05 a stream gave it one block with both texts and the second signature: output
    scanning held the first block's text back while its signature passed, so the translator
    could not tell where the first block ended."""
    import anthropic

    raw = orjson.dumps([base64.b64encode(e).decode() for e in claude_events(signature_pieces)]).decode()
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0,
                                 default_headers={"x-mock-raw-events": raw})
    with client.messages.stream(model="claude-chat", max_tokens=2048,
                                messages=[{"role": "user", "content": "Six times seven?"}]) as events:
        final = events.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        *({"type": "thinking", "thinking": f"Step {i + 1}: look it up.", "signature": s} for i, s in enumerate(SIGNATURES)),
        {"type": "text", "text": "42"}]
