"""Odd and hostile provider replies on the translated provider paths, through real Envoy
and the ext_proc workers with values-local's output scanning on: backends of kind
anthropic (SSE), bedrock (AWS event-stream, SigV4) and gemini (`alt=sse`), whose answers
the router translates into the OpenAI schema (processors/provider_response.py), read by
openai-SDK clients (chat completions) and by Anthropic-SDK clients (`/v1/messages`, which
the gateway answers from the same chat stream, on an openai and an anthropic backend).

The invariants of tests/integration/test_provider_framing.py hold here too, whatever the
provider's SSE framing, HTTP chunk slicing, garbage mid-stream (also garbage carrying the
reply), content type, compression or early end:

- no restricted value leaves: not in the raw bytes, not in what the SDK returns, not in an
  error message;
- spend is accounted the same as for the canonical framing (usage the client sees, the
  spend charged to the key);
- no 5xx but the documented ones (502 `provider_error`), never `gateway_internal_error`,
  and Envoy and every worker stay up;
- long replies arrive whole and are charged.

The Responses API goes to OpenAI-schema backends only (docs/providers.md): on a translated
backend it is refused before any provider is asked.

FRAMING_EXAMPLES raises the hypothesis example counts for a longer hunt.
"""

from __future__ import annotations

import asyncio
import time
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

from gateway_extproc import keys

from .conftest import Gateway, add_provider_models, running_gateway
from .test_hostile_input import Watch
from .test_provider_framing import (AWS_KEY, BLOCKED_REPLY, EXAMPLES, FRAMINGS, QUESTION, REDACTED_REPLY,
                                    REDACTED_TEXT, REPLY_WORDS, VALUES, Received, Stack, assert_provider_error,
                                    chat_body, checked, framed, leaks, receive, sdk_stream, sliced_reply)

# model -> does its provider speak SSE (so x-mock-sse-framing applies)
MODELS = {"anthropic-chat": True, "bedrock-chat": False, "gemini-chat": True}
SSE_MODELS = [m for m, sse in MODELS.items() if sse]
CASES = [(m, f) for m, sse in MODELS.items() for f in ([None, *FRAMINGS] if sse else [None])]
SLICES = [None, 1, 2, 3, 5, 7, 10, 1_000_000]
# Anthropic-SDK clients: on an openai backend and on an anthropic backend.
MESSAGES_MODELS = ["default-chat", "anthropic-chat"]
NANO = 1_000_000_000
KEYS = {name: keys.generate(f"xlate-{name}")
        for name in ["canonical", *FRAMINGS, "sliced", "sliced-1", "sliced-big", "long", "left"]}


@pytest.fixture(scope="module")
def xlate_gw() -> Iterator[Stack]:
    def customize(values: dict[str, Any]) -> None:
        add_provider_models(values)
        # values-local's claude-chat falls back to Bedrock, which answers once the resets these
        # tests provoke get its Anthropic endpoint ejected: a model with only Anthropic behind it.
        values["models"].append({"name": "anthropic-chat", "tokenizer": "o200k_base", "maxOutputTokens": 1024,
                                 "backends": [{"provider": "mock-anthropic", "model": "claude-mock-sonnet",
                                               "pricing": {"input": 3.0, "output": 15.0}, "maxTier": "internal"}]})
        values["keys"] += [{"id": f"xlate-{name}", "sha256": keys.digest(key), "team": "demo",
                            "budget": {"daily": 5}} for name, key in KEYS.items()]
    with running_gateway("gw-xlate-", customize=customize) as gw:
        yield Stack((gw, Watch(gw)))


@pytest.fixture
def gw(xlate_gw: Stack) -> Iterator[Gateway]:
    yield from checked(xlate_gw)


def no_internal_error(got: Received, where: str) -> None:
    """A 200, or a documented 502: `provider_error`, or `upstream_reset` (a provider that
    closed the connection before its answer began); a stream ends in at most one error."""
    assert got.status in (200, 502), f"{where}: {got.status} {got.raw[:300]!r}"
    assert b"gateway_internal_error" not in got.raw, where
    if got.status == 502 and b'"upstream_reset"' in got.body:
        assert orjson.loads(got.body)["error"]["code"] == "upstream_reset", where
    elif got.status == 502:
        assert_provider_error(got, where)
    else:
        assert len(got.errors) <= 1, f"{where}: {got.errors}"
        assert {e.get("code") for e in got.errors} <= {"provider_error", "upstream_stream_interrupted"}, where


