"""The client-facing endpoints: which paths exist, and how each request body is checked.

One `Endpoint` per API keeps body validation and prompt counting together, so adding an
endpoint is one entry here rather than a copy of the processor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from . import tokens
from .errors import GatewayError

# Objects and arrays may nest this deep. orjson reads 1,024 levels but writes 254, and the
# gateway writes a body back (a model renamed, a cap set, a translation for another provider,
# which wraps parts a few levels deeper): a body between was read, then raised a TypeError.
MAX_DEPTH = 200

# Chat's `n` above this is refused (OpenAI's own maximum); each choice is reserved in full.
MAX_CHOICES = 128

# Envoy's limits on request headers (max_request_headers_kb 60 and max_request_headers_count
# 100: the chart keeps Envoy's defaults) also bind the headers the gateway adds after its codec
# let the request in (route header, content-length, trace context, the provider's credentials
# or signature): Envoy refuses such a mutation with a 503 for the caller's own request. So a
# forwarded request must leave this much room, or it is refused as the caller's fault.
MAX_HEADER_BYTES = 60 * 1024 - 4096
MAX_HEADER_COUNT = 100 - 12


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # also the `api` value in logs and metadata
    suffix: str  # path below the provider's base URL
    validate: Callable[[dict[str, Any]], None]
    prompt_tokens: Callable[[dict[str, Any], tokens.TokenCount, int], int]  # (body, count, tokens per image)
    can_stream: bool
    # Body fields that cap output, the first one used when the gateway sets a cap itself.
    output_caps: tuple[str, ...] = ()


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise GatewayError("invalid_encoding", f"Request body is not valid UTF-8 (byte {bad.start} is not "
                               "part of a UTF-8 character).") from None
        raise GatewayError("invalid_json", f"Request body is not valid JSON: {_json_reason(raw, exc)}.") from None
    if not isinstance(body, dict):
        raise GatewayError("invalid_request", "Request body must be a JSON object.")
    if _duplicate_keys(raw, body):
        # The parser keeps the last of two equal keys; a provider may take the first or
        # refuse, so the gateway would check one body and forward another. Never quoted: a
        # key is caller text.
        raise GatewayError("invalid_json", "Request body has an object with the same key twice; send each key "
                           "once.")
    return body


# The parser's reasons are fixed phrases ("trailing comma is not allowed", "no low surrogate in
# string"); anything else is not shown, since an error must never quote the body.
_JSON_REASON = re.compile(r"[A-Za-z0-9 ,:'()-]{1,80}")


def _json_reason(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why and where the parser stopped, never the text there: a body may hold anything."""
    if not raw.strip():
        return "the body is empty"
    reason = exc.msg if _JSON_REASON.fullmatch(exc.msg) else "unexpected input"
    if "surrogate" in reason:
        # Valid JSON grammar (JavaScript and Python write it for a string cut inside an emoji),
        # but no Unicode text: a provider cannot read it either.
        reason += " (a \\uD800-\\uDFFF escape must be one half of a pair; was a string cut inside an emoji?)"
    elif "depth" in reason:
        reason += " (objects and arrays may nest 1,024 deep)"
    return f"{reason}, at line {exc.lineno} column {exc.colno}"


# Every JSON string, and whether a colon follows it (a key). On text the parser accepted,
# strings are the only place a quote can occur, so matching them in turn reads them all.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"(?:[ \t\r\n]*+(:))?')
# A key's closing quote is followed by a colon or whitespace; without an escaped backslash in
# the body, a quote after a backslash is inside a string.
_KEY_END = re.compile(rb'"[:\s]')
_UNESCAPED_KEY_END = re.compile(rb'"(?<!\\")[:\s]')


def _duplicate_keys(raw: bytes, body: dict[str, Any]) -> bool:
    """Whether the body wrote more keys than the parsed object has. Counting the quotes that
    may end a key bounds the keys written, in one pass; only when that bound is not the
    parsed count (pretty-printed JSON, say) are the strings read one by one. (A body nested
    over MAX_DEPTH is refused on the way.)"""
    parsed = _keys_parsed(body)
    ends = _KEY_END if b"\\\\" in raw else _UNESCAPED_KEY_END
    return len(ends.findall(raw)) != parsed and _STRING.findall(raw).count(b":") != parsed


