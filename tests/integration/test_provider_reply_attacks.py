"""Odd provider replies through real Envoy and the ext_proc (values-local: output scanning on).

Each test is a minimal reproducer of a broken invariant found by the provider-reply attack:
- every client gets a well-formed answer or a clean OpenAI-shaped error with a documented code;
- every request is accounted: never below what the provider reported, the reservation when
  the provider's usage never came in a readable form (docs/budgets.md);
- no e-mail address or phone number from a provider reply reaches the client unredacted.

The replies are shaped with the mock provider's raw controls (`x-mock-raw-status`,
`x-mock-raw-body`, `x-mock-raw-events`; docs/mock-provider.md), sealed by conftest.
"""

from __future__ import annotations

import array
import base64
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway_extproc import keys
from gateway_extproc.providers import eventstream

from .conftest import Gateway, add_provider_models, envoy_survives, raw_events, running_gateway

EMAIL, PHONE = "jane.doe@example.com", "+1 415 555 0100"
PII = f"write to {EMAIL} or call {PHONE}"
LEAKS = (EMAIL.encode(), b"415 555 0100", b"4155550100")
KEYS = {f"k{i}": keys.generate(f"attack-k{i}") for i in range(80)}
_next = iter(KEYS)


@pytest.fixture(scope="module")
def agw() -> Iterator[Gateway]:
    def customize(values: dict[str, Any]) -> None:
        add_provider_models(values)
        values["models"].append({"name": "anthropic-chat", "tokenizer": "o200k_base", "maxOutputTokens": 1024,
                                 "backends": [{"provider": "mock-anthropic", "model": "claude-mock-sonnet",
                                               "pricing": {"input": 3.0, "output": 15.0}, "maxTier": "internal"}]})
        values["keys"] += [{"id": f"attack-{name}", "sha256": keys.digest(key), "team": "demo", "budget": {"daily": 5}}
                           for name, key in KEYS.items()]
    with running_gateway("gw-attack-", customize=customize) as gw:
        yield gw


@pytest.fixture
def gw(agw: Gateway) -> Iterator[Gateway]:
    with envoy_survives(agw) as gw:
        yield gw


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def post(gw: Gateway, controls: dict[str, str], *, model: str = "default-chat", stream: bool = False,
         path: str = "/v1/chat/completions", body: dict[str, Any] | None = None, key: str | None = None) -> httpx.Response:
    body = body or {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return httpx.post(gw.url + path, json=body, timeout=60,
                      headers={"authorization": f"Bearer {key or gw.key}", **controls})


def spent(gw: Gateway, key: str) -> tuple[float, int]:
    """The key's daily spend and tokens (settlement is asynchronous: waits for it to move)."""
    for _ in range(50):
        got = httpx.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
        usd = next(b["spent_usd"] for b in got["budgets"] if b["level"].startswith("key:") and b["window"] == "daily")
        if usd:
            return usd, got["tokens_used"]["daily"]
        time.sleep(0.1)
    return usd, got["tokens_used"]["daily"]


def assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"} and error["code"] == code, error


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: Any = None,
          choices: bool = True) -> bytes:
    out: dict[str, Any] = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    if usage is not None:
        out["usage"] = usage
    return b"data: " + orjson.dumps(out) + b"\n\n"


# -- 1. an empty 2xx answer --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["default-chat", "azure-chat", "anthropic-chat", "gemini-chat", "bedrock-chat"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", ["200", "201", "204"])
def test_an_empty_2xx_answer_is_a_provider_error_charged_its_reservation(gw: Gateway, model: str, stream: bool,
                                                                         status: str) -> None:
    """A provider (or a proxy before it) that answers 2xx with no body at all: it went out as an
    empty 200/204, which the openai SDK cannot parse (JSON) or reads as an answer with no text
    and no error (stream)."""
    key = KEYS[next(_next)]
    r = post(gw, {"x-mock-raw-status": status, "x-mock-raw-body": ""}, model=model, stream=stream, key=key)
    assert_openai_error(r, 502, "provider_error")
    usd, _ = spent(gw, key)
    assert usd > 0 and math.isfinite(usd), usd  # the provider may have worked: its reservation


def test_an_empty_2xx_answer_raises_in_the_openai_sdk(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0,
                           default_headers={"x-mock-raw-body": ""})
    with pytest.raises(openai.APIStatusError):
        for _ in client.chat.completions.create(model="default-chat", stream=True,
                                                messages=[{"role": "user", "content": "hi"}]):
            pass


