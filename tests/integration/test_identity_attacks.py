"""Attacks on identity and key handling, end to end: real Envoy, real ext_proc processes,
a real Valkey holding the keys created through the admin API, real clients.

Two replicas (their own Envoy and two ext_proc processes each) share one Valkey. The
attacks: hostile `Authorization` / `x-api-key` forms (also as a hypothesis property),
ids no key can have, caller-sent provider credentials and account selectors, identity
headers spoofed on every endpoint, revocation and rotation under bursts on four ext_proc
processes, and the key store frozen, killed and restarted during bursts.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jwt
import openai
import pytest
import redis as redis_sync
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway_extproc import keys
from gateway_extproc.localstack import free_port
from gateway_extproc.render import render_values

from ..redis_server import RedisServer
from . import conftest
from .conftest import DEMO_KEY, Gateway, build_gateway, config_dir_is, two_replicas
from .test_identity import (AUDIENCE, FOREIGN, ISSUER, PAYMENTS_API, PAYMENTS_BATCH, PKI, UNMAPPED, Identity,
                            _ready_on)
from .test_key_admin import ADMIN_TOKEN, admin, admin_values
from .test_mtls import config_files, tls_stack

CHAT = {"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
Replicas = tuple[Gateway, Gateway]


@pytest.fixture(scope="module")
def store() -> Iterator[RedisServer]:
    # Persisted, so keys created before a SIGKILL are still there when it comes back.
    with RedisServer(persist=True) as server:
        yield server


@pytest.fixture(scope="module")
def replicas(store: RedisServer) -> Iterator[Replicas]:
    ports = free_port(), free_port()

    def customize(values: dict[str, Any], i: int) -> None:
        admin_values(values, store.url, ports[i])
        values["extproc"]["processes"] = 2

    with two_replicas("gw-idattack-", customize) as pair:
        yield pair


def create_key(gw: Gateway, id_: str, **fields: Any) -> str:
    r = admin(gw, "POST", "/admin/keys", json={"team": "demo", "id": id_, **fields})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def usage(gw: Gateway, headers: Any) -> httpx.Response:
    return httpx.get(f"{gw.url}/v1/usage", headers=headers, timeout=10)


def error_code(r: httpx.Response) -> str | None:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    assert set(err) == {"message", "type", "code", "param"}, err
    return err["code"]


def lookups(server: RedisServer) -> int:
    """Script calls the key store has served (each worker lookup is one)."""
    stats = redis_sync.Redis.from_url(server.url).info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


# -- hostile credential forms --------------------------------------------------------------


def _forms(stored: str) -> list[tuple[str, list[tuple[str, str]], int, str | None]]:
    """(name, headers, status, code or the key_id served)."""
    one_off = DEMO_KEY[:-1] + ("A" if DEMO_KEY[-1] != "A" else "B")
    return [
        ("bearer", [("Authorization", f"Bearer {DEMO_KEY}")], 200, "demo"),
        ("lowercase scheme", [("Authorization", f"bearer {DEMO_KEY}")], 200, "demo"),
        ("extra spaces", [("Authorization", f"Bearer   {DEMO_KEY}")], 200, "demo"),
        ("x-api-key", [("x-api-key", DEMO_KEY)], 200, "demo"),
        ("same key in both headers", [("Authorization", f"Bearer {DEMO_KEY}"), ("x-api-key", DEMO_KEY)], 200, "demo"),
        ("tab after the scheme", [("Authorization", f"Bearer\t{DEMO_KEY}")], 401, "missing_api_key"),
        ("no scheme", [("Authorization", DEMO_KEY)], 401, "missing_api_key"),
        ("Azure api-key header", [("api-key", DEMO_KEY)], 401, "missing_api_key"),
        ("trailing junk", [("Authorization", f"Bearer {DEMO_KEY}x")], 401, "invalid_api_key"),
        ("trailing word", [("Authorization", f"Bearer {DEMO_KEY} x")], 401, "invalid_api_key"),
        ("prefix of the key", [("Authorization", f"Bearer {DEMO_KEY[:-4]}")], 401, "invalid_api_key"),
        ("one character changed", [("Authorization", f"Bearer {one_off}")], 401, "invalid_api_key"),
        ("non-ASCII secret", [("Authorization", "Bearer gwk_demo_caf\u00e9-secret".encode())], 401, "invalid_api_key"),
        ("two Authorization headers", [("Authorization", f"Bearer {DEMO_KEY}"), ("Authorization", f"Bearer {stored}")],
         401, "invalid_api_key"),
        # A repeated header is one value joined with ',' (RFC 9110; Envoy itself joins a
        # repeated Authorization): no key is that, and none of them is picked silently.
        ("two x-api-key headers", [("x-api-key", DEMO_KEY), ("x-api-key", DEMO_KEY)], 401, "invalid_api_key"),
        ("junk then a valid x-api-key", [("x-api-key", "gwk_nope_x"), ("x-api-key", DEMO_KEY)], 401, "invalid_api_key"),
        # Two different keys: refused, whichever is the more privileged (never a silent pick).
        ("different keys in both headers", [("Authorization", f"Bearer {stored}"), ("x-api-key", DEMO_KEY)],
         403, "identity_conflict"),
        ("valid bearer, junk x-api-key", [("Authorization", f"Bearer {DEMO_KEY}"), ("x-api-key", "gwk_nope_x")],
         403, "identity_conflict"),
        ("junk bearer, valid x-api-key", [("Authorization", "Bearer gwk_nope_x"), ("x-api-key", DEMO_KEY)],
         403, "identity_conflict"),
    ]


def test_hostile_credential_forms_get_a_documented_answer(replicas: Replicas) -> None:
    a, _ = replicas
    stored = create_key(a, "forms-stored")
    wrong = []
    for name, headers, status, expected in _forms(stored):
        r = usage(a, headers)
        got = r.json()["key_id"] if r.status_code == 200 else error_code(r)
        if (r.status_code, got) != (status, expected):
            wrong.append((name, r.status_code, got))
        assert DEMO_KEY not in r.text and stored not in r.text
    assert not wrong, wrong
    time.sleep(0.3)
    logs = a.logs()
    # (`gwk_<id>_<secret>`: the id has no '_', a secret may: a random one once ended `_g`)
    secret = DEMO_KEY.split("_", 2)[2]
    assert secret not in logs and stored.split("_", 2)[2] not in logs and keys.digest(stored) not in logs


@pytest.mark.parametrize("id_", ["a" * 50_000, "UPPER", "caf\u00e9", "x" * 64, "-lead", "a{b}c", "a:b"])
def test_an_id_no_key_can_have_is_refused_without_a_key_store_lookup(replicas: Replicas, store: RedisServer,
                                                                      id_: str) -> None:
    """Key ids are 1-63 lowercase letters, digits and '-': anything else cannot be a key, so
    it costs no round trip and no cache entry (a 50 KiB id per request would otherwise fill
    every worker's cache with attacker-chosen strings)."""
    a, _ = replicas
    before = lookups(store)
    r = usage(a, {"Authorization": f"Bearer gwk_{id_}_secret".encode()})
    assert r.status_code == 401 and error_code(r) == "invalid_api_key", r.text
    assert lookups(store) == before


def test_a_64_kib_key_is_a_431_in_the_openai_shape(replicas: Replicas) -> None:
    a, _ = replicas
    r = usage(a, {"Authorization": "Bearer gwk_demo_" + "a" * 65536})
    assert r.status_code == 431 and error_code(r) == "request_headers_too_large", r.text
    assert usage(a, {"Authorization": f"Bearer {DEMO_KEY}"}).status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", ""]),
       sep=st.sampled_from([" ", "  ", "\t", ""]),
       auth_key=st.sampled_from(["demo", "restricted", "mangled", "none", "jwt-like"]),
       api_key=st.sampled_from(["none", "demo", "restricted", "mangled"]),
       spoof=st.sets(st.sampled_from(["x-gateway-team", "x-gateway-key-id", "x-gateway-user", "x-gateway-model",
                                      "x-forwarded-client-cert", "x-data-classification", "x-spiffe-id"])))
