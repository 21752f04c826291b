"""Nothing secret, nothing restricted leaves through an output: a caller's key, a provider key,
a bearer token or a card number placed in any caller-controlled spot other than the prompt
text — a header, the path, the query, a JSON key, a non-content field, a malformed body, on
/v1/chat/completions, /v1/messages and /v1/responses — appears in no ext_proc or Envoy log
line, no audit record, no span, no /metrics series, no error body and no response header
(also not percent-encoded, JSON-escaped or base64'd), and a card never reaches a provider.

Prompt text itself is covered by tests/integration/test_pii_egress.py; what is logged of it
is the documented content-logging policy (docs/classification.md)."""

from __future__ import annotations

import base64
import json
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway_extproc.audit.records import records
from .conftest import Gateway, running_gateway
from .test_tracing import Collector, otlp_collector, wait_for


@pytest.fixture(scope="module")
def leaky() -> Iterator[tuple[Gateway, Collector]]:
    with otlp_collector() as (collector, _, env), running_gateway("gw-leaks-", env=env) as gw:
        yield gw, collector


# -- values that must never come out -----------------------------------------------------

def card(rng: random.Random) -> str:
    """A Luhn-valid Visa number (the default classification rules: restricted, redact)."""
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = sum(d if i % 2 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits)))
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


def secret_of(kind: str, gw: Gateway, rng: random.Random) -> str:
    token = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(24))
    return {
        "gateway-key": gw.key,  # the caller's real key, valid on this gateway
        "other-gateway-key": f"gwk_leak_{token}",
        "provider-key": gw.primary_key,
        "jwt": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ" + token + ".c2lnbmF0dXJl" + token[:8],
        "card": card(rng),
    }[kind]


def needles(value: str) -> list[str]:
    """The forms a value could take in an output: as is, percent-encoded, JSON-escaped, base64."""
    out = {value, urllib.parse.quote(value, safe=""), orjson.dumps(value).decode()[1:-1],
           base64.b64encode(value.encode()).decode().rstrip("=")[:-2],
           base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")[:-2]}
    return [n for n in out if len(n) >= 12]


def found_in(value: str, text: str, digits_only: str | None = None) -> bool:
    if any(n in text for n in needles(value)):
        return True
    return value.isdigit() and digits_only is not None and value in digits_only


# -- where a caller can put one ----------------------------------------------------------

@dataclass(frozen=True)
class Request:
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = None  # a JSON value, or bytes sent as they are
    auth: bool = True


def chat(model: str, **extra: Any) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, **extra}


def messages_body(model: str, **extra: Any) -> dict:
    return {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}], **extra}


def responses_body(model: str, **extra: Any) -> dict:
    return {"model": model, "input": "Say hi.", "max_output_tokens": 16, **extra}


H = lambda name, fmt="{}": (lambda s, m: Request(headers=((name, fmt.format(s)),), body=chat(m)))  # noqa: E731

