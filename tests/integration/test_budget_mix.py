"""The budget invariant across endpoints: programs of concurrent requests mixing every API the
gateway serves, on one budget, through two replicas (real Envoy, two ext_proc processes each)
sharing one Valkey, with the audit trail on.

test_budget_invariant.py generates bursts of chat and Responses requests; this module mixes
what it does not: embeddings (a string, a list of strings, token arrays), Anthropic Messages
through the anthropic SDK (JSON and streamed, to a Claude backend and translated to an OpenAI
one), chat with tools and translated to Claude, and requests the gateway refuses (bad JSON, an
unknown model, a classification block, a key that can afford nothing), under provider replies
that are slow, dropped or ended mid-stream, errors (500, 429), long, or past the cap. After every
program, once settlements and audit records have landed:

- every level (key, team, org; daily and monthly) is charged at most its limit, and what
  `/v1/usage` says remains is the limit minus the spend: nothing held;
- team and org spend are the sums of their keys' spend;
- every request has exactly one audit record, and the `cost_nano` of a key's records adds up
  to what the budget charged it (where no provider billed past a reservation, which the
  audit records at the provider's figure and the budget at the reservation: docs/budgets.md);
- a request answered whole by an honest provider is on the record at what its usage costs;
- every refusal is the OpenAI error shape with a code docs/runbooks.md explains;
- Envoy is the same live, ready process.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import redis as redis_py
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway_extproc import keys
from gateway_extproc.audit.chain import iso
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, nothing_held, two_replicas

RUNBOOK_CODES = frozenset(re.findall(r"^### `([a-z_]+)`$", (Path(__file__).resolve().parents[2] / "docs"
                                                            / "runbooks.md").read_text(), re.M))
PRICES = {"default-chat": Price.from_usd_per_million(5.0, 20.0, 2.5),
          "claude-chat": Price.from_usd_per_million(3.0, 15.0, 0.3),
          "mix-embed": Price.from_usd_per_million(100.0, 0)}
# Budgets a program of a dozen requests can exhaust: a worst-case chat request reserves
# ~$0.02 (1,024 output tokens at $20/M).
ORG = 0.12
TEAMS = {"mix": 0.08, "mix2": 0.5}  # mix2's keys are held by the org limit
KEY_BUDGETS = {"mix-a": 0.02, "mix-b": 0.05, "mix-c": None, "mix-broke": 0}
KEY_TEAMS = {"mix-a": "mix", "mix-b": "mix", "mix-c": "mix2", "mix-broke": "mix2"}
KEYS = {name: keys.generate(name) for name in KEY_BUDGETS}
CARD = "4111 1111 1111 1111"
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2
# Envoy's answers after a provider had the request: it may bill it.
MAY_HAVE_BILLED = {"upstream_reset", "upstream_timeout"}
# The gateway's own failures: none may happen on a healthy store.
OWN_FAILURES = {"budget_store_unavailable", "gateway_internal_error", "gateway_unavailable"}


def mix_values(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url}, orgLimit={"daily": ORG, "monthly": ORG})
    values["budgets"].pop("devMemoryStore", None)
    values["extproc"]["processes"] = 2
    values["teams"] += [{"name": t, "budget": {"daily": b, "monthly": b}} for t, b in TEAMS.items()]
    for name, budget in KEY_BUDGETS.items():
        key: dict[str, Any] = {"id": name, "sha256": keys.digest(KEYS[name]), "team": KEY_TEAMS[name]}
        if budget is not None:
            key["budget"] = {"daily": budget, "monthly": budget}
        values["keys"].append(key)
    values["models"].append({"name": "mix-embed", "tokenizer": "o200k_base", "backends": [
        {"provider": "mock", "model": "mock-embedding", "pricing": {"input": 100.0, "output": 0},
         "maxTier": "internal"}]})


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[RedisServer, Gateway, Gateway]]:
    with RedisServer() as redis, two_replicas("gw-mix-", lambda v, _: mix_values(v, redis.url)) as (a, b):
        yield redis, a, b


@dataclass(frozen=True)
class Shape:
    kind: str  # chat | embed | messages | responses | bad_json | unknown_model | blocked
    key: str
    replica: int
    model: str
    stream: bool
    cap: int | None
    tools: bool
    n: int
    embed_input: str  # string | strings | tokens | token_lists
    reply_words: int | None
    behaviour: str  # none | slow | drop | end | error_event | status500 | status429 | ignore_cap | disconnect
    at: int  # which event a drop, an early end or a disconnect happens after

    @property
    def forwarded(self) -> bool:
        return self.kind in ("chat", "embed", "messages", "responses")

    @property
    def may_overbill(self) -> bool:
        """A provider that answers past the cap it was sent bills past the reservation: the
        audit records its figure, the budget the reservation (docs/budgets.md)."""
        return self.behaviour == "ignore_cap"

    @property
    def honest(self) -> bool:
        return self.behaviour in ("none", "slow")


CHAT_MODELS = ("default-chat", "default-chat", "claude-chat")


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    kind = draw(st.sampled_from(["chat", "chat", "embed", "messages", "messages", "responses",
                                 "bad_json", "unknown_model", "blocked"]))
    stream = kind in ("chat", "messages", "responses") and draw(st.booleans())
    model = {"embed": "mix-embed", "messages": draw(st.sampled_from(["claude-chat", "claude-chat", "default-chat"])),
             "responses": "default-chat"}.get(kind) or draw(st.sampled_from(CHAT_MODELS))
    behaviours = ["none", "none", "slow", "status500", "status429", "ignore_cap"]
    if kind == "embed":
        behaviours = ["none", "none", "slow", "status500", "status429"]
    elif stream:
        behaviours += ["drop", "end", "error_event", "disconnect"]
    return Shape(
        kind=kind, key=draw(st.sampled_from(["mix-a", "mix-b", "mix-b", "mix-c", "mix-c", "mix-broke"])),
        replica=draw(st.integers(0, 1)), model=model, stream=stream,
        cap=draw(st.none() | st.integers(1, 3000)) if kind != "messages" else draw(st.integers(1, 3000)),
        tools=kind in ("chat", "messages") and draw(st.booleans()),
        n=draw(st.sampled_from([1, 1, 2, 3])) if kind == "chat" else 1,
        embed_input=draw(st.sampled_from(["string", "strings", "tokens", "token_lists"])),
        reply_words=draw(st.none() | st.integers(1, 1500)),
        behaviour=draw(st.sampled_from(behaviours)), at=draw(st.integers(1, 12)))


@dataclass
class Outcome:
    status: int
    request_id: str
    error: dict[str, Any] | None = None  # the body of a refusal
    cost: int | None = None  # what the provider's usage, as the client saw it, costs
    complete: bool = False  # the client read the whole answer
    stream_error: dict[str, Any] | None = None  # the error event a stream ended with


TOOL = {"name": "lookup", "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}


def mock_headers(s: Shape) -> dict[str, str]:
    h = {"x-mock-chunk-delay-ms": "2"}
    if s.reply_words:
        h["x-mock-reply-words"] = str(s.reply_words)
    b = s.behaviour
    if b == "slow":
        h["x-mock-latency-ms"] = "300"
    elif b == "drop":
        h["x-mock-drop-after-chunks"] = str(s.at)
    elif b == "end":
        h["x-mock-end-after-chunks"] = str(s.at)
    elif b == "error_event":  # the provider's own error event mid-stream (OpenAI sends "code": null)
        h.update({"x-mock-garbage-after-chunks": str(s.at), "x-mock-garbage": "error"})
    elif b.startswith("status"):
        h["x-mock-status"] = b[6:]
    elif b == "ignore_cap":
        h["x-mock-ignore-max-tokens"] = "1"
        h.setdefault("x-mock-reply-words", "1500")
    if s.kind == "chat" and s.n > 1 and s.model == "default-chat" and not s.tools:
        h["x-mock-choice-replies"] = orjson.dumps(["the " * (s.reply_words or 20)] * s.n).decode()
    return h


def openai_request(s: Shape) -> tuple[str, bytes | dict[str, Any]]:
    """The path and body of every shape but Messages."""
    content = "Summarise the figures, please."
    if s.kind == "bad_json":
        return "/v1/chat/completions", b'{"model": "default-chat", "messages": [{"role": "user", "content": "Hi"'
    if s.kind == "blocked":
        content = f"My card is {CARD}." if s.at % 2 else f"Use this token {GITHUB_TOKEN} to push."
    if s.kind == "embed":
        inputs: Any = {"string": "embed this sentence for the index",
                       "strings": ["first text to embed", "second text, somewhat longer than the first"],
                       "tokens": [1, 2, 3, 4, 5, 6, 7, 8] * s.at,
                       "token_lists": [[11, 12, 13] * s.at, [9] * 30]}[s.embed_input]
        return "/v1/embeddings", {"model": s.model, "input": inputs}
    if s.kind == "responses":
        body: dict[str, Any] = {"model": s.model, "input": content, "stream": s.stream}
        if s.cap is not None:
            body["max_output_tokens"] = s.cap
        return "/v1/responses", body
    body = {"model": "no-such-model" if s.kind == "unknown_model" else s.model,
            "messages": [{"role": "user", "content": content}], "stream": s.stream}
    if s.n > 1:
        body["n"] = s.n
    if s.cap is not None:
        body["max_tokens"] = s.cap
    if s.stream:
        body["stream_options"] = {"include_usage": True}
    if s.tools:
        body["tools"] = [{"type": "function", "function": TOOL}]
    return "/v1/chat/completions", body


def usage_cost(model: str, usage: dict[str, Any] | None) -> int | None:
    if not usage:
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0 if model == "mix-embed" else None))
    if prompt is None or completion is None:
        return None
    if "input_tokens" in usage and "prompt_tokens" not in usage and "cache_read_input_tokens" in usage:
        prompt += (usage.get("cache_read_input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0)
    return cost_nano(PRICES[model], prompt, completion)


def error_of(raw: bytes) -> dict[str, Any] | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


async def send_openai(c: httpx.AsyncClient, gw: Gateway, s: Shape) -> Outcome:
    path, body = openai_request(s)
    headers = {"authorization": f"Bearer {KEYS[s.key]}", "content-type": "application/json", **mock_headers(s)}
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    usage: dict[str, Any] | None = None
    async with c.stream("POST", gw.url + path, content=content, headers=headers) as resp:
        rid = resp.headers.get("x-request-id", "")
        if resp.status_code != 200 or not s.stream:
            raw = await resp.aread()
            if resp.status_code != 200:
                return Outcome(resp.status_code, rid, error_of(raw))
            usage = orjson.loads(raw).get("usage")
        else:
            seen = 0
            try:
                async for line in resp.aiter_lines():
                    seen += 1
                    if s.behaviour == "disconnect" and seen >= s.at:
                        return Outcome(200, rid)  # leaves the block: the connection closes mid-stream
                    if line.startswith("data: {"):
                        event_body = orjson.loads(line[6:])
                        if "error" in event_body:  # a stream cut at its budget, or ended early by the provider
                            check_error(s, 200, event_body)
                            return Outcome(200, rid, stream_error=event_body)
                        if '"usage":{' in line:
                            usage = event_body.get("usage") or event_body.get("response", {}).get("usage")
            except (httpx.RemoteProtocolError, httpx.ReadError):
                assert s.behaviour == "drop", f"{s}: the stream broke"  # a reset provider: docs/runbooks.md
                return Outcome(200, rid)
    return Outcome(200, rid, cost=usage_cost(s.model, usage), complete=True)


async def send_messages(client: anthropic.AsyncAnthropic, gw: Gateway, s: Shape) -> Outcome:
    """Through the anthropic SDK, JSON or streamed."""
    kwargs: dict[str, Any] = {
        "model": s.model, "max_tokens": s.cap, "extra_headers": mock_headers(s),
        "messages": [{"role": "user", "content": "Summarise the figures, please."}]}
    if s.tools:
        kwargs["tools"] = [{"name": TOOL["name"], "description": TOOL["description"],
                            "input_schema": TOOL["parameters"]}]
    c = client.with_options(base_url=gw.url, api_key=KEYS[s.key])
    rid = ""
    try:
        if not s.stream:
            raw = await c.messages.with_raw_response.create(**kwargs)
            message = await raw.parse()
            return Outcome(200, raw.headers.get("x-request-id", ""), cost=usage_cost(s.model, message.usage.model_dump()),
                           complete=True)
        usage: dict[str, Any] = {}
        seen = 0
        async with c.messages.stream(**kwargs) as stream:
            rid = stream.response.headers.get("x-request-id", "")
            async for ev in stream:
                seen += 1
                if s.behaviour == "disconnect" and seen >= s.at:
                    return Outcome(200, rid)  # leaves the block: the SDK closes the response
                if ev.type == "message_start":
                    usage.update(ev.message.usage.model_dump())
                elif ev.type == "message_delta":
                    usage.update({k: v for k, v in ev.usage.model_dump().items() if v is not None})
        return Outcome(200, rid, cost=usage_cost(s.model, usage), complete=True)
    except anthropic.APIStatusError as exc:
        if rid:  # an error event mid-stream (a stream cut at its budget, a provider's error)
            body = {"error": dict(exc.body["error"])}  # Anthropic's event: {"type": "error", "error": {...}}
            check_error(s, 200, body)
            return Outcome(200, rid, stream_error=body)
        return Outcome(exc.status_code, exc.response.headers.get("x-request-id", ""), error_of(exc.response.content))
    except anthropic.APIError:  # a broken stream
        return Outcome(200, rid)



def audit_records(gws: tuple[Gateway, ...], since: str) -> list[dict[str, Any]]:
    """The request records of our keys written since `since` (the trail's UTC time format,
    which sorts as text), from both replicas' trails."""
    out = []
    for gw in gws:
        for seg in sorted((gw.stack.workdir / "audit").rglob("*.jsonl")):
            for line in seg.read_bytes().split(b"\n"):
                if b'"type":"request"' in line and b'"key_id":"mix-' in line:
                    rec = orjson.loads(line)
                    if rec["ts"] >= since and rec["path"] != "/v1/usage":
                        out.append(rec)
    return out


