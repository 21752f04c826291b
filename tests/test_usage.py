"""Unit tests for gateway_extproc.usage: usage from JSON bodies and from SSE streams."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway_extproc import usage as usage_mod
from gateway_extproc.usage import SseUsageTap, Usage, canonical_event, usage_from_json


def counts(usage: Usage | None) -> tuple[int | None, int | None, int | None] | None:
    """The token counts of a Usage (other fields, e.g. the model name, are not this file's concern)."""
    return None if usage is None else (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)

# -- usage_from_json ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"id":"x","usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}', Usage(10, 5, None)),
    (b'{"usage":{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}}',
     Usage(10, 5, 4)),
    (b'{"usage":{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":null}}', Usage(10, 5, None)),
    (b'{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"audio_tokens":0}}}', Usage(10, None, None)),
    # embeddings: no completion tokens
    (b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}', Usage(8, None, None)),
    # non-integer counts are ignored, not trusted
    (b'{"usage":{"prompt_tokens":"10","completion_tokens":true,"prompt_tokens_details":{"cached_tokens":1.0}}}',
     Usage(None, None, None)),
    # negative counts are a provider bug: unknown (the local estimates apply), never a credit
    (b'{"usage":{"prompt_tokens":-5,"completion_tokens":-1,"prompt_tokens_details":{"cached_tokens":-2}}}',
     Usage(None, None, None)),
    (b'{"usage":{}}', Usage(None, None, None)),
    # reasoning counted beside the completion, not in it (some compatible servers): charged too
    (b'{"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":510,'
     b'"completion_tokens_details":{"reasoning_tokens":480}}}', Usage(10, 500, None)),
    (b'{"usage":{"prompt_tokens":10,"completion_tokens":0,"completion_tokens_details":{"reasoning_tokens":480}}}',
     Usage(10, 480, None)),
    (b'{"usage":{"input_tokens":10,"output_tokens":20,"total_tokens":510}}', Usage(10, 500, None)),
    # ... and inside it, as OpenAI counts them: the completion count is the bill
    (b'{"usage":{"prompt_tokens":10,"completion_tokens":500,"total_tokens":510,'
     b'"completion_tokens_details":{"reasoning_tokens":480}}}', Usage(10, 500, None)),
    # no usage at all
    (b'{"id":"x","choices":[]}', None),
    (b'{"usage":null}', None),
    (b'{"usage":[1,2]}', None),
    (b'{"usage":"10"}', None),
    (b'[{"usage":{"prompt_tokens":1}}]', None),
    (b'"usage"', None),
    (b'null', None),
    # not JSON
    (b'', None),
    (b'upstream connect error or disconnect/reset before headers', None),
    (b'{"usage":{"prompt_tokens":1}', None),
    (b'\xff\xfe{"usage":{}}', None),
])
def test_usage_from_json(raw: bytes, expected: Usage | None) -> None:
    assert counts(usage_from_json(raw)) == counts(expected)


# -- a realistic OpenAI chat stream ------------------------------------------------------

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
         "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0}}
EXPECTED_USAGE = (12, 3, 4)  # prompt, completion, cached


def _chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-abc123", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0ba0d124f1",
            "choices": choices, "usage": usage}


def _event(obj: Any, sep: bytes = b"\n\n") -> bytes:
    data = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return b"data: " + data + sep


def openai_stream(sep: bytes = b"\n\n") -> tuple[bytes, bytes]:
    """(the whole stream as a provider sends it with include_usage, the usage event alone)."""
    delta = lambda d, finish=None: [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]  # noqa: E731
    events = [
        _event(_chunk(delta({"role": "assistant", "content": "", "refusal": None})), sep),
        _event(_chunk(delta({"content": "Hello"})), sep),
        _event(_chunk(delta({"content": ", the \"usage\" word"})), sep),  # quoted usage in content
        _event(_chunk(delta({"content": " w\u00f6rld \U0001f916"})), sep),  # multi-byte UTF-8
        _event(_chunk(delta({}, "stop")), sep),
    ]
    usage_event = _event(_chunk([], USAGE), sep)
    done = _event(b"[DONE]", sep)
    return b"".join(events) + usage_event + done, usage_event


def forward(tap: SseUsageTap, chunks: list[bytes]) -> bytes:
    """What the client receives: each chunk, or what `feed` returns instead of it."""
    out = []
    for i, chunk in enumerate(chunks):
        replaced = tap.feed(chunk, end=i == len(chunks) - 1)
        out.append(chunk if replaced is None else replaced)
    return b"".join(out)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


