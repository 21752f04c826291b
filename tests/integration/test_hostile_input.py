"""Hostile input end to end: whatever a client sends, through real Envoy, the ext_proc
workers and the mock providers, the gateway answers sanely and stays up.

Invariants checked on every answer (hypothesis draws the requests; the SDK tests send
odd-but-typed parameters to every provider kind):

- Envoy and every ext_proc worker are still the same live processes; /ready is 200;
- no 5xx (the mock providers are never told to fail here), never `gateway_internal_error`;
- an error the gateway made (nothing reached a provider) is OpenAI-shaped
  {"error": {"message", "type", "code", "param"}} with a `code` docs/runbooks.md explains
  (HEAD answers have no body); a refused request reached no provider;
- nothing reaches a provider with a `content-encoding` (the body it gets is the one checked);
- the ext_proc log has no `processing_failed` line, and no log line holds a caller's secret.

HOSTILE_EXAMPLES / HOSTILE_SDK_EXAMPLES raise the example counts for a longer hunt
(1,000 requests take about 4 minutes here).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway_extproc import keys

from .conftest import REPO, Gateway, add_provider_models, no_budgets, running_gateway
from .local_cli import children

DOCUMENTED = set(re.findall(r"^### `([a-z_]+)`$", (REPO / "docs" / "runbooks.md").read_text(), re.M))
ENDPOINTS = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings", "/v1/models", "/v1/usage"]
CHAT_MODELS = ["default-chat", "claude-chat", "gemini-chat", "bedrock-chat", "gemini3-chat", "azure-chat",
               "fallback-chat", "private-chat"]
SDK_MODELS = ["default-chat", "claude-chat", "gemini-chat", "bedrock-chat"]
# Secrets of made-up keys sent by the tests: none may show up in a log.
SENT_SECRETS: set[str] = set()


class Watch:
    """The gateway's processes and logs, read incrementally between requests."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.envoy = gw.stack.procs["envoy"]
        self.serve = gw.stack.procs["extproc"]
        self.workers = sorted(children(self.serve.pid))
        assert self.workers, "no ext_proc worker found"
        self.offsets = {name: 0 for name in ("extproc", "envoy")}

    def alive(self) -> None:
        assert self.envoy.poll() is None, "Envoy died"
        assert self.serve.poll() is None, "the ext_proc supervisor died"
        assert sorted(children(self.serve.pid)) == self.workers, "an ext_proc worker died or was restarted"

    def new_log(self) -> str:
        out = []
        for name in self.offsets:
            path: Path = self.gw.stack.log_path(name)
            with path.open("rb") as f:
                f.seek(self.offsets[name])
                data = f.read()
            self.offsets[name] += len(data)
            out.append(data.decode("utf-8", "replace"))
        return "".join(out)

    def clean_log(self, text: str) -> None:
        assert "processing_failed" not in text, text[-3000:]
        assert "gateway_internal_error" not in text, text[-3000:]
        for secret in (*SENT_SECRETS, secret_of(self.gw.key)):
            assert secret not in text, "a caller's secret is in a log line"


def secret_of(key: str) -> str:
    return key.split("_", 2)[2]


def _unlimited(values: dict[str, Any]) -> None:
    """values-local with every provider kind, and the demo team's $5 a day and 2M tokens a
    minute out of reach: bursts of 10 MiB prompts here test admission, and small requests
    sent meanwhile must not meet the budget those prompts spent (tests/integration/
    test_budget_invariant.py attacks budgets)."""
    add_provider_models(values)
    values["budgets"]["orgLimit"] = {"daily": 10**6}
    for team in values["teams"]:
        team["budget"] = {"daily": 10**6, "monthly": 10**6}
        team["rateLimits"] = {"tokensPerMinute": 10**10, "requestsPerMinute": 10**6}


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[Gateway, Watch]]:
    with running_gateway("gw-hostile-", customize=_unlimited) as gw:
        yield gw, Watch(gw)


# -- strategies ---------------------------------------------------------------------------

def _odd_path(p: str) -> st.SearchStrategy[str]:
    return st.sampled_from([p, p + "/", "/" + p, p.replace("/", "//"), p.upper(), p.replace("/v1/", "/v1/./"),
                            p.replace("/v1/", "/v1/../v1/"), p[:-1] + "%" + f"{ord(p[-1]):02X}",
                            "/" + p[1:].replace("/", "%2F"), p + "%00", p + ";x=1", p + "?",
                            p + "?api-version=1&model=x", p + "?" + "q" * 3000, p + "/" + "a" * 20_000,
                            "/" + "x" * 60_000])


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], tenths: int = 8) -> st.SearchStrategy[Any]:
    """`common` in about `tenths` of ten draws: odd input, but most requests get past the
    first checks to the ones behind them."""
    return st.integers(0, 9).flatmap(lambda i: common if i < tenths else rare)


FORWARDED = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"]
PATHS = mostly(st.sampled_from(FORWARDED), st.sampled_from(ENDPOINTS).flatmap(_odd_path)
               | st.sampled_from(["/", "/v1", "/v1/completions", "/v1/models", "/v1/usage"]))
