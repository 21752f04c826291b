"""Anthropic Messages API backends: the OpenAI chat request (the gateway's pivot) as a
`POST {base}/messages` request, and Anthropic's message / SSE events back as OpenAI
chat completions / `chat.completion.chunk` events, so every client sees one schema.

Prompt-cache markers (`cache_control`, the contract checked them: api.check_cache_control) go
back on the block the pivot carries them on: a content part's on its block, a message's on its
last block, a tool call's on its `tool_use`, a tool message's on its `tool_result`, a tool's on
the tool, the request's own (top-level: automatic caching) on the last block of the last turn
(where Anthropic puts its breakpoint); a system prompt with one is sent as text blocks rather
than one string."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway_extproc.errors import GatewayError, quoted
from gateway_extproc.providers.fields import ANTHROPIC_TIERS
from gateway_extproc.providers.base import (DONE, JSON, Outbound, SseReader, StreamBroken, Target, append_turn,
                                            arguments_object, arguments_text, chosen_function, completion_chunk,
                                            delta_choice, error_event, finish_with_calls, native_stop, openai_error,
                                            openai_usage, output_cap, plain_call_id, token_count)

TRANSLATES_RESPONSE = True

# Anthropic stop_reason -> OpenAI finish_reason; anything unknown ends normally ("stop").
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
           "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}

# Anthropic error type -> the HTTP status Anthropic answers it with; picks the OpenAI type
# of an error that arrives inside a 200 stream.
_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                 "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                 "api_error": 500, "overloaded_error": 529}


# Anthropic requires max_tokens; OpenAI clients often send none (the model's maxOutputTokens
# or a budget clamp usually sets one before this).
DEFAULT_MAX_TOKENS = 4096

def request(target: Target, suffix: str, body: JSON, stream: bool) -> Outbound:
    """Anthropic only has a chat-shaped endpoint; embeddings and responses are refused."""
    if suffix != "/chat/completions":
        raise GatewayError("unsupported_endpoint",
                           f"Anthropic backends serve /v1/chat/completions only, not /v1{suffix}", None)
    if body.get("n") not in (None, 1):
        raise GatewayError("invalid_request", "Anthropic backends return a single choice: n must be 1", "n")
    system, messages = _messages(body.get("messages") or [])
    if messages and "cache_control" in body:
        _marked_last(messages[-1]["content"], body)
    max_tokens = output_cap(body)
    out: JSON = {"model": target.model, "messages": messages,
                 "max_tokens": max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS}
    if system:
        out["system"] = system
    for key in ("temperature", "top_p", "top_k", "thinking"):  # (the last two: the pivot's extensions)
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("service_tier") is not None:  # (fields.refusal let only auto and default through)
        out["service_tier"] = ANTHROPIC_TIERS[body["service_tier"]]
    fmt = body.get("response_format")
    config: JSON = {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # structured outputs
        config["format"] = {"type": "json_schema", "schema": fmt["json_schema"]["schema"]}
    if body.get("reasoning_effort") is not None:  # (fields.refusal let Claude's efforts through)
        config["effort"] = body["reasoning_effort"]
    if config:
        out["output_config"] = config
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(tool) for tool in tools]
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
            choice = (choice or {"type": "auto"}) | {"disable_parallel_tool_use": True}
        if choice is not None:
            out["tool_choice"] = choice
    if stream:
        out["stream"] = True
    headers = {"x-api-key": target.credential,
               "anthropic-version": target.options.get("anthropicVersion", "2023-06-01"),
               "content-type": "application/json"}
    return Outbound(path=target.base_path + "/messages", headers=headers, body=orjson.dumps(out),
                    remove=("authorization",))


def _text(content: Any) -> str:
    """A string or an array of text parts as one string (system and tool messages)."""
    if isinstance(content, str):
        return content
    return "\n\n".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def _marked(block: JSON, holder: Any) -> JSON:
    """`block` with the prompt-cache marker the pivot's `holder` carries, if any."""
    if isinstance(holder, dict) and "cache_control" in holder:
        block["cache_control"] = holder["cache_control"]
    return block


def _marked_last(blocks: list[JSON], holder: JSON) -> list[JSON]:
    """A message's marker on the last block it became (LiteLLM's reading of a message-level one),
    or the request's own (automatic caching: its breakpoint is the last block of the last turn),
    unless that block carries one already (its own, set where the client put it)."""
    if blocks and "cache_control" not in blocks[-1]:
        _marked(blocks[-1], holder)
    return blocks


