"""End to end through real Envoy and the ext_proc, driven by the openai SDK and httpx."""

from __future__ import annotations

import io
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import anthropic
import httpx
import openai
import orjson
import pytest

from .conftest import Gateway, build_gateway

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Summarize this quarter's earnings report."}]


def client(gw: Gateway, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key or gw.key, max_retries=0)


def post(gw: Gateway, body: bytes | dict, key: str | None = "default", path: str = CHAT,
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["authorization"] = f"Bearer {gw.key if key == 'default' else key}"
    if isinstance(body, dict):
        return httpx.post(gw.url + path, json=body, headers=h, timeout=30)
    return httpx.post(gw.url + path, content=body, headers=h, timeout=30)


def test_openai_sdk_non_streamed(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(model="default-chat", messages=HELLO)
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("This is a mock reply from mock-gpt-4o-mini")
    assert raw.headers["x-gateway-backend"] == "mock/mock-gpt-4o-mini"
    assert int(raw.headers["x-gateway-prompt-tokens"]) == completion.usage.prompt_tokens
    assert int(raw.headers["x-gateway-completion-tokens"]) == completion.usage.completion_tokens
    assert raw.headers["x-request-id"]
    [sent] = gw.received(gw.primary)
    assert sent["body"]["model"] == "mock-gpt-4o-mini"
    assert sent["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_a_prompt_of_over_a_million_characters_is_counted_and_served(gw: Gateway, sdk: str) -> None:
    """One string of 1.26 million characters (well under envoy.maxRequestBytes): the token
    count goes in pieces (bpe-openai refuses 1,000,000 characters at once; this was a 500
    gateway_internal_error), exactly, and the provider gets the prompt whole."""
    text = " ".join(["The nightly export failed at 03:14, retried twice (exit 137)."] * 20_000)
    if sdk == "openai":
        raw = client(gw).chat.completions.with_raw_response.create(
            model="default-chat", messages=[{"role": "user", "content": text}])
        prompt_tokens = raw.parse().usage.prompt_tokens
    else:
        raw = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0).messages.with_raw_response.create(
            model="default-chat", max_tokens=50, messages=[{"role": "user", "content": text}])
        prompt_tokens = raw.parse().usage.input_tokens
    assert raw.status_code == 200
    assert int(raw.headers["x-gateway-prompt-tokens"]) == prompt_tokens > 250_000
    [sent] = gw.received(gw.primary)
    assert text in orjson.dumps(sent["body"]).decode()


def test_openai_sdk_streamed_hides_the_usage_chunk_it_did_not_ask_for(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(model="default-chat", messages=HELLO, stream=True)
    chunks = list(raw.parse())
    assert chunks and all(c.choices for c in chunks), "a usage-only chunk reached the client"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("This is a mock reply")
    assert raw.headers["x-gateway-prompt-tokens"]
    [sent] = gw.received(gw.primary)
    assert sent["body"]["stream_options"] == {"include_usage": True}  # the gateway asked for usage


def test_openai_sdk_streamed_with_usage_requested(gw: Gateway) -> None:
    stream = client(gw).chat.completions.create(model="default-chat", messages=HELLO, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    nonstream = client(gw).chat.completions.create(model="default-chat", messages=HELLO)
    assert chunks[-1].usage.completion_tokens == nonstream.usage.completion_tokens


def test_the_readme_first_call_verbatim(gw: Gateway) -> None:
    GATEWAY_URL = f"{gw.url}/v1/chat/completions"
    API_KEY = gw.key
    out = io.StringIO()
    with redirect_stdout(out):
        with httpx.stream("POST", GATEWAY_URL,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                          json={"model": "default-chat",
                                "messages": [{"role": "user", "content": "Summarize this quarter's earnings report."}],
                                "stream": True},
                          timeout=60.0) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    print(line[6:], end="", flush=True)
    assert response.status_code == 200
    assert '"chat.completion.chunk"' in out.getvalue() and '"usage":{' not in out.getvalue()


def test_embeddings_and_models(gw: Gateway) -> None:
    emb = client(gw).embeddings.create(model="default-embedding", input=["alpha", "beta"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0
    assert {m.id for m in client(gw).models.list()} == {"default-chat", "fallback-chat", "private-chat",
                                                        "default-embedding", "claude-chat", "gemini-chat",
                                                        "azure-chat"}
    assert [m.id for m in client(gw, gw.restricted_key).models.list()] == ["default-chat"]
    assert [r["path"] for r in gw.received(gw.primary)] == ["/v1/embeddings"]  # /v1/models never left


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"key": None}, 401, "missing_api_key"),
    ({"key": "gwk_demo_wrong-secret"}, 401, "invalid_api_key"),
    ({"key": "sk-not-a-gateway-key"}, 401, "invalid_api_key"),
    ({"key": "expired"}, 401, "expired_api_key"),
    ({"key": "restricted", "body": {"model": "fallback-chat", "messages": HELLO}}, 403, "model_not_allowed"),
    ({"body": {"model": "no-such-model", "messages": HELLO}}, 404, "model_not_found"),
    ({"path": "/v1/completions"}, 404, "unknown_endpoint"),
    ({"body": b'{"model": "default-chat", "messages": ['}, 400, "invalid_json"),
    ({"body": {"model": "default-chat", "messages": "hi"}}, 400, "invalid_request"),
    ({"body": {"model": 42, "messages": HELLO}}, 400, "invalid_request"),
    ({"body": b'{"model": "default-chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}'}, 400,
     "invalid_encoding"),
    ({"headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"body": b'{"model": "default-chat", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'}, 413, "request_too_large"),
])
def test_bad_requests_get_openai_errors_and_never_reach_a_provider(gw: Gateway, kwargs: dict, status: int,
                                                                   code: str) -> None:
    key = kwargs.get("key", "default")
    key = {"expired": gw.expired_key, "restricted": gw.restricted_key}.get(key, key)
    resp = post(gw, kwargs.get("body", {"model": "default-chat", "messages": HELLO}), key=key,
                path=kwargs.get("path", CHAT), headers=kwargs.get("headers"))
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["code"] == code
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []


def test_chunked_body_over_the_limit_is_413_in_openai_shape(gw: Gateway) -> None:
    def body():
        yield b'{"model": "default-chat", "pad": "'
        for _ in range(11):
            yield b"x" * (1024 * 1024)
        yield b'"}'
    resp = httpx.post(gw.url + CHAT, content=body(), timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert gw.received(gw.primary) == []


def test_provider_gets_its_own_key_never_the_callers(gw: Gateway) -> None:
    client(gw).chat.completions.create(model="default-chat", messages=HELLO)  # native injection
    client(gw).chat.completions.create(model="fallback-chat", messages=HELLO)  # upstream ext_proc
    sent = gw.received(gw.primary)
    assert [r["headers"]["authorization"] for r in sent] == [f"Bearer {gw.primary_key}"] * 2
    assert [r["body"]["model"] for r in sent] == ["mock-gpt-4o-mini", "mock-primary"]
    for r in sent:
        assert gw.key not in str(r["headers"]) and "x-api-key" not in r["headers"]
        assert not [h for h in r["headers"] if h.startswith("x-gateway-")]


def test_caller_key_in_x_api_key_is_accepted_and_stripped(gw: Gateway) -> None:
    resp = post(gw, {"model": "default-chat", "messages": HELLO}, key=None, headers={"x-api-key": gw.key})
    assert resp.status_code == 200
    [sent] = gw.received(gw.primary)
    assert "x-api-key" not in sent["headers"] and sent["headers"]["authorization"] == f"Bearer {gw.primary_key}"


def test_fallback_attempt_gets_the_secondarys_model_and_key(gw: Gateway) -> None:
    httpx.post(f"{gw.primary}/_mock/behaviour", json={"model": "mock-primary", "status": 500}).raise_for_status()
    raw = client(gw).chat.completions.with_raw_response.create(model="fallback-chat", messages=HELLO)
    assert raw.status_code == 200 and raw.headers["x-gateway-backend"] == "mock-backup/mock-secondary"
    assert raw.headers["x-gateway-attempts"] == "2" and "x-envoy-attempt-count" not in raw.headers
    assert [r["body"]["model"] for r in gw.received(gw.primary)] == ["mock-primary"]
    [second] = gw.received(gw.backup)
    assert second["body"]["model"] == "mock-secondary"
    assert second["headers"]["authorization"] == f"Bearer {gw.backup_key}"


def test_a_client_set_route_header_cannot_redirect(gw: Gateway) -> None:
    resp = post(gw, {"model": "default-chat", "messages": HELLO}, key=gw.restricted_key,
                headers={"x-gateway-model": "fallback-chat", "x-gateway-backend": "mock-backup/mock-secondary"})
    assert resp.status_code == 200 and resp.headers["x-gateway-backend"] == "mock/mock-gpt-4o-mini"
    assert [r["body"]["model"] for r in gw.received(gw.primary)] == ["mock-gpt-4o-mini"]
    assert gw.received(gw.backup) == []


def test_no_key_appears_in_any_log_line(gw: Gateway) -> None:
    client(gw).chat.completions.create(model="default-chat", messages=HELLO)
    client(gw).chat.completions.create(model="fallback-chat", messages=HELLO)
    post(gw, {"model": "default-chat", "messages": HELLO}, key=gw.expired_key)
    post(gw, {"model": "default-chat", "messages": HELLO}, key="gwk_demo_a-wrong-secret-value")
    time.sleep(0.2)
    logs = gw.logs()
    assert '"event":"access"' in logs
    for secret in (gw.key, gw.expired_key, gw.restricted_key, "a-wrong-secret-value", gw.primary_key,
                   gw.backup_key):
        assert secret not in logs


def test_access_log_line_has_the_request_facts(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(model="default-chat", messages=HELLO, stream=True)
    list(raw.parse())
    request_id = raw.headers["x-request-id"]
    time.sleep(0.2)
    import orjson
    [line] = [orjson.loads(l) for l in gw.stack.log_path("extproc").read_text().splitlines()
              if request_id in l and '"access"' in l]
    assert line["key_id"] == "demo" and line["team"] == "demo" and line["model"] == "default-chat"
    assert line["backend"] == "mock/mock-gpt-4o-mini" and line["status"] == 200 and line["stream"] is True
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0 and line["ttft_ms"] is not None


def test_extproc_down_fails_closed_and_recovers_without_restarting_envoy() -> None:
    import threading

    with tempfile.TemporaryDirectory(prefix="gw-kill-") as tmp:
        gw = build_gateway(Path(tmp))
        outcomes: list[tuple[int, str | None, float]] = []
        stop = threading.Event()

        def traffic() -> None:  # a client sending requests back to back, during the kill
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    started = time.monotonic()
                    resp = http.post(gw.url + CHAT, json={"model": "default-chat", "messages": HELLO},
                                     headers={"authorization": f"Bearer {gw.key}"})
                    code = resp.json().get("error", {}).get("code") if resp.status_code != 200 else None
                    outcomes.append((resp.status_code, code, time.monotonic() - started))
        try:
            envoy_pid = gw.stack.procs["envoy"].pid
            worker = threading.Thread(target=traffic)
            worker.start()
            time.sleep(0.5)
            gw.stack.kill_extproc()
            time.sleep(1.0)
            during = len(outcomes)
            gw.stack.start_extproc()
            deadline = time.monotonic() + 10
            while not any(s == 200 for s, _, _ in outcomes[during:]):
                assert time.monotonic() < deadline, "traffic did not recover after the ext_proc restarted"
                time.sleep(0.1)
            stop.set()
            worker.join()
            failed = [(s, c, t) for s, c, t in outcomes if s != 200]
            assert failed, "killing the ext_proc should have failed some requests"
            assert all(s == 503 and c == "gateway_unavailable" and t < 2.0 for s, c, t in failed), failed[:5]
            assert outcomes[-1][0] == 200
            assert gw.stack.procs["envoy"].pid == envoy_pid and gw.stack.procs["envoy"].poll() is None
        finally:
            stop.set()
            gw.stack.stop()


def test_readme_tiny_budget_key_is_refused_by_its_third_call(gw: Gateway) -> None:
    tiny = client(gw, "gwk_tiny_local-only-tiny-budget-key")
    outcomes = []
    for _ in range(3):
        try:
            raw = tiny.chat.completions.with_raw_response.create(
                model="default-chat", messages=[{"role": "user", "content": "Hi"}])
            outcomes.append(("ok", raw.headers.get("x-gateway-max-tokens-clamped")))
        except openai.RateLimitError as err:
            outcomes.append(("429", err.body["code"]))
        time.sleep(0.2)  # let the settlement land, as a person typing would
    assert outcomes[0][0] == "ok" and outcomes[0][1] is not None  # admitted, clamped
    assert ("429", "budget_exceeded") in outcomes[1:]
    usage = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": "Bearer gwk_tiny_local-only-tiny-budget-key"})
    [daily] = [b for b in usage.json()["budgets"] if b["level"] == "key:tiny" and b["window"] == "daily"]
    assert daily["limit_usd"] == 0.001 and 0 < daily["spent_usd"] <= 0.001


def test_sigterm_drains_open_streams_then_exits() -> None:
    import signal
    import threading

    with tempfile.TemporaryDirectory(prefix="gw-drain-") as tmp:
        gw = build_gateway(Path(tmp))
        try:
            lines: list[str] = []

            def slow_stream() -> None:
                with httpx.stream("POST", gw.url + CHAT, timeout=30, json={
                        "model": "default-chat", "messages": HELLO, "stream": True},
                        headers={"authorization": f"Bearer {gw.key}", "x-mock-chunk-delay-ms": "100"}) as resp:
                    lines.extend(line for line in resp.iter_lines() if line)

            worker = threading.Thread(target=slow_stream)
            worker.start()
            time.sleep(0.5)  # the stream is flowing through the ext_proc
            serve = gw.stack.procs["extproc"]
            serve.send_signal(signal.SIGTERM)
            worker.join(timeout=20)
            assert lines and lines[-1] == "data: [DONE]"  # the open stream finished
            assert serve.wait(timeout=20) == 0  # then the processes exited cleanly
            log = gw.stack.log_path("extproc").read_text()
            assert '"event":"extproc_draining"' in log and '"event":"extproc_stopped"' in log
        finally:
            gw.stack.stop()