METHODS = mostly(st.just("POST"), st.sampled_from(["GET", "PUT", "DELETE", "OPTIONS", "HEAD"]), 9)
CONTENT_TYPES = mostly(st.just("application/json"), st.sampled_from([
    None, "application/json; charset=utf-8", "Application/JSON",
    "application/json;charset=latin-1", "application/json ; charset=\"utf-8\"", "application/json, text/plain",
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "application/jsonx",
    "application/json;\tcharset=utf-8"]), 7)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
BIG_NUMBERS = st.sampled_from([0, -1, 2**31, 2**63, 2**64 + 1, 10**30, 1e308, -1e308, 0.5, True, "7", None, [], {}])


def valid_body(path: str, model: str) -> dict[str, Any]:
    if "messages" in path:
        return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    if "responses" in path:
        return {"model": model, "input": "hi"}
    if "embeddings" in path:
        return {"model": model, "input": ["hi"]}
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@st.composite
def near_valid_json(draw: st.DrawFn, path: str) -> bytes:
    fitting = st.just("default-embedding") if "embeddings" in path else st.sampled_from(CHAT_MODELS)
    model = draw(mostly(fitting, st.sampled_from([*CHAT_MODELS, "default-embedding", "no-such-model", "",
                                                  "x" * 5000])))
    body: dict[str, Any] = valid_body(path, model)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["model", "messages", "input", "max_tokens", "max_completion_tokens", "n",
                                      "stream", "stream_options", "tools", "stop", "temperature", "system",
                                      "instructions", "max_output_tokens", "metadata", "encoding_format",
                                      "dimensions", "tool_choice", "response_format", "logit_bias"]))
        action = draw(st.sampled_from(["delete", "json", "number", "content"]))
        if action == "delete":
            body.pop(field, None)
        elif action == "json":
            body[field] = draw(JSON_VALUES)
        elif action == "number":
            body[field] = draw(BIG_NUMBERS)
        else:
            body["messages"] = [draw(st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "", "x"])},
                optional={"content": JSON_VALUES | st.lists(st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url", "image", "tool_result", "input_audio", "x"])},
                    optional={"text": JSON_VALUES, "image_url": JSON_VALUES, "source": JSON_VALUES}), max_size=3),
                          "tool_calls": JSON_VALUES, "name": JSON_VALUES}))]
    raw = _dumps(body) if draw(st.booleans()) else _dumps_loose(body)
    trick = draw(mostly(st.just("none"), st.sampled_from(["bom", "nan", "dup", "deep", "big", "latin1", "trail"]), 6))
    if trick == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif trick == "nan":
        raw = raw[:-1] + b', "temperature": NaN, "top_p": Infinity, "seed": -Infinity}'
    elif trick == "dup":
        raw = raw[:-1] + b', "model": 12, "model": "default-chat", "stream": true}'
    elif trick == "deep":
        depth = draw(st.sampled_from([100, 1000, 100_000]))
        raw = raw[:-1] + b', "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    elif trick == "big":
        size = draw(st.sampled_from([500_000, 1_000_000, 2_000_000]))
        filler = draw(st.sampled_from(["a", "word ", "\u00e9", "\U0001f600", "\\u0000", "\\ud800"]))
        text = (filler * (size // max(1, len(filler.encode())) + 1))[:size]
        raw = raw[:-1] + b', "padding": "' + text.encode("utf-8", "surrogatepass") + b'"}'
        if draw(st.booleans()):  # the big string where it is counted, too
            raw = raw.replace(b'"hi"', b'"' + text.encode("utf-8", "surrogatepass") + b'"', 1)
    elif trick == "latin1":
        raw = raw.replace(b'"hi"', b'"h\xe9\xff"', 1)
    elif trick == "trail":
        raw = raw + draw(st.sampled_from([b" ", b"\n", b"}", b",", b"\x00", b" garbage"]))
    return raw


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits
        return _dumps_loose(value)


def _dumps_loose(value: Any) -> bytes:
    """JSON with floats Python writes itself (keeps 1e308 and huge ints orjson refuses)."""
    import json
    return json.dumps(value).encode()


BODIES = {
    "empty": st.just(b""),
    "bytes": st.binary(max_size=2000),
    "text": st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    "json_value": JSON_VALUES.map(lambda v: _dumps(v)),
}


@st.composite
def hostile_requests(draw: st.DrawFn) -> dict[str, Any]:
    path = draw(PATHS)
    method = draw(METHODS)
    kind = draw(mostly(st.just("near"), st.sampled_from(list(BODIES))))
    body = draw(near_valid_json(path) if kind == "near" else BODIES[kind])
    headers: list[tuple[str, str]] = []
    ct = draw(CONTENT_TYPES)
    if ct is not None:
        headers.append(("content-type", ct))
    key_choice = draw(st.sampled_from(["bearer"] * 12 + ["x-api-key", "lower", "spaces", "none",
                                       "wrong", "basic", "empty", "two", "both", "bare", "id-only"]))
    made_up = "gwk_demo_" + draw(st.sampled_from(["", "s"])) + keys.generate("h")[-24:]
    SENT_SECRETS.add(secret_of(made_up))
    good = "{key}"  # filled in at send time with the gateway's demo key
    headers += {
        "bearer": [("authorization", f"Bearer {good}")],
        "x-api-key": [("x-api-key", good)],
        "lower": [("authorization", f"bearer {good}")],
        "spaces": [("authorization", f"Bearer   {good}")],
        "none": [],
        "wrong": [("authorization", f"Bearer {made_up}")],
        "basic": [("authorization", "Basic Zm9vOmJhcg==")],
        "empty": [("authorization", ""), ("x-api-key", "")],
        "two": [("authorization", f"Bearer {made_up}"), ("authorization", f"Bearer {good}")],
        "both": [("authorization", f"Bearer {made_up}"), ("x-api-key", good)],
        "bare": [("authorization", good)],
        "id-only": [("authorization", "Bearer gwk_demo_")],
    }[key_choice]
    extras = draw(st.lists(st.sampled_from([
        ("anthropic-version", "2023-06-01"), ("anthropic-version", "1999-01-01"), ("anthropic-version", ""),
        ("anthropic-beta", "x" * 200), ("content-encoding", "gzip"), ("content-encoding", "br"),
        ("content-encoding", "identity"), ("x-gateway-model", "private-chat"),
        ("x-gateway-backend", "mock-backup/mock-secondary"), ("x-gateway-error-code", "budget_exceeded"),
        ("x-gateway-prompt-tokens", "1"), ("x-envoy-original-path", "/admin"), ("x-envoy-max-retries", "50"),
        ("x-envoy-upstream-rq-timeout-ms", "1"), ("x-envoy-retry-on", "5xx"), ("x-envoy-expected-rq-timeout-ms", "1"),
        ("x-forwarded-client-cert", 'By=spiffe://x;URI=spiffe://evil/ns/a'), ("x-data-classification", "public"),
        ("x-data-classification", "\u00e9" * 3), ("x-request-id", "x" * 500), ("x-request-id", ""),
        ("expect", "100-continue"), ("accept-encoding", "gzip"), ("accept", "text/event-stream"),
        ("host", "evil.example"), ("x-forwarded-for", "1.2.3.4, 5.6.7.8"), ("te", "trailers"),
    ]), max_size=4, unique_by=lambda h: h[0]))
    headers += extras
    pad = draw(mostly(st.just(0), st.sampled_from([1000, 30_000, 56_000, 58_000, 61_000, 70_000, 120_000])))
    if pad:
        headers.append(("x-pad", "p" * pad))
    headers += [(f"x-h{i}", "v") for i in range(draw(mostly(st.just(0), st.sampled_from([80, 90, 95, 110]), 9)))]
    if ("content-encoding", "gzip") in extras and draw(st.booleans()):
        body = gzip.compress(body)
    chunked = draw(st.booleans())
    return {"method": method, "path": path, "headers": headers, "body": body, "chunked": chunked}


# -- the invariant ------------------------------------------------------------------------

def send(gw: Gateway, req: dict[str, Any]) -> httpx.Response:
    headers = [(k, v.replace("{key}", gw.key).encode()) for k, v in req["headers"]]
    body: Any = req["body"]
    if req["chunked"]:
        data = body
        body = iter([data[i:i + 65536] for i in range(0, len(data), 65536)] or [b""])
        headers = [(k, v) for k, v in headers if k != "content-length"]
    with httpx.Client(timeout=60) as http:  # one connection per request: no state carries over
        request = http.build_request(req["method"], gw.url + req["path"], headers=headers, content=body)
        return http.send(request)


def check(gw: Gateway, watch: Watch, req: dict[str, Any], resp: httpx.Response) -> None:
    reached = gw.received(gw.primary) + gw.received(gw.backup)
    code = resp.json().get("error", {}).get("code") if resp.status_code >= 400 and req["method"] != "HEAD" \
        and resp.headers.get("content-type", "").startswith("application/json") else None
    event(f"{resp.status_code} {code or ''}{' (reached a provider)' if reached else ''}")
    where = f"{req['method']} {req['path'][:120]} -> {resp.status_code} {resp.text[:400]!r}"
    assert resp.status_code < 500, where
    for sent in reached:  # the provider decodes what the gateway read and checked
        assert sent["headers"].get("content-encoding", "identity") == "identity", where
    if resp.status_code >= 400:
        if req["method"] != "HEAD":
            assert resp.headers.get("content-type", "").startswith("application/json"), where
            doc = orjson.loads(resp.content)
            assert isinstance(doc, dict) and set(doc) == {"error"}, where
            assert set(doc["error"]) == {"message", "type", "code", "param"}, where
            if not reached:
                assert doc["error"]["code"] in DOCUMENTED, where
        if not reached or resp.headers.get("x-gateway-error-code"):
            assert reached == [], f"a refused request reached a provider: {where}"
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


@settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "200")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(req=hostile_requests())
def test_hostile_requests_get_sane_answers_and_the_gateway_stays_up(hostile: tuple[Gateway, Watch],
                                                                     req: dict[str, Any]) -> None:
    gw, watch = hostile
    gw.reset()
    try:
        resp = send(gw, req)
    except httpx.TransportError as exc:
        raise AssertionError(f"no HTTP answer ({exc!r}) to {req['method']} {req['path'][:120]} "
                             f"headers={[(k, v[:80]) for k, v in req['headers']]} body={req['body'][:200]!r}") from exc
    check(gw, watch, req, resp)


# -- the SDKs, odd but typed ----------------------------------------------------------------

ODD_SCHEMA = {"type": "object", "properties": {"a": {"type": "array", "items": {"anyOf": [
    {"type": "string", "pattern": "^[\\w\\s]{0,3}$"}, {"$ref": "#/$defs/n"}]}}}, "$defs": {"n": {"type": "number"}},
    "required": []}
OPENAI_CASES: list[dict[str, Any]] = [
    {"n": 3},
    {"n": 128, "max_tokens": 1},
    {"max_tokens": 10**9},
    {"max_completion_tokens": 2**31 - 1, "temperature": 2, "top_p": 0, "seed": -(2**62)},
    {"stop": ["\n", "", "\u0000", "END" * 100]},
    {"metadata": {"k" * 64: "v" * 512, "": ""}, "store": False, "user": "\u00e9" * 300},
    {"tools": [{"type": "function", "function": {"name": "a" * 64, "parameters": {}}},
               {"type": "function", "function": {"name": "odd", "parameters": ODD_SCHEMA, "strict": False}}],
     "tool_choice": "required", "parallel_tool_calls": False},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "tool_choice": {"type": "function", "function": {"name": "not_offered"}}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ODD_SCHEMA}}},
    {"logit_bias": {"50256": -100, "1": 100}, "logprobs": True, "top_logprobs": 20, "presence_penalty": -2},
    {"stream": True, "stream_options": {"include_usage": False}, "n": 2},
    {"stream": True, "stop": "x", "max_tokens": 1},
]
ANTHROPIC_CASES: list[dict[str, Any]] = [
    {"max_tokens": 10**9},
    {"max_tokens": 1, "stop_sequences": ["\n", "END" * 100]},
    {"metadata": {"user_id": "u" * 256}, "service_tier": "auto",
     "extra_body": {"temperature": 1.0, "top_k": 1, "top_p": 0.01}},
    {"system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": ""}]},
    {"tools": [{"name": "odd", "input_schema": ODD_SCHEMA}, {"name": "e", "input_schema": {"type": "object"}}],
     "tool_choice": {"type": "any"}},
    {"tools": [{"name": "t", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "nope"}},
    {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
    {"stream": True, "stop_sequences": ["."]},
]


def _sdk_error_is_sane(gw: Gateway, status: int, body: Any, where: str) -> None:
    assert status < 500, where
    assert isinstance(body, dict), where
    error = body.get("error", body)
    assert set(error) == {"message", "type", "code", "param"}, where
    if not gw.received(gw.primary) + gw.received(gw.backup):
        assert error["code"] in DOCUMENTED, where


@pytest.mark.parametrize("model", SDK_MODELS)
@pytest.mark.parametrize("case", range(len(OPENAI_CASES)))
def test_openai_sdk_odd_parameters(hostile: tuple[Gateway, Watch], model: str, case: int) -> None:
    gw, watch = hostile
    gw.reset()
    kwargs = OPENAI_CASES[case]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60)
    try:
        result = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kwargs)
        if kwargs.get("stream"):
            chunks = list(result)
            assert chunks
        else:
            assert result.choices
    except openai.APIStatusError as err:
        _sdk_error_is_sane(gw, err.status_code, err.body if isinstance(err.body, dict) and "error" in err.body
                           else {"error": err.body}, f"{model} {kwargs}: {err.status_code} {err.body}")
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


