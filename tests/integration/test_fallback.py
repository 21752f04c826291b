"""Fallback in Envoy as the chart generates it: priorities, retriable statuses, the per-try
latency threshold, outlier ejection, and every backend down."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from .conftest import Gateway, running_gateway

HELLO = [{"role": "user", "content": "hello"}]


def unlimited(values: dict) -> None:
    """No budgets or rate limits: a per-try timeout needs that (the render refuses it), and a
    burst must not meet the demo team's 100 requests/s."""
    values["budgets"].pop("orgLimit", None)
    for principal in values["teams"] + values["keys"]:
        principal.pop("budget", None)
        principal.pop("rateLimits", None)


@pytest.fixture(scope="module")
def fb() -> Iterator[Gateway]:
    def customize(values: dict) -> None:
        values["envoy"]["retry"]["perTryTimeout"] = "0.5s"  # (a timed-out try is a 504: gateway-error)
        values["envoy"]["retry"]["retryOn"] = "gateway-error,reset,connect-failure,retriable-status-codes"
        unlimited(values)
    with running_gateway("gw-fallback-", customize=customize) as gw:
        yield gw


@pytest.fixture
def gw(fb: Gateway) -> Gateway:
    fb.reset()
    return fb


def ask(gw: Gateway) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "fallback-chat", "messages": HELLO},
                      headers={"authorization": f"Bearer {gw.key}"}, timeout=30)


def behave(gw: Gateway, **behaviour: object) -> None:
    httpx.post(f"{gw.primary}/_mock/behaviour", json={"model": "mock-primary", **behaviour}).raise_for_status()


@pytest.mark.parametrize("status", [401, 429, 529, 503])
def test_retriable_statuses_fall_back_to_the_secondary(gw: Gateway, status: int) -> None:
    behave(gw, status=status, times=1)
    resp = ask(gw)
    assert resp.status_code == 200 and resp.headers["x-gateway-backend"] == "mock-backup/mock-secondary"
    assert resp.headers["x-gateway-attempts"] == "2"


def test_every_backend_refusing_the_gateways_credential_is_one_provider_auth_failed(gw: Gateway) -> None:
    behave(gw, status=401, times=1)
    httpx.post(f"{gw.backup}/_mock/behaviour", json={"model": "mock-secondary", "status": 401, "times": 1}
               ).raise_for_status()
    resp = ask(gw)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "provider_auth_failed"
    assert resp.headers["x-gateway-attempts"] == "2"


def test_a_primary_slower_than_the_threshold_is_abandoned(gw: Gateway) -> None:
    behave(gw, status=200, latency_ms=3000, times=1)
    started = time.monotonic()
    resp = ask(gw)
    assert resp.status_code == 200 and resp.headers["x-gateway-backend"] == "mock-backup/mock-secondary"
    assert time.monotonic() - started < 2.0  # 0.5 s per-try timeout, not the primary's 3 s


def test_every_backend_failing_is_the_last_providers_error_with_a_code(gw: Gateway) -> None:
    """OpenAI-schema providers write `"code": null` in a 5xx; the client still reads a code
    docs/runbooks.md explains."""
    behave(gw, status=500)
    httpx.post(f"{gw.backup}/_mock/behaviour", json={"model": "mock-secondary", "status": 500}).raise_for_status()
    resp = ask(gw)
    assert resp.status_code == 500 and resp.headers["x-gateway-attempts"] == "2"
    assert resp.json()["error"] == {"message": "Mock error configured for model 'mock-secondary'.",
                                    "type": "server_error", "code": "provider_error", "param": None}


def tokens_used(gw: Gateway) -> int:
    return httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {gw.key}"}).json()["tokens_used"]["daily"]


def test_an_attempt_the_provider_got_is_never_retried_so_its_bill_stays_in_the_budget() -> None:
    """A request's reservation covers one billed attempt, so with budgets on the gateway
    never moves on from an attempt a provider may be working on: the default retry policy
    retries a reset only before the request went out (`reset-before-request`) and the
    render refuses per-try timeouts (tests/test_chart.py). A primary that read the request
    and dropped the connection is the client's 502, charged its reservation; the secondary
    is never asked, so no second bill exists that no budget counted."""
    with running_gateway("gw-fallback-reset-") as gw:
        behave(gw, reset=True, times=1)
        before = tokens_used(gw)
        resp = ask(gw)
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_reset"
        assert len(gw.received(gw.primary)) == 1 and gw.received(gw.backup) == []
        time.sleep(0.5)  # settlement is asynchronous
        assert tokens_used(gw) - before > 0  # the primary may bill it: charged (its reservation)
        assert ask(gw).status_code == 200  # the next request is answered as before


def test_a_failing_primary_is_ejected_and_skipped() -> None:
    with running_gateway("gw-eject-") as gw:  # a fresh, healthy outlier state
        behave(gw, status=500)
        statuses = [ask(gw).status_code for _ in range(8)]
        assert statuses == [200] * 8
        assert len(gw.received(gw.primary)) == 3  # consecutive5xx: then skipped without a try
        assert len(gw.received(gw.backup)) == 8


def test_every_backend_down_is_a_fast_503_in_openai_shape() -> None:
    with running_gateway("gw-down-") as gw:
        for name in [n for n in gw.stack.procs if n.startswith("mock-")]:
            gw.stack.procs[name].terminate()
            gw.stack.procs[name].wait()
        started = time.monotonic()
        resp = ask(gw)
        assert time.monotonic() - started < 2.0
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "upstream_unavailable"


