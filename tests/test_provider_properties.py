"""Properties of the translators (hypothesis): tool-call ids carry Gemini thought
signatures losslessly, Gemini schemas keep to Gemini's subset whatever JSON Schema comes
in, no byte sequence from a provider makes a guarded stream raise, emit anything but
whole SSE events, or emit anything after its end, and an answer streamed in any form the
provider documents (Anthropic deltas, inputs whole in a start block or in message_start;
Gemini whole, split or as Vertex partialArgs; Bedrock deltas), cut anywhere, says what
the same answer says as JSON."""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_extproc.providers import TRANSLATORS, gemini
from gateway_extproc.errors import GatewayError
from gateway_extproc.providers.base import GuardedStream, Target, call_id, split_call_id

from .test_provider_corpus import check_invariants, summarise_stream

ID_CHARS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:", min_size=1, max_size=40)


@given(ID_CHARS.filter(lambda s: "__thought__" not in s), st.binary(min_size=1, max_size=300))
def test_signature_round_trips_through_the_tool_call_id(base: str, raw: bytes) -> None:
    signature = base64.b64encode(raw).decode()
    encoded = call_id(base, signature)
    assert split_call_id(encoded) == (base, signature)
    assert re.fullmatch(r"[A-Za-z0-9_\-]*", encoded[len(base):])


@given(ID_CHARS.filter(lambda s: "__thought__" not in s), st.one_of(st.none(), st.just(""), st.text(max_size=20)))
def test_ids_without_a_usable_signature_stay_as_they_are(base: str, signature: str | None) -> None:
    if signature:
        try:
            usable = base64.b64encode(base64.b64decode(signature, validate=True)).decode() == signature
        except ValueError:
            usable = False
        if usable:
            return
    assert call_id(base, signature) == base and split_call_id(base) == (base, None)


SCHEMA_KEYS = ["type", "properties", "items", "required", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
               "$defs", "additionalProperties", "strict", "format", "description", "minimum", "nullable", "title",
               "default", "examples", "$schema", "pattern", "maxItems"]
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                   st.sampled_from(["object", "string", "integer", "array", "null", "#/$defs/a", "date-time"]))
JSONISH = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(SCHEMA_KEYS + ["a", "b"]), inner, max_size=5)),
    max_leaves=30)
ALLOWED = gemini._SCHEMA_KEYS | {"nullable"}


def assert_gemini_subset(node: Any) -> None:
    assert isinstance(node, dict)
    assert set(node) <= ALLOWED, set(node) - ALLOWED
    if "type" in node:
        assert node["type"] in gemini._SCHEMA_TYPES
    for sub in (node.get("properties") or {}).values():
        assert_gemini_subset(sub)
    for sub in node.get("anyOf") or []:
        assert_gemini_subset(sub)
    if "items" in node:
        assert_gemini_subset(node["items"])
    if "required" in node:
        assert set(node["required"]) <= set(node.get("properties") or {})
    if "enum" in node:
        assert all(isinstance(v, str) for v in node["enum"])
    for key, wanted in gemini._SCHEMA_VALUES.items():
        if key in node:
            assert isinstance(node[key], wanted) and not (wanted is int and isinstance(node[key], bool)), key


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(SCHEMA_KEYS), JSONISH, max_size=6))
def test_gemini_schema_keeps_to_gemini_subset(schema: dict[str, Any]) -> None:
    assert_gemini_subset(gemini.gemini_schema(schema))


def provider_bytes(kind: str) -> st.SearchStrategy[list[bytes]]:
    """Chunks that look like a provider's stream part of the time: framing pieces mixed
    with JSON fragments of its events and arbitrary bytes."""
    if kind == "bedrock":
        pieces = st.sampled_from([b"\x00\x00\x00", b":event-type", b"messageStop", b'{"delta":{"text":"x"}}'])
    else:
        pieces = st.sampled_from([b"data: ", b"event: message_start\n", b"\n\n", b"\r\n\r\n", b"{", b"}",
                                  b'{"type":"message_stop"}', b'{"type":"content_block_start","index":0,',
                                  b'"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}',
                                  b'{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f"}}]},',
                                  b'"finishReason":"STOP"}]}', b'{"error":{"code":503}}', b"[DONE]"])
    return st.lists(st.one_of(pieces, st.binary(max_size=12)), max_size=25)


