"""Keys with a lifecycle, end to end: two replicas (Envoy + ext_proc each) sharing one
Valkey, each serving the key admin API on its own port. Keys are created, rotated, updated
and revoked through one replica's API and used through both gateways with the openai SDK
and httpx; the CLI drives the same API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import asyncio

import httpx
import openai
import pytest
import redis as redis_sync

from gateway_extproc import keys
from gateway_extproc.localstack import free_port

from ..redis_server import RedisServer
from .conftest import DEMO_KEY, Gateway, two_replicas

ADMIN_TOKEN = "gwa_test-admin-token-" + keys.generate("a")[-16:]
Replicas = tuple[Gateway, Gateway]


def admin_values(values: dict[str, Any], redis_url: str, port: int) -> None:
    values["budgets"].update(store="redis", redis={"url": redis_url})
    values["identity"] = {"keyAdmin": {"enabled": True, "address": "127.0.0.1", "port": port,
                                       "admins": [{"name": "ops-alice", "sha256": keys.digest(ADMIN_TOKEN)}]}}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(redis: RedisServer) -> Iterator[Replicas]:
    ports = free_port(), free_port()
    with two_replicas("gw-keyadmin-", lambda v, i: admin_values(v, redis.url, ports[i])) as pair:
        yield pair


def admin_url(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.stack.values['identity']['keyAdmin']['port']}"


def admin(gw: Gateway, method: str, path: str, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{admin_url(gw)}{path}", headers=headers, timeout=10, **kwargs)


def chat_status(gw: Gateway, key: str) -> int:
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=10,
                   json={"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}]})
    return r.status_code


def code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_a_created_key_works_on_every_replica_and_is_shown_once(replicas: Replicas) -> None:
    a, b = replicas
    r = admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "svc-one", "owner": "team-lead"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    assert key.startswith("gwk_svc-one_")
    for gw in (a, b):
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content
    listing = admin(b, "GET", "/admin/keys")
    assert listing.status_code == 200
    text = listing.text
    assert key not in text and keys.digest(key) not in text
    row = next(k for k in listing.json()["data"] if k["id"] == "svc-one")
    assert row["team"] == "demo" and row["owner"] == "team-lead" and row["source"] == "admin"
    assert row["created"] and row["last_used"], row
    assert {"demo", "tiny"} <= {k["id"] for k in listing.json()["data"] if k["source"] == "values"}


def test_rotation_grace_on_two_replicas(replicas: Replicas) -> None:
    a, b = replicas
    old = admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "rot"}).json()["key"]
    assert chat_status(a, old) == 200 and chat_status(b, old) == 200
    r = admin(b, "POST", "/admin/keys/rot/rotate", json={"grace_seconds": 4})
    assert r.status_code == 200, r.text
    new = r.json()["key"]
    assert new != old and r.json()["previous_valid_until"]
    time.sleep(1.1)  # past the workers' 1 s cache
    for gw in (a, b):
        assert chat_status(gw, new) == 200
        assert chat_status(gw, old) == 200  # within the grace period
    time.sleep(4)
    for gw in (a, b):
        assert chat_status(gw, old) == 401
        assert chat_status(gw, new) == 200


def test_revocation_is_seen_by_both_replicas_within_3_seconds(replicas: Replicas) -> None:
    a, b = replicas
    key = admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "gone"}).json()["key"]
    assert chat_status(a, key) == 200 and chat_status(b, key) == 200  # both have it cached now
    assert admin(b, "DELETE", "/admin/keys/gone").status_code == 200
    revoked = time.monotonic()
    refused: dict[str, float] = {}
    while len(refused) < 2 and time.monotonic() - revoked < 5:
        for name, gw in (("a", a), ("b", b)):
            if name not in refused and chat_status(gw, key) == 401:
                refused[name] = time.monotonic() - revoked
        time.sleep(0.05)
    assert set(refused) == {"a", "b"} and max(refused.values()) < 3, refused
    assert admin(a, "GET", "/admin/keys/gone").status_code == 404


def test_expiry_and_model_allow_list_updates_apply_without_restart(replicas: Replicas) -> None:
    a, b = replicas
    key = admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "upd"}).json()["key"]
    r = admin(a, "PATCH", "/admin/keys/upd", json={"models": ["claude-chat"]})
    assert r.status_code == 200 and r.json()["models"] == ["claude-chat"]
    time.sleep(1.1)
    models = httpx.get(f"{b.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert [m["id"] for m in models["data"]] == ["claude-chat"]
    r = httpx.post(f"{b.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 403 and code(r) == "model_not_allowed"
    assert admin(a, "PATCH", "/admin/keys/upd", json={"expires_at": "2020-01-01T00:00:00Z"}).status_code == 200
    time.sleep(1.1)
    r = httpx.get(f"{a.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and code(r) == "expired_api_key"


def test_the_admin_api_is_not_on_the_public_listener(replicas: Replicas) -> None:
    a, _ = replicas
    for method in ("GET", "POST"):
        r = httpx.request(method, f"{a.url}/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                          json={"team": "demo", "id": "via-public"})
        assert r.status_code in (401, 404) and code(r) in ("unknown_endpoint", "invalid_api_key"), r.text
    assert "via-public" not in {k["id"] for k in admin(a, "GET", "/admin/keys").json()["data"]}


@pytest.mark.parametrize("token", [None, "wrong", DEMO_KEY, ADMIN_TOKEN + "x"])
def test_bad_admin_credentials_are_refused(replicas: Replicas, token: str | None) -> None:
    a, _ = replicas
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/svc-one")):
        r = admin(a, method, path, token=token, **({"json": {"team": "demo"}} if method == "POST" else {}))
        assert r.status_code == 401 and code(r) == "admin_unauthorized", r.text
        assert set(r.json()["error"]) == {"message", "type", "code", "param"}


def test_values_keys_are_listed_but_not_changed_here(replicas: Replicas) -> None:
    a, _ = replicas
    for method, path in (("POST", "/admin/keys/demo/rotate"), ("DELETE", "/admin/keys/demo")):
        r = admin(a, method, path, json={} if method == "POST" else None)
        assert r.status_code == 409 and code(r) == "key_conflict", r.text
    r = admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "demo"})
    assert r.status_code == 409
    assert chat_status(a, DEMO_KEY) == 200


def test_every_admin_action_is_an_audit_event(replicas: Replicas) -> None:
    a, _ = replicas
    admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "audited"})
    admin(a, "DELETE", "/admin/keys/audited")
    admin(a, "GET", "/admin/keys", token="nope")
    time.sleep(0.3)
    events = [json.loads(line) for line in a.stack.log_path("extproc").read_text().splitlines()
              if '"admin_action"' in line]
    mine = [(e["actor"], e["action"], e.get("key_id")) for e in events]
    assert ("ops-alice", "create", "audited") in mine and ("ops-alice", "revoke", "audited") in mine
    assert (None, "denied", None) in mine
    assert all(e["at"] for e in events)
    assert ADMIN_TOKEN not in a.stack.log_path("extproc").read_text()


def test_the_cli_drives_the_api(replicas: Replicas) -> None:
    a, b = replicas
    env = {**os.environ, "GATEWAY_ADMIN_URL": admin_url(a), "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    cli = [sys.executable, "-m", "gateway_extproc", "keys"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=30)

    created = run("create", "--team", "demo", "--id", "from-cli", "--models", "default-chat")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    assert chat_status(b, key) == 200
    listed = run("list")
    assert listed.returncode == 0 and "from-cli" in listed.stdout and key not in listed.stdout
    assert run("rotate", "from-cli", "--grace", "0").returncode == 0
    assert run("update", "from-cli", "--expires", "never").returncode == 0
    assert run("revoke", "from-cli").returncode == 0
    time.sleep(1.1)
    assert chat_status(b, key) == 401
    bad = subprocess.run([*cli, "list"], env={**env, "GATEWAY_ADMIN_TOKEN": "wrong"}, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 1 and "admin_unauthorized" in bad.stderr


def test_a_burst_on_both_replicas_costs_about_one_lookup_per_process_per_second(
        replicas: Replicas, redis: RedisServer) -> None:
    """300 concurrent requests with a stored key: all served, and the workers' lookups
    (one script call each) stay bounded by the 1 s cache and the one-in-flight rule."""
    a, b = replicas
    key = admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "burst"}).json()["key"]
    client = redis_sync.Redis.from_url(redis.url)

    def lookups() -> int:
        stats = client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as c:
            rs = await asyncio.gather(*(c.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
                                        for _ in range(150) for gw in (a, b)))
        return [r.status_code for r in rs]

    before, started = lookups(), time.monotonic()
    statuses = asyncio.run(burst())
    elapsed, calls = time.monotonic() - started, lookups() - before
    assert statuses.count(200) == 300, statuses
    processes = sum(gw.stack.values["extproc"]["processes"] for gw in (a, b))
    assert calls <= processes * (int(elapsed / 1.0) + 2), (calls, elapsed, processes)


def test_stored_keys_fail_closed_while_redis_is_down(replicas: Replicas, redis: RedisServer) -> None:
    """Last in the module: the restarted server is empty."""
    a, _ = replicas
    key = admin(a, "POST", "/admin/keys", json={"team": "demo", "id": "down"}).json()["key"]
    redis.stop()
    try:
        time.sleep(1.1)  # past the cache
        r = httpx.get(f"{a.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 503 and code(r) == "key_store_unavailable", r.text
        # Values keys do not need the key store (chat would still meet the budget store's own rule).
        r = httpx.get(f"{a.url}/v1/models", headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=10)
        assert r.status_code == 200, r.text
        r = admin(a, "GET", "/admin/keys")
        assert r.status_code == 503 and code(r) == "key_store_unavailable"
    finally:
        redis.start()