# -- 2. usage the gateway cannot read never lowers the charge ----------------------------------


def test_a_later_empty_usage_block_does_not_erase_the_providers_usage(gw: Gateway) -> None:
    """A stream whose usage chunk is followed by another chunk with `"usage": {}`: the reported
    2,000 completion tokens were forgotten and the stream charged as if it had no usage (the
    prompt and one token for its one content event). The 2,000 are past the 1,024-token cap
    the request reserved, so they are tallied at the reservation (docs/budgets.md)."""
    key = KEYS[next(_next)]
    events = [chunk({"role": "assistant", "content": "word " * 2000}), chunk(finish="stop"),
              chunk(usage={"prompt_tokens": 8, "completion_tokens": 2000, "total_tokens": 2008}, choices=False),
              chunk(usage={}, choices=False), b"data: [DONE]\n\n"]
    r = post(gw, {"x-mock-raw-events": raw_events(*events)}, stream=True, key=key)
    assert r.status_code == 200 and b"[DONE]" in r.content
    _, tokens = spent(gw, key)
    assert tokens >= 1000, tokens  # prompt + the 1,024 reserved, not prompt + 1


@pytest.mark.parametrize("completion", [2000.0, "2000", -1, 10**30])
def test_usage_the_gateway_cannot_read_is_charged_the_reservation(gw: Gateway, completion: Any) -> None:
    """A stream whose usage chunk says 2,000 completion tokens in a form the gateway does not read
    as a token count (a float, a string, a negative, an integer past 64 bits): it was charged as a
    stream without usage, one token per content event, though its one event held 2,000 words.
    The bill is unknown, so the reservation (docs/budgets.md)."""
    key = KEYS[next(_next)]
    usage = b'{"prompt_tokens":8,"completion_tokens":' + (
        str(completion).encode() if not isinstance(completion, str) else orjson.dumps(completion)) + b"}"
    events = [chunk({"role": "assistant", "content": "word " * 2000}), chunk(finish="stop"),
              b'data: {"id":"chatcmpl-a","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
              b'"usage":' + usage + b"}\n\n", b"data: [DONE]\n\n"]
    r = post(gw, {"x-mock-raw-events": raw_events(*events)}, stream=True, key=key)
    assert r.status_code == 200
    _, tokens = spent(gw, key)
    assert tokens >= 1000, tokens  # the reservation: prompt + the 1,024-token cap (or the 2,008 reported)


# -- 3. output scanning: what a provider puts beside the answer ---------------------------------


def test_a_value_in_a_top_level_field_of_a_json_answer_never_leaves(gw: Gateway) -> None:
    """The same field is scanned in a stream chunk (dropped there); in a JSON answer only
    `choices` was scanned, so an extension field, `model` or `system_fingerprint` carried
    the value out."""
    body = {"id": "chatcmpl-a", "object": "chat.completion", "created": 1, "model": PII, "system_fingerprint": PII,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
            "prompt_echo": PII, "metadata": {"note": PII}}
    for model in ("default-chat", "azure-chat"):
        r = post(gw, {"x-mock-raw-body": b64(orjson.dumps(body))}, model=model)
        assert r.status_code == 200, r.text
        assert not [leak for leak in LEAKS if leak in r.content], r.text
        assert r.json()["choices"][0]["message"]["content"] == "ok"


def test_a_value_in_an_embeddings_answer_never_leaves(gw: Gateway) -> None:
    body = {"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1},
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2], "input": PII}], "note": PII}
    r = post(gw, {"x-mock-raw-body": b64(orjson.dumps(body))}, path="/v1/embeddings",
             body={"model": "default-embedding", "input": "hi"})
    assert r.status_code in (200, 502), r.text
    assert not [leak for leak in LEAKS if leak in r.content], r.text
    if r.status_code == 200:
        assert r.json()["data"][0]["embedding"] == [0.1, 0.2]


