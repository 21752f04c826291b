"""Odd and hostile provider replies on the OpenAI-schema passthrough path (openai and azure
backends: the gateway forwards their events rather than rebuilding them), through real
Envoy and the ext_proc workers with values-local's output scanning on.

The invariants, whatever the provider's framing, encoding or content type:

- no restricted value leaves: the client's raw bytes (and the text an SSE client
  reassembles from them) never hold a blocked value (an AWS key) or a redacted one (a card
  number, also with its separators removed; an e-mail address); a redacted value's
  placeholder arrives instead and the rest of the text arrives whole;
- spend is accounted: `x-gateway-prompt-tokens`, the usage the client sees and the spend
  recorded against the key are the same as for the canonical framing (`data: <json>\\n\\n`);
- an answer the gateway cannot read (a compressed body it did not ask for) is a 502
  `provider_error` (or a stream ending in one such error event), never a 5xx of another
  kind or `gateway_internal_error`, and Envoy and every worker stay up.

The mock provider's `x-mock-sse-framing`, `x-mock-choice-replies` / `x-mock-merge-choices`,
`x-mock-content-encoding`, `x-mock-content-type` and `x-mock-garbage-reply` controls make
the odd replies (docs/mock-provider.md). FRAMING_EXAMPLES raises the hypothesis example
counts for a longer hunt.
"""

from __future__ import annotations

import base64
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from gateway_extproc import keys

from .conftest import Gateway, running_gateway
from .test_hostile_input import Watch

FRAMINGS = ["crlf", "cr", "nospace", "multiline", "comments", "fields"]
MODELS = ["default-chat", "azure-chat"]  # kind openai (primary mock) and kind azure (backup mock)
EXAMPLES = int(os.environ.get("FRAMING_EXAMPLES", "25"))

CARD = "4111 1111 1111 1111"  # credit_card: redacted on output -> [CREDIT_CARD_1]
EMAIL = "jane.doe@example.com"  # email: redacted on output -> [EMAIL_1]
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # aws_access_key: blocked on output (content_filter)
RESTRICTED = [CARD, EMAIL, AWS_KEY]
REDACTED_REPLY = f"Your card {CARD} is on file and we wrote to {EMAIL} about it; nothing else is needed today."
REDACTED_TEXT = "Your card [CREDIT_CARD_1] is on file and we wrote to [EMAIL_1] about it; nothing else is needed today."
BLOCKED_REPLY = f"Upload the report with the key {AWS_KEY} before noon, then tell the team it is done."
QUESTION: Any = [{"role": "user", "content": "What is on file for me?"}]
# One key per framing (and the canonical one), each with a budget, so each framing's spend is its own.
KEYS = {name: keys.generate(f"framing-{name}") for name in ["canonical", *FRAMINGS]}
NANO = 1_000_000_000


class Stack(tuple):  # type: ignore[type-arg]
    """(gateway, watch), shown short in hypothesis' reports."""

    def __repr__(self) -> str:
        return "<gateway>"


def checked(stack: Stack) -> Iterator[Gateway]:
    """The stack's gateway for one test: mocks reset before, every process alive and the
    logs clean (no internal error, no secret) after."""
    gw, watch = stack
    gw.reset()
    yield gw
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


@pytest.fixture(scope="module")
def framing_gw() -> Iterator[Stack]:
    def customize(values: dict[str, Any]) -> None:
        values["keys"] += [{"id": f"framing-{name}", "sha256": keys.digest(key), "team": "demo",
                            "budget": {"daily": 5}} for name, key in KEYS.items()]
    with running_gateway("gw-framing-", customize=customize) as gw:
        yield Stack((gw, Watch(gw)))


@pytest.fixture
def gw(framing_gw: Stack) -> Iterator[Gateway]:
    yield from checked(framing_gw)


# -- what the client received ------------------------------------------------------------------

_SEPARATORS = re.compile(r"[\s.\-_/\u200b]")


def leaks(text: str) -> list[str]:
    """The restricted values in a text, as written or with their separators removed."""
    flat = _SEPARATORS.sub("", text)
    return [v for v in RESTRICTED if v in text or _SEPARATORS.sub("", v) in flat]


