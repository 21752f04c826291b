"""Golden tests for the Gemini translator, built on the shapes Google documents for
generateContent / streamGenerateContent (system instructions, function calling, SSE
streaming, errors). Outputs are checked exactly and validated with the OpenAI SDK's types."""

from __future__ import annotations

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway_extproc.errors import GatewayError
from gateway_extproc.providers import gemini
from gateway_extproc.providers.base import JSON, StreamBroken, Target

GEMINI_API = Target(model="gemini-2.5-flash", base_url="https://generativelanguage.googleapis.com/v1beta",
                    base_path="/v1beta", host="generativelanguage.googleapis.com", credential="AIza-key")
VERTEX_PATH = "/v1/projects/p1/locations/us-central1/publishers/google"
VERTEX = Target(model="gemini-2.5-pro", base_url="https://us-central1-aiplatform.googleapis.com" + VERTEX_PATH,
                base_path=VERTEX_PATH,
                host="us-central1-aiplatform.googleapis.com", credential="ya29.token", options={"auth": "bearer"})

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_current_temperature", "description": "Gets the current temperature for a given location.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "The city name"}},
                   "required": ["location"]}}}


class CallIds:
    """Calls Gemini sends without an id get random ones; numbered here for exact goldens."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self) -> str:
        self.next += 1
        return f"call_{self.next - 1}"


IDS = CallIds()


@pytest.fixture(autouse=True)
def numbered_call_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    IDS.next = 0
    monkeypatch.setattr(gemini, "_new_call_id", IDS)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks carry the stream's `created` second: two streams compared must not straddle one
    (CI failed once when the whole and the byte-by-byte translation did)."""
    monkeypatch.setattr(gemini.time, "time", lambda: 1_796_406_130.5)


def _body(out_body: bytes) -> JSON:
    result: JSON = orjson.loads(out_body)
    return result


# --- request -----------------------------------------------------------------------------

def test_request_paths_and_api_key_auth() -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "Hello there"}]}
    out = gemini.request(GEMINI_API, "/chat/completions", body, False)
    assert out.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert out.headers == {"content-type": "application/json", "x-goog-api-key": "AIza-key"}
    assert out.remove == ("authorization",)
    streaming = gemini.request(GEMINI_API, "/chat/completions", {**body, "stream": True}, True)
    assert streaming.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


def test_request_vertex_bearer_auth() -> None:
    out = gemini.request(VERTEX, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, True)
    assert out.path == ("/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro"
                        ":streamGenerateContent?alt=sse")
    assert out.headers == {"content-type": "application/json", "authorization": "Bearer ya29.token"}
    assert out.remove == ()


@pytest.mark.parametrize("suffix", ["/embeddings", "/responses"])
def test_request_refuses_other_endpoints(suffix: str) -> None:
    with pytest.raises(GatewayError) as err:
        gemini.request(GEMINI_API, suffix, {"input": "hi"}, False)
    assert err.value.code == "unsupported_endpoint"


def test_request_system_instruction_and_generation_config() -> None:
    # The docs' system-instruction example ("You are a cat. Your name is Neko.") plus the
    # sampling settings an OpenAI client sends.
    body = {"model": "fast", "messages": [
        {"role": "system", "content": "You are a cat."},
        {"role": "developer", "content": [{"type": "text", "text": "Your name is Neko."}]},
        {"role": "user", "content": "Hello there"}],
        "max_completion_tokens": 800, "max_tokens": 5, "temperature": 1.0, "top_p": 0.8, "stop": "Title",
        "n": 2, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.25, "stream": False}
    assert _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body) == {
        "systemInstruction": {"parts": [{"text": "You are a cat."}, {"text": "Your name is Neko."}]},
        "contents": [{"role": "user", "parts": [{"text": "Hello there"}]}],
        "generationConfig": {"maxOutputTokens": 800, "temperature": 1.0, "topP": 0.8, "stopSequences": ["Title"],
                             "candidateCount": 2, "seed": 7, "presencePenalty": 0.5, "frequencyPenalty": 0.25}}


