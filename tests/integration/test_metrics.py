"""Metrics scraped from the ext_proc's /metrics after real traffic through Envoy."""

from __future__ import annotations

import re
import time

import httpx
import openai

from .conftest import Gateway

HELLO = [{"role": "user", "content": "Say hello."}]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series, 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.index("}") + 1]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(gw: Gateway) -> str:
    return httpx.get(gw.stack.metrics_url, timeout=5).text


def test_requests_tokens_and_latency_are_counted(gw: Gateway) -> None:
    before = scrape(gw)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    usage_in = usage_out = 0
    for _ in range(6):
        r = client.chat.completions.create(model="default-chat", messages=HELLO)
        usage_in += r.usage.prompt_tokens
        usage_out += r.usage.completion_tokens
    list(client.chat.completions.create(model="default-chat", messages=HELLO, stream=True))
    labels = {"team": "demo", "model": "default-chat", "provider": "mock", "status_class": "2xx"}
    # The SDK stops at [DONE]; the stream's end (when it is counted) may reach the ext_proc a moment later.
    deadline = time.monotonic() + 3
    while (sample(after := scrape(gw), "genai_requests_total", **labels)
           - sample(before, "genai_requests_total", **labels) < 7 and time.monotonic() < deadline):
        time.sleep(0.05)
    assert sample(after, "genai_requests_total", **labels) - sample(before, "genai_requests_total", **labels) == 7
    delta_in = sample(after, "genai_tokens_total", team="demo", model="default-chat", type="input") - \
        sample(before, "genai_tokens_total", team="demo", model="default-chat", type="input")
    assert delta_in >= usage_in
    ttft = sample(after, "genai_time_to_first_token_seconds_count", model="default-chat") - \
        sample(before, "genai_time_to_first_token_seconds_count", model="default-chat")
    assert ttft == 1
    assert sample(after, "genai_gateway_extproc_phase_seconds_count", phase="request_body") > 0
    # The mock reports cached_tokens 0: seven prompt-cache misses, no hit.
    assert sample(after, "genai_cache_requests_total", result="miss") - \
        sample(before, "genai_cache_requests_total", result="miss") == 7
    assert sample(after, "genai_cache_requests_total", result="hit") == sample(before, "genai_cache_requests_total",
                                                                                result="hit")
    cost = sample(after, "genai_request_cost_dollars_total", team="demo", model="default-chat") - \
        sample(before, "genai_request_cost_dollars_total", team="demo", model="default-chat")
    expected = (usage_in * 5.0 + usage_out * 20.0) / 1e6  # values-local prices, USD per 1M tokens
    assert cost >= expected * 0.999
    assert sample(after, "genai_gateway_team_daily_budget_dollars", team="demo") == 5
    assert 0 < sample(after, "genai_team_daily_budget_remaining_dollars", team="demo") < 5


def test_models_and_usage_are_no_genai_requests(gw: Gateway) -> None:
    """`GET /v1/models` and `/v1/usage` are answered by the gateway, no LLM call: they were
    counted in genai_requests_total (and the duration histogram) under model="other",
    whatever their outcome. Envoy's own request stats still count them."""
    stats = f"http://127.0.0.1:{gw.stack.values['envoy']['metrics']['port']}/stats/prometheus"
    envoy_before = sample(httpx.get(stats, timeout=5).text, "envoy_http_downstream_rq_xx",
                          envoy_http_conn_manager_prefix="gateway")
    before = scrape(gw)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    assert [m.id for m in client.models.list()]
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        good, bad = {"authorization": f"Bearer {gw.key}"}, {"authorization": "Bearer gwk_demo_not-a-key"}
        assert http.get("/v1/usage", headers=good).status_code == 200
        assert http.head("/v1/models", headers=good).status_code == 200
        assert http.get("/v1/models", headers=bad).status_code == 401
        assert http.get("/v1/usage").status_code == 401
        assert http.post("/v1/models", headers=good, json={}).status_code == 405
    client.chat.completions.create(model="default-chat", messages=HELLO)  # the one GenAI request
    after = scrape(gw)
    for name in ("genai_requests_total", "genai_request_duration_seconds_count"):
        assert sample(after, name) - sample(before, name) == 1, name
    assert sample(after, "genai_requests_total", model="other") == sample(before, "genai_requests_total",
                                                                          model="other")
    deadline = time.monotonic() + 5
    while (envoy := sample(httpx.get(stats, timeout=5).text, "envoy_http_downstream_rq_xx",
                           envoy_http_conn_manager_prefix="gateway")) - envoy_before < 7 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert envoy - envoy_before >= 7


