"""Secrets a caller puts in the trace headers (`tracestate`, `x-session-id`) never reach a span.

test_output_leaks.py places a key in `tracestate` alone: without a `traceparent` no
propagator reads it, so that case never exercised the path where a trace is continued. With
a valid `traceparent`, the caller's `tracestate` was copied into the trace state of every
span, Envoy's (with `tracing.otlp` on) and the ext_proc's, and a key the gateway refused
in `x-session-id` (403 `content_blocked`, found by its own header classification) was
still written to the ext_proc's span as `session.id`."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from gateway_extproc import keys

from .conftest import Gateway, running_gateway
from .test_output_leaks import leaks
from .test_tracing import PARENT_ID, Collector, attrs, otlp_collector, wait_for

TRACE_ID = "7a3c0f5577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module", params=["extproc-tracer", "envoy-and-extproc-tracers"])
def traced(request: pytest.FixtureRequest) -> Iterator[tuple[Gateway, Collector]]:
    """The ext_proc exporting spans; in the second case Envoy's tracer too (tracing.otlp)."""
    with otlp_collector(None) as (collector, port, env):
        def customize(values: dict) -> None:
            if request.param == "envoy-and-extproc-tracers":
                values["tracing"]["otlp"] = {"address": "127.0.0.1", "port": port}
        with running_gateway("gw-trace-leaks-", env=env, customize=customize) as gw:
            yield gw, collector


def chat() -> dict:
    return {"model": "default-chat", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5}


def spans_of(collector: Collector, trace_id: str) -> list:
    return [s for s in list(collector.spans) if s.trace_id.hex() == trace_id]


def trace_id_for(i: int) -> str:
    return f"{i:02x}" + TRACE_ID[2:]


def test_a_key_in_tracestate_is_in_no_span(traced: tuple[Gateway, Collector]) -> None:
    gw, collector = traced
    gw.reset()
    other = keys.generate("tracestate")  # a key of another gateway: refused the same way
    opaque = "f3a9c2d81b7e4f60a5d9c3b2e1f07a6c"  # an Azure-style key: no detector knows it
    sent = []
    for i, value in enumerate((gw.key, other, opaque), 1):
        trace_id = trace_id_for(i)
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json=chat(), timeout=30, headers={
            "authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01",
            "tracestate": f"vendor={value}"})
        assert resp.status_code in (200, 403), resp.text
        sent.append((trace_id, value))
    # every request's spans have arrived (the ext_proc's at least, Envoy's too when on)
    wait_for(lambda: all(spans_of(collector, t) for t, _ in sent), 20)
    time.sleep(1.5)
    for trace_id, value in sent:
        spans = spans_of(collector, trace_id)
        states = {s.trace_state for s in spans}
        assert leaks(value, {"spans": "\n".join(str(s) for s in spans)}) == [], (value[:12], states)
    # the provider got no caller trace state either
    received = [r for mock in (gw.primary, gw.backup) for r in gw.received(mock)]
    assert received, "the opaque value is no key: that request was admitted"
    assert not any(opaque in str(r["headers"]) for r in received)


def test_a_key_in_x_session_id_is_in_no_span(traced: tuple[Gateway, Collector]) -> None:
    """A key in `x-session-id` is refused by header classification (403 content_blocked)
    and must not be exported as the span's `session.id` either; an ordinary session id
    still is."""
    gw, collector = traced
    gw.reset()
    cases = [(trace_id_for(10), gw.key, 403), (trace_id_for(11), keys.generate("session"), 403),
             (trace_id_for(12), "sess-ordinary-42", 200)]
    for trace_id, session, status in cases:
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json=chat(), timeout=30, headers={
            "authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-{PARENT_ID}-01",
            "x-session-id": session})
        assert resp.status_code == status, resp.text
    wait_for(lambda: all(any(collector.service.get(s.span_id) == "gateway-extproc" for s in spans_of(collector, t))
                         for t, _, _ in cases), 20)
    time.sleep(1.0)
    for trace_id, session, status in cases:
        spans = spans_of(collector, trace_id)
        mine = [s for s in spans if collector.service.get(s.span_id) == "gateway-extproc"]
        if status == 200:
            assert [attrs(s).get("session.id") for s in mine] == [session]
        else:
            assert leaks(session, {"spans": "\n".join(str(s) for s in spans)}) == [], session[:12]