SCHEMAS = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "number", "integer", "boolean", "null", "object",
                                                   "array", "nonsense"])},
                          optional={"description": st.text(max_size=40), "enum": st.lists(JSON_VALUES, max_size=3),
                                    "pattern": st.text(max_size=10), "format": st.text(max_size=10)}),
    lambda kids: st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(
        st.text(min_size=1, max_size=10), kids, max_size=3)}, optional={
            "required": st.lists(st.text(max_size=10), max_size=2), "additionalProperties": st.booleans()})
    | st.fixed_dictionaries({"type": st.just("array"), "items": kids})
    | st.fixed_dictionaries({"anyOf": st.lists(kids, min_size=1, max_size=3)}), max_leaves=8)
TOOL_NAMES = st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True)
TEXT = st.text(max_size=60)


@st.composite
def openai_params(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    optional = {
        "n": st.integers(1, 130), "max_tokens": st.integers(1, 2**40), "max_completion_tokens": st.integers(1, 2**40),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=4)), "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1), "seed": st.integers(-(2**63), 2**63 - 1),
        "presence_penalty": st.floats(-2, 2), "metadata": st.dictionaries(st.text(max_size=64), st.text(max_size=512),
                                                                          max_size=4),
        "user": TEXT, "logprobs": st.booleans(), "parallel_tool_calls": st.booleans(),
        "tools": st.lists(st.builds(lambda n, p, d: {"type": "function", "function": {
            "name": n, "parameters": p, "description": d}}, TOOL_NAMES, SCHEMAS, TEXT), min_size=1, max_size=3),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "stream": st.booleans(),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]),
                                                    "content": TEXT}), min_size=1, max_size=4),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=6)):
        out[name] = draw(optional[name])
    if "tool_choice" in out and "tools" not in out:
        del out["tool_choice"]
    out.setdefault("messages", [{"role": "user", "content": "hi"}])
    return out