def _keys_parsed(body: dict[str, Any]) -> int:
    """The keys of every object in the body, read a level at a time (no recursion: a body may
    nest as deep as the parser allows), which also measures its depth."""
    count, level, depth = 0, [body], 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise GatewayError("invalid_request", f"Request body nests objects and arrays more than {MAX_DEPTH} "
                               f"deep; the gateway passes on bodies nested at most {MAX_DEPTH} deep.")
        below: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                count += len(node)
                below.extend(v for v in node.values() if isinstance(v, (dict, list)))
            else:
                below.extend(v for v in node if isinstance(v, (dict, list)))
        level = below
    return count


def headers_fit(count: int, size: int) -> bool:
    """Whether `count` header lines of `size` bytes (names and values, pseudo-headers included,
    as Envoy counts them) leave room under Envoy's limits for the headers the gateway adds:
    Envoy checks them again on every ext_proc mutation, and fails the request over them."""
    return size <= MAX_HEADER_BYTES and count <= MAX_HEADER_COUNT


def check_header_room(count: int, size: int) -> None:
    """A request's headers (`headers_fit`), refused over the room."""
    if not headers_fit(count, size):
        raise GatewayError("request_headers_too_large", f"Request headers may take at most {MAX_HEADER_BYTES} bytes "
                           f"in {MAX_HEADER_COUNT} lines here (the path and query string count); this request "
                           f"has {size} bytes in {count} lines.")


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise GatewayError("invalid_request", message, param)


def _check_common(body: dict[str, Any]) -> None:
    _require(isinstance(body.get("model"), str) and body["model"] != "", "model",
             "`model` is required and must be a string.")
    # OpenRouter's `models`: the models it may switch to when the first fails. Forwarded, it
    # would let a provider serve a model the key may not use, at a price no budget holds.
    _require("models" not in body, "models", "`models` (a provider-side fallback list) is not accepted: "
             "the gateway's model names its backends and their fallback order.")


def _positive_int(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    _require(value is None or (type(value) is int and value > 0), name, f"`{name}` must be a positive integer.")


def _number(value: Any) -> bool:
    return type(value) is int or type(value) is float  # (not bool; orjson never gives NaN)


def _text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _object(value: Any) -> bool:
    return value is None or isinstance(value, dict)


# Sampling fields: (lowest, highest) as the OpenAI schema allows them. Every translator copies
# them as sent, so one of another type reached Anthropic, Bedrock or Gemini as it was.
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}


