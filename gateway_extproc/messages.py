"""Anthropic-style clients (`POST /v1/messages`) on top of the OpenAI pivot: the request is
validated and rewritten as an OpenAI chat request, so routing, budgets, policy and every
backend work unchanged; the chat completion (or its SSE stream) is rewritten back as an
Anthropic message. Gateway errors keep the OpenAI shape and are not translated here.

Prompt-cache markers (`cache_control`) stay on what the client put them on: a system or content
block becomes a content part carrying it, a `tool_use` block a tool call, a `tool_result` block
its `tool` message, a tool the function tool (where OpenRouter and LiteLLM take them), a
top-level one (automatic caching) the chat request's own; the Claude and Converse translators
put them back in place (providers/anthropic.py, bedrock.py)."""

from __future__ import annotations

from typing import Any

import orjson

from gateway_extproc import api
from gateway_extproc.errors import GatewayError, plain_word, quoted
from gateway_extproc.providers.base import (NATIVE_STOPS, UNREADABLE_STREAM, EventTooLarge, SseReader,
                                            arguments_object)

JSON = dict[str, Any]

_STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
# OpenAI error types Anthropic also has; the rest become api_error / overloaded_error.
_SHARED_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                       "not_found_error", "rate_limit_error"}


def _invalid(message: str, param: str) -> GatewayError:
    return GatewayError("invalid_request", message, param)


# The Messages request's fields, all of which the translation carries: any other is refused
# (naming it) rather than dropped, since nothing would read it.
_FIELDS = frozenset({"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
                     "tools", "tool_choice", "metadata", "stream", "thinking", "service_tier", "cache_control",
                     "output_config"})
# Each content block's fields (beside `type`; null ones pass, e.g. an answer's `citations` sent back).
_BLOCK_FIELDS = {"text": {"text", "cache_control"}, "image": {"source", "cache_control"},
                 "tool_use": {"id", "name", "input", "cache_control"},
                 "tool_result": {"tool_use_id", "content", "is_error", "cache_control"},
                 "thinking": {"thinking", "signature"}, "redacted_thinking": {"data"}}
_THINKING = ("enabled", "disabled", "adaptive", "between_tools")
_THINKING_FIELDS = {"enabled": {"budget_tokens", "display"}, "adaptive": {"display"}}
# Anthropic's service tiers as the OpenAI values the pivot carries (providers.fields.ANTHROPIC_TIERS).
_TIERS = {"auto": "auto", "standard_only": "default"}


def _only(holder: JSON, allowed: set[str] | frozenset[str], where: str) -> None:
    """Refuses the first field of `holder` the translation does not carry (null ones pass)."""
    extra = next((k for k, v in holder.items() if k not in allowed and k != "type" and v is not None), None)
    if extra is not None:
        # (A key is caller text: named only when it is a plain word, as every schema field is.)
        name = extra if plain_word(extra) else "(a field whose name is not shown)"
        path = f"{where}.{name}" if where else name
        raise _invalid(f"{path}: this field is not supported by the gateway's Messages endpoint (it would be "
                       "dropped); leave it out", path if plain_word(extra) else where or None)


