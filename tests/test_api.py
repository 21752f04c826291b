"""Unit tests for gateway_extproc.api (body parsing and validation) and gateway_extproc.errors."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_extproc import api
from gateway_extproc.errors import CODES, GatewayError, error_body

# -- parse_json --------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "code"), [
    (b"", "invalid_json"),
    (b"{", "invalid_json"),
    (b'{"model": "x",}', "invalid_json"),
    (b"model=x&stream=true", "invalid_json"),
    (b"{'model': 'x'}", "invalid_json"),
    (b'{"model": "x"} trailing', "invalid_json"),
    (b'{"model": "\xff"}', "invalid_encoding"),  # invalid UTF-8 inside a JSON string
    (b"\xff\xfe{}", "invalid_encoding"),
    (b'{"model": "caf\xe9"}', "invalid_encoding"),  # Latin-1, not UTF-8
    (b"[]", "invalid_request"),
    (b'[{"model": "x"}]', "invalid_request"),
    (b'"a string"', "invalid_request"),
    (b"42", "invalid_request"),
    (b"null", "invalid_request"),
])
def test_parse_json_errors(raw: bytes, code: str) -> None:
    with pytest.raises(GatewayError) as info:
        api.parse_json(raw)
    assert info.value.code == code
    assert info.value.status == 400
    assert info.value.param is None


@pytest.mark.parametrize(("raw", "says"), [
    (b"", "the body is empty"),
    (b"  \n", "the body is empty"),
    (b'{"model": "x",}', "trailing comma is not allowed, at line 1 column 14"),
    # valid JSON grammar, no Unicode text: JSON.stringify and json.dumps write it for a cut emoji
    (b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "no low surrogate in string (a \\uD800"),
    (b'{"a": "\\udc00"}', "surrogate"),
    (b'{"max_tokens": 1e400}', "number is infinity when parsed as double, at line 1 column 16"),
    (b"\xef\xbb\xbf{}", "byte order mark"),
    (b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nest 1,024 deep"),
    (b'{"a": 1}\n{"b": 2}', "at line 2 column 1"),
])
def test_invalid_json_says_why_and_where(raw: bytes, says: str) -> None:
    """Every parse error was "Request body is not valid JSON.", whatever it was and wherever
    it sat in a 10 MB prompt; a lone surrogate escape (valid grammar) sent callers to check
    a serialiser that had done its job."""
    with pytest.raises(GatewayError) as info:
        api.parse_json(raw)
    assert info.value.code == "invalid_json"
    assert says in info.value.message, info.value.message


@pytest.mark.parametrize("raw", [
    b'{"sk-live-0123456789abcdef" 1}', b'{"a": "sk-live-0123456789abcdef\x01"}', b'{"a": sk-live-0123456789abcdef}',
    b'{"a": 1} sk-live-0123456789abcdef', b'{"a": "sk-live-0123456789abcdef', b'{"sk-live-0123456789abcdef": nul}',
    b'{"a": "sk-live-0123456789abcdef\xff"}', b"sk-live-0123456789abcdef",
])
def test_parse_errors_never_quote_the_body(raw: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        api.parse_json(raw)
    assert "sk-live" not in info.value.message and "0123456789abcdef" not in info.value.message


def test_invalid_encoding_says_where() -> None:
    with pytest.raises(GatewayError) as info:
        api.parse_json(b'{"model": "caf\xe9"}')
    assert info.value.code == "invalid_encoding" and "byte 14" in info.value.message


@pytest.mark.parametrize(("raw", "expected"), [
    (b"{}", {}),
    (b' \n{"model": "caf\xc3\xa9", "n": 1}\n', {"model": "caf\u00e9", "n": 1}),
])
def test_parse_json_ok(raw: bytes, expected: dict[str, Any]) -> None:
    assert api.parse_json(raw) == expected


# Keys and strings with the characters that could confuse counting keys in the text: quotes,
# backslashes, colons, whitespace, escapes of `"` and `\`.
_TEXT = st.text(st.sampled_from(['"', "\\", ":", " ", "\n", "\t", "a", "b", "\u00e9", "{", "}", ","]), max_size=6)
_TREE = st.recursive(st.none() | st.integers() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=12)
_SPACE = st.sampled_from(["", " ", "\n  ", "\t"])


@st.composite
def _written(draw: st.DrawFn, twice: bool) -> tuple[bytes, dict[str, Any]]:
    """A JSON object as clients may write it (any spacing, escaped or raw UTF-8), and the
    object a parser keeping the last of equal keys reads; with `twice`, one object in it
    writes one of its keys again (with a value of its own, first or last)."""
    tree = draw(st.dictionaries(_TEXT, _TREE, min_size=1, max_size=4))
    objects: list[dict[str, Any]] = []
    todo: list[Any] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            objects.append(node)
        if isinstance(node, (dict, list)):
            todo.extend(node.values() if isinstance(node, dict) else node)
    again = draw(st.sampled_from([o for o in objects if o])) if twice else None
    ascii_only = draw(st.booleans())

    def text(value: Any) -> str:
        if isinstance(value, dict):
            items = [(k, text(v)) for k, v in value.items()]
            if value is again:
                key = draw(st.sampled_from(list(value)))
                extra = (key, text(draw(_TREE)))
                items.insert(0, extra) if draw(st.booleans()) else items.append(extra)
            return "{" + ",".join(f"{draw(_SPACE)}{json.dumps(k, ensure_ascii=ascii_only)}{draw(_SPACE)}:"
                                  f"{draw(_SPACE)}{v}" for k, v in items) + draw(_SPACE) + "}"
        if isinstance(value, list):
            return "[" + ",".join(f"{draw(_SPACE)}{text(v)}" for v in value) + draw(_SPACE) + "]"
        return json.dumps(value, ensure_ascii=ascii_only)

    raw = text(tree).encode()
    return raw, orjson.loads(raw)


@given(_written(twice=False))
def test_parse_json_reads_any_object_written_once(case: tuple[bytes, dict[str, Any]]) -> None:
    raw, expected = case
    assert api.parse_json(raw) == expected


@given(_written(twice=True))
def test_parse_json_refuses_a_key_written_twice_in_any_object(case: tuple[bytes, dict[str, Any]]) -> None:
    """The parser keeps the last of equal keys, a provider may keep the first: the gateway
    would check one request and forward another. Such a body is refused, its keys unquoted."""
    raw, _ = case
    with pytest.raises(GatewayError) as info:
        api.parse_json(raw)
    assert (info.value.code, info.value.status, info.value.param) == ("invalid_json", 400, None)


def test_a_key_escaped_differently_is_still_the_same_key() -> None:
    for raw in (b'{"model": "a", "\\u006dodel": "b"}', b'{"a\\\\": 1, "a\\u005c": 2}', b'{"x": {"\\"": 1, "\\u0022": 2}}'):
        with pytest.raises(GatewayError):
            api.parse_json(raw)
    assert api.parse_json(b'{"a\\\\": "\\":", "b": "\\\\"}') == {"a\\": '":', "b": "\\"}


# -- chat validation ---------------------------------------------------------------------

_DELETE = object()  # chat(field=_DELETE) removes the field
CHAT_OK = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}]}


def chat(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(CHAT_OK)
    for k, v in changes.items():
        if v is _DELETE:
            body.pop(k, None)
        else:
            body[k] = v
    return body



@pytest.mark.parametrize("body", [
    CHAT_OK,
    chat(stream=True),
    chat(stream=False, stream_options=None),
    chat(stream=True, stream_options={"include_usage": True}),
    chat(max_tokens=1, max_completion_tokens=4096),
    chat(max_tokens=None),
    chat(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "x"}]},
                   {"role": "assistant", "content": None, "tool_calls": []}, {"role": "tool"}]),
    chat(temperature=0.2, tools=[], user="u-1"),  # other fields pass through unchecked
    chat(stream=None),  # OpenAI's API allows null (not streamed)
], ids=["minimal", "stream", "stream-options-null", "include-usage", "max-tokens", "max-tokens-null",
        "message-shapes", "extra-fields", "stream-null"])
def test_chat_valid(body: dict[str, Any]) -> None:
    api.CHAT.validate(body)


CHAT_BAD = [
    ("model-missing", chat(model=_DELETE), "model"),
    ("model-not-string", chat(model=4), "model"),
    ("model-empty", chat(model=""), "model"),
    ("model-null", chat(model=None), "model"),
    ("messages-missing", chat(messages=_DELETE), "messages"),
    ("messages-empty", chat(messages=[]), "messages"),
    ("messages-not-list", chat(messages={"role": "user", "content": "hi"}), "messages"),
    ("messages-string", chat(messages="hi"), "messages"),
    ("message-not-object", chat(messages=["hi"]), "messages[0]"),
    ("message-without-role", chat(messages=[{"role": "user", "content": "a"}, {"content": "b"}]), "messages[1]"),
    ("message-role-not-string", chat(messages=[{"role": 1, "content": "a"}]), "messages[0]"),
    ("content-number", chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("content-object", chat(messages=[{"role": "user", "content": "ok"}, {"role": "user", "content": {"t": 1}}]),
     "messages[1].content"),
    ("stream-string", chat(stream="true"), "stream"),
    ("stream-int", chat(stream=1), "stream"), ("stream-zero", chat(stream=0), "stream"),
    ("stream-options-string", chat(stream=True, stream_options="include_usage"), "stream_options"),
    ("stream-options-list", chat(stream=True, stream_options=["include_usage"]), "stream_options"),
    ("stream-options-number", chat(stream=True, stream_options=1), "stream_options"),
    ("max-tokens-zero", chat(max_tokens=0), "max_tokens"),
    ("max-tokens-negative", chat(max_tokens=-1), "max_tokens"),
    ("max-tokens-string", chat(max_tokens="5"), "max_tokens"),
    ("max-tokens-bool", chat(max_tokens=True), "max_tokens"),
    ("max-tokens-float", chat(max_tokens=5.0), "max_tokens"),
    ("max-completion-tokens-zero", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("max-completion-tokens-bool", chat(max_completion_tokens=True), "max_completion_tokens"),
]


@pytest.mark.parametrize(("body", "param"), [pytest.param(b, p, id=i) for i, b, p in CHAT_BAD])
def test_chat_invalid(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        api.CHAT.validate(body)
    err = info.value
    assert (err.code, err.status, err.param) == ("invalid_request", 400, param)
    assert f"`{param}`" in err.message  # the message names the field


# Fields a translator carries over to Anthropic, Bedrock or Gemini (or the gateway reads),
# checked for every backend: what the OpenAI schema allows in each, stated apart from api.py.
def _num(low: float, high: float) -> Any:
    return lambda v: v is None or (type(v) in (int, float) and low <= v <= high)


SCALARS: dict[str, Any] = {
    "temperature": _num(0, 2), "top_p": _num(0, 1), "presence_penalty": _num(-2, 2),
    "frequency_penalty": _num(-2, 2),
    "seed": lambda v: v is None or type(v) is int,
    "max_tokens": lambda v: v is None or (type(v) is int and v > 0),
    "max_completion_tokens": lambda v: v is None or (type(v) is int and v > 0),
    "stop": lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "user": lambda v: v is None or isinstance(v, str),
    "stream": lambda v: v is None or isinstance(v, bool),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "tool_choice": lambda v: v is None or v in ("none", "auto", "required") or (
        isinstance(v, dict) and ("function" not in v or isinstance(v["function"], dict)
                                 and isinstance(v["function"].get("name"), str))),
}
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12)
                        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
                        | st.sampled_from(["hot", "ten", "auto", "none", "required", "yes"]),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.sampled_from(["name", "type", "function", "x"]), inner, max_size=3), max_leaves=6)


@given(field=st.sampled_from(sorted(SCALARS)), value=ANY_JSON)
def test_a_translated_field_passes_exactly_when_the_openai_schema_allows_it(field: str, value: Any) -> None:
    """`temperature: "hot"`, `top_p: 7`, `stop: 5`... reached Anthropic, Bedrock and Gemini
    translated as they were (or the translator raised): now any value the schema does not
    allow is a 400 naming the field, and any value it allows passes."""
    body = chat(**{field: value})
    if SCALARS[field](value):
        api.CHAT.validate(body)
        return
    with pytest.raises(GatewayError) as info:
        api.CHAT.validate(body)
    assert (info.value.code, info.value.param) == ("invalid_request", field)
    assert f"`{field}`" in info.value.message


HI = {"role": "user", "content": "hi"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
NESTED_BAD = [  # (body fields, param): the path of the first thing of the wrong type
    ({"messages": [HI, {"role": "assistant", "content": 42}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": None}]}]},
     "messages[0].content[0].refusal"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/a.png"}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 1}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "assistant", "tool_calls": "x"}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [5]}]}, "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{**CALL, "id": 1}]}]}, "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": "f"}]}]}, "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [CALL, {**CALL, "function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls[1].function.name"),
    ({"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [HI, {"role": "tool", "tool_call_id": 7, "content": "ok"}]}, "messages[1].tool_call_id"),
    ({"tools": "x"}, "tools"), ({"tools": {"a": 1}}, "tools"), ({"tools": [TOOL, 5]}, "tools[1]"),
    ({"tools": [{"function": {"name": "f"}}]}, "tools[0]"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools[0].function.description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"response_format": "json_object"}, "response_format"), ({"response_format": {"type": 1}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format.json_schema"),
]


@pytest.mark.parametrize(("fields", "param"), NESTED_BAD, ids=[p for _, p in NESTED_BAD])
def test_a_wrong_type_inside_messages_or_tools_is_named_by_its_path(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        api.CHAT.validate({**CHAT_OK, **fields})
    assert (info.value.code, info.value.param) == ("invalid_request", param)
    assert f"`{param}`" in info.value.message


def test_what_the_openai_schema_allows_in_messages_and_tools_passes() -> None:
    api.CHAT.validate({**CHAT_OK, "messages": [
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AA=="}}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}],
        "tools": [TOOL, {"type": "function", "function": {"name": "g"}}, {"type": "custom", "custom": {"name": "c"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})


@pytest.mark.parametrize(("field", "value"), [("temperature", "hot"), ("top_p", 7), ("temperature", -0.1)])
def test_responses_sampling_fields_are_checked_as_chats_are(field: str, value: Any) -> None:
    with pytest.raises(GatewayError) as info:
        api.RESPONSES.validate({"model": "m", "input": "hi", field: value})
    assert info.value.param == field


@pytest.mark.parametrize("value", [[], False, 0, ""], ids=["empty-list", "false", "zero", "empty-string"])
def test_chat_falsy_stream_options_is_not_an_object(value: Any) -> None:
    with pytest.raises(GatewayError) as info:
        api.CHAT.validate(chat(stream=True, stream_options=value))
    assert info.value.param == "stream_options"


def test_chat_validation_checks_fields_in_order() -> None:
    """With several problems, the first field is reported (model before messages before stream)."""
    with pytest.raises(GatewayError) as info:
        api.CHAT.validate({"messages": [], "stream": "x"})
    assert info.value.param == "model"


# -- embeddings validation ---------------------------------------------------------------

EMB_OK = {"model": "default-embedding", "input": "hello"}


@pytest.mark.parametrize("value", ["hello", "", ["a", "b"], [1, 2, 3], [[1, 2], [3]]],
                         ids=["string", "empty-string", "strings", "token-array", "token-arrays"])
def test_embeddings_valid(value: Any) -> None:
    api.EMBEDDINGS.validate({**EMB_OK, "input": value})


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x"}, "model"),
    ({**EMB_OK, "model": ["m"]}, "model"),
    ({"model": "default-embedding"}, "input"),
    ({**EMB_OK, "input": None}, "input"),
    ({**EMB_OK, "input": []}, "input"),
    ({**EMB_OK, "input": {"text": "hi"}}, "input"),
    ({**EMB_OK, "input": [True]}, "input"),
    ({**EMB_OK, "input": ["a", False]}, "input"),
    ({**EMB_OK, "input": [1.5]}, "input"),
    ({**EMB_OK, "input": [None]}, "input"),
    ({**EMB_OK, "input": 42}, "input"),
    # OpenAI's shapes only: a string among token arrays, or a string nested in one, would be
    # read by the classifier in a way the provider never sees.
    ({**EMB_OK, "input": ["a", [1]]}, "input"),
    ({**EMB_OK, "input": [1, "a"]}, "input"),
    ({**EMB_OK, "input": [[1], ["a"]]}, "input"),
    ({**EMB_OK, "input": [[1], []]}, "input"),
    ({**EMB_OK, "input": [-1]}, "input"),
    ({**EMB_OK, "input": [[2, -1]]}, "input"),
], ids=["model-missing", "model-list", "input-missing", "input-null", "input-empty-list", "input-dict",
        "input-bool", "input-mixed-bool", "input-float", "input-null-item", "input-int", "mixed", "ids-then-string",
        "string-in-token-array", "empty-token-array", "negative-id", "negative-id-nested"])
def test_embeddings_invalid(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        api.EMBEDDINGS.validate(body)
    assert (info.value.code, info.value.status, info.value.param) == ("invalid_request", 400, param)


# -- endpoint table ----------------------------------------------------------------------


def test_endpoint_table() -> None:
    assert api.FORWARDED == {"/v1/chat/completions": api.CHAT, "/v1/embeddings": api.EMBEDDINGS,
                             "/v1/responses": api.RESPONSES, "/v1/messages": api.CHAT}
    assert (api.CHAT.name, api.CHAT.suffix, api.CHAT.can_stream) == ("chat", "/chat/completions", True)
    assert (api.EMBEDDINGS.name, api.EMBEDDINGS.suffix, api.EMBEDDINGS.can_stream) == ("embeddings", "/embeddings",
                                                                                       False)
    assert api.BY_NAME == {"chat": api.CHAT, "embeddings": api.EMBEDDINGS, "responses": api.RESPONSES}
    assert api.MODELS_PATH == "/v1/models"


# -- errors ------------------------------------------------------------------------------

EXPECTED_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    415: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
}

EXPECTED_STATUS = {
    "invalid_json": 400, "invalid_encoding": 400, "invalid_request": 400, "too_many_choices": 400,
    "context_not_countable": 400, "token_input_unreadable": 400, "thinking_budget_too_large": 400,
    "missing_api_key": 401, "invalid_api_key": 401, "expired_api_key": 401,
    "identity_not_mapped": 403, "identity_conflict": 403, "key_store_unavailable": 503,
    "audit_not_enabled": 404,
    "admin_unauthorized": 401, "key_not_found": 404, "key_conflict": 409,  # key admin API
    "model_not_allowed": 403, "model_not_found": 404, "unknown_endpoint": 404,
    "method_not_allowed": 405, "request_too_large": 413, "request_headers_too_large": 431,
    "unsupported_media_type": 415,
    "classification_violation": 403, "content_blocked": 403, "budget_exceeded": 429, "rate_limited": 429, "budget_store_unavailable": 503,
    "gateway_busy": 503,
    "provider_credential_missing": 500, "gateway_internal_error": 500, "unsupported_endpoint": 400,
    "upstream_stream_interrupted": 502, "provider_auth_failed": 502, "provider_error": 502,
}


def test_codes_table() -> None:
    assert CODES == EXPECTED_STATUS


@pytest.mark.parametrize("code", sorted(CODES))
@pytest.mark.parametrize("param", [None, "messages[0].content"])
def test_gateway_error_shape(code: str, param: str | None) -> None:
    err = GatewayError(code, f"Something about {code} \u2014 \"quoted\".", param)
    assert err.code == code
    assert err.status == EXPECTED_STATUS[code]
    assert err.type == EXPECTED_TYPE[err.status]
    assert str(err) == err.message
    body = orjson.loads(err.body())
    assert body == {"error": {"message": f"Something about {code} \u2014 \"quoted\".", "type": err.type,
                              "code": code, "param": param}}
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "code", "param"]


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        GatewayError("no_such_code", "x")


def test_error_body() -> None:
    assert orjson.loads(error_body("m", "server_error", "c")) == {
        "error": {"message": "m", "type": "server_error", "code": "c", "param": None}}


def test_n_null_counts_as_one_choice() -> None:
    api.CHAT.validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": None})


@pytest.mark.parametrize(("count", "size", "refused"), [
    (10, 1000, False), (api.MAX_HEADER_COUNT, api.MAX_HEADER_BYTES, False),
    (api.MAX_HEADER_COUNT + 1, 100, True), (10, api.MAX_HEADER_BYTES + 1, True)])
def test_headers_must_leave_room_for_the_gateways(count: int, size: int, refused: bool) -> None:
    if refused:
        with pytest.raises(GatewayError) as err:
            api.check_header_room(count, size)
        assert err.value.status == 431 and err.value.code == "request_headers_too_large"
    else:
        api.check_header_room(count, size)


# -- cache_writes ------------------------------------------------------------------------

_CACHE_KEYS = st.sampled_from(["cache_control", "ttl", "type", "text", "content", "cache_controls", "é"])
_CACHE_LEAVES = st.one_of(st.sampled_from(["1h", "5m", "ephemeral", "cache_control", "\"cache_control\"", "1hour"]),
                          st.text(max_size=8), st.integers(-2**53, 2**53), st.none())
_BODIES = st.recursive(_CACHE_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_CACHE_KEYS, inner, max_size=4)), max_leaves=12)


def _all_escaped(value: Any) -> str:
    """JSON with every character of every key and string written as a \\u escape (valid, and
    what a client hiding a marker from a byte scan would send)."""
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else json.dumps(c)[1:-1] for c in value) + '"'
    if isinstance(value, dict):
        return "{" + ",".join(f"{_all_escaped(k)}:{_all_escaped(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_all_escaped(v) for v in value) + "]"
    return json.dumps(value)


def _markers(value: Any) -> tuple[bool, bool]:
    """(a cache_control key anywhere, a "1h" string anywhere)."""
    if isinstance(value, dict):
        found = [_markers(v) for v in value.values()]
        return "cache_control" in value or any(m for m, _ in found), any(h for _, h in found)
    if isinstance(value, list):
        found = [_markers(v) for v in value]
        return any(m for m, _ in found), any(h for _, h in found)
    return False, value == "1h"


@given(body=st.dictionaries(_CACHE_KEYS, _BODIES, max_size=4),
       encode=st.sampled_from([orjson.dumps, lambda b: json.dumps(b).encode(), lambda b: json.dumps(b, indent=2).encode(),
                               lambda b: json.dumps(b, ensure_ascii=False).encode(), lambda b: _all_escaped(b).encode()]))
def test_cache_markers_are_seen_in_any_encoding(body: dict[str, Any], encode: Any) -> None:
    """A body with a `cache_control` key anywhere, however it is encoded, is seen to ask for
    cache writes; with a "1h" anywhere beside it, for 1-hour ones."""
    raw = encode(body)
    assert orjson.loads(raw) == body
    marked, long = _markers(body)
    if marked:
        assert api.cache_writes(raw) in (("1h",) if long else ("5m", "1h"))  # (escapes count as 1-hour)
    if api.cache_writes(raw) is None:
        assert not marked


def test_cache_markers_in_plain_bodies() -> None:
    assert api.cache_writes(b'{"messages":[{"role":"user","content":"what does \\"cache_control\\" do?"}]}') is None
    assert api.cache_writes(b'{"messages":[{"role":"user","content":"caf\\u00e9 \\u003cb\\u003e"}]}') is None
    assert api.cache_writes(b'{"messages":[{"role":"user","content":[{"type":"text","text":"x",'
                            b'"cache_control":{"type":"ephemeral"}}]}]}') == "5m"
    assert api.cache_writes(b'{"cache_control": {"type": "ephemeral", "ttl": "1h"}}') == "1h"


@pytest.mark.parametrize("endpoint", [api.CHAT, api.RESPONSES, api.EMBEDDINGS])
def test_a_provider_side_fallback_list_is_refused(endpoint: api.Endpoint) -> None:
    """OpenRouter's `models` lets the provider switch to models the key may not use, at prices
    no budget holds."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "input": "hi",
            "models": ["anthropic/claude-opus-4", "openai/o3-pro"]}
    with pytest.raises(GatewayError) as err:
        endpoint.validate(body)
    assert (err.value.code, err.value.param) == ("invalid_request", "models")