def test_request_minimal_body_has_no_optional_sections() -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b"], "max_tokens": 5}
    assert _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body) == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 5, "stopSequences": ["a", "b"]}}
    bare = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    assert _body(gemini.request(GEMINI_API, "/chat/completions", bare, False).body) == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_request_images() -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Caption these."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a/cat.webp?size=large", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "gs://bucket/scan.PDF"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/render"}}]}]}
    assert _body(gemini.request(VERTEX, "/chat/completions", body, False).body)["contents"] == [
        {"role": "user", "parts": [
            {"text": "Caption these."},
            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
            {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/a/cat.webp?size=large"}},
            {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://bucket/scan.PDF"}},
            {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/render"}}]}]


def test_request_function_calling_round_trip() -> None:
    # The docs' function-calling conversation: declaration, the model's functionCall, the
    # functionResponse, with a forced call to the named function.
    body = {"model": "fast", "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_current_temperature"}},
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "user", "content": "What's the temperature in London?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_0", "type": "function",
                     "function": {"name": "get_current_temperature", "arguments": '{"location": "London"}'}},
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_current_temperature", "arguments": ""}}]},
                {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 25, "unit": "Celsius"}'},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "unknown city"}]},
                {"role": "assistant", "content": "It is 25°C in London."},
                {"role": "user", "content": "Thanks!"}]}
    assert _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body) == {
        "contents": [
            {"role": "user", "parts": [{"text": "What's the temperature in London?"}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_current_temperature", "args": {"location": "London"}}},
                {"functionCall": {"name": "get_current_temperature", "args": {}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_current_temperature",
                                      "response": {"temperature": 25, "unit": "Celsius"}}},
                {"functionResponse": {"name": "get_current_temperature", "response": {"content": "unknown city"}}}]},
            {"role": "model", "parts": [{"text": "It is 25°C in London."}]},
            {"role": "user", "parts": [{"text": "Thanks!"}]}],
        "generationConfig": {"responseMimeType": "application/json"},
        "tools": [{"functionDeclarations": [{
            "name": "get_current_temperature", "description": "Gets the current temperature for a given location.",
            "parameters": WEATHER_TOOL["function"]["parameters"]}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_current_temperature"]}}}


def test_request_tool_ids_reused_across_turns_answer_the_latest_call() -> None:
    call = {"role": "assistant", "tool_calls": [{"id": "call_0", "type": "function",
                                                 "function": {"name": "first", "arguments": "{}"}}]}
    again = {"role": "assistant", "tool_calls": [{"id": "call_0", "type": "function",
                                                  "function": {"name": "second", "arguments": "{}"}}]}
    body = {"messages": [{"role": "user", "content": "go"},
                         call, {"role": "tool", "tool_call_id": "call_0", "content": "1"},
                         again, {"role": "tool", "tool_call_id": "call_0", "content": "[2]"}]}
    contents = _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body)["contents"]
    assert [c["parts"][0]["functionResponse"] for c in contents[1:] if c["role"] == "user"] == [
        {"name": "first", "response": {"content": "1"}}, {"name": "second", "response": {"content": "[2]"}}]


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}), ("required", {"mode": "ANY"}), ("none", {"mode": "NONE"})])
def test_request_tool_choice_modes(choice: str, config: JSON) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL], "tool_choice": choice}
    assert _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body)["toolConfig"] == {
        "functionCallingConfig": config}


def test_request_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"recipe": {"type": "string"}}, "required": ["recipe"],
              "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "List a recipe"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": schema}}}
    assert _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body)["generationConfig"] == {
        "responseMimeType": "application/json", "responseJsonSchema": schema}


@pytest.mark.parametrize(("messages", "extra", "param"), [
    ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], {}, "messages"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}], {},
     "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}], {},
     "messages"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "[1]"}}]}], {}, "messages"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "{oops"}}]}], {}, "messages"),
    ([{"role": "function", "name": "f", "content": "x"}], {}, "messages"),
    ([{"role": "user", "content": "hi"}], {"tools": [{"type": "web_search_preview"}]}, "tools"),
    ([{"role": "user", "content": "hi"}], {"tool_choice": "sometimes"}, "tool_choice"),
])
def test_request_rejects_what_gemini_cannot_express(messages: list[JSON], extra: JSON, param: str) -> None:
    with pytest.raises(GatewayError) as err:
        gemini.request(GEMINI_API, "/chat/completions", {"messages": messages, **extra}, False)
    assert (err.value.code, err.value.status, err.value.param) == ("invalid_request", 400, param)


# --- response ----------------------------------------------------------------------------

def _completion(doc: JSON, model: str = "gemini-2.5-flash") -> JSON:
    raw = gemini.response(200, orjson.dumps(doc), model)
    ChatCompletion.model_validate_json(raw)
    out: JSON = orjson.loads(raw)
    assert isinstance(out.pop("created"), int)
    return out