def test_property_a_request_is_served_only_as_exactly_the_key_it_presented(
        replicas: Replicas, scheme: str, sep: str, auth_key: str, api_key: str, spoof: set[str]) -> None:
    """Whatever the header forms and spoofed identity headers, a request is either refused
    with a documented code or served as the one key it presented, never as another."""
    a, _ = replicas
    gw_keys = {"demo": DEMO_KEY, "restricted": a.restricted_key, "mangled": DEMO_KEY[:-2],
               "jwt-like": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."}
    headers: dict[str, str] = {}
    if auth_key != "none":
        # Leading whitespace is not part of a header value (httpx refuses it, Envoy strips it).
        headers["Authorization"] = f"{scheme}{sep}{gw_keys[auth_key]}".lstrip(" \t")
    if api_key != "none":
        headers["x-api-key"] = gw_keys[api_key]
    for name in spoof:
        headers[name] = {"x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/payments/sa/api",
                         "x-data-classification": "public"}.get(name, "tiny")
    r = usage(a, headers)
    # Read from Authorization: a Bearer scheme, then spaces (RFC 9110); else only x-api-key.
    from_auth = gw_keys.get(auth_key) if scheme.lower() == "bearer" and sep.startswith(" ") else None
    presented = {k for k in (from_auth, gw_keys.get(api_key)) if k}
    if r.status_code == 200:
        served = r.json()["key_id"]
        assert len(presented) == 1, (headers, r.text)
        assert served == {DEMO_KEY: "demo", a.restricted_key: "restricted"}[presented.pop()], (headers, r.text)
    else:
        assert (r.status_code, error_code(r)) in {(401, "missing_api_key"), (401, "invalid_api_key"),
                                                  (403, "identity_conflict")}, (headers, r.text)
        if len(presented) == 1 and presented <= {DEMO_KEY, a.restricted_key}:
            pytest.fail(f"a valid key alone was refused: {headers} -> {r.text}")


# -- headers a caller may not set ----------------------------------------------------------

# Credentials of provider schemes and the provider account a request is billed to: the
# gateway's credential decides those, never the caller.
CALLER_PROVIDER_HEADERS = {"api-key": "caller-azure-secret", "x-goog-api-key": "caller-gemini-secret",
                           "proxy-authorization": "Basic Y2FsbGVyOnNlY3JldA==",
                           "x-amz-security-token": "caller-session-token",
                           "openai-organization": "org-someone-else", "openai-project": "proj-someone-else"}
SPOOFED_IDENTITY = {"x-gateway-team": "other", "x-gateway-user": "mallory", "x-gateway-key-id": "tiny",
                    "x-gateway-tier": "public", "x-gateway-model": "private-chat",
                    "x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/payments/sa/api",
                    "x-spiffe-id": "spiffe://cluster.local/ns/payments/sa/api"}
ENDPOINTS = [("default-chat", "/v1/chat/completions"), ("claude-chat", "/v1/messages"),
             ("azure-chat", "/v1/chat/completions"), ("gemini-chat", "/v1/chat/completions"),
             ("default-chat", "/v1/responses"), ("default-embedding", "/v1/embeddings")]


def _body(model: str, path: str) -> dict[str, Any]:
    if path in ("/v1/responses", "/v1/embeddings"):
        return {"model": model, "input": "Hi"}
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


@pytest.mark.parametrize(("model", "path"), ENDPOINTS)
def test_caller_provider_credentials_and_identity_headers_never_reach_a_provider(
        replicas: Replicas, model: str, path: str) -> None:
    a, _ = replicas
    a.reset()
    headers = {"Authorization": f"Bearer {DEMO_KEY}", **CALLER_PROVIDER_HEADERS, **SPOOFED_IDENTITY}
    r = httpx.post(f"{a.url}{path}", headers=headers, json=_body(model, path), timeout=20)
    assert r.status_code == 200, r.text
    sent = [req for mock in (a.primary, a.backup) for req in a.received(mock)]
    assert len(sent) == 1, sent
    got = {k.lower(): v for k, v in sent[0]["headers"].items()}
    gateway_owned = {k: v for k, v in SPOOFED_IDENTITY.items() if k.startswith("x-gateway-")
                     or k == "x-forwarded-client-cert"}
    for name, value in {**CALLER_PROVIDER_HEADERS, **gateway_owned}.items():
        assert got.get(name) != value, (name, got)
    assert DEMO_KEY not in str(got)


@pytest.mark.parametrize("path", ["/v1/usage", "/v1/models"])
def test_spoofed_identity_headers_change_nothing_the_gateway_answers_itself(replicas: Replicas, path: str) -> None:
    a, _ = replicas
    plain = httpx.get(f"{a.url}{path}", headers={"Authorization": f"Bearer {a.restricted_key}"}, timeout=10)
    spoofed = httpx.get(f"{a.url}{path}", headers={"Authorization": f"Bearer {a.restricted_key}",
                                                   **SPOOFED_IDENTITY}, timeout=10)
    assert plain.status_code == spoofed.status_code == 200
    assert plain.json() == spoofed.json()
    without = httpx.get(f"{a.url}{path}", headers=SPOOFED_IDENTITY, timeout=10)
    assert without.status_code == 401 and error_code(without) == "missing_api_key", without.text


def test_sdks_with_spoofed_headers_are_served_as_their_own_key(replicas: Replicas) -> None:
    """The restricted key may use default-chat only: no header gets it claude-chat."""
    a, _ = replicas
    oa = openai.OpenAI(base_url=f"{a.url}/v1", api_key=a.restricted_key, max_retries=0,
                       default_headers={**SPOOFED_IDENTITY, "x-gateway-model": "claude-chat"})
    with pytest.raises(openai.PermissionDeniedError) as info:
        oa.chat.completions.create(model="claude-chat", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    an = anthropic.Anthropic(base_url=a.url, api_key=a.restricted_key, max_retries=0,
                             default_headers={**SPOOFED_IDENTITY, "x-gateway-model": "claude-chat"})
    with pytest.raises(anthropic.PermissionDeniedError) as ainfo:
        an.messages.create(model="claude-chat", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert ainfo.value.body["error"]["code"] == "model_not_allowed"  # type: ignore[index]
    # Its own key and another one in Authorization: refused, not the more privileged one picked.
    r = httpx.post(f"{a.url}/v1/messages", timeout=10, json={"model": "claude-chat", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "Hi"}]},
                   headers={"x-api-key": a.restricted_key, "Authorization": f"Bearer {DEMO_KEY}",
                            "anthropic-version": "2023-06-01"})
    assert r.status_code == 403 and error_code(r) == "identity_conflict", r.text


@pytest.mark.parametrize("length", ["-1", "abc", "1e3"])
def test_the_admin_api_answers_a_hostile_content_length_at_once(replicas: Replicas, length: str) -> None:
    """Before any credential is checked: a negative length used to read until the client hung
    up (a thread held per connection) and a non-number got no reply at all."""
    a, _ = replicas
    port = a.stack.values["identity"]["keyAdmin"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"POST /admin/keys HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(4096)  # times out (fails) if the server waits for a body
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") or head.startswith(b"HTTP/1.1 400"), reply
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert admin(a, "GET", "/admin/keys").status_code == 200


# -- revocation, rotation and key-store faults under bursts --------------------------------


class Burst:
    """Requests with one key, continuously, from a background thread against both replicas:
    (start time, status, error code) for each."""

    def __init__(self, gws: Replicas, key: str, concurrency: int = 40, path: str = "/v1/models") -> None:
        self.gws, self.key, self.concurrency, self.path = gws, key, concurrency, path
        self.results: list[tuple[float, int, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=self.concurrency * 2)) as c:
            async def worker(i: int) -> None:
                gw = self.gws[i % 2]
                while not self.stop.is_set():
                    started = time.monotonic()
                    try:
                        r = await c.get(f"{gw.url}{self.path}", headers={"Authorization": f"Bearer {self.key}"})
                        code = None if r.status_code == 200 else error_code(r)
                        self.results.append((started, r.status_code, code))
                    except httpx.TransportError as exc:
                        self.results.append((started, 0, type(exc).__name__))
            await asyncio.gather(*(worker(i) for i in range(self.concurrency)))

    def __enter__(self) -> Burst:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def test_a_key_revoked_during_a_burst_on_four_processes_stops_within_the_promise(replicas: Replicas) -> None:
    a, b = replicas
    key = create_key(a, "revoked-in-burst")
    with Burst(replicas, key) as burst:
        time.sleep(1.5)
        assert admin(b, "DELETE", "/admin/keys/revoked-in-burst").status_code == 200
        revoked = time.monotonic()
        time.sleep(2.5)
    served_after = [t - revoked for t, status, _ in burst.results if status == 200 and t > revoked]
    outcomes = {(s, c) for _, s, c in burst.results}
    assert outcomes <= {(200, None), (401, "invalid_api_key")}, outcomes
    assert sum(1 for t, s, _ in burst.results if s == 200 and t < revoked) > 50, "the burst never ran"
    # Each process caches a lookup for 1 s (docs/identity.md): nothing starting later is served.
    assert max(served_after, default=0) < 1.5, max(served_after)
    assert sum(1 for t, s, _ in burst.results if t > revoked + 1.5 and s == 401) > 50


def test_a_rotated_keys_old_value_stops_during_a_burst_and_the_new_one_works(replicas: Replicas) -> None:
    a, b = replicas
    old = create_key(a, "rotated-in-burst")
    with Burst(replicas, old) as burst:
        time.sleep(1.0)
        r = admin(b, "POST", "/admin/keys/rotated-in-burst/rotate", json={"grace_seconds": 0})
        assert r.status_code == 200, r.text
        rotated = time.monotonic()
        time.sleep(2.5)
    new = r.json()["key"]
    assert max((t - rotated for t, s, _ in burst.results if s == 200 and t > rotated), default=0) < 1.5
    assert {(s, c) for _, s, c in burst.results} <= {(200, None), (401, "invalid_api_key")}
    for gw in replicas:
        assert usage(gw, {"Authorization": f"Bearer {new}"}).json()["key_id"] == "rotated-in-burst"


def _no_server_error(results: list[tuple[float, int, str | None]]) -> None:
    outcomes = {(s, c) for _, s, c in results}
    assert outcomes <= {(200, None), (503, "key_store_unavailable")}, outcomes


def test_the_key_store_frozen_during_a_burst_fails_closed_and_recovers(replicas: Replicas,
                                                                       store: RedisServer) -> None:
    a, b = replicas
    key = create_key(a, "frozen-store")
    with Burst(replicas, key, concurrency=30) as burst:
        time.sleep(1.0)
        store.pause()
        paused = time.monotonic()
        try:
            time.sleep(3.0)
        finally:
            store.resume()
        resumed = time.monotonic()
        time.sleep(2.0)
    _no_server_error(burst.results)
    assert any(s == 503 for t, s, _ in burst.results if paused + 1.5 < t < resumed), "a frozen store never showed"
    assert not any(s == 200 for t, s, _ in burst.results if paused + 2.0 < t < resumed - 0.5)
    late = [s for t, s, _ in burst.results if t > resumed + 1.0]
    assert late and all(s == 200 for s in late), late[:20]
    for gw in replicas:
        assert gw.stack.exited() is None and httpx.get(f"{gw.stack.admin_url}/ready", timeout=2).status_code == 200
        assert usage(gw, {"Authorization": f"Bearer {DEMO_KEY}"}).status_code == 200


def test_the_key_store_killed_and_restarted_during_a_burst_fails_closed_and_recovers(
        replicas: Replicas, store: RedisServer) -> None:
    a, b = replicas
    key = create_key(a, "killed-store")
    with Burst(replicas, key, concurrency=30) as burst:
        time.sleep(1.0)
        store.kill()
        killed = time.monotonic()
        try:
            time.sleep(2.5)
        finally:
            store.start()
        restarted = time.monotonic()
        time.sleep(2.5)
    _no_server_error(burst.results)
    assert any(s == 503 for t, s, _ in burst.results if killed + 1.5 < t < restarted)
    late = [s for t, s, _ in burst.results if t > restarted + 1.0]
    assert late and all(s == 200 for s in late), late[:20]
    for gw in replicas:
        assert gw.stack.exited() is None


def test_the_key_store_restarted_while_idle_costs_no_request(replicas: Replicas, store: RedisServer) -> None:
    """Every process holds a pooled connection from its last lookup; a restart closes them
    all. Once the store is back, the next lookup must not fail on that dead socket."""
    a, b = replicas
    key = create_key(a, "idle-restart")
    for _ in range(8):  # both processes of both replicas look it up (and pool a connection)
        for gw in replicas:
            assert usage(gw, {"Authorization": f"Bearer {key}"}).status_code == 200
    store.stop()
    store.start()
    time.sleep(1.1)  # past the workers' cache
    answers = [usage(gw, {"Authorization": f"Bearer {key}"}) for _ in range(8) for gw in replicas]
    assert {(r.status_code, error_code(r)) for r in answers} == {(200, None)}, [r.text[:120] for r in answers]


def test_a_caller_that_goes_away_during_a_key_lookup_does_not_fail_the_others(
        replicas: Replicas, store: RedisServer) -> None:
    """Requests with the same key share one lookup per process. A caller that hangs up
    while that lookup waits (Envoy resets its ext_proc stream, which cancels its handler)
    must not take the lookup, and so the other callers' requests, down with it."""
    a, _ = replicas
    key = create_key(a, "shared-lookup")
    time.sleep(1.1)  # nothing cached: the next request per process looks it up

    async def scenario() -> list[tuple[int, str | None]]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=50)) as c:
            async def leaver() -> None:
                with pytest.raises(httpx.TimeoutException):
                    await c.get(f"{a.url}/v1/models", headers=headers, timeout=0.15)

            async def stayer() -> tuple[int, str | None]:
                await asyncio.sleep(0.05)
                r = await c.get(f"{a.url}/v1/models", headers=headers)
                return r.status_code, error_code(r) if r.status_code != 200 else None

            async def unfreeze() -> None:
                await asyncio.sleep(0.3)  # within the lookup's 0.5 s timeout
                store.resume()

            store.pause()
            try:
                results = await asyncio.gather(*(leaver() for _ in range(4)), unfreeze(),
                                               *(stayer() for _ in range(24)))
            finally:
                store.resume()
        return [r for r in results if r is not None]

    outcomes = asyncio.run(scenario())
    assert set(outcomes) == {(200, None)}, outcomes


