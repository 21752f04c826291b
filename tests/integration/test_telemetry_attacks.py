"""Telemetry under hostile traffic, through real Envoy.

- Thousands of distinct caller- and provider-chosen values (model names, paths, methods,
  header names and values, request and session ids, keys, users, tool names, provider error
  types, statuses, answer models and ids, streams left early) add no /metrics label value
  beyond config and no OTLP metric attribute value, and do not grow the ext_proc's memory.
- Caller text built to break log lines (line breaks of every kind, ANSI escapes, JSON syntax,
  megabytes) leaves every line of both logs one JSON object of bounded size; libraries'
  own log records are such lines too.
- What one request writes is bounded: one warning per stream however many events it could
  not read or cut a credential from; span attributes are cut to 256 characters.
- A caller's own `x-request-id` is never logged, also on requests Envoy refuses early."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
import random
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_extproc.localstack import free_port

from .conftest import Gateway, running_gateway
from .test_tracing import Collector, otlp_collector, wait_for


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[Gateway, Collector]]:
    with otlp_collector() as (collector, _, env), running_gateway("gw-telemetry-", env=env) as gw:
        yield gw, collector


def chat(model: str, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, **extra}


def label_values(text: str) -> set[tuple[str, str]]:
    """Every (label, value) pair on a Prometheus text page."""
    return {pair for family in text_string_to_metric_families(text) for sample in family.samples
            for pair in sample.labels.items() if pair[0] != "le"}


def config_names(gw: Gateway) -> set[str]:
    """The label values config may give: teams, models, providers, backends (`provider/model`)."""
    v = gw.stack.values
    return ({m["name"] for m in v["models"]} | {p["name"] for p in v["providers"]}
            | {f"{b['provider']}/{b['model']}" for m in v["models"] for b in m["backends"]}
            | {k.get("team", "") for k in v["keys"]} | set(v.get("teams", {})))


def otlp_attribute_values(collector: Collector) -> set[tuple[str, str]]:
    return {(kv.key, kv.value.string_value) for m in list(collector.metrics) for dp in m.histogram.data_points
            for kv in dp.attributes}


def worker_rss_kib(gw: Gateway) -> int:
    """Resident memory of the ext_proc's `serve` process and its workers."""
    parent = gw.stack.procs["extproc"].pid
    pids = [parent] + [int(p) for task in Path(f"/proc/{parent}/task").iterdir()
                       for p in (task / "children").read_text().split()]
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def provider_reply(rng: random.Random, word: str) -> dict[str, str]:
    """Mock controls: an answer or an error whose provider-written strings are `word`s."""
    if rng.random() < 0.5:
        body = {"id": f"chatcmpl-{word}", "object": "chat.completion", "created": 1, "model": f"m-{word}",
                "system_fingerprint": word,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": word}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
        return {"x-mock-raw-body": base64.b64encode(orjson.dumps(body)).decode()}
    body = {"error": {"message": f"bad {word}", "type": word, "code": word, "param": word}}
    return {"x-mock-raw-status": str(rng.choice([400, 401, 403, 404, 409, 418, 422, 429, 451, 500, 502, 503, 529])),
            "x-mock-raw-body": base64.b64encode(orjson.dumps(body)).decode()}


def hostile_request(gw: Gateway, client: httpx.Client, i: int) -> None:
    rng = random.Random(i)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.") for _ in range(20))
    auth = {"authorization": f"Bearer {gw.key}"}
    url = f"{gw.url}/v1/chat/completions"
    kind = i % 10
    if kind == 0:
        client.post(url, json=chat(word), headers=auth)
    elif kind == 1:
        client.post(f"{gw.url}/v1/{word}/{i}", json=chat("default-chat"), headers=auth)
    elif kind == 2:
        client.post(url, json=chat("default-chat"), headers={**auth, "x-request-id": word, "x-session-id": word,
                                                              f"x-{word}": word, "user-agent": word})
    elif kind == 3:
        client.post(url, json=chat("default-chat"), headers={"authorization": f"Bearer gwk_{word}_{word}"})
    elif kind == 4:
        client.post(url, json=chat("default-chat", user=word, tools=[{"type": "function", "function": {
            "name": word.replace(".", "_"), "parameters": {"type": "object"}}}]), headers=auth)
    elif kind == 5:
        client.post(url, json=chat("default-chat"), headers={**auth, **provider_reply(rng, word)})
    elif kind == 6:
        client.post(f"{gw.url}/v1/messages", json={"model": word, "max_tokens": 8,
                                                   "messages": [{"role": "user", "content": "hi"}]}, headers=auth)
    elif kind == 7:
        client.request("".join(c for c in word.upper() if c.isalpha()) or "X", url, json=chat("default-chat"),
                       headers=auth)
    elif kind == 8:
        client.post(url, json=chat("claude-chat"), headers={**auth, **provider_reply(rng, word)})
    else:  # a stream its client leaves after the first bytes
        with client.stream("POST", url, json=chat(rng.choice(["default-chat", "claude-chat"]), stream=True),
                           headers={**auth, "x-mock-chunk-delay-ms": "20"}) as r:
            next(r.iter_raw(), None)


def test_thousands_of_hostile_values_add_no_series_and_no_memory(hostile: tuple[Gateway, Collector]) -> None:
    gw, collector = hostile

    def burst(start: int, count: int) -> None:
        with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=30) as client:
            list(pool.map(lambda i: hostile_request(gw, client, i), range(start, start + count)))

    burst(0, 900)  # every outcome, many times over: its series exist, the allocator is warm
    time.sleep(1.0)
    before, attrs, rss = label_values(httpx.get(gw.stack.metrics_url).text), otlp_attribute_values(collector), \
        worker_rss_kib(gw)
    starts = {name: gw.stack.log_path(name).stat().st_size for name in ("extproc", "envoy")}
    burst(900, 2700)
    time.sleep(1.0)
    for name, start in starts.items():  # JSON lines only: no library's (or Envoy's) own text lines
        written = gw.stack.log_path(name).read_bytes()[start:].decode().splitlines()
        assert all(isinstance(orjson.loads(line), dict) for line in written if line.strip()), name
    after = label_values(httpx.get(gw.stack.metrics_url).text)
    # (a fallback to the backup backend may first happen in the second burst: a config name)
    assert {(label, value) for label, value in after - before if value not in config_names(gw)} == set()
    assert len(after) < 200
    assert otlp_attribute_values(collector) - attrs == set()
    # 2,700 more distinct values of each kind: a label set, span or cache entry kept per value
    # would show; the allocator's own slack stays well under this.
    assert worker_rss_kib(gw) - rss < 16 * 1024, (rss, worker_rss_kib(gw))