def test_response_text() -> None:
    doc = {"candidates": [{"content": {"parts": [{"text": "AI learns patterns from data."}], "role": "model"},
                           "finishReason": "STOP", "avgLogprobs": -0.21}],
           "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 7, "totalTokenCount": 15,
                             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]},
           "modelVersion": "gemini-2.0-flash", "responseId": "mAitZ8ntHuiwmecP5eTKmAE"}
    assert _completion(doc) == {
        "id": "chatcmpl-mAitZ8ntHuiwmecP5eTKmAE", "object": "chat.completion", "model": "gemini-2.0-flash",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "AI learns patterns from data."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15}}


def test_response_function_calls_thoughts_and_cached_usage() -> None:
    doc = {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "Planning the lookup.", "thought": True},
        {"functionCall": {"name": "get_current_temperature", "args": {"location": "London"}},
         "thoughtSignature": "c2ln"},
        {"functionCall": {"name": "get_current_temperature", "args": {"location": "Paris"}}}]},
        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 30, "thoughtsTokenCount": 50,
                          "cachedContentTokenCount": 100, "totalTokenCount": 200}}
    out = _completion(doc, model="gemini-2.5-flash")
    assert out["id"].startswith("chatcmpl-") and len(out["id"]) > len("chatcmpl-")
    del out["id"]
    assert out == {
        "object": "chat.completion", "model": "gemini-2.5-flash",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0__thought__c2ln", "type": "function",
                 "function": {"name": "get_current_temperature", "arguments": '{"location":"London"}'}},
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_current_temperature", "arguments": '{"location":"Paris"}'}}]}}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200,
                  "prompt_tokens_details": {"cached_tokens": 100},
                  "completion_tokens_details": {"reasoning_tokens": 50}}}


@pytest.mark.parametrize(("reason", "finish"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("IMAGE_SAFETY", "content_filter"), ("OTHER", "stop"), ("MALFORMED_FUNCTION_CALL", "stop")])
def test_response_finish_reasons(reason: str, finish: str) -> None:
    doc = {"candidates": [{"content": {"role": "model", "parts": [{"text": "x"}]}, "finishReason": reason}]}
    assert _completion(doc)["choices"][0]["finish_reason"] == finish


def test_response_several_candidates() -> None:
    doc = {"candidates": [{"content": {"role": "model", "parts": [{"text": "One"}, {"text": " fish"}]},
                           "finishReason": "STOP"},
                          {"content": {"role": "model", "parts": [{"text": "Two"}]}, "finishReason": "MAX_TOKENS",
                           "index": 1}]}
    assert _completion(doc)["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "One fish"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "Two"}, "finish_reason": "length"}]


def test_response_blocked_prompt() -> None:
    doc = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
           "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}, "modelVersion": "gemini-2.5-flash",
           "responseId": "r1"}
    assert _completion(doc) == {
        "id": "chatcmpl-r1", "object": "chat.completion", "model": "gemini-2.5-flash",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}}


@pytest.mark.parametrize(("status", "raw", "expected"), [
    (400, {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                     "status": "INVALID_ARGUMENT"}},
     {"message": "API key not valid. Please pass a valid API key.", "type": "invalid_request_error"}),
    (429, {"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                     "status": "RESOURCE_EXHAUSTED"}},
     {"message": "Resource has been exhausted (e.g. check quota).", "type": "rate_limit_error"}),
    (404, [{"error": {"code": 404, "message": "Publisher Model was not found.", "status": "NOT_FOUND"}}],
     {"message": "Publisher Model was not found.", "type": "not_found_error"}),
    (503, "upstream connect error", {"message": "upstream connect error", "type": "server_error"}),
])
def test_response_errors(status: int, raw: object, expected: JSON) -> None:
    body = raw.encode() if isinstance(raw, str) else orjson.dumps(raw)
    assert orjson.loads(gemini.response(status, body, "m")) == {
        "error": {**expected, "code": "provider_error", "param": None}}


# --- stream ------------------------------------------------------------------------------

def _events(*docs: JSON) -> bytes:
    return b"".join(b"data: " + orjson.dumps(d) + b"\r\n\r\n" for d in docs)