def test_a_broken_key_file_fails_closed_and_recovers() -> None:
    """The one-node store (identity.keyAdmin.file): a file that cannot be read answers 503
    key_store_unavailable, not a 500, and its keys work again once it is good."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gw-keyfile-") as tmp:
        key_file = Path(tmp) / "keys" / "keys.json"

        def customize(values: dict[str, Any]) -> None:
            values["identity"] = {"keyAdmin": {"enabled": True, "address": "127.0.0.1", "port": port,
                                               "file": str(key_file),
                                               "admins": [{"name": "ops", "sha256": keys.digest(ADMIN_TOKEN)}]}}

        gw = build_gateway(Path(tmp) / "stack", customize=customize)
        try:
            key = create_key(gw, "on-file")
            good = key_file.read_text()
            assert usage(gw, {"Authorization": f"Bearer {key}"}).status_code == 200
            key_file.write_text("{ half a file")
            time.sleep(1.1)
            for _ in range(4):
                r = usage(gw, {"Authorization": f"Bearer {key}"})
                assert r.status_code == 503 and error_code(r) == "key_store_unavailable", r.text
            assert usage(gw, {"Authorization": f"Bearer {DEMO_KEY}"}).status_code == 200
            key_file.write_text(good)
            time.sleep(1.1)
            assert usage(gw, {"Authorization": f"Bearer {key}"}).status_code == 200
        finally:
            gw.stack.stop()


# -- OIDC tokens and client certificates ---------------------------------------------------

PARTNER_ISSUER = "https://partner-idp.test.example"
PARTNER_AUDIENCE = "gateway-partner"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


PAYMENTS_DNS = "api.payments.svc.cluster.local"


@pytest.fixture(scope="module")
def idp() -> Iterator[tuple[Identity, rsa.RSAPrivateKey]]:
    """test_identity's mTLS + OIDC gateway plus a second issuer (its own key, kid
    partner-1) and client certificates with several URI SANs."""
    with tempfile.TemporaryDirectory(prefix="gw-idp-attack-") as tmp:
        root = Path(tmp)
        pki = PKI(root)
        server_crt, server_key = pki.issue("server", [x509.DNSName("localhost"),
                                                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], server=True)
        uri = x509.UniformResourceIdentifier
        for name, sans in (("payments-api", [uri(PAYMENTS_API)]), ("unmapped", [uri(UNMAPPED)]),
                           ("batch-and-api", [uri(PAYMENTS_BATCH), uri(PAYMENTS_API)]),
                           ("unmapped-then-api", [uri(UNMAPPED), uri(PAYMENTS_API)]),
                           ("foreign-and-unmapped", [uri(FOREIGN), uri(UNMAPPED)]),
                           ("semicolon-in-san", [uri(f"{UNMAPPED};URI={PAYMENTS_API}")]),
                           ("comma-in-san", [uri(f"{UNMAPPED},URI={PAYMENTS_API}")]),
                           ("quote-in-san", [uri(f'{UNMAPPED}";URI="{PAYMENTS_API}')]),
                           ("dns-smuggle", [uri(UNMAPPED), x509.DNSName(f"tool.other.svc;DNS={PAYMENTS_DNS}")])):
            pki.issue(name, sans)
        for sub, src in (("server-tls", (server_crt, server_key)),):
            (root / sub).mkdir()
            (root / sub / "tls.crt").write_bytes(src[0].read_bytes())
            (root / sub / "tls.key").write_bytes(src[1].read_bytes())
        (root / "client-ca").mkdir()
        (root / "client-ca" / "ca.crt").write_bytes((root / "ca.crt").read_bytes())
        corp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        partner_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        def jwks(key: rsa.RSAPrivateKey, kid: str) -> str:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwk.update(kid=kid, alg="RS256", use="sig")
            return json.dumps({"keys": [jwk]})

        workdir = root / "stack"

        def customize(values: dict[str, Any]) -> None:
            config_dir_is(values, workdir)
            values["envoy"]["tls"] = {
                "enabled": True, "certificate": {"secretName": "", "dir": str(root / "server-tls")},
                "clientCA": {"enabled": True, "secretName": "", "key": "ca.crt", "dir": str(root / "client-ca")}}
            values["teams"] += [{"name": "payments"}, {"name": "batch"}]
            values["identity"] = {
                "workloads": {"trustDomains": ["cluster.local"], "principals": [
                    {"name": "payments", "spiffe": "spiffe://cluster.local/ns/payments/sa/*", "team": "payments"},
                    {"name": "payments-batch", "spiffe": PAYMENTS_BATCH, "team": "batch", "models": ["default-chat"]},
                    {"name": "payments-dns", "dns": PAYMENTS_DNS, "team": "payments"}]},
                "oidc": {"providers": [
                    {"name": "corp", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"inline": jwks(corp_key, "test-1")},
                     "teamClaim": "team"},
                    {"name": "partner", "issuer": PARTNER_ISSUER, "audiences": [PARTNER_AUDIENCE],
                     "jwks": {"inline": jwks(partner_key, "partner-1")}, "defaultTeam": "batch"}]},
            }
            workdir.mkdir(parents=True, exist_ok=True)
            for name, text in config_files(values).items():
                (workdir / name).write_text(text)

        ready = ssl.create_default_context(cafile=str(root / "ca.crt"))
        ready.load_cert_chain(str(root / "unmapped.crt"), str(root / "unmapped.key"))
        with pytest.MonkeyPatch.context() as mp:  # only while this stack is built
            mp.setattr(conftest, "LocalStack", _ready_on(tls_stack(ready), ready))
            gw = build_gateway(workdir, customize=customize)
        try:
            yield Identity(gw, root, corp_key), partner_key
        finally:
            gw.stack.stop()


def _hostile_tokens(ident: Identity, partner_key: rsa.RSAPrivateKey) -> dict[str, str]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "team": "payments", "iat": now, "exp": now + 300}
    public_pem = ident.signing_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_head = _unsigned({"alg": "HS256", "typ": "JWT", "kid": "test-1"}, claims)
    hs256 = f"{hs_head}.{_b64(hmac.new(public_pem, hs_head.encode(), hashlib.sha256).digest())}"

    def rs(c: dict[str, Any], kid: str = "test-1", key: rsa.RSAPrivateKey | None = None) -> str:
        return jwt.encode(c, key or ident.signing_key, algorithm="RS256", headers={"kid": kid})

    return {
        "alg none": _unsigned({"alg": "none", "typ": "JWT"}, claims) + ".",
        "alg none with a kid": _unsigned({"alg": "none", "kid": "test-1"}, claims) + ".",
        "HS256 keyed with the RSA public key": hs256,
        "expired": rs({**claims, "exp": now - 600}),
        "nbf in the future": rs({**claims, "nbf": now + 3600}),
        "wrong issuer": rs({**claims, "iss": "https://evil.example"}),
        "wrong audience": rs({**claims, "aud": "someone-else"}),
        "unknown kid": rs(claims, kid="nope"),
        "kid of another issuer's key": rs(claims, kid="partner-1", key=partner_key),
        "another issuer's audience": rs({**claims, "iss": PARTNER_ISSUER}, kid="partner-1", key=partner_key),
        "signature of another token": ".".join(rs(claims).split(".")[:2] + [rs({**claims, "sub": "x"}).split(".")[2]]),
        "huge": rs({**claims, "pad": "x" * 30_000}, kid="nope"),
        "no exp at all": rs({k: v for k, v in claims.items() if k != "exp"}),
    }


def test_hostile_tokens_are_a_401_in_the_openai_shape_before_the_ext_proc(idp: tuple[Identity, Any]) -> None:
    ident, partner_key = idp
    ident.gw.reset()
    wrong = []
    tokens = _hostile_tokens(ident, partner_key)
    for name, token in tokens.items():
        r = ident.chat("unmapped", {"Authorization": f"Bearer {token}"})
        if (r.status_code, error_code(r)) != (401, "invalid_token"):
            wrong.append((name, r.status_code, r.text[:200]))
    assert not wrong, wrong
    assert ident.gw.received(ident.gw.primary) == []
    time.sleep(0.3)
    logs = ident.gw.logs()
    assert not [name for name, token in tokens.items() if token.split(".")[1] in logs]


def test_a_valid_token_of_each_issuer_is_its_own_principal(idp: tuple[Identity, Any]) -> None:
    ident, partner_key = idp
    now = int(time.time())
    partner = jwt.encode({"iss": PARTNER_ISSUER, "aud": PARTNER_AUDIENCE, "sub": "pat", "team": "payments",
                          "iat": now, "exp": now + 300}, partner_key, algorithm="RS256", headers={"kid": "partner-1"})
    u = ident.get("/v1/usage", "unmapped", {"Authorization": f"Bearer {partner}"}).json()
    # The partner issuer maps no team claim: its defaultTeam, whatever `team` the token says.
    # Two issuers: each names its own users (`<provider>:<claim>`, docs/identity.md).
    assert (u["key_id"], u["team"], u["user"]) == ("token:partner", "batch", "partner:pat"), u
    u = ident.get("/v1/usage", "unmapped", {"Authorization": f"Bearer {ident.token(sub='carol')}"}).json()
    assert (u["key_id"], u["team"], u["user"]) == ("token:corp", "demo", "corp:carol"), u


def test_a_token_and_a_key_in_one_authorization_never_mix(idp: tuple[Identity, Any]) -> None:
    """A repeated Authorization is one value to Envoy: neither credential is served alone."""
    ident, _ = idp
    token = ident.token(sub="erin")
    for values in ([f"Bearer {DEMO_KEY}", f"Bearer {token}"], [f"Bearer {token}", f"Bearer {DEMO_KEY}"]):
        r = ident.get("/v1/usage", "unmapped", [("Authorization", v) for v in values])  # type: ignore[arg-type]
        assert r.status_code == 401 and error_code(r) in ("invalid_api_key", "invalid_token"), (values, r.text)


def test_a_certificate_with_several_spiffe_ids_is_refused(idp: tuple[Identity, Any]) -> None:
    """An X.509-SVID carries exactly one SPIFFE ID. Envoy writes URI SANs unquoted into
    XFCC, so several of them cannot be told from one SAN smuggling ';URI=…': a certificate
    with several is not taken for whichever maps (docs/identity.md)."""
    ident, _ = idp
    for client in ("batch-and-api", "unmapped-then-api", "foreign-and-unmapped"):
        r = ident.get("/v1/usage", client)
        assert r.status_code == 403 and error_code(r) == "identity_conflict", (client, r.text)
    assert ident.get("/v1/usage", "payments-api").json()["team"] == "payments"


@pytest.mark.parametrize(("client", "code"), [("semicolon-in-san", "identity_not_mapped"),
                                              ("quote-in-san", "identity_conflict"),
                                              ("comma-in-san", "identity_not_mapped"),
                                              ("dns-smuggle", "identity_not_mapped")])
def test_a_san_that_smuggles_xfcc_syntax_names_no_other_workload(idp: tuple[Identity, Any], client: str,
                                                                  code: str) -> None:
    """A CA-signed URI SAN in the caller's own namespace holding ';URI=…', '";URI="…' or
    ',URI=…' (which a CA policy such as `spiffe://cluster.local/ns/other/*` lets through),
    or a DNS SAN holding ';DNS=<a mapped name>', is never read as the payments workload it
    names: the ext_proc reads the SANs from the certificate Envoy forwards, as signed."""
    ident, _ = idp
    r = ident.get("/v1/usage", client)
    assert r.status_code == 403 and error_code(r) == code, r.text


# -- a remote JWKS that misbehaves ---------------------------------------------------------


class JwksServer:
    """A JWKS endpoint whose answer the test switches: the key set, garbage, a stall past
    Envoy's fetch timeout, or a closed port."""

    def __init__(self) -> None:
        self.mode, self.body, self.fetches = "garbage", b"", 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                if outer.mode == "slow":
                    time.sleep(3)
                body = outer.body if outer.mode == "ok" else b"<html>not a key set</html>"
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def serve(self, *keys_: tuple[rsa.RSAPrivateKey, str]) -> None:
        jwks = []
        for key, kid in keys_:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwk.update(kid=kid, alg="RS256", use="sig")
            jwks.append(jwk)
        self.body, self.mode = json.dumps({"keys": jwks}).encode(), "ok"