@st.composite
def anthropic_params(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"max_tokens": draw(st.integers(1, 2**40))}
    optional = {
        "stop_sequences": st.lists(TEXT, max_size=4), "metadata": st.builds(lambda u: {"user_id": u}, TEXT),
        "system": st.one_of(TEXT, st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXT), max_size=3)),
        "tools": st.lists(st.builds(lambda n, p, d: {"name": n, "input_schema": {**p, "type": "object"},
                                                     "description": d}, TOOL_NAMES, SCHEMAS, TEXT),
                          min_size=1, max_size=3),
        "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}]),
        "stream": st.booleans(),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                    "content": st.one_of(TEXT, st.lists(st.builds(
                                                        lambda t: {"type": "text", "text": t}, TEXT), max_size=3))}),
                             min_size=1, max_size=4),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=5)):
        out[name] = draw(optional[name])
    if "tool_choice" in out and "tools" not in out:
        del out["tool_choice"]
    out.setdefault("messages", [{"role": "user", "content": "hi"}])
    return out


@settings(max_examples=int(os.environ.get("HOSTILE_SDK_EXAMPLES", "100")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(model=st.sampled_from(SDK_MODELS), params=openai_params())
def test_openai_sdk_random_typed_parameters(hostile: tuple[Gateway, Watch], model: str,
                                            params: dict[str, Any]) -> None:
    gw, watch = hostile
    gw.reset()
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, timeout=60)
    try:
        result = client.chat.completions.create(model=model, **params)
        event(f"{model} ok")
        if params.get("stream"):
            list(result)
    except openai.APIStatusError as err:
        body = err.body if isinstance(err.body, dict) and "error" in err.body else {"error": err.body}
        event(f"{model} {err.status_code} {body['error'].get('code') if isinstance(body['error'], dict) else ''}")
        _sdk_error_is_sane(gw, err.status_code, body, f"{model} {params}: {err.status_code} {err.body}")
    except openai.APIError as err:  # an error event inside a stream
        raise AssertionError(f"{model} {params}: {err!r}") from err
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


@settings(max_examples=int(os.environ.get("HOSTILE_SDK_EXAMPLES", "100")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(model=st.sampled_from(SDK_MODELS), params=anthropic_params())
def test_anthropic_sdk_random_typed_parameters(hostile: tuple[Gateway, Watch], model: str,
                                               params: dict[str, Any]) -> None:
    gw, watch = hostile
    gw.reset()
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, timeout=60)
    try:
        if params.pop("stream", False):
            with client.messages.stream(model=model, **params) as s:
                s.get_final_message()
        else:
            client.messages.create(model=model, **params)
        event(f"{model} ok")
    except anthropic.APIStatusError as err:
        event(f"{model} {err.status_code}")
        _sdk_error_is_sane(gw, err.status_code, err.body, f"{model} {params}: {err.status_code} {err.body}")
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


@pytest.mark.parametrize("model", SDK_MODELS)
@pytest.mark.parametrize("case", range(len(ANTHROPIC_CASES)))
def test_anthropic_sdk_odd_parameters(hostile: tuple[Gateway, Watch], model: str, case: int) -> None:
    gw, watch = hostile
    gw.reset()
    kwargs = {"max_tokens": 64, **ANTHROPIC_CASES[case]}
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, timeout=60)
    try:
        if kwargs.pop("stream", False):
            with client.messages.stream(model=model, messages=[{"role": "user", "content": "hi"}], **kwargs) as s:
                message = s.get_final_message()
        else:
            message = client.messages.create(model=model, messages=[{"role": "user", "content": "hi"}], **kwargs)
        assert message.content is not None
    except anthropic.APIStatusError as err:
        _sdk_error_is_sane(gw, err.status_code, err.body, f"{model} {kwargs}: {err.status_code} {err.body}")
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


# -- cases the property test found, kept as examples -------------------------------------------

HI = [{"role": "user", "content": "hi"}]


def _post(gw: Gateway, body: Any, headers: list[tuple[str, str]] = (), path: str = "/v1/chat/completions"
          ) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=60,
                      headers=[("authorization", f"Bearer {gw.key}"), *headers])