def _parts_marked(content: Any) -> bool:
    """Whether a content part carries a prompt-cache marker (then the parts stay blocks)."""
    return isinstance(content, list) and any("cache_control" in part for part in content)


def _system(messages: list[JSON]) -> str | list[JSON]:
    """The system/developer messages as one string, or, when one carries a prompt-cache marker,
    as text blocks with the markers in place (Anthropic rejects empty text blocks)."""
    if not any("cache_control" in m or _parts_marked(m.get("content")) for m in messages):
        return "\n\n".join(_text(m.get("content")) for m in messages)
    return [block for m in messages for block in _marked_last(_blocks(m.get("content")), m)]


def _tool_result(message: JSON) -> JSON:
    """A tool message as a `tool_result` block: its text, as text blocks when a part carries a marker."""
    content = message.get("content")
    block = {"type": "tool_result", "tool_use_id": plain_call_id(message.get("tool_call_id")),
             "content": _blocks(content) if _parts_marked(content) else _text(content)}
    if message.get("is_error"):
        block["is_error"] = True
    return _marked(block, message)


def _messages(messages: list[JSON]) -> tuple[str | list[JSON], list[JSON]]:
    """System/developer messages become the top-level `system`; the rest become content
    blocks, merged per role because Anthropic requires user/assistant alternation."""
    system: list[JSON] = []
    out: list[JSON] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(message)
            continue
        if role == "tool":
            role, blocks = "user", [_tool_result(message)]
        elif role in ("user", "assistant"):
            # An assistant's earlier reasoning goes first, as Anthropic sent it (and checks it).
            blocks = _thinking_blocks(message) if role == "assistant" else []
            blocks += _blocks(message.get("content"))
            blocks += [_tool_use(call) for call in message.get("tool_calls") or []]
            _marked_last(blocks, message)
        else:
            raise GatewayError("invalid_request", f"message role {quoted(role)} is not supported", "messages")
        if not blocks:  # Anthropic rejects empty content; an empty turn carries nothing
            continue
        append_turn(out, role, "content", blocks)
    return _system(system), out


def _thinking_blocks(message: JSON) -> list[JSON]:
    """An assistant message's `thinking_blocks` (api.py checked their shape) as Anthropic's blocks."""
    return [{"type": "thinking", "thinking": b["thinking"], "signature": b["signature"]} if b["type"] == "thinking"
            else {"type": "redacted_thinking", "data": b["data"]} for b in message.get("thinking_blocks") or ()]


def reasoning(blocks: list[JSON]) -> JSON:
    """An answer's thinking blocks as the chat message's `reasoning_content` (their text, what
    OpenAI-schema clients of reasoning models read) and `thinking_blocks` (the signed and the
    redacted ones, as LiteLLM returns them, for the next turn; an unsigned one, a Converse model
    other than Claude's, could not go back): nothing without any."""
    thinking = [b for b in blocks if b.get("type") in ("thinking", "redacted_thinking")]
    out: JSON = {}
    if any(b["type"] == "thinking" for b in thinking):
        out["reasoning_content"] = "".join(str(b.get("thinking", "")) for b in thinking if b["type"] == "thinking")
    signed = [{"type": "thinking", "thinking": str(b.get("thinking", "")), "signature": str(b["signature"])}
              if b["type"] == "thinking" else {"type": "redacted_thinking", "data": str(b.get("data", ""))}
              for b in thinking if b["type"] == "redacted_thinking" or b.get("signature")]
    if signed:
        out["thinking_blocks"] = signed
    return out


def _blocks(content: Any) -> list[JSON]:
    """OpenAI content (string or parts) as Anthropic blocks; empty text is dropped because
    Anthropic rejects empty text blocks (an assistant turn with only tool calls has "")."""
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[JSON] = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if text:
                blocks.append(_marked({"type": "text", "text": text}, part))
        elif kind == "image_url":
            blocks.append(_marked(_image(part.get("image_url") or {}), part))
        else:
            raise GatewayError("invalid_request",
                               f"content part type {quoted(kind)} is not supported by Anthropic backends", "messages")
    return blocks