@dataclass
class Received:
    """One streamed answer as the client got it: the raw bytes (decoded if the gateway
    labelled them with a content-encoding) and what an SSE client reads from them."""

    status: int
    headers: httpx.Headers
    raw: bytes  # as received, then decompressed when it was compressed
    body: bytes = b""  # decompressed when it was compressed
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # data that is not JSON (other than [DONE])
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.texts[i] for i in sorted(self.texts))

    def leaked(self) -> list[str]:
        seen = [self.raw.decode("utf-8", "replace"), self.text, *self.unreadable]
        return sorted({v for s in seen for v in leaks(s)})


def _decoded(raw: bytes) -> bytes:
    """The body decompressed when it is gzip or zlib data, labelled so or not (what a leak
    could hide behind; a cut-off stream decompresses as far as it goes), else as it is."""
    try:
        return zlib.decompressobj(wbits=47).decompress(raw)  # 47: gzip or zlib header
    except zlib.error:
        return raw


def receive(gw: Gateway, body: dict[str, Any], headers: dict[str, str], key: str | None = None) -> Received:
    """POST a chat request and read the answer raw (no automatic decompression)."""
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{gw.url}/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {key or gw.key}", "accept-encoding": "identity", **headers}) as resp:
        wire = b"".join(resp.iter_raw())
    got = Received(resp.status_code, resp.headers, wire)
    got.body = decoded = _decoded(wire)
    if decoded is not wire:
        got.raw = wire + b"\n" + decoded
    readable = decoded.decode("utf-8", "replace").encode()  # the SSE decoder reads UTF-8 only
    for sse in SSEDecoder().iter_bytes(iter([readable])):
        if sse.data.startswith("[DONE]"):
            got.done = True
            continue
        try:
            obj = orjson.loads(sse.data)
        except orjson.JSONDecodeError:
            got.unreadable.append(sse.data)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("choices", []), list):
            got.unreadable.append(sse.data)
            continue
        if "error" in obj:
            got.errors.append(obj["error"] if isinstance(obj["error"], dict) else {"error": obj["error"]})
        if obj.get("usage"):
            got.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or not isinstance(choice.get("delta") or {}, dict):
                got.unreadable.append(orjson.dumps(choice).decode())
                continue
            index = choice.get("index", 0)
            got.texts[index] = got.texts.get(index, "") + ((choice.get("delta") or {}).get("content") or "")
            if choice.get("finish_reason"):
                got.finish[index] = choice["finish_reason"]
    return got


@dataclass
class SdkRead:
    texts: list[str]
    finish: list[str | None]
    usage: Any
    prompt_tokens_header: str | None