# -- a provider quoting part of the gateway's credential ----------------------------------

# (model, the credential its answering backend is presented, status that is not retried)
ANSWERED = [("private-chat", "primary", 429), ("default-chat", "primary", 400), ("azure-chat", "backup", 429),
            ("gemini-chat", "backup", 429), ("claude-chat", "backup", 400), ("bedrock-chat", "backup", 429)]


@pytest.fixture(scope="module")
def providers() -> Iterator[Gateway]:
    from .conftest import add_provider_models
    with running_gateway("gw-partial-echo-", customize=add_provider_models) as gw:
        yield gw


def pieces_of(secret: str, n: int = 8) -> list[str]:
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


@pytest.mark.parametrize("model,which,status", ANSWERED)
@pytest.mark.parametrize("shape", ["masked", "suffix", "header"])
def test_a_provider_error_quoting_part_of_the_credential_passes_on_no_piece_of_it(
        providers: Gateway, model: str, which: str, status: int, shape: str) -> None:
    """Providers (and proxies before them) quote a key they were presented in part: its
    start and end around asterisks, or "the key ending …". The whole value was cut; a piece
    of 8 or more of its characters went to the client as sent."""
    import base64
    import json

    gw = providers
    key = gw.primary_key if which == "primary" else gw.backup_key
    secret = key.split("-", 2)[2]  # `sk-primary-` / `sk-backup-` is no secret
    message = {"masked": f"Key {key[:14]}*****{key[-10:]} is over its quota.",
               "suffix": f"Quota exceeded for the key ending ...{key[-12:]}.",
               "header": "Quota exceeded."}[shape]
    headers = {"x-mock-status": str(status), "x-mock-error-message-base64": base64.b64encode(message.encode()).decode()}
    if shape == "header":
        headers["x-mock-response-headers"] = json.dumps({"x-debug-key-hint": f"...{key[-12:]}"})
    resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers={
        "authorization": f"Bearer {gw.key}", **headers},
        json={"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})
    assert resp.status_code == status, resp.text
    answer = resp.text + json.dumps(dict(resp.headers))
    assert [p for p in pieces_of(secret) if p in answer] == [], (shape, answer[:300])



def _stream_events(model: str, message: str) -> list[bytes]:
    """Some text, then the provider's own mid-stream error event quoting `message`, in the
    wire shape of the provider the model's backend speaks."""
    import json

    if model == "claude-chat":
        start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                       "model": "claude", "content": [],
                                                       "usage": {"input_tokens": 3, "output_tokens": 0}}}
        return [b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n",
                b"event: error\ndata: " + json.dumps({"type": "error", "error": {
                    "type": "overloaded_error", "message": message}}).encode() + b"\n\n"]
    if model == "gemini-chat":
        text = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]}}]}
        return [b"data: " + json.dumps(text).encode() + b"\r\n\r\n", b"data: " + json.dumps({"error": {
            "code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}).encode() + b"\r\n\r\n"]
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]}
    return [b"data: " + json.dumps(chunk).encode() + b"\n\n", b"data: " + json.dumps({"error": {
        "message": message, "type": "rate_limit_error", "code": "rate_limit_exceeded"}}).encode() + b"\n\n"]


@pytest.mark.parametrize("model,which", [("default-chat", "primary"), ("private-chat", "primary"),
                                         ("claude-chat", "backup"), ("gemini-chat", "backup")])
def test_a_mid_stream_error_quoting_part_of_the_credential_passes_on_no_piece_of_it(
        providers: Gateway, model: str, which: str) -> None:
    """The same partial quotes as above, in the provider's error event after the stream began
    (a quota hit mid-answer). A JSON error answer was cut of every piece; the stream's error
    event reached the client with the key's last 12 characters, for every provider kind."""
    import base64
    import json

    gw = providers
    key = gw.primary_key if which == "primary" else gw.backup_key
    secret = key.split("-", 2)[2]
    message = f"Quota exceeded for the key ending ...{key[-12:]}; masked {key[:14]}*****{key[-10:]}"
    events = [base64.b64encode(e).decode() for e in _stream_events(model, message)]
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, headers={
            "authorization": f"Bearer {gw.key}", "x-mock-raw-events": json.dumps(events)},
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                  "stream": True}) as resp:
        body = resp.read().decode()
    assert resp.status_code == 200 and "Quota exceeded for the key ending" in body, body[-400:]
    assert [p for p in pieces_of(secret) if p in body] == [], body[-400:]