@pytest.mark.parametrize("case", ["text", "base64-of-text", "nested"])
def test_text_under_an_embedding_key_never_leaves(gw: Gateway, case: str) -> None:
    """`embedding` was skipped wherever it was, whatever it held: the vectors carry no text,
    but a provider that wrote text there (or base64 of text, or an `embedding` string in an
    extension field) handed it to the client unread. Now only a vector is skipped."""
    data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]
    body = {"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1}, "data": data}
    if case == "text":
        data[0]["embedding"] = PII
    elif case == "base64-of-text":
        data[0]["embedding"] = b64(PII * 2)
    else:
        body["debug"] = {"embedding": PII}
    r = post(gw, {"x-mock-raw-body": b64(orjson.dumps(body))}, path="/v1/embeddings",
             body={"model": "default-embedding", "input": "hi"})
    assert r.status_code == 200, r.text
    got = r.json()["data"][0]["embedding"]
    shown = r.content + (base64.b64decode(got + "==") if case == "base64-of-text" else b"")
    assert not [leak for leak in LEAKS if leak in shown], r.text


@pytest.mark.parametrize("dimensions", [8, 1536])
def test_vectors_still_reach_the_openai_sdk_as_sent(gw: Gateway, dimensions: int) -> None:
    """The other side: base64 float32 vectors (the SDK's default) go out byte for byte."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    got = client.embeddings.create(model="default-embedding", input=["hi", "there"], dimensions=dimensions)
    [sent] = gw.received(gw.primary)
    direct = httpx.post(gw.primary + "/v1/embeddings", json=sent["body"],
                        headers={"authorization": sent["headers"]["authorization"]}).json()
    assert [d.embedding for d in got.data] == [
        list(array.array("f", base64.b64decode(d["embedding"]))) for d in direct["data"]]


@pytest.mark.parametrize("junk", [b"junk", b"[1, 2]", b'{"object": "list"}'])
def test_an_embeddings_answer_that_is_no_answer_is_a_provider_error(gw: Gateway, junk: bytes) -> None:
    r = post(gw, {"x-mock-raw-body": b64(junk)}, path="/v1/embeddings",
             body={"model": "default-embedding", "input": "hi"})
    assert_openai_error(r, 502, "provider_error")
    assert junk not in r.content


@pytest.mark.parametrize("model", ["default-chat", "anthropic-chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_value_in_a_provider_answer_header_never_leaves(gw: Gateway, model: str, stream: bool) -> None:
    """Any header a provider writes, the standard ones and the gateway's prefixes included
    (until 2026-12-08 `cache-control`, `vary`, `retry-after`, `x-ratelimit-*` other than the
    six the chart removes, and any `x-gateway-*` or `x-envoy-*` went out unread)."""
    for sent in ({"x-debug-echo": PII, "www-authenticate": f'Bearer realm="{EMAIL}"'},
                 {"cache-control": f"private, {PII}", "vary": PII, "retry-after": PHONE},
                 {"x-ratelimit-limit-images": PII, "x-gateway-note": PII, "x-envoy-note": PII},
                 {"date": PII, "server": PII, "content-type": f"application/json; note={EMAIL}"}):
        r = post(gw, {"x-mock-response-headers": orjson.dumps(sent).decode()}, model=model, stream=stream)
        assert r.status_code in (200, 502), r.text  # (502: an answer whose content type is no answer)
        shown = "\n".join(f"{k}: {v}" for k, v in r.headers.items()).encode()
        assert not [leak for leak in LEAKS if leak in shown], shown


def anthropic_events(output_tokens: Any, text: str) -> list[bytes]:
    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"
    return [event("message_start", {"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "c", "content": [],
                "stop_reason": None, "usage": {"input_tokens": 8, "output_tokens": 1}}}),
            event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
            event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": text}}),
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": output_tokens}}),
            event("message_stop", {"type": "message_stop"})]


@pytest.mark.parametrize("output_tokens", ["2000", 2000.0, -3])
def test_a_translated_stream_whose_usage_cannot_be_read_is_charged_the_reservation(gw: Gateway,
                                                                                   output_tokens: Any) -> None:
    """An Anthropic stream whose `message_delta` reports its 2,000 output tokens as a string (the
    translator fails at that event and ends the stream with a `provider_error` after the whole
    answer went out), a float or a negative: charged the prompt and one token for the one content
    event instead of the reservation."""
    key = KEYS[next(_next)]
    r = post(gw, {"x-mock-raw-events": raw_events(*anthropic_events(output_tokens, "word " * 2000))},
             model="anthropic-chat", stream=True, key=key)
    assert r.status_code == 200
    _, tokens = spent(gw, key)
    assert tokens >= 1000, tokens


def translated_reply(model: str, stream: bool, usage: Any, text: str) -> dict[str, str]:
    """Mock controls for a reply of `text` in the backend's own dialect with `usage` as its usage
    block (left out when `usage` is ...): Anthropic Messages, Converse (event stream) or Gemini."""
    if model == "anthropic-chat":
        if not stream:
            body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c", "stop_reason": "end_turn",
                    "content": [{"type": "text", "text": text}]}
            return {"x-mock-raw-body": b64(orjson.dumps(body if usage is ... else {**body, "usage": usage}))}
        events = anthropic_events(0, text)
        delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
        events[-2] = b"event: message_delta\ndata: " + orjson.dumps(
            delta if usage is ... else {**delta, "usage": usage}) + b"\n\n"
        return {"x-mock-raw-events": raw_events(*events)}
    if model == "bedrock-chat":
        if not stream:
            body = {"output": {"message": {"role": "assistant", "content": [{"text": text}]}}, "stopReason": "end_turn"}
            return {"x-mock-raw-body": b64(orjson.dumps(body if usage is ... else {**body, "usage": usage}))}

        def frame(name: str, payload: dict[str, Any]) -> bytes:
            return eventstream.encode({":event-type": name, ":content-type": "application/json",
                                       ":message-type": "event"}, orjson.dumps(payload))
        frames = [frame("messageStart", {"role": "assistant"}),
                  frame("contentBlockDelta", {"delta": {"text": text}, "contentBlockIndex": 0}),
                  frame("contentBlockStop", {"contentBlockIndex": 0}), frame("messageStop", {"stopReason": "end_turn"})]
        if usage is not ...:
            frames.append(frame("metadata", {"usage": usage, "metrics": {"latencyMs": 1}}))
        return {"x-mock-raw-events": raw_events(*frames)}
    doc: dict[str, Any] = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                           "finishReason": "STOP", "index": 0}]}
    if usage is not ...:
        doc["usageMetadata"] = usage
    if not stream:
        return {"x-mock-raw-body": b64(orjson.dumps(doc))}
    return {"x-mock-raw-events": raw_events(b"data: " + orjson.dumps(doc) + b"\n\n")}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "usage"), [
    ("anthropic-chat", ...), ("anthropic-chat", {}), ("anthropic-chat", {"input_tokens": 8}),
    ("anthropic-chat", {"input_tokens": 8, "output_tokens": None}),
    ("bedrock-chat", ...), ("bedrock-chat", {}), ("bedrock-chat", {"inputTokens": 8, "totalTokens": 8}),
    ("gemini3-chat", ...), ("gemini3-chat", {}),
    ("gemini3-chat", {"promptTokenCount": 8, "candidatesTokenCount": 2000, "thoughtsTokenCount": -2000}),
], ids=lambda v: "absent" if v is ... else None)
def test_a_translated_answer_whose_usage_lacks_a_count_is_charged_the_reservation(
        gw: Gateway, model: str, usage: Any, stream: bool) -> None:
    """A Claude, Converse or Gemini answer of 2,000 words whose usage block is missing, lacks the
    output count (a `message_delta` without usage: message_start's placeholder `output_tokens: 1`
    was taken as the bill), or holds a negative part: the translators read a missing count as 0
    and summed a negative one, so the answer was charged $0 (no usage at all), the prompt alone,
    or ~one token per event (a Converse or Gemini stream without usage). The bill is unknown:
    the reservation, as for an OpenAI answer (docs/budgets.md)."""
    key = KEYS[next(_next)]
    r = post(gw, translated_reply(model, stream, usage, "word " * 2000), model=model, stream=stream, key=key)
    assert r.status_code == 200, r.text[:300]
    if stream:
        assert b"data: [DONE]" in r.content and b'"error"' not in r.content, r.text[-300:]
    else:
        assert r.json()["choices"][0]["message"]["content"].startswith("word")
    _, tokens = spent(gw, key)
    assert tokens >= 1000, tokens  # the reservation: the prompt + the 1,024-token cap


@pytest.mark.parametrize("model", ["anthropic-chat", "bedrock-chat", "gemini3-chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_translated_answer_with_its_usage_is_charged_that_usage(gw: Gateway, model: str, stream: bool) -> None:
    """The other side of the test above: an honest usage block is what the answer costs."""
    usage = {"anthropic-chat": {"input_tokens": 8, "output_tokens": 20},
             "bedrock-chat": {"inputTokens": 8, "outputTokens": 20, "totalTokens": 28},
             "gemini3-chat": {"promptTokenCount": 8, "candidatesTokenCount": 20, "totalTokenCount": 28}}[model]
    key = KEYS[next(_next)]
    r = post(gw, translated_reply(model, stream, usage, "word " * 20), model=model, stream=stream, key=key)
    assert r.status_code == 200, r.text[:300]
    _, tokens = spent(gw, key)
    assert tokens == 28, tokens


AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # aws_access_key: blocked on output (content_filter)


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("case", ["beside-usage", "in-usage", "no-usage", "no-choices"])
def test_a_value_in_a_chunk_without_choices_never_leaves(gw: Gateway, case: str, include_usage: bool) -> None:
    """A chunk with `choices: []` (the usage chunk's shape) went out unscanned: a value beside the
    usage, inside it, or in a chunk with no usage at all reached the client (the last even when it
    did not ask for usage)."""
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    bare = {"beside-usage": {"choices": [], "usage": usage, "note": PII},
            "in-usage": {"choices": [], "usage": {**usage, "note": PII}},
            "no-usage": {"choices": [], "note": PII},
            "no-choices": {"usage": {**usage, "note": PII}}}[case]
    events = [chunk({"role": "assistant", "content": "hi"}, "stop"),
              b"data: " + orjson.dumps({"id": "chatcmpl-a", "object": "chat.completion.chunk", **bare}) + b"\n\n",
              b"data: [DONE]\n\n"]
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r = post(gw, {"x-mock-raw-events": raw_events(*events)}, body=body)
    assert r.status_code == 200
    assert not [leak for leak in LEAKS if leak in r.content], r.text
    assert r.content.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("where", ["chunk", "bare-chunk"])
def test_a_blocked_value_beside_the_text_is_not_repeated_in_the_block(gw: Gateway, where: str) -> None:
    """A chunk whose extension field holds a value that blocks ends the stream with a
    `content_filter` chunk built from that chunk, which carried the field, value and all."""
    head = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    choices = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}] if where == "chunk" else []
    events = [chunk({"role": "assistant", "content": "hello"}),
              b"data: " + orjson.dumps({**head, "choices": choices, "note": f"key {AWS_KEY}"}) + b"\n\n",
              b"data: [DONE]\n\n"]
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    r = post(gw, {"x-mock-raw-events": raw_events(*events)}, body=body)
    assert r.status_code == 200
    assert AWS_KEY.encode() not in r.content, r.text
    assert b'"finish_reason":"content_filter"' in r.content, r.text


STREAM_LABELS = {
    "usage-beside-choices": ({}, {"usage": {"prompt_tokens": 1, "completion_tokens": 1, "note": PII}}),
    "prompt_filter_results": ({}, {"prompt_filter_results": [{"note": PII}]}),
    "obfuscation": ({}, {"obfuscation": PII}),
    "service_tier": ({}, {"service_tier": PII}),
    "content_filter_results": ({"content_filter_results": {"note": PII}}, {}),
    "finish_reason": ({"finish_reason": PII}, {}),
    "role": ({"delta": {"role": PII, "content": "hi"}}, {}),
    "tool-call-type": ({"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": PII,
                                                  "function": {"name": "f", "arguments": "{}"}}]}}, {}),
}


@pytest.mark.parametrize("case", list(STREAM_LABELS))
def test_a_value_in_a_schema_label_of_a_stream_chunk_never_leaves(gw: Gateway, case: str) -> None:
    """Fields of the chat stream schema other than its texts were taken as the provider's labels
    and never scanned: a provider putting a value in `finish_reason`, a delta's `role`, a tool
    call's `type`, `service_tier`, `obfuscation`, Azure's filter results or a usage object
    beside the choices had it reach the client."""
    choice_fields, chunk_fields = STREAM_LABELS[case]
    choice = {"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop", **choice_fields}
    event = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [choice], **chunk_fields}
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    r = post(gw, {"x-mock-raw-events": raw_events(b"data: " + orjson.dumps(event) + b"\n\n", b"data: [DONE]\n\n")},
             body=body)
    assert r.status_code == 200
    assert not [leak for leak in LEAKS if leak in r.content], r.text


JSON_LABELS = {
    "role": {"role": PII, "content": "ok"},
    "finish_reason": None,
    "tool-call-type": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": PII, "function": {"name": "f", "arguments": "{}"}}]},
}


@pytest.mark.parametrize("case", list(JSON_LABELS))
def test_a_value_in_a_schema_label_of_a_json_answer_never_leaves(gw: Gateway, case: str) -> None:
    message = JSON_LABELS[case] or {"role": "assistant", "content": "ok"}
    choice = {"index": 0, "message": message, "finish_reason": PII if case == "finish_reason" else "stop"}
    body = {"id": "chatcmpl-a", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    r = post(gw, {"x-mock-raw-body": b64(orjson.dumps(body))})
    assert r.status_code == 200
    assert not [leak for leak in LEAKS if leak in r.content], r.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_value_a_provider_puts_in_a_responses_echo_field_never_leaves(gw: Gateway, stream: bool) -> None:
    done = {"id": "resp_1", "object": "response", "status": "completed", "model": "m", "output": [],
            "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6},
            "instructions": PII, "metadata": {"a": PII}}
    body = {"model": "default-chat", "input": "hi", "stream": stream}
    if stream:
        event = b"event: response.completed\ndata: " + orjson.dumps(
            {"type": "response.completed", "response": done, "sequence_number": 0}) + b"\n\n"
        controls = {"x-mock-raw-events": raw_events(event)}
    else:
        controls = {"x-mock-raw-body": b64(orjson.dumps(done))}
    r = post(gw, controls, path="/v1/responses", body=body)
    assert r.status_code == 200
    assert not [leak for leak in LEAKS if leak in r.content], r.text


def test_a_value_in_an_embeddings_error_never_leaves(gw: Gateway) -> None:
    """docs/classification.md: error answers of any endpoint are scanned; an embeddings request
    had no output guard, so its provider's error message went out unscanned."""
    r = post(gw, {"x-mock-status": "400", "x-mock-error-message-base64": b64(PII)}, path="/v1/embeddings",
             body={"model": "default-embedding", "input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["message"], r.text
    assert not [leak for leak in LEAKS if leak in r.content], r.text


@pytest.mark.parametrize("model", ["private-chat", "default-chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_with_headers_near_envoys_limit_is_a_provider_error_not_the_gateways(
        gw: Gateway, model: str, stream: bool) -> None:
    """90 header lines from a provider (under Envoy's own 100): the gateway's headers on top of
    them made Envoy refuse the ext_proc's mutation (`header_mutation_result_exceeds_limit`) and
    answer 503 `gateway_unavailable`, every time, for an answer the provider had billed. It is
    the provider's answer that cannot pass: 502 `provider_error`, charged like any answer the
    client did not get (the reservation), and the gateway serves on."""
    key = KEYS[next(_next)]
    many = orjson.dumps({f"x-provider-{i}": "v" for i in range(90)}).decode()
    r = post(gw, {"x-mock-response-headers": many}, model=model, stream=stream, key=key)
    assert_openai_error(r, 502, "provider_error")
    assert "headers" in r.json()["error"]["message"]
    usd, _ = spent(gw, key)
    assert usd > 0  # the provider processed it: never charged $0
    assert post(gw, {}, model=model, stream=stream).status_code == 200


def responses_items(first: str, between: dict[str, Any], second: str) -> list[dict[str, Any]]:
    def message(i: int, text: str) -> dict[str, Any]:
        return {"type": "message", "id": f"msg_{i}", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return [message(0, first), between, message(2, second)]


def responses_events(items: list[dict[str, Any]]) -> list[bytes]:
    """OpenAI's event sequence for these items (message texts and function-call arguments streamed)."""
    head = {"id": "resp_1", "object": "response", "created_at": 1, "model": "m", "output": []}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {**head, "status": "in_progress"}}]
    for i, item in enumerate(items):
        at = {"item_id": item["id"], "output_index": i}
        if item["type"] == "message":
            text = item["content"][0]["text"]
            events += [{"type": "response.output_item.added", "output_index": i, "item": {**item, "content": []}},
                       {"type": "response.output_text.delta", **at, "content_index": 0, "delta": text},
                       {"type": "response.output_text.done", **at, "content_index": 0, "text": text}]
        else:
            events += [{"type": "response.output_item.added", "output_index": i, "item": {**item, "arguments": ""}},
                       {"type": "response.function_call_arguments.delta", **at, "delta": item["arguments"]},
                       {"type": "response.function_call_arguments.done", **at, "arguments": item["arguments"]}]
        events.append({"type": "response.output_item.done", "output_index": i, "item": item})
    events.append({"type": "response.completed", "response": {**head, "status": "completed", "output": items,
                                                             "usage": {"input_tokens": 5, "output_tokens": 30,
                                                                       "total_tokens": 35}}})
    return [b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps({**e, "sequence_number": n}) + b"\n\n"
            for n, e in enumerate(events)]


def test_a_card_over_two_responses_messages_with_a_tool_call_between_never_leaves(gw: Gateway) -> None:
    """The openai SDK's `output_text` joins every message's text: a card split over two of them
    with a function call between went out whole, as JSON and streamed, until 2026-12-08."""
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup", "status": "completed",
            "arguments": orjson.dumps({"query": "the account and its billing history " * 3}).decode()}
    items = responses_items("Your card number is 4111 1111", call, " 1111 1111, as requested.")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    body = {"id": "resp_1", "object": "response", "created_at": 1, "model": "m", "status": "completed",
            "output": items, "usage": {"input_tokens": 5, "output_tokens": 30, "total_tokens": 35}}
    answer = client.responses.create(model="default-chat", input="hi",
                                     extra_headers={"x-mock-raw-body": b64(orjson.dumps(body))})
    assert answer.output_text == "Your card number is [CREDIT_CARD_1] [CREDIT_CARD_1], as requested."
    with client.responses.create(model="default-chat", input="hi", stream=True, extra_headers={
            "x-mock-raw-events": raw_events(*responses_events(items))}) as stream:
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "as requested" not in deltas and deltas.count("1111") <= 1, deltas  # (the second message never went out)
    assert events[-1].type == "response.incomplete" and events[-1].response.output == []


@pytest.mark.parametrize("end", [b"data: [DONE]\n\n", b'data: {"error": {"message": "overloaded"}}\n\n'])
def test_a_count_so_far_that_more_text_followed_is_no_bill_when_the_stream_ends_itself(gw: Gateway,
                                                                                      end: bytes) -> None:
    """Usage so far on the first chunk (1 token), then 300 chunks of text, then `[DONE]` or an
    error event: charged as the bill, 1 output token, until 2026-12-08; the reservation now."""
    key = KEYS[next(_next)]
    events = [chunk({"role": "assistant", "content": "word"}, usage={"prompt_tokens": 8, "completion_tokens": 1,
                                                                      "total_tokens": 9}),
              chunk({"content": " word"}), chunk(finish="stop"), end]
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 400}
    r = post(gw, {"x-mock-raw-events": raw_events(*events), "x-mock-raw-repeat": "[1, 300]"}, body=body, key=key)
    assert r.status_code == 200
    _, tokens = spent(gw, key)
    assert tokens >= 400, tokens


def test_a_gemini_partial_args_index_far_past_its_array_is_unreadable_not_gigabytes(gw: Gateway) -> None:
    """`$.a[1000000000]` in a 290-byte event padded a list to that length in the ext_proc
    (gigabytes, or a MemoryError that dropped the stream) until 2026-12-08; now the stream is
    one the gateway could not read: a provider_error, charged the reservation."""
    key = KEYS[next(_next)]
    call = {"name": "save", "willContinue": True,
            "partialArgs": [{"jsonPath": "$.a[1000000000]", "stringValue": "x"}]}
    event = b"data: " + orjson.dumps({"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": call}]}}]}) + b"\n\n"
    body = {"model": "gemini-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 300}
    r = post(gw, {"x-mock-raw-events": raw_events(event)}, body=body, key=key)
    assert r.status_code == 200 and b"provider_error" in r.content, r.content[:300]
    _, tokens = spent(gw, key)
    assert tokens >= 300, tokens


def test_a_converse_stream_cut_off_is_charged_the_reservation(gw: Gateway) -> None:
    """A Converse stream ended mid-way (or garbled) was charged about one token an event until
    2026-12-08, where every other provider's is charged the reservation (docs/budgets.md)."""
    for cut in ({"x-mock-end-after-chunks": "4"}, {"x-mock-garbage-after-chunks": "4", "x-mock-garbage": "json"}):
        key = KEYS[next(_next)]
        body = {"model": "bedrock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": 300}
        r = post(gw, {"x-mock-reply": "one two three four five six seven eight nine ten", **cut}, body=body, key=key)
        assert r.status_code == 200
        _, tokens = spent(gw, key)
        assert tokens >= 300, (cut, tokens)