def _translate(raw: bytes, model: str = "gemini-2.5-flash") -> list[bytes]:
    """The stream fed in one go and byte by byte must give the same output; returns it
    split into SSE events."""
    IDS.next = 0
    whole = gemini.stream(model).feed(raw, True)
    IDS.next = 0
    s = gemini.stream(model)
    pieces = [s.feed(raw[i:i + 1], False) for i in range(len(raw))]
    assert b"".join(pieces) + s.feed(b"", True) == whole
    return [e + b"\n\n" for e in whole.split(b"\n\n") if e]


def _chunks(events: list[bytes]) -> list[JSON]:
    """Each chunk validated by the OpenAI SDK, with the per-stream id/created checked once."""
    out: list[JSON] = []
    for event in events:
        assert event.startswith(b"data: {") and event.endswith(b"\n\n")
        ChatCompletionChunk.model_validate_json(event[6:])
        out.append(orjson.loads(event[6:]))
    assert len({(c["id"], c["created"]) for c in out}) == 1
    for c in out:
        del c["id"], c["created"]
    return out


# The Vertex AI stream from Google's docs: text split over events, then an empty text part
# carrying the thought signature and the finish reason; usage only final on the last event.
VERTEX_STREAM = _events(
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello!"}]}}],
     "usageMetadata": {"trafficType": "ON_DEMAND"}, "modelVersion": "gemini-3.1-flash-lite-preview",
     "createTime": "2026-03-10T14:54:45.066123Z", "responseId": "tTCwacuEBMvnitYP06qsgQY"},
    {"candidates": [{"content": {"role": "model", "parts": [{"text": " How can I help you today"}]}}],
     "usageMetadata": {"trafficType": "ON_DEMAND"}, "modelVersion": "gemini-3.1-flash-lite-preview",
     "responseId": "tTCwacuEBMvnitYP06qsgQY"},
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "?"}]}}],
     "usageMetadata": {"trafficType": "ON_DEMAND"}, "modelVersion": "gemini-3.1-flash-lite-preview",
     "responseId": "tTCwacuEBMvnitYP06qsgQY"},
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "", "thoughtSignature": "AY89a18i"}]},
                     "finishReason": "STOP"}],
     "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 9, "totalTokenCount": 10,
                       "trafficType": "ON_DEMAND"},
     "modelVersion": "gemini-3.1-flash-lite-preview", "responseId": "tTCwacuEBMvnitYP06qsgQY"})