def test_a_thousand_unknown_models_make_one_other_series(gw: Gateway) -> None:
    with httpx.Client(headers={"authorization": f"Bearer {gw.key}"}) as http:
        for i in range(1000):
            assert http.post(f"{gw.url}/v1/chat/completions",
                             json={"model": f"no-such-model-{i}", "messages": HELLO}).status_code == 404
    text = scrape(gw)
    assert "no-such-model" not in text
    series = [l for l in text.splitlines() if l.startswith("genai_requests_total{") and 'team="demo"' in l
              and 'status_class="4xx"' in l and 'model="other"' in l]
    assert len(series) == 1 and sample(text, "genai_requests_total", team="demo", model="other") >= 1000


def test_time_to_first_token_counts_successful_streams_only(gw: Gateway) -> None:
    """A provider's error answer to a stream (a fast 503, a 429) is no first token: counting
    it would pull the TTFT p95 (and its alert) wherever errors happen to be."""
    before = scrape(gw)
    with httpx.Client(headers={"authorization": f"Bearer {gw.key}"}, timeout=30) as http:
        for status in (503, 429, 400):
            resp = http.post(f"{gw.url}/v1/chat/completions", headers={"x-mock-status": str(status)},
                             json={"model": "private-chat", "messages": HELLO, "stream": True})
            assert resp.status_code == status, resp.text
        ok = http.post(f"{gw.url}/v1/chat/completions", json={"model": "private-chat", "messages": HELLO,
                                                                "stream": True})
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")
    deadline = time.monotonic() + 3
    while (sample(after := scrape(gw), "genai_request_duration_seconds_count", model="private-chat")
           - sample(before, "genai_request_duration_seconds_count", model="private-chat") < 4
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert sample(after, "genai_request_duration_seconds_count", model="private-chat") - \
        sample(before, "genai_request_duration_seconds_count", model="private-chat") == 4
    for name in ("genai_time_to_first_token_seconds_count", "genai_time_per_output_token_seconds_count"):
        assert sample(after, name, model="private-chat") - sample(before, name, model="private-chat") == 1, name


def test_an_attempt_the_client_left_is_counted_whatever_serves_the_model(gw: Gateway) -> None:
    """A client that hangs up while the provider works: the provider had the attempt (the mock
    recorded it), so genai_upstream_attempts_total counts it once, on a backend Envoy serves
    natively (the router counts its attempts) as on one behind the upstream ext_proc."""
    before = scrape(gw)
    for model in ("private-chat", "default-chat"):
        try:
            httpx.post(f"{gw.url}/v1/chat/completions", timeout=0.5, json={"model": model, "messages": HELLO},
                       headers={"authorization": f"Bearer {gw.key}", "x-mock-latency-ms": "1500"})
        except httpx.TimeoutException:
            pass
        else:
            raise AssertionError("the answer came before the client left")
    backends = {"private-chat": "mock/mock-private-llama", "default-chat": "mock/mock-gpt-4o-mini"}
    deadline = time.monotonic() + 5
    while True:
        after = scrape(gw)
        counted = {m: sample(after, "genai_upstream_attempts_total", backend=b)
                   - sample(before, "genai_upstream_attempts_total", backend=b) for m, b in backends.items()}
        if all(counted.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(gw.received(gw.primary)) == 2
    assert counted == {"private-chat": 1, "default-chat": 1}
    assert sample(after, "genai_requests_total", model="private-chat", status_class="4xx") - \
        sample(before, "genai_requests_total", model="private-chat", status_class="4xx") == 1


def test_a_stream_left_early_adds_no_time_per_output_token(gw: Gateway) -> None:
    """A client that leaves mid-stream is charged the reservation (its output tokens: the cap it
    was sent), but those are not tokens generated in that time: dividing the time streamed by
    them would put a made-up, tiny time per output token into the histogram."""
    before = scrape(gw)
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30,
                      json={"model": "private-chat", "messages": HELLO, "stream": True},
                      headers={"authorization": f"Bearer {gw.key}", "x-mock-chunk-delay-ms": "100",
                               "x-mock-reply-words": "40"}) as resp:
        next(resp.iter_raw())
    deadline = time.monotonic() + 5
    while (sample(after := scrape(gw), "genai_requests_total", model="private-chat")
           - sample(before, "genai_requests_total", model="private-chat") < 1 and time.monotonic() < deadline):
        time.sleep(0.05)
    assert sample(after, "genai_time_to_first_token_seconds_count", model="private-chat") - \
        sample(before, "genai_time_to_first_token_seconds_count", model="private-chat") == 1
    assert sample(after, "genai_time_per_output_token_seconds_count", model="private-chat") == \
        sample(before, "genai_time_per_output_token_seconds_count", model="private-chat")


def test_no_created_series(gw: Gateway) -> None:
    """docs/observability.md: no `*_created` series (a timestamp per counter, per scrape: the
    `serve` parent's own worker-restart counter included)."""
    text = scrape(gw)
    assert "genai_gateway_extproc_worker_restarts_total 0.0" in text
    assert [line for line in text.splitlines() if "_created" in line] == []