SEPARATORS = [pytest.param(b"\n\n", id="LF"), pytest.param(b"\r\n\r\n", id="CRLF"), pytest.param(b"\r\r", id="CR")]


def forwarded(stream: bytes, sep: bytes) -> bytes:
    """What a tap that rewrites events sends for `stream`: every event in the one framing
    the gateway forwards (LF line ends)."""
    return stream.replace(sep, b"\n\n")


# -- observe mode ------------------------------------------------------------------------


@pytest.mark.parametrize("sep", SEPARATORS)
def test_observe_mode_whole_stream(sep: bytes) -> None:
    stream, _ = openai_stream(sep)
    tap = SseUsageTap(drop_usage_chunk=False)
    assert tap.feed(stream, end=True) is None
    assert counts(tap.usage) == EXPECTED_USAGE
    assert tap.events == 7


def test_observe_mode_never_replaces_and_finds_split_usage() -> None:
    stream, usage_event = openai_stream()
    start = stream.index(usage_event)
    # Cut the usage event into four pieces, plus a cut before and after it.
    cuts = [start - 3, start + 2, start + 30, start + len(usage_event) - 1, start + len(usage_event) + 4]
    tap = SseUsageTap(drop_usage_chunk=False)
    chunks = split_at(stream, cuts)
    results = [tap.feed(c, end=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert results == [None] * len(chunks)
    assert counts(tap.usage) == EXPECTED_USAGE


def test_observe_mode_without_usage_event() -> None:
    stream, usage_event = openai_stream()
    tap = SseUsageTap(drop_usage_chunk=False)
    assert tap.feed(stream.replace(usage_event, b""), end=True) is None
    assert tap.usage is None  # "usage": null chunks are not usage


# -- drop mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("sep", SEPARATORS)
def test_drop_mode_whole_stream_in_one_chunk(sep: bytes) -> None:
    stream, usage_event = openai_stream(sep)
    tap = SseUsageTap(drop_usage_chunk=True)
    out = tap.feed(stream, end=True)
    assert out == forwarded(stream.replace(usage_event, b""), sep)
    assert counts(tap.usage) == EXPECTED_USAGE


def test_drop_mode_removes_usage_only_chunk_and_keeps_the_rest() -> None:
    tap = SseUsageTap(drop_usage_chunk=True)
    content = _event(_chunk([{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]))
    usage = _event(_chunk([], USAGE))
    done = b"data: [DONE]\n\n"
    assert tap.feed(content, end=False) is None  # untouched -> None, forwarded as is
    assert tap.feed(usage, end=False) == b""  # dropped entirely
    assert tap.feed(done, end=True) is None
    assert counts(tap.usage) == EXPECTED_USAGE


def test_drop_mode_keeps_usage_chunk_that_has_choices() -> None:
    """Usage on a chunk that also carries choices is recorded but never removed."""
    tap = SseUsageTap(drop_usage_chunk=True)
    event = _event(_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}], USAGE))
    assert tap.feed(event, end=False) is None
    assert counts(tap.usage) == EXPECTED_USAGE


@pytest.mark.parametrize("event", [
    _event(_chunk([{"index": 0, "delta": {"content": "x"}, "finish_reason": None}], None)),  # usage: null
    _event({"choices": [], "usage": "n/a"}),  # usage not an object
    b'data: {"choices": [], "usage": \n\n',  # not JSON
    b'event: ping\ndata: "usage"\n\n',  # a JSON string, not an object
    b': comment mentioning "usage"\n\n',  # no data line
], ids=["usage-null", "usage-not-object", "bad-json", "json-string", "comment"])
def test_drop_mode_keeps_events_that_are_not_usage_chunks(event: bytes) -> None:
    tap = SseUsageTap(drop_usage_chunk=True)
    out = tap.feed(event, end=False)
    assert (event if out is None else out) == canonical_event(event)  # forwarded, in the gateway's framing
    assert tap.usage is None


