"""The data plane survives what providers and clients can do to it (issue 11).

Envoy 1.40 used to segfault on long provider replies: an ext_proc running as an upstream
(cluster) filter crashed Envoy once its gRPC stream carried more than the ext_proc
cluster's buffer limit (docs/architecture.md). This drives every path a response can take
— native OpenAI, the per-attempt processor with OpenAI, Azure, Anthropic, Bedrock
event-stream and Gemini SSE backends, OpenAI and Anthropic clients, JSON and streams —
with long replies (12,000 words), tiny and huge HTTP chunks, slow and fast pacing, clients
that leave early and providers that reset mid-stream, one at a time and 32 at once. After
each wave Envoy must be the same process, ready, still answering, and its log must hold no
`critical` line. Bounded: about a minute on two cores.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from .conftest import Gateway, running_gateway

LONG = 12_000  # words of a long reply (the mock's x-mock-reply-words: "the", one token each)


@pytest.fixture(scope="module")
def sgw() -> Iterator[Gateway]:
    def customize(values: dict[str, Any]) -> None:
        # Budgets and output limits large enough for long replies: this test is about Envoy.
        for team in values["teams"]:
            team["budget"] = {"daily": 1_000_000, "monthly": 1_000_000}
            team["rateLimits"] = {"tokensPerMinute": 10**9, "requestsPerMinute": 10**6}
        values["budgets"]["orgLimit"] = {"daily": 1_000_000}
        for model in values["models"]:
            model["maxOutputTokens"] = 32_768
        # One model per translated stream format that no local model starts with.
        values["models"].append({"name": "bedrock-chat", "tokenizer": "o200k_base", "maxOutputTokens": 32_768,
                                 "backends": [{"provider": "mock-bedrock", "model": "anthropic.claude-mock-v1:0",
                                               "pricing": {"input": 3.0, "output": 15.0}, "maxTier": "internal"}]})

    with running_gateway("gw-stress-", customize=customize) as gw:
        yield gw


@dataclass(frozen=True)
class Case:
    model: str
    stream: bool = True
    client: str = "openai"  # or "anthropic" (POST /v1/messages)
    words: int = LONG
    mock: dict[str, str] = field(default_factory=dict)  # x-mock-* controls
    leave_after_bytes: int | None = None  # the client disconnects early
    provider_reset: bool = False  # the provider drops the connection mid-stream


# Every response path: native credential (private-chat), upstream ext_proc with OpenAI
# (default-chat, fallback-chat), Azure, Anthropic SSE, Bedrock event-stream, Gemini SSE.
MODELS = ("private-chat", "default-chat", "fallback-chat", "azure-chat", "claude-chat", "bedrock-chat",
          "gemini-chat")


def request(case: Case) -> tuple[str, dict[str, str], bytes]:
    """The same body fits both APIs (OpenAI chat and Anthropic Messages)."""
    headers = {"x-mock-reply-words": str(case.words), **case.mock}
    body = {"model": case.model, "max_tokens": 20_000, "stream": case.stream,
            "messages": [{"role": "user", "content": "Tell me everything."}]}
    return "/v1/messages" if case.client == "anthropic" else "/v1/chat/completions", headers, orjson.dumps(body)


async def run(client: httpx.AsyncClient, gw: Gateway, case: Case) -> tuple[Case, str]:
    path, headers, body = request(case)
    headers = {**headers, "authorization": f"Bearer {gw.key}", "content-type": "application/json"}
    received = bytearray()
    try:
        async with client.stream("POST", f"{gw.url}{path}", headers=headers, content=body) as resp:
            async for piece in resp.aiter_bytes():
                received += piece
                if case.leave_after_bytes is not None and len(received) >= case.leave_after_bytes:
                    return case, "left"
            status = resp.status_code
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return case, "broken"  # only acceptable when the provider reset the stream
    if status != 200:
        return case, f"status {status}: {bytes(received[:300])!r}"
    if not case.stream:
        answer = orjson.loads(received)
        text = answer["content"][0]["text"] if case.client == "anthropic" else answer["choices"][0]["message"]["content"]
        return case, "whole" if text.split() == ["the"] * case.words else f"json with {len(text.split())} words"
    tail = bytes(received[-400:])
    ended = b"message_stop" in tail if case.client == "anthropic" else tail.endswith(b"data: [DONE]\n\n")
    words = received.count(b"the")
    return case, "whole" if ended and words >= case.words else f"stream of {words} words, tail {tail[-120:]!r}"


def assert_outcomes(results: list[tuple[Case, str]], overloaded_ok: bool = False) -> None:
    """Every stream ends as its case says. With `overloaded_ok` (32 long streams at once on
    one ext_proc process of a 2-core CI machine) a stream may also end in the gateway's own
    clean refusal (503 `gateway_unavailable`: the ext_proc missed Envoy's message timeout)
    or broken by that timeout mid-stream, as long as a quarter of them finish whole (one
    process handles ~400,000 stream messages here: on a quiet machine 21-24 of the 24 finish
    whole, 11 in a fresh-clone CI run, 7 with two other test suites on the same cores).
    Envoy's survival is checked separately."""
    whole = 0
    for case, outcome in results:
        whole += outcome == "whole"
        if overloaded_ok and (outcome == "broken" or (outcome.startswith("status 503") and "gateway_unavailable"
                                                       in outcome)):
            continue
        if case.leave_after_bytes is not None:
            assert outcome == "left", (case, outcome)
        elif case.provider_reset:
            # Cut mid-stream (the client's stream breaks), or before Envoy read the headers (502).
            assert outcome in ("broken", "whole") or outcome.startswith(("stream of", "status 502")), (case, outcome)
        else:
            assert outcome == "whole", (case, outcome)
    if overloaded_ok:
        plain = sum(1 for c, _ in results if c.leave_after_bytes is None and not c.provider_reset)
        assert whole >= plain // 4, results


def envoy_pid(gw: Gateway) -> int:
    return gw.stack.procs["envoy"].pid


def assert_envoy_healthy(gw: Gateway, pid: int) -> None:
    proc = gw.stack.procs["envoy"]
    assert proc.pid == pid and proc.poll() is None, "Envoy exited"
    assert httpx.get(f"{gw.stack.admin_url}/ready", timeout=5).status_code == 200
    ok = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                    json={"model": "default-chat", "messages": [{"role": "user", "content": "still there?"}]},
                    timeout=30)
    assert ok.status_code == 200, ok.text
    log = gw.stack.log_path("envoy").read_text(errors="replace")
    assert "critical" not in log and "Segmentation fault" not in log, log[-3000:]


