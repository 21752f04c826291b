"""Every provider answer in tests/provider_corpus/ through its translator, whole and cut at
random byte boundaries, as the upstream processor runs it (base.GuardedStream,
base.guarded_response).

The corpus is shaped as each provider's API reference describes its answers, including
what the documentation examples leave out and real traffic has: server tools, thinking,
cache and tool-use prompt tokens, tool arguments streamed in every form (deltas, whole in
a start block, in `message_start`, none at all, Vertex `partialArgs`), parallel and empty
calls, refusals, safety blocks, errors and garbage mid-stream. One JSON file per answer:
`mode` (json/stream), `status`, `body` or `events`, `source` (what it is modelled on),
`expect` (what the client must get). Besides `expect`, every output must parse with the
openai SDK's types and hold the invariants in `check_invariants`, and what an Anthropic
client gets from it (gateway_extproc.messages) must parse with the anthropic SDK's types."""

from __future__ import annotations

import random
import re
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from gateway_extproc import messages
from gateway_extproc.errors import error_type
from gateway_extproc.providers import TRANSLATORS, eventstream
from gateway_extproc.providers.base import NATIVE_STOPS, GuardedStream, guarded_response, split_call_id

CORPUS = Path(__file__).parent / "provider_corpus"
CASES = sorted(CORPUS.glob("*/*.json"))
SLICINGS = 12  # random cuttings per stream, besides whole and byte by byte


def load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = orjson.loads(path.read_bytes())
    case["provider"] = path.parent.name
    return case


# --- provider framing --------------------------------------------------------------------

def frame(provider: str, event: dict[str, Any]) -> bytes:
    if "raw" in event:
        return str(event["raw"]).encode()
    if provider == "anthropic":
        return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
    if provider == "gemini":
        return b"data: " + orjson.dumps(event) + b"\r\n\r\n"
    if "exception" in event:
        return eventstream.encode({":message-type": "exception", ":exception-type": event["exception"],
                                   ":content-type": "application/json"}, orjson.dumps({"message": event["message"]}))
    if "corrupt" in event:
        good = frame(provider, event["corrupt"])
        return good[:-4] + (zlib.crc32(good[:-4]) ^ 1).to_bytes(4, "big")
    return eventstream.encode({":event-type": event["event"], ":content-type": "application/json",
                               ":message-type": "event"}, orjson.dumps(event["payload"]))


def stream_bytes(case: dict[str, Any]) -> bytes:
    return b"".join(frame(case["provider"], event) for event in case["events"])


def run_stream(provider: str, raw: bytes, cuts: list[int]) -> bytes:
    stream = GuardedStream(TRANSLATORS[provider].stream("requested-model"))
    bounds = [0, *cuts, len(raw)]
    out = [stream.feed(raw[a:b], False) for a, b in zip(bounds, bounds[1:])]
    return b"".join(out) + stream.feed(b"", True)


# --- what the client gets ----------------------------------------------------------------

def summarise_stream(out: bytes) -> dict[str, Any]:
    assert out == b"" or out.endswith(b"\n\n")
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finishes: list[str] = []
    summary: dict[str, Any] = {"done": False, "error": None, "usage": None}
    events = out.split(b"\n\n")[:-1]
    for n, event in enumerate(events):
        assert event.startswith(b"data: ") and b"\n" not in event, event
        assert not summary["done"] and summary["error"] is None, "nothing may follow [DONE] or an error event"
        payload = event[6:]
        if payload == b"[DONE]":
            summary["done"] = True
            continue
        obj = orjson.loads(payload)
        if "error" in obj:
            assert set(obj["error"]) == {"message", "type", "code", "param"}
            summary["error"] = obj["error"]
            continue
        chunk = ChatCompletionChunk.model_validate(obj)
        if chunk.usage is not None:
            assert chunk.choices == [], "usage rides on its own chunk"
            summary["usage"] = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            assert choice.index == 0
            if choice.delta.content:
                content.append(choice.delta.content)
            for call in choice.delta.tool_calls or []:
                seen = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert seen["id"] is None, "a tool call's id is sent once"
                    seen["id"] = call.id
                if call.function is not None:
                    if call.function.name:
                        seen["name"] = call.function.name
                    seen["arguments"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                finishes.append(choice.finish_reason)
    assert len(finishes) <= 1, f"one finish_reason per choice, got {finishes}"
    assert sorted(calls) == list(range(len(calls))), "tool call indexes count up from 0"
    summary.update(content="".join(content) if content else None, finish_reason=finishes[0] if finishes else None,
                   tool_calls=[calls[k] for k in sorted(calls)])
    if summary["done"]:
        assert summary["finish_reason"] is not None, "a finished stream says why it finished"
    return summary


def summarise_json(out: bytes) -> dict[str, Any]:
    obj = orjson.loads(out)
    if "error" in obj:
        assert set(obj["error"]) == {"message", "type", "code", "param"}
        return {"error": obj["error"]}
    done = ChatCompletion.model_validate(obj)
    [choice] = done.choices
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for c in choice.message.tool_calls or []]
    return {"content": choice.message.content, "finish_reason": choice.finish_reason, "tool_calls": calls,
            "usage": done.usage.model_dump(exclude_none=True) if done.usage else None, "error": None}