def _text_chunk(index: int, delta: JSON, finish: str | None = None) -> JSON:
    return {"object": "chat.completion.chunk", "model": "gemini-3.1-flash-lite-preview",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def test_stream_text() -> None:
    events = _translate(VERTEX_STREAM)
    assert events[-1] == b"data: [DONE]\n\n"
    assert _chunks(events[:-1]) == [
        _text_chunk(0, {"role": "assistant", "content": "Hello!"}),
        _text_chunk(0, {"content": " How can I help you today"}),
        _text_chunk(0, {"content": "?"}),
        _text_chunk(0, {}, "stop"),
        {"object": "chat.completion.chunk", "model": "gemini-3.1-flash-lite-preview", "choices": [],
         "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}}]
    first = orjson.loads(events[0][6:])
    assert first["id"] == "chatcmpl-tTCwacuEBMvnitYP06qsgQY"


def test_stream_accepts_lf_framing_and_a_missing_final_blank_line() -> None:
    lf = VERTEX_STREAM.replace(b"\r\n", b"\n")
    assert _translate(lf) == _translate(VERTEX_STREAM)
    assert _translate(lf.removesuffix(b"\n\n")) == _translate(VERTEX_STREAM)


def test_stream_function_calls_and_thoughts() -> None:
    raw = _events(
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Thinking about weather", "thought": True}]}}],
         "usageMetadata": {"promptTokenCount": 40, "totalTokenCount": 52, "thoughtsTokenCount": 12},
         "modelVersion": "gemini-2.5-flash", "responseId": "r2"},
        {"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_current_temperature", "args": {"location": "London"}}}]}}],
         "usageMetadata": {"promptTokenCount": 40, "totalTokenCount": 52, "thoughtsTokenCount": 12},
         "modelVersion": "gemini-2.5-flash", "responseId": "r2"},
        {"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_current_temperature", "args": {"location": "Paris"}}}]},
            "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 20, "totalTokenCount": 72,
                           "thoughtsTokenCount": 12},
         "modelVersion": "gemini-2.5-flash", "responseId": "r2"})
    events = _translate(raw)
    assert events[-1] == b"data: [DONE]\n\n"

    def chunk(delta: JSON, finish: str | None = None) -> JSON:
        return {"object": "chat.completion.chunk", "model": "gemini-2.5-flash",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def call(k: int, city: str) -> JSON:
        return {"index": k, "id": f"call_{k}", "type": "function",
                "function": {"name": "get_current_temperature", "arguments": orjson.dumps({"location": city}).decode()}}

    assert _chunks(events[:-1]) == [
        chunk({"role": "assistant", "tool_calls": [call(0, "London")]}),
        chunk({"tool_calls": [call(1, "Paris")]}),
        chunk({}, "tool_calls"),
        {"object": "chat.completion.chunk", "model": "gemini-2.5-flash", "choices": [],
         "usage": {"prompt_tokens": 40, "completion_tokens": 32, "total_tokens": 72,
                   "completion_tokens_details": {"reasoning_tokens": 12}}}]


def test_stream_several_candidates() -> None:
    raw = _events(
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "A"}]}},
                        {"content": {"role": "model", "parts": [{"text": "B"}]}, "index": 1}], "responseId": "r3"},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "a"}]}, "finishReason": "STOP"},
                        {"content": {"role": "model", "parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS",
                         "index": 1}], "responseId": "r3"})

    def chunk(index: int, delta: JSON, finish: str | None = None) -> JSON:
        return {"object": "chat.completion.chunk", "model": "gemini-2.5-flash",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

    events = _translate(raw)
    assert events[-1] == b"data: [DONE]\n\n"
    assert _chunks(events[:-1]) == [
        chunk(0, {"role": "assistant", "content": "A"}), chunk(1, {"role": "assistant", "content": "B"}),
        chunk(0, {"content": "a"}), chunk(0, {}, "stop"), chunk(1, {"content": "b"}), chunk(1, {}, "length")]


def test_stream_blocked_prompt() -> None:
    raw = _events({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                   "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5},
                   "modelVersion": "gemini-2.5-flash", "responseId": "r4"})
    events = _translate(raw)
    assert events[-1] == b"data: [DONE]\n\n"
    assert _chunks(events[:-1]) == [
        {"object": "chat.completion.chunk", "model": "gemini-2.5-flash",
         "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": "content_filter"}]},
        {"object": "chat.completion.chunk", "model": "gemini-2.5-flash", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}}]


def test_stream_interrupted_ends_without_done() -> None:
    # No finishReason: the caller owns reporting the cut-off stream, so no [DONE] and no
    # usage chunk; a half-received event is dropped.
    cut = VERTEX_STREAM[:VERTEX_STREAM.index(b"data: ", 20)] + b'data: {"candidates": [{"cont'
    events = _translate(cut)
    assert _chunks(events) == [_text_chunk(0, {"role": "assistant", "content": "Hello!"})]


def test_stream_error_event() -> None:
    raw = VERTEX_STREAM[:VERTEX_STREAM.index(b"data: ", 20)] + _events(
        {"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                   "status": "UNAVAILABLE"}})
    events = _translate(raw)
    assert len(events) == 2 and b"[DONE]" not in b"".join(events)
    assert orjson.loads(events[1][6:]) == {"error": {
        "message": "The model is overloaded. Please try again later.", "type": "server_error",
        "code": "provider_error", "param": None}}


def test_stream_without_usage_still_finishes() -> None:
    raw = _events({"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
                   "responseId": "r5"})
    events = _translate(raw, model="gemini-flash-latest")
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = _chunks(events[:-1])
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "stop"}]]
    assert {c["model"] for c in chunks} == {"gemini-flash-latest"}


# --- what real clients send and Gemini refuses ---------------------------------------------

STRICT_TOOL = {"type": "function", "function": {
    "name": "create_event", "strict": True, "parameters": {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
        "properties": {
            "title": {"type": "string", "minLength": 1, "examples": ["Standup"]},
            "when": {"type": "string", "format": "date-time"},
            "url": {"type": ["string", "null"], "format": "uri"},
            "kind": {"const": "meeting"},
            "size": {"type": "integer", "enum": [1, 2], "exclusiveMinimum": 0},
            "owner": {"$ref": "#/$defs/person"},
            "tags": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "number"}]}},
            "meta": {"allOf": [{"type": "object", "properties": {"k": {"type": "string"}},
                                "additionalProperties": False}]}},
        "required": ["title", "when", "url", "kind", "size", "owner", "tags", "meta", "ghost"],
        "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"},
                                                              "boss": {"$ref": "#/$defs/person"}},
                             "required": ["name"], "additionalProperties": False}}}}}