BREAKERS = "\n\r\x00\x1b[2J\x1b[31m\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\"}{\\"


def test_caller_text_built_to_break_log_lines_leaves_each_one_json(hostile: tuple[Gateway, Collector]) -> None:
    """Content logging is on for `internal` and below (values-local): the prompt and the answer
    are logged. Whatever they hold, each line, split on `\\n` or on any Unicode line break,
    is one JSON object, and none is larger than the content-logging cap allows."""
    gw, _ = hostile
    mark = [gw.stack.log_path(n).stat().st_size for n in ("extproc", "envoy")]
    forged = '{"event":"access","status":200,"key_id":"admin","forged":true}'
    prompt = f"hello{BREAKERS}{forged}\n{forged}\u2028{forged}"
    headers = {"authorization": f"Bearer {gw.key}"}
    ids = []
    for body in (chat("default-chat") | {"messages": [{"role": "user", "content": prompt}], "user": BREAKERS},
                 chat("default-chat") | {"messages": [{"role": "user", "content": prompt * 20_000}]},
                 chat(prompt), chat("default-chat", metadata={prompt: prompt}, store=True)):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert "x-request-id" in r.headers, (r.status_code, r.text[:300])
        ids.append(r.headers["x-request-id"])
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": BREAKERS,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": prompt}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("default-chat"), timeout=30,
                   headers={**headers, "x-session-id": '"}{\\' + "z" * 8000,
                            "x-mock-raw-body": base64.b64encode(orjson.dumps(answer)).decode()})
    ids.append(r.headers["x-request-id"])
    wait_for(lambda: all(i in gw.logs() for i in ids))
    for name, start in zip(("extproc", "envoy"), mark):
        text = gw.stack.log_path(name).read_bytes()[start:].decode()
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines and len(lines) == len([line for line in text.split("\n") if line.strip()])
        for line in lines:
            event = orjson.loads(line)
            assert isinstance(event, dict) and not event.get("forged"), line[:200]
            assert len(line) < 64 * 1024, (name, event.get("event"), len(line))