def test_a_remote_jwks_that_is_garbage_slow_down_or_rotating_never_lets_a_bad_token_through() -> None:
    jwks = JwksServer()
    old_key, new_key, forged = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3))

    def token(key: rsa.RSAPrivateKey, kid: str) -> str:
        now = int(time.time())
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "dana", "iat": now, "exp": now + 600}, key,
                          algorithm="RS256", headers={"kid": kid})

    def customize(values: dict[str, Any]) -> None:
        values["identity"] = {"oidc": {"providers": [{
            "name": "remote", "issuer": ISSUER, "audiences": [AUDIENCE], "defaultTeam": "demo",
            "jwks": {"remote": {"url": jwks.url, "cacheDuration": "2s", "timeout": "1s"}}}]}}

    def answer(tok: str) -> tuple[int, str | None]:
        r = httpx.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
        return r.status_code, (r.json().get("key_id") if r.status_code == 200 else error_code(r))

    def eventually(tok: str, expected: tuple[int, str | None], within: float = 8.0) -> None:
        deadline = time.monotonic() + within
        while (got := answer(tok)) != expected:
            assert got in ((200, "token:remote"), (401, "invalid_token")), got
            assert time.monotonic() < deadline, (expected, got)
            time.sleep(0.2)

    try:
        with tempfile.TemporaryDirectory(prefix="gw-jwks-attack-") as tmp:
            gw = build_gateway(Path(tmp), customize=customize)
            try:
                # Garbage at start: every token refused, keys unaffected.
                for tok in (token(old_key, "k1"), token(forged, "k1")):
                    assert answer(tok) == (401, "invalid_token")
                assert answer(DEMO_KEY) == (200, "demo")
                jwks.serve((old_key, "k1"))
                eventually(token(old_key, "k1"), (200, "token:remote"))
                assert answer(token(forged, "k1")) == (401, "invalid_token")
                # Rotation: both keys published, then the old one withdrawn.
                jwks.serve((old_key, "k1"), (new_key, "k2"))
                eventually(token(new_key, "k2"), (200, "token:remote"))
                jwks.serve((new_key, "k2"))
                eventually(token(old_key, "k1"), (401, "invalid_token"))
                assert answer(token(new_key, "k2")) == (200, "token:remote")
                # Slow, then down: never a forged token, never a 5xx; keys still work.
                for mode in ("slow", "down"):
                    if mode == "down":
                        jwks.server.shutdown()
                        jwks.server.server_close()
                    else:
                        jwks.mode = "slow"
                    deadline = time.monotonic() + 4
                    while time.monotonic() < deadline:
                        assert answer(token(forged, "k2")) == (401, "invalid_token")
                        assert answer(token(new_key, "k2")) in ((200, "token:remote"), (401, "invalid_token"))
                        assert answer(DEMO_KEY) == (200, "demo")
                        time.sleep(0.3)
                assert gw.stack.exited() is None
            finally:
                gw.stack.stop()
    finally:
        jwks.server.server_close()