@pytest.mark.parametrize("shape", ["error", "response.failed"])
def test_a_responses_stream_failure_quoting_part_of_the_credential_passes_on_no_piece_of_it(
        providers: Gateway, shape: str) -> None:
    """The Responses API's own failure events (`error`, `response.failed` with `response.error`)
    quoting "the key ending …" reached the OpenAI SDK's stream as sent."""
    import base64
    import json

    from openai import OpenAI

    gw = providers
    key = gw.primary_key
    message = f"Quota exceeded for the key ending ...{key[-12:]}"
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "model": "m", "output": []}
    failure = ({"type": "error", "code": "rate_limit_exceeded", "message": message, "param": None}
               if shape == "error" else
               {"type": "response.failed", "response": {**response, "status": "failed", "error": {
                   "code": "server_error", "message": message}}})
    created = {"type": "response.created", "response": response}
    events = [b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n",
              f"event: {shape}\ndata: ".encode() + json.dumps(failure).encode() + b"\n\n"]
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0, default_headers={
        "x-mock-raw-events": json.dumps([base64.b64encode(e).decode() for e in events])})
    seen = []
    try:
        for event in client.responses.create(model="default-chat", input="hi", max_output_tokens=16, stream=True):
            seen.append(event.model_dump_json())
    except Exception as err:  # the SDK raises on an `error` event
        seen.append(repr(err))
    text = "\n".join(seen)
    assert "Quota exceeded for the key ending" in text, text[-400:]
    assert [p for p in pieces_of(key.split("-", 2)[2]) if p in text] == [], text[-400:]



# -- the gateway's own admin token in a prompt ----------------------------------------------

def test_an_admin_token_pasted_into_a_prompt_reaches_no_provider_log_or_audit_record(providers: Gateway) -> None:
    """A platform engineer pastes the key admin API's token (`gwa_…`) into a question. Caller
    keys (`gwk_…`) are refused there as credentials; the admin token was neither a credential
    to classification nor to the log mask: it went to the provider, into the access line's
    prompt (content logging) and into the audit record."""
    from openai import OpenAI, PermissionDeniedError

    from gateway_extproc.keyadmin import admin_token

    from .test_output_leaks import audit_lines

    gw = providers
    gw.reset()
    token, _ = admin_token()
    before = len(gw.logs())
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    with pytest.raises(PermissionDeniedError) as refused:
        client.chat.completions.create(model="default-chat", max_tokens=5, messages=[
            {"role": "user", "content": f"Why does curl with {token} get a 401 from the key admin API?"}])
    assert refused.value.code == "content_blocked"
    time.sleep(1.0)
    received = "\n".join(str(r) for mock in (gw.primary, gw.backup) for r in gw.received(mock))
    outputs = {"logs": gw.logs()[before:], "audit": "\n".join(audit_lines(gw)), "provider": received}
    assert leaks(token, outputs) == []


# -- Envoy at debug or trace level --------------------------------------------------------