def test_n_null_is_no_choice_count(hostile: tuple[Gateway, Watch]) -> None:
    """`"n": null` (a client serializing an unset field) was a TypeError: 500 gateway_internal_error."""
    gw, watch = hostile
    gw.reset()
    resp = _post(gw, {"model": "default-chat", "messages": HI, "n": None})
    assert resp.status_code == 200, resp.text
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


@pytest.mark.parametrize("encoding", ["gzip", "br", "gzip, identity"])
@pytest.mark.parametrize("compressed", [True, False])
def test_a_compressed_body_is_415(hostile: tuple[Gateway, Watch], encoding: str, compressed: bool) -> None:
    """Envoy has no decompressor here: the ext_proc reads the bytes as they came. A plain
    JSON body under `content-encoding: br` was checked, counted and scanned as plain, then
    forwarded still labelled br for the provider to decode; a real gzip body was
    invalid_json. Both are refused as what they are."""
    gw, watch = hostile
    gw.reset()
    raw = orjson.dumps({"model": "default-chat", "messages": HI})
    resp = httpx.post(gw.url + "/v1/chat/completions", content=gzip.compress(raw) if compressed else raw, timeout=60,
                      headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json",
                               "content-encoding": encoding})
    assert resp.status_code == 415, resp.text
    assert resp.json()["error"]["code"] == "unsupported_media_type"
    assert gw.received(gw.primary) == []
    plain = httpx.post(gw.url + "/v1/chat/completions", content=raw, timeout=60, headers={
        "authorization": f"Bearer {gw.key}", "content-type": "application/json", "content-encoding": "identity"})
    assert plain.status_code == 200
    watch.alive()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"])