def sdk_stream(gw: Gateway, model: str, headers: dict[str, str], key: str | None = None, **kwargs: Any) -> SdkRead:
    """The stream as the openai SDK reads it: each choice's text, finish reasons, usage."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key or gw.key, max_retries=0, timeout=60,
                           default_headers=headers)
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, stream=True, stream_options={"include_usage": True}, **kwargs)
    for chunk in raw.parse():
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        usage = chunk.usage or usage
    return SdkRead([texts[i] for i in sorted(texts)], [finish[i] for i in sorted(finish)], usage,
                   raw.headers.get("x-gateway-prompt-tokens"))


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}, **extra}


def framed(framing: str | None, **headers: str) -> dict[str, str]:
    return {**({"x-mock-sse-framing": framing} if framing else {}), **headers}


def assert_redacted(got: Received | SdkRead, where: str) -> None:
    text = got.text if isinstance(got, Received) else "".join(got.texts)
    assert leaks(text) == [], where
    assert "[CREDIT_CARD_1]" in text and "[EMAIL_1]" in text, f"{where}: {text!r}"


# -- a. every framing: nothing restricted leaves, the text arrives whole -------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_redacted_value_never_leaves_in_any_framing(gw: Gateway, framing: str, model: str) -> None:
    where = f"{model} {framing}"
    got = receive(gw, chat_body(model), framed(framing, **{"x-mock-reply": REDACTED_REPLY}))
    assert got.status == 200, where
    assert got.leaked() == [], where
    assert_redacted(got, where)
    assert got.text == REDACTED_TEXT, where
    assert got.done and got.finish == {0: "stop"} and got.errors == [], where
    canonical = sdk_stream(gw, model, {"x-mock-reply": REDACTED_REPLY})
    sdk = sdk_stream(gw, model, framed(framing, **{"x-mock-reply": REDACTED_REPLY}))
    assert canonical.texts == [REDACTED_TEXT]
    assert sdk.texts == canonical.texts and sdk.finish == ["stop"], where


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_blocked_value_never_leaves_in_any_framing(gw: Gateway, framing: str, model: str) -> None:
    where = f"{model} {framing}"
    got = receive(gw, chat_body(model), framed(framing, **{"x-mock-reply": BLOCKED_REPLY}))
    assert got.status == 200, where
    assert got.leaked() == [], where
    assert got.finish == {0: "content_filter"} and got.done and got.errors == [], where
    canonical = sdk_stream(gw, model, {"x-mock-reply": BLOCKED_REPLY})
    sdk = sdk_stream(gw, model, framed(framing, **{"x-mock-reply": BLOCKED_REPLY}))
    assert canonical.finish == ["content_filter"] and AWS_KEY not in "".join(canonical.texts)
    assert sdk.texts == canonical.texts and sdk.finish == canonical.finish, where


# No digits around the value: a number next to a card makes another number (a detection
# question, tests/test_detectors.py), not a framing one.
REPLY_WORDS = st.lists(st.sampled_from(["the", "invoice", "is", "due", "soon,", "see", "page", "and", "call", "us",
                                        "–", "ok.", "(note)", "😀", "\u00e9t\u00e9", "\\n", '"quoted"', "{}",
                                        "data:", ": keep-alive", "[DONE]"]),
                       min_size=0, max_size=12).map(" ".join)
VALUES = st.sampled_from([(CARD, "[CREDIT_CARD_1]"), ("4111-1111-1111-1111", "[CREDIT_CARD_1]"),
                          ("4111.1111.1111.1111", "[CREDIT_CARD_1]"), ("4111111111111111", "[CREDIT_CARD_1]"),
                          (EMAIL, "[EMAIL_1]"), (AWS_KEY, None)])


# A reply with a restricted value inside random words, cut into HTTP chunks of any size.
ANY_TEXT = {"chunk_bytes": st.sampled_from([None, 1, 3, 7, 64, 1_000_000]), "before": REPLY_WORDS,
            "after": REPLY_WORDS, "value": VALUES}


def sliced_reply(before: str, secret: str, after: str, chunk_bytes: int | None) -> tuple[str, dict[str, str]]:
    """The reply text and the mock-provider headers that send it in `chunk_bytes` pieces."""
    reply = f"{before} {secret} {after}".strip()
    return reply, {"x-mock-reply-base64": base64.b64encode(reply.encode()).decode(),
                   **({"x-mock-chunk-bytes": str(chunk_bytes)} if chunk_bytes else {})}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(framing=st.sampled_from(FRAMINGS), model=st.sampled_from(MODELS), **ANY_TEXT)
def test_a_any_framing_any_slicing_any_text(framing_gw: Stack, framing: str, model: str,
                                            chunk_bytes: int | None, before: str, after: str,
                                            value: tuple[str, str | None]) -> None:
    gw, watch = framing_gw
    secret, placeholder = value
    reply, headers = sliced_reply(before, secret, after, chunk_bytes)
    where = f"{model} {framing} {chunk_bytes} {reply!r}"
    got = receive(gw, chat_body(model), framed(framing, **headers))
    assert got.status == 200, where
    assert got.leaked() == [], where
    assert got.errors == [] and got.done, where
    if placeholder:
        assert placeholder in got.text and got.finish == {0: "stop"}, f"{where}: {got.text!r}"
    else:
        assert got.finish == {0: "content_filter"}, where
    canonical = sdk_stream(gw, model, headers)
    assert sdk_stream(gw, model, framed(framing, **headers)).texts == canonical.texts == [got.text], where
    watch.alive()


# -- b. token accounting does not depend on the framing ------------------------------------------


def spent(gw: Gateway, name: str) -> int:
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[name]}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    [daily] = [b for b in resp.json()["budgets"] if b["level"] == f"key:framing-{name}" and b["window"] == "daily"]
    return round(daily["spent_usd"] * NANO)


@pytest.mark.parametrize("model", MODELS)
def test_b_tokens_and_spend_are_the_same_whatever_the_framing(gw: Gateway, model: str) -> None:
    headers = {"x-mock-reply": REDACTED_REPLY}
    before = {name: spent(gw, name) for name in KEYS}
    canonical = sdk_stream(gw, model, headers, key=KEYS["canonical"])
    assert canonical.prompt_tokens_header is not None and canonical.usage is not None
    assert canonical.usage.completion_tokens > 0
    reads = {framing: sdk_stream(gw, model, framed(framing, **headers), key=KEYS[framing]) for framing in FRAMINGS}
    time.sleep(0.5)  # settlement runs after the response
    costs = {name: spent(gw, name) - before[name] for name in KEYS}
    assert costs["canonical"] > 0
    for framing, read in reads.items():
        assert read.prompt_tokens_header == canonical.prompt_tokens_header, framing
        assert read.usage is not None and read.usage.model_dump() == canonical.usage.model_dump(), framing
    assert {f: costs[f] for f in FRAMINGS} == {f: costs["canonical"] for f in FRAMINGS}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_b_a_stream_without_include_usage_is_charged_the_same(gw: Gateway, framing: str) -> None:
    """The provider's usage chunk is read (and dropped for a client that did not ask for it)
    in every framing: the key is charged what the canonical framing charges."""
    body = {"model": "default-chat", "messages": QUESTION, "stream": True}
    headers = {"x-mock-reply": "A plain reply of a dozen words or so, nothing restricted in it at all."}
    before = spent(gw, "canonical"), spent(gw, framing)
    canonical = receive(gw, body, headers, key=KEYS["canonical"])
    other = receive(gw, body, framed(framing, **headers), key=KEYS[framing])
    time.sleep(0.5)
    assert canonical.usage is None and other.usage is None, framing  # not asked for: not shown
    assert other.text == canonical.text and other.done, framing
    assert spent(gw, framing) - before[1] == spent(gw, "canonical") - before[0] > 0, framing


# -- c. several choices in one chunk ------------------------------------------------------------

FIRST = "The first choice says nothing sensitive, only that the weather is fine."
SECOND_REDACTED = f"The second choice holds the card {CARD} and the address {EMAIL} for the record."
SECOND_BLOCKED = f"The second choice holds the key {AWS_KEY} for the uploads this afternoon."


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("merge", ["0", "1"])
@pytest.mark.parametrize("framing", [None, "multiline"])
def test_c_a_value_in_the_second_choice_is_redacted_and_choices_stay_apart(gw: Gateway, model: str, merge: str,
                                                                            framing: str | None) -> None:
    headers = framed(framing, **{"x-mock-choice-replies": orjson.dumps([FIRST, SECOND_REDACTED]).decode(),
                                 "x-mock-merge-choices": merge})
    where = f"{model} merge={merge} {framing}"
    got = receive(gw, chat_body(model, n=2), headers)
    assert got.status == 200 and got.leaked() == [], where
    assert got.texts.get(0) == FIRST, f"{where}: {got.texts}"
    assert got.texts.get(1) == ("The second choice holds the card [CREDIT_CARD_1] and the address [EMAIL_1] "
                                "for the record."), f"{where}: {got.texts}"
    assert got.finish == {0: "stop", 1: "stop"} and got.done, where
    sdk = sdk_stream(gw, model, headers, n=2)
    assert sdk.texts == [got.texts[0], got.texts[1]], where


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("merge", ["0", "1"])
def test_c_a_blocked_value_in_the_second_choice_never_leaves(gw: Gateway, model: str, merge: str) -> None:
    headers = {"x-mock-choice-replies": orjson.dumps([FIRST, SECOND_BLOCKED]).decode(), "x-mock-merge-choices": merge}
    where = f"{model} merge={merge}"
    got = receive(gw, chat_body(model, n=2), headers)
    assert got.status == 200 and got.leaked() == [], where
    assert "content_filter" in got.finish.values() and got.done, f"{where}: {got.finish}"
    assert FIRST.startswith(got.texts.get(0, "")), f"{where}: {got.texts}"  # choice 0 never gets choice 1's text
    assert "second choice" not in got.texts.get(0, ""), where


# -- d. the provider is never asked for a compressed answer --------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_d_the_provider_is_asked_for_identity_and_the_answer_accounted(gw: Gateway, model: str, stream: bool) -> None:
    mock = gw.primary if model == "default-chat" else gw.backup
    body: dict[str, Any] = {"model": model, "messages": QUESTION, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(timeout=60) as client:  # httpx asks for gzip itself; say more
        resp = client.post(f"{gw.url}/v1/chat/completions", json=body, headers={
            "authorization": f"Bearer {gw.key}", "accept-encoding": "gzip, br", "x-mock-reply": REDACTED_REPLY})
    assert resp.status_code == 200, resp.text
    [sent] = gw.received(mock)
    assert sent["headers"]["accept-encoding"] == "identity", sent["headers"]  # the client's gzip, br replaced
    assert resp.headers.get("content-encoding", "identity") == "identity"
    assert int(resp.headers["x-gateway-prompt-tokens"]) > 0
    if stream:
        assert "[CREDIT_CARD_1]" in resp.text and leaks(resp.text) == []
        assert '"usage":{' in resp.text.replace(" ", "")
    else:
        assert int(resp.headers["x-gateway-completion-tokens"]) > 0
        assert resp.json()["choices"][0]["message"]["content"] == REDACTED_TEXT


# -- e. an answer compressed although nobody asked ----------------------------------------------


def assert_provider_error(got: Received, where: str) -> None:
    """A 502 `provider_error` in OpenAI's shape, or a stream that ends in one such error event."""
    if got.status != 200:
        assert got.status == 502, f"{where}: {got.status} {got.raw[:300]!r}"
        assert got.headers.get("content-type", "").startswith("application/json"), where
        doc = orjson.loads(got.body)
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "code", "param"}, where
        assert doc["error"]["code"] == "provider_error", where
        return
    assert got.texts == {} or leaks(got.text) == [], where
    assert [e.get("code") for e in got.errors] == ["provider_error"], f"{where}: {got.errors} {got.raw[-300:]!r}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("reply", [REDACTED_REPLY, BLOCKED_REPLY], ids=["redacted", "blocked"])