PLACES: dict[str, Callable[[str, str], Request]] = {
    # headers
    "x-request-id": H("x-request-id"),
    "user-agent": H("user-agent", "my-app/1.0 {}"),
    "traceparent": H("traceparent", "00-{}-00f067aa0ba902b7-01"),
    "tracestate": H("tracestate", "vendor={}"),
    # with a traceparent, so a propagator reads it (alone it is ignored): test_secret_leaks_attack.py
    "tracestate-continued": lambda s, m: Request(headers=(
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("tracestate", f"vendor={s}")),
        body=chat(m)),
    "x-forwarded-for": H("x-forwarded-for"),
    "x-envoy-original-path": H("x-envoy-original-path", "/v1/{}"),
    "x-envoy-downstream-service-cluster": H("x-envoy-downstream-service-cluster"),
    "x-client-trace-id": H("x-client-trace-id"),
    "x-gateway-model": H("x-gateway-model"),
    "x-gateway-error-code": H("x-gateway-error-code"),
    "x-data-classification": H("x-data-classification"),
    "openai-organization": H("openai-organization"),
    "openai-project": H("openai-project"),
    "anthropic-version": H("anthropic-version"),
    "anthropic-beta": H("anthropic-beta"),
    "cookie": H("cookie", "session={}"),
    "api-key": H("api-key"),
    "x-goog-api-key": H("x-goog-api-key"),
    "proxy-authorization": H("proxy-authorization", "Bearer {}"),
    "x-api-key-besides-authorization": H("x-api-key"),
    "content-type-charset": H("content-type", "application/json; charset={}"),
    "content-type": lambda s, m: Request(headers=(("content-type", f"text/{s}"),), body=b"{}"),
    "authorization-wrong-key": lambda s, m: Request(headers=(("authorization", f"Bearer {s}"),), body=chat(m), auth=False),
    "authorization-bearer-twice": lambda s, m: Request(headers=(("authorization", f"Bearer Bearer {s}"),),
                                                       body=chat(m), auth=False),
    "authorization-odd-case": lambda s, m: Request(headers=(("authorization", f"bEaReR {s}"),), body=chat(m), auth=False),
    "authorization-basic": lambda s, m: Request(
        headers=(("authorization", "Basic " + base64.b64encode(f"user:{s}".encode()).decode()),), body=chat(m), auth=False),
    "x-api-key-wrong-key": lambda s, m: Request(headers=(("x-api-key", s),), body=chat(m), auth=False),
    # request line
    "method": lambda s, m: Request(method=s.replace(".", "_"), body=chat(m)),
    # path and query
    "unknown-path": lambda s, m: Request(path=f"/v1/{s}", body=chat(m)),
    "unknown-path-get": lambda s, m: Request(method="GET", path=f"/v1/{s}/files"),
    "path-suffix": lambda s, m: Request(path=f"/v1/chat/completions/{s}", body=chat(m)),
    "path-percent-encoded": lambda s, m: Request(path="/v1/%63hat/" + urllib.parse.quote(s, safe=""), body=chat(m)),
    "query": lambda s, m: Request(path=f"/v1/chat/completions?key={s}", body=chat(m)),
    "query-unknown-path": lambda s, m: Request(path=f"/v1/nothing?key={s}", body=chat(m)),
    "models-path": lambda s, m: Request(method="GET", path=f"/v1/models/{s}"),
    # JSON: the model, non-content fields, keys, wrong types
    "model": lambda s, m: Request(body=chat(s)),
    "model-in-list": lambda s, m: Request(body=chat(m) | {"model": [s]}),
    "user": lambda s, m: Request(body=chat(m, user=s)),
    "metadata-value": lambda s, m: Request(body=chat(m, metadata={"ticket": s}, store=True)),
    "metadata-key": lambda s, m: Request(body=chat(m, metadata={s: "x"}, store=True)),
    "top-level-key": lambda s, m: Request(body=chat(m) | {s: 1}),
    "tool-name": lambda s, m: Request(body=chat(m, tools=[{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {s: {"type": "string"}}}}}])),
    "response-format-schema-key": lambda s, m: Request(body=chat(m, response_format={
        "type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object", "properties": {
            s: {"type": "string"}}}}})),
    "stop": lambda s, m: Request(body=chat(m, stop=[s])),
    "logit-bias-key": lambda s, m: Request(body=chat(m, logit_bias={s: 1})),
    "n-wrong-type": lambda s, m: Request(body=chat(m, n=s)),
    "seed-wrong-type": lambda s, m: Request(body=chat(m, seed=s)),
    "max-tokens-wrong-type": lambda s, m: Request(body=chat(m, max_tokens=s)),
    "stream-wrong-type": lambda s, m: Request(body=chat(m, stream=s)),
    "messages-wrong-type": lambda s, m: Request(body={"model": m, "messages": s}),
    "message-wrong-type": lambda s, m: Request(body={"model": m, "messages": [s]}),
    "stream-options-key": lambda s, m: Request(body=chat(m, stream=True, stream_options={s: True})),
    "embeddings-token-id": lambda s, m: Request(path="/v1/embeddings", body={
        "model": "default-embedding", "input": [[1, int(s)]] if s.isdigit() else [[1, 2]], "user": s}),
    "embeddings-encoding-format": lambda s, m: Request(path="/v1/embeddings", body={
        "model": "default-embedding", "input": "hi", "encoding_format": s}),
    # bodies the gateway cannot read
    "malformed-json": lambda s, m: Request(body=b'{"model": "' + m.encode() + b'", "user": "' + s.encode() + b'"'),
    "non-utf8": lambda s, m: Request(body=b'{"model": "' + m.encode() + b'", "user": "\xff' + s.encode() + b'"}'),
    "duplicate-keys": lambda s, m: Request(body=b'{"model": "' + s.encode() + b'", "model": "' + m.encode() + b'"}'),
    "trailing-garbage": lambda s, m: Request(body=orjson.dumps(chat(m)) + b" " + s.encode()),
    # Anthropic /v1/messages
    "messages-model": lambda s, m: Request(path="/v1/messages", body=messages_body(s)),
    "messages-metadata": lambda s, m: Request(path="/v1/messages", body=messages_body(m, metadata={"user_id": s})),
    "messages-stop": lambda s, m: Request(path="/v1/messages", body=messages_body(m, stop_sequences=[s])),
    "messages-max-tokens": lambda s, m: Request(path="/v1/messages", body=messages_body(m) | {"max_tokens": s}),
    "messages-system-wrong-type": lambda s, m: Request(path="/v1/messages", body=messages_body(m, system={"x": s})),
    "messages-tool": lambda s, m: Request(path="/v1/messages", body=messages_body(m, tools=[{
        "name": "lookup", "input_schema": {"type": "object", "properties": {s: {"type": "string"}}}}])),
    "messages-x-api-key": lambda s, m: Request(path="/v1/messages", headers=(("x-api-key", s),),
                                               body=messages_body(m), auth=False),
    # OpenAI Responses
    "responses-model": lambda s, m: Request(path="/v1/responses", body=responses_body(s)),
    "responses-metadata-key": lambda s, m: Request(path="/v1/responses", body=responses_body(m, metadata={s: "x"})),
    "responses-user": lambda s, m: Request(path="/v1/responses", body=responses_body(m, user=s)),
    "responses-input-wrong-type": lambda s, m: Request(path="/v1/responses", body=responses_body(m, input={"x": s})),
    "responses-text-schema-key": lambda s, m: Request(path="/v1/responses", body=responses_body(m, text={"format": {
        "type": "json_schema", "name": "out", "schema": {"type": "object", "properties": {s: {"type": "string"}}}}})),
}
# Where a card must not reach the provider either: every body place and every header (the
# gateway classifies both: docs/classification.md, "Request headers"), but the credential
# and content-type places, where a request carrying it is refused before anything is sent.
BODY_PLACES = frozenset(p for p in PLACES if not p.startswith(("content-type", "authorization", "x-api-key",
                                                               "messages-x-api-key", "method")))