@pytest.mark.parametrize("hidden", ["first", "last"])
def test_a_body_with_a_key_twice_reaches_no_provider(hostile: tuple[Gateway, Watch], path: str, hidden: str) -> None:
    """The gateway's parser keeps the last of two equal keys. A body that named its prompt
    twice, a card in one copy, was checked as one prompt and forwarded as written, for a
    provider that keeps the first (or refuses) to read the other. Refused, whichever is first."""
    gw, watch = hostile
    gw.reset()
    field = "input" if path in ("/v1/responses", "/v1/embeddings") else "messages"
    body = valid_body(path, "default-embedding" if "embeddings" in path else "default-chat")
    plain = orjson.dumps(body[field])
    copies = [plain.replace(b'"hi"', b'"card 4111 1111 1111 1111"'), plain]
    del body[field]
    raw = orjson.dumps(body)[:-1] + b"".join(b', "%s": %s' % (field.encode(), v)
                                             for v in (copies if hidden == "first" else copies[::-1])) + b"}"
    resp = httpx.post(gw.url + path, content=raw, timeout=60,
                      headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == {"message": "Request body has an object with the same key twice; send each key once.",
                                    "type": "invalid_request_error", "code": "invalid_json", "param": None}
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []
    assert httpx.post(gw.url + path, content=raw.replace(copies[0], plain), timeout=60, headers={
        "authorization": f"Bearer {gw.key}", "content-type": "application/json"}).status_code == 400
    assert _post(gw, valid_body(path, "default-embedding" if "embeddings" in path else "default-chat"),
                 path=path).status_code == 200
    watch.alive()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"])
def test_a_prompt_dense_in_tokens_is_counted_and_served(hostile: tuple[Gateway, Watch], path: str) -> None:
    """250,000 "é" in one string (one token each, no space): bpe-openai refuses to make over
    200,000 tokens in one call, so this was a 500 gateway_internal_error at every endpoint."""
    gw, watch = hostile
    gw.reset()
    model = "default-embedding" if "embeddings" in path else "default-chat"
    body = valid_body(path, model)
    text = "\u00e9" * 250_000
    if "messages" in body:
        body["messages"][0]["content"] = text
    else:
        body["input"] = text
    resp = _post(gw, body, path=path)
    assert resp.status_code == 200, resp.text[:300]
    assert int(resp.headers["x-gateway-prompt-tokens"]) >= 250_000
    watch.alive()
    time.sleep(0.05)
    watch.clean_log(watch.new_log())


@pytest.mark.parametrize("model", ["default-chat", "bedrock-chat"])
@pytest.mark.parametrize("shape", ["one_big_header", "many_headers", "long_query"])
def test_headers_envoy_accepts_but_the_gateway_could_not_extend_are_431(hostile: tuple[Gateway, Watch],
                                                                         model: str, shape: str) -> None:
    """Headers just under Envoy's limits (60 KiB, 100 headers) passed Envoy's codec, then the
    route header and the provider's credentials took them over the limit: Envoy refused the
    ext_proc's mutation and the caller got 503 gateway_unavailable for its own request."""
    gw, watch = hostile
    gw.reset()
    headers: list[tuple[str, str]] = []
    path = "/v1/chat/completions"
    if shape == "one_big_header":
        headers = [("x-pad", "p" * 60_900)]
    elif shape == "many_headers":
        headers = [(f"x-h{i}", "v") for i in range(90)]
    else:
        path += "?" + "q" * 60_800
    resp = _post(gw, {"model": model, "messages": HI}, headers, path)
    assert resp.status_code == 431, resp.text
    assert resp.json()["error"]["code"] == "request_headers_too_large"
    assert gw.received(gw.primary) + gw.received(gw.backup) == []
    smaller = _post(gw, {"model": model, "messages": HI}, [("x-pad", "p" * 40_000)])
    assert smaller.status_code == 200, smaller.text
    watch.alive()


MALFORMED = {  # raw HTTP/1 that Envoy's codec refuses before any filter sees a request
    "bad_header_name": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400,
                        "malformed_http"),
    "length_and_chunked": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "malformed_http"),
    "header_over_60k": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 70_000 + b"\r\n\r\n",
                        431, "request_headers_too_large"),
    "101_headers": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
                    + b"\r\n", 431, "request_headers_too_large"),
    "binary": (b"\x00\x01\x02 garbage\r\n\r\n", 400, "malformed_http"),
    "http_1_0": (b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n", 426, "malformed_http"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_http1_gets_an_openai_shaped_answer(hostile: tuple[Gateway, Watch], case: str) -> None:
    """Envoy answers a request its HTTP/1 codec refuses with a local reply, which went
    through the ext_proc filter's response processing: the filter waited for the ext_proc
    while Envoy closed the connection, so the client got no answer at all. Response
    processing now starts only once the request headers were processed."""
    gw, watch = hostile
    gw.reset()
    raw, status, code = MALFORMED[case]
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), got[:300]
    assert b"\r\nconnection: close" in head.lower()
    error = orjson.loads(body)["error"]
    assert error["code"] == code and code in DOCUMENTED and set(error) == {"message", "type", "code", "param"}
    assert gw.received(gw.primary) + gw.received(gw.backup) == []
    watch.alive()
    watch.clean_log(watch.new_log())