# -- fields the budget checks read (api.billed_above_prices, api.provider_added_input) ----------------

RESPONSES_OK = {"model": "m", "input": "hi"}
RESPONSES_BAD = [  # (body fields, param)
    ({"service_tier": []}, "service_tier"), ({"service_tier": {"a": 1}}, "service_tier"),
    ({"service_tier": 5}, "service_tier"),
    ({"tools": "x"}, "tools"), ({"tools": {"type": "function"}}, "tools"), ({"tools": [5]}, "tools[0]"),
    ({"tools": [{"type": "function", "name": "f"}, {"type": []}]}, "tools[1]"),
    ({"tools": [{"type": {"a": 1}}]}, "tools[0]"), ({"tools": [{"name": "f"}]}, "tools[0]"),
    ({"input": [5]}, "input[0]"), ({"input": [{"role": "user", "content": "a"}, "b"]}, "input[1]"),
    ({"input": [None]}, "input[0]"), ({"input": [[{"role": "user", "content": "a"}]]}, "input[0]"),
    ({"previous_response_id": {}}, "previous_response_id"), ({"previous_response_id": 0}, "previous_response_id"),
    ({"text": "json"}, "text"), ({"text": {"format": "json_object"}}, "text.format"),
    ({"text": {"format": {"type": 1}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": "{}"}}}, "text.format.schema"),
]


@pytest.mark.parametrize(("fields", "param"), RESPONSES_BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(RESPONSES_BAD)])
def test_a_responses_field_the_gateway_reads_is_checked(fields: dict[str, Any], param: str) -> None:
    """`service_tier: []` or a tool whose `type` is an object made the budget checks raise
    TypeError (a list is no member of a frozenset): 500 `gateway_internal_error`. A tool or an
    input item that is no object was forwarded, and the provider's 400 named no field."""
    with pytest.raises(GatewayError) as info:
        api.RESPONSES.validate({**RESPONSES_OK, **fields})
    assert (info.value.code, info.value.param) == ("invalid_request", param)
    assert f"`{param}`" in info.value.message


def test_what_the_responses_schema_allows_passes() -> None:
    api.RESPONSES.validate({**RESPONSES_OK, "service_tier": "flex", "previous_response_id": None, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}, {"type": "item_reference", "id": "x"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"}],
        "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}],
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}, "verbosity": "low"}})
    api.RESPONSES.validate({**RESPONSES_OK, "text": {}, "tools": []})