# -- a. every framing and slicing: nothing restricted leaves, the text arrives whole ------------


@pytest.mark.parametrize(("model", "framing"), CASES)
def test_a_redacted_and_blocked_values_never_leave_in_any_framing(gw: Gateway, model: str,
                                                                  framing: str | None) -> None:
    where = f"{model} {framing}"
    got = receive(gw, chat_body(model), framed(framing, **{"x-mock-reply": REDACTED_REPLY}))
    assert got.status == 200 and got.leaked() == [], where
    assert got.text == REDACTED_TEXT, f"{where}: {got.text!r}"
    assert got.done and got.finish == {0: "stop"} and got.errors == [] and got.usage, where
    sdk = sdk_stream(gw, model, framed(framing, **{"x-mock-reply": REDACTED_REPLY}))
    assert sdk.texts == [REDACTED_TEXT] and sdk.finish == ["stop"], where
    got = receive(gw, chat_body(model), framed(framing, **{"x-mock-reply": BLOCKED_REPLY}))
    assert got.status == 200 and got.leaked() == [], where
    assert got.finish == {0: "content_filter"} and got.done and got.errors == [], where
    sdk = sdk_stream(gw, model, framed(framing, **{"x-mock-reply": BLOCKED_REPLY}))
    assert sdk.finish == ["content_filter"] and AWS_KEY not in "".join(sdk.texts), where


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(CASES), chunk_bytes=st.sampled_from(SLICES), before=REPLY_WORDS, after=REPLY_WORDS,
       value=VALUES)
def test_a_any_framing_any_slicing_any_text(xlate_gw: Stack, case: tuple[str, str | None], chunk_bytes: int | None,
                                            before: str, after: str, value: tuple[str, str | None]) -> None:
    gw, watch = xlate_gw
    model, framing = case
    secret, placeholder = value
    reply, headers = sliced_reply(before, secret, after, chunk_bytes)
    where = f"{model} {framing} {chunk_bytes} {reply!r}"
    got = receive(gw, chat_body(model), framed(framing, **headers))
    assert got.status == 200 and got.leaked() == [], where
    assert got.errors == [] and got.done, where
    if placeholder:
        assert placeholder in got.text and got.finish == {0: "stop"}, f"{where}: {got.text!r}"
    else:
        assert got.finish == {0: "content_filter"}, where
    sdk = sdk_stream(gw, model, framed(framing, **headers))
    assert sdk.texts == [got.text], where
    watch.alive()


@pytest.mark.parametrize("model", list(MODELS))
def test_a_json_answers_are_redacted_and_blocked(gw: Gateway, model: str) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60)
    redacted = client.chat.completions.create(model=model, messages=QUESTION,
                                              extra_headers={"x-mock-reply": REDACTED_REPLY})
    assert redacted.choices[0].message.content == REDACTED_TEXT
    blocked = client.chat.completions.create(model=model, messages=QUESTION,
                                             extra_headers={"x-mock-reply": BLOCKED_REPLY})
    assert blocked.choices[0].finish_reason == "content_filter"
    assert leaks(blocked.model_dump_json()) == [] and leaks(redacted.model_dump_json()) == []


def test_a_gemini_is_asked_for_sse_never_for_the_json_array_stream(gw: Gateway) -> None:
    """Gemini streams either as a JSON array or, with `alt=sse`, as SSE: the gateway always
    asks for SSE, so the JSON-array form (an answer labelled application/json) never has to
    be told apart from a mislabelled one."""
    sdk_stream(gw, "gemini-chat", {"x-mock-reply": REDACTED_REPLY})
    [sent] = gw.received(gw.backup)
    assert sent["path"].endswith(":streamGenerateContent?alt=sse"), sent["path"]


# -- b. spend accounted the same whatever the framing and slicing -------------------------------


def spent(gw: Gateway, name: str) -> int:
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[name]}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    [daily] = [b for b in resp.json()["budgets"] if b["level"] == f"key:xlate-{name}" and b["window"] == "daily"]
    return round(daily["spent_usd"] * NANO)