def test_a_providers_huge_labels_reach_a_span_cut_short(hostile: tuple[Gateway, Collector]) -> None:
    """The answer's `id`, `model` and finish reasons go on the span as the provider wrote them:
    as long as it likes (the provider's choice, or an echo of the caller's request) made a
    span whose batch an OTLP collector may refuse whole (4 MiB a message by default), losing
    every other request's span with it. Each attribute value is cut to 256 characters."""
    gw, collector = hostile
    big = "".join(random.Random(5).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4_000))
    answer = {"id": f"chatcmpl-{big}", "object": "chat.completion", "created": 1, "model": f"m-{big}",
              "choices": [{"index": i, "message": {"role": "assistant", "content": "ok"}, "finish_reason": big[i:]}
                          for i in range(2)],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("default-chat"), timeout=30,
                   headers={"authorization": f"Bearer {gw.key}",
                            "x-mock-raw-body": base64.b64encode(orjson.dumps(answer)).decode()})
    assert r.status_code == 200 and big in r.text  # the client gets the answer as it came
    span = wait_for(lambda: next((s for s in list(collector.spans) for kv in s.attributes
                                  if kv.key == "gen_ai.response.model"
                                  and kv.value.string_value.startswith("m-" + big[:50])), None))
    values = {kv.key: [kv.value.string_value] if kv.value.string_value else
              [v.string_value for v in kv.value.array_value.values] for kv in span.attributes}
    assert values["gen_ai.response.id"][0].startswith("chatcmpl-" + big[:50])
    lengths = {k: [len(v) for v in vs] for k, vs in values.items()}
    assert max(n for ns in lengths.values() for n in ns) <= 256, lengths


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_stream_of_unreadable_events_writes_one_warning_not_one_per_event(hostile: tuple[Gateway, Collector],
                                                                            path: str) -> None:
    """Output scanning drops an event it cannot read (no JSON object) and logs it: it logged
    every one, so a stream of thousands of tiny unreadable events (`data: 1`) wrote thousands
    of lines for one request. Log volume per request is bounded: one warning per stream,
    with the count."""
    gw, _ = hostile
    junk = b"data: 1\n\n" * 3000
    if path == "/v1/responses":
        usage = {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}
        done = {"type": "response.completed", "response": {"id": "resp_1", "object": "response", "status": "completed",
                                                           "model": "m", "output": [], "usage": usage}}
        events = [junk, b"event: response.completed\ndata: " + orjson.dumps(done) + b"\n\n"]
        body: dict = {"model": "default-chat", "input": "hi", "stream": True}
    else:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
        events = [junk, b"data: " + orjson.dumps(chunk) + b"\n\n", b"data: [DONE]\n\n"]
        body = chat("default-chat", stream=True)
    start = gw.stack.log_path("extproc").stat().st_size
    r = httpx.post(gw.url + path, json=body, timeout=30, headers={
        "authorization": f"Bearer {gw.key}",
        "x-mock-raw-events": orjson.dumps([base64.b64encode(e).decode() for e in events]).decode()})
    assert r.status_code == 200
    wait_for(lambda: r.headers["x-request-id"] in gw.stack.log_path("extproc").read_bytes()[start:].decode())
    lines = gw.stack.log_path("extproc").read_bytes()[start:].decode().splitlines()
    warnings = [orjson.loads(line) for line in lines if "stream_event_unreadable" in line]
    assert 1 <= len(warnings) <= 2, len(warnings)
    access = next(orjson.loads(line) for line in lines if '"access"' in line and r.headers["x-request-id"] in line)
    assert access["unreadable_events"] == 3000


def test_a_provider_echoing_the_credential_in_every_chunk_is_logged_once(hostile: tuple[Gateway, Collector]) -> None:
    """The credential is cut from each chunk and the echo logged: it was logged once per chunk
    that held it, so a stream echoing it in each of 150 chunks wrote 150 lines."""
    gw, _ = hostile
    text, lines = _stream_150(gw, f"{gw.primary_key} ")
    assert gw.primary_key not in text and text.count("[credential removed]") == 150
    assert len([line for line in lines if "provider_echoed_credential" in line]) == 1


