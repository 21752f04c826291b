"""Budget red team on streamed Anthropic Messages and OpenAI Responses answers, through real
Envoy, two replicas and a shared Valkey: clients that abandon a stream part way, budgets so
small the gateway must cap the output, providers that ignore that cap or end without usage,
and bursts of such streams under one small budget.

After every request: no level is above its limit, and nothing stays reserved (what a level
has left is its limit less what it spent, docs/budgets.md)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis as redis_py

from gateway_extproc import keys
from gateway_extproc.audit.records import records as audit_records
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, nothing_held, raw_events, two_replicas

NANO = 1_000_000_000
KEYS = {name: keys.generate(name) for name in ("cut-tiny", "cut-roomy", "cut-burst")}
BUDGETS = {"cut-tiny": 0.001, "cut-roomy": 1.0, "cut-burst": 0.05}
MSG = [{"role": "user", "content": "Please count the apples in the basket for me."}]


def cut_values(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["extproc"]["processes"] = 2
    values["teams"].append({"name": "cut"})
    for name, daily in BUDGETS.items():
        values["keys"].append({"id": name, "sha256": keys.digest(KEYS[name]), "team": "cut",
                               "budget": {"daily": daily}})


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[RedisServer, Gateway, Gateway]]:
    with RedisServer() as redis, two_replicas("gw-cut-", lambda v, _: cut_values(v, redis.url)) as (a, b):
        yield redis, a, b


@pytest.fixture
def gw(setup: tuple[RedisServer, Gateway, Gateway]) -> Gateway:
    redis, first, _ = setup
    first.reset()
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()
    client.close()
    return first



def levels(gw: Gateway, key: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every level of the key: spent within its limit, and what is left exactly its limit less
    its spend (nothing held)."""
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[key]}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    out = {(b["level"], b["window"]): b for b in resp.json()["budgets"]}
    for (level, window), b in out.items():
        if b["limit_usd"] is not None:
            limit, spent = round(b["limit_usd"] * NANO), round(b["spent_usd"] * NANO)
            assert spent <= limit, f"{level} {window} overspent"
            assert round(b["remaining_usd"] * NANO) == limit - spent, f"{level} {window} still holds a reservation"
    return out


def spent(gw: Gateway, key: str) -> int:
    return round(levels(gw, key)[(f"key:{key}", "daily")]["spent_usd"] * NANO)


def oai(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[key], max_retries=0)


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=KEYS[key], max_retries=0)


@pytest.mark.parametrize("honest", [False, True], ids=["ignores-cap", "honest"])
def test_a_responses_stream_of_a_provider_ignoring_the_cap_is_cut_at_the_reservation(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, honest: bool) -> None:
    """The budget backstop covered chat streams only: a Responses stream from a provider that
    ignores `max_output_tokens` (400 tokens against a grant of ~45) ran on for as long as the
    provider wrote. Now it ends with a `budget_exceeded` error event once past the grant; an
    honest provider's stream at the grant (`incomplete`, a tool call's arguments repeated
    whole in its `.done` events) ends as the provider ended it."""
    redis = setup[0]
    deltas: list[str] = []
    events: list[str] = []
    controls = {"x-mock-reply-words": "400", **({} if honest else {"x-mock-ignore-max-tokens": "1"})}
    stream = oai(gw, "cut-tiny").responses.create(model="default-chat", input="Count the apples.", stream=True,
                                                  extra_headers=controls)
    try:
        for event in stream:
            events.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
    except openai.APIError as err:
        assert not honest and "budget" in str(err) and err.body["code"] == "budget_exceeded"
    granted = gw.received(gw.primary)[-1]["body"]["max_output_tokens"]
    assert granted < 100
    if honest:
        assert events[-1] == "response.incomplete" and len("".join(deltas).split()) == granted
    else:
        assert "response.incomplete" not in events and 0 < len("".join(deltas).split()) <= granted + 1
    nothing_held(redis)
    assert spent(gw, "cut-tiny") <= BUDGETS["cut-tiny"] * NANO
    record = audit_record(gw, stream.response.headers["x-request-id"])
    assert record["decision"] == ("admitted" if honest else "cut")
    assert ("budget_stream_cut" in record["reasons"]) is not honest


def sent_cap(gw: Gateway) -> int:
    """The output cap the provider was sent (the last request either mock got)."""
    [body] = [r["body"] for mock in (gw.primary, gw.backup) for r in gw.received(mock)[-1:]]
    return next(body[f] for f in ("max_completion_tokens", "max_tokens", "max_output_tokens") if f in body)


