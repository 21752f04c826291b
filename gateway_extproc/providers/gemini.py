"""Google Gemini (Gemini API and Vertex AI): OpenAI chat completions to generateContent /
streamGenerateContent and back. Both services share the request and response schema; they
differ only in the base URL and in how the credential is sent (`auth` option)."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..errors import GatewayError, quoted
from .base import (DONE, JSON, Outbound, SseReader, StreamBroken, Target, append_turn, arguments_object, call_id,
                   chosen_function,
                   completion_chunk, delta_choice, error_event, finish_with_calls, openai_error, openai_usage,
                   output_cap, split_call_id, token_count)

TRANSLATES_RESPONSE = True

# Gemini finishReason -> OpenAI finish_reason; anything else (OTHER, LANGUAGE,
# MALFORMED_FUNCTION_CALL, ...) ends the turn without a better OpenAI word, so "stop".
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
           "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
           "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
           "IMAGE_SAFETY": "content_filter"}
# OpenAI sampling parameter -> generationConfig field, copied as is when present.
_GENERATION = {"temperature": "temperature", "top_p": "topP", "n": "candidateCount",
               "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty",
               "seed": "seed"}
_TOOL_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
# Anthropic's thinking types without a budget as Gemini's thinkingBudget: 0 turns thinking
# off, -1 lets the model choose (dynamic thinking).
_THINKING_BUDGET = {"disabled": 0, "adaptive": -1}
# fileData needs a MIME type and an http(s) URL rarely carries one; the extension is the
# best hint, and JPEG the most likely image when there is none.
_MIME_BY_EXTENSION = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
                      "webp": "image/webp", "gif": "image/gif", "heic": "image/heic",
                      "heif": "image/heif", "pdf": "application/pdf"}


# --- request -----------------------------------------------------------------------------

def request(target: Target, suffix: str, body: JSON, stream: bool) -> Outbound:
    if suffix != "/chat/completions":
        raise GatewayError("unsupported_endpoint",
                           f"Gemini backends serve only /v1/chat/completions, not /v1{suffix}")
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    headers = {"content-type": "application/json"}
    remove: tuple[str, ...] = ()
    if target.options.get("auth", "apiKey") == "bearer":  # Vertex AI: an OAuth access token
        headers["authorization"] = f"Bearer {target.credential}"
    else:
        headers["x-goog-api-key"] = target.credential
        remove = ("authorization",)
    return Outbound(path=f"{target.base_path}/models/{target.model}:{method}", headers=headers,
                    body=orjson.dumps(generate_content_request(body)), remove=remove)


def generate_content_request(body: JSON) -> JSON:
    """An OpenAI chat completion request as a GenerateContentRequest."""
    system, contents = _contents(body.get("messages") or [])
    out: JSON = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config = _generation_config(body)
    if config:
        out["generationConfig"] = config
    if body.get("tools"):
        out["tools"] = [{"functionDeclarations": [_declaration(t) for t in body["tools"]]}]
    if body.get("tool_choice") is not None:
        out["toolConfig"] = {"functionCallingConfig": _calling_config(body["tool_choice"])}
    return out


def _invalid(message: str) -> GatewayError:
    return GatewayError("invalid_request", message, param="messages")


def _contents(messages: list[JSON]) -> tuple[list[JSON], list[JSON]]:
    """(systemInstruction parts, contents). Gemini has two roles, so tool results become
    user turns, and consecutive turns of one role merge (Gemini wants them alternating)."""
    system: list[JSON] = []
    contents: list[JSON] = []
    # tool_call id -> function name: a functionResponse names the function, not the call.
    # Ids may repeat across turns ("call_0"); the latest call with an id is the one answered.
    names: dict[str, str] = {}
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend({"text": text} for text in _texts(message.get("content")))
            continue
        if role == "tool":
            name = names.get(message.get("tool_call_id", ""))
            if name is None:
                raise _invalid("a tool message answers a tool_call_id no assistant message made")
            result = _tool_result(message.get("content"))
            # A failed call: Gemini reads a response's `error` key as the call's error details.
            answer: JSON = {"name": name, "response": {"error": result} if message.get("is_error") else result}
            role, parts = "user", [{"functionResponse": _with_id(answer, message.get("tool_call_id"))}]
        elif role == "assistant":
            role, parts = "model", _parts(message.get("content"))
            for call in message.get("tool_calls") or []:
                names[call["id"]] = call["function"]["name"]
                parts.append(_function_call_part(call))
        elif role == "user":
            parts = _parts(message.get("content"))
        else:
            raise _invalid(f"message role {quoted(role)} is not supported by Gemini backends")
        if not parts:
            continue
        append_turn(contents, role, "parts", parts)
    return system, contents


def _function_call_part(call: JSON) -> JSON:
    """An assistant tool call as the functionCall part Gemini sent, with its id and its
    thought signature (Gemini 3 refuses the turn without it) taken back out of the
    OpenAI tool-call id (base.call_id)."""
    part: JSON = {"functionCall": _with_id({"name": call["function"]["name"],
                                            "args": _arguments(call["function"].get("arguments"))}, call["id"])}
    signature = split_call_id(call["id"])[1]
    if signature is not None:
        part["thoughtSignature"] = signature
    return part


# The ids the gateway makes up for calls Gemini sent without one (and older releases'
# "call_0", "call_1"...): Gemini never saw them, so they are not sent back as ids.
_OWN_CALL_ID = re.compile(r"call_(?:[0-9a-f]{24}|\d+)")


def _with_id(obj: JSON, tool_call_id: Any) -> JSON:
    """A functionCall / functionResponse with the provider's call id, when there is one:
    Vertex and the Gemini API match a response to its call by it."""
    base = split_call_id(tool_call_id)[0]
    if base and not _OWN_CALL_ID.fullmatch(base):
        obj["id"] = base
    return obj


def _texts(content: Any) -> list[str]:
    """The text of a system, developer or tool message (a string or text parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content if part.get("type") == "text"]