KINDS = ["gateway-key", "other-gateway-key", "provider-key", "jwt", "card"]
MODELS = {"/v1/chat/completions": ["default-chat", "private-chat", "claude-chat"],
          "/v1/messages": ["claude-chat", "private-chat"], "/v1/responses": ["default-chat", "private-chat"]}

PLACED: list[tuple[str, str, str]] = []  # (place, kind, value) sent so far, checked again at the end


def send(gw: Gateway, req: Request) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if req.auth:
        headers["authorization"] = f"Bearer {gw.key}"
    headers.update(dict(req.headers))
    content = req.body if isinstance(req.body, bytes) or req.body is None else orjson.dumps(req.body)
    return httpx.request(req.method, gw.url + req.path, headers=headers, content=content, timeout=30)


def audit_lines(gw: Gateway) -> list[str]:
    audit_dir = gw.stack.workdir / "audit"
    return [orjson.dumps(r).decode() for r in records(audit_dir)] if audit_dir.exists() else []


LOGS = ("extproc", "envoy")
Mark = tuple[tuple[int, ...], frozenset[str], int, int]


def log_texts(gw: Gateway) -> list[str]:
    return [gw.stack.log_path(n).read_text(errors="replace") for n in LOGS]


def mark(gw: Gateway, collector: Collector) -> Mark:
    """Where each output stands now: what a request writes comes after (values such as the
    caller's own key are the same in every example)."""
    # audit chains are one file per tier: a new record is not always the last one read
    return tuple(len(t) for t in log_texts(gw)), frozenset(audit_lines(gw)), len(collector.spans), len(collector.metrics)