@pytest.mark.parametrize("model", list(MODELS))
def test_b_tokens_and_spend_are_the_same_whatever_the_framing(gw: Gateway, model: str) -> None:
    headers = {"x-mock-reply": REDACTED_REPLY}
    variants = {framing: framed(framing, **headers) for framing in (FRAMINGS if MODELS[model] else [])}
    variants["sliced"] = {**headers, "x-mock-chunk-bytes": "3"}
    variants["sliced-1"] = {**headers, "x-mock-chunk-bytes": "1"}
    variants["sliced-big"] = {**headers, "x-mock-chunk-bytes": "1000000"}
    before = {name: spent(gw, name) for name in ["canonical", *variants]}
    canonical = sdk_stream(gw, model, headers, key=KEYS["canonical"])
    assert canonical.prompt_tokens_header is not None and canonical.usage is not None
    assert canonical.usage.completion_tokens > 0
    reads = {name: sdk_stream(gw, model, h, key=KEYS[name]) for name, h in variants.items()}
    time.sleep(0.5)  # settlement runs after the response
    costs = {name: spent(gw, name) - before[name] for name in before}
    assert costs["canonical"] > 0
    for name, read in reads.items():
        assert read.prompt_tokens_header == canonical.prompt_tokens_header, name
        assert read.usage is not None and read.usage.model_dump() == canonical.usage.model_dump(), name
        assert costs[name] == costs["canonical"], (name, costs)


@pytest.mark.parametrize("model", list(MODELS))
def test_b_a_stream_cut_short_is_charged_the_same_whatever_the_slicing(gw: Gateway, model: str) -> None:
    """No usage arrives from a stream the provider ends early (or garbles): the charge (the
    reservation, docs/budgets.md; a Converse stream was charged about one token an event until
    2026-12-08) must not depend on how the provider's bytes were sliced or framed."""
    for cut in ({"x-mock-end-after-chunks": "9"},
                {"x-mock-garbage-after-chunks": "9", "x-mock-garbage": "json"}):
        headers = {"x-mock-reply": "one two three four five six seven eight nine ten eleven twelve", **cut}
        variants = {"canonical": headers, "sliced-1": {**headers, "x-mock-chunk-bytes": "1"},
                    "sliced-big": {**headers, "x-mock-chunk-bytes": "1000000"}}
        if MODELS[model]:
            variants["multiline"] = framed("multiline", **headers)
        before = {name: spent(gw, name) for name in variants}
        texts = {name: receive(gw, chat_body(model), h, key=KEYS[name]).text for name, h in variants.items()}
        time.sleep(0.5)
        costs = {name: spent(gw, name) - before[name] for name in variants}
        assert len(set(texts.values())) == 1 and texts["canonical"], (model, cut, texts)
        assert len(set(costs.values())) == 1 and costs["canonical"] > 0, (model, cut, costs)


@pytest.mark.parametrize(("model", "late"), [
    ("default-chat", {}),  # the usage chunk, then [DONE] 100 ms later
    ("anthropic-chat", {"x-mock-garbage-after-chunks": "8"}),  # message_stop, then 100 ms to the body's end
    ("bedrock-chat", {"x-mock-garbage-after-chunks": "6"}),
])
def test_b_a_client_that_leaves_once_it_has_the_usage_is_charged_that_usage(gw: Gateway, model: str,
                                                                             late: dict[str, str]) -> None:
    """An SDK stops reading at the usage chunk or [DONE] and may close the connection before
    the provider's body ends (the openai SDK does, racing the last bytes): the spend is the
    usage the client was shown, not an estimate from the local prompt count and the events."""
    reply = "Supercalifragilistic antidisestablishmentarianism"  # 2 events, many tokens: no estimate matches
    headers = {"x-mock-reply": reply, "x-mock-chunk-delay-ms": "100", **late}
    name = "left"
    before = spent(gw, name)
    canonical = sdk_stream(gw, model, {"x-mock-reply": reply}, key=KEYS[name])
    time.sleep(0.5)
    whole = spent(gw, name) - before
    assert canonical.usage is not None and whole > 0
    usage = None
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{gw.url}/v1/chat/completions", json=chat_body(model),
            headers={"authorization": f"Bearer {KEYS[name]}", **headers}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                usage = orjson.loads(line[6:])["usage"]
                break  # and leave
    assert usage == canonical.usage.model_dump(exclude_none=True) | usage, usage
    time.sleep(1.5)
    assert spent(gw, name) - before - whole == whole, model


