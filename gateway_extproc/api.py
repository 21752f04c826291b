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
    parsed count (pretty-printed JSON, say) are the strings read one by one."""
    parsed = _keys_parsed(body)
    ends = _KEY_END if b"\\\\" in raw else _UNESCAPED_KEY_END
    return len(ends.findall(raw)) != parsed and _STRING.findall(raw).count(b":") != parsed


def _keys_parsed(body: dict[str, Any]) -> int:
    count, todo = 0, [body]  # no recursion: a body may nest as deep as the parser allows
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            count += len(node)
            todo.extend(v for v in node.values() if isinstance(v, (dict, list)))
        else:
            todo.extend(v for v in node if isinstance(v, (dict, list)))
    return count


def check_header_room(count: int, size: int) -> None:
    """`count` header lines of `size` bytes (names and values, pseudo-headers included, as
    Envoy counts them)."""
    if size > MAX_HEADER_BYTES or count > MAX_HEADER_COUNT:
        raise GatewayError("request_headers_too_large", f"Request headers may take at most {MAX_HEADER_BYTES} bytes "
                           f"in {MAX_HEADER_COUNT} lines here (the path and query string count); this request "
                           f"has {size} bytes in {count} lines.")


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise GatewayError("invalid_request", message, param)


def _check_common(body: dict[str, Any]) -> None:
    _require(isinstance(body.get("model"), str) and body["model"] != "", "model",
             "`model` is required and must be a string.")


def _positive_int(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    _require(value is None or (type(value) is int and value > 0), name, f"`{name}` must be a positive integer.")


def _validate_chat(body: dict[str, Any]) -> None:
    _check_common(body)
    messages = body.get("messages")
    _require(isinstance(messages, list) and len(messages) > 0, "messages",
             "`messages` is required and must be a non-empty array.")
    for i, m in enumerate(messages):
        _require(isinstance(m, dict) and isinstance(m.get("role"), str), f"messages[{i}]",
                 f"`messages[{i}]` must be an object with a string `role`.")
        content = m.get("content")
        _require(content is None or isinstance(content, (str, list)), f"messages[{i}].content",
                 f"`messages[{i}].content` must be a string or an array of parts.")
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


def _validate_responses(body: dict[str, Any]) -> None:
    _check_common(body)
    value = body.get("input")
    _require(isinstance(value, str) or (isinstance(value, list) and len(value) > 0), "input",
             "`input` is required: a string or a non-empty array of input items.")
    _require(body.get("instructions") is None or isinstance(body["instructions"], str), "instructions",
             "`instructions` must be a string.")
    _require(body.get("stream") is None or isinstance(body["stream"], bool), "stream",
             "`stream` must be a boolean (or null).")
    _positive_int(body, "max_output_tokens")


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


# Responses fields that make the provider add input it stores (an earlier response's whole
# conversation, a Conversations object, a stored prompt template).
_PROVIDER_STATE = ("previous_response_id", "conversation", "prompt")
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
        return held
    if endpoint is CHAT and body.get("web_search_options") is not None:  # (search models: fetched pages)
        return "web_search_options"
    return None


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
BY_NAME = {e.name: e for e in FORWARDED.values()}