def chart_envoy_log_args(level: str) -> list[str]:
    """The log arguments the chart's Deployment gives Envoy at `deployment.envoy.logLevel`."""
    import helm_python
    import yaml

    from gateway_extproc.render import CHART

    rendered = helm_python.Chart.load(str(CHART)).render({"deployment": {"envoy": {"logLevel": level}}},
                                                          name="gw", namespace="ai-platform")
    docs = [d for path, text in rendered.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [envoy] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy"]
    args = envoy["args"]
    return [x for i, a in enumerate(args) if a.startswith("--") and "log-level" in a for x in (a, args[i + 1])]


@pytest.mark.parametrize("level", ["debug", "trace"])
def test_envoy_at_the_charts_debug_or_trace_level_logs_no_key_or_credential(level: str) -> None:
    """`deployment.envoy.logLevel: debug` is the chart's own knob for troubleshooting; at
    that level Envoy dumped every request's headers (the caller's `Authorization`) and the
    ext_proc's header mutations (the provider credential it injects) into its log."""
    from gateway_extproc import localstack

    from .conftest import add_provider_models

    log_args = chart_envoy_log_args(level)
    assert log_args[:2] == ["--log-level", level]
    original = localstack.LocalStack.start_envoy

    def start_envoy(self: localstack.LocalStack) -> None:
        self._spawn("envoy", [localstack.envoy_binary(), "-c", str(self.workdir / "envoy.yaml"), *log_args,
                              "--disable-hot-restart", "--file-flush-interval-msec", "200"])
        self._wait("envoy", self._ready, "Envoy", timeout=30)

    localstack.LocalStack.start_envoy = start_envoy  # type: ignore[method-assign]
    try:
        with running_gateway("gw-envoy-debug-", customize=add_provider_models) as gw:
            wrong = keys.generate("wrong")
            for model in ("default-chat", "claude-chat", "azure-chat", "gemini-chat", "bedrock-chat", "private-chat"):
                for stream in (False, True):
                    resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers={
                        "authorization": f"Bearer {gw.key}", "x-api-key": gw.key},
                        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                              "stream": stream})
                    assert resp.status_code == 200, resp.text
            assert httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {wrong}"},
                              json=chat(), timeout=30).status_code == 401
            time.sleep(1.0)
            log = gw.stack.log_path("envoy").read_text(errors="replace")
            assert f"[{level}]" in log  # Envoy did log at that level
            for secret in (gw.key, wrong, gw.primary_key, gw.backup_key):
                assert leaks(secret, {"envoy log": log}) == [], secret[:12]
    finally:
        localstack.LocalStack.start_envoy = original  # type: ignore[method-assign]


# -- a password in the audit trail's Redis Stream URL -------------------------------------

def test_a_password_in_the_audit_stream_url_reaches_neither_the_trail_nor_a_log() -> None:
    """The render refuses a password in `budgets.redis.url` (it would land in the ConfigMap),
    but not in `audit.redisStream.url`: the password went into gateway.yaml, and from there
    into the audit trail's own copies of each config version (`DIR/configs/<sha256>.yaml`,
    documented as carrying no secret). Refused at render now, as for budgets."""
    from gateway_extproc.render import RenderError

    password = "Sup3rS3cretRedisPassw0rd"
    for url in (f"redis://:{password}@127.0.0.1:1/0", f"redis://default:{password}@127.0.0.1:1/0",
                f"redis://127.0.0.1:1/0?password={password}"):
        def customize(values: dict) -> None:
            values["audit"]["redisStream"] = {"url": url}
        try:
            with running_gateway("gw-audit-stream-pw-", customize=customize) as gw:
                time.sleep(1.5)
                trail = "\n".join(p.read_text(errors="replace") for p in (gw.stack.workdir / "audit").rglob("*")
                                  if p.is_file() and p.suffix in (".yaml", ".jsonl"))
                outputs = {"audit trail": trail, "logs": gw.logs()}
                assert leaks(password, outputs) == [], url
        except RenderError as err:
            assert "audit.redisStream.url" in str(err) and password not in str(err)