def _parts(content: Any) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}]
    parts: list[JSON] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_image(part["image_url"]["url"]))
        else:
            raise _invalid(f"content part type {quoted(kind)} is not supported by Gemini backends")
    return parts


def _image(url: str) -> JSON:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise _invalid("image data URLs must be base64-encoded")
        return {"inlineData": {"mimeType": header[5:].split(";")[0], "data": data}}
    # Vertex AI fetches gs:// and http(s) URIs; the Gemini API only its own Files API and
    # YouTube URIs, and answers anything else with a 400 the client then sees.
    extension = urlsplit(url).path.rpartition(".")[2].lower()
    return {"fileData": {"mimeType": _MIME_BY_EXTENSION.get(extension, "image/jpeg"), "fileUri": url}}


def _arguments(raw: Any) -> JSON:
    """Gemini wants the object: a call whose arguments are not one is refused."""
    args = arguments_object(raw)
    if args is None:
        raise _invalid("tool_calls arguments must be a JSON object")
    return args


def _tool_result(content: Any) -> JSON:
    """functionResponse.response must be an object: a JSON object result is passed as is,
    anything else (plain text, a JSON array or number) is wrapped as {"content": text}."""
    text = "".join(_texts(content))
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"content": text}


def _generation_config(body: JSON) -> JSON:
    config: JSON = {gemini: body[name] for name, gemini in _GENERATION.items()
                    if body.get(name) is not None}
    max_tokens = output_cap(body)
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    if body.get("top_k") is not None:
        config["topK"] = body["top_k"]
    thinking = body.get("thinking")
    if thinking is not None:
        # Anthropic's config (the pivot's extension) as Gemini's budget. Its thoughts stay
        # hidden (as Gemini's answers are read: `_visible_parts`): unsigned, they could not
        # come back on the next turn as the thinking blocks a client would take them for.
        config["thinkingConfig"] = {"thinkingBudget": _THINKING_BUDGET.get(thinking["type"],
                                                                           thinking.get("budget_tokens"))}
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    # json_object is Gemini's JSON mode. json_schema also sends its schema as
    # responseJsonSchema (standard JSON Schema, unlike the OpenAPI-subset responseSchema,
    # so OpenAI clients' strict schemas with additionalProperties pass unchanged).
    fmt = body.get("response_format") or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    if fmt.get("type") == "json_schema" and "schema" in fmt.get("json_schema", {}):
        config["responseJsonSchema"] = fmt["json_schema"]["schema"]
    return config