@settings(max_examples=200)
@given(st.sampled_from(["anthropic", "gemini", "bedrock"]), st.data())
def test_no_provider_bytes_break_a_guarded_stream(kind: str, data: st.DataObject) -> None:
    chunks = data.draw(provider_bytes(kind))
    stream = GuardedStream(TRANSLATORS[kind].stream("m"))
    out = b"".join(stream.feed(chunk, False) for chunk in chunks) + stream.feed(b"", True)
    summary = summarise_stream(out)  # whole events only, nothing after [DONE] or an error
    if summary["error"] is None and summary["done"]:
        check_invariants(summary)
    for event in out.split(b"\n\n")[:-1]:
        payload = event[6:]
        assert payload == b"[DONE]" or isinstance(orjson.loads(payload), dict)


# --- a provider's answer streamed in any documented form says what its JSON form says ----

KEYS = st.text(alphabet="abcdefghij", min_size=1, max_size=4)
SCALARS = st.one_of(st.text(max_size=12), st.integers(-5, 10**6), st.booleans(), st.none())
ARGS = st.dictionaries(KEYS, st.one_of(SCALARS, st.dictionaries(KEYS, SCALARS, min_size=1, max_size=2),
                                       st.lists(SCALARS, min_size=1, max_size=2)), max_size=3)
TEXT = st.text(min_size=1, max_size=12)


def cut(data: st.DataObject, text: str) -> list[str]:
    """`text` in 1-4 pieces, cut anywhere."""
    points = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=3))) if len(text) > 1 else []
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b]]


def feed_sliced(kind: str, raw: bytes, data: st.DataObject) -> bytes:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=8)))
    stream = GuardedStream(TRANSLATORS[kind].stream("m"))
    bounds = [0, *cuts, len(raw)]
    return b"".join(stream.feed(raw[a:b], False) for a, b in zip(bounds, bounds[1:])) + stream.feed(b"", True)


def same_answer(streamed: dict[str, Any], whole: dict[str, Any]) -> None:
    assert streamed["done"] and streamed["error"] is None
    check_invariants(streamed)
    assert streamed["content"] == whole["content"]
    assert streamed["finish_reason"] == whole["finish_reason"]
    assert [(c["id"], c["name"], orjson.loads(c["arguments"])) for c in streamed["tool_calls"]] == [
        (c["id"], c["name"], orjson.loads(c["arguments"])) for c in whole["tool_calls"]]


ANTHROPIC_BLOCK = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.builds(lambda n, a: {"type": "tool_use", "name": n, "input": a}, KEYS, ARGS),
    st.builds(lambda a: {"type": "server_tool_use", "name": "web_search", "input": a}, ARGS),
    st.just({"type": "thinking", "thinking": "hmm", "signature": "c2ln"}))