def _sampling(body: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        value = body.get(name)
        if value is not None:
            low, high = _RANGES[name]
            _require(_number(value) and low <= value <= high, name, f"`{name}` must be a number from {low} to {high}.")


_TOOL_CHOICES = ("none", "auto", "required")


def _refuse(param: str, wants: str) -> GatewayError:
    return GatewayError("invalid_request", f"`{param}` must be {wants}.", param)


# Prompt-cache markers (`cache_control`, Anthropic's; OpenRouter and LiteLLM take them on chat
# content parts, messages and tools) as the Claude and Converse translators carry them.
# Anthropic and Bedrock refuse a request with more than four.
MAX_CACHE_MARKERS = 4
_CACHE_TTLS = ("5m", "1h")
_CACHE_KEYS = frozenset({"type", "ttl"})


def check_cache_control(marker: Any, param: str) -> None:
    """One marker as Anthropic takes it and a Converse `cachePoint` can say it: anything else
    would reach a provider that refuses it, or be carried as a marker it is not."""
    if not (isinstance(marker, dict) and marker.get("type") == "ephemeral" and marker.keys() <= _CACHE_KEYS
            and marker.get("ttl", "5m") in _CACHE_TTLS):
        raise _refuse(param, 'an object `{"type": "ephemeral"}` with an optional `ttl` of "5m" or "1h"')


def check_cache_markers(paths: list[str]) -> None:
    """The markers of one request, by path: a fifth is refused here, naming it, rather than by the
    provider (whose 400 names no path, and comes after a fallback's attempts)."""
    if len(paths) > MAX_CACHE_MARKERS:
        raise GatewayError("invalid_request", f"A request may carry at most {MAX_CACHE_MARKERS} prompt-cache "
                           f"markers (`cache_control`); this one has {len(paths)}.", paths[MAX_CACHE_MARKERS])


def cache_marker(holder: dict[str, Any], param: str, paths: list[str]) -> Any:
    """The marker `holder` (a part, block, message, tool call or tool) carries, checked and its
    path (`param` is the holder's) added to `paths`; None when it carries none."""
    if "cache_control" not in holder:
        return None
    param += ".cache_control"
    check_cache_control(holder["cache_control"], param)
    paths.append(param)
    return holder["cache_control"]


def top_cache_marker(body: dict[str, Any], paths: list[str]) -> Any:
    """The request's own marker (`cache_control` beside `messages`: OpenRouter's, and Anthropic's
    automatic caching, whose breakpoint is the last cacheable block), checked and counted among
    the four like any other (the Claude and Converse translators put it on the last block of the
    last turn); None without one."""
    if "cache_control" not in body:
        return None
    check_cache_control(body["cache_control"], "cache_control")
    paths.append("cache_control")
    return body["cache_control"]


# (Paths and messages are only formatted for a refusal, or for a marker: this runs on every
# message and part.)
def _check_message(m: Any, i: int, markers: list[str]) -> None:
    """One chat message, as far as the gateway reads it (counting, scanning) or a translator
    turns it into another schema: its role, content parts, tool calls and cache markers."""
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
        raise _refuse(f"messages[{i}]", "an object with a string `role`")
    cache_marker(m, f"messages[{i}]", markers)
    content = m.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                raise _refuse(f"messages[{i}].content[{j}]", "an object with a string `type`")
            cache_marker(part, f"messages[{i}].content[{j}]", markers)
            if kind == "text" or kind == "refusal":
                if not isinstance(part.get(kind), str):
                    raise _refuse(f"messages[{i}].content[{j}].{kind}", "a string")
            elif kind == "image_url":
                image = part.get("image_url")
                if not (isinstance(image, dict) and isinstance(image.get("url"), str)):
                    raise _refuse(f"messages[{i}].content[{j}].image_url", "an object with a string `url`")
    elif not (content is None or isinstance(content, str)):
        raise _refuse(f"messages[{i}].content", "a string or an array of parts")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _refuse(f"messages[{i}].tool_calls", "an array")
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(call.get("id"), str)):
                raise _refuse(f"messages[{i}].tool_calls[{k}]", "an object with a string `id` and a `function` object")
            if not isinstance(function.get("name"), str):
                raise _refuse(f"messages[{i}].tool_calls[{k}].function.name", "a string")
            if not _text(function.get("arguments")):
                raise _refuse(f"messages[{i}].tool_calls[{k}].function.arguments", "a string (JSON text)")
            cache_marker(call, f"messages[{i}].tool_calls[{k}]", markers)
    if not _text(m.get("tool_call_id")):
        raise _refuse(f"messages[{i}].tool_call_id", "a string")
    if m.get("is_error") is not None and not isinstance(m["is_error"], bool):
        raise _refuse(f"messages[{i}].is_error", "a boolean")
    thinking = m.get("thinking_blocks")
    if thinking is not None:
        if not isinstance(thinking, list):
            raise _refuse(f"messages[{i}].thinking_blocks", "an array")
        for k, block in enumerate(thinking):
            if not _thinking_block(block):
                raise _refuse(f"messages[{i}].thinking_blocks[{k}]", 'a `{"type": "thinking", "thinking", '
                              '"signature"}` or `{"type": "redacted_thinking", "data"}` object of strings')