def _declaration(tool: JSON) -> JSON:
    if tool.get("type") != "function":
        raise GatewayError("invalid_request", f"tool type {quoted(tool.get('type'))} is not supported by "
                           "Gemini backends", param="tools")
    function = tool["function"]
    out: JSON = {key: function[key] for key in ("name", "description") if function.get(key)}
    parameters = function.get("parameters")
    if isinstance(parameters, dict):
        schema = gemini_schema(parameters)
        # Gemini refuses an OBJECT with no properties: a function without parameters
        # is declared without `parameters`.
        if schema.get("properties") or schema.get("type") not in (None, "object"):
            out["parameters"] = schema
    return out


# The OpenAPI-3.0 subset Gemini's `Schema` accepts (FunctionDeclaration.parameters), by
# the JSON type each keyword's value must have; any other keyword (additionalProperties,
# strict, $schema, $defs, examples, ...) is a 400 "Unknown name" there. `type`,
# `properties`, `items`, `anyOf`, `enum`, `format` and `required` are handled apart.
_SCHEMA_VALUES: dict[str, type | tuple[type, ...]] = {
    "title": str, "description": str, "pattern": str, "nullable": bool,
    "minimum": (int, float), "maximum": (int, float), "minItems": int, "maxItems": int, "minLength": int,
    "maxLength": int, "minProperties": int, "maxProperties": int, "example": object, "default": object,
    "propertyOrdering": list}
_SCHEMA_KEYS = frozenset(_SCHEMA_VALUES) | {"type", "format", "enum", "properties", "required", "anyOf", "items"}
_SCHEMA_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object"})
# Gemini documents these formats only (and 400s on others such as "uri" or "email").
_FORMATS = {"string": {"enum", "date-time"}, "number": {"float", "double"}, "integer": {"int32", "int64"}}
_MAX_SCHEMA_DEPTH = 32


def gemini_schema(schema: JSON) -> JSON:
    """A JSON Schema (what OpenAI clients send, strict mode included) as the Schema subset
    Gemini accepts: `$ref`s inlined from `$defs`/`definitions` (a recursive one ends as a
    plain object), `type: [T, "null"]` as `nullable`, `const` as a one-value `enum`,
    `oneOf` as `anyOf`, a one-entry `allOf` merged, unknown keywords, formats and values
    of the wrong type dropped, `required` limited to declared properties."""
    defs: JSON = {}
    for key in ("definitions", "$defs"):
        if isinstance(schema.get(key), dict):
            defs.update({k: v for k, v in schema[key].items() if isinstance(v, dict)})
    return _schema(schema, defs, frozenset(), 0)