def outputs(gw: Gateway, collector: Collector, since: Mark = ((0, 0), frozenset(), 0, 0)) -> dict[str, str]:
    """Everything the gateway wrote that is not the answer: logs, audit, spans, metrics."""
    logs, audit, spans, metrics = since
    return {
        "logs": "".join(t[start:] for t, start in zip(log_texts(gw), logs)),
        "audit": "\n".join(line for line in audit_lines(gw) if line not in audit),
        "spans": "\n".join(str(s) for s in list(collector.spans)[spans:])
                 + "\n".join(str(m) for m in list(collector.metrics)[metrics:]),
        "metrics": httpx.get(gw.stack.metrics_url, timeout=5).text,
    }


def provider_saw(gw: Gateway, secret_headers_only: bool) -> str:
    """What the mock providers received: headers, and the raw body unless only caller
    credentials matter (a body field the caller fills is the caller's data to send)."""
    out = []
    for mock in (gw.primary, gw.backup):
        for r in gw.received(mock):
            headers = {k: v for k, v in r["headers"].items() if k not in ("authorization", "x-api-key", "api-key",
                                                                           "x-goog-api-key")}
            if secret_headers_only:
                # the provider's own credential is expected there; nothing else of the caller's
                headers = {k: v for k, v in r["headers"].items() if k.lower() in (
                    "authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "proxy-authorization")}
                creds = (gw.primary_key, gw.backup_key)
                headers = {k: v for k, v in headers.items() if not any(c in v for c in creds)}
                out.append(json.dumps(headers))
                continue
            out.append(json.dumps(headers) + base64.b64decode(r["raw_body_base64"]).decode("utf-8", "replace"))
    return "\n".join(out)


def leaks(value: str, texts: dict[str, str]) -> list[str]:
    return [name for name, text in texts.items()
            if found_in(value, text, re.sub(r"\D", "", text) if value.isdigit() else None)]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(place=st.sampled_from(sorted(PLACES)), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32),
       pick=st.integers(0, 2))
def test_a_value_placed_anywhere_comes_out_nowhere(leaky: tuple[Gateway, Collector], place: str, kind: str,
                                                   seed: int, pick: int) -> None:
    gw, collector = leaky
    gw.reset()
    value = secret_of(kind, gw, random.Random(seed))
    req = PLACES[place](value, "")
    models = MODELS.get(req.path, MODELS["/v1/chat/completions"])
    req = PLACES[place](value, models[pick % len(models)])
    before = mark(gw, collector)
    resp = send(gw, req)
    PLACED.append((place, kind, value))
    answer = {"headers": json.dumps(dict(resp.headers))}
    if resp.status_code >= 400 or place.startswith(("authorization", "x-api-key")):
        answer["body"] = resp.text  # an error: nothing of the request is quoted
    # The access line and the audit record are written when the answer goes out.
    request_id = resp.headers.get("x-request-id", "")
    wait_for(lambda: request_id in gw.logs(), 10)
    seen = {**outputs(gw, collector, before), **answer}
    if kind == "card" and place in BODY_PLACES:
        seen["provider"] = provider_saw(gw, secret_headers_only=False)
    elif kind != "card":
        seen["provider-credential-headers"] = provider_saw(gw, secret_headers_only=True)
    assert leaks(value, seen) == [], f"{kind} placed in {place} (HTTP {resp.status_code}: {resp.text[:300]})"


def test_no_value_placed_earlier_reached_a_span_or_the_audit_trail_later(leaky: tuple[Gateway, Collector]) -> None:
    """Spans are exported in batches and audit records by a writer thread: checked once more
    after both have flushed."""
    gw, collector = leaky
    assert PLACED, "run with the property test"
    time.sleep(1.5)
    seen = outputs(gw, collector)
    leaked = sorted({(place, kind, name) for place, kind, value in PLACED for name in leaks(value, seen)})
    assert leaked == []


# -- the leaks found, one regression test each --------------------------------------------

def test_a_caller_key_in_another_sdks_credential_header_never_reaches_a_provider(leaky) -> None:
    """Azure's `api-key`, Gemini's `x-goog-api-key`, a cookie, a proxy credential: the caller's
    gateway key there used to be forwarded to the provider as sent."""
    gw, _ = leaky
    gw.reset()
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, default_headers={
        "api-key": gw.key, "x-goog-api-key": gw.key, "cookie": f"session={gw.key}",
        "proxy-authorization": f"Bearer {gw.key}"})
    for model in ("default-chat", "azure-chat", "claude-chat"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    sent = [r for mock in (gw.primary, gw.backup) for r in gw.received(mock)]
    assert len(sent) == 3
    assert not any(gw.key in json.dumps(r["headers"]) for r in sent)
    assert not any(k in r["headers"] for r in sent for k in ("cookie", "proxy-authorization"))
    azure = next(r for r in sent if "api-key" in r["headers"])
    assert azure["headers"]["api-key"] == gw.backup_key  # the provider's own key, set per attempt


def test_a_key_in_the_model_field_is_not_quoted_audited_or_logged(leaky) -> None:
    gw, collector = leaky
    before = mark(gw, collector)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=gw.key, messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and gw.key not in str(err.value)
    request_id = err.value.response.headers["x-request-id"]
    record = wait_for(lambda: next((r for r in map(orjson.loads, audit_lines(gw))
                                    if r.get("request_id") == request_id), None))
    assert record["model"] is None and record["reasons"] == ["model_not_found"]
    time.sleep(0.5)
    assert leaks(gw.key, outputs(gw, collector, before)) == []


def test_an_unknown_path_is_in_no_log_audit_record_span_or_metric(leaky) -> None:
    """The path of an unknown endpoint used to be quoted in the error, written to the access
    line and the audit record, and became the span's name and an OTLP metric attribute
    (`gen_ai.operation.name`, one series per path: unbounded)."""
    gw, collector = leaky
    before = mark(gw, collector)
    secret = "gwk_leak_" + "".join(random.choice("abcdefghijklmnop") for _ in range(20))
    paths = [f"/v1/{secret}", f"/v1/chat/completions/{secret}", f"/{secret}", f"/v1/x{secret[:10]}y/files"]
    for path in paths:
        resp = httpx.post(gw.url + path, json=chat("default-chat"), headers={"authorization": f"Bearer {gw.key}"})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_endpoint"
        assert "/v1/chat/completions" in resp.json()["error"]["message"] and secret[:10] not in resp.text
    wait_for(lambda: len([s for s in list(collector.spans)[before[2]:] if s.name == "(unknown)"]) >= len(paths))
    time.sleep(0.8)  # a metric export after the spans
    seen = outputs(gw, collector, before)
    assert leaks(secret, seen) == [] and secret[:10] not in "".join(seen.values())
    access = [orjson.loads(line) for line in seen["logs"].splitlines()
              if line.startswith("{") and '"unknown_endpoint"' in line and '"access"' in line]
    assert len(access) >= len(paths) and {a["path"] for a in access} == {"(unknown)"}
    operations = {kv.value.string_value for m in collector.metrics for dp in m.histogram.data_points
                  for kv in dp.attributes if kv.key == "gen_ai.operation.name"}
    assert operations <= {"chat", "embeddings", "messages", "responses", "models", "usage", "(unknown)"}


def test_a_card_in_a_tool_schema_key_reaches_no_provider_through_the_anthropic_sdk(leaky) -> None:
    gw, _ = leaky
    gw.reset()
    number = card(random.Random(7))
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    client.messages.create(model="private-chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                           tools=[{"name": "charge", "input_schema": {"type": "object", "properties": {
                               number: {"type": "string"}}}}])
    with pytest.raises(anthropic.PermissionDeniedError) as refused:  # claude-chat is approved up to internal
        client.messages.create(model="claude-chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                               metadata={"user_id": "u1"}, tools=[{"name": "charge", "input_schema": {
                                   "type": "object", "properties": {number: {"type": "string"}}}}])
    assert refused.value.body["error"]["code"] == "classification_violation"  # type: ignore[index]
    [sent] = [r for mock in (gw.primary, gw.backup) for r in gw.received(mock)]
    raw = base64.b64decode(sent["raw_body_base64"]).decode()
    assert number not in raw and "[CREDIT_CARD_1]" in raw


