"""Request shapes and provider behaviours that once let a provider's bill run past what budgets
charged (spend never exceeds a budget), through real Envoy."""

from __future__ import annotations

import base64
import json
import time

import httpx
import openai
import pytest

from gateway_extproc import tokens

from .conftest import Gateway


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)


@pytest.mark.parametrize(("api", "payload", "param"), [
    # An item reference: the provider pulls a stored item (a whole earlier message) into the input.
    ("responses", [{"type": "item_reference", "id": "msg_0123456789"}, {"role": "user", "content": "and then?"}],
     "input[0]"),
    ("responses", [{"role": "user", "content": "go on"}, {"id": "msg_0123456789"}], "input[1]"),
    # A stored or remote file: the provider reads a PDF's text and an image of every page, billed as input.
    ("responses", [{"role": "user", "content": [{"type": "input_file", "file_id": "file-0123456789"},
                                                 {"type": "input_text", "text": "summarize"}]}],
     "input[0].content[0].file_id"),
    ("responses", [{"role": "user", "content": [{"type": "input_file", "file_url": "https://example.com/a.pdf"}]}],
     "input[0].content[0].file_url"),
    ("responses", [{"type": "function_call_output", "call_id": "c1", "output": [
        {"type": "input_file", "file_id": "file-0123456789"}]}], "input[0].output[0].file_id"),
    ("chat", [{"role": "user", "content": [{"type": "text", "text": "summarize"},
                                           {"type": "file", "file": {"file_id": "file-0123456789"}}]}],
     "messages[0].content[1].file.file_id"),
])
def test_stored_items_and_files_are_refused_under_a_budget(gw: Gateway, api: str, payload: list, param: str) -> None:
    """Like `previous_response_id`, an item reference or a file named by id or URL is input the
    provider adds itself: the gateway counted a few tokens of JSON, reserved that, and the
    provider billed the whole stored item or document (admitted with 200 before the fix).
    Nothing leaves; a file sent inline is counted and passes."""
    before = len(gw.received(gw.primary))
    with pytest.raises(openai.BadRequestError) as info:
        if api == "chat":
            client(gw).chat.completions.create(model="default-chat", messages=payload)
        else:
            client(gw).responses.create(model="default-chat", input=payload)
    body = info.value.body
    assert info.value.status_code == 400 and body["code"] == "context_not_countable" and body["param"] == param
    assert set(body) == {"message", "type", "code", "param"}
    assert len(gw.received(gw.primary)) == before
    inline = [{"role": "user", "content": [{"type": "input_file", "filename": "a.txt",
                                            "file_data": "data:text/plain;base64,aGVsbG8="},
                                           {"type": "input_text", "text": "summarize"}]}]
    assert client(gw).responses.create(model="default-chat", input=inline).status == "completed"


def _spent(gw: Gateway) -> float:
    budgets = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {gw.key}"}).json()["budgets"]
    return next(b["spent_usd"] for b in budgets if b["level"] == "key:demo" and b["window"] == "daily")


def _settled(gw: Gateway, before: float, at_least: float) -> float:
    """The key's spend since `before`, once it reaches `at_least` (settlement runs in the
    background) or stops moving."""
    last = -1.0
    for _ in range(50):
        now = _spent(gw) - before
        if now >= at_least or (now == last and now > 0):
            return now
        last = now
        time.sleep(0.1)
    return _spent(gw) - before