def streamed_words(gw: Gateway, client: str, model: str, controls: dict[str, str]) -> tuple[int, str | None]:
    """The words of generated text a client got, and the code of the error that ended the
    stream (None: it ended cleanly)."""
    texts: list[str] = []
    try:
        if client == "messages":
            with claude(gw, "cut-tiny").messages.stream(model=model, max_tokens=4096, messages=MSG,
                                                        extra_headers=controls) as stream:
                texts += [e.delta.text for e in stream
                          if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        elif client == "responses":
            texts += [e.delta for e in oai(gw, "cut-tiny").responses.create(
                model=model, input="Count the apples.", stream=True, extra_headers=controls)
                if e.type == "response.output_text.delta"]
        else:
            for chunk in oai(gw, "cut-tiny").chat.completions.create(model=model, messages=MSG, stream=True,
                                                                     extra_headers=controls):
                texts += [c.delta.content for c in chunk.choices if c.delta.content]
    except (openai.APIError, anthropic.APIError) as err:
        body = err.body if isinstance(err.body, dict) else {}
        return len("".join(texts).split()), str(body.get("code") or body.get("error", {}).get("code") or err)
    return len("".join(texts).split()), None


@pytest.mark.parametrize(("client", "model"), [("chat", "default-chat"), ("messages", "default-chat"),
                                               ("messages", "claude-chat"), ("responses", "default-chat")])
def test_a_provider_ignoring_the_cap_in_large_events_is_cut_near_the_reservation(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, client: str, model: str) -> None:
    """The backstop counted events, about one token each: a provider that ignores the cap and
    batches its output (25 tokens an event here; servers behind Azure's asynchronous content
    filter send whole sentences) streamed 400 tokens against a grant of ~45 in 16 events, never
    reaching the count, the whole answer to the client and billed. Now the text's tokens count
    too (with room for a tokenizer that counts the provider's text longer than it does)."""
    words, code = streamed_words(gw, client, model, {"x-mock-ignore-max-tokens": "1", "x-mock-reply-words": "400",
                                                     "x-mock-event-words": "25"})
    granted = sent_cap(gw)
    assert granted < 100 and code is not None and "budget" in code, (words, code)
    assert words <= 2 * granted + 25
    nothing_held(setup[0])
    assert spent(gw, "cut-tiny") <= BUDGETS["cut-tiny"] * NANO


TOOLS = [{"name": "count", "description": "Count things.",
          "input_schema": {"type": "object", "properties": {"what": {"type": "string"}, "n": {"type": "integer"}},
                           "required": ["what", "n"]}}]
PRICES = {"default-chat": Price.from_usd_per_million(5, 20, 2.5), "claude-chat": Price.from_usd_per_million(3, 15, 0.3)}


def audit_record(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The request's audit record (the writer thread lands it shortly after the access line)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [r for r in audit_records(Path(gw.stack.values["audit"]["dir"]), frozenset({"request"}))
                 if r.get("request_id") == request_id]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no audit record for {request_id}")


def abandon_messages(gw: Gateway, model: str, where: str) -> tuple[str, int]:
    """A Messages stream the client closes at `where`; its request id and local prompt count."""
    extra: dict[str, Any] = {}
    if where == "tool":
        extra["tools"] = TOOLS
    if where == "thinking":
        extra["thinking"] = {"type": "enabled", "budget_tokens": 200}
    stream = claude(gw, "cut-roomy").messages.create(
        model=model, max_tokens=800, messages=MSG, stream=True, **extra,
        extra_headers={"x-mock-chunk-delay-ms": "100", "x-mock-reply-words": "30"})
    headers = stream.response.headers
    seen = 0
    if where != "before-start":
        for event in stream:
            seen += 1
            kind = getattr(getattr(event, "delta", None), "type", "")
            if where == "after-3" and seen == 3 or where == "tool" and kind == "input_json_delta" \
                    or where == "thinking" and kind == "thinking_delta":
                break
        else:
            raise AssertionError(f"the stream ended before {where}")
    stream.close()
    return headers["x-request-id"], int(headers["x-gateway-prompt-tokens"])


def abandon_responses(gw: Gateway, where: str) -> tuple[str, int]:
    stream = oai(gw, "cut-roomy").responses.create(
        model="default-chat", input=MSG[0]["content"], max_output_tokens=800, stream=True,
        extra_headers={"x-mock-chunk-delay-ms": "100", "x-mock-reply-words": "30"})
    headers = stream.response.headers
    seen = 0
    if where != "before-start":
        for event in stream:
            seen += 1
            if where == "after-3" and seen == 3 or where == "delta" and event.type == "response.output_text.delta":
                break
        else:
            raise AssertionError(f"the stream ended before {where}")
    stream.close()
    return headers["x-request-id"], int(headers["x-gateway-prompt-tokens"])


@pytest.mark.parametrize(("client", "model", "where"), [
    ("messages", "default-chat", "before-start"), ("messages", "default-chat", "after-3"),
    ("messages", "default-chat", "tool"), ("messages", "claude-chat", "before-start"),
    ("messages", "claude-chat", "after-3"), ("messages", "claude-chat", "tool"),
    ("messages", "claude-chat", "thinking"),
    ("responses", "default-chat", "before-start"), ("responses", "default-chat", "after-3"),
    ("responses", "default-chat", "delta")])
def test_a_stream_the_client_abandons_is_settled_at_its_reservation_and_released(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, client: str, model: str, where: str) -> None:
    """A client that closes a Messages or Responses stream part way (right after the headers,
    after three events, mid tool input, mid thinking), before the provider's usage went by:
    the request is settled at its reservation (the provider may have generated the whole cap),
    nothing stays held, and the audit record says what was charged."""
    if client == "messages":
        request_id, prompt = abandon_messages(gw, model, where)
    else:
        request_id, prompt = abandon_responses(gw, where)
    cap = sent_cap(gw)
    assert cap == 800
    nothing_held(setup[0])
    reserved = cost_nano(PRICES[model], prompt, cap)
    assert spent(gw, "cut-roomy") == reserved
    record = audit_record(gw, request_id)
    assert (record["outcome"], record["decision"], record["cost_nano"]) == ("incomplete", "admitted", reserved)
    assert (record["input_tokens"], record["output_tokens"]) == (prompt, cap)


def responses_events(usage_early: bool, deltas: int = 20, end: str | None = "response.completed",
                     final_usage: bool = True) -> list[bytes]:
    """A Responses stream as raw SSE; `usage_early`: `response.created` and `.in_progress`
    carry the usage so far (no output yet), as some OpenAI-compatible servers send it; `end`:
    its last event (None: none), with the final usage or `usage: null`."""
    so_far = {"input_tokens": 12, "output_tokens": 0, "total_tokens": 12} if usage_early else None
    final = {"input_tokens": 12, "output_tokens": deltas, "total_tokens": 12 + deltas}
    head = {"id": "resp_x", "object": "response", "model": "m", "output": [], "usage": so_far}
    where = {"item_id": "msg_x", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**head, "status": "in_progress"}},
        {"type": "response.in_progress", "response": {**head, "status": "in_progress"}},
        *({"type": "response.output_text.delta", **where, "delta": " the"} for _ in range(deltas)),
        *([{"type": end, "response": {**head, "status": end.rpartition(".")[2],
                                      "usage": final if final_usage else None}}] if end else [])]
    return [f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': i})}\n\n".encode()
            for i, e in enumerate(events)]