def test_a_burst_during_a_primary_outage_falls_back_for_every_request() -> None:
    """Envoy's default circuit breaker lets 3 retries per cluster be in flight: in a burst
    while the primary fails, every request past the third got the primary's 500. The chart's
    retry budget lets each active request fall back."""
    with running_gateway("gw-fallback-burst-", customize=unlimited) as gw:
        behave(gw, status=500, latency_ms=300)  # (slow enough that the whole burst overlaps)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=300)) as client:
                return await asyncio.gather(*(
                    client.post(f"{gw.url}/v1/chat/completions", json={"model": "fallback-chat", "messages": HELLO},
                                headers={"authorization": f"Bearer {gw.key}"}) for _ in range(300)))

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 300
        assert {r.headers["x-gateway-backend"] for r in responses} == {"mock-backup/mock-secondary"}
        stats = httpx.get(f"{gw.stack.admin_url}/stats", params={"filter": "retry_overflow"}).text
        assert "model.fallback-chat.upstream_rq_retry_overflow: 0" in stats


@pytest.fixture
def fresh() -> Iterator[Gateway]:
    """A gateway whose outlier detection has not seen the other tests' failures."""
    with running_gateway("gw-fallback-fresh-") as gw:
        yield gw


def test_primary_500_is_answered_by_the_secondary_with_its_own_name_and_key(fresh: Gateway) -> None:
    gw = fresh
    behave(gw, status=500, times=1)
    resp = ask(gw)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"].startswith(
        "This is a mock reply from mock-secondary")
    assert (resp.headers["x-gateway-backend"], resp.headers["x-gateway-attempts"]) == ("mock-backup/mock-secondary",
                                                                                      "2")
    [failed] = gw.received(gw.primary)
    [answered] = gw.received(gw.backup)
    assert failed["body"]["model"] == "mock-primary"
    assert failed["headers"]["authorization"] == f"Bearer {gw.primary_key}"
    assert answered["body"]["model"] == "mock-secondary"
    assert answered["headers"]["authorization"] == f"Bearer {gw.backup_key}"
    # Envoy's log has one line per attempt, joined to the request by its id.
    attempts = upstream_attempts(gw, resp.headers["x-request-id"])
    assert [(a["backend"], a["status"]) for a in attempts] == [("mock/mock-primary", 500),
                                                               ("mock-backup/mock-secondary", 200)]
    # ...and one count per attempt in genai_upstream_attempts_total.
    metrics = httpx.get(gw.stack.metrics_url, timeout=5).text
    assert 'genai_upstream_attempts_total{backend="mock/mock-primary",outcome="error"} 1.0' in metrics
    assert 'genai_upstream_attempts_total{backend="mock-backup/mock-secondary",outcome="success"} 1.0' in metrics


def upstream_attempts(gw: Gateway, request_id: str) -> list[dict]:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in gw.stack.log_path("envoy").read_text().splitlines()
                 if '"upstream_attempt"' in line and request_id in line]
        if len(lines) >= 2 or time.monotonic() > deadline:
            return lines  # in the order Envoy finished the attempts
        time.sleep(0.05)


def stream(gw: Gateway, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions",
                      json={"model": "fallback-chat", "messages": HELLO, "stream": True},
                      headers={"authorization": f"Bearer {gw.key}", **headers}, timeout=30)


def test_a_stream_failing_before_its_first_byte_comes_from_the_secondary(fresh: Gateway) -> None:
    gw = fresh
    behave(gw, status=503, times=1)
    resp = stream(gw)
    assert resp.status_code == 200 and resp.headers["x-gateway-backend"] == "mock-backup/mock-secondary"
    assert resp.headers["x-gateway-attempts"] == "2"
    events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text.startswith("This is a mock reply from mock-secondary")


def test_a_stream_reset_after_its_first_byte_is_not_repeated(fresh: Gateway) -> None:
    """Envoy never retries once bytes reached the client: the client's stream breaks (a
    reset cannot carry an event), and the secondary is never asked, so nothing repeats."""
    gw = fresh
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    received = []
    long_reply = " ".join(f"word{i}" for i in range(60))  # past the output scanner's holdback
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in client.chat.completions.create(model="fallback-chat", messages=HELLO, stream=True, extra_headers={
                "x-mock-drop-after-chunks": "30", "x-mock-reply": long_reply, "x-mock-chunk-delay-ms": "10"}):
            received.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text and long_reply.startswith(text)  # a prefix of the primary's answer, once
    assert gw.received(gw.backup) == []


@pytest.mark.parametrize("model", ["fallback-chat", "claude-chat", "gemini-chat"])
def test_a_stream_the_provider_ends_unfinished_ends_with_an_error_event(gw: Gateway, model: str) -> None:
    """No [DONE] (or message_stop, finishReason): the client is told, not handed half an answer."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    long_reply = " ".join(f"word{i}" for i in range(60))
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model=model, messages=HELLO, stream=True, extra_headers={
                "x-mock-end-after-chunks": "30", "x-mock-reply": long_reply}):
            received.append(chunk)
    assert "ended the stream before it finished" in info.value.message
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert long_reply.startswith(text)
    assert len(gw.received(gw.primary)) + len(gw.received(gw.backup)) == 1  # asked once, not retried
    assert '"error_code":"upstream_stream_interrupted"' in gw.logs()


def test_an_anthropic_client_gets_an_error_event_for_an_unfinished_stream(gw: Gateway) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    with pytest.raises(anthropic.APIError):
        with client.messages.stream(model="default-chat", max_tokens=200, messages=HELLO,
                                    extra_headers={"x-mock-end-after-chunks": "5"}) as s:
            "".join(s.text_stream)
