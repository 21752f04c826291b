"""The audit trail through real Envoy: every request decision and config load on the record,
hash-chained and signed, verified and reported on by the CLI after the gateway stops."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway_extproc.audit import chain as chain_mod

from .conftest import Gateway, audit_records as records, build_gateway

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway_extproc", *args], capture_output=True, text=True,
                          timeout=120)


def chat(gw: Gateway, content: str, model: str = "default-chat", key: str | None = None) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key or gw.key}"},
                      timeout=30, json={"model": model, "messages": [{"role": "user", "content": content}]})


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def burst(gw: Gateway, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int) -> int:
            r = await client.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                                  json={"model": "default-chat", "messages": [{"role": "user", "content": f"n{i}"}]})
            return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_decisions_reloads_verify_and_chargeback(tmp_path: Path) -> None:
    gw = build_gateway(tmp_path / "gw")
    try:
        audit = gw.stack.workdir / "audit"
        pub = gw.stack.workdir / "audit-signing.key.pub"
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key)
        done = client.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "Hi"}])
        stream = client.chat.completions.create(model="claude-chat", stream=True,
                                                messages=[{"role": "user", "content": "Hello there"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert chat(gw, f"Write to {EMAIL} today.").status_code == 200  # redacted, internal tier
        assert chat(gw, f"Charge {CARD}").status_code == 403  # classification_violation: blocked
        assert chat(gw, "hi", key="gwk_nope_invalid-key-000").status_code == 401  # refused, no team
        assert chat(gw, "hi", model="gemini-chat", key=gw.restricted_key).status_code == 403  # not allowed
        assert set(asyncio.run(burst(gw, 200))) == {200}
        # A config reload: the new version's hash goes on the record.
        cfg = gw.stack.workdir / "gateway.yaml"
        old_digest = hashlib.sha256(cfg.read_bytes()).hexdigest()
        cfg.write_text(cfg.read_text().replace("monthly: 100", "monthly: 250"))
        new_digest = hashlib.sha256(cfg.read_bytes()).hexdigest()
        deadline = time.monotonic() + 15
        while not (audit / "configs" / f"{new_digest}.yaml").exists():
            assert time.monotonic() < deadline, "the reload never reached the audit trail"
            time.sleep(0.2)
        assert chat(gw, "after reload").status_code == 200
        time.sleep(1.0)
        metrics = httpx.get(gw.stack.metrics_url).text
    finally:
        gw.stack.stop()
    # The gateway is stopped: every chain is sealed by a shutdown checkpoint.
    recs = records(audit)
    # (LocalStack's readiness probe, GET /v1/models without a key, is on the record too.)
    requests = sorted((r for r in recs if r["type"] == "request" and r["path"] == "/v1/chat/completions"),
                      key=lambda r: r["ts"])
    assert len(requests) == 6 + 200 + 1
    by_decision = {}
    for r in requests:
        by_decision.setdefault(r["decision"], []).append(r)
    assert {d: len(v) for d, v in by_decision.items()} == {"admitted": 203, "redacted": 1, "blocked": 1,
                                                           "refused": 2}
    [red] = by_decision["redacted"]
    assert red["tier"] == "internal" and "[EMAIL_1]" in red["prompt"] and EMAIL not in orjson.dumps(recs).decode()
    [blocked] = by_decision["blocked"]
    assert blocked["reasons"] == ["classification_violation"] and "prompt" not in blocked and blocked["tier"] is None
    refused = {r["reasons"][0]: r for r in by_decision["refused"]}
    assert refused["invalid_api_key"]["team"] is None
    assert refused["model_not_allowed"]["model"] == "gemini-chat" and refused["model_not_allowed"]["team"] == "demo"
    first = requests[0]
    assert (first["model"], first["provider"], first["decision"], first["status"]) == (
        "default-chat", "mock", "admitted", 200)
    assert (first["input_tokens"], first["output_tokens"]) == (done.usage.prompt_tokens, done.usage.completion_tokens)
    assert first["cost_nano"] > 0 and first["key_id"] == "demo" and first["team"] == "demo"
    assert requests[1]["stream"] is True and requests[1]["provider"] == "mock-anthropic"
    assert {r["config"] for r in requests[:-1]} == {old_digest[:16]} and requests[-1]["config"] == new_digest[:16]
    loads = [r for r in recs if r["type"] == "config"]
    assert {r["action"] for r in loads} == {"loaded", "reloaded"}
    assert {r["config_sha256"] for r in loads} == {old_digest, new_digest}
    assert (audit / "configs" / f"{old_digest}.yaml").exists()

    out = cli("audit", "verify", "--dir", str(audit), "--public-key", str(pub), "--strict")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BAD" not in out.stdout and "OK" in out.stdout

    month = datetime.now(timezone.utc).strftime("%Y-%m")
    report = orjson.loads(cli("report", "chargeback", "--dir", str(audit), "--month", month, "--format", "json").stdout)
    [demo] = [t for t in report["teams"] if t["team"] == "demo"]
    # Reconciles with the Prometheus counters the same requests incremented.
    assert float(demo["cost_usd"]) == pytest.approx(metric_sum(metrics, "genai_request_cost_dollars_total",
                                                               team="demo"), abs=2e-6)
    for kind in ("input", "output"):
        assert demo[f"{kind}_tokens"] == metric_sum(metrics, "genai_tokens_total", team="demo", type=kind)
    assert demo["monthly_budget_usd"] == "250" and demo["share_used"] == pytest.approx(float(demo["cost_usd"]) / 250)
    assert {m["model"] for m in demo["by_model"]} >= {"default-chat", "claude-chat", "gemini-chat"}
    csv_out = cli("report", "chargeback", "--dir", str(audit), "--month", month).stdout
    assert csv_out.splitlines()[0].startswith("scope,team,name,requests") and "\nteam,demo,demo," in csv_out
    inventory = orjson.loads(cli("report", "inventory", "--dir", str(audit), "--format", "json").stdout)
    gemini = [r for r in inventory["rows"] if r["team"] == "demo" and r["model"] == "gemini-chat"]
    assert gemini and gemini[0]["refused"] == 1

    # An export of today verifies offline, and carries both config versions.
    today = datetime.now(timezone.utc).date().isoformat()
    bundle = tmp_path / "bundle"
    out = cli("audit", "export", "--dir", str(audit), "--from", today, "--to", today, "--out", str(bundle))
    assert out.returncode == 0, out.stderr
    assert {p.stem for p in (bundle / "configs").glob("*.yaml")} == {old_digest, new_digest}
    out = cli("audit", "verify", "--dir", str(bundle), "--public-key", str(pub), "--strict")
    assert out.returncode == 0 and "BAD" not in out.stdout, out.stdout
    exported = orjson.loads(cli("report", "chargeback", "--dir", str(bundle), "--month", month, "--format",
                                "json").stdout)
    assert exported["teams"] == report["teams"]

    # Change one byte of one request record: verify fails and names it.
    seg = next(s for s in sorted(audit.rglob("*.jsonl")) if b'"decision":"admitted"' in s.read_bytes())
    lines = seg.read_bytes().split(b"\n")
    i = next(k for k, x in enumerate(lines) if b'"decision":"admitted"' in x)
    seq = chain_mod.seq_of(lines[i])[0]
    lines[i] = lines[i].replace(b'"decision":"admitted"', b'"decision":"admittee"')
    seg.write_bytes(b"\n".join(lines))
    out = cli("audit", "verify", "--dir", str(audit), "--public-key", str(pub))
    assert out.returncode == 1
    assert re.search(rf"BAD .*\n.*record seq {seq} \({seg.name}:{i + 1}\) was modified", out.stdout), out.stdout


def test_a_killed_extproc_resumes_its_chain_and_verify_accepts_it(tmp_path: Path) -> None:
    gw = build_gateway(tmp_path / "gw")
    audit = gw.stack.workdir / "audit"
    pub = gw.stack.workdir / "audit-signing.key.pub"
    try:
        assert set(asyncio.run(burst(gw, 50))) == {200}
        time.sleep(0.5)  # written (the writer runs every ~50 ms), not necessarily sealed
        gw.stack.kill_extproc()  # SIGKILL: no shutdown checkpoint
        crashed = cli("audit", "verify", "--dir", str(audit), "--public-key", str(pub))
        assert crashed.returncode == 0 and "BAD" not in crashed.stdout, crashed.stdout
        gw.stack.start_extproc()
        deadline = time.monotonic() + 20
        while chat(gw, "after the crash").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert set(asyncio.run(burst(gw, 20))) == {200}
    finally:
        gw.stack.stop()
    out = cli("audit", "verify", "--dir", str(audit), "--public-key", str(pub), "--strict")
    assert out.returncode == 0, out.stdout
    recs = records(audit)
    assert sum(r["type"] == "request" and r["path"] == "/v1/chat/completions" for r in recs) >= 71
    reasons = [r["reason"] for r in recs if r["type"] == "checkpoint"]
    assert "resume" in reasons and reasons.count("genesis") == len({r["chain"] for r in recs if r["type"] == "checkpoint"})


def test_each_worker_process_writes_its_own_chains(tmp_path: Path) -> None:
    from ..redis_server import RedisServer

    with RedisServer() as server:
        def two_workers(values: dict) -> None:
            values["extproc"]["processes"] = 2
            values["budgets"].update(store="redis", redis={"url": server.url})

        gw = build_gateway(tmp_path / "gw", customize=two_workers)
        try:
            assert set(asyncio.run(burst(gw, 150))) == {200}
        finally:
            gw.stack.stop()
    audit = gw.stack.workdir / "audit"
    out = cli("audit", "verify", "--dir", str(audit), "--public-key", str(gw.stack.workdir / "audit-signing.key.pub"),
              "--strict")
    assert out.returncode == 0, out.stdout
    per_worker: dict[str, int] = {}
    for seg in audit.rglob("*.jsonl"):
        worker = seg.relative_to(audit).parts[0].rsplit("-", 1)[1]
        n = sum(1 for x in seg.read_bytes().split(b"\n") if b'"path":"/v1/chat/completions"' in x)
        per_worker[worker] = per_worker.get(worker, 0) + n
    assert set(per_worker) == {"w0", "w1"} and sum(per_worker.values()) == 150
    assert min(per_worker.values()) > 0, per_worker  # Envoy spreads streams over both sockets


ADMIN_TOKEN = "gwa_audit-test-admin-token-0123456789"
IBAN = "DE89370400440532013000"  # confidential: above contentLogging.maxTier (internal)


def with_key_admin(values: dict, workdir: Path, port: int) -> None:
    values.setdefault("identity", {})["keyAdmin"] = {
        "enabled": True, "address": "127.0.0.1", "port": port, "file": str(workdir / "admin-keys.json"),
        "admins": [{"name": "ops-alice", "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]}


def test_admin_actions_content_and_reports_on_the_admin_listener(tmp_path: Path) -> None:
    """Key lifecycle calls land signed in `serve`'s own chain (who, what, which key id, never
    the secret or its hash); request records carry prompt and response text only as the tier's
    logging rule allows and only redacted, JSON and streamed; the admin listener serves the
    CLI's reports byte for byte."""
    from gateway_extproc.localstack import free_port

    port = free_port()
    workdir = tmp_path / "gw"
    gw = build_gateway(workdir, customize=lambda v: with_key_admin(v, workdir, port))
    admin_url = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    audit = gw.stack.workdir / "audit"
    pub = gw.stack.workdir / "audit-signing.key.pub"
    month = datetime.now(timezone.utc).strftime("%Y-%m")
    try:
        with httpx.Client(base_url=admin_url, headers=auth, timeout=30) as admin:
            created = admin.post("/admin/keys", json={"team": "demo", "id": "svc-audit", "models": ["default-chat"]})
            assert created.status_code == 201, created.text
            secret = created.json()["key"]
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
            client.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "Hi"}])
            rotated = admin.post("/admin/keys/svc-audit/rotate", json={"grace_seconds": 0})
            assert rotated.status_code == 200, rotated.text
            assert admin.patch("/admin/keys/svc-audit", json={"models": None}).status_code == 200
            assert admin.delete("/admin/keys/svc-audit").status_code == 200
            assert set(asyncio.run(admin_burst(admin_url, auth, 100))) == {201}  # each one on the record
            denied = httpx.get(f"{admin_url}/admin/reports/inventory", headers={"authorization": "Bearer nope"})
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "admin_unauthorized"

            # Content: the response text as the client got it (redacted), JSON and streamed.
            json_reply = httpx.post(
                f"{gw.url}/v1/chat/completions", timeout=30,
                headers={"authorization": f"Bearer {gw.key}", "x-mock-reply": f"Write to {EMAIL} today."},
                json={"model": "default-chat", "messages": [{"role": "user", "content": "Who to email, json?"}]})
            assert json_reply.json()["choices"][0]["message"]["content"] == "Write to [EMAIL_1] today."
            streamed = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0,
                                     default_headers={"x-mock-reply": f"Mail {EMAIL} soon, please."})
            text = "".join(c.choices[0].delta.content or "" for c in streamed.chat.completions.create(
                model="default-chat", stream=True, messages=[{"role": "user", "content": "Who to email, stream?"}])
                if c.choices)
            assert EMAIL not in text and "[EMAIL_1]" in text
            claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0,
                                         default_headers={"x-mock-reply": f"Ask {EMAIL} for it."})
            with claude.messages.stream(model="claude-chat", max_tokens=50,
                                        messages=[{"role": "user", "content": "Who to email, messages?"}]) as events:
                assert "[EMAIL_1]" in "".join(events.text_stream)
            above = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30,
                               headers={"authorization": f"Bearer {gw.key}", "x-mock-reply": "Noted."},
                               json={"model": "private-chat",
                                     "messages": [{"role": "user", "content": f"Move {IBAN} funds"}]})
            assert above.status_code == 200, above.text

            # The reports over HTTP are the CLI's, byte for byte, over the same files.
            time.sleep(1.0)  # written (the writer runs every ~50 ms)
            served = {}
            for fmt in ("csv", "json"):
                r = admin.get("/admin/reports/chargeback", params={"month": month, "format": fmt})
                assert r.status_code == 200, r.text
                assert r.headers["content-type"].startswith("text/csv" if fmt == "csv" else "application/json")
                served[("chargeback", fmt)] = r.content
                for kind in ("inventory", "admin"):
                    r = admin.get(f"/admin/reports/{kind}", params={"format": fmt})
                    assert r.status_code == 200, r.text
                    served[(kind, fmt)] = r.content
            bad = admin.get("/admin/reports/chargeback", params={"month": "2026-13"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "month", bad.text
            assert admin.get("/admin/reports/chargeback").json()["error"]["code"] == "invalid_request"
            assert admin.get("/admin/reports/nope").json()["error"]["code"] == "unknown_endpoint"
            assert admin.post("/admin/reports/inventory").status_code == 405
            for fmt in ("csv", "json"):
                assert served[("chargeback", fmt)] == cli_bytes(
                    "report", "chargeback", "--dir", str(audit), "--month", month, "--format", fmt)
                for kind in ("inventory", "admin"):
                    assert served[(kind, fmt)] == cli_bytes("report", kind, "--dir", str(audit), "--format", fmt)
            [demo] = [t for t in orjson.loads(served[("chargeback", "json")])["teams"] if t["team"] == "demo"]
            assert "svc-audit" in {k["key"] for k in demo["by_key"]}
            scraped = httpx.get(gw.stack.metrics_url, timeout=10).text
    finally:
        gw.stack.stop()

    # `serve` wrote the admin events to its own chain, next to its workers' chains.
    admin_chains = sorted({seg.parent.relative_to(audit).as_posix() for seg in audit.rglob("*.jsonl")
                           if seg.parent.parent.name.endswith("-admin")})
    assert len(admin_chains) == 1 and admin_chains[0].endswith("-admin/gateway"), admin_chains
    recs = records(audit)
    admin_recs = [r for r in recs if r["type"] == "admin"]
    burst_ids = {r["key_id"] for r in admin_recs[4:104]}
    assert len(burst_ids) == 100 and {r["action"] for r in admin_recs[4:104]} == {"create"}
    assert [(r["actor"], r["action"], r["key_id"]) for r in admin_recs[:4] + admin_recs[104:]] == [
        ("ops-alice", "create", "svc-audit"), ("ops-alice", "rotate", "svc-audit"),
        ("ops-alice", "update", "svc-audit"), ("ops-alice", "revoke", "svc-audit"), (None, "denied", None)]
    # genai_audit_events_total counts the parent's admin chain too (its workers wrote far fewer).
    written = re.search(r'^genai_audit_events_total\{result="written"\} (\S+)$', scraped, re.M)
    assert written is not None and float(written.group(1)) >= len(admin_recs), scraped[-3000:]
    config_digest = hashlib.sha256((gw.stack.workdir / "gateway.yaml").read_bytes()).hexdigest()
    assert all(r["config"] == config_digest[:16] and r["ts"] for r in admin_recs)
    assert admin_recs[0]["team"] == "demo" and admin_recs[0]["models"] == ["default-chat"]
    assert admin_recs[-1]["path"] == "/admin/reports/inventory" and admin_recs[-1]["peer"] == "127.0.0.1"
    trail = b"".join(seg.read_bytes() for seg in audit.rglob("*.jsonl"))
    for secret_ in (secret, rotated.json()["key"], ADMIN_TOKEN):
        assert secret_.encode() not in trail and keys_digest(secret_).encode() not in trail

    requests = [r for r in recs if r["type"] == "request" and r["path"] in ("/v1/chat/completions", "/v1/messages")]
    [j] = [r for r in requests if "Who to email, json?" in r.get("prompt", "")]
    assert j["response"] == "Write to [EMAIL_1] today."
    [s] = [r for r in requests if "Who to email, stream?" in r.get("prompt", "")]
    assert s["stream"] is True and s["response"] == "Mail [EMAIL_1] soon, please."
    [m] = [r for r in requests if "Who to email, messages?" in r.get("prompt", "")]
    assert (m["path"], m["stream"], m["response"]) == ("/v1/messages", True, "Ask [EMAIL_1] for it.")
    [conf] = [r for r in requests if r["model"] == "private-chat"]
    assert conf["tier"] == "confidential" and "prompt" not in conf and "response" not in conf
    assert EMAIL.encode() not in trail and IBAN.encode() not in trail

    out = cli("audit", "verify", "--dir", str(audit), "--public-key", str(pub), "--strict")
    assert out.returncode == 0, out.stdout
    assert re.search(r"OK +\S+-admin/gateway: \d+ records", out.stdout), out.stdout
    today = datetime.now(timezone.utc).date().isoformat()
    bundle = tmp_path / "bundle"
    assert cli("audit", "export", "--dir", str(audit), "--from", today, "--to", today, "--out",
               str(bundle)).returncode == 0
    manifest = orjson.loads((bundle / "manifest.json").read_bytes())
    assert any(name.endswith("-admin/gateway") for name in manifest["chains"])
    assert sum(r["type"] == "admin" for r in records(bundle)) == 105
    out = cli("audit", "verify", "--dir", str(bundle), "--public-key", str(pub), "--strict")
    assert out.returncode == 0, out.stdout

    # A revocation rewritten as someone else's: verify names the record.
    [seg] = sorted((audit / admin_chains[0]).glob("*.jsonl"))
    lines = seg.read_bytes().split(b"\n")
    i = next(k for k, x in enumerate(lines) if b'"action":"revoke"' in x)
    lines[i] = lines[i].replace(b'"actor":"ops-alice"', b'"actor":"ops-malory"')
    seg.write_bytes(b"\n".join(lines))
    out = cli("audit", "verify", "--dir", str(audit), "--public-key", str(pub))
    assert out.returncode == 1
    assert re.search(rf"BAD .*-admin/gateway\n.*\({seg.name}:{i + 1}\) was modified", out.stdout), out.stdout


async def admin_burst(url: str, auth: dict[str, str], n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as client:
        async def one(i: int) -> int:
            return (await client.post("/admin/keys", json={"team": "demo", "id": f"burst-{i}"})).status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


def cli_bytes(*args: str) -> bytes:
    out = subprocess.run([sys.executable, "-m", "gateway_extproc", *args], capture_output=True, timeout=120)
    return out.stdout


def keys_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def test_chargeback_tokens_reconcile_with_prometheus_beyond_the_happy_path(tmp_path: Path) -> None:
    """docs/audit.md: the chargeback's tokens and cost are the numbers the gateway added to
    `genai_tokens_total` and `genai_request_cost_dollars_total`. Also for requests refused after
    their prompt was counted (a budget), a provider's error, and clients that left before the
    answer or mid-stream (charged at the reservation)."""
    gw = build_gateway(tmp_path / "gw")
    audit = gw.stack.workdir / "audit"
    hello = [{"role": "user", "content": "Say hello."}]
    auth = {"authorization": f"Bearer {gw.key}"}
    try:
        before = httpx.get(gw.stack.metrics_url).text
        with httpx.Client(timeout=30) as http:
            assert http.post(f"{gw.url}/v1/chat/completions", headers=auth,
                             json={"model": "default-chat", "messages": hello}).status_code == 200
            assert http.post(f"{gw.url}/v1/chat/completions", headers={**auth, "x-mock-status": "500"},
                             json={"model": "private-chat", "messages": hello}).status_code == 500
            tiny = {"authorization": "Bearer gwk_tiny_local-only-tiny-budget-key"}
            big = {"model": "default-chat", "messages": hello, "max_tokens": 1000}
            assert {http.post(f"{gw.url}/v1/chat/completions", headers=tiny, json=big).status_code
                    for _ in range(3)} >= {429}  # budget_exceeded, after its prompt was counted
            # Gone mid-stream, and before any answer.
            with http.stream("POST", f"{gw.url}/v1/chat/completions", json={
                    "model": "default-chat", "messages": hello, "stream": True},
                    headers={**auth, "x-mock-chunk-delay-ms": "100", "x-mock-reply-words": "40"}) as resp:
                next(resp.iter_raw())
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{gw.url}/v1/chat/completions", headers={**auth, "x-mock-latency-ms": "1500"},
                       json={"model": "default-chat", "messages": hello}, timeout=0.5)
        sent = 1 + 1 + 3 + 1 + 1
        deadline = time.monotonic() + 10
        while (metric_sum(after := httpx.get(gw.stack.metrics_url).text, "genai_requests_total", team="demo")
               - metric_sum(before, "genai_requests_total", team="demo") < sent and time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        gw.stack.stop()
    assert metric_sum(after, "genai_requests_total", team="demo") - metric_sum(before, "genai_requests_total",
                                                                               team="demo") == sent
    month = datetime.now(timezone.utc).strftime("%Y-%m")
    report = orjson.loads(cli("report", "chargeback", "--dir", str(audit), "--month", month, "--format", "json").stdout)
    [demo] = [t for t in report["teams"] if t["team"] == "demo"]
    assert demo["requests"] == sent
    for kind in ("input", "output"):
        assert demo[f"{kind}_tokens"] == metric_sum(after, "genai_tokens_total", team="demo", type=kind), kind
    assert float(demo["cost_usd"]) == pytest.approx(metric_sum(after, "genai_request_cost_dollars_total",
                                                               team="demo"), abs=2e-6)


BAD_KEY = "gwk_demo_not-a-real-key-but-secret-0123"


async def _one_of_each(client: httpx.AsyncClient, gw: Gateway, i: int) -> tuple[str, str | None, int]:
    """(kind, Envoy's request id, status) of request i: a mix of every decision the router makes,
    streams the client abandons and streams the provider resets."""
    kinds = ["ok", "stream", "bad_key", "malformed", "unknown_model", "blocked", "not_allowed", "abandoned",
             "reset"]
    kind = kinds[i % len(kinds)]
    key = {"bad_key": BAD_KEY, "not_allowed": gw.restricted_key}.get(kind, gw.key)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    body: dict = {"model": "gemini-chat" if kind == "not_allowed" else "default-chat",
                  "messages": [{"role": "user", "content": f"Charge {CARD}" if kind == "blocked" else f"n{i}"}]}
    if kind == "unknown_model":
        body["model"] = f"sk-not-a-model-{i}\n\x1b[2J"
    if kind in ("stream", "abandoned", "reset"):
        body["stream"] = True
    if kind == "reset":
        headers["x-mock-drop-after-chunks"] = "2"
    content = b'{"model": "default-chat", "messages": [' if kind == "malformed" else orjson.dumps(body)
    try:
        async with client.stream("POST", f"{gw.url}/v1/chat/completions", headers=headers, content=content) as r:
            async for _ in r.aiter_bytes():
                if kind == "abandoned":
                    break  # the client leaves after the first bytes
            return kind, r.headers.get("x-request-id"), r.status_code
    except httpx.HTTPError:
        return kind, None, 0  # the provider's reset cut the stream: no request id to match


def test_every_request_through_two_replicas_under_faults_has_exactly_one_record(tmp_path: Path) -> None:
    """Invariant: each request that reaches an ext_proc has one audit record, never two, with
    the status the client got: refusals of every kind, abandoned and reset streams, bursts on
    two replicas, while one replica's ext_proc is frozen (SIGSTOP/SIGCONT) and the other's is
    SIGKILLed mid-burst. Envoy's own 503 for a frozen or killed worker may have no record (docs:
    Not yet), and records still queued in a killed process are lost (Durability), never doubled."""
    import os
    import signal

    from .conftest import all_healthy, two_replicas, workers

    def run(gw: Gateway, start: int, n: int, fault: Callable[[], Awaitable[None]] | None = None) -> list:
        async def go() -> list:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
                sent = asyncio.gather(*(_one_of_each(client, gw, i) for i in range(start, start + n)))
                if fault is not None:
                    await fault()
                return await sent
        return asyncio.run(go())

    with two_replicas("gw-audit-faults-", lambda values, _i: None) as (a, b):
        def frozen() -> Callable[[], Awaitable[None]]:
            async def fault() -> None:
                await asyncio.sleep(0.2)
                [pid] = workers(a)
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(6.0)  # past Envoy's 5 s message timeout
                os.kill(pid, signal.SIGCONT)
            return fault

        def killed() -> Callable[[], Awaitable[None]]:
            async def fault() -> None:
                await asyncio.sleep(0.2)
                [pid] = workers(b)
                os.kill(pid, signal.SIGKILL)
            return fault

        steady = run(a, 0, 180) + run(b, 1000, 180)
        time.sleep(1.0)  # the steady bursts' records are written before any fault
        frozen_a = run(a, 2000, 180, frozen())
        run(b, 3000, 180, killed())  # what B answered in its last ~50 ms may be lost with the process
        for gw in (a, b):
            all_healthy(gw)
            deadline = time.monotonic() + 30
            while sum(chat(gw, "ping").status_code == 200 for _ in range(3)) < 3:  # the restarted worker serves
                assert time.monotonic() < deadline, "a replica never served again"
                time.sleep(0.5)
        after = run(a, 4000, 90) + run(b, 5000, 90)
        time.sleep(1.0)
        b.stack.stop()  # (b uses a's mock providers)
        a.stack.stop()  # stopped: every chain sealed; kept past the replicas' temporary directory
        for name, gw in (("a", a), ("b", b)):
            shutil.copytree(gw.stack.workdir / "audit", tmp_path / name)
            shutil.copy(gw.stack.workdir / "audit-signing.key.pub", tmp_path / f"{name}.pub")
    dirs = [tmp_path / "a", tmp_path / "b"]
    pub = [tmp_path / "a.pub", tmp_path / "b.pub"]
    recs = [r for d in dirs for r in records(d, crashed=True)
            if r["type"] == "request" and r["path"] == "/v1/chat/completions"]
    seen: dict[str, list[dict]] = {}
    for r in recs:
        seen.setdefault(r["request_id"], []).append(r)
    assert not {k: len(v) for k, v in seen.items() if len(v) > 1}, "a request recorded twice"
    must = [(kind, rid, status) for kind, rid, status in steady + after if rid]
    assert len(must) >= 0.8 * len(steady + after)  # (a reset stream has no id to match)
    missing = [(kind, status) for kind, rid, status in must if rid not in seen]
    assert not missing, f"{len(missing)} requests without a record: {missing[:10]}"
    expect = {"ok": "admitted", "stream": "admitted", "bad_key": "refused", "malformed": "refused",
              "unknown_model": "refused", "blocked": "blocked", "not_allowed": "refused", "abandoned": "admitted",
              "reset": "admitted"}
    for kind, rid, status in must:
        [r] = seen[rid]
        assert r["decision"] == expect[kind], (kind, r)
        if kind == "reset" and (status, r["status"]) == (502, 200):
            # Broken off after its headers: Envoy's own 502, which the ext_proc never sees (docs).
            assert (r["outcome"], r["reasons"]) == ("incomplete", []), r
        elif kind != "abandoned":
            assert r["status"] == status, (kind, status, r)
    # Frozen, not killed: whatever its ext_proc answered is on the record (Envoy's 503s may not be).
    assert all(rid in seen for _, rid, status in frozen_a if rid and status not in (0, 503))
    raw = b"".join(p.read_bytes() for d in dirs for p in d.rglob("*.jsonl"))
    for secret in (BAD_KEY, a.key, a.restricted_key, a.primary_key, a.backup_key, "sk-not-a-model", CARD):
        assert secret.encode() not in raw, secret
    for d, key in zip(dirs, pub):
        out = cli("audit", "verify", "--dir", str(d), "--public-key", str(key), "--strict")
        assert out.returncode == 0, out.stdout


def test_an_audit_directory_removed_or_replaced_fails_open_with_every_loss_on_the_record(tmp_path: Path) -> None:
    """docs/audit.md promises an audit outage is not a traffic outage, and that what it loses
    is counted and on the record. Attack: the audit directory is deleted under the running
    gateway, then moved away and replaced by a file, then the file goes. Every request is
    served; each one is on the record or counted in an `events_dropped` record."""
    gw = build_gateway(tmp_path / "gw")
    audit = gw.stack.workdir / "audit"
    moved = tmp_path / "moved-audit"

    def ids(n: int) -> list[str]:
        async def go() -> list[str]:
            async with httpx.AsyncClient(timeout=30) as client:
                async def one(i: int) -> str:
                    r = await client.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                                          json={"model": "default-chat", "messages": [{"role": "user", "content": f"n{i}"}]})
                    assert r.status_code == 200, r.text
                    return r.headers["x-request-id"]
                return await asyncio.gather(*(one(i) for i in range(n)))
        return asyncio.run(go())

    try:
        ids(10)
        time.sleep(0.5)
        shutil.rmtree(audit)  # deleted: the open segments are unlinked files
        sent = ids(15)
        deadline = time.monotonic() + 10
        while not audit.is_dir():  # the writer noticed, and started again (it retries every second)
            assert time.monotonic() < deadline, "the writer never started its chains again"
            time.sleep(0.1)
        time.sleep(0.5)
        audit.rename(moved)  # moved away, and a file where the directory was: nothing can open
        audit.write_bytes(b"")
        sent += ids(15)
        time.sleep(1.5)
        audit.unlink()
        time.sleep(1.5)  # the writer retries every second
        last = ids(5)
        sent += last
        time.sleep(0.5)
        metrics = httpx.get(gw.stack.metrics_url).text
    finally:
        gw.stack.stop()
    recs = records(audit) + records(moved)
    recorded = {r["request_id"] for r in recs if r["type"] == "request"}
    lost = sum(r["count"] for r in recs if r["type"] == "events_dropped")
    assert set(last) <= recorded
    assert len(set(sent) & recorded) + lost == len(sent), (len(set(sent) & recorded), lost)
    assert metric_sum(metrics, "genai_audit_events_total", result="dropped") == lost
    pub = gw.stack.workdir / "audit-signing.key.pub"
    for d in (audit, moved):
        out = cli("audit", "verify", "--dir", str(d), "--public-key", str(pub))
        assert out.returncode == 0 and "BAD" not in out.stdout, out.stdout