def to_chat(body: JSON, paths: dict[str, str] | None = None) -> JSON:
    """A validated Anthropic Messages request as the equivalent OpenAI chat request. `paths`,
    when given, gets the client's path of each pivot field a backend kind may refuse
    (providers.fields), so the refusal names what the client sent."""
    paths = {} if paths is None else paths
    _only(body, _FIELDS, "")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model: a model name (string) is required", "model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise _invalid("max_tokens: a positive integer is required", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: a non-empty list is required", "messages")
    if not isinstance(body.get("stream", False), bool):
        raise _invalid("stream: must be a boolean", "stream")
    chat: list[JSON] = []
    markers: list[str] = []  # the paths of the client's prompt-cache markers
    # (A field of the wrong type is refused even when falsy: `system: {}`, `tools: 0` were dropped.)
    if body.get("system") is not None:
        system = _system(body["system"], markers)
        if system:
            chat.append({"role": "system", "content": system})
    for i, message in enumerate(messages):
        for pivot in _message(message, f"messages.{i}", markers):
            for name in ("is_error", "thinking_blocks"):
                if name in pivot:
                    paths[f"messages[{len(chat)}].{name}"] = pivot.pop(f"_{name}_path")
            chat.append(pivot)
    out: JSON = {"model": model, "messages": chat, "max_tokens": max_tokens}
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise _invalid("stop_sequences: a list of strings is required", "stop_sequences")
        if stop:
            out["stop"] = list(stop)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    top_k = body.get("top_k")
    if top_k is not None:
        if type(top_k) is not int or top_k <= 0:
            raise _invalid("top_k: a positive integer is required", "top_k")
        out["top_k"] = top_k
    _thinking(body.get("thinking"), out)
    _output_config(body.get("output_config"), out, paths)
    tier = body.get("service_tier")
    if tier is not None:
        if tier not in _TIERS:
            raise _invalid("service_tier: must be auto or standard_only", "service_tier")
        out["service_tier"] = _TIERS[tier]
    paths.update({"stop": "stop_sequences", "user": "metadata.user_id",
                  "parallel_tool_calls": "tool_choice.disable_parallel_tool_use"})
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid("tools: a list of tools is required", "tools")
        if tools:
            out["tools"] = [_tool(tool, f"tools.{i}", markers) for i, tool in enumerate(tools)]
    marker = api.top_cache_marker(body, markers)  # (automatic caching: a top-level marker on the pivot too)
    if marker is not None:
        out["cache_control"] = marker
    api.check_cache_markers(markers)
    _apply_tool_choice(body.get("tool_choice"), out)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata: an object is required", "metadata")
    _only(metadata or {}, {"user_id"}, "metadata")
    user = (metadata or {}).get("user_id")
    if not (user is None or isinstance(user, str)):
        raise _invalid("metadata.user_id: a string is required", "metadata.user_id")
    if user:
        out["user"] = user
    if body.get("stream"):
        out["stream"] = True  # the router asks the backend for the usage chunk message_delta needs
    return out


def _thinking(thinking: Any, out: JSON) -> None:
    """Extended thinking, carried to the pivot as is (`thinking`, LiteLLM's name) once its shape
    is Anthropic's: the translators that can say it do (providers.fields), the rest refuse it."""
    if thinking is None:
        return
    if not (isinstance(thinking, dict) and thinking.get("type") in _THINKING):
        raise _invalid("thinking: an object with a type of enabled, disabled, adaptive or between_tools is required",
                       "thinking")
    _only(thinking, _THINKING_FIELDS.get(thinking["type"], set()), "thinking")
    budget = thinking.get("budget_tokens")
    if thinking["type"] == "enabled" and (type(budget) is not int or budget <= 0):
        raise _invalid("thinking.budget_tokens: a positive integer is required", "thinking.budget_tokens")
    out["thinking"] = dict(thinking)


def _output_config(config: Any, out: JSON, paths: dict[str, str]) -> None:
    """Structured outputs and effort as OpenAI says them: `response_format` json_schema and
    `reasoning_effort` (which the Claude translator turns back into `output_config`)."""
    if config is None:
        return
    if not isinstance(config, dict):
        raise _invalid("output_config: an object is required", "output_config")
    _only(config, {"format", "effort"}, "output_config")
    fmt = config.get("format")
    if fmt is not None:
        if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict)):
            raise _invalid("output_config.format: a json_schema format with a schema object is required",
                           "output_config.format")
        _only(fmt, {"schema"}, "output_config.format")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
        paths["response_format"] = "output_config.format"
    effort = config.get("effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise _invalid("output_config.effort: a string is required", "output_config.effort")
        out["reasoning_effort"] = effort
        paths["reasoning_effort"] = "output_config.effort"


def drop_cache_markers(chat: JSON) -> None:
    """`to_chat`'s request without the prompt-cache markers it carried over (where they sit)."""
    chat.pop("cache_control", None)
    for message in chat["messages"]:
        message.pop("cache_control", None)
        for holder in (*(message["content"] if isinstance(message.get("content"), list) else ()),
                       *(message.get("tool_calls") or ())):
            holder.pop("cache_control", None)
    for tool in chat.get("tools") or ():
        tool.pop("cache_control", None)


def _system(system: Any, markers: list[str]) -> str | list[JSON]:
    if isinstance(system, str):
        return system
    if not isinstance(system, list) or not all(
            isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in system):
        raise _invalid("system: a string or a list of text blocks is required", "system")
    for i, b in enumerate(system):
        _only(b, {"text", "cache_control"}, f"system.{i}")
    return _content([_marked({"type": "text", "text": b["text"]}, b, f"system.{i}", markers)
                     for i, b in enumerate(system)])


def _marked(out: JSON, block: JSON, where: str, markers: list[str]) -> JSON:
    """`out` (what the client's `block` becomes) with the block's prompt-cache marker, if any."""
    marker = api.cache_marker(block, where, markers)
    if marker is not None:
        out["cache_control"] = marker
    return out


def _content(parts: list[JSON]) -> str | list[JSON]:
    """A lone text part as a plain string, the form every OpenAI backend accepts (unless it
    carries a prompt-cache marker, which only a part can)."""
    if len(parts) == 1 and parts[0]["type"] == "text" and "cache_control" not in parts[0]:
        return str(parts[0]["text"])
    return parts


def _message(message: Any, param: str, markers: list[str]) -> list[JSON]:
    """One Anthropic message as one or more OpenAI messages: a user's tool_result blocks
    become `tool` messages, placed first because they answer the previous assistant turn."""
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise _invalid(f"{param}.role: must be 'user' or 'assistant'", f"{param}.role")
    role, content = message["role"], message.get("content")
    _only(message, {"role", "content"}, param)
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _invalid(f"{param}.content: a string or a list of content blocks is required", f"{param}.content")
    parts: list[JSON] = []
    tool_calls: list[JSON] = []
    tool_results: list[JSON] = []
    thinking: list[JSON] = []
    thinking_at = ""
    for j, block in enumerate(content):
        where = f"{param}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(kind, str) and kind in _BLOCK_FIELDS:
            _only(block, _BLOCK_FIELDS[kind], where)
        if kind == "text":
            _string(block, "text", where)
            parts.append(_marked({"type": "text", "text": block["text"]}, block, where, markers))
        elif kind == "image":
            parts.append(_marked({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), where)}},
                                 block, where, markers))
        elif kind == "tool_use" and role == "assistant":
            for name in ("id", "name"):
                if not isinstance(block.get(name), str):
                    raise _invalid(f"{where}.{name}: a string is required", f"{where}.{name}")
            if not isinstance(block.get("input", {}), dict):
                raise _invalid(f"{where}.input: an object is required", f"{where}.input")
            tool_calls.append(_marked({"id": block["id"], "type": "function",
                                       "function": {"name": block["name"],
                                                    "arguments": orjson.dumps(block.get("input") or {}).decode()}},
                                      block, where, markers))
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise _invalid(f"{where}.tool_use_id: a string is required", f"{where}.tool_use_id")
            result = _marked({"role": "tool", "tool_call_id": block["tool_use_id"],
                              "content": _tool_result(block.get("content"), where, markers)}, block, where, markers)
            error = block.get("is_error")
            if not (error is None or isinstance(error, bool)):
                raise _invalid(f"{where}.is_error: a boolean is required", f"{where}.is_error")
            if error:  # (the pivot's extension: providers.fields)
                result.update(is_error=True, _is_error_path=f"{where}.is_error")
            tool_results.append(result)
        elif kind == "thinking" and role == "assistant":
            # The model's own reasoning, signed: carried in order (`thinking_blocks`, LiteLLM's
            # name) to the backends that check and read it, refused by the others.
            thinking.append({"type": "thinking", "thinking": _string(block, "thinking", where),
                             "signature": _string(block, "signature", where)})
            thinking_at = thinking_at or where
        elif kind == "redacted_thinking" and role == "assistant":
            thinking.append({"type": "redacted_thinking", "data": _string(block, "data", where)})
            thinking_at = thinking_at or where
        else:
            raise _invalid(f"{where}: content block type {quoted(kind)} is not supported in a {role} message", where)
    out = tool_results
    if role == "assistant":
        reply: JSON = {"role": "assistant", "content": _content(parts) if parts else None}
        if tool_calls:
            reply["tool_calls"] = tool_calls
        if thinking:
            reply.update(thinking_blocks=thinking, _thinking_blocks_path=thinking_at)
        out.append(reply)
    elif parts or not tool_results:
        out.append({"role": "user", "content": _content(parts) if parts else ""})
    return out