def test_e_a_compressed_answer_nobody_asked_for_is_a_provider_error(gw: Gateway, model: str, encoding: str,
                                                                    stream: bool, reply: str) -> None:
    where = f"{model} {encoding} stream={stream}"
    body = chat_body(model) if stream else {"model": model, "messages": QUESTION}
    got = receive(gw, body, {"x-mock-reply": reply, "x-mock-content-encoding": encoding})
    assert got.leaked() == [], where
    assert_provider_error(got, where)
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60,
                        default_headers={"x-mock-reply": reply, "x-mock-content-encoding": encoding})
    with pytest.raises(openai.APIError) as info:  # never a reply the client would take for an answer
        result = sdk.chat.completions.create(model=model, messages=QUESTION, stream=stream)
        if stream:
            list(result)
    assert leaks(str(info.value.body)) == [] and leaks(str(info.value)) == [], where


# -- f. a stream labelled as something else -----------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/octet-stream"])
@pytest.mark.parametrize("reply", [REDACTED_REPLY, BLOCKED_REPLY], ids=["redacted", "blocked"])
def test_f_a_stream_labelled_otherwise_leaks_nothing(gw: Gateway, model: str, content_type: str, reply: str) -> None:
    where = f"{model} {content_type}"
    got = receive(gw, chat_body(model), {"x-mock-reply": reply, "x-mock-content-type": content_type})
    assert got.leaked() == [], f"{where}: {got.raw[:400]!r}"
    if got.status != 200:
        assert_provider_error(got, where)
    assert b"gateway_internal_error" not in got.raw, where


