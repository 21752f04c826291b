"""Amazon Bedrock behind the OpenAI Chat schema, through the Converse / ConverseStream API:
one request shape for every Bedrock model family, SigV4-signed, with the model id in the
path. Streams come back as AWS event-stream frames and leave as OpenAI SSE chunks.

Prompt-cache markers (`cache_control`, the contract checked them: api.check_cache_control)
become what Converse has for them: a `{"cachePoint": {"type": "default"}}` block after the block
marked (with the marker's `ttl`, "5m" or "1h", when it has one), in `system`, in a message's
content (a message's own marker after its last block; a tool message's, and its parts', after
its `toolResult`, which cannot hold one; the request's own, top-level, after the last turn's
last block) and in `toolConfig.tools`."""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import orjson

from gateway_extproc.errors import GatewayError, quoted
from gateway_extproc.providers import anthropic, eventstream, sigv4
from gateway_extproc.providers.base import (DONE, JSON, Outbound, StreamBroken, StreamTranslator, Target, append_turn,
                                             arguments_text, chosen_function, completion_chunk, delta_choice,
                                             error_event, finish_with_calls, native_stop, openai_error, openai_usage, output_cap,
                                             plain_call_id, token_count)

TRANSLATES_RESPONSE = True

_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg",
                  "image/gif": "gif", "image/webp": "webp"}
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
           "model_context_window_exceeded": "length", "tool_use": "tool_calls",
           "guardrail_intervened": "content_filter", "content_filtered": "content_filter"}
_EVENTSTREAM = "application/vnd.amazon.eventstream"


