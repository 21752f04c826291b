"""The router-level translation of a provider's answer (processors/provider_response.py):
a translator that cannot read the provider's bytes never breaks the client's answer."""

from __future__ import annotations

import orjson

from gateway_extproc.config import Backend, Provider
from gateway_extproc.processors.provider_response import ProviderResponse

ANTHROPIC = Backend("claude/claude-x", Provider("claude", "anthropic", "https://api.example/v1", "/v1", None, None),
                    "claude-x", 0, 1)
GOOD = b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
WRONG_SHAPE = b'data: {"type":"content_block_delta","index":0,"delta":"oops"}\n\n'  # AttributeError inside


def test_a_broken_event_keeps_what_came_before_and_ends_the_stream() -> None:
    answer = ProviderResponse(ANTHROPIC, 200, streamed=True)
    out = answer.feed(GOOD + WRONG_SHAPE + GOOD, False)
    first, error, rest = out.split(b"\n\n")
    assert orjson.loads(first[6:])["choices"][0]["delta"]["content"] == "Hi"
    assert orjson.loads(error[6:])["error"]["code"] == "provider_error" and rest == b""
    assert answer.feed(GOOD, False) == b"" and answer.feed(b"", True) == b""


def test_an_unreadable_body_under_200_goes_out_as_502() -> None:
    answer = ProviderResponse(ANTHROPIC, 200, streamed=False)
    body = orjson.loads(answer.body(b"<html>upstream proxy error</html>"))
    assert body["error"]["code"] == "provider_error" and answer.status == 502


def test_a_provider_error_keeps_its_status() -> None:
    answer = ProviderResponse(ANTHROPIC, 529, streamed=True)
    body = orjson.loads(answer.body(b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'))
    assert body["error"]["message"] == "Overloaded" and answer.status == 529


def test_an_answer_is_read_as_what_was_asked_for_whatever_its_label() -> None:
    """The router passes whether the provider was asked for a stream, not the label."""
    assert ProviderResponse(ANTHROPIC, 200, streamed=True).stream is not None
    assert ProviderResponse(ANTHROPIC, 200, streamed=False).stream is None
    assert ProviderResponse(ANTHROPIC, 429, streamed=True).stream is None  # an error is a JSON body