def _thinking_block(block: Any) -> bool:
    """One of the pivot's `thinking_blocks` (an assistant's signed reasoning, providers/fields.py)."""
    if not isinstance(block, dict):
        return False
    names = ("thinking", "signature") if block.get("type") == "thinking" else (
        ("data",) if block.get("type") == "redacted_thinking" else None)
    return names is not None and all(isinstance(block.get(n), str) for n in names)


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`tools`, when sent: an array of objects, each with a string `type` (chat and Responses)."""
    tools = body.get("tools")
    if tools is None:
        return []
    _require(isinstance(tools, list), "tools", "`tools` must be an array of tools.")
    for k, tool in enumerate(tools):
        if not (isinstance(tool, dict) and isinstance(tool.get("type"), str)):
            raise _refuse(f"tools[{k}]", "an object with a string `type`")
    return tools


def _check_tools(body: dict[str, Any], markers: list[str]) -> None:
    for k, tool in enumerate(_tools(body)):
        cache_marker(tool, f"tools[{k}]", markers)
        if tool["type"] == "function":
            function = tool.get("function")
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                raise _refuse(f"tools[{k}].function", "an object with a string `name`")
            if not _text(function.get("description")):
                raise _refuse(f"tools[{k}].function.description", "a string")
            if not _object(function.get("parameters")):
                raise _refuse(f"tools[{k}].function.parameters", "an object (a JSON Schema)")
    choice = body.get("tool_choice")
    _require(choice is None or choice in _TOOL_CHOICES or (isinstance(choice, dict) and (
        "function" not in choice or isinstance(choice["function"], dict)
        and isinstance(choice["function"].get("name"), str))), "tool_choice",
        "`tool_choice` must be 'none', 'auto', 'required' or an object naming a function.")
    _require(body.get("parallel_tool_calls") is None or isinstance(body["parallel_tool_calls"], bool),
             "parallel_tool_calls", "`parallel_tool_calls` must be a boolean.")


def _validate_chat(body: dict[str, Any]) -> None:
    """Every field the gateway reads or a translator carries over to another schema, for any
    backend (an OpenAI-schema one included): a wrong type or a value out of OpenAI's range
    is refused here, naming its path, rather than passed to a provider (or, translated,
    dropped or sent on as it was). Fields none of them reads go to OpenAI-schema providers
    as sent."""
    _check_common(body)
    messages = body.get("messages")
    _require(isinstance(messages, list) and len(messages) > 0, "messages",
             "`messages` is required and must be a non-empty array.")
    markers: list[str] = []
    for i, m in enumerate(messages):
        _check_message(m, i, markers)
    _require(body.get("stream") is None or isinstance(body["stream"], bool), "stream",
             "`stream` must be a boolean (or null).")
    options = body.get("stream_options")
    _require(options is None or isinstance(options, dict), "stream_options", "`stream_options` must be an object.")
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _positive_int(body, "n")
    if (body.get("n") or 1) > MAX_CHOICES:  # null is allowed (the default, 1)
        raise GatewayError("too_many_choices", f"`n` may be at most {MAX_CHOICES}: every choice is reserved "
                           "against your budget at the full output cap.", "n")
    _sampling(body, ("temperature", "top_p", "presence_penalty", "frequency_penalty"))
    seed = body.get("seed")
    _require(seed is None or type(seed) is int, "seed", "`seed` must be an integer.")
    # The pivot's extensions (providers/fields.py), as an Anthropic client sends them (messages.py).
    top_k = body.get("top_k")
    _require(top_k is None or type(top_k) is int and top_k > 0, "top_k", "`top_k` must be a positive integer.")
    thinking = body.get("thinking")
    _require(thinking is None or isinstance(thinking, dict) and thinking.get("type") in (
        "enabled", "disabled", "adaptive", "between_tools") and (thinking["type"] != "enabled" or type(
            thinking.get("budget_tokens")) is int), "thinking", "`thinking` must be an object with a `type` of "
             "enabled (with an integer `budget_tokens`), disabled, adaptive or between_tools.")
    stop = body.get("stop")
    _require(stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(
        isinstance(s, str) for s in stop)), "stop", "`stop` must be a string or an array of strings.")
    _require(_text(body.get("user")), "user", "`user` must be a string.")
    _service_tier(body)
    _check_tools(body, markers)
    top_cache_marker(body, markers)
    check_cache_markers(markers)
    fmt = body.get("response_format")
    _require(fmt is None or isinstance(fmt, dict) and isinstance(fmt.get("type"), str), "response_format",
             "`response_format` must be an object with a string `type`.")
    if fmt is not None and fmt["type"] == "json_schema":
        schema = fmt.get("json_schema")
        _require(isinstance(schema, dict) and _object(schema.get("schema")), "response_format.json_schema",
                 "`response_format.json_schema` must be an object whose `schema` is an object.")


def _validate_responses(body: dict[str, Any]) -> None:
    """What the gateway reads (counts, classifies, checks under a budget) or relies on: the
    input items and tools are objects, and the fields read by name have their schema's type.
    The rest goes to the (OpenAI-schema) provider as sent."""
    _check_common(body)
    value = body.get("input")
    _require(isinstance(value, str) or (isinstance(value, list) and len(value) > 0), "input",
             "`input` is required: a string or a non-empty array of input items.")
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise _refuse(f"input[{i}]", "an input item (an object)")
    _require(body.get("instructions") is None or isinstance(body["instructions"], str), "instructions",
             "`instructions` must be a string.")
    _require(body.get("stream") is None or isinstance(body["stream"], bool), "stream",
             "`stream` must be a boolean (or null).")
    _positive_int(body, "max_output_tokens")
    _sampling(body, ("temperature", "top_p"))
    _service_tier(body)
    _require(_text(body.get("previous_response_id")), "previous_response_id",
             "`previous_response_id` must be a string.")
    _tools(body)
    text = body.get("text")
    _require(_object(text), "text", "`text` must be an object.")
    fmt = (text or {}).get("format")
    _require(fmt is None or isinstance(fmt, dict) and isinstance(fmt.get("type"), str), "text.format",
             "`text.format` must be an object with a string `type`.")
    if fmt is not None and fmt["type"] == "json_schema":
        _require(isinstance(fmt.get("schema"), dict), "text.format.schema",
                 "`text.format.schema` must be an object (a JSON Schema).")


def _service_tier(body: dict[str, Any]) -> None:
    # (read under a budget: `billed_above_prices`)
    _require(_text(body.get("service_tier")), "service_tier", "`service_tier` must be a string.")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(type(t) is int and t >= 0 for t in value)


def _validate_embeddings(body: dict[str, Any]) -> None:
    """OpenAI's four shapes only: what the classifier reads (token IDs decoded, tokens.py)
    must be all the request can carry."""
    _check_common(body)
    value = body.get("input")
    ok = isinstance(value, str) or _token_ids(value) or (
        isinstance(value, list) and len(value) > 0
        and (all(isinstance(x, str) for x in value) or all(_token_ids(x) for x in value)))
    _require(ok, "input", "`input` is required: a string, an array of strings, an array of token IDs "
             "(integers >= 0) or an array of such arrays.")
    # Read by no translator (OpenAI-schema backends only), but the output scanner reads the
    # vectors as the format says, and a provider's refusal names no field.
    _positive_int(body, "dimensions")
    _require(body.get("encoding_format") in (None, "float", "base64"), "encoding_format",
             "`encoding_format` must be \"float\" or \"base64\".")


# Responses fields that make the provider add input it stores (an earlier response's whole
# conversation, a Conversations object, a stored prompt template).
_PROVIDER_STATE = ("previous_response_id", "conversation", "prompt")
# Chat fields that make the provider search for input of its own (a search model's web search,
# Azure On Your Data's index) and add what it found to the prompt.
_SEARCHED = ("web_search_options", "data_sources", "dataSources")
# Tools the caller's code runs (the model only writes their arguments); any other Responses
# tool (web_search, file_search, mcp, code_interpreter, image_generation...) the provider
# runs itself, adding what it fetched as input and per-call fees.
_CALLER_TOOLS = frozenset({"function", "custom"})


def provider_added_input(endpoint: Endpoint, body: dict[str, Any]) -> str | None:
    """The field by which a request makes the provider add billed input that is not in the
    request (so the gateway cannot count it before it leaves), or None."""
    if endpoint is RESPONSES:
        held = next((f for f in _PROVIDER_STATE if body.get(f)), None)
        tools = body.get("tools")
        if held is None and isinstance(tools, list) and any(
                not (isinstance(t, dict) and t.get("type") in _CALLER_TOOLS) for t in tools):
            held = "tools"
        value = body.get("input")
        if held is None and isinstance(value, list):
            held = next((p for i, item in enumerate(value) if (p := _stored_item(item, f"input[{i}]"))), None)
        return held
    if endpoint is CHAT:
        # Search models' fetched pages; Azure On Your Data's retrieved documents (`dataSources`
        # in its older extensions API), added to the prompt and billed as input.
        held = next((f for f in _SEARCHED if body.get(f) is not None), None)
        if held is not None:
            return held
        return next((p for i, m in enumerate(body["messages"])
                     if (p := _stored_parts(m.get("content"), f"messages[{i}].content"))), None)
    return None


# Processing tiers an OpenAI-schema provider bills above its standard prices (OpenAI's and
# Azure's priority processing: about twice the per-token price), which are what `pricing` holds.
_PREMIUM_TIERS = frozenset({"priority"})


def billed_above_prices(endpoint: Endpoint, body: dict[str, Any]) -> str | None:
    """The parameter that asks to be billed above the token prices a backend's `pricing`
    holds, if any: a premium `service_tier`, or spoken output (chat `modalities` with
    "audio", billed at the audio output price, ~8x text for gpt-4o-audio)."""
    if endpoint is not EMBEDDINGS and body.get("service_tier") in _PREMIUM_TIERS:
        return "service_tier"
    modalities = body.get("modalities")
    if endpoint is CHAT and isinstance(modalities, list) and "audio" in modalities:
        return "modalities"
    return None


def _stored_item(item: Any, param: str) -> str | None:
    """A Responses input item that stands for content the provider keeps: an item reference
    (`{"type": "item_reference", "id"}`, or an `id` alone: the type may be left out), or a
    message or tool output whose parts name a stored or remote file."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "item_reference" or (kind is None and "role" not in item and "id" in item):
        return param
    return _stored_parts(item.get("content"), f"{param}.content") or _stored_parts(item.get("output"),
                                                                                  f"{param}.output")