def _string(holder: JSON, name: str, where: str) -> str:
    """`holder[name]`, refused unless a string (a value of another type was put in a string)."""
    value = holder.get(name)
    if not isinstance(value, str):
        raise _invalid(f"{where}.{name}: a string is required", f"{where}.{name}")
    return value


def _image_url(source: Any, where: str) -> str:
    where += ".source"
    if isinstance(source, dict) and source.get("type") in ("base64", "url"):
        _only(source, {"media_type", "data"} if source["type"] == "base64" else {"url"}, where)
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{_string(source, 'media_type', where)};base64,{_string(source, 'data', where)}"
    if isinstance(source, dict) and source.get("type") == "url":
        return _string(source, "url", where)
    raise _invalid(f"{where}: a base64 or url image source is required", where)


def _tool_result(content: Any, where: str, markers: list[str]) -> str | list[JSON]:
    """OpenAI tool messages carry text only, so a tool result with an image is refused
    rather than silently shortened. Its text blocks are one string, unless one carries a
    prompt-cache marker: then they stay text parts, the marker on its own."""
    if content is None or isinstance(content, str):
        return content or ""
    if not (isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content)):
        raise _invalid(f"{where}.content: tool results may only contain text", f"{where}.content")
    for k, b in enumerate(content):
        _only(b, {"text", "cache_control"}, f"{where}.content.{k}")
    texts = [_string(b, "text", f"{where}.content.{k}") for k, b in enumerate(content)]
    if not any("cache_control" in b for b in content):
        return "\n".join(texts)
    return [_marked({"type": "text", "text": text}, b, f"{where}.content.{k}", markers)
            for k, (text, b) in enumerate(zip(texts, content))]