def usage_report(gw: Gateway, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[name]}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return {(b["level"], b["window"]): b for b in resp.json()["budgets"]}


def nano(usd: float) -> int:
    return round(usd * 1e9)


def check_error(s: Shape, status: int, body: dict[str, Any] | None) -> None:
    """A refusal's body, or an error event mid-stream: the OpenAI shape, a code the runbooks explain."""
    assert body is not None and set(body) == {"error"}, f"{s}: {status} {body}"
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}, f"{s}: {err}"
    assert isinstance(err["message"], str) and isinstance(err["type"], str), f"{s}: {err}"
    assert err["code"] in RUNBOOK_CODES, f"{s}: {status} {err}"
    assert err["code"] not in OWN_FAILURES, f"the gateway failed {s}: {status} {err}"
    expected = {"bad_json": {"invalid_json"}, "unknown_model": {"model_not_found"},
                "blocked": {"classification_violation", "content_blocked"}}.get(s.kind)
    if expected is not None and s.key != "mix-broke":
        assert err["code"] in expected, f"{s}: {err}"


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(program=st.lists(shapes(), min_size=1, max_size=12))
def test_a_program_of_mixed_endpoints_keeps_every_budget_and_the_audit_in_step(
        setup: tuple[RedisServer, Gateway, Gateway], program: list[Shape]) -> None:
    redis, *replicas = setup
    gws = (replicas[0], replicas[1])
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()  # a fresh day for every program
    client.close()
    envoys = [gw.stack.procs["envoy"] for gw in gws]
    since = iso(time.time())

    async def run() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c, \
                anthropic.AsyncAnthropic(api_key="unused", max_retries=0, timeout=60) as ac:
            return await asyncio.gather(*(
                send_messages(ac, gws[s.replica], s) if s.kind == "messages" else send_openai(c, gws[s.replica], s)
                for s in program))

    outcomes = asyncio.run(run())
    nothing_held(redis)
    deadline = time.monotonic() + 15
    while len(audit_records(gws, since)) < len(program) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    records = audit_records(gws, since)

    by_id = {r["request_id"]: r for r in records}
    assert len(by_id) == len(records) == len(program), f"{len(records)} audit records for {len(program)} requests"
    for s, o in zip(program, outcomes):
        event(f"{s.kind} {o.status} {(o.error or {}).get('error', {}).get('code', '')}".strip())
        rec = by_id[o.request_id]
        assert rec["key_id"] == s.key, f"{s}: {rec}"
        if o.status != 200:
            check_error(s, o.status, o.error)
            code = o.error["error"]["code"]
            if code in MAY_HAVE_BILLED:
                # The provider had the request: charged (docs/budgets.md). Envoy answers it
                # after the ext_proc saw the provider's status: on the record as that, incomplete.
                assert rec["status"] == o.status or rec["outcome"] == "incomplete", f"{s}: {rec}"
                continue
            assert (rec["status"], rec["cost_nano"] or 0) == (o.status, 0), f"{s}: {rec}"
            assert rec["decision"] in ("refused", "blocked") or code == "provider_error", rec
        elif s.honest and o.complete and o.cost is not None:
            assert rec["cost_nano"] == o.cost, f"{s}: the client's usage costs {o.cost}, audited {rec}"

    reports = {name: usage_report(gws[0], name) for name in KEYS}
    spend = {name: nano(levels[(f"key:{name}", "daily")]["spent_usd"]) for name, levels in reports.items()}
    for name, levels in reports.items():
        for (level, window), b in levels.items():
            assert b["spent_usd"] == levels[(level, "daily")]["spent_usd"], f"{level} {window}"
            if b["limit_usd"] is not None:
                assert nano(b["spent_usd"]) <= nano(b["limit_usd"]), f"{level} {window} overspent"
                assert nano(b["remaining_usd"]) == nano(b["limit_usd"]) - nano(b["spent_usd"]), \
                    f"{level} {window}: something is still held"
    for team in TEAMS:
        member = next(n for n, t in KEY_TEAMS.items() if t == team)
        assert nano(reports[member][(f"team:{team}", "daily")]["spent_usd"]) == \
            sum(v for n, v in spend.items() if KEY_TEAMS[n] == team)
    assert nano(reports["mix-a"][("org:local", "daily")]["spent_usd"]) == sum(spend.values())

    for name in KEYS:
        audited = sum(r["cost_nano"] or 0 for r in records if r["key_id"] == name)
        if any(s.may_overbill for s in program if s.key == name):
            assert spend[name] <= audited, name
        else:
            assert spend[name] == audited, f"{name}: budget charged {spend[name]}, audit records {audited}"
    for envoy, gw in zip(envoys, gws):
        assert envoy.poll() is None, "Envoy died"
        assert httpx.get(gw.stack.admin_url + "/ready", timeout=5).status_code == 200