@pytest.mark.parametrize("model", MODELS)
def test_f_a_json_answer_labelled_as_a_stream_leaks_nothing(gw: Gateway, model: str) -> None:
    got = receive(gw, {"model": model, "messages": QUESTION},
                  {"x-mock-reply": REDACTED_REPLY, "x-mock-content-type": "text/event-stream"})
    assert got.leaked() == [], got.raw[:400]
    assert got.status in (200, 502) and b"gateway_internal_error" not in got.raw, got.raw[:400]
    if got.status == 502:
        assert_provider_error(got, model)


@pytest.mark.parametrize("model", MODELS)
def test_f_a_json_answer_labelled_as_a_stream_is_the_sdks_completion(gw: Gateway, model: str) -> None:
    """It went out as 200 `text/event-stream` holding one SSE error event, which the SDK's
    non-streamed `create` returned as the completion (a string). Read whole, it is the answer."""
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60,
                        default_headers={"x-mock-reply": "Hello there.", "x-mock-content-type": "text/event-stream"})
    result = sdk.chat.completions.with_raw_response.create(model=model, messages=QUESTION)
    assert result.headers["content-type"].startswith("application/json")
    assert result.parse().choices[0].message.content == "Hello there."


# -- g. garbage mid-stream, some of it carrying the restricted value ----------------------------


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=st.sampled_from(MODELS), kind=st.sampled_from(["json", "shape", "bytes"]), after=st.integers(0, 30),
       carries=st.booleans(), reply=st.sampled_from([REDACTED_REPLY, BLOCKED_REPLY]),
       framing=st.sampled_from([None, None, *FRAMINGS]), chunk_bytes=st.sampled_from([None, None, 5, 1_000_000]))