@pytest.mark.parametrize("value", [[], {"a": 1}, 5, True])
def test_chat_service_tier_must_be_a_string(value: Any) -> None:
    with pytest.raises(GatewayError) as info:
        api.CHAT.validate(chat(service_tier=value))
    assert (info.value.code, info.value.param) == ("invalid_request", "service_tier")


@given(field=st.sampled_from(["service_tier", "modalities", "tools", "input", "previous_response_id", "conversation", "prompt",
                              "web_search_options", "data_sources"]), value=ANY_JSON, endpoint=st.sampled_from(["chat", "responses"]))
def test_the_budget_checks_read_any_body_validation_passes(field: str, value: Any, endpoint: str) -> None:
    """Whatever the validator lets through, the checks run under a budget (priority tier,
    input the provider adds) answer, never raise."""
    body = {**(chat() if endpoint == "chat" else RESPONSES_OK), field: value}
    try:
        api.BY_NAME[endpoint].validate(body)
    except GatewayError:
        return
    api.billed_above_prices(api.BY_NAME[endpoint], body)
    api.provider_added_input(api.BY_NAME[endpoint], body)


@pytest.mark.parametrize(("fields", "param"), [
    ({"dimensions": 0}, "dimensions"), ({"dimensions": -1}, "dimensions"), ({"dimensions": "8"}, "dimensions"),
    ({"dimensions": 8.0}, "dimensions"), ({"dimensions": True}, "dimensions"), ({"dimensions": [8]}, "dimensions"),
    ({"encoding_format": "x"}, "encoding_format"), ({"encoding_format": ["float"]}, "encoding_format"),
    ({"encoding_format": 1}, "encoding_format"), ({"encoding_format": ""}, "encoding_format"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_embeddings_dimensions_and_encoding_format_are_checked(fields: dict[str, Any], param: str) -> None:
    """Each reached the provider as sent, and its 400 named no field."""
    with pytest.raises(GatewayError) as info:
        api.EMBEDDINGS.validate({**EMB_OK, **fields})
    assert (info.value.code, info.value.param) == ("invalid_request", param)
    assert f"`{param}`" in info.value.message


def test_embeddings_dimensions_and_encoding_format_the_schema_allows_pass() -> None:
    for fields in ({"dimensions": 256, "encoding_format": "float"}, {"encoding_format": "base64"},
                   {"dimensions": None, "encoding_format": None}):
        api.EMBEDDINGS.validate({**EMB_OK, **fields})


# -- depth: what the gateway can write back -----------------------------------------------------

def _nested(depth: int, inner: bytes = b"1") -> bytes:
    """A body whose deepest value sits `depth` objects and arrays down (the body itself is 1)."""
    return b'{"model": "m", "x": ' + b"[" * (depth - 1) + inner + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [api.MAX_DEPTH + 1, 255, 300, 1024])
def test_a_body_nested_deeper_than_the_gateway_can_write_is_refused(depth: int) -> None:
    """orjson reads 1,024 levels but writes 254: a body between was parsed, then the router
    (model renamed, cap set) or the Messages translation (a tool_use `input`) wrote it back
    and raised TypeError, a 500 `gateway_internal_error` (with classification on, its 128
    limit came after the Messages translation)."""
    with pytest.raises(GatewayError) as info:
        api.parse_json(_nested(depth))
    assert (info.value.code, info.value.status, info.value.param) == ("invalid_request", 400, None)
    assert f"{api.MAX_DEPTH} deep" in info.value.message


@pytest.mark.parametrize("inner", [b"1", b"{}", b"[]", b'{"a": 1}'])
def test_a_body_nested_as_deep_as_the_gateway_writes_is_read_and_written(inner: bytes) -> None:
    body = api.parse_json(_nested(api.MAX_DEPTH - (inner != b"1"), inner))
    assert orjson.loads(orjson.dumps({"wrapped": [{"in": [body]}]} | {"more": [[[[body]]]]}))


def test_the_depth_limit_leaves_room_for_a_translator_to_wrap_the_body() -> None:
    assert api.MAX_DEPTH + 16 <= 254  # orjson.dumps refuses a 255th level


@pytest.mark.parametrize(("endpoint", "fields", "param"), [
    ("chat", {"service_tier": "priority"}, "service_tier"), ("responses", {"service_tier": "priority"}, "service_tier"),
    ("chat", {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
    ("chat", {"modalities": ["text"]}, None), ("chat", {"service_tier": "flex"}, None), ("chat", {}, None),
])
def test_what_is_billed_above_the_token_prices(endpoint: str, fields: dict[str, Any], param: str | None) -> None:
    body = {**(chat() if endpoint == "chat" else RESPONSES_OK), **fields}
    assert api.billed_above_prices(api.BY_NAME[endpoint], body) == param