def test_request_schema_keeps_to_what_gemini_accepts() -> None:
    body = {"messages": [{"role": "user", "content": "plan it"}], "tools": [STRICT_TOOL]}
    [declaration] = _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body)["tools"][0][
        "functionDeclarations"]
    assert declaration == {"name": "create_event", "parameters": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1},
            "when": {"type": "string", "format": "date-time"},
            "url": {"type": "string", "nullable": True},
            "kind": {"type": "string", "enum": ["meeting"]},
            "size": {"type": "integer"},
            "owner": {"type": "object", "properties": {"name": {"type": "string"}, "boss": {"type": "object"}},
                      "required": ["name"]},
            "tags": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "number"}]}},
            "meta": {"type": "object", "properties": {"k": {"type": "string"}}}},
        "required": ["title", "when", "url", "kind", "size", "owner", "tags", "meta"]}}


def test_request_function_without_parameters_declares_none() -> None:
    tools = [{"type": "function", "function": {"name": "now", "description": "",
                                               "parameters": {"type": "object", "properties": {}}}},
             {"type": "function", "function": {"name": "today"}}]
    body = {"messages": [{"role": "user", "content": "time?"}], "tools": tools}
    assert _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body)["tools"] == [
        {"functionDeclarations": [{"name": "now"}, {"name": "today"}]}]


def test_thought_signatures_and_call_ids_survive_the_openai_pivot() -> None:
    """Gemini 3: the signature of the first of parallel calls comes back on that call's
    part, Vertex's own call ids come back on calls and responses, made-up ids do not."""
    signature = "CiQBjz1rX7/Zo2Vv8yDJPEJ6Bm5ozPQ2w+zLbKZfHt5/NlO06Hc="
    answer = {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"id": "fc-1", "name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": signature},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]}, "finishReason": "STOP"}]}
    calls = orjson.loads(gemini.response(200, orjson.dumps(answer), "m"))["choices"][0]["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["fc-1__thought__" + signature.replace("+", "-").replace("/", "_").rstrip("="),
                                        "call_0"]
    assert all(set(c["id"]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for c in calls)
    history = {"messages": [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "rain"}]}
    contents = _body(gemini.request(GEMINI_API, "/chat/completions", history, False).body)["contents"]
    assert contents[1] == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc-1"}, "thoughtSignature": signature},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]}
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}, "id": "fc-1"}},
        {"functionResponse": {"name": "get_weather", "response": {"content": "rain"}}}]}


def test_top_k_thinking_and_a_failed_tool_result_reach_gemini() -> None:
    """Anthropic clients' top_k, thinking budget and is_error in Gemini's terms (until 2026-12
    all three were dropped)."""
    body = {"model": "m", "top_k": 7, "thinking": {"type": "enabled", "budget_tokens": 2048},
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "t1", "content": "boom", "is_error": True}]}
    sent = _body(gemini.request(GEMINI_API, "/chat/completions", body, False).body)
    assert sent["generationConfig"] == {"topK": 7, "thinkingConfig": {"thinkingBudget": 2048}}
    assert sent["contents"][2]["parts"] == [{"functionResponse": {"name": "f", "id": "t1",
                                                                  "response": {"error": {"content": "boom"}}}}]
    off = _body(gemini.request(GEMINI_API, "/chat/completions", {**body, "thinking": {"type": "disabled"}}, False).body)
    assert off["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}


def test_an_sse_event_that_never_ends_is_cut_at_its_bound_with_the_events_before_it() -> None:
    """A provider sending one `data:` line without its blank line: the reader re-read all it
    held on every chunk (32 MiB in 8 KiB chunks cost ~30 s of CPU, memory without bound). It
    reads each byte once and stops past MAX_EVENT_BYTES; the events before it still go out."""
    from gateway_extproc.providers.base import MAX_EVENT_BYTES, GuardedStream

    translator = GuardedStream(gemini.stream("gemini-2.5-pro"))
    first = b'data: {"candidates": [{"content": {"parts": [{"text": "Hello"}]}}]}\n\n'
    out = translator.feed(first + b'data: {"candidates": [{"content": {"parts": [{"text": "', False)
    filler = b"x" * 8192
    for _ in range(MAX_EVENT_BYTES // len(filler) + 2):
        out += translator.feed(filler, False)
    out += translator.feed(filler, False) + translator.feed(b'"}]}}]}\n\n', True)
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[0]["choices"][0]["delta"]["content"] == "Hello", events
    assert [e["error"]["code"] for e in events[1:]] == ["provider_error"], events


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64])
def test_sse_events_cut_anywhere_read_as_whole(cut: int) -> None:
    """The reader's one-pass search for the blank line gives the events a whole read gives, with
    LF, CRLF and CR line ends and blank lines between events."""
    from gateway_extproc.providers.base import SseReader

    raw = b'data: {"a": 1}\n\n\n\ndata: {"b":\r\ndata: 2}\r\n\r\n: c\r\rdata: 3\r\r\ndata: [DONE]\n\ndata: 4'
    whole = SseReader().feed(raw, True)
    reader = SseReader()
    pieces = [d for i in range(0, len(raw), cut) for d in reader.feed(raw[i:i + cut], False)] + reader.feed(b"", True)
    assert pieces == whole == [b'{"a": 1}', b'{"b":\n2}', b"3", b"[DONE]", b"4"], pieces