def test_drop_mode_holds_back_partial_event_until_complete() -> None:
    tap = SseUsageTap(drop_usage_chunk=True)
    first = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[{"del'
    assert tap.feed(first, end=False) == b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    assert tap.feed(b'ta":{"content":"b"}}]}', end=False) == b""  # still incomplete: nothing forwarded
    assert tap.feed(b"\n\ndata: [DONE]\n\n", end=False) == (
        b'data: {"choices":[{"delta":{"content":"b"}}]}\n\ndata: [DONE]\n\n')
    assert tap.feed(b"", end=True) is None


def test_drop_mode_partial_usage_event_never_leaks() -> None:
    stream, usage_event = openai_stream()
    tap = SseUsageTap(drop_usage_chunk=True)
    half = len(usage_event) // 2
    before = stream[: stream.index(usage_event)]
    out1 = tap.feed(before + usage_event[:half], end=False)
    assert out1 == before  # the half usage event is held back
    out2 = tap.feed(usage_event[half:], end=False)
    assert out2 == b""  # completed and dropped
    assert counts(tap.usage) == EXPECTED_USAGE


def test_drop_mode_crlf_separator_split_between_cr_and_lf() -> None:
    tap = SseUsageTap(drop_usage_chunk=True)
    usage = _event(_chunk([], USAGE), b"\r\n\r\n")
    assert tap.feed(usage[:-3], end=False) == b""
    assert tap.feed(usage[-3:-1], end=False) == b""
    assert tap.feed(usage[-1:] + b"data: [DONE]\r\n\r\n", end=True) == b"data: [DONE]\n\n"
    assert counts(tap.usage) == EXPECTED_USAGE


def test_drop_mode_multiline_event_with_crlf() -> None:
    event = b"event: message\r\nid: 7\r\ndata: " + orjson.dumps(_chunk([], USAGE)) + b"\r\n\r\n"
    tap = SseUsageTap(drop_usage_chunk=True)
    assert tap.feed(event + b"data: [DONE]\r\n\r\n", end=True) == b"data: [DONE]\n\n"
    assert counts(tap.usage) == EXPECTED_USAGE


def test_drop_mode_flushes_tail_at_end() -> None:
    tap = SseUsageTap(drop_usage_chunk=True)
    assert tap.feed(b'data: {"a":1}\n\ndata: [DO', end=False) == b'data: {"a":1}\n\n'
    assert tap.feed(b"NE]", end=True) == b"data: [DONE]"  # unterminated last event still delivered


def test_drop_mode_unterminated_single_chunk_at_end_is_untouched() -> None:
    tap = SseUsageTap(drop_usage_chunk=True)
    assert tap.feed(b"data: [DONE]", end=True) is None


def test_drop_mode_empty_final_chunk_flushes_pending() -> None:
    tap = SseUsageTap(drop_usage_chunk=True)
    assert tap.feed(b"data: [DONE]", end=False) == b""
    assert tap.feed(b"", end=True) == b"data: [DONE]"


def test_pending_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_mod, "MAX_PENDING_BYTES", 16)
    tap = SseUsageTap(drop_usage_chunk=True)
    assert tap.feed(b"data: 0123456789abcdef", end=False) is None  # too long to hold: forwarded
    assert tap.feed(b"\n\n", end=False) is None


def test_events_counter() -> None:
    stream, _ = openai_stream()
    tap = SseUsageTap(drop_usage_chunk=True)
    forward(tap, split_at(stream, [5, 100, 101, 400]))
    assert tap.events == 7


# -- property: every split gives the same bytes ------------------------------------------


@pytest.mark.parametrize("sep", SEPARATORS)
@pytest.mark.parametrize("drop", [True, False], ids=["drop", "observe"])
def test_every_two_chunk_split(sep: bytes, drop: bool) -> None:
    stream, usage_event = openai_stream(sep)
    assert stream.count(usage_event) == 1
    expected = forwarded(stream.replace(usage_event, b""), sep) if drop else stream
    for cut in range(len(stream) + 1):
        tap = SseUsageTap(drop_usage_chunk=drop)
        assert forward(tap, split_at(stream, [cut])) == expected, f"cut at {cut}"
        assert counts(tap.usage) == EXPECTED_USAGE, f"cut at {cut}"


@pytest.mark.parametrize("sep", SEPARATORS)
@pytest.mark.parametrize("drop", [True, False], ids=["drop", "observe"])
def test_random_multi_chunk_splits(sep: bytes, drop: bool) -> None:
    stream, usage_event = openai_stream(sep)
    expected = forwarded(stream.replace(usage_event, b""), sep) if drop else stream
    rng = random.Random(20240601)
    for trial in range(300):
        cuts = [rng.randint(0, len(stream)) for _ in range(rng.randint(2, 40))]
        chunks = split_at(stream, cuts)
        if trial % 3 == 0:
            chunks.append(b"")  # Envoy may end the stream with an empty chunk
        tap = SseUsageTap(drop_usage_chunk=drop)
        assert forward(tap, chunks) == expected, f"trial {trial}: cuts {sorted(cuts)}"
        assert counts(tap.usage) == EXPECTED_USAGE, f"trial {trial}"


def test_byte_at_a_time() -> None:
    stream, usage_event = openai_stream(b"\r\n\r\n")
    tap = SseUsageTap(drop_usage_chunk=True)
    assert forward(tap, [stream[i:i + 1] for i in range(len(stream))]) == forwarded(
        stream.replace(usage_event, b""), b"\r\n\r\n")
    assert counts(tap.usage) == EXPECTED_USAGE


@pytest.mark.parametrize(("stream", "done"), [
    (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n', True),
    (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"error": {"message": "overloaded"}}\n\n', True),
    (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', False),  # the provider stopped mid-answer
])
def test_tap_knows_whether_the_stream_ended_itself(stream: bytes, done: bool) -> None:
    tap = SseUsageTap(drop_usage_chunk=False)
    for i in range(len(stream)):
        tap.feed(stream[i:i + 1], end=i == len(stream) - 1)
    assert tap.done is done


# -- what the trace records: response id and finish reasons -------------------------------


def test_json_body_gives_response_id_and_finish_reasons() -> None:
    raw = orjson.dumps({"id": "chatcmpl-1", "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2},
                        "choices": [{"index": 0, "finish_reason": "stop"}, {"index": 1, "finish_reason": "length"},
                                    {"index": 2, "finish_reason": None}]})
    usage = usage_from_json(raw)
    assert usage is not None and (usage.response_id, usage.finish_reasons) == ("chatcmpl-1", ("stop", "length"))
    assert usage_from_json(b'{"id":7,"usage":{},"choices":"x"}') == Usage()


@pytest.mark.parametrize("split", [1, 7, 64, 10_000])
def test_stream_finish_reasons_reach_the_usage_whatever_the_chunking(split: int) -> None:
    text = 'a "finish_reason":"fake" in the text'  # JSON-escaped inside the content: never matches
    events = [_chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}]),
              _chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
              {"id": "chatcmpl-9", "choices": [], "usage": USAGE}]
    stream = b"".join(b"data: " + orjson.dumps({"id": "chatcmpl-9", **e}) + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"
    tap = SseUsageTap(drop_usage_chunk=False)
    for i in range(0, len(stream), split):
        tap.feed(stream[i:i + split], i + split >= len(stream))
    assert tap.usage is not None and counts(tap.usage) == EXPECTED_USAGE
    assert (tap.usage.response_id, tap.usage.finish_reasons) == ("chatcmpl-9", ("tool_calls",))


def _content(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"


@pytest.mark.parametrize("pieces", [1, 3, 17])
def test_limit_forwards_at_most_that_many_content_events_and_still_reads_usage(pieces: int) -> None:
    """The budget backstop: a provider that ignores the cap gets its stream ended at the
    reservation, however its bytes are chunked; the usage that follows is still read."""
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":40}}\n\n'
    whole = b"".join(_content(f" w{i}") for i in range(40)) + usage + b"data: [DONE]\n\n"
    tap = SseUsageTap(False, limit=3)
    size = -(-len(whole) // pieces)
    out = b""
    for i in range(0, len(whole), size):
        piece = whole[i:i + size]
        got = tap.feed(piece, i + size >= len(whole))
        out += piece if got is None else got
    assert out == b"".join(_content(f" w{i}") for i in range(3))
    assert tap.over and tap.usage == Usage(5, 40)


@pytest.mark.parametrize("delta", [
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\": 1"}}]}, {"refusal": "no"},
    {"reasoning_content": "hmm"}, {"reasoning": "hmm"}, {"content": [{"type": "text", "text": "hmm"}]}])