# -- c. compressed, mislabelled -----------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_c_a_compressed_answer_is_a_provider_error(gw: Gateway, model: str, stream: bool) -> None:
    for encoding in ("gzip", "deflate"):
        for reply in (REDACTED_REPLY, BLOCKED_REPLY):
            where = f"{model} {encoding} stream={stream}"
            body = chat_body(model) if stream else {"model": model, "messages": QUESTION}
            got = receive(gw, body, {"x-mock-reply": reply, "x-mock-content-encoding": encoding})
            assert got.leaked() == [], where
            assert_provider_error(got, where)
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60,
                        default_headers={"x-mock-reply": REDACTED_REPLY, "x-mock-content-encoding": "gzip"})
    with pytest.raises(openai.APIError) as info:
        result = sdk.chat.completions.create(model=model, messages=QUESTION, stream=stream)
        if stream:
            list(result)
    assert leaks(str(info.value.body)) == [] and leaks(str(info.value)) == []


@pytest.mark.parametrize("model", list(MODELS))
def test_c_a_mislabelled_answer_leaks_nothing(gw: Gateway, model: str) -> None:
    for content_type in ("text/plain", "application/json", "application/octet-stream", "text/event-stream",
                         "application/vnd.amazon.eventstream"):  # (another translated provider's stream type)
        for reply in (REDACTED_REPLY, BLOCKED_REPLY):
            where = f"{model} {content_type}"
            got = receive(gw, chat_body(model), {"x-mock-reply": reply, "x-mock-content-type": content_type})
            assert got.leaked() == [], f"{where}: {got.raw[:400]!r}"
            no_internal_error(got, where)
            whole = receive(gw, {"model": model, "messages": QUESTION},
                            {"x-mock-reply": reply, "x-mock-content-type": content_type})
            assert whole.leaked() == [], f"{where} json: {whole.raw[:400]!r}"
            no_internal_error(whole, where)


@pytest.mark.parametrize("model", list(MODELS))
def test_c_a_mislabelled_answer_is_read_as_what_the_gateway_asked_for(gw: Gateway, model: str) -> None:
    """The gateway asked the provider for a stream or for one JSON answer (another endpoint,
    or `stream: true`): its 2xx answer is read as that whatever its label, so a valid answer
    under a wrong label still arrives whole and scanned (not a 200 stream holding only an
    error for a client that asked for JSON)."""
    for content_type in ("text/plain", "application/json", "application/octet-stream", "text/event-stream"):
        where = f"{model} {content_type}"
        got = receive(gw, chat_body(model), {"x-mock-reply": REDACTED_REPLY, "x-mock-content-type": content_type})
        assert got.status == 200 and got.text == REDACTED_TEXT and got.done and got.usage, f"{where}: {got.raw!r}"
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60)
        whole = client.chat.completions.with_raw_response.create(
            model=model, messages=QUESTION,
            extra_headers={"x-mock-reply": REDACTED_REPLY, "x-mock-content-type": content_type})
        assert whole.headers["content-type"].startswith("application/json"), where
        assert whole.parse().choices[0].message.content == REDACTED_TEXT, where


# -- d. garbage mid-stream, some of it carrying the reply ----------------------------------------


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(CASES), kind=st.sampled_from(["json", "shape", "bytes"]), after=st.integers(0, 30),
       carries=st.booleans(), reply=st.sampled_from([REDACTED_REPLY, BLOCKED_REPLY]),
       chunk_bytes=st.sampled_from([None, None, 1, 5, 1_000_000]))
def test_d_garbage_mid_stream_never_carries_a_value_out(xlate_gw: Stack, case: tuple[str, str | None], kind: str,
                                                        after: int, carries: bool, reply: str,
                                                        chunk_bytes: int | None) -> None:
    gw, watch = xlate_gw
    model, framing = case
    headers = framed(framing, **{"x-mock-reply": reply, "x-mock-garbage-after-chunks": str(after),
                                 "x-mock-garbage": kind, "x-mock-garbage-reply": "1" if carries else "0",
                                 **({"x-mock-chunk-bytes": str(chunk_bytes)} if chunk_bytes else {})})
    where = f"{model} {kind} after={after} carries={carries} {framing} {chunk_bytes}"
    got = receive(gw, chat_body(model), headers)
    assert got.leaked() == [], f"{where}: {got.raw[-600:]!r}"
    no_internal_error(got, where)
    watch.alive()


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
def test_d_a_broken_event_holding_the_whole_value_is_not_forwarded(gw: Gateway, model: str, kind: str) -> None:
    for reply in (REDACTED_REPLY, BLOCKED_REPLY):
        for after in (0, 1, 3):
            got = receive(gw, chat_body(model), {"x-mock-reply": reply, "x-mock-garbage-after-chunks": str(after),
                                                 "x-mock-garbage": kind, "x-mock-garbage-reply": "1"})
            where = f"{model} {kind} after={after}"
            assert got.leaked() == [], f"{where}: {got.raw[:600]!r}"
            no_internal_error(got, where)
            if got.status == 200 and got.errors:
                assert [e.get("code") for e in got.errors] == ["provider_error"], f"{where}: {got.raw[-400:]!r}"
            elif got.status == 200:  # SSE junk without a `data:` line is no event, as for every SSE client
                assert kind == "bytes" and MODELS[model] and got.done, f"{where}: {got.raw[-400:]!r}"