# -- OIDC bearer tokens ------------------------------------------------------------------

ISSUER, AUDIENCE = "https://idp.leaks.example", "gateway-leaks"


@pytest.fixture(scope="module")
def oidc() -> Iterator[tuple[Gateway, Collector, Callable[..., str]]]:
    """A gateway that also takes OIDC tokens (jwt_authn in Envoy, claims to the ext_proc)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key()))
    jwk.update(kid="leaks-1", alg="RS256", use="sig")

    def token(expires_in: int = 300, key: Any = None, team: str | None = "demo") -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + expires_in}
        if team is not None:
            claims["team"] = team
        return jwt.encode(claims, key or signing, algorithm="RS256", headers={"kid": "leaks-1"})

    def customize(values: dict[str, Any]) -> None:
        values["identity"] = {"oidc": {"providers": [{"name": "corp", "issuer": ISSUER, "audiences": [AUDIENCE],
                                                      "jwks": {"inline": json.dumps({"keys": [jwk]})},
                                                      "teamClaim": "team"}]}}

    with otlp_collector() as (collector, _, env), running_gateway("gw-leaks-oidc-", env=env, customize=customize) as gw:
        yield gw, collector, token


def test_a_bearer_token_valid_or_not_comes_out_nowhere(oidc) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    gw, collector, token = oidc
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = [  # (token, headers, status)
        (t := token(), {"authorization": f"Bearer {t}"}, 200),
        (t := token(), {"authorization": f"Bearer {t}", "cookie": f"id_token={t}", "x-goog-api-key": t}, 200),
        (t := token(), {"authorization": f"Bearer {gw.key}", "x-api-key": t}, 403),  # two different "keys"
        (t := token(expires_in=-600), {"authorization": f"Bearer {t}"}, 401),
        (t := token(key=other), {"authorization": f"Bearer {t}"}, 401),
        (t := token(team=None), {"authorization": f"Bearer {t}"}, 403),
        (t := token(), {"authorization": f"bearer {t}"}, 200),  # the scheme in any case: verified, then removed
        (t := token(key=other), {"authorization": f"bEaReR {t}"}, 401),
        (t := token(), {"authorization": f"Bearer {t}"}, 404),  # an unknown path
    ]
    gw.reset()
    for value, headers, status in cases:
        before = mark(gw, collector)
        path = "/v1/chat/completions" if status != 404 else f"/v1/{value}"
        resp = httpx.post(gw.url + path, headers=headers, json=chat("default-chat"), timeout=30)
        assert resp.status_code == status, resp.text
        wait_for(lambda: resp.headers.get("x-request-id", "-") in gw.logs() or resp.status_code == 401, 10)
        time.sleep(0.3)
        seen = {**outputs(gw, collector, before), "answer": resp.text + json.dumps(dict(resp.headers))}
        assert leaks(value, seen) == [], (headers, status)
    sent = [r for mock in (gw.primary, gw.backup) for r in gw.received(mock)]
    assert len(sent) == 3
    assert not any(value in json.dumps(r["headers"]) for value, _, _ in cases for r in sent)


def series(text: str) -> set[str]:
    """The series of a Prometheus text page (name and labels, no value)."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_junk_model_names_paths_and_methods_create_no_series(leaky) -> None:
    """Label values come from config, never from traffic (docs/observability.md): a burst of
    random model names, paths, methods and headers adds no /metrics series and no OTLP
    attribute value, however many distinct ones there are."""
    gw, collector = leaky
    rng = random.Random(11)
    words = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.") for _ in range(16))  # noqa: E731
    warm = [("POST", "/v1/chat/completions", chat("default-chat")), ("POST", "/v1/nope", chat("default-chat")),
            ("POST", "/v1/chat/completions", chat("no-such-model")), ("BREW", "/v1/chat/completions", chat("x")),
            ("POST", "/v1/messages", messages_body("no-such-model"))]
    for method, path, body in warm:  # every outcome once, so its series exist
        httpx.request(method, gw.url + path, json=body, headers={"authorization": f"Bearer {gw.key}"}, timeout=30)
    time.sleep(0.8)
    before = series(httpx.get(gw.stack.metrics_url).text)
    attrs_before = {(kv.key, kv.value.string_value) for m in list(collector.metrics) for dp in m.histogram.data_points
                    for kv in dp.attributes}
    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {gw.key}"}) as client:
        for i in range(60):
            kind = i % 4
            if kind == 0:
                client.post(f"{gw.url}/v1/chat/completions", json=chat(words()), headers={"x-session-id": words()})
            elif kind == 1:
                client.post(f"{gw.url}/v1/{words()}/{words()}", json=chat("default-chat"))
            elif kind == 2:
                client.request(words().upper().replace("-", "").replace(".", "").replace("_", "") or "X",
                               f"{gw.url}/v1/chat/completions", json=chat("default-chat"))
            else:
                client.post(f"{gw.url}/v1/messages", json=messages_body(words()))
    time.sleep(0.8)
    after = series(httpx.get(gw.stack.metrics_url).text)
    assert after - before == set()
    attrs_after = {(kv.key, kv.value.string_value) for m in list(collector.metrics) for dp in m.histogram.data_points
                   for kv in dp.attributes}
    assert attrs_after - attrs_before == set()