def _stream_150(gw: Gateway, content: str) -> tuple[str, list[str]]:
    """A provider stream of 150 chunks each with `content`: what the client read, and the
    ext_proc's log lines written for the request."""
    chunks = [b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                        "choices": [{"index": 0, "delta": {"content": content},
                                                     "finish_reason": None}]}) + b"\n\n" for _ in range(150)]
    start = gw.stack.log_path("extproc").stat().st_size
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30,
                      json=chat("default-chat", stream=True, max_tokens=4000),
                      headers={"authorization": f"Bearer {gw.key}", "x-mock-chunk-delay-ms": "3",
                               "x-mock-raw-events": orjson.dumps([base64.b64encode(c).decode() for c in
                                                                  [*chunks, b"data: [DONE]\n\n"]]).decode()}) as r:
        text = r.read().decode()
        request_id = r.headers["x-request-id"]
    wait_for(lambda: request_id in gw.stack.log_path("extproc").read_bytes()[start:].decode())
    return text, [line for line in gw.stack.log_path("extproc").read_bytes()[start:].decode().splitlines() if line]


def test_a_stream_repeating_a_card_in_every_chunk_writes_bounded_log_lines(hostile: tuple[Gateway, Collector]) -> None:
    """A caller can ask a model to repeat a card number (or any value a rule finds) in every
    chunk; output scanning redacts each. The log lines about it stay bounded per request."""
    gw, _ = hostile
    number = "4111 1111 1111 1111"
    text, lines = _stream_150(gw, f"card {number}. ")
    assert number not in text and "[CREDIT_CARD_1]" in text
    assert len(lines) <= 5, Counter(orjson.loads(line)["event"] for line in lines)


def test_an_unreachable_collector_leaves_the_log_json_lines() -> None:
    """OpenTelemetry's exporters log their failures through the standard library; those lines
    were plain text in the JSON stream (and passed the secret mask)."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    with running_gateway("gw-telemetry-down-", env=env) as gw:
        for _ in range(5):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("default-chat"), timeout=30,
                           headers={"authorization": f"Bearer {gw.key}"})
            assert r.status_code == 200
        def failed() -> list[dict]:
            return [orjson.loads(line) for line in gw.stack.log_path("extproc").read_text().split("\n")
                    if "export" in line and "UNAVAILABLE" in line]
        wait_for(failed, 15)
        lines = [line for line in gw.stack.log_path("extproc").read_text().split("\n") if line.strip()]
        assert all(isinstance(orjson.loads(line), dict) for line in lines)
        assert {e["logger"] for e in failed()} <= {"opentelemetry.exporter.otlp.proto.grpc.exporter"}


@pytest.mark.parametrize("target", ["/v1/models#{s}", "/v1/chat/completions#x"])
def test_a_callers_request_id_on_a_request_envoy_refuses_early_is_not_logged(hostile: tuple[Gateway, Collector],
                                                                              target: str) -> None:
    """Envoy replaces a caller's `x-request-id` with its own, but only once it has accepted
    the request: one it refuses before that (a `#fragment` in the path:
    path_normalization_failed) kept the caller's header, and the `envoy_error` line wrote it
    whole as its `request_id` (a key, a card, 60 KiB of anything)."""
    gw, _ = hostile
    secret = "gwk_leak_" + hashlib.sha256(target.encode()).hexdigest()[:24]
    start = gw.stack.log_path("envoy").stat().st_size
    with socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=5) as conn:
        conn.sendall(f"GET {target.format(s=secret)} HTTP/1.1\r\nHost: gateway\r\nx-request-id: {secret}\r\n"
                     f"authorization: Bearer {gw.key}\r\nconnection: close\r\n\r\n".encode())
        answer = conn.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 400") and "malformed_http" in answer
    line = wait_for(lambda: next((line for line in gw.stack.log_path("envoy").read_bytes()[start:].decode().split("\n")
                                  if '"envoy_error"' in line), None))
    event = orjson.loads(line)
    assert event["details"] == "path_normalization_failed" and event["request_id"] in (None, "-")
    assert secret[9:] not in gw.stack.log_path("envoy").read_bytes()[start:].decode()