def _stored_parts(parts: Any, param: str) -> str | None:
    """A content part naming a file the provider fetches or keeps (Responses `input_file` with a
    `file_id` or `file_url`, chat's `file` part with a `file_id`): the provider reads the file (a
    PDF's text and an image of every page) and bills it as input, while the request holds a
    name. A file sent inline (`file_data`) is in the request and counted."""
    if not isinstance(parts, list):
        return None
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "input_file":
            field = next((f for f in ("file_id", "file_url") if part.get(f) is not None), None)
            if field is not None:
                return f"{param}[{j}].{field}"
        elif kind == "file" and isinstance(part.get("file"), dict) and part["file"].get("file_id") is not None:
            return f"{param}[{j}].file.file_id"
    return None


# Prompt-cache writes a body may ask for of the backends its markers reach (providers.CACHE_MARKED:
# as sent, or put back in place by a translator): a `cache_control` marker anywhere (Anthropic's,
# which OpenRouter and LiteLLM take on chat content parts, messages, tools and the top level; an
# Anthropic client's on its blocks). Read from the raw bytes, not by a walk over the parsed body: inside a JSON string
# quotes are escaped, so only a key matches (or a string that is exactly `cache_control`:
# a larger reservation, never a smaller one). A key spelled with escapes
# (`"\u0063ache_control"`) needs an escaped digit, letter or underscore, which no encoder
# writes unasked: such a body counts as asking for the dearest writes.
_ESCAPED_NAME = re.compile(rb"\\u00(?:3[0-9]|5[Ff]|[67][0-9A-Fa-f])")