@pytest.mark.parametrize("message", [["quota", "exceeded"], {"text": "quota"}, 42, None, ""])
def test_a_stream_error_whose_message_is_no_string_is_an_openai_error_with_a_string_message(message: object) -> None:
    """Gemini's mid-stream `{"error": {...}}` was passed on with its `message` as sent: a list or
    an object where OpenAI's error shape (and every SDK reading it) has a string."""
    out = gemini.stream("gemini-2.5-pro").feed(
        b"data: " + orjson.dumps({"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}) + b"\n\n",
        True)
    error = orjson.loads(out.split(b"\n\n")[0][6:])["error"]
    assert error == {"message": "Gemini stream error", "type": "rate_limit_error", "code": "provider_error",
                     "param": None}, error


def test_a_stream_whose_usage_came_before_more_output_is_no_bill() -> None:
    """Gemini's usageMetadata is cumulative: the last one is the bill only when no output came
    after it. A stream with usage on its first event only was charged that running count (1
    output token for 2,000 words); without a later usage the bill is unknown (the reservation)."""
    def event(doc: JSON) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    early = {"promptTokenCount": 8, "candidatesTokenCount": 1}
    for late in (None, {"promptTokenCount": 8, "candidatesTokenCount": 2002}):
        s = gemini.stream("gemini-2.5-pro")
        out = s.feed(event({"candidates": [{"content": {"parts": [{"text": "word "}]}}], "usageMetadata": early}), False)
        out += s.feed(event({"candidates": [{"content": {"parts": [{"text": "word " * 2000}]}}]}), False)
        last: JSON = {"candidates": [{"content": {"parts": [{"text": "end"}]}, "finishReason": "STOP"}]}
        out += s.feed(event(last if late is None else {**last, "usageMetadata": late}), True)
        usage = [orjson.loads(e[6:]).get("usage") for e in out.split(b"\n\n") if e.startswith(b"data: {")]
        if late is None:
            assert s.usage_unknown and not any(usage), usage
        else:
            assert not s.usage_unknown and usage[-1]["completion_tokens"] == 2002, usage


def _partial_call(*pieces: JSON, name: str | None = "save", more: bool = True) -> bytes:
    call: JSON = {"partialArgs": list(pieces), "willContinue": more, **({"name": name} if name else {})}
    return b"data: " + orjson.dumps({"candidates": [{"content": {"parts": [{"functionCall": call}]}}]}) + b"\n\n"


def test_a_partial_args_index_past_the_end_of_its_array_is_unreadable_not_gigabytes() -> None:
    """`$.a[1000000000]` in a 290-byte event padded a list to that length (a MemoryError, or a
    worker's memory); pieces fill an array in order, so one past its end is unreadable."""
    for index in (1, 10, 2_000_000, 1_000_000_000):
        s = gemini.stream("gemini-2.5-pro")
        with pytest.raises(StreamBroken) as broken:  # (the client gets a provider_error: GuardedStream)
            s.feed(_partial_call({"jsonPath": f"$.a[{index}]", "stringValue": "x"}), True)
        assert "past the end" in str(broken.value.__cause__)
    s = gemini.stream("gemini-2.5-pro")
    out = s.feed(_partial_call({"jsonPath": "$.a[0]", "stringValue": "x"}, {"jsonPath": "$.a[1]", "numberValue": 2})
                 + _partial_call(name=None, more=False), True)
    calls = [c for e in out.split(b"\n\n") if e.startswith(b"data: {")
             for c in orjson.loads(e[6:])["choices"][0]["delta"].get("tool_calls") or []]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"a": ["x", 2]}


def test_a_string_streamed_in_many_pieces_is_joined_once() -> None:
    """Each piece of a streamed string was joined to the string so far: 80,000 pieces in one
    event cost 4 s (n² copies). The value is the same, joined once when the call closes."""
    pieces = [{"jsonPath": "$.note", "stringValue": f"w{i} "} for i in range(20_000)]
    s = gemini.stream("gemini-2.5-pro")
    out = s.feed(_partial_call(*pieces) + _partial_call(name=None, more=False), True)
    calls = [c for e in out.split(b"\n\n") if e.startswith(b"data: {")
             for c in orjson.loads(e[6:])["choices"][0]["delta"].get("tool_calls") or []]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"note": "".join(f"w{i} " for i in range(20_000))}