@pytest.mark.parametrize("model", ["claude-chat", "gemini-chat"])
@pytest.mark.parametrize("field", ["role", "content-part-type", "tool-type", "tool-choice"])
def test_a_translated_backend_refuses_a_field_without_quoting_it(leaky, model: str, field: str) -> None:
    """Translators used to quote the role, part type, tool type or tool_choice they could not
    translate (`message role 'gwk_…' is not supported`): an error body is an output too. (A
    gateway key there never reaches a translator now: the `gateway_key` rule refuses it.)"""
    gw, _ = leaky

    def extra(value: str) -> dict[str, Any]:
        return {"role": {"messages": [{"role": value, "content": "hi"}]},
                "content-part-type": {"messages": [{"role": "user", "content": [{"type": value, "text": "hi"}]}]},
                "tool-type": {"tools": [{"type": value}]},
                "tool-choice": {"tool_choice": value, "tools": [{"type": "function", "function": {
                    "name": "f", "parameters": {"type": "object"}}}]}}[field]

    def post(value: str) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/chat/completions", json=chat(model) | extra(value), timeout=30,
                          headers={"authorization": f"Bearer {gw.key}"})

    blocked = post(gw.key)  # (a tool_choice of the wrong form is refused before the scan reads it)
    assert (blocked.status_code, blocked.json()["error"]["code"]) in {(403, "content_blocked"), (400, "invalid_request")}
    assert leaks(gw.key, {"answer": blocked.text + json.dumps(dict(blocked.headers))}) == []
    marker = "zqmarker-" + "".join(random.Random(field + model).choice("abcdefghijkmnpqrstuvwxyz") for _ in range(24))
    resp = post(marker)
    if resp.status_code == 200:
        return  # this backend's translator takes any value there (the provider judges it)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request", resp.text
    assert marker not in resp.text + json.dumps(dict(resp.headers))