def cache_writes(raw: bytes) -> str | None:
    """`"1h"` when the body may write to the provider's prompt cache for an hour (a `"1h"`
    anywhere with a marker), `"5m"` for the default lifetime, None without a marker."""
    if b"\\u00" in raw and _ESCAPED_NAME.search(raw) is not None:
        return "1h"
    if b'"cache_control"' not in raw:
        return None
    return "1h" if b'"1h"' in raw else "5m"


CHAT = Endpoint("chat", "/chat/completions", _validate_chat, tokens.chat_prompt_tokens, can_stream=True,
                output_caps=("max_completion_tokens", "max_tokens"))
RESPONSES = Endpoint("responses", "/responses", _validate_responses, tokens.responses_input_tokens, can_stream=True,
                     output_caps=("max_output_tokens",))
EMBEDDINGS = Endpoint("embeddings", "/embeddings", _validate_embeddings, tokens.embedding_input_tokens,
                      can_stream=False)

# Client path -> endpoint forwarded to a provider. `/v1/models` is answered by the gateway.
# Anthropic-style clients: translated to chat at the router (messages.py), answered in kind.
MESSAGES_PATH = "/v1/messages"
FORWARDED: dict[str, Endpoint] = {"/v1/chat/completions": CHAT, "/v1/embeddings": EMBEDDINGS,
                                   "/v1/responses": RESPONSES, MESSAGES_PATH: CHAT}
MODELS_PATH = "/v1/models"
USAGE_PATH = "/v1/usage"
# Answered by the gateway itself, whatever the outcome: no GenAI request (not in the genai_*
# metrics; Envoy's own request stats count them, as every request).
ANSWERED = (MODELS_PATH, USAGE_PATH)
BY_NAME = {e.name: e for e in FORWARDED.values()}