def sse_events(events: list[dict[str, Any]]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


@settings(max_examples=150)
@given(st.lists(ANTHROPIC_BLOCK, max_size=4),
       st.sampled_from(["end_turn", "tool_use", "stop_sequence", "pause_turn", "refusal"]),
       st.sampled_from(["deltas", "whole_in_start", "in_message_start"]), st.data())
def test_anthropic_stream_forms_agree_with_the_message(blocks: list[dict[str, Any]], stop: str, form: str,
                                                       data: st.DataObject) -> None:
    for n, block in enumerate(blocks):
        if "input" in block:
            block["id"] = f"toolu_{n}"
    usage = {"input_tokens": 10, "output_tokens": 5}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": blocks,
               "stop_reason": stop, "usage": usage}
    whole = summarise_json_answer("anthropic", message)
    start = {**message, "content": [], "stop_reason": None}
    if form == "in_message_start":
        events = [{"type": "message_start", "message": message}, {"type": "message_stop"}]
    else:
        events = [{"type": "message_start", "message": start}]
        for i, block in enumerate(blocks):
            if "input" in block and form == "deltas":
                events.append({"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}})
                events += [{"type": "content_block_delta", "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": piece}}
                           for piece in cut(data, orjson.dumps(block["input"]).decode()) if block["input"]]
            elif block["type"] == "text":
                events.append({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
                events += [{"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": p}}
                           for p in cut(data, block["text"])]
            else:
                events.append({"type": "content_block_start", "index": i, "content_block": block})
            events.append({"type": "content_block_stop", "index": i})
        events += [{"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 5}},
                   {"type": "message_stop"}]
    same_answer(summarise_stream(feed_sliced("anthropic", sse_events(events), data)), whole)


def summarise_json_answer(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    from .test_provider_corpus import summarise_json
    summary = summarise_json(TRANSLATORS[kind].response(200, orjson.dumps(doc), "m"))
    check_invariants(summary)
    return summary


def leaves(value: Any, path: str = "$") -> list[tuple[str, Any]]:
    """(JSON path, scalar) pairs that rebuild `value` (no empty containers in ARGS)."""
    if isinstance(value, dict):
        return [leaf for key, sub in value.items() for leaf in leaves(sub, f"{path}.{key}")]
    if isinstance(value, list):
        return [leaf for i, sub in enumerate(value) for leaf in leaves(sub, f"{path}[{i}]")]
    return [(path, value)]


def partial_args(path: str, value: Any, data: st.DataObject) -> list[dict[str, Any]]:
    if isinstance(value, str) and value:
        pieces = cut(data, value)
        return [{"jsonPath": path, "stringValue": p, **({"willContinue": True} if i < len(pieces) - 1 else {})}
                for i, p in enumerate(pieces)]
    if isinstance(value, str):
        return [{"jsonPath": path, "stringValue": ""}]
    if isinstance(value, bool):
        return [{"jsonPath": path, "boolValue": value}]
    if value is None:
        return [{"jsonPath": path, "nullValue": "NULL_VALUE"}]
    return [{"jsonPath": path, "numberValue": value}]


GEMINI_PART = st.one_of(
    st.builds(lambda t: {"text": t}, TEXT),
    st.builds(lambda n, a, i: {"functionCall": {"name": n, "args": a, **({"id": i} if i else {})}},
              KEYS, ARGS, st.one_of(st.none(), st.just("fc"))),  # made unique below
    st.just({"text": "thinking", "thought": True}))


@settings(max_examples=150)
@given(st.lists(GEMINI_PART, max_size=4), st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY"]),
       st.sampled_from(["whole", "split", "vertex_partial_args"]), st.binary(min_size=1, max_size=20), st.data())
def test_gemini_stream_forms_agree_with_the_response(parts: list[dict[str, Any]], finish: str, form: str,
                                                     signature: bytes, data: st.DataObject) -> None:
    calls = [p for p in parts if "functionCall" in p]
    for n, call in enumerate(calls):
        if "id" in call["functionCall"]:
            call["functionCall"]["id"] = f"fc-{n}"
    if calls:  # Gemini 3: the first call of a response carries the signature
        calls[0]["thoughtSignature"] = base64.b64encode(signature).decode()
    ids = iter(range(100))
    gemini_new = gemini._new_call_id
    gemini._new_call_id = lambda: f"call_{next(ids)}"  # generated ids numbered for comparison
    try:
        doc = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish}],
               "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7}}
        whole = summarise_json_answer("gemini", doc)
        ids = iter(range(100))

        def event(chunk_parts: list[dict[str, Any]], last: bool) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": chunk_parts}}
            if last:
                candidate["finishReason"] = finish
            return {"candidates": [candidate], "usageMetadata": doc["usageMetadata"]}

        if form == "whole":
            events = [event(parts, True)]
        else:
            groups: list[list[dict[str, Any]]] = []
            for part in parts:
                call = part.get("functionCall")
                if form == "vertex_partial_args" and call:
                    opening = {k: v for k, v in call.items() if k != "args"}
                    groups.append([{**{k: v for k, v in part.items() if k != "functionCall"},
                                    "functionCall": {**opening, "willContinue": True}}])
                    groups += [[{"functionCall": {"partialArgs": partial_args(path, value, data), "willContinue": True}}]
                               for path, value in leaves(call["args"])]
                    groups.append([{"functionCall": {}}])
                else:
                    groups.append([part])
            events = [event(g, i == len(groups) - 1) for i, g in enumerate(groups)] or [event([], True)]
        raw = b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
        same_answer(summarise_stream(feed_sliced("gemini", raw, data)), whole)
    finally:
        gemini._new_call_id = gemini_new


BEDROCK_BLOCK = st.one_of(st.builds(lambda t: {"text": t}, TEXT),
                          st.builds(lambda n, a: {"toolUse": {"name": n, "input": a}}, KEYS, ARGS))


@settings(max_examples=100)
@given(st.lists(BEDROCK_BLOCK, max_size=4), st.sampled_from(["end_turn", "tool_use", "max_tokens"]), st.data())
def test_bedrock_stream_agrees_with_converse(blocks: list[dict[str, Any]], stop: str, data: st.DataObject) -> None:
    from gateway_extproc.providers import eventstream

    for n, block in enumerate(blocks):
        if "toolUse" in block:
            block["toolUse"]["toolUseId"] = f"tooluse_{n}"
    usage = {"inputTokens": 3, "outputTokens": 4, "totalTokens": 7}
    whole = summarise_json_answer("bedrock", {"output": {"message": {"role": "assistant", "content": blocks}},
                                              "stopReason": stop, "usage": usage})
    events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
    for i, block in enumerate(blocks):
        if "toolUse" in block:
            tool = block["toolUse"]
            events.append(("contentBlockStart", {"start": {"toolUse": {"toolUseId": tool["toolUseId"],
                                                                       "name": tool["name"]}}, "contentBlockIndex": i}))
            events += [("contentBlockDelta", {"delta": {"toolUse": {"input": p}}, "contentBlockIndex": i})
                       for p in cut(data, orjson.dumps(tool["input"]).decode()) if tool["input"]]
        else:
            events += [("contentBlockDelta", {"delta": {"text": p}, "contentBlockIndex": i}) for p in cut(data, block["text"])]
        events.append(("contentBlockStop", {"contentBlockIndex": i}))
    events += [("messageStop", {"stopReason": stop}), ("metadata", {"usage": usage})]
    raw = b"".join(eventstream.encode({":event-type": k, ":content-type": "application/json", ":message-type": "event"},
                                      orjson.dumps(v)) for k, v in events)
    same_answer(summarise_stream(feed_sliced("bedrock", raw, data)), whole)


# -- a translator's refusal never quotes caller text that could be a secret -----------------

SECRETS = st.one_of(st.just("gwk_demo_local-only-demo-key-not-for-production"), st.just("4111111111111111"),
                    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                            min_size=12, max_size=40).filter(lambda s: not re.fullmatch(r"[a-z_]+", s)))
UNTRANSLATABLE = {
    "role": lambda s: {"messages": [{"role": s, "content": "hi"}]},
    "content-part-type": lambda s: {"messages": [{"role": "user", "content": [{"type": s, "text": "hi"}]}]},
    "tool-type": lambda s: {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": s}]},
    "tool-choice": lambda s: {"messages": [{"role": "user", "content": "hi"}], "tool_choice": s,
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    "tool-call-id": lambda s: {"messages": [{"role": "user", "content": "hi"},
                                            {"role": "tool", "tool_call_id": s, "content": "x"}]},
}
TARGETS = {kind: Target(model="m", base_url="https://provider.example/v1", base_path="/v1", host="provider.example",
                        credential="AKID:secret" if kind == "bedrock" else "k",
                        options={"region": "us-east-1"} if kind == "bedrock" else {})
           for kind in ("anthropic", "gemini", "bedrock")}


@settings(max_examples=150)
@given(kind=st.sampled_from(sorted(TARGETS)), place=st.sampled_from(sorted(UNTRANSLATABLE)), secret=SECRETS)
def test_a_refused_field_value_is_never_quoted_back(kind: str, place: str, secret: str) -> None:
    """Roles, part and tool types, tool_choice and ids are caller text: an error names the
    field (and quotes a value only when it is a plain word such as `developer`), so a key or
    a card put there never comes back in an error body."""
    body = {"model": "m", **UNTRANSLATABLE[place](secret)}
    try:
        TRANSLATORS[kind].request(TARGETS[kind], "/chat/completions", body, False)
    except GatewayError as err:
        assert secret not in err.body().decode() and secret not in err.message


@given(secret=SECRETS, role=st.sampled_from(["user", "assistant"]))
def test_an_anthropic_clients_refused_block_type_is_never_quoted_back(secret: str, role: str) -> None:
    from gateway_extproc import messages

    body = {"model": "m", "max_tokens": 5, "messages": [{"role": role, "content": [{"type": secret, "text": "x"}]}]}
    try:
        messages.to_chat(body)
    except GatewayError as err:
        assert secret not in err.message
    else:
        raise AssertionError("an unknown block type is refused")


@given(kind=st.sampled_from(["anthropic", "bedrock", "gemini"]),
       choice=st.sampled_from([{"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
                               {"type": "custom", "custom": {"name": "f"}}, {"function": {"name": "f"}}]))
def test_an_object_tool_choice_other_than_a_function_is_refused_by_name(kind: str, choice: dict[str, Any]) -> None:
    """Anthropic sent it as a choice of the tool named "", Bedrock of the tool named None,
    and Gemini raised (the request's catch-all 400, naming no field)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": choice,
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    try:
        TRANSLATORS[kind].request(TARGETS[kind], "/chat/completions", body, False)
    except GatewayError as err:
        assert (err.code, err.param) == ("invalid_request", "tool_choice")
    else:
        raise AssertionError(f"{kind} sent {choice}")