def test_a_card_sent_as_a_token_id_is_not_quoted_back(leaky) -> None:
    gw, collector = leaky
    number = card(random.Random(3))
    before = mark(gw, collector)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="default-embedding", input=[[1, int(number)]])
    assert err.value.code == "invalid_request" and number not in str(err.value)
    assert number not in err.value.response.text
    time.sleep(0.5)
    assert leaks(number, outputs(gw, collector, before)) == []


# -- a provider's identifiers: an answer's `id`, a stream chunk's `id` and `model` ----------


def _anthropic_events(id_: str, model: str) -> list[bytes]:
    def event(kind: str, data: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n"
    return [event("message_start", {"message": {"id": id_, "type": "message", "role": "assistant", "model": model,
                                                "content": [], "stop_reason": None,
                                                "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
            event("content_block_stop", {"index": 0}),
            event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
            event("message_stop", {})]


def _openai_events(id_: str, model: str) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": id_, "object": "chat.completion.chunk", "created": 1, "model": model,
                                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"
    usage = {"id": id_, "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    return [chunk({"role": "assistant", "content": "ok"}), chunk({}, "stop"),
            b"data: " + orjson.dumps(usage) + b"\n\n", b"data: [DONE]\n\n"]


def _reply(provider: str, stream: bool, number: str) -> dict[str, str]:
    """Mock controls for a provider answer whose identifiers hold the card `number`."""
    id_, model = f"chatcmpl-{number}", f"m-{number}"
    if provider == "anthropic":
        id_ = f"msg-{number}"
        if stream:
            return {"x-mock-raw-events": json.dumps([base64.b64encode(e).decode()
                                                     for e in _anthropic_events(id_, model)])}
        body = {"id": id_, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 5, "output_tokens": 2}}
    elif provider == "gemini" and stream:
        first = {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}}],
                 "responseId": number, "modelVersion": model}
        last = {"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP"}],
                "responseId": number, "modelVersion": model,
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}}
        return {"x-mock-raw-events": json.dumps([base64.b64encode(b"data: " + orjson.dumps(e) + b"\r\n\r\n").decode()
                                                 for e in (first, last)])}
    elif provider == "gemini":
        body = {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
                "responseId": number, "modelVersion": model,
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}}
    elif stream:
        return {"x-mock-raw-events": json.dumps([base64.b64encode(e).decode() for e in _openai_events(id_, model)])}
    else:
        body = {"id": id_, "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    return {"x-mock-raw-body": base64.b64encode(orjson.dumps(body)).decode()}


@pytest.mark.parametrize("client", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model, provider", [("default-chat", "openai"), ("claude-chat", "anthropic"),
                                             ("gemini-chat", "gemini")])
def test_a_card_in_a_providers_answer_id_or_model_reaches_no_client(leaky: tuple[Gateway, Collector], model: str,
                                                                    provider: str, stream: bool, client: str) -> None:
    """docs/classification.md, Output scanning: a JSON answer's `id`, a stream chunk's `id` and
    `model` reach the client (an Anthropic client's `message.id` and `model` too) and are read
    as text; until 2026-12 the ids were not, nor a chunk's `model`, and the card went out whole."""
    gw, collector = leaky
    gw.reset()
    number = card(random.Random(hash((model, stream, client)) & 0xFFFF))
    before = mark(gw, collector)
    headers = {"authorization": f"Bearer {gw.key}", **_reply(provider, stream, number)}
    if client == "openai":
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    else:
        body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        r = httpx.post(f"{gw.url}/v1/messages", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert "ok" in r.text and "[CREDIT_CARD_1]" in r.text, r.text
    assert number not in re.sub(r"\D", "", r.text), r.text
    time.sleep(0.3)
    assert leaks(number, outputs(gw, collector, before)) == []