@pytest.mark.parametrize("model", ["default-chat", "claude-chat"])
@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
@pytest.mark.parametrize("behaviour", ["error_event", "ignore_cap", "end"])
def test_every_error_event_mid_stream_carries_a_runbook_code(
        setup: tuple[RedisServer, Gateway, Gateway], api: str, model: str, behaviour: str) -> None:
    """A stream that ends in an error, for every client: the provider's own error event (OpenAI
    sends `"code": null`; it went on so, where a provider's JSON error gets `provider_error`),
    a stream cut at its budget, a stream the provider ended early. Anthropic clients got an
    error event without any `code` at all: the runbook code of every gateway error was lost.
    Until 2026-12-05 a Responses stream the provider ended early just stopped (no
    `response.completed`, no error event), as if the half answer were whole."""
    if api == "responses" and model != "default-chat":
        pytest.skip("the Responses API goes to OpenAI-schema backends only")
    redis, *gws = setup
    client = redis_py.Redis(host=redis.host, port=redis.port)
    client.flushall()
    client.close()
    s = Shape(kind=api, key="mix-c", replica=0, model=model, stream=True, cap=5, tools=False, n=1,
              embed_input="string", reply_words=40, behaviour=behaviour, at=3)

    async def run() -> Outcome:
        async with httpx.AsyncClient(timeout=60) as c, \
                anthropic.AsyncAnthropic(api_key="unused", max_retries=0, timeout=60) as ac:
            return await (send_messages(ac, gws[0], s) if api == "messages" else send_openai(c, gws[0], s))

    outcome = asyncio.run(run())
    assert outcome.status == 200 and not outcome.complete and outcome.stream_error is not None, outcome