def test_every_kind_of_generated_text_counts_toward_the_limit(delta: dict) -> None:
    """A provider ignoring the cap while it streams tool-call arguments (or a refusal, or
    reasoning) is cut like one streaming content: the backstop counted `content` alone."""
    event = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"
    tap = SseUsageTap(False, limit=3)
    got = tap.feed(event * 40 + b"data: [DONE]\n\n", True)
    assert tap.over and got == event * 3


def test_a_responses_delta_counts_and_what_repeats_it_whole_does_not() -> None:
    """A Responses stream's `.done` events, output items and final response repeat the text
    and a tool call's arguments whole: counted, an honest stream at its cap looked past it
    (and was cut by the budget backstop). Only non-empty deltas count."""
    tap = SseUsageTap(False, limit=100, named=True)
    call = {"type": "function_call", "name": "f", "arguments": '{"q": 1}'}
    events = [{"type": "response.output_text.delta", "delta": "Hi"},
              {"type": "response.output_text.delta", "delta": ""},
              {"type": "response.output_text.delta", "delta": 'say \"type\":\"x.delta\"'},
              {"type": "response.function_call_arguments.delta", "delta": '{"q": 1}'},
              {"type": "response.output_text.done", "text": "Hi"},
              {"type": "response.function_call_arguments.done", "arguments": '{"q": 1}'},
              {"type": "response.output_item.done", "item": call},
              {"type": "response.completed", "response": {"output": [call], "reasoning": {"summary": "short"}}}]
    tap.feed(b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events),
             False)
    assert tap.content_events == 3