def _schema(node: Any, defs: JSON, seen: frozenset[str], depth: int) -> JSON:
    if not isinstance(node, dict) or depth > _MAX_SCHEMA_DEPTH:
        return {}
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.rpartition("/")[2]
        if name in seen or name not in defs:
            return {"type": "object"}
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return _schema(merged, defs, seen | {name}, depth + 1)
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], dict):
        return _schema({**{k: v for k, v in node.items() if k != "allOf"}, **all_of[0]}, defs, seen, depth + 1)
    out: JSON = {}
    kinds = node.get("type")
    kinds = [k for k in (kinds if isinstance(kinds, list) else [kinds]) if isinstance(k, str)]
    if "null" in kinds:
        out["nullable"] = True
    known = [k for k in kinds if k in _SCHEMA_TYPES]
    if len(known) == 1:
        out["type"] = known[0]
    elif known:
        out["anyOf"] = [_schema({**node, "type": k}, defs, seen, depth + 1) for k in known]
    for key, wanted in _SCHEMA_VALUES.items():
        value = node.get(key)
        if key in node and isinstance(value, wanted) and not (wanted is int and isinstance(value, bool)):
            out[key] = value
    if isinstance(out.get("propertyOrdering"), list):
        out["propertyOrdering"] = [p for p in out["propertyOrdering"] if isinstance(p, str)]
    enum = [node["const"]] if "const" in node else node.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        out["enum"] = enum  # Gemini's enums are strings; others are dropped
        out.setdefault("type", "string")
    if isinstance(node.get("format"), str) and node["format"] in _FORMATS.get(out.get("type", ""), ()):
        out["format"] = node["format"]
    if isinstance(node.get("properties"), dict):
        out["properties"] = {str(name): _schema(sub, defs, seen, depth + 1)
                             for name, sub in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = _schema(node["items"], defs, seen, depth + 1)
    alternatives = node.get("anyOf", node.get("oneOf"))
    if isinstance(alternatives, list) and "anyOf" not in out:
        subs = [_schema(sub, defs, seen, depth + 1) for sub in alternatives if isinstance(sub, dict)]
        if subs:
            out["anyOf"] = subs
    required = node.get("required")
    if isinstance(required, list):
        names = [n for n in required if isinstance(n, str) and n in (out.get("properties") or {})]
        if names:
            out["required"] = names
    return out


def _calling_config(choice: Any) -> JSON:
    if isinstance(choice, str):
        if choice not in _TOOL_MODES:
            raise GatewayError("invalid_request", f"tool_choice {quoted(choice)} is not supported",
                               param="tool_choice")
        return {"mode": _TOOL_MODES[choice]}
    return {"mode": "ANY", "allowedFunctionNames": [chosen_function(choice, "Gemini")]}


# --- response ----------------------------------------------------------------------------

def response(status: int, raw: bytes, model: str) -> bytes:
    """2xx bodies must be JSON (orjson raises otherwise: the caller's 502); error bodies
    may be anything, Google's `{"error": {code, message, status}}` or a proxy's page."""
    if 200 <= status < 300:
        return orjson.dumps(chat_completion(orjson.loads(raw), model))
    return openai_error(status, _error_message(raw))


def _error_message(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    if isinstance(doc, list) and doc:  # Vertex AI sometimes wraps the error in a list
        doc = doc[0]
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return raw.decode("utf-8", "replace")


def chat_completion(doc: JSON, model: str) -> JSON:
    """A GenerateContentResponse as an OpenAI chat.completion."""
    candidates = doc.get("candidates") or []
    choices = [_choice(c, c.get("index", i)) for i, c in enumerate(candidates)]
    if not choices:  # Gemini leaves candidates out only when it blocked the prompt
        choices = [{"index": 0, "message": {"role": "assistant", "content": None},
                    "finish_reason": "content_filter"}]
    out: JSON = {"id": _completion_id(doc), "object": "chat.completion", "created": int(time.time()),
                 "model": doc.get("modelVersion") or model, "choices": choices}
    if "usageMetadata" in doc and (counted := usage(doc["usageMetadata"])) is not None:
        out["usage"] = counted  # else left out: the router charges the reservation
    return out


def _completion_id(doc: JSON) -> str:
    return "chatcmpl-" + (doc.get("responseId") or secrets.token_hex(12))


def _new_call_id() -> str:
    """An id for a call Gemini sent without one (the Gemini API usually does)."""
    return "call_" + secrets.token_hex(12)


class _Calls:
    """Gemini function calls (of one candidate) as OpenAI tool calls, each complete.

    A call comes whole in one part (`name` + `args`), or, when Vertex streams arguments
    (`streamFunctionCallArguments`), in pieces: a part with `name` and `willContinue:
    true`, parts without a name whose `partialArgs` set or extend values at JSON paths,
    and a last part without `willContinue` (often an empty `functionCall: {}`). Pieces
    are assembled and the call goes out once complete, in one chunk: OpenAI's
    arguments are one JSON text, which path-addressed pieces cannot be streamed as. The
    id is Gemini's own `functionCall.id` when it sent one; a part's `thoughtSignature`
    rides in the id (base.call_id)."""

    __slots__ = ("count", "_open")

    def __init__(self) -> None:
        self.count = 0  # calls emitted so far: the next OpenAI tool call index
        self._open: JSON | None = None  # the call being assembled

    def part(self, part: JSON) -> list[JSON]:
        """Calls completed by one part holding a functionCall."""
        call = part["functionCall"] if isinstance(part["functionCall"], dict) else {}
        if call.get("name") is not None and not isinstance(call["name"], str):
            # (taken for an end marker, the call was dropped and the answer ended `stop`)
            raise ValueError("a functionCall whose name is no string")
        out: list[JSON] = []
        if self._open is not None and not call.get("name"):
            self._extend(self._open, call, part)
            if not call.get("willContinue"):
                out += self.close()
            return out
        out += self.close()
        if not call.get("name"):
            return out  # the end marker of a call already complete
        self._open = {"name": call["name"], "id": call.get("id"), "signature": part.get("thoughtSignature"),
                      "args": dict(call["args"]) if isinstance(call.get("args"), dict) else {}, "texts": []}
        self._extend(self._open, call, part)
        if not call.get("willContinue"):
            out += self.close()
        return out

    def close(self) -> list[JSON]:
        """The call being assembled, if any, as a finished OpenAI tool call."""
        if self._open is None:
            return []
        call, self._open = self._open, None
        self.count += 1
        arguments = orjson.dumps(_joined(call["args"], call["texts"])).decode()
        return [{"index": self.count - 1, "id": call_id(call["id"] or _new_call_id(), call["signature"]),
                 "type": "function", "function": {"name": call["name"], "arguments": arguments}}]

    @staticmethod
    def _extend(open_call: JSON, call: JSON, part: JSON) -> None:
        open_call["id"] = open_call["id"] or call.get("id")
        open_call["signature"] = open_call["signature"] or part.get("thoughtSignature")
        for piece in call.get("partialArgs") or []:
            _set_path(open_call["args"], piece, open_call["texts"])


_PATH_STEP = re.compile(r"""\.([A-Za-z_$][\w$-]*)|\[(\d+)\]|\[(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")\]""")


class _Text:
    """A streamed string's pieces (`_set_path`), joined once when its call closes: joined at
    each piece, a string of n pieces cost n² copies (80,000 pieces in one 10 MB event: 4 s)."""

    __slots__ = ("pieces",)

    def __init__(self, *pieces: str) -> None:
        self.pieces = list(pieces)


def _set_path(args: JSON, piece: Any, texts: list[tuple[Any, Any]]) -> None:
    """Applies one PartialArg: the value at its RFC 9535 path (`$.a.b[0]`, `$['a b']`),
    appended to the string already there when an earlier piece of the same path said
    `willContinue` (a `_Text`, whose place goes into `texts`). A piece with a path this cannot
    read is dropped. An array index past the array's end raises: pieces fill an array in order,
    and `$.a[1000000000]` in a 290-byte event padded a list to that length (gigabytes)."""
    if not isinstance(piece, dict) or not isinstance(piece.get("jsonPath"), str):
        return
    path = piece["jsonPath"]
    steps: list[str | int] = []
    at = 1 if path.startswith("$") else len(path) + 1
    while at < len(path):
        found = _PATH_STEP.match(path, at)
        if found is None:
            return
        name, number, quoted, double = found.groups()
        steps.append(int(number) if number is not None else next(v for v in (name, quoted, double) if v is not None))
        at = found.end()
    if not steps:
        return
    if "stringValue" in piece:
        value: Any = piece["stringValue"]
    elif "numberValue" in piece:
        value = piece["numberValue"]
    elif "boolValue" in piece:
        value = piece["boolValue"]
    else:
        value = None
    node: Any = args
    for step, following in zip(steps, steps[1:]):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(step, int) and isinstance(node, list):
            _reach(node, step)
            node[step] = node[step] if isinstance(node[step], (dict, list)) else empty
        elif isinstance(step, str) and isinstance(node, dict):
            node[step] = node[step] if isinstance(node.get(step), (dict, list)) else empty
        else:
            return
        node = node[step]
    last = steps[-1]
    if isinstance(last, int) and isinstance(node, list):
        _reach(node, last)
    elif not (isinstance(last, str) and isinstance(node, dict)):
        return
    previous = node[last] if isinstance(node, list) else node.get(last)
    if isinstance(value, str):
        if isinstance(previous, _Text):
            previous.pieces.append(value)  # the continuation of a streamed string
            return
        value = _Text(previous, value) if isinstance(previous, str) else _Text(value)
        texts.append((node, last))
    node[last] = value


def _reach(array: list[Any], index: int) -> None:
    """`array` long enough for `index`, which may be at most its end (the next element)."""
    if index > len(array):
        raise ValueError("a partialArgs index past the end of its array")
    if index == len(array):
        array.append(None)


def _joined(args: JSON, texts: list[tuple[Any, Any]]) -> JSON:
    """`args` with each streamed string (`_Text`) joined."""
    for node, key in texts:
        if isinstance(node[key], _Text):
            node[key] = "".join(node[key].pieces)
    return args


def _visible_parts(candidate: JSON, calls: _Calls) -> tuple[str | None, list[JSON]]:
    """(text, OpenAI tool calls completed) of a candidate's parts; thought summaries are
    not the answer."""
    texts: list[str] = []
    done: list[JSON] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if not isinstance(part, dict) or part.get("thought"):
            continue
        if "functionCall" in part:
            done += calls.part(part)
        elif part.get("text"):
            texts.append(part["text"])
    return ("".join(texts) if texts else None), done


def _finish(reason: str, called: bool) -> str:
    return finish_with_calls(_FINISH.get(reason, "stop"), called)


def _choice(candidate: JSON, index: int) -> JSON:
    calls = _Calls()
    text, done = _visible_parts(candidate, calls)
    done += calls.close()
    message: JSON = {"role": "assistant", "content": text}
    if done:
        message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in done]
    return {"index": index, "message": message,
            "finish_reason": _finish(candidate.get("finishReason", "STOP"), bool(done))}


def usage(meta: Any) -> JSON | None:
    """usageMetadata as OpenAI usage, with total = prompt + completion. The prompt Gemini
    prices includes the tool-use prompt (`toolUsePromptTokenCount`: results of its own
    tools fed back, e.g. search); thinking tokens are billed as output, so they count as
    completion tokens (itemised as reasoning tokens, as OpenAI does). Cached tokens are a
    share of `promptTokenCount` already. Gemini leaves out counts that are 0, but every
    request has a prompt: a block without `promptTokenCount`, or with a count that is no
    non-negative integer, is no bill (unknown, not 0: token_count)."""
    meta = meta if isinstance(meta, dict) else {}
    thoughts = meta.get("thoughtsTokenCount")
    prompt = token_count((meta.get("promptTokenCount"),), (meta.get("toolUsePromptTokenCount"),))
    completion = None if prompt is None else token_count((), (meta.get("candidatesTokenCount"), thoughts))
    total = token_count((meta.get("totalTokenCount"),))
    if completion is not None and total is not None and total - prompt > completion:
        # `totalTokenCount` holds more output than the counts name (a block without
        # `candidatesTokenCount` beside 480 tokens of text was charged 0 output until 2026-12-08).
        completion = total - prompt
    out = openai_usage(prompt, completion)
    if out is None:
        return None
    cached = token_count((meta.get("cachedContentTokenCount"),))
    if cached is not None and cached <= out["prompt_tokens"]:  # (a share of the prompt; else not shown)
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts:
        out["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return out


# --- stream ------------------------------------------------------------------------------

class GeminiStream:
    """streamGenerateContent?alt=sse events in, OpenAI chunks out. Each Gemini event is a
    whole GenerateContentResponse holding only the new parts; usageMetadata is cumulative,
    so the last one seen is the stream's usage."""

    __slots__ = ("_reader", "_model", "_id", "_created", "_started", "_calls", "_finished", "_usage", "_done",
                 "usage_unknown")

    def __init__(self, model: str) -> None:
        self._reader = SseReader()
        self._model = model
        self._id = ""
        self._created = int(time.time())
        self._started: set[int] = set()  # choices whose role was sent
        self._calls: dict[int, _Calls] = {}  # choice -> its function calls
        self._finished = False
        self._usage: JSON | None = None
        self._done = False  # an error event went out: nothing more is forwarded
        self.usage_unknown = False

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """An event that does not parse, or not of the documented shape, raises
        StreamBroken: base.GuardedStream then ends the stream with an error event
        rather than forwarding junk."""
        out: list[bytes] = []
        try:
            for data in self._reader.feed(chunk, False):
                out.append(self._event(data))
            if end:
                out.extend(self._tail(data) for data in self._reader.feed(b"", True))
        except Exception as err:
            raise StreamBroken(b"".join(out)) from err
        if end:
            if self._finished and not self._done:
                out.extend(self._close(index) for index in sorted(self._calls))
                # Without a readable usageMetadata the bill is unknown (no usage chunk: the
                # reservation), not ~one token per event (a Gemini event carries many).
                counted = usage(self._usage)
                self.usage_unknown = counted is None
                if counted is not None:
                    out.append(completion_chunk(self._id, self._created, self._model, [], counted))
                out.append(DONE)
        return b"".join(out)

    def _tail(self, data: bytes) -> bytes:
        """A last event without its blank line: complete if it parses, else cut off."""
        try:
            return self._event(data)
        except orjson.JSONDecodeError:
            return b""

    def _event(self, data: bytes) -> bytes:
        """A complete event's data."""
        if self._done:  # after an error event even an unreadable event is not read
            return b""
        doc = orjson.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("Gemini stream event is not a JSON object")
        if "error" in doc:
            self._done = True
            error = doc["error"] if isinstance(doc["error"], dict) else {}
            code, message = error.get("code"), error.get("message")
            # OpenAI's error `message` is a string (the SDKs raise with it): a list or an object
            # there went out as sent.
            return error_event(code if isinstance(code, int) and 400 <= code < 600 else 500,
                               message if isinstance(message, str) and message else "Gemini stream error")
        if not self._id:
            self._id = _completion_id(doc)
            self._model = doc.get("modelVersion") or self._model
        if "usageMetadata" in doc:
            self._usage = _cumulative(self._usage, doc["usageMetadata"])
        candidates = doc.get("candidates") or []
        if not candidates and (doc.get("promptFeedback") or {}).get("blockReason"):
            self._finished = True
            return self._chunk(0, {}, "content_filter")
        out = b"".join(self._candidate(c, c.get("index", i)) for i, c in enumerate(candidates))
        if out and "usageMetadata" not in doc:
            # Output after the last usageMetadata: that was a count so far, not the bill (a stream
            # with usage on its first event only was charged 1 output token for 2,000 words).
            self._usage = None
        return out

    def _candidate(self, candidate: JSON, index: int) -> bytes:
        calls = self._calls.setdefault(index, _Calls())
        text, done = _visible_parts(candidate, calls)
        if "finishReason" in candidate:
            done += calls.close()
        delta: JSON = {}
        if text is not None:
            delta["content"] = text
        if done:
            delta["tool_calls"] = done
        out = self._chunk(index, delta) if delta else b""
        if "finishReason" in candidate:
            self._finished = True
            out += self._chunk(index, {}, _finish(candidate["finishReason"], calls.count > 0))
        return out

    def _close(self, index: int) -> bytes:
        """A call still being assembled when the stream ended."""
        done = self._calls[index].close()
        return self._chunk(index, {"tool_calls": done}) if done else b""

    def _chunk(self, index: int, delta: JSON, finish_reason: str | None = None) -> bytes:
        if index not in self._started:  # the role rides on a choice's first chunk
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        return completion_chunk(self._id, self._created, self._model, [delta_choice(delta, finish_reason, index)])


def _cumulative(before: JSON | None, meta: Any) -> Any:
    """A stream's usageMetadata after `meta`: counts so far, so a later block without a count
    (Gemini leaves out those that are 0) keeps the one before it, and a smaller output count
    lowers nothing (480 and then 2 was charged 2 until 2026-12-08)."""
    if not isinstance(meta, dict) or not before:
        return meta
    out = {**before, **meta}
    for name in ("candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount"):
        old, new = before.get(name), meta.get(name)
        if type(old) is int and type(new) is int and 0 <= new < old:  # (a negative stays: no bill)
            out[name] = old
    return out


def stream(model: str) -> GeminiStream:
    return GeminiStream(model)