@pytest.mark.parametrize("model", ["default-chat", *MODELS])
@pytest.mark.parametrize("after", [0, 4])
def test_d_a_provider_error_event_never_carries_a_value_out(gw: Gateway, model: str, after: int) -> None:
    """A provider's own error event mid-stream (OpenAI `{"error"}`, Anthropic `error`, Gemini
    `{"error"}`, a Bedrock exception) whose message holds the value: the gateway passes the
    error on, as one `provider_error`-style event, but its message is scanned like the text."""
    for reply in (REDACTED_REPLY, BLOCKED_REPLY):
        headers = {"x-mock-reply": reply, "x-mock-garbage-after-chunks": str(after), "x-mock-garbage": "error",
                   "x-mock-garbage-reply": "1"}
        where = f"{model} after={after}"
        got = receive(gw, chat_body(model), headers)
        assert got.leaked() == [], f"{where}: {got.raw[-600:]!r}"
        assert got.status == 200 and len(got.errors) == 1, f"{where}: {got.raw[-600:]!r}"
        if reply == REDACTED_REPLY:
            assert "[CREDIT_CARD_1]" in got.errors[0]["message"], f"{where}: {got.errors}"
        with pytest.raises(openai.APIError) as info:
            sdk_stream(gw, model, headers)
        assert leaks(str(info.value)) == [] and leaks(str(info.value.body)) == [], where
        anthropic_client = messages_stream(gw, model, headers)
        assert leaks(anthropic_client.raw.decode()) == [], f"{where}: {anthropic_client.raw[-400:]!r}"


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
def test_d_a_broken_json_answer_holding_the_value_is_not_forwarded(gw: Gateway, model: str, kind: str) -> None:
    """A non-streamed answer cut in half (or junk) holding a card: it cannot be translated or
    scanned, and its bytes must not come back inside the error's message either."""
    got = receive(gw, {"model": model, "messages": QUESTION}, {
        "x-mock-reply": f"{REDACTED_REPLY} {REDACTED_REPLY} and more words so the half holds the card",
        "x-mock-garbage-after-chunks": "0", "x-mock-garbage": kind})
    assert got.leaked() == [], f"{model}: {got.status} {got.raw[:400]!r}"
    assert_provider_error(got, model)


# -- e. a stream that ends early -----------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_e_a_stream_the_provider_ends_early_leaks_nothing_and_says_so(gw: Gateway, model: str) -> None:
    """Ended cleanly mid-answer: the text held back goes out scanned, then one
    `upstream_stream_interrupted` error event (or the whole answer when the cut came after it)."""
    for n in range(0, 24, 2):
        for reply in (REDACTED_REPLY, BLOCKED_REPLY):
            where = f"{model} end after {n}"
            got = receive(gw, chat_body(model), {"x-mock-reply": reply, "x-mock-end-after-chunks": str(n)})
            assert got.leaked() == [], f"{where}: {got.raw[-400:]!r}"
            no_internal_error(got, where)
            if got.status == 200 and got.finish.get(0) != "content_filter":
                assert got.errors or got.finish == {0: "stop"}, f"{where}: {got.raw[-400:]!r}"
                if reply == REDACTED_REPLY:  # (a value cut off before it is whole is no value)
                    assert REDACTED_TEXT.startswith(got.text) or REDACTED_REPLY.startswith(got.text), where


