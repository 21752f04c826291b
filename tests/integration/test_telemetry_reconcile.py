"""Every output tells the same story: a mixed burst over two ext_proc workers (OpenAI and
Anthropic SDKs, JSON and streams, translated providers, a fallback whose primary fails,
refusals of every kind) reconciled against what the clients saw, what the mock providers
received, what the budget charged (/v1/usage), the access log and the signed audit trail."""

from __future__ import annotations

import asyncio
import collections
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from ..redis_server import RedisServer
from .conftest import Gateway, add_provider_models, running_gateway

HELLO = [{"role": "user", "content": "Say hello."}]
PATHS = ("/v1/chat/completions", "/v1/messages")


def series(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.index("}") + 1])))
            out[labels] = float(line.rsplit(" ", 1)[1])
    return out


def delta(before: str, after: str, name: str, *keep: str) -> dict[tuple[str, ...], float]:
    """The change of a metric between two scrapes, summed by the labels in `keep`."""
    out: dict[tuple[str, ...], float] = collections.Counter()
    old = series(before, name)
    for labels, value in series(after, name).items():
        d = dict(labels)
        out[tuple(d[k] for k in keep)] += value - old.get(labels, 0.0)
    return {k: v for k, v in out.items() if v}


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    with RedisServer() as server:
        def two_workers(values: dict[str, Any]) -> None:
            values["extproc"]["processes"] = 2
            values["budgets"].pop("devMemoryStore", None)
            values["budgets"].update(store="redis", redis={"url": server.url})
            add_provider_models(values)
        with running_gateway("gw-reconcile-", customize=two_workers) as gateway:
            yield gateway