def _text_parts(content: Any, param: str) -> list[JSON]:
    """An OpenAI message `content` (a string or a list of text parts) as text parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return content
    raise GatewayError("invalid_request", "only text content is supported here", param)


def _cache_point(holder: JSON) -> list[JSON]:
    """The `cachePoint` block that goes after what `holder` became, when it carries a marker."""
    marker = holder.get("cache_control")
    if not isinstance(marker, dict):
        return []
    return [{"cachePoint": {"type": "default", **({"ttl": marker["ttl"]} if "ttl" in marker else {})}}]


def _text_blocks(content: Any, param: str) -> list[JSON]:
    """Text content as Converse text blocks (empty ones dropped: Converse refuses them), each
    marked part followed by its cachePoint."""
    return [block for p in _text_parts(content, param) if p.get("text")
            for block in ({"text": str(p["text"])}, *_cache_point(p))]


def _marked_last(blocks: list[JSON], message: JSON) -> list[JSON]:
    """A message's own marker as a cachePoint after its last block: none without blocks, nor
    a second one after a marked last part."""
    return blocks + _cache_point(message) if blocks and "cachePoint" not in blocks[-1] else blocks


def _image(url: str, param: str) -> JSON:
    """Converse only takes inline bytes (or S3), so only data: URLs can be forwarded."""
    header, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and header.endswith(";base64")):
        raise GatewayError("invalid_request", "images must be data: URLs for this backend", param)
    fmt = _IMAGE_FORMATS.get(header[5:-7].lower())
    if fmt is None:
        raise GatewayError("invalid_request", "images must be png, jpeg, gif or webp for this backend", param)
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise GatewayError("invalid_request", "image data is not valid base64", param) from None
    # The Converse JSON protocol carries blobs as base64 strings, so the data goes as is.
    return {"image": {"format": fmt, "source": {"bytes": data}}}


def _user_blocks(content: Any, param: str) -> list[JSON]:
    if not isinstance(content, list):
        return _text_blocks(content, param)
    blocks: list[JSON] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"text": str(part.get("text", ""))})
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            blocks.append(_image(str(url or ""), param))
        else:
            raise GatewayError("invalid_request", f"unsupported content part type {quoted(kind)}", param)
        blocks += _cache_point(part)
    return blocks


def _reasoning_blocks(message: JSON) -> list[JSON]:
    """An assistant's signed thinking (the pivot's `thinking_blocks`, api.py checked them) as
    Converse `reasoningContent` blocks, which Claude on Bedrock checks like Anthropic does."""
    return [{"reasoningContent": {"reasoningText": {"text": b["thinking"], "signature": b["signature"]}}}
            if b["type"] == "thinking" else {"reasoningContent": {"redactedContent": b["data"]}}
            for b in message.get("thinking_blocks") or ()]


def _assistant_blocks(message: JSON, param: str) -> list[JSON]:
    blocks = _reasoning_blocks(message) + _text_blocks(message.get("content"), param)
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            raise GatewayError("invalid_request", "tool call arguments must be JSON", param) from None
        blocks.append({"toolUse": {"toolUseId": plain_call_id(call.get("id")), "name": function.get("name"),
                                   "input": arguments}})
        blocks += _cache_point(call)
    return blocks


def _tool_result(message: JSON, param: str) -> list[JSON]:
    """A tool message as a `toolResult` block, then one cachePoint for its markers (the message's
    own, else its parts' last one): a tool result's content cannot hold a cachePoint."""
    parts = _text_parts(message.get("content"), param)
    marked = message if "cache_control" in message else next((p for p in reversed(parts) if "cache_control" in p), {})
    result: JSON = {"toolUseId": plain_call_id(message.get("tool_call_id")),
                    "content": [{"text": "".join(str(p.get("text", "")) for p in parts)}]}
    if message.get("is_error"):
        result["status"] = "error"
    return [{"toolResult": result}, *_cache_point(marked)]


def _conversation(messages: list[JSON]) -> tuple[list[JSON], list[JSON]]:
    """OpenAI messages as Converse (system, messages). Converse wants strictly alternating
    user/assistant turns, so consecutive same-role messages (e.g. several tool results)
    are merged into one message."""
    system: list[JSON] = []
    turns: list[JSON] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise GatewayError("invalid_request", "each message must be an object", param)
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_marked_last(_text_blocks(message.get("content"), param), message))
            continue
        if role == "user":
            blocks = _marked_last(_user_blocks(message.get("content"), param), message)
        elif role == "assistant":
            blocks = _marked_last(_assistant_blocks(message, param), message)
        elif role == "tool":
            role, blocks = "user", _tool_result(message, param)
        else:
            raise GatewayError("invalid_request", f"unsupported message role {quoted(role)}", param)
        if not blocks:
            continue
        append_turn(turns, role, "content", blocks)
    return system, turns


def _tool_config(body: JSON, turns: list[JSON]) -> JSON | None:
    """OpenAI tools as Converse `toolConfig`. Converse has no "none" choice: the tools are
    then left out so the model cannot call one, unless the history holds toolUse /
    toolResult blocks, which Bedrock rejects without a toolConfig; then the tools go
    without a toolChoice (the model's default, like "auto")."""
    tools: list[JSON] = []
    for tool in body.get("tools") or []:
        function = tool.get("function") or {}
        spec: JSON = {"name": function.get("name")}
        if function.get("description"):  # Converse refuses "" (minimum length 1)
            spec["description"] = function["description"]
        # Converse requires a schema; OpenAI lets a function without parameters omit it.
        spec["inputSchema"] = {"json": function.get("parameters") or {"type": "object", "properties": {}}}
        tools.append({"toolSpec": spec})
        tools += _cache_point(tool)
    if not tools:
        return None
    choice = body.get("tool_choice")
    if choice == "none":
        uses_tools = any("toolUse" in b or "toolResult" in b for m in turns for b in m["content"])
        return {"tools": tools} if uses_tools else None
    config: JSON = {"tools": tools}
    if choice == "auto":
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict):
        config["toolChoice"] = {"tool": {"name": chosen_function(choice, "Bedrock")}}
    return config


def _body(body: JSON) -> JSON:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError("invalid_request", "messages must be a non-empty list", "messages")
    system, turns = _conversation(messages)
    if turns:  # the request's own marker (top-level): a cachePoint after the last turn's last block
        turns[-1]["content"] = _marked_last(turns[-1]["content"], body)
    out: JSON = {"messages": turns}
    if system:
        out["system"] = system
    stop = body.get("stop")
    inference = {key: value for key, value in (
        ("maxTokens", output_cap(body)),
        ("temperature", body.get("temperature")),
        ("topP", body.get("top_p")),
        ("stopSequences", [stop] if isinstance(stop, str) else stop),
    ) if value is not None}
    if inference:
        out["inferenceConfig"] = inference
    tool_config = _tool_config(body, turns)
    if tool_config:
        out["toolConfig"] = tool_config
    # Claude's own fields (fields.refusal let them through for Claude models only).
    extra = {key: body[key] for key in ("top_k", "thinking") if body.get(key) is not None}
    if extra:
        out["additionalModelRequestFields"] = extra
    if body.get("user"):  # (what Converse keeps with the invocation, as Anthropic keeps metadata.user_id)
        out["requestMetadata"] = {"user_id": body["user"]}
    return out


def _credentials(credential: str) -> tuple[str, str, str | None]:
    """"ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]"; the message never echoes it."""
    parts = credential.split(":", 2)
    if len(parts) < 2 or not all(parts):
        raise GatewayError("provider_credential_missing",
                           "Bedrock credential must be ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def request(target: Target, suffix: str, body: JSON, stream: bool, now: datetime | None = None) -> Outbound:
    """The signed Converse (or ConverseStream) request; `now` is the signing time."""
    if suffix != "/chat/completions":
        raise GatewayError("unsupported_endpoint", f"Bedrock backends do not serve {suffix}")
    access_key, secret_key, token = _credentials(target.credential)
    region = target.options.get("region")
    if not region:
        raise GatewayError("provider_credential_missing", "Bedrock backend has no region configured")
    path = f"{target.base_path}/model/{quote(target.model, safe='')}/" + ("converse-stream" if stream else "converse")
    payload = orjson.dumps(_body(body))
    headers = {"content-type": "application/json"}
    headers.update(sigv4.sign("POST", target.host, path, "", headers, payload,
                              access_key=access_key, secret_key=secret_key, session_token=token,
                              region=region, service="bedrock", now=now or datetime.now(timezone.utc)))
    headers["accept"] = _EVENTSTREAM if stream else "application/json"
    return Outbound(path=path, headers=headers, body=payload, remove=("x-api-key",))


def _usage(usage: Any) -> JSON | None:
    """Converse counts cached prompt tokens apart from `inputTokens`; OpenAI's
    prompt_tokens includes them, with the cache reads repeated as cached_tokens and the
    writes (billed above the input price) as cache_creation_tokens. Converse
    always sends `inputTokens` and `outputTokens`: one missing (or no count) makes the
    usage unknown (None), not 0 (token_count)."""
    usage = usage if isinstance(usage, dict) else {}
    cache_read, cache_write = usage.get("cacheReadInputTokens"), usage.get("cacheWriteInputTokens")
    out = openai_usage(token_count((usage.get("inputTokens"),), (cache_read, cache_write)),
                       token_count((usage.get("outputTokens"),)))
    if out is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cache_read or 0, "cache_creation_tokens": cache_write or 0}
        long = _long_writes(usage.get("cacheDetails"), cache_write or 0)
        if long:
            out["prompt_tokens_details"]["cache_creation_1h_tokens"] = long
    return out


def _long_writes(details: Any, written: int) -> int:
    """The cache writes Converse lists with a 1-hour TTL (`cacheDetails`: `{ttl, inputTokens}`
    per TTL). A 1h entry whose count cannot be read counts every write as 1-hour, the dearer."""
    long = 0
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and detail.get("ttl") == "1h":
            count = detail.get("inputTokens")
            long += count if type(count) is int and count >= 0 else written
    return min(long, written)


def _error_message(raw: bytes, fallback: str) -> str:
    """Bedrock's JSON errors carry `message`; some AWS error bodies spell it `Message`."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        message = parsed.get("message") or parsed.get("Message")
        if isinstance(message, str):
            return message
    return fallback


def response(status: int, raw: bytes, model: str) -> bytes:
    """A Converse response (or Bedrock error) as an OpenAI chat completion (or error)."""
    if not 200 <= status < 300:
        return openai_error(status, _error_message(raw, f"Bedrock returned HTTP {status}"))
    try:
        parsed = orjson.loads(raw)
        blocks = parsed["output"]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return openai_error(502, "Bedrock returned a malformed Converse response")
    texts = [b["text"] for b in blocks if "text" in b]
    tool_calls = [{"id": b["toolUse"]["toolUseId"], "type": "function",
                   "function": {"name": b["toolUse"]["name"], "arguments": arguments_text(b["toolUse"].get("input"))}}
                  for b in blocks if "toolUse" in b and _is_client_tool(b["toolUse"])]
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts else None, **_reasoning(blocks)}
    if tool_calls:
        message["tool_calls"] = tool_calls
    out: JSON = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": _finish(parsed.get("stopReason"), bool(tool_calls)),
                     **native_stop(parsed.get("stopReason"), _matched(parsed))}],
    }
    if (usage := _usage(parsed.get("usage"))) is not None:  # else left out: the router charges the reservation
        out["usage"] = usage
    return orjson.dumps(out)


def _reasoning(blocks: list[JSON]) -> JSON:
    """Converse `reasoningContent` blocks as the pivot's reasoning (anthropic.reasoning)."""
    return anthropic.reasoning([
        {"type": "thinking", "thinking": text.get("text", ""), "signature": text.get("signature", "")}
        if isinstance(text := r.get("reasoningText"), dict) else {"type": "redacted_thinking",
                                                                  "data": r.get("redactedContent", "")}
        for b in blocks if isinstance(r := b.get("reasoningContent"), dict)])


def _is_client_tool(tool: JSON) -> bool:
    """Converse marks tools Bedrock ran itself (system tools) `server_tool_use`; only the
    others are the client's to run."""
    return tool.get("type") != "server_tool_use"


def _matched(holder: JSON) -> Any:
    """The stop string Claude matched, which Converse returns among the model's own fields."""
    extra = holder.get("additionalModelResponseFields")
    return extra.get("stop_sequence") if isinstance(extra, dict) else None


def _finish(stop_reason: Any, called: bool) -> str:
    return finish_with_calls(_FINISH.get(stop_reason or "", "stop"), called)


class _Stream:
    """ConverseStream events in, OpenAI chunks out. Converse numbers content blocks across
    text and tool use; OpenAI numbers tool calls alone, hence `_tool_index`."""

    __slots__ = ("_decoder", "_model", "_id", "_created", "_tool_index", "_unsent", "_stopped", "_done",
                 "usage_unknown", "_thinking")

    def __init__(self, model: str) -> None:
        self._decoder = eventstream.Decoder()
        self._model = model
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._created = int(time.time())
        self._tool_index: dict[int, int] = {}
        # Tool calls (by content block) with no argument text sent yet: a tool without
        # parameters streams no toolUse delta, and its arguments must still read "{}".
        self._unsent: set[int] = set()
        self._thinking = anthropic.ThinkingBlocks()
        self._stopped = False  # messageStop seen
        self._done = False  # [DONE] or an error event sent; nothing more goes out
        self.usage_unknown = False

    def _chunk(self, delta: JSON, finish_reason: str | None = None) -> bytes:
        return completion_chunk(self._id, self._created, self._model, [delta_choice(delta, finish_reason)])

    def _error(self, message: str, throttled: bool = False) -> bytes:
        """Throttling keeps its 429 type so clients back off; anything else is the
        provider's failure (502, "server_error")."""
        self._done = True
        return error_event(429 if throttled else 502, message)

    def _event(self, kind: str, event: JSON) -> bytes:
        if kind == "messageStart":
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "contentBlockStart":
            tool = (event.get("start") or {}).get("toolUse")
            if not tool or not _is_client_tool(tool):
                return b""
            block = event.get("contentBlockIndex", 0)
            index = self._tool_index[block] = len(self._tool_index)
            self._unsent.add(block)
            return self._chunk({"tool_calls": [{"index": index, "id": tool.get("toolUseId"), "type": "function",
                                                "function": {"name": tool.get("name"), "arguments": ""}}]})
        if kind == "contentBlockDelta":
            delta = event.get("delta") or {}
            if "text" in delta:
                return self._chunk({"content": delta["text"]})
            reasoning = delta.get("reasoningContent")
            if isinstance(reasoning, dict):
                return self._reasoning(event.get("contentBlockIndex", 0), reasoning)
            block = event.get("contentBlockIndex", 0)
            text = (delta.get("toolUse") or {}).get("input")
            if block in self._tool_index and text:
                self._unsent.discard(block)
                return self._arguments(block, text)
            return b""  # citations: no OpenAI chat equivalent
        if kind == "contentBlockStop":
            return self._owed(event.get("contentBlockIndex", 0))
        if kind == "messageStop":
            self._stopped = True
            owed = b"".join(self._owed(block) for block in sorted(self._unsent))
            choice = {**delta_choice({}, _finish(event.get("stopReason"), bool(self._tool_index))),
                      **native_stop(event.get("stopReason"), _matched(event))}
            return owed + completion_chunk(self._id, self._created, self._model, [choice])
        if kind == "metadata":
            self._done = True
            return self._usage_chunk(_usage(event.get("usage"))) + DONE
        return b""  # events added later

    def _reasoning(self, block: Any, delta: JSON) -> bytes:
        """A reasoning delta as the pivot's (anthropic.AnthropicStream): text, its signature
        (the end of the block), or a redacted block whole."""
        if delta.get("text"):
            return self._chunk({"reasoning_content": delta["text"]})
        if delta.get("signature"):
            return self._chunk(self._thinking.delta(block, {"type": "thinking", "thinking": "",
                                                            "signature": str(delta["signature"])}))
        if delta.get("redactedContent"):
            return self._chunk(self._thinking.delta(block, {"type": "redacted_thinking",
                                                            "data": str(delta["redactedContent"])}))
        return b""

    def _usage_chunk(self, usage: JSON | None) -> bytes:
        """The usage chunk, or nothing when the usage is unknown (GuardedStream.usage_unknown)."""
        self.usage_unknown = usage is None
        return b"" if usage is None else completion_chunk(self._id, self._created, self._model, [], usage)

    def _owed(self, block: int) -> bytes:
        """The "{}" arguments of a tool call whose block ended without any."""
        if block not in self._unsent:
            return b""
        self._unsent.discard(block)
        return self._arguments(block, "{}")

    def _arguments(self, block: int, text: str) -> bytes:
        return self._chunk({"tool_calls": [{"index": self._tool_index[block], "function": {"arguments": text}}]})

    def feed(self, chunk: bytes, end: bool) -> bytes:
        if self._done:
            return b""
        out = bytearray()
        try:
            for headers, payload in self._decoder.feed(chunk):
                message_type = headers.get(":message-type", "event")
                if message_type == "exception":
                    kind = headers.get(":exception-type", "exception")
                    out += self._error(_error_message(payload, kind), kind == "throttlingException")
                elif message_type == "error":
                    out += self._error(headers.get(":error-message") or headers.get(":error-code", "error"))
                else:
                    event = orjson.loads(payload) if payload else {}
                    try:
                        out += self._event(headers.get(":event-type", ""), event if isinstance(event, dict) else {})
                    except Exception as err:  # an event of a shape Converse does not document
                        raise StreamBroken(bytes(out)) from err
                if self._done:
                    return bytes(out)
        except (eventstream.EventStreamError, orjson.JSONDecodeError, UnicodeDecodeError):
            # What came after the bytes that could not be read, the usage included, is unknown:
            # the reservation, as for a stream cut off (until 2026-12-08 ~one token an event).
            self.usage_unknown = True
            return bytes(out + self._error("Bedrock sent a malformed event stream"))
        if end:
            if self._decoder.pending or not self._stopped:
                self.usage_unknown = True  # (cut off: the same)
                return bytes(out + self._error("Bedrock stream ended before the message was complete"))
            self._done = True
            # Converse ends with a `metadata` event holding the usage; without it the bill is
            # unknown (the reservation), not ~one token per event (an event carries many).
            out += self._usage_chunk(None) + DONE
        return bytes(out)


def stream(model: str) -> StreamTranslator:
    return _Stream(model)