def receive_cut(gw: Gateway, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
    """(status, the bytes received) of an answer whose connection may break mid-body."""
    raw = b""
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{gw.url}/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {gw.key}", "accept-encoding": "identity", **headers}) as resp:
        try:
            for piece in resp.iter_raw():
                raw += piece
        except httpx.RemoteProtocolError:
            pass  # a provider reset after the first byte breaks the client's stream (docs/providers.md)
    return resp.status_code, raw


@pytest.mark.parametrize("model", list(MODELS))
def test_e_a_stream_the_provider_resets_leaks_nothing(gw: Gateway, model: str) -> None:
    for n in (0, 3, 5, 8, 12, 20):
        for reply in (REDACTED_REPLY, BLOCKED_REPLY):
            where = f"{model} drop after {n}"
            status, raw = receive_cut(gw, chat_body(model), {"x-mock-reply": reply, "x-mock-drop-after-chunks": str(n)})
            assert leaks(raw.decode("utf-8", "replace")) == [], f"{where}: {raw[-400:]!r}"
            assert status in (200, 502) and b"gateway_internal_error" not in raw, f"{where}: {status}"


# -- f. long replies ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_f_a_long_reply_arrives_whole_and_is_charged(gw: Gateway, model: str) -> None:
    headers = {"x-mock-reply-words": "1000"}
    before = spent(gw, "long")
    got = receive(gw, chat_body(model), headers, key=KEYS["long"])
    assert got.status == 200 and got.done and got.errors == [], got.raw[-300:]
    assert got.text.split() == ["the"] * 1000
    assert got.usage is not None and got.usage["completion_tokens"] == 1000
    sliced = receive(gw, chat_body(model), {**headers, "x-mock-chunk-bytes": "7"}, key=KEYS["long"])
    assert sliced.text == got.text and sliced.usage == got.usage
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["long"], max_retries=0, timeout=60)
    whole = client.chat.completions.create(model=model, messages=QUESTION, extra_headers=headers)
    assert whole.choices[0].message.content == got.text and whole.usage is not None
    time.sleep(0.5)
    assert spent(gw, "long") - before > 0


@pytest.mark.parametrize("model", list(MODELS))
def test_f_a_provider_that_ignores_the_cap_is_cut_at_the_budget(gw: Gateway, model: str) -> None:
    got = receive(gw, chat_body(model, max_tokens=50), {"x-mock-reply-words": "3000", "x-mock-ignore-max-tokens": "1"})
    assert got.status == 200 and b"gateway_internal_error" not in got.raw, model
    assert [e.get("code") for e in got.errors] == ["budget_exceeded"], model
    assert len(got.text.split()) <= 60 and got.finish == {0: "length"}, model


# -- g. Anthropic-SDK clients ---------------------------------------------------------------------


@dataclass
class MessagesRead:
    status: int
    raw: bytes
    text: str = ""
    stop: str | None = None
    errors: list[Any] = field(default_factory=list)
    output_tokens: int | None = None