def test_a_key_in_the_query_string_is_never_forwarded_or_logged(hostile: tuple[Gateway, Watch]) -> None:
    """A caller's key in the query string (`?key=`, as Gemini clients send it) went to the
    provider with the path, and into Envoy's `envoy_error` line (`path` was `%REQ(:PATH)%`)
    for the requests Envoy answers itself."""
    gw, watch = hostile
    gw.reset()
    made_up = keys.generate("in-query")
    SENT_SECRETS.add(secret_of(made_up))
    for query in (f"key={made_up}", f"api_key={gw.key}&x=1"):
        ok = httpx.post(f"{gw.url}/v1/chat/completions?{query}", json={"model": "default-chat", "messages": HI},
                        headers={"authorization": f"Bearer {gw.key}"}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert [r["path"] for r in gw.received(gw.primary)] == ["/v1/chat/completions"]
        gw.reset()
        for path in ("/v1/nope", "/"):
            resp = httpx.get(f"{gw.url}{path}?{query}", headers={"authorization": f"Bearer {gw.key}"})
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_endpoint"
        big = iter([b'{"model": "default-chat", "messages": [{"role": "user", "content": "' + b"a" * (1 << 20)]
                   + [b"a" * (1 << 20)] * 11)  # chunked, over the body limit: Envoy's own 413, which Envoy logs
        resp = httpx.post(f"{gw.url}/v1/chat/completions?{query}", content=big, timeout=30,
                          headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    time.sleep(0.3)
    watch.alive()
    watch.clean_log(watch.new_log())


@pytest.mark.parametrize("pace", [0, 0.04])
def test_a_burst_of_huge_prompts_is_refused_cleanly_and_spares_small_requests(hostile: tuple[Gateway, Watch],
                                                                               pace: float) -> None:
    """Prompts just under the 10 MiB limit, 64 at once or 150 at 25 a second: every one
    queued behind all the others in the ext_proc, waited past Envoy's message timeout and
    failed as 503 gateway_unavailable, and small requests sent meanwhile failed the same way
    or waited seconds. Now each process works on 16 MiB of large bodies at a time and refuses
    the rest early (503 gateway_busy; at the headers when the bodies ahead of it, in line or
    announced and on their way, are more than that: an HTTP/1 client gets that answer once
    its body is in, never a reset); every small request is served. Counting the announced
    bodies matters at once: with only the line counted, all 64 passed their headers, 576 MB
    crossed to the ext_proc to be refused there, and small requests waited 4-5 s behind it
    (some past the 5 s message timeout: 503 gateway_unavailable)."""
    gw, watch = hostile
    gw.reset()
    huge = b'{"model": "default-chat", "messages": [{"role": "user", "content": "' + b"hello world " * 750_000 + b'"}]}'
    auth = {"authorization": f"Bearer {gw.key}", "content-type": "application/json"}
    count = 150 if pace else 64

    async def burst() -> tuple[list[httpx.Response | BaseException], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as http:
            async def small(i: int) -> httpx.Response:
                await asyncio.sleep(0.1 * i)
                return await http.post(f"{gw.url}/v1/chat/completions", headers=auth,
                                       json={"model": "default-chat", "messages": HI})

            async def big(i: int) -> httpx.Response:
                await asyncio.sleep(pace * i)
                return await http.post(f"{gw.url}/v1/chat/completions", content=huge, headers=auth)
            smalls = asyncio.gather(*[small(i) for i in range(20)])
            bigs = await asyncio.gather(*[big(i) for i in range(count)], return_exceptions=True)
            return bigs, await smalls

    bigs, smalls = asyncio.run(burst())
    # Refused at the headers, each still got its answer: HTTP/1 refusals wait for the body's
    # end (a connection reset before).
    answered = [r for r in bigs if isinstance(r, httpx.Response)]
    assert len(answered) == count, [repr(r) for r in bigs if not isinstance(r, httpx.Response)][:5]
    outcomes = {(r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else None) for r in answered}
    assert outcomes <= {(200, None), (429, "budget_exceeded"), (429, "rate_limited"), (503, "gateway_busy")}, outcomes
    assert all(r.headers.get("retry-after") == "1" for r in answered if r.status_code == 503)
    assert any(r.status_code == 200 for r in answered)  # the first is always let through
    assert [r.status_code for r in smalls] == [200] * 20, [r.text[:200] for r in smalls if r.status_code != 200]
    watch.alive()
    watch.clean_log(watch.new_log())


@pytest.mark.parametrize("http2", [False, True])
def test_large_bodies_refused_at_their_headers_get_their_answers_not_resets(hostile: tuple[Gateway, Watch],
                                                                            http2: bool) -> None:
    """16 callers at once send a known key's 9 MB body that is refused at its headers (here
    as `text/plain`). Answered at once, Envoy closed each HTTP/1 connection with the body
    unread a second later and reset each HTTP/2 stream, and httpx (which writes the whole
    body before it reads) saw the break, 15 of 16 times over HTTP/1, 16 of 16 over HTTP/2.
    Now the answer waits for the body's end. The bodies never reach the ext_proc, and each
    refusal is logged once, by the ext_proc, not again by Envoy."""
    gw, watch = hostile
    body = b'{"model": "default-chat", "messages": [{"role": "user", "content": "' + b"hello world " * 750_000 + b'"}]}'
    auth = {"authorization": f"Bearer {gw.key}"}

    async def burst() -> tuple[list[httpx.Response | BaseException], httpx.Response]:
        async with httpx.AsyncClient(timeout=60, http1=not http2, http2=http2,
                                     limits=httpx.Limits(max_connections=32)) as http:
            refused = await asyncio.gather(*[
                http.post(f"{gw.url}/v1/chat/completions", content=body, headers={**auth, "content-type": "text/plain"})
                for _ in range(16)], return_exceptions=True)
            return refused, await http.post(f"{gw.url}/v1/chat/completions", headers=auth,
                                            json={"model": "default-chat", "messages": HI})

    refused, ok = asyncio.run(burst())
    assert all(isinstance(r, httpx.Response) for r in refused), [repr(r) for r in refused][:5]
    for resp in refused:
        assert isinstance(resp, httpx.Response)
        assert resp.status_code == 415, resp.text[:300]
        assert resp.headers["content-type"] == "application/json"
        assert "retry-after" not in resp.headers
        error = resp.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("unsupported_media_type", "invalid_request_error", None)
        assert "Content-Type: application/json" in error["message"]
    assert ok.status_code == 200, ok.text[:300]
    time.sleep(0.3)
    log = watch.new_log()
    assert log.count('"error_code":"unsupported_media_type"') == 16, log[-2000:]
    assert "envoy_error" not in log
    watch.alive()
    watch.clean_log(log)


@pytest.fixture(scope="module")
def unbudgeted() -> Iterator[tuple[Gateway, Watch]]:
    with running_gateway("gw-unbudgeted-", customize=no_budgets) as gw:
        yield gw, Watch(gw)


@pytest.mark.parametrize("stream", [False, True])
def test_a_huge_answer_is_scanned_off_the_event_loop(unbudgeted: tuple[Gateway, Watch], stream: bool) -> None:
    """An 8 MB answer full of numbers takes output scanning seconds; it blocked the ext_proc's
    event loop, so every request meanwhile waited as long as the whole answer did. Now it is
    read in a thread, as a large request is, and so is each piece of a stream over 64 KiB (a
    provider writing megabytes at once): requests sent meanwhile are served in a fraction of
    that time (a ratio to the big request's own time, not a fixed bound). Without budgets: under
    one, a provider writing far more tokens an event than it was granted is cut (docs/budgets.md)."""
    gw, watch = unbudgeted
    gw.reset()
    auth = {"authorization": f"Bearer {gw.key}"}
    chat = {"model": "private-chat", "messages": HI, "stream": stream, "max_tokens": 2000}
    # 800 words of ~10 KB (a stream's events: fewer than the reservation's 2,000, each under the
    # 1 MiB an event may have), written 1 MB at a time
    big_headers = {**auth, "x-mock-ignore-max-tokens": "1", "x-mock-reply-repeat": "800", "x-mock-chunk-bytes": "1000000",
                   "x-mock-reply": "order-12-at-10:30-on-2024-01-01-v1.2.3," * 250 + " "}

    async def run() -> tuple[int, bytes, float, list[tuple[int, float]]]:
        async with httpx.AsyncClient(timeout=60) as http:
            async def big() -> tuple[int, bytes, float]:
                started = time.perf_counter()
                async with http.stream("POST", f"{gw.url}/v1/chat/completions", json=chat, headers=big_headers) as r:
                    body = await r.aread()
                return r.status_code, body, time.perf_counter() - started

            async def smalls() -> list[tuple[int, float]]:
                out = []
                for _ in range(60):
                    started = time.perf_counter()
                    r = await http.post(f"{gw.url}/v1/chat/completions", json={**chat, "stream": False}, headers=auth)
                    out.append((r.status_code, time.perf_counter() - started))
                    await asyncio.sleep(0.05)
                return out
            (status, body, took), small = await asyncio.gather(big(), smalls())
            return status, body, took, small

    status, body, took, small = asyncio.run(run())
    assert status == 200 and len(body) > 7_000_000
    assert body.rstrip().endswith(b"data: [DONE]") if stream else body.endswith(b"}")
    assert [s for s, _ in small] == [200] * 60
    assert max(t for _, t in small) < took / 3, (took, sorted(t for _, t in small)[-5:])
    watch.alive()


def test_the_gateway_is_ready_at_the_end(hostile: tuple[Gateway, Watch]) -> None:
    gw, watch = hostile
    watch.alive()
    assert httpx.get(f"{gw.stack.admin_url}/ready").status_code == 200
    time.sleep(0.3)
    text = "".join(gw.stack.log_path(n).read_text(errors="replace") for n in ("extproc", "envoy"))
    watch.clean_log(text)