def check_invariants(summary: dict[str, Any]) -> None:
    if summary.get("error") is not None:
        assert summary["error"]["code"] == "provider_error"
    calls = summary.get("tool_calls") or []
    finish = summary.get("finish_reason")
    for call in calls:
        assert isinstance(call["id"], str) and call["id"], "every tool call has an id"
        if finish != "length":  # cut short: the arguments may be cut too, as OpenAI's are
            assert isinstance(orjson.loads(call["arguments"]), dict), "arguments are a JSON object"
    assert len({c["id"] for c in calls}) == len(calls), "tool call ids are distinct"
    if calls and finish is not None:
        assert finish in ("tool_calls", "length", "content_filter"), "tool calls end with tool_calls"
    if finish == "tool_calls":
        assert calls, "finish_reason tool_calls comes with tool calls"
    usage = summary.get("usage")
    if usage is not None:
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_expected(summary: dict[str, Any], expect: dict[str, Any]) -> None:
    for key in ("content", "finish_reason", "done"):
        if key in expect:
            assert summary.get(key) == expect[key], key
    if "tool_calls" in expect:
        assert len(summary["tool_calls"]) == len(expect["tool_calls"])
        for got, want in zip(summary["tool_calls"], expect["tool_calls"]):
            if "id" in want:
                assert split_call_id(got["id"])[0] == want["id"]
            if "signature" in want:
                assert split_call_id(got["id"])[1] == want["signature"]
            assert got["name"] == want["name"]
            if "arguments" in want:
                assert orjson.loads(got["arguments"]) == want["arguments"]
    if "usage" in expect:
        usage = dict(summary["usage"])
        usage["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        assert {k: usage[k] for k in expect["usage"]} == expect["usage"]
    error = summary.get("error")
    if expect.get("error") is None:
        assert error is None, error
    else:
        assert error is not None
        assert error["type"] == error_type(expect["error"]["status"])
        assert error["code"] == expect["error"].get("code", "provider_error")
        if "message" in expect["error"]:
            assert error["message"] == expect["error"]["message"]


ANTHROPIC_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def check_anthropic_client(summary: dict[str, Any], chat: bytes, stream: bool) -> None:
    """What an Anthropic client (`POST /v1/messages`) gets from the same answer: every
    event or message parses with the anthropic SDK's types and says the same thing."""
    if summary.get("error") is not None:
        return
    if not stream:
        message = Message.model_validate_json(messages.from_chat(chat))
        uses = [b for b in message.content if b.type == "tool_use"]
        assert [(u.name, u.input) for u in uses] == [(c["name"], orjson.loads(c["arguments"]))
                                                   for c in summary["tool_calls"]]
        assert message.stop_reason == _expected_stop(summary, chat)
        return
    out = messages.ToMessagesStream().feed(chat, True)
    inputs: dict[int, str] = {}
    names: dict[int, str] = {}
    stop = None
    for block in out.decode().split("\n\n")[:-1]:
        kind, data = block.split("\n")
        event = ANTHROPIC_EVENT.validate_json(data.removeprefix("data: "))
        assert kind == f"event: {event.type}"
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            names[event.index], inputs[event.index] = event.content_block.name, ""
        elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            inputs[event.index] += event.delta.partial_json
        elif event.type == "message_delta":
            stop = event.delta.stop_reason
    if summary["finish_reason"] != "length":
        assert [(names[i], orjson.loads(inputs[i] or "{}")) for i in sorted(names)] == [
            (c["name"], orjson.loads(c["arguments"])) for c in summary["tool_calls"]]
    assert stop == _expected_stop(summary, chat)


def _expected_stop(summary: dict[str, Any], chat: bytes) -> str:
    """The provider's own stop reason when the pivot carries it (a Claude answer's pause_turn,
    stop_sequence...) and it goes with the finish_reason; else the finish_reason's counterpart."""
    native = re.search(rb'"native_finish_reason":"([a-z_]+)"', chat)
    if native is not None and NATIVE_STOPS.get(native[1].decode()) == summary["finish_reason"]:
        return native[1].decode()
    return _STOP[summary["finish_reason"]]


def without_ids(summary: dict[str, Any]) -> dict[str, Any]:
    """Generated ids (Gemini calls without one, Bedrock completion ids) differ per run."""
    return {**summary, "tool_calls": [{**c, "id": None} for c in summary.get("tool_calls") or []]}


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_corpus_answer(path: Path) -> None:
    case = load(path)
    provider, expect = case["provider"], case["expect"]
    assert case.get("source"), "every corpus entry says what it is modelled on"
    if case["mode"] == "json":
        out, status, _ = guarded_response(TRANSLATORS[provider], case.get("status", 200), orjson.dumps(case["body"]),
                                          "requested-model")
        summary = summarise_json(out)
        assert (status >= 400) == (summary["error"] is not None), "errors never go out as 2xx"
        check_invariants(summary)
        check_expected(summary, expect)
        check_anthropic_client(summary, out, stream=False)
        return
    raw = stream_bytes(case)
    chat = run_stream(provider, raw, [])
    whole = summarise_stream(chat)
    check_invariants(whole)
    check_expected(whole, expect)
    if whole["done"]:
        check_anthropic_client(whole, chat, stream=True)
    rng = random.Random(path.stem)
    cuttings = [list(range(1, len(raw)))] + [
        sorted(rng.sample(range(1, len(raw)), rng.randint(1, min(40, len(raw) - 1)))) for _ in range(SLICINGS)]
    for cuts in cuttings:
        sliced = summarise_stream(run_stream(provider, raw, cuts))
        assert without_ids(sliced) == without_ids(whole), f"cut at {cuts}"


def test_corpus_covers_every_translating_provider() -> None:
    kinds = {path.parent.name for path in CASES}
    assert kinds == {kind for kind, module in TRANSLATORS.items() if module.TRANSLATES_RESPONSE}