def test_a_mixed_burst_reconciles_across_every_output(gw: Gateway) -> None:
    auth = {"authorization": f"Bearer {gw.key}"}
    httpx.post(f"{gw.primary}/_mock/behaviour", json={"model": "mock-primary", "status": 503}).raise_for_status()
    spent_before = {b["level"] + b["window"]: b["spent_usd"]
                    for b in httpx.get(f"{gw.url}/v1/usage", headers=auth).json()["budgets"]}
    before = httpx.get(gw.stack.metrics_url).text
    seen: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, status class)
    tokens: collections.Counter[tuple[str, str]] = collections.Counter()
    streams_ok: collections.Counter[str] = collections.Counter()
    oa = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    an = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)

    def count(model: str, usage_in: int, usage_out: int) -> None:
        seen[(model, "2xx")] += 1
        tokens[(model, "input")] += usage_in
        tokens[(model, "output")] += usage_out

    async def chat(model: str, stream: bool) -> None:
        try:
            if stream:
                got = None
                async for chunk in await oa.chat.completions.create(
                        model=model, messages=HELLO, stream=True, stream_options={"include_usage": True}):
                    got = chunk.usage or got
                assert got is not None
                count(model, got.prompt_tokens, got.completion_tokens)
                streams_ok[model] += 1
            else:
                done = await oa.chat.completions.create(model=model, messages=HELLO)
                count(model, done.usage.prompt_tokens, done.usage.completion_tokens)
        except openai.APIStatusError as err:
            seen[(model, f"{err.status_code // 100}xx")] += 1

    async def messages(stream: bool) -> None:
        if stream:
            async with an.messages.stream(model="claude-chat", max_tokens=100, messages=HELLO) as s:
                async for _ in s:
                    pass
                final = await s.get_final_message()
            streams_ok["claude-chat"] += 1
        else:
            final = await an.messages.create(model="claude-chat", max_tokens=100, messages=HELLO)
        count("claude-chat", final.usage.input_tokens, final.usage.output_tokens)

    async def refused(body: dict[str, Any], key: str, code: str, model: str) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(f"{gw.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
        if resp.status_code == 200:  # the tiny key's first request may fit its budget
            usage = resp.json()["usage"]
            count(model, usage["prompt_tokens"], usage["completion_tokens"])
            return
        assert resp.json()["error"]["code"] == code, resp.text
        seen[(model, f"{resp.status_code // 100}xx")] += 1

    async def burst() -> None:
        jobs = []
        for i in range(6):
            jobs += [chat(m, s) for m in ("default-chat", "fallback-chat", "gemini-chat", "azure-chat",
                                          "bedrock-chat", "gemini3-chat") for s in (False, True)]
            jobs += [messages(False), messages(True),
                     refused({"model": f"no-such-model-{i}", "messages": HELLO}, gw.key, "model_not_found", "other"),
                     refused({"model": "default-chat", "messages": HELLO}, f"gwk_nope_{i}-invalid-key-00000",
                             "invalid_api_key", "other"),
                     refused({"model": "default-chat", "messages": [
                         {"role": "user", "content": "Use key AKIAIOSFODNN7EXAMPLE to upload."}]},
                             gw.key, "content_blocked", "default-chat"),
                     refused({"model": "default-chat", "messages": HELLO, "max_tokens": 1000},
                             "gwk_tiny_local-only-tiny-budget-key", "budget_exceeded", "default-chat")]
        await asyncio.gather(*jobs)

    asyncio.run(burst())
    sent = sum(seen.values())
    assert sent == 6 * (12 + 6)
    deadline = time.monotonic() + 10  # a stream is counted at its end, which may follow the SDK's [DONE]
    while (sum(delta(before, after := httpx.get(gw.stack.metrics_url).text, "genai_requests_total",
                     "model").values()) < sent and time.monotonic() < deadline):
        time.sleep(0.1)

    # Requests: once each, by model and the status class the client got.
    assert delta(before, after, "genai_requests_total", "model", "status_class") == {
        k: float(v) for k, v in seen.items()}
    # Tokens: exactly the provider usage the clients were shown.
    assert delta(before, after, "genai_tokens_total", "model", "type") == {k: float(v) for k, v in tokens.items()}
    # Cost: what the budget was charged (team and org, the same requests).
    spent = {b["level"] + b["window"]: b["spent_usd"]
             for b in httpx.get(f"{gw.url}/v1/usage", headers=auth).json()["budgets"]}
    cost = sum(delta(before, after, "genai_request_cost_dollars_total", "model").values())
    assert cost > 0
    assert spent["team:demodaily"] - spent_before["team:demodaily"] == pytest.approx(cost, abs=1e-6)
    # Time to first token: the streams that succeeded, one each.
    assert delta(before, after, "genai_time_to_first_token_seconds_count", "model") == {
        (m,): float(n) for m, n in streams_ok.items()}
    # Attempts: what the mock providers received (retries and fallbacks included).
    attempts = delta(before, after, "genai_upstream_attempts_total", "backend")
    on_primary = sum(v for (b,), v in attempts.items() if b.startswith("mock/"))
    assert on_primary == len(gw.received(gw.primary))
    assert sum(attempts.values()) - on_primary == len(gw.received(gw.backup))
    # Every fallback-chat request tried the failing primary until outlier detection ejected it
    # (consecutive5xx: 3): how many started before that is a race.
    assert 3 <= attempts[("mock/mock-primary",)] <= 12

    # The access log: one line per request, with the status the client got.
    lines = [orjson.loads(line[line.index("{"):]) for line in gw.stack.log_path("extproc").read_text().splitlines()
             if '"event":"access"' in line]
    lines = [line for line in lines if line["path"] in PATHS]
    assert len(lines) == sent and len({line["request_id"] for line in lines}) == sent
    client_classes: collections.Counter[str] = collections.Counter()
    for (_, status_class), n in seen.items():
        client_classes[status_class] += n
    assert collections.Counter(f"{line['status'] // 100}xx" for line in lines) == client_classes

    # The audit trail: one record per request, same ids, chains that verify.
    gw.stack.stop()
    audit = gw.stack.workdir / "audit"
    records = [orjson.loads(x) for seg in sorted(audit.rglob("*.jsonl")) for x in seg.read_bytes().split(b"\n") if x]
    requests = [r for r in records if r["type"] == "request" and r["path"] in PATHS]
    assert sorted(r["request_id"] for r in requests) == sorted(line["request_id"] for line in lines)
    assert sum(r["cost_nano"] for r in requests) / 1e9 == pytest.approx(cost, abs=1e-6)
    assert sum(r["output_tokens"] or 0 for r in requests) == sum(v for (_, t), v in tokens.items() if t == "output")
    out = subprocess.run([sys.executable, "-m", "gateway_extproc", "audit", "verify", "--dir", str(audit),
                          "--public-key", str(gw.stack.workdir / "audit-signing.key.pub"), "--strict"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