def messages_stream(gw: Gateway, model: str, headers: dict[str, str], max_tokens: int = 400) -> MessagesRead:
    with httpx.stream("POST", f"{gw.url}/v1/messages", timeout=60,
                      headers={"x-api-key": gw.key, "accept-encoding": "identity", **headers},
                      json={"model": model, "max_tokens": max_tokens, "messages": QUESTION, "stream": True}) as resp:
        raw = b""
        try:
            for piece in resp.iter_raw():
                raw += piece
        except httpx.RemoteProtocolError:
            return MessagesRead(resp.status_code, raw)  # a provider reset after the first byte
    got = MessagesRead(resp.status_code, raw)
    if resp.status_code != 200:
        return got
    for block in raw.split(b"\n\n"):
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        if not data:
            continue
        event = orjson.loads(data[0])
        if event.get("type") == "content_block_delta" and event["delta"].get("type") == "text_delta":
            got.text += event["delta"]["text"]
        elif event.get("type") == "message_delta":
            got.stop = event["delta"].get("stop_reason")
            got.output_tokens = event.get("usage", {}).get("output_tokens")
        elif event.get("type") == "error":
            got.errors.append(event["error"])
    return got


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_g_anthropic_clients_get_redacted_answers_in_any_framing(gw: Gateway, model: str) -> None:
    for framing in [None, *FRAMINGS]:
        for chunk_bytes in (None, 3):
            headers = framed(framing, **{"x-mock-reply": REDACTED_REPLY,
                                         **({"x-mock-chunk-bytes": str(chunk_bytes)} if chunk_bytes else {})})
            where = f"{model} {framing} {chunk_bytes}"
            got = messages_stream(gw, model, headers)
            assert got.status == 200 and leaks(got.raw.decode()) == [], where
            assert got.text == REDACTED_TEXT and got.stop == "end_turn" and got.output_tokens, where
            if framing is None and chunk_bytes is None:
                canonical_tokens = got.output_tokens
            assert got.output_tokens == canonical_tokens, where  # the same usage whatever the framing
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    message = client.messages.create(model=model, max_tokens=400, messages=QUESTION,
                                     extra_headers={"x-mock-reply": REDACTED_REPLY})
    assert message.content[0].text == REDACTED_TEXT  # type: ignore[union-attr]
    blocked = client.messages.create(model=model, max_tokens=400, messages=QUESTION,
                                     extra_headers={"x-mock-reply": BLOCKED_REPLY})
    assert leaks(blocked.model_dump_json()) == []
    with client.messages.stream(model=model, max_tokens=400, messages=QUESTION,
                                extra_headers={"x-mock-reply": BLOCKED_REPLY}) as stream:
        text = "".join(stream.text_stream)
    assert leaks(text) == []


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_g_anthropic_clients_hostile_replies(gw: Gateway, model: str) -> None:
    """Garbage (carrying the reply), compression, mislabelling and early ends reach an
    Anthropic client as a clean error or a clean end, never with the value."""
    hostile: list[dict[str, str]] = [
        *({"x-mock-garbage-after-chunks": str(n), "x-mock-garbage": kind, "x-mock-garbage-reply": "1"}
          for kind in ("json", "shape", "bytes") for n in (0, 2)),
        *({"x-mock-content-encoding": e} for e in ("gzip", "deflate")),
        *({"x-mock-content-type": t} for t in ("text/plain", "application/json")),
        *({f"x-mock-{how}-after-chunks": str(n)} for how in ("end", "drop") for n in (1, 5, 9)),
    ]
    for extra in hostile:
        for reply in (REDACTED_REPLY, BLOCKED_REPLY):
            where = f"{model} {extra}"
            got = messages_stream(gw, model, {"x-mock-reply": reply, **extra})
            assert leaks(got.raw.decode("utf-8", "replace")) == [], f"{where}: {got.raw[-500:]!r}"
            assert got.status in (200, 502), f"{where}: {got.status} {got.raw[:300]!r}"
            assert b"gateway_internal_error" not in got.raw, where
            resp = httpx.post(f"{gw.url}/v1/messages", timeout=60,
                              headers={"x-api-key": gw.key, "accept-encoding": "identity", "x-mock-reply": reply,
                                       **extra},
                              json={"model": model, "max_tokens": 400, "messages": QUESTION})
            assert leaks(resp.text) == [], f"{where} json: {resp.text[:500]!r}"
            assert resp.status_code in (200, 502) and "gateway_internal_error" not in resp.text, where


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=st.sampled_from(MESSAGES_MODELS), framing=st.sampled_from([None, *FRAMINGS]),
       chunk_bytes=st.sampled_from(SLICES), before=REPLY_WORDS, after=REPLY_WORDS, value=VALUES)
def test_g_anthropic_clients_any_framing_any_slicing_any_text(xlate_gw: Stack, model: str, framing: str | None,
                                                               chunk_bytes: int | None, before: str, after: str,
                                                               value: tuple[str, str | None]) -> None:
    gw, watch = xlate_gw
    secret, placeholder = value
    reply, headers = sliced_reply(before, secret, after, chunk_bytes)
    where = f"{model} {framing} {chunk_bytes} {reply!r}"
    got = messages_stream(gw, model, framed(framing, **headers))
    assert got.status == 200 and leaks(got.raw.decode()) == [] and got.errors == [], f"{where}: {got.raw[-300:]!r}"
    if placeholder:
        assert placeholder in got.text and got.stop == "end_turn", f"{where}: {got.text!r}"
    else:
        assert secret not in got.text, where
    watch.alive()


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_g_anthropic_clients_long_replies(gw: Gateway, model: str) -> None:
    headers = {"x-mock-reply-words": "1000"}
    got = messages_stream(gw, model, headers, max_tokens=1024)
    assert got.status == 200 and got.text.split() == ["the"] * 1000 and got.output_tokens == 1000, got.raw[-300:]
    sliced = messages_stream(gw, model, {**headers, "x-mock-chunk-bytes": "7"}, max_tokens=1024)
    assert sliced.text == got.text and sliced.output_tokens == got.output_tokens
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    message = client.messages.create(model=model, max_tokens=1024, messages=QUESTION, extra_headers=headers)
    assert message.content[0].text == got.text and message.usage.output_tokens == 1000  # type: ignore[union-attr]