def _tool(tool: Any, where: str, markers: list[str]) -> JSON:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or "input_schema" not in tool \
            or tool.get("type", "custom") not in ("custom", None):
        raise _invalid(f"{where}: only custom tools with a name and an input_schema are supported", where)
    _only(tool, {"name", "description", "input_schema", "cache_control"}, where)
    if not isinstance(tool["input_schema"], dict):
        raise _invalid(f"{where}.input_schema: an object (a JSON Schema) is required", f"{where}.input_schema")
    if not isinstance(tool.get("description", ""), str):
        raise _invalid(f"{where}.description: a string is required", f"{where}.description")
    function: JSON = {"name": tool["name"], "parameters": tool["input_schema"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    return _marked({"type": "function", "function": function}, tool, where, markers)


def _apply_tool_choice(choice: Any, out: JSON) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict):  # (`"auto"`, OpenAI's form, was dropped)
        raise _invalid("tool_choice: an object with a type of auto, any, tool or none is required", "tool_choice")
    _only(choice, {"name", "disable_parallel_tool_use"}, "tool_choice")
    if choice.get("type") == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": _string(choice, "name", "tool_choice")}}
    elif isinstance(choice.get("type"), str) and choice["type"] in _TOOL_CHOICE:
        out["tool_choice"] = _TOOL_CHOICE[choice["type"]]
    else:
        raise _invalid("tool_choice.type: must be auto, any, tool or none", "tool_choice")
    disable = choice.get("disable_parallel_tool_use")
    if not (disable is None or isinstance(disable, bool)):
        raise _invalid("tool_choice.disable_parallel_tool_use: a boolean is required",
                       "tool_choice.disable_parallel_tool_use")
    if disable:
        out["parallel_tool_calls"] = False


def from_chat(raw: bytes) -> bytes | None:
    """An OpenAI chat.completion as an Anthropic message (first choice only); None when
    `raw` is not a JSON object (the caller answers 502 provider_error). Any other shape
    a provider may send is read leniently: a field of the wrong type counts as absent."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    choice = _dict(next(iter(_list(body.get("choices"))), None))
    message = _dict(choice.get("message"))
    content = [_thinking_block(_dict(b)) for b in _list(message.get("thinking_blocks"))]
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in _list(message.get("tool_calls")):
        call = _dict(call)
        function = _dict(call.get("function"))
        content.append({"type": "tool_use", "id": _str(call.get("id")), "name": _str(function.get("name")),
                        "input": _arguments(function.get("arguments"))})
    return orjson.dumps({
        "id": _str(body.get("id")), "type": "message", "role": "assistant", "model": _str(body.get("model")),
        "content": content, **_stop(choice), "usage": _usage(body.get("usage"))})


def _thinking_block(block: JSON) -> JSON:
    """One of the pivot answer's `thinking_blocks` (providers/anthropic.reasoning) as the block
    Claude sent, signature included: the client sends it back on the next turn."""
    if block.get("type") == "redacted_thinking":
        return {"type": "redacted_thinking", "data": _str(block.get("data"))}
    return {"type": "thinking", "thinking": _str(block.get("thinking")), "signature": _str(block.get("signature"))}


def _dict(value: Any) -> JSON:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _stop(choice: JSON) -> JSON:
    """A chat choice's end as Anthropic's `stop_reason` and `stop_sequence`: the provider's own
    reason when the pivot carries it (`native_finish_reason`, providers/base.native_stop) and it
    agrees with the finish_reason; else a "stop" with the stop string matched (vLLM's
    `stop_reason`, Claude's `stop_sequence` on the pivot) is `stop_sequence`; else the
    finish_reason's counterpart (an unknown one ends normally)."""
    finish = choice.get("finish_reason")
    native, matched = choice.get("native_finish_reason"), choice.get("stop_reason")
    matched = matched if isinstance(matched, str) else None
    if isinstance(native, str) and NATIVE_STOPS.get(native) == finish:
        reason = native
    elif finish == "stop" and matched is not None:
        reason = "stop_sequence"
    else:
        reason = _STOP_REASON.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    return {"stop_reason": reason, "stop_sequence": matched if reason == "stop_sequence" else None}


def _arguments(arguments: Any) -> JSON:
    """Models sometimes stream invalid JSON arguments; Anthropic's input must be an object."""
    return arguments_object(arguments) or {}


def _usage(usage: Any) -> JSON:
    """OpenAI's prompt_tokens includes cached tokens; Anthropic's input_tokens does not.
    `cache_creation_tokens` (and its 1-hour share, `cache_creation_1h_tokens`) is what the
    Claude and Converse translators report, so a backend's cache writes survive the round
    trip, split by TTL as Anthropic does in `cache_creation`."""
    usage = _dict(usage)
    details = _dict(usage.get("prompt_tokens_details"))
    read = _count(details.get("cached_tokens"))
    created = _count(details.get("cache_creation_tokens", details.get("cache_write_tokens")))
    long = min(_count(details.get("cache_creation_1h_tokens")), created)
    return {"input_tokens": max(_count(usage.get("prompt_tokens")) - read - created, 0),
            "output_tokens": _count(usage.get("completion_tokens")),
            "cache_read_input_tokens": read, "cache_creation_input_tokens": created,
            "cache_creation": {"ephemeral_5m_input_tokens": created - long, "ephemeral_1h_input_tokens": long}}


def _event(kind: str, obj: JSON) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


class ToMessagesStream:
    """OpenAI chat.completion.chunk SSE in, Anthropic message stream events out.

    The finish_reason is held until `[DONE]` because OpenAI sends the usage chunk after it,
    and Anthropic's message_delta carries both."""

    def __init__(self) -> None:
        self._reader = SseReader()
        self._started = False
        self._open_kind: str | None = None  # "text", "thinking" or "tool" while a content block is open
        self._blocks = 0  # content blocks started so far; the open one is the last of them
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> Anthropic block index
        self._finish: JSON | None = None  # the choice that carried the finish_reason
        self._usage: Any = None
        self._done = False
        self._signature: str | None = None  # of the thinking block open or about to open (`_thinking`)
        self._signed: Any = None  # its `thinking_blocks` entry's index

    def feed(self, chunk: bytes, end: bool) -> bytes:
        out: list[bytes] = []
        try:
            events = self._reader.feed(chunk, end)
        except EventTooLarge:  # (past the router's 1 MiB hold when no output scanning holds events)
            return b"" if self._done else b"".join(self._chunk({"error": {"message": UNREADABLE_STREAM}}))
        for data in events:
            if self._done:
                break
            if data.strip() == b"[DONE]":
                out.extend(self._stop())
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.extend(self._chunk(obj))
        if end and not self._done and self._finish is not None:
            out.extend(self._stop())  # the backend finished but its stream lost the [DONE]
        return b"".join(out)

    def _chunk(self, obj: JSON) -> list[bytes]:
        if isinstance(obj.get("error"), dict):
            # After a finish (a stream the budget cut: finish, usage, error), the client still
            # gets its message_delta with stop reason and usage before the error.
            out = self._close() + self._delta() if self._finish is not None else []
            self._done = True
            return [*out, _event("error", {"error": _error(obj["error"])})]
        # Azure's first chunk is its prompt filter's verdict, with no choices and an empty `id`
        # and `model`: the message starts at a chunk with choices (or at the end, `_stop`).
        out = self._start(obj) if _list(obj.get("choices")) else []
        if isinstance(obj.get("usage"), dict) and obj["usage"]:
            self._usage = obj["usage"]
        for choice in _list(obj.get("choices")):
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = _dict(choice.get("delta"))
            if isinstance(delta.get("reasoning_content"), str) and delta["reasoning_content"]:
                if self._open_kind != "thinking" or self._signature is not None:  # (a signed block has ended)
                    out.extend(self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}))
                out.append(_event("content_block_delta", {
                    "index": self._blocks - 1, "delta": {"type": "thinking_delta", "thinking": delta["reasoning_content"]}}))
            for block in _list(delta.get("thinking_blocks")):
                out.extend(self._thinking(_dict(block)))
            if isinstance(delta.get("content"), str) and delta["content"]:
                if self._open_kind != "text":
                    out.extend(self._open("text", {"type": "text", "text": ""}))
                out.append(_event("content_block_delta", {
                    "index": self._blocks - 1, "delta": {"type": "text_delta", "text": delta["content"]}}))
            for call in _list(delta.get("tool_calls")):
                out.extend(self._tool_call(_dict(call)))
            if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
                self._finish = choice
        return out

    def _tool_call(self, call: JSON) -> list[bytes]:
        out: list[bytes] = []
        function = _dict(call.get("function"))
        k = call.get("index", 0) if type(call.get("index", 0)) is int else 0
        if call.get("id") or k not in self._tools:
            out.extend(self._open("tool", {"type": "tool_use", "id": _str(call.get("id")),
                                           "name": _str(function.get("name")), "input": {}}))
            self._tools[k] = self._blocks - 1
        if isinstance(function.get("arguments"), str) and function["arguments"]:
            out.append(_event("content_block_delta", {
                "index": self._tools[k], "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}}))
        return out

    def _thinking(self, block: JSON) -> list[bytes]:
        """A redacted block comes whole. A signature (Claude streams it as its thinking block's
        last delta) is held until that block closes, which it does at the next block or text:
        reasoning text after it is the next thinking block's (output scanning lets a block's
        held text out before its signature for an anthropic client, `ResponseGuard` with
        `in_order`; until 2026-12-05 it came after, and two signed blocks went out as one).
        Pieces of one block's signature (entries of one `index`) are joined, as the openai SDK
        joins them."""
        if block.get("type") == "redacted_thinking":
            return [*self._open("redacted", {"type": "redacted_thinking", "data": _str(block.get("data"))}),
                    *self._close()]
        index = block.get("index")
        more = self._signature is not None and index is not None and index == self._signed
        self._signature = (self._signature if more else "") + _str(block.get("signature"))
        self._signed = index
        return []

    def _start(self, obj: JSON) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [_event("message_start", {"message": {
            "id": _str(obj.get("id")), "type": "message", "role": "assistant", "model": _str(obj.get("model")),
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})]

    def _open(self, kind: str, block: JSON) -> list[bytes]:
        out = self._close()
        if self._signature is not None:  # a signed block without text (display omitted)
            out += self._start_block("thinking", {"type": "thinking", "thinking": "", "signature": ""}) + self._close()
        return out + self._start_block(kind, block)

    def _start_block(self, kind: str, block: JSON) -> list[bytes]:
        self._open_kind = kind
        self._blocks += 1
        return [_event("content_block_start", {"index": self._blocks - 1, "content_block": block})]

    def _close(self) -> list[bytes]:
        if self._open_kind is None:
            return []
        out = []
        if self._open_kind == "thinking" and self._signature is not None:
            out.append(_event("content_block_delta", {
                "index": self._blocks - 1, "delta": {"type": "signature_delta", "signature": self._signature}}))
            self._signature = None
        self._open_kind = None
        return [*out, _event("content_block_stop", {"index": self._blocks - 1})]

    def _stop(self) -> list[bytes]:
        self._done = True
        out = [*self._start({}), *self._close()]
        if self._signature is not None:  # (a signed block without text, and nothing after it)
            out += self._start_block("thinking", {"type": "thinking", "thinking": "", "signature": ""}) + self._close()
        return [*out, *self._delta(), _event("message_stop", {})]

    def _delta(self) -> list[bytes]:
        usage = _usage(self._usage) if self._usage else {"output_tokens": 0}
        return [_event("message_delta", {
            "delta": _stop(self._finish or {"finish_reason": "stop"}), "usage": usage})]


def _error(error: JSON) -> JSON:
    """Anthropic's error type, and the `code` (and `param`) of the gateway's error shape: the
    runbook code (`budget_exceeded`, `upstream_stream_interrupted`, `provider_error`) tells a
    stream cut at its budget from a provider's failure, as in every JSON error the gateway
    answers Anthropic clients with (extra fields the anthropic SDK keeps in the error's body)."""
    kind = str(error.get("type") or "")
    code = error.get("code")
    if kind not in _SHARED_ERROR_TYPES:
        kind = "overloaded_error" if "overload" in f"{kind} {code}" else "api_error"
    param = error.get("param")
    return {"type": kind, "message": str(error.get("message") or "upstream error"),
            "code": code if isinstance(code, str) and code else "provider_error",
            "param": param if isinstance(param, str) else None}
