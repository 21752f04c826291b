"""Google Gemini (Gemini API and Vertex AI): OpenAI chat completions to generateContent /
streamGenerateContent and back. Both services share the request and response schema; they
differ only in the base URL and in how the credential is sent (`auth` option)."""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..errors import GatewayError
from .base import (DONE, JSON, Outbound, SseReader, Target, append_turn, arguments_object, completion_chunk,
                   delta_choice, error_event, openai_error)

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
                raise _invalid(f"tool message answers unknown tool_call_id {message.get('tool_call_id')!r}")
            role, parts = "user", [{"functionResponse": {"name": name,
                                                         "response": _tool_result(message.get("content"))}}]
        elif role == "assistant":
            role, parts = "model", _parts(message.get("content"))
            for call in message.get("tool_calls") or []:
                names[call["id"]] = call["function"]["name"]
                parts.append({"functionCall": {"name": call["function"]["name"],
                                               "args": _arguments(call["function"].get("arguments"))}})
        elif role == "user":
            parts = _parts(message.get("content"))
        else:
            raise _invalid(f"message role {role!r} is not supported by Gemini backends")
        if not parts:
            continue
        append_turn(contents, role, "parts", parts)
    return system, contents


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
            raise _invalid(f"content part type {kind!r} is not supported by Gemini backends")
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
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
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
        raise GatewayError("invalid_request", f"tool type {tool.get('type')!r} is not supported by "
                           "Gemini backends", param="tools")
    function = tool["function"]
    return {key: function[key] for key in ("name", "description", "parameters") if key in function}


def _calling_config(choice: Any) -> JSON:
    if isinstance(choice, str):
        if choice not in _TOOL_MODES:
            raise GatewayError("invalid_request", f"tool_choice {choice!r} is not supported",
                               param="tool_choice")
        return {"mode": _TOOL_MODES[choice]}
    return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}


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
    if "usageMetadata" in doc:
        out["usage"] = usage(doc["usageMetadata"])
    return out


def _completion_id(doc: JSON) -> str:
    return "chatcmpl-" + (doc.get("responseId") or secrets.token_hex(12))


def _visible_parts(candidate: JSON) -> tuple[str | None, list[JSON]]:
    """(text, functionCall objects) of a candidate; thought summaries are not the answer."""
    texts: list[str] = []
    calls: list[JSON] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue
        if "functionCall" in part:
            calls.append(part["functionCall"])
        elif part.get("text"):
            texts.append(part["text"])
    return ("".join(texts) if texts else None), calls


def _tool_call(call: JSON, index: int) -> JSON:
    return {"id": f"call_{index}", "type": "function",
            "function": {"name": call["name"], "arguments": orjson.dumps(call.get("args") or {}).decode()}}


def _finish(reason: str, called: bool) -> str:
    return "tool_calls" if called else _FINISH.get(reason, "stop")


def _choice(candidate: JSON, index: int) -> JSON:
    text, calls = _visible_parts(candidate)
    message: JSON = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [_tool_call(call, k) for k, call in enumerate(calls)]
    return {"index": index, "message": message,
            "finish_reason": _finish(candidate.get("finishReason", "STOP"), bool(calls))}


def usage(meta: JSON) -> JSON:
    """usageMetadata as OpenAI usage. Thinking tokens are billed as output, so they count
    as completion tokens (and are itemised as reasoning tokens, as OpenAI does)."""
    thoughts = meta.get("thoughtsTokenCount", 0)
    prompt = meta.get("promptTokenCount", 0)
    completion = meta.get("candidatesTokenCount", 0) + thoughts
    out: JSON = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": meta.get("totalTokenCount", prompt + completion)}
    if "cachedContentTokenCount" in meta:
        out["prompt_tokens_details"] = {"cached_tokens": meta["cachedContentTokenCount"]}
    if thoughts:
        out["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return out


# --- stream ------------------------------------------------------------------------------

class GeminiStream:
    """streamGenerateContent?alt=sse events in, OpenAI chunks out. Each Gemini event is a
    whole GenerateContentResponse holding only the new parts; usageMetadata is cumulative,
    so the last one seen is the stream's usage."""

    __slots__ = ("_reader", "_model", "_id", "_created", "_started", "_calls", "_finished", "_usage")

    def __init__(self, model: str) -> None:
        self._reader = SseReader()
        self._model = model
        self._id = ""
        self._created = int(time.time())
        self._started: set[int] = set()  # choices whose role was sent
        self._calls: dict[int, int] = {}  # choice -> tool calls sent so far
        self._finished = False
        self._usage: JSON | None = None

    def feed(self, chunk: bytes, end: bool) -> bytes:
        out = [self._event(data) for data in self._reader.feed(chunk, False)]
        if end:
            out.extend(self._tail(data) for data in self._reader.feed(b"", True))
            if self._finished:
                if self._usage is not None:
                    out.append(completion_chunk(self._id, self._created, self._model, [], usage(self._usage)))
                out.append(DONE)
        return b"".join(out)

    def _tail(self, data: bytes) -> bytes:
        """A last event without its blank line: complete if it parses, else cut off."""
        try:
            return self._event(data)
        except orjson.JSONDecodeError:
            return b""

    def _event(self, data: bytes) -> bytes:
        """A complete event's data. JSON that does not parse raises: the upstream processor
        then ends the stream with an error event rather than forwarding junk."""
        doc = orjson.loads(data)
        if "error" in doc:
            error = doc["error"]
            return error_event(error.get("code", 500), error.get("message", "Gemini stream error"))
        if not self._id:
            self._id = _completion_id(doc)
            self._model = doc.get("modelVersion") or self._model
        if "usageMetadata" in doc:
            self._usage = doc["usageMetadata"]
        candidates = doc.get("candidates") or []
        if not candidates and doc.get("promptFeedback", {}).get("blockReason"):
            self._finished = True
            return self._chunk(0, {}, "content_filter")
        return b"".join(self._candidate(c, c.get("index", i)) for i, c in enumerate(candidates))

    def _candidate(self, candidate: JSON, index: int) -> bytes:
        text, calls = _visible_parts(candidate)
        delta: JSON = {}
        if text is not None:
            delta["content"] = text
        if calls:
            sent = self._calls.get(index, 0)
            delta["tool_calls"] = [{"index": sent + k, **_tool_call(call, sent + k)}
                                   for k, call in enumerate(calls)]
            self._calls[index] = sent + len(calls)
        out = self._chunk(index, delta) if delta else b""
        if "finishReason" in candidate:
            self._finished = True
            out += self._chunk(index, {}, _finish(candidate["finishReason"], index in self._calls))
        return out

    def _chunk(self, index: int, delta: JSON, finish_reason: str | None = None) -> bytes:
        if index not in self._started:  # the role rides on a choice's first chunk
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        return completion_chunk(self._id, self._created, self._model, [delta_choice(delta, finish_reason, index)])


def stream(model: str) -> GeminiStream:
    return GeminiStream(model)