def test_a_provider_batching_many_tokens_an_event_is_cut_by_its_text() -> None:
    """Counting events alone, a provider ignoring the cap with 25 tokens an event passed 400
    tokens against a limit of 45 in 16 events: never cut. Its text's tokens count too, past
    `TEXT_LIMIT_FACTOR` times the limit (room for a tokenizer counting longer than the provider)."""
    from gateway_extproc import tokens
    event = _content(" the" * 25)
    tap = SseUsageTap(False, limit=45, count=tokens.counter("o200k_base"))
    got = tap.feed(event * 16 + b"data: [DONE]\n\n", True)
    assert tap.over and got == event * 3  # 75 tokens forwarded; the fourth event passed 90
    honest = SseUsageTap(False, limit=45, count=tokens.counter("o200k_base"))
    whole = _content(" the" * 45) + _content(" the" * 45) + b"data: [DONE]\n\n"  # 2x the limit, not past it
    assert honest.feed(whole, True) in (None, whole) and not honest.over


def test_a_responses_usage_is_final_only_on_the_event_that_ends_the_stream() -> None:
    """A server reporting usage so far on `response.created` (0 output tokens): a stream cut
    there was charged the prompt alone, while the provider may go on generating."""
    def event(kind: str, usage: dict | None) -> bytes:
        data = {"type": kind, "response": {"id": "resp_x", "usage": usage}}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    tap = SseUsageTap(False, named=True)
    tap.feed(event("response.created", {"input_tokens": 12, "output_tokens": 0}), False)
    assert tap.usage == Usage(12, 0, response_id="resp_x") and not tap.usage_final
    for kind in ("response.completed", "response.incomplete", "response.failed"):
        tap = SseUsageTap(False, named=True)
        tap.feed(event(kind, {"input_tokens": 12, "output_tokens": 7}), False)
        assert tap.usage_final and tap.usage is not None and tap.usage.completion_tokens == 7


def test_reasoning_sent_under_two_names_counts_once() -> None:
    """Servers that send a delta's reasoning as both `reasoning` and `reasoning_content`
    (vLLM, OpenRouter) had it counted twice, so an honest stream at its cap, all reasoning,
    reached twice the limit and stood one token from being cut as a provider ignoring it."""
    from gateway_extproc import tokens
    event = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {
        "reasoning": " the" * 10, "reasoning_content": " the" * 10}}]}) + b"\n\n"
    tap = SseUsageTap(False, limit=30, count=tokens.counter("o200k_base"))
    tap.feed(event * 3, False)
    assert tap.generated_tokens == 30 and not tap.over


def test_limit_not_reached_forwards_everything() -> None:
    whole = _content(" a") + _content(" b") + b"data: [DONE]\n\n"
    tap = SseUsageTap(False, limit=2)
    got = tap.feed(whole, True)
    assert (whole if got is None else got) == whole and not tap.over


def test_a_responses_stream_keeps_its_event_names_in_any_framing() -> None:
    """Rewriting taps forward one framing; a Responses API stream's `event:` names (which
    EventSource clients dispatch on) stay, in the order OpenAI writes them."""
    data = b'{"type":"response.output_text.delta","delta":"Hi"}'
    for raw in (b"event: response.output_text.delta\ndata: " + data + b"\n\n",
                b"id: 4\r\nevent: response.output_text.delta\r\ndata:" + data + b"\r\n\r\n",
                b": ping\nevent: response.output_text.delta\ndata: {\ndata: " + data[1:] + b"\n\n"):
        tap = SseUsageTap(drop_usage_chunk=False, limit=100, named=True)
        out = tap.feed(raw, end=False)
        assert (raw if out is None else out) == b"event: response.output_text.delta\ndata: " + data + b"\n\n", raw