def test_a_later_smaller_usage_count_lowers_nothing() -> None:
    """usageMetadata counts so far: 480 and then a block saying 2 was charged 2 until 2026-12-08."""
    def event(doc: JSON) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    s = gemini.stream("gemini-2.5-pro")
    out = s.feed(event({"candidates": [{"content": {"parts": [{"text": "word " * 480}]}, "finishReason": "STOP"}],
                        "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 480}}), False)
    out += s.feed(event({"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 2}}), True)
    usage = [orjson.loads(e[6:]).get("usage") for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert usage[-1]["completion_tokens"] == 480, usage
    s = gemini.stream("gemini-2.5-pro")  # (a negative count is no count: no bill, not the one before)
    out = s.feed(event({"candidates": [{"content": {"parts": [{"text": "word"}]}, "finishReason": "STOP"}],
                        "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 480}}), False)
    out += s.feed(event({"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": -3}}), True)
    assert s.usage_unknown


def test_a_usage_block_without_the_output_count_keeps_the_output() -> None:
    """A block without `candidatesTokenCount` (Gemini leaves out a count that is 0) beside 480
    tokens of text was charged 0 output until 2026-12-08: `totalTokenCount` holds them, and in
    a stream the count reported before stays."""
    assert gemini.usage({"promptTokenCount": 20, "totalTokenCount": 500})["completion_tokens"] == 480
    assert gemini.usage({"promptTokenCount": 20, "candidatesTokenCount": 480, "totalTokenCount": 500}) == {
        "prompt_tokens": 20, "completion_tokens": 480, "total_tokens": 500}

    def event(doc: JSON) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    s = gemini.stream("gemini-2.5-pro")
    out = s.feed(event({"candidates": [{"content": {"parts": [{"text": "word " * 480}]}, "finishReason": "STOP"}],
                        "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 480}}), False)
    out += s.feed(event({"usageMetadata": {"promptTokenCount": 20}}), True)
    usage = [orjson.loads(e[6:]).get("usage") for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert usage[-1]["completion_tokens"] == 480, usage


@pytest.mark.parametrize("name", [4111111111111111, ["get_weather"], {"n": "x"}, True])
def test_a_function_call_whose_name_is_no_string_is_unreadable_not_dropped(name: object) -> None:
    """Gemini's `functionCall.name` is a string; another type was taken for a call's end
    marker and dropped, so the answer ended `stop` without its tool call. It is an answer the
    translator cannot read (a `provider_error`), as JSON and streamed."""
    doc = {"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": name, "args": {}}}]},
                           "finishReason": "STOP"}]}
    with pytest.raises(ValueError):
        gemini.response(200, orjson.dumps(doc), "gemini-2.5-flash")
    with pytest.raises(StreamBroken):
        gemini.stream("gemini-2.5-flash").feed(b"data: " + orjson.dumps(doc) + b"\n\n", True)


@pytest.mark.parametrize("cached", [-5, 2.5, "3", 10**20, 9, None])
def test_a_cached_count_that_is_no_share_of_the_prompt_is_not_passed_on(cached: object) -> None:
    """`cachedContentTokenCount` went to the client as sent (-5, a string); only a count of at
    most the prompt's is shown."""
    meta = {"promptTokenCount": 8, "candidatesTokenCount": 2, "cachedContentTokenCount": cached}
    assert "prompt_tokens_details" not in gemini.usage(meta)
    assert gemini.usage({**meta, "cachedContentTokenCount": 6})["prompt_tokens_details"] == {"cached_tokens": 6}