async def wave(gw: Gateway, cases: list[Case], concurrency: int) -> list[tuple[Case, str]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def one(case: Case) -> tuple[Case, str]:
            async with sem:
                return await run(client, gw, case)
        return await asyncio.gather(*(one(c) for c in cases))


def test_long_replies_one_at_a_time_on_every_path(sgw: Gateway) -> None:
    pid = envoy_pid(sgw)
    cases = [Case(m, stream) for m in MODELS for stream in (True, False)]
    cases += [Case(m, True, "anthropic") for m in ("claude-chat", "gemini-chat", "bedrock-chat")]
    cases += [Case("gemini-chat", False, "anthropic")]
    assert_outcomes(asyncio.run(wave(sgw, cases, 1)))
    assert_envoy_healthy(sgw, pid)


def mixed_wave(seed: int) -> list[Case]:
    """32 streams over every path with one stressor each, chosen by a fixed seed."""
    rng = random.Random(seed)
    stressors: list[dict[str, Any]] = [
        {},  # fast, one event per HTTP chunk
        {"mock": {"x-mock-chunk-bytes": "1000000"}},  # huge chunks: many events in one
        {"mock": {"x-mock-chunk-bytes": "61"}},  # small chunks: events split anywhere
        {"mock": {"x-mock-chunk-bytes": "7"}, "words": 1_000},  # tiny chunks
        {"mock": {"x-mock-chunk-delay-ms": "1"}, "words": 3_000},  # slow pacing
        {"leave_after_bytes": 50_000},  # the client leaves mid-stream
        {"mock": {"x-mock-drop-after-chunks": "4000"}, "provider_reset": True},  # provider resets
        {"stream": False},  # a long JSON answer
    ]
    cases = []
    for i in range(32):
        extra = stressors[i % len(stressors)]
        client = "anthropic" if rng.random() < 0.2 else "openai"
        cases.append(Case(MODELS[rng.randrange(len(MODELS))], client=client, **extra))
    return cases


@pytest.mark.parametrize("seed", [11, 12])
def test_32_concurrent_streams_with_every_stressor(sgw: Gateway, seed: int) -> None:
    pid = envoy_pid(sgw)
    assert_outcomes(asyncio.run(wave(sgw, mixed_wave(seed), 32)), overloaded_ok=True)
    assert_envoy_healthy(sgw, pid)


def test_hostile_request_bodies_do_not_crash_envoy(sgw: Gateway) -> None:
    """Many large prompts at once through the per-attempt processor (the other way the
    upstream filter's gRPC connection used to reach its buffer limit)."""
    pid = envoy_pid(sgw)
    big = "lorem " * 150_000  # ~900 KB per request

    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(model: str) -> int:
                r = await client.post(f"{sgw.url}/v1/chat/completions",
                                      headers={"authorization": f"Bearer {sgw.key}", "x-mock-reply": "ok"},
                                      json={"model": model, "max_tokens": 10,
                                            "messages": [{"role": "user", "content": big}]})
                return r.status_code
            return await asyncio.gather(*(one(MODELS[1 + i % (len(MODELS) - 1)]) for i in range(32)))

    statuses = asyncio.run(go())
    assert set(statuses) <= {200, 413, 503}, statuses  # 503: the ext_proc missed its message timeout
    assert_envoy_healthy(sgw, pid)
