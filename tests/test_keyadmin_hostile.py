"""Hostile input to the key admin API over the Redis store (a real Valkey): racing duplicate
creates, ids no key can have, revoking what is not there; and what the store holds (only
hashes: the whole keyspace is searched for the secret)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
import yaml

from gateway_extproc import keys
from gateway_extproc.keyadmin import AdminApp, store_for
from gateway_extproc import config

from .redis_server import RedisServer
from .test_keyadmin import RAW, TOKEN, call


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
def app(tmp_path: Path, server: RedisServer) -> AdminApp:
    redis_py.Redis.from_url(server.url).flushall()
    raw = {**RAW, "budgets": {"store": "redis", "redis": {"url": server.url}},
           "identity": {"keyAdmin": {"enabled": True, "admins": [{"name": "root", "sha256": keys.digest(TOKEN)}]}}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return AdminApp(str(path), store_for(config.load(path)))


def test_racing_creates_of_one_id_make_one_key(app: AdminApp) -> None:
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda _: call(app, "POST", "/admin/keys", {"team": "search", "id": "dup"}), range(32)))
    assert sorted(status for status, _ in got) == [201] + [409] * 31
    assert {out["error"]["code"] for status, out in got if status == 409} == {"key_conflict"}


@pytest.mark.parametrize("id_", ["x" * 64, "x" * 60_000, "ключ", "ｋｅｙ", "abc\n", "-abc", "ABC", "a_b", "a b",
                                 "a\u0307", 7, ["a"], {"a": 1}])
def test_an_id_no_key_can_have_is_refused_unquoted_and_stores_nothing(app: AdminApp, server: RedisServer,
                                                                       id_: object) -> None:
    status, out = call(app, "POST", "/admin/keys", {"team": "search", "id": id_})
    assert (status, out["error"]["code"], out["error"]["param"]) == (400, "invalid_request", "id"), out
    if isinstance(id_, str) and len(id_) > 3:
        assert id_ not in json.dumps(out, ensure_ascii=False)
    assert redis_py.Redis.from_url(server.url).dbsize() == 0


def test_revoking_what_is_not_there(app: AdminApp) -> None:
    assert call(app, "DELETE", "/admin/keys/ghost")[1]["error"]["code"] == "key_not_found"
    assert call(app, "POST", "/admin/keys", {"team": "search", "id": "once"})[0] == 201
    assert call(app, "DELETE", "/admin/keys/once")[0] == 200
    assert call(app, "DELETE", "/admin/keys/once")[1]["error"]["code"] == "key_not_found"
    assert call(app, "DELETE", "/admin/keys/fixed")[1]["error"]["code"] == "key_conflict"  # in values


def test_the_store_holds_hashes_only(app: AdminApp, server: RedisServer) -> None:
    _, made = call(app, "POST", "/admin/keys", {"team": "search", "id": "svc", "user": "ünï", "owner": "ops"})
    _, rotated = call(app, "POST", "/admin/keys/svc/rotate", {"grace_seconds": 60})
    client = redis_py.Redis.from_url(server.url)
    dump = b""
    for name in client.scan_iter():
        kind = client.type(name)
        dump += name + (json.dumps({k.decode(): v.decode() for k, v in client.hgetall(name).items()}).encode()
                        if kind == b"hash" else b" ".join(client.smembers(name)) if kind == b"set" else b"")
    for key in (made["key"], rotated["key"]):
        secret = key.split("_", 2)[2]
        assert secret.encode() not in dump and key.encode() not in dump
    assert keys.digest(rotated["key"]).encode() in dump and keys.digest(made["key"]).encode() in dump


@pytest.mark.parametrize("name", ["user", "owner"])
@pytest.mark.parametrize("value", ["alice\n", "a\x1b[2Jb", "a\x00b", "a\x7fb", "a\x85b", "x" * 257, "", 7, ["a"]])
def test_a_user_or_owner_no_name_can_have_is_refused_unquoted_and_stores_nothing(
        app: AdminApp, server: RedisServer, name: str, value: object) -> None:
    """The user names a budget level and goes into store key names, audit records, reports and
    `/v1/usage`; a control character there rewrites an auditor's terminal (the reports print it)
    and 60 KB of it rides on every request's audit record. Config users follow the same rule."""
    status, out = call(app, "POST", "/admin/keys", {"team": "search", "id": "svc", name: value})
    assert (status, out["error"]["code"], out["error"]["param"]) == (400, "invalid_request", name), out
    if isinstance(value, str) and len(value) > 3:
        assert value not in json.dumps(out, ensure_ascii=False)
    assert redis_py.Redis.from_url(server.url).dbsize() == 0


def test_a_user_of_any_script_and_an_issuer_scoped_user_are_kept(app: AdminApp) -> None:
    status, made = call(app, "POST", "/admin/keys", {"team": "search", "id": "svc", "user": "corp:José Müller",
                                                     "owner": "ops@example.com"})
    assert status == 201 and (made["user"], made["owner"]) == ("corp:José Müller", "ops@example.com"), made