def test_g_garbage_mid_stream_never_carries_a_value_out(framing_gw: Stack, model: str, kind: str,
                                                        after: int, carries: bool, reply: str, framing: str | None,
                                                        chunk_bytes: int | None) -> None:
    gw, watch = framing_gw
    headers = framed(framing, **{"x-mock-reply": reply, "x-mock-garbage-after-chunks": str(after),
                                 "x-mock-garbage": kind, "x-mock-garbage-reply": "1" if carries else "0",
                                 **({"x-mock-chunk-bytes": str(chunk_bytes)} if chunk_bytes else {})})
    where = f"{model} {kind} after={after} carries={carries} {framing} {chunk_bytes}"
    got = receive(gw, chat_body(model), headers)
    assert got.leaked() == [], f"{where}: {got.raw[-600:]!r}"
    assert got.status in (200, 502), where
    assert b"gateway_internal_error" not in got.raw, where
    watch.alive()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
def test_g_a_broken_event_holding_the_whole_value_is_not_forwarded(gw: Gateway, model: str, kind: str) -> None:
    """The broken event is the only place the card and the e-mail are whole (the mock's
    words split the card over four events; here the garbage comes first)."""
    for reply in (REDACTED_REPLY, BLOCKED_REPLY):
        got = receive(gw, chat_body(model), {"x-mock-reply": reply, "x-mock-garbage-after-chunks": "1",
                                             "x-mock-garbage": kind, "x-mock-garbage-reply": "1"})
        assert got.leaked() == [], f"{model} {kind}: {got.raw[:600]!r}"
        assert b"gateway_internal_error" not in got.raw


def test_json_garbage_reply_holding_the_value_is_not_forwarded(gw: Gateway) -> None:
    """A non-streamed answer cut in half (x-mock-garbage on a JSON reply) holding a card: the
    gateway cannot scan it, so it must not pass it on as it is."""
    for model in MODELS:
        got = receive(gw, {"model": model, "messages": QUESTION}, {
            "x-mock-reply": f"{CARD} {CARD} {CARD} and more words to make the half hold the card",
            "x-mock-garbage-after-chunks": "0", "x-mock-garbage": "json"})
        assert got.leaked() == [], f"{model}: {got.status} {got.raw[:400]!r}"
        assert b"gateway_internal_error" not in got.raw


@pytest.mark.parametrize("framing", ["canonical", *FRAMINGS])
@pytest.mark.parametrize("model", MODELS)
def test_anthropic_clients_get_the_same_redacted_answer_in_any_framing(gw: Gateway, framing: str, model: str) -> None:
    """`/v1/messages` on an OpenAI-schema backend: the provider's stream goes through the same
    reading and scanning before the gateway writes it as Anthropic events."""
    headers = {"x-mock-reply": REDACTED_REPLY, **({} if framing == "canonical" else {"x-mock-sse-framing": framing})}
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, default_headers=headers)
    with client.messages.stream(model=model, max_tokens=200, messages=QUESTION) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REDACTED_TEXT and final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    with httpx.stream("POST", f"{gw.url}/v1/messages", timeout=60, headers={"x-api-key": gw.key, **headers},
                      json={"model": model, "max_tokens": 200, "messages": QUESTION, "stream": True}) as resp:
        raw = b"".join(resp.iter_raw()).decode()
    assert resp.status_code == 200 and leaks(raw) == [] and "[CREDIT_CARD_1]" in raw


def test_the_gateway_is_ready_at_the_end(framing_gw: Stack) -> None:
    gw, watch = framing_gw
    watch.alive()
    assert httpx.get(f"{gw.stack.admin_url}/ready").status_code == 200
    time.sleep(0.3)
    watch.clean_log(watch.new_log())