def _event(delta: dict, finish: str | None = None, separators: tuple[str, str] = (", ", ": ")) -> bytes:
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk, separators=separators).encode() + b"\n\n"


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")], ids=["compact", "spaced"])
@pytest.mark.parametrize("field", ["content", "tool_calls"])
def test_stream_without_usage_is_charged_its_text_not_its_event_count(gw: Gateway, field: str,
                                                                      separators: tuple[str, str]) -> None:
    """An OpenAI-schema server that sends no usage chunk (include_usage ignored) and batches its
    output into large events (many servers do; Azure's asynchronous content filter does) ended a
    stream with [DONE] after 900 tokens in one event: the budget was charged the prompt plus one
    token, 1/450th of the bill. Written with spaces after the colons (Python's json.dumps), its
    events were not even seen as generated text: the prompt alone was charged, and the budget
    backstop for a provider ignoring the cap counted nothing. The text it generated is what it
    is charged (at most the reservation)."""
    text = " ".join(["elephant"] * 900)
    produced = tokens.counter("o200k_base")(text)
    delta = {"content": text} if field == "content" else {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"t": text})}}]}
    events = [_event({"role": "assistant", "content": ""}, None, separators), _event(delta, None, separators),
              _event({}, "stop", separators), b"data: [DONE]\n\n"]
    before = _spent(gw)
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, headers={
            "authorization": f"Bearer {gw.key}",
            "x-mock-raw-events": json.dumps([base64.b64encode(e).decode() for e in events])},
            json={"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        streamed = r.read()
    assert r.status_code == 200 and streamed.rstrip().endswith(b"data: [DONE]")
    assert produced >= 900
    owed = produced * 20 / 1e6  # default-chat's output price: $20 per 1M tokens
    assert _settled(gw, before, owed) >= owed
    assert envoy_ready(gw)


def envoy_ready(gw: Gateway) -> bool:
    admin = gw.stack.values["envoy"]["admin"]["port"]
    return httpx.get(f"http://127.0.0.1:{admin}/ready").text.strip() == "LIVE"


def test_spoken_output_is_refused_under_a_budget(gw: Gateway) -> None:
    """Chat with `modalities: ["audio"]` was reserved and settled at the backend's one
    `output` price, while the provider bills spoken output at its audio price (~8x text for
    gpt-4o-audio): every such request spent several times what the budget counted. Nothing
    leaves; text-only `modalities` pass."""
    before = len(gw.received(gw.primary))
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "hi"}],
                                  modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    body = info.value.body
    assert info.value.status_code == 400 and body["code"] == "invalid_request" and body["param"] == "modalities"
    assert len(gw.received(gw.primary)) == before
    c.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "hi"}], modalities=["text"])


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_priority_processing_is_refused_under_a_budget(gw: Gateway, api: str) -> None:
    """`service_tier: "priority"` went to the provider as sent: OpenAI bills priority processing
    at about twice the standard per-token price, while the reservation and the settlement use
    the backend's `pricing` (standard): every such request spent twice what the budget counted.
    Nothing leaves; the standard tiers pass."""
    before = len(gw.received(gw.primary))
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as info:
        if api == "chat":
            c.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "hi"}],
                                      service_tier="priority")
        else:
            c.responses.create(model="default-chat", input="hi", service_tier="priority")
    body = info.value.body
    assert info.value.status_code == 400 and body["code"] == "invalid_request" and body["param"] == "service_tier"
    assert len(gw.received(gw.primary)) == before
    for tier in ("auto", "default", "flex"):
        if api == "chat":
            c.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "hi"}],
                                      service_tier=tier)
        else:
            c.responses.create(model="default-chat", input="hi", service_tier=tier)
    assert len(gw.received(gw.primary)) == before + 3


@pytest.mark.parametrize("api", ["chat", "responses", "embeddings"])
def test_a_provider_side_fallback_list_never_leaves(gw: Gateway, api: str) -> None:
    """OpenRouter's `models` would let the provider switch to models the key may not use, at
    prices no budget holds: refused before any provider."""
    before = len(gw.received(gw.primary))
    c, fallbacks = client(gw), {"models": ["anthropic/claude-opus-4", "openai/o3-pro"]}
    with pytest.raises(openai.BadRequestError) as info:
        if api == "chat":
            c.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "hi"}],
                                      extra_body=fallbacks)
        elif api == "responses":
            c.responses.create(model="default-chat", input="hi", extra_body=fallbacks)
        else:
            c.embeddings.create(model="default-chat", input="hi", extra_body=fallbacks)
    body = info.value.body
    assert info.value.status_code == 400 and body["code"] == "invalid_request" and body["param"] == "models"
    assert len(gw.received(gw.primary)) == before


def _counted(n: int) -> bytes:
    """A chunk of a server that reports usage so far on every chunk, `n` output tokens in."""
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}],
             "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.mark.parametrize("how", ["client hangs up", "provider drops the connection"])
def test_a_stream_cut_after_a_running_usage_count_is_charged_its_reservation(gw: Gateway, how: str) -> None:
    """A server that reports usage so far on every chunk (vLLM's `continuous_usage_stats`,
    which the client asked for here) and a stream cut after its second chunk: charged that
    chunk's count, 2 of the 500 output tokens the provider was allowed and may have gone on
    generating. Charged the reservation, as any stream cut before its bill."""
    controls = {"x-mock-raw-events": json.dumps([base64.b64encode(_counted(n)).decode() for n in range(1, 7)]),
                "x-mock-chunk-delay-ms": "300"}
    if how != "client hangs up":
        controls["x-mock-drop-after-chunks"] = "2"
    before = _spent(gw)
    seen: list[str] = []
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, headers={
            "authorization": f"Bearer {gw.key}", **controls},
            json={"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500,
                  "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        assert r.status_code == 200
        try:
            for line in r.iter_lines():
                seen += [line] if line.startswith("data: {") else []
                if len(seen) == 2 and how == "client hangs up":
                    break
        except httpx.RemoteProtocolError:  # Envoy resets the client's stream the provider broke off
            pass
    # (The client read the counts so far; when the provider breaks off, output scanning may still
    # hold the second chunk's text back as Envoy resets the client's stream: one chunk then.)
    assert seen and '"completion_tokens":1' in seen[0].replace(" ", "")
    assert how != "client hangs up" or '"completion_tokens":2' in seen[1].replace(" ", "")
    reserved = (8 * 5 + 500 * 20) / 1e6  # default-chat: $5 / $20 per 1M tokens; an 8-token prompt
    assert _settled(gw, before, reserved) == pytest.approx(reserved)
    assert envoy_ready(gw)