# -- a config reload while requests flow ---------------------------------------------------


def test_a_reload_flipping_a_keys_access_serves_each_request_with_one_whole_config() -> None:
    """gateway.yaml flips the restricted key between two configs (A: default-chat, team demo;
    B: claude-chat only) while a burst of 20 concurrent clients runs. Every answer is one
    config's: a chat is served or refused model_not_allowed, a model list is A's or B's,
    never a mix, an empty list or an error."""
    with tempfile.TemporaryDirectory(prefix="gw-reload-attack-") as tmp:
        gw = build_gateway(Path(tmp))
        gateway_yaml = Path(tmp) / "gateway.yaml"
        configs = []
        for models in (["default-chat"], ["claude-chat"]):
            values = copy.deepcopy(gw.stack.values)
            next(k for k in values["keys"] if k["id"] == "restricted")["models"] = models
            configs.append(render_values(values)["gateway.yaml"])
        lists: list[tuple[str, ...]] = []
        chats: list[tuple[int, str | None]] = []

        async def burst(stop: asyncio.Event) -> None:
            headers = {"Authorization": f"Bearer {gw.restricted_key}"}
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as c:
                async def worker(i: int) -> None:
                    while not stop.is_set():
                        if i % 2:
                            r = await c.get(f"{gw.url}/v1/models", headers=headers)
                            lists.append(tuple(m["id"] for m in r.json()["data"]) if r.status_code == 200
                                         else (str(r.status_code),))
                        else:
                            r = await c.post(f"{gw.url}/v1/chat/completions", headers=headers, json=CHAT)
                            chats.append((r.status_code, error_code(r) if r.status_code != 200 else None))
                await asyncio.gather(*(worker(i) for i in range(20)))

        async def flip() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(burst(stop))
            for i in range(4):
                await asyncio.sleep(2.5)  # the workers poll every 2 s
                tmp_file = gateway_yaml.with_suffix(".tmp")
                tmp_file.write_text(configs[(i + 1) % 2])
                os.replace(tmp_file, gateway_yaml)
            await asyncio.sleep(2.5)
            stop.set()
            await task

        try:
            asyncio.run(flip())
        finally:
            gw.stack.stop()
        assert set(lists) == {("default-chat",), ("claude-chat",)}, set(lists)
        assert set(chats) == {(200, None), (403, "model_not_allowed")}, set(chats)
        assert len(lists) > 100 and len(chats) > 100