@pytest.mark.parametrize("how", ["client closes", "provider drops"])
def test_a_responses_stream_cut_after_a_usage_so_far_is_charged_its_reservation(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, how: str) -> None:
    """A server that reports usage so far on `response.created` (0 output tokens) and a stream
    cut before its first delta: charged that count (the prompt alone) while the provider,
    allowed 800 output tokens, may have gone on generating. Only a terminal event
    (`response.completed`, `.incomplete`, `.failed`) carries a Responses stream's bill."""
    controls = {"x-mock-raw-events": raw_events(*responses_events(True)), "x-mock-chunk-delay-ms": "200"}
    if how == "provider drops":
        controls["x-mock-drop-after-chunks"] = "2"
    stream = oai(gw, "cut-roomy").responses.create(model="default-chat", input=MSG[0]["content"],
                                                  max_output_tokens=800, stream=True, extra_headers=controls)
    prompt = int(stream.response.headers["x-gateway-prompt-tokens"])
    seen = []
    try:
        for event in stream:
            seen.append(event.type)
            if len(seen) == 2 and how == "client closes":
                break
    except (openai.APIError, httpx.HTTPError):
        pass
    stream.close()
    assert seen[0] == "response.created" and "response.output_text.delta" not in seen
    nothing_held(setup[0])
    assert spent(gw, "cut-roomy") == cost_nano(PRICES["default-chat"], prompt, 800)