@pytest.mark.parametrize(("details", "writes"), [
    ({"cached_tokens": 3, "cache_creation_tokens": 40, "cache_creation_1h_tokens": 30}, (40, 30)),  # translators
    ({"cached_tokens": 0, "cache_write_tokens": 100, "audio_tokens": 0}, (100, None)),  # OpenAI, OpenRouter
    ({"cached_tokens": 3}, (None, None)),  # no writes reported
    ({"cache_creation_tokens": -4, "cache_creation_1h_tokens": "30"}, (None, None)),
])
def test_cache_writes_are_read_from_prompt_tokens_details(details: dict, writes: tuple) -> None:
    usage = usage_from_json(orjson.dumps({"usage": {"prompt_tokens": 200, "completion_tokens": 1,
                                                    "prompt_tokens_details": details}}))
    assert usage is not None and (usage.cache_write_tokens, usage.cache_write_1h_tokens) == writes


def test_a_later_usage_block_keeps_the_cache_writes_reported_before() -> None:
    first = Usage(200, None, 3, 40, 30)
    assert usage_mod.merged(first, Usage(None, 9)) == Usage(200, 9, 3, 40, 30)


def test_a_later_smaller_output_count_lowers_nothing() -> None:
    """480 output tokens, then a usage block saying 2: charged 2 until 2026-12-08."""
    tap = SseUsageTap(False)
    for n in (480, 2):
        tap.feed(b"data: " + orjson.dumps({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n}})
                 + b"\n\n", False)
    assert tap.usage is not None and tap.usage.completion_tokens == 480


def test_a_count_no_provider_bills_is_unknown() -> None:
    """Past 2**31 tokens a count is unknown (charged the reservation): 2**53 was believed and
    overflowed the Redis token tally after ~500 answers (tests/test_budget_store.py)."""
    from gateway_extproc.providers.base import MAX_TOKENS, token_count
    from gateway_extproc.usage import usage_from_object
    assert token_count((MAX_TOKENS,)) == MAX_TOKENS and token_count((MAX_TOKENS + 1,)) is None
    assert token_count((MAX_TOKENS, 1)) is None  # the sum too
    assert token_count((1,), (2**53,)) is None
    read = usage_from_object({"usage": {"prompt_tokens": 2**53, "completion_tokens": 2**40}})
    assert read is not None and (read.prompt_tokens, read.completion_tokens) == (None, None)


@pytest.mark.parametrize(("drop", "limit"), [(True, None), (False, 10)])
def test_a_providers_error_event_without_a_code_gets_provider_error(drop: bool, limit: int | None) -> None:
    """OpenAI sends `"code": null` in a stream's error event as in a 5xx answer: the JSON answer
    got `provider_error` (docs/runbooks.md), the event went to the client with no code."""
    tap = SseUsageTap(drop_usage_chunk=drop, limit=limit)
    chunk = (b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
             b'data: {"error":{"message":"boom","type":"server_error","code":null,"param":null}}\n\n')
    out = tap.feed(chunk, True)
    assert out is not None and tap.done
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert events[-1] == {"error": {"message": "boom", "type": "server_error", "code": "provider_error", "param": None}}
    own = b'data: {"error":{"message":"cut","type":"rate_limit_error","code":"budget_exceeded","param":null}}\n\n'
    assert SseUsageTap(drop_usage_chunk=drop, limit=limit).feed(own, True) in (None, own)


@pytest.mark.parametrize(("event", "ends"), [
    (b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n', True),
    (b'event: response.incomplete\ndata: {"type":"response.incomplete","response":{}}\n\n', True),
    (b'data: {"type": "response.failed", "response": {}}\n\n', True),  # (no event line)
    (b'event: error\ndata: {"type":"error","code":"server_error","message":"m"}\n\n', True),
    (b'event: response.in_progress\ndata: {"type":"response.in_progress"}\n\n', False),
    (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"\\"type\\":\\"error\\""}\n\n',
     False),  # (the words in the text are no event)
])
def test_a_responses_stream_is_ended_at_its_last_event_only(event: bytes, ends: bool) -> None:
    """A Responses stream has no [DONE]: its last event ends it; one that ends without it was
    cut off (the router then appends `upstream_stream_interrupted`). Not `done`: usage read
    before that event is no bill (`usage_final`)."""
    tap = SseUsageTap(False, named=True)
    tap.feed(event, False)
    assert (tap.ended, tap.done) == (ends, False)