def test_a_burst_of_hostile_replies_on_every_path_leaves_envoy_up(xlate_gw: Stack) -> None:
    """96 concurrent requests, each with one hostile reply, over every translated model and
    both client kinds: nothing leaks, only documented statuses, Envoy and the workers stay up."""
    gw, watch = xlate_gw
    stressors: list[dict[str, str]] = [
        {"x-mock-chunk-bytes": "1"}, {"x-mock-chunk-bytes": "1000000"}, {"x-mock-sse-framing": "multiline"},
        {"x-mock-garbage-after-chunks": "3", "x-mock-garbage": "json", "x-mock-garbage-reply": "1"},
        {"x-mock-garbage-after-chunks": "2", "x-mock-garbage": "error", "x-mock-garbage-reply": "1"},
        {"x-mock-content-encoding": "gzip"}, {"x-mock-content-type": "text/plain"},
        {"x-mock-end-after-chunks": "5"}, {"x-mock-drop-after-chunks": "6"}, {"x-mock-reply-words": "1000"},
    ]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, bytes]:
        model = [*MODELS, "default-chat"][i % 4]
        headers = {"x-mock-reply": (REDACTED_REPLY, BLOCKED_REPLY)[i % 2], **stressors[i % len(stressors)]}
        anthropic_client = i % 3 == 0
        path = "/v1/messages" if anthropic_client else "/v1/chat/completions"
        body = ({"model": model, "max_tokens": 1024, "messages": QUESTION, "stream": i % 5 != 0}
                if anthropic_client else {**chat_body(model), "stream": i % 5 != 0})
        raw = b""
        try:
            async with client.stream("POST", f"{gw.url}{path}", json=body, headers={
                    "authorization": f"Bearer {gw.key}", "accept-encoding": "identity", **headers}) as resp:
                async for piece in resp.aiter_raw():
                    raw += piece
        except httpx.RemoteProtocolError:
            pass  # a provider reset after the first byte
        return resp.status_code, raw

    async def burst() -> list[tuple[int, bytes]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=96)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(96)))

    results = asyncio.run(burst())
    for status, raw in results:
        assert status in (200, 502), (status, raw[:300])
        assert leaks(raw.decode("utf-8", "replace")) == [] and b"gateway_internal_error" not in raw, raw[-300:]
    watch.alive()
    assert httpx.get(f"{gw.stack.admin_url}/ready").status_code == 200


# -- h. the Responses API on a translated backend -------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_h_responses_on_a_translated_backend_is_refused_before_the_provider(gw: Gateway, model: str) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            result = client.responses.create(model=model, input="What is on file for me?", stream=stream,
                                             extra_headers={"x-mock-reply": REDACTED_REPLY})
            if stream:
                list(result)  # type: ignore[arg-type]
        assert 400 <= info.value.status_code < 500, info.value
        assert leaks(str(info.value.body)) == []
    assert gw.received(gw.backup) == []


@pytest.mark.parametrize("after", [3, 8, 12])
def test_h_responses_a_value_split_around_a_provider_error_never_leaves(gw: Gateway, after: int) -> None:
    """Where the Responses API does go (an OpenAI-schema backend): a provider error event
    mid-answer, the provider carrying on after it. The client joins the deltas it got."""
    for reply in (REDACTED_REPLY, BLOCKED_REPLY):
        for carries in ("0", "1"):
            resp = httpx.post(f"{gw.url}/v1/responses", timeout=60, json={
                "model": "default-chat", "input": "What is on file for me?", "stream": True}, headers={
                "authorization": f"Bearer {gw.key}", "x-mock-reply": reply, "x-mock-garbage-after-chunks": str(after),
                "x-mock-garbage": "error", "x-mock-garbage-reply": carries})
            deltas = "".join(orjson.loads(line[6:]).get("delta", "") for line in resp.text.split("\n")
                             if line.startswith("data: {") and '"delta"' in line)
            where = f"after={after} carries={carries}"
            assert resp.status_code == 200 and leaks(resp.text) == [] and leaks(deltas) == [], f"{where}: {deltas!r}"
            assert "gateway_internal_error" not in resp.text, where


def test_the_gateway_is_ready_at_the_end(xlate_gw: Stack) -> None:
    gw, watch = xlate_gw
    watch.alive()
    assert httpx.get(f"{gw.stack.admin_url}/ready").status_code == 200
    time.sleep(0.3)
    watch.clean_log(watch.new_log())