@pytest.mark.parametrize(("usage_early", "end", "final_usage"), [
    (False, "response.completed", True), (True, "response.completed", True), (True, "response.incomplete", True),
    (False, "response.failed", True), (True, "response.failed", False), (True, None, False)])
def test_a_whole_responses_stream_is_charged_its_final_usage_else_its_reservation(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, usage_early: bool, end: str | None,
        final_usage: bool) -> None:
    """(Held) The same streams read to their end: charged the usage of the event that ends
    them (`response.completed`, `.incomplete`, `.failed`); one whose end carries no usage, or
    that has no such end, its reservation. Nothing stays held. A stream without such an end
    ends with `upstream_stream_interrupted` (the openai SDK raises)."""
    stream = oai(gw, "cut-roomy").responses.create(
        model="default-chat", input=MSG[0]["content"], max_output_tokens=800, stream=True,
        extra_headers={"x-mock-raw-events": raw_events(*responses_events(usage_early, end=end,
                                                                           final_usage=final_usage))})
    prompt = int(stream.response.headers["x-gateway-prompt-tokens"])
    if end is None:
        with pytest.raises(openai.APIError, match="ended the stream before it finished"):
            list(stream)
    else:
        assert [e.type for e in stream][-1] == end
    nothing_held(setup[0])
    price = PRICES["default-chat"]
    assert spent(gw, "cut-roomy") == (cost_nano(price, 12, 20) if final_usage else cost_nano(price, prompt, 800))


BURST_BUDGET = 0.05


async def one_stream(gws: tuple[Gateway, Gateway], i: int, answered: asyncio.Event | None = None) -> str:
    """One of eight stream shapes, by `i`, at replica i % 2; what became of it. `answered` is
    set once the gateway has admitted or refused it."""
    gw = gws[i % 2]
    shape = i % 8
    words = {"x-mock-reply-words": str(20 + i % 40), "x-mock-chunk-delay-ms": "5"}
    greedy = {**words, "x-mock-ignore-max-tokens": "1", "x-mock-reply-words": "3000", "x-mock-event-words": "7"}
    sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key=KEYS["cut-burst"], max_retries=0, timeout=120)
    oa = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["cut-burst"], max_retries=0, timeout=120)
    try:
        if shape in (0, 1, 2, 3):
            model = "default-chat" if shape == 0 else "claude-chat"
            extra: dict[str, Any] = {"thinking": {"type": "enabled", "budget_tokens": 100}} if shape == 3 else {}
            stream = await sdk.messages.create(model=model, max_tokens=120 + i % 50, messages=MSG, stream=True,
                                               extra_headers=greedy if shape == 0 else words, **extra)
            answered and answered.set()
            n = 0
            async for _ in stream:
                n += 1
                if shape == 2 and n == 3 + i % 5:
                    break  # abandoned part way
            await stream.close()
        else:
            cap: dict[str, Any] = {} if shape == 5 else {"max_output_tokens": 120 + i % 50}
            headers = {4: greedy, 5: words, 6: {"x-mock-raw-events": raw_events(*responses_events(True)),
                                                "x-mock-chunk-delay-ms": "20"},
                       7: {**words, "x-mock-drop-after-chunks": str(2 + i % 6)}}[shape]
            stream = await oa.responses.create(model="default-chat", input=MSG[0]["content"], stream=True,
                                               extra_headers=headers, **cap)
            answered and answered.set()
            async for event in stream:
                if shape == 6 and event.type == "response.in_progress":
                    break
            await stream.close()
        return "ok"
    except (anthropic.RateLimitError, openai.RateLimitError):
        return "refused"
    except (anthropic.APIError, openai.APIError, httpx.HTTPError) as err:
        body = getattr(err, "body", None)
        text = str(body) if body is not None else type(err).__name__
        return "cut" if "budget_exceeded" in text or "your budget reserved" in text else f"error: {text[:200]}"
    finally:
        answered and answered.set()
        await sdk.close()
        await oa.close()