def _image(image_url: JSON) -> JSON:
    url = image_url.get("url", "")
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64":
            raise GatewayError("invalid_request", "image data URLs must be base64-encoded", "messages")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise GatewayError("invalid_request", "image_url must be an http(s) or base64 data URL", "messages")


def _tool_use(call: JSON) -> JSON:
    """Anthropic wants the parsed object; arguments that are not a JSON object become {}
    rather than failing a whole conversation over one malformed historical call."""
    function = call.get("function") or {}
    return _marked({"type": "tool_use", "id": plain_call_id(call.get("id")), "name": function.get("name", ""),
                    "input": arguments_object(function.get("arguments")) or {}}, call)


def _tool(tool: JSON) -> JSON:
    if tool.get("type") != "function":
        raise GatewayError("invalid_request",
                           f"tool type {quoted(tool.get('type'))} is not supported by Anthropic backends", "tools")
    function = tool.get("function") or {}
    out: JSON = {"name": function.get("name", ""),
                 "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        out["description"] = function["description"]
    return _marked(out, tool)


def _tool_choice(choice: Any) -> JSON | None:
    if isinstance(choice, dict):
        return {"type": "tool", "name": chosen_function(choice, "Anthropic")}
    return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(choice or "")


def response(status: int, raw: bytes, model: str) -> bytes:
    """A message as a chat.completion; an error (or a body that is not a message) as the
    OpenAI error shape carrying the provider's own message. The bytes of an unreadable
    error body are quoted, but never those of a 2xx body: that may be an answer (cut off,
    mislabelled) that output scanning could not read, so it must not come back inside the
    error message either."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    quoted = (raw.decode("utf-8", "replace")[:500] or f"provider answered HTTP {status}" if status >= 300
              else f"The provider answered HTTP {status} with a body the gateway could not read.")
    if not isinstance(body, dict):
        return openai_error(status if status >= 300 else 502, quoted)
    if not 200 <= status < 300 or body.get("type") == "error":
        error = body.get("error")
        text = error.get("message") if isinstance(error, dict) else None
        return openai_error(status if status >= 300 else 502, text or quoted)
    blocks = [block for block in body.get("content") or [] if isinstance(block, dict)]
    texts = [block.get("text", "") for block in blocks if block.get("type") == "text"]
    calls = [_call(block) for block in blocks if block.get("type") == "tool_use"]
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts else None, **reasoning(blocks)}
    if calls:
        message["tool_calls"] = calls
    return orjson.dumps({
        "id": body.get("id", ""), "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model") or model,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish(body.get("stop_reason"), bool(calls)),
                     "logprobs": None, **native_stop(body.get("stop_reason"), body.get("stop_sequence"))}],
        **_usage_field(body.get("usage"))})


def _usage_field(usage: Any) -> JSON:
    """`usage` for a translated answer: left out when unknown (the router charges the reservation)."""
    out = _usage(usage)
    return {} if out is None else {"usage": out}


def _call(block: JSON) -> JSON:
    """A `tool_use` block as an OpenAI tool call. Only `tool_use` is the client's to run
    (programmatic calls from code execution too: Anthropic waits for their tool_result);
    `server_tool_use` / `mcp_tool_use` and their results ran at Anthropic and are not."""
    return {"id": block.get("id", ""), "type": "function",
            "function": {"name": block.get("name", ""), "arguments": arguments_text(block.get("input"))}}


def _finish(stop_reason: Any, called: bool = False) -> str:
    return finish_with_calls(_FINISH.get(stop_reason, "stop"), called)


def _usage(usage: Any) -> JSON | None:
    """Anthropic counts cached prompt tokens apart from input_tokens; OpenAI's
    prompt_tokens includes them, with the cached share in prompt_tokens_details. Anthropic
    always sends `input_tokens` and `output_tokens`: one missing (or no count) makes the
    usage unknown (None), not 0 (token_count). Cache writes (`cache_creation_input_tokens`,
    billed above the input price) go on as `cache_creation_tokens`, and their 1-hour share
    (`cache_creation.ephemeral_1h_input_tokens`), when there is one, as
    `cache_creation_1h_tokens`."""
    usage = usage if isinstance(usage, dict) else {}
    read = usage.get("cache_read_input_tokens")
    created = usage.get("cache_creation_input_tokens")
    split = usage.get("cache_creation")
    split = split if isinstance(split, dict) else {}
    if created is None and split:  # the breakdown alone still says what was written
        created = token_count((), (split.get("ephemeral_5m_input_tokens"), split.get("ephemeral_1h_input_tokens")))
    out = openai_usage(token_count((usage.get("input_tokens"),), (read, created)),
                       token_count((usage.get("output_tokens"),)))
    if out is not None:
        out["prompt_tokens_details"] = {"cached_tokens": read or 0, "cache_creation_tokens": created or 0}
        long = split.get("ephemeral_1h_input_tokens", 0)
        # An unreadable 1-hour share counts every write at the 1-hour price, the dearer one.
        long = min(long, created or 0) if type(long) is int and long >= 0 else created
        if long:
            out["prompt_tokens_details"]["cache_creation_1h_tokens"] = long
    return out


class _Tool:
    """A tool_use block being streamed: its OpenAI index, the input Anthropic put in
    `content_block_start` (normally {}), and whether any argument text went out yet."""

    __slots__ = ("index", "start_input", "sent")

    def __init__(self, index: int, start_input: Any) -> None:
        self.index = index
        self.start_input = start_input
        self.sent = False


class ThinkingBlocks:
    """The `thinking_blocks` delta of a translated stream: each entry with the `index` of its
    thinking block among the answer's, as every list entry of a chat delta has one. The openai
    SDK's stream helper merges list entries by `index` (a block's signature sent in pieces is
    one entry) and raised "Expected list delta entry to have an `index` key" on the second
    entry without one (until 2026-12-05: two signed thinking blocks)."""

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[Any, int] = {}  # the provider's content block -> its entry's index

    def delta(self, block: Any, entry: JSON) -> JSON:
        return {"thinking_blocks": [{"index": self._at.setdefault(block, len(self._at)), **entry}]}


class AnthropicStream:
    """Anthropic SSE in, OpenAI chat.completion.chunk SSE out, one `feed` at a time.

    A tool call's arguments are its `input_json_delta`s; a call with none (a tool without
    parameters, or an input given whole in `content_block_start` or in `message_start`)
    gets its input as one arguments chunk when the block ends, so the concatenated
    arguments are always JSON. Every stream gets exactly one finish_reason, even when the
    provider sent `message_stop` without a `message_delta`."""

    def __init__(self, model: str) -> None:
        self._reader = SseReader()
        self._id = ""
        self._model = model
        self._created = int(time.time())
        self._usage: JSON = {}
        # The output count is final: a message_delta carried it (message_start's is a
        # placeholder, 1), or message_start held the whole answer. Else it is unknown.
        self._counted = False
        # The highest output count a message_delta reported (counts so far): a later, smaller
        # one lowers nothing (`usage.merged`); message_start's placeholder is not one.
        self._reported: int | None = None
        self.usage_unknown = False
        self._tools: dict[int, _Tool] = {}  # Anthropic content block index -> the call streamed from it
        self._thinking = ThinkingBlocks()
        self._stop_reason: Any = None
        self._stop_sequence: Any = None  # the stop string matched (message_delta)
        self._finished = False  # the finish_reason chunk went out
        self._done = False  # after message_stop or an error nothing more is forwarded

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """An event that is not a JSON object, or not of the shape Anthropic documents,
        raises StreamBroken: base.GuardedStream then ends the stream with a
        provider_error event instead of guessing."""
        out: list[bytes] = []
        for data in self._reader.feed(chunk, end):
            if self._done:
                break
            try:
                event = orjson.loads(data)
                if not isinstance(event, dict):
                    raise ValueError("Anthropic stream event is not a JSON object")
                out.extend(self._event(event))
            except Exception as err:
                raise StreamBroken(b"".join(out)) from err
        return b"".join(out)

    def _event(self, event: JSON) -> list[bytes]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self._id = message.get("id", self._id)
            self._model = message.get("model") or self._model
            self._usage.update(message.get("usage") or {})
            self._counted = bool(message.get("content")) and self._usage.get("output_tokens") is not None
            self._stop_reason = message.get("stop_reason") or self._stop_reason
            out = [self._chunk({"role": "assistant", "content": ""})]
            for i, block in enumerate(message.get("content") or []):  # a message_start that holds the answer
                out += self._block_start(-1 - i, block)
                out += self._block_stop(-1 - i)
            return out
        if kind in ("content_block_start", "content_block_delta"):
            # Output after a count: that count was the output so far, not the bill (a
            # `message_delta` before the text was charged as the bill until 2026-12-08).
            self._counted = False
        if kind == "content_block_start":
            return self._block_start(event.get("index", -1), event.get("content_block") or {})
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "thinking_delta" and delta.get("thinking"):
                return [self._chunk({"reasoning_content": delta["thinking"]})]
            if delta.get("type") == "signature_delta":  # (the end of a thinking block)
                return [self._chunk(self._thinking.delta(event.get("index", -1), {
                    "type": "thinking", "thinking": "", "signature": str(delta.get("signature", ""))}))]
            tool = self._tools.get(event.get("index", -1))
            if delta.get("type") == "input_json_delta" and tool is not None and delta.get("partial_json"):
                tool.sent = True
                return [self._arguments(tool, delta["partial_json"])]
            return []
        if kind == "content_block_stop":
            return self._block_stop(event.get("index", -1))
        if kind == "message_delta":
            self._usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            count = (event.get("usage") or {}).get("output_tokens")
            if type(count) is int and count >= 0:  # (a negative one stays what it is: no bill)
                if self._reported is not None and count < self._reported:
                    self._usage["output_tokens"] = self._reported
                else:
                    self._reported = count
            self._counted = self._counted or (event.get("usage") or {}).get("output_tokens") is not None
            delta = event.get("delta") or {}
            self._stop_reason = delta.get("stop_reason") or self._stop_reason
            self._stop_sequence = delta.get("stop_sequence") or self._stop_sequence
            return self._end()
        if kind == "message_stop":
            self._done = True
            usage = _usage(self._usage if self._counted else {**self._usage, "output_tokens": None})
            self.usage_unknown = usage is None  # no usage chunk then: GuardedStream.usage_unknown
            return self._end() + ([] if usage is None else
                                  [completion_chunk(self._id, self._created, self._model, [], usage)]) + [DONE]
        if kind == "error":
            self._done = True
            error = event.get("error") or {}
            status = _ERROR_STATUS.get(error.get("type", ""), 500)
            return [error_event(status, error.get("message") or "provider stream error")]
        return []  # ping, server tool blocks and events added later

    def _block_start(self, index: int, block: JSON) -> list[bytes]:
        if block.get("type") == "tool_use":
            tool = self._tools[index] = _Tool(len(self._tools), block.get("input"))
            return [self._chunk({"tool_calls": [{"index": tool.index, "id": block.get("id", ""), "type": "function",
                                                 "function": {"name": block.get("name", ""), "arguments": ""}}]})]
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") == "thinking" and block.get("thinking"):  # (given whole: message_start)
            return [self._chunk({"reasoning_content": block["thinking"]})] + (
                [self._chunk(self._thinking.delta(index, {"type": "thinking", "thinking": "",
                                                          "signature": str(block["signature"])}))]
                if block.get("signature") else [])
        if block.get("type") == "redacted_thinking":
            return [self._chunk(self._thinking.delta(index, {"type": "redacted_thinking",
                                                             "data": str(block.get("data", ""))}))]
        return []

    def _block_stop(self, index: int) -> list[bytes]:
        tool = self._tools.get(index)
        if tool is None or tool.sent:
            return []
        tool.sent = True
        return [self._arguments(tool, arguments_text(tool.start_input))]

    def _end(self) -> list[bytes]:
        """Arguments still owed (a block never stopped), then the one finish_reason chunk."""
        if self._finished:
            return []
        self._finished = True
        out = [chunk for index in list(self._tools) for chunk in self._block_stop(index)]
        choice = {**delta_choice({}, _finish(self._stop_reason, bool(self._tools))),
                  **native_stop(self._stop_reason, self._stop_sequence)}
        return out + [completion_chunk(self._id, self._created, self._model, [choice])]

    def _arguments(self, tool: _Tool, text: str) -> bytes:
        return self._chunk({"tool_calls": [{"index": tool.index, "function": {"arguments": text}}]})

    def _chunk(self, delta: JSON, finish: str | None = None) -> bytes:
        return completion_chunk(self._id, self._created, self._model, [delta_choice(delta, finish)])


def stream(model: str) -> AnthropicStream:
    return AnthropicStream(model)