def test_a_burst_of_mixed_streams_never_overspends_one_small_budget(setup: tuple[RedisServer, Gateway, Gateway],
                                                                     gw: Gateway) -> None:
    """240 streams at once at two replicas under one $0.05 key: Messages (OpenAI and Claude
    backends, thinking, abandoned part way, a provider ignoring the cap in large events) and
    Responses (no `max_output_tokens`, a provider ignoring the cap, usage so far on
    `response.created` and abandoned there, a provider dropping the connection). No level ends
    above its limit, nothing stays held, every request left with an output cap, and none
    failed for a reason of the gateway's own."""
    redis, first, second = setup
    second.reset()

    async def run() -> list[str]:
        # The two greedy streams go first (admitted, then cut while the rest race them): which
        # of 240 a $0.05 budget admits is otherwise down to arrival order, and may be none of them.
        greedy = {0: asyncio.Event(), 4: asyncio.Event()}

        async def after_greedy(i: int) -> str:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in greedy.values())), 60)
            return await one_stream((first, second), i)

        return await asyncio.gather(*(one_stream((first, second), i, greedy[i]) if i in greedy else after_greedy(i)
                                      for i in range(240)))

    outcomes = asyncio.run(run())
    assert outcomes[0] == outcomes[4] == "cut", outcomes[:8]
    assert {"refused", "ok"} <= set(outcomes), [(i, o) for i, o in enumerate(outcomes) if o != "refused"]
    # (the provider that drops the connection, shape 7: Envoy resets the client's stream, or
    # answers 502 upstream_reset when nothing of the answer had reached the client)
    odd = [(i, o) for i, o in enumerate(outcomes) if o.startswith("error") and not (i % 8 == 7 and any(
        code in o for code in ("APIConnectionError", "upstream_stream_interrupted", "upstream_reset")))]
    assert not odd, odd
    assert all(i % 8 in (0, 4) for i, o in enumerate(outcomes) if o == "cut")  # no honest stream was cut
    nothing_held(redis)
    assert spent(gw, "cut-burst") <= BURST_BUDGET * NANO
    for mock in (first.primary, first.backup):
        for r in gw.received(mock):
            body = r["body"] or {}
            caps = [body.get(f) for f in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                    if body.get(f) is not None] or [body.get("inferenceConfig", {}).get("maxTokens")]
            assert caps and all(isinstance(c, int) and 0 < c <= 1024 for c in caps), body


def claude_events(start_usage: bool, stop: bool) -> list[bytes]:
    """A Claude stream as raw SSE: usage on `message_start` or only on `message_delta` (with
    the input count, as the API now sends it there too), `message_stop` or not."""
    message = {"id": "msg_x", "type": "message", "role": "assistant", "model": "m", "content": [],
               "stop_reason": None, "stop_sequence": None,
               **({"usage": {"input_tokens": 12, "output_tokens": 1}} if start_usage else {})}
    events = [("message_start", {"type": "message_start", "message": message}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
              *(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": " the"}}) for _ in range(20)),
              ("content_block_stop", {"type": "content_block_stop", "index": 0}),
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"input_tokens": 12, "output_tokens": 20}}),
              *([("message_stop", {"type": "message_stop"})] if stop else [])]
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


@pytest.mark.parametrize(("start_usage", "stop"), [(True, True), (False, True), (True, False)],
                         ids=["usual", "usage-in-message-delta-only", "no-message-stop"])
def test_a_claude_stream_with_usage_in_odd_places_is_charged_its_usage_or_reservation(
        setup: tuple[RedisServer, Gateway, Gateway], gw: Gateway, start_usage: bool, stop: bool) -> None:
    """(Held) A Claude backend's stream read by an Anthropic client: usage only on
    `message_delta` is the bill; a stream that ends without `message_stop` is charged its
    reservation (its bill never came). Nothing stays held either way."""
    stream = claude(gw, "cut-roomy").messages.create(
        model="claude-chat", max_tokens=800, messages=MSG, stream=True,
        extra_headers={"x-mock-raw-events": raw_events(*claude_events(start_usage, stop))})
    prompt = int(stream.response.headers["x-gateway-prompt-tokens"])
    try:
        events = [e.type for e in stream]
    except anthropic.APIError as err:
        assert not stop and "ended the stream before it finished" in str(err)
    else:
        assert stop and events[-1] == "message_stop"
    nothing_held(setup[0])
    price = PRICES["claude-chat"]
    assert spent(gw, "cut-roomy") == (cost_nano(price, 12, 20) if stop else cost_nano(price, prompt, 800))
