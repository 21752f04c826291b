"""The key admin API without HTTP (AdminApp) over the one-node file store, and the workers'
file lookup reading what it writes; identity config errors; admin actions in `serve`'s own
audit chain and the audit reports it serves."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime, timedelta, timezone
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_extproc import config, identity, keys
from gateway_extproc.errors import CODES, GatewayError
from gateway_extproc.keyadmin import AdminApp, FileAdminStore
from gateway_extproc.keystore import FIELDS, FileKeyLookup

TOKEN = "gwa_unit-test-token"
RAW = {
    "version": 1, "listen": ["unix:///tmp/gw.sock"],
    "providers": [{"name": "openai", "kind": "openai", "baseURL": "https://api.openai.com/v1",
                   "credential": {"env": "OPENAI_API_KEY"}}],
    "models": [{"name": n, "backends": [{"provider": "openai", "model": "gpt"}]} for n in ("chat", "mini")],
    "teams": [{"name": "search"}],
    "keys": [{"id": "fixed", "sha256": keys.digest("gwk_fixed_x"), "team": "search"}],
}


@pytest.fixture
def app(tmp_path: Path) -> AdminApp:
    raw = {**RAW, "identity": {"keyAdmin": {"enabled": True, "file": str(tmp_path / "keys.json"),
                                            "admins": [{"name": "root", "sha256": keys.digest(TOKEN)}]}}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return AdminApp(str(path), FileAdminStore(str(tmp_path / "keys.json")))


def call(app: AdminApp, method: str, path: str, body: object = None, token: str = TOKEN) -> tuple[int, dict]:
    status, out, _ = app.handle(method, path, {"authorization": f"Bearer {token}"},
                             json.dumps(body).encode() if body is not None else b"")
    return status, json.loads(out)


def lookup(app: AdminApp, key: str, now: datetime | None = None) -> config.VirtualKey:
    cfg = config.load(app.config_path)
    store = FileKeyLookup(str(cfg.identity.key_admin.file))
    return asyncio.run(identity.authenticate({"authorization": f"Bearer {key}"}, cfg,
                                             now or datetime.now(timezone.utc), None, store))


def test_create_rotate_revoke_on_the_file_store(app: AdminApp) -> None:
    status, created = call(app, "POST", "/admin/keys", {"team": "search", "id": "k1", "models": ["chat"]})
    assert status == 201 and created["key"].startswith("gwk_k1_")
    assert oct(os.stat(app.store.path).st_mode & 0o777) == "0o600"  # type: ignore[attr-defined]
    assert created["key"] not in app.store.path.read_text()  # type: ignore[attr-defined]
    assert lookup(app, created["key"]).models == frozenset({"chat"})
    _, rotated = call(app, "POST", "/admin/keys/k1/rotate", {"grace_seconds": 60})
    assert lookup(app, rotated["key"]).id == "k1" and lookup(app, created["key"]).id == "k1"
    later = datetime.now(timezone.utc) + timedelta(seconds=61)
    with pytest.raises(GatewayError, match="not valid"):
        lookup(app, created["key"], later)
    assert lookup(app, rotated["key"], later).id == "k1"
    assert call(app, "DELETE", "/admin/keys/k1")[0] == 200
    with pytest.raises(GatewayError, match="not valid"):
        lookup(app, rotated["key"])


def test_listing_never_shows_a_secret_or_hash(app: AdminApp) -> None:
    _, created = call(app, "POST", "/admin/keys", {"team": "search", "id": "k2"})
    status, listing = call(app, "GET", "/admin/keys")
    text = json.dumps(listing)
    assert status == 200 and created["key"] not in text and keys.digest(created["key"]) not in text
    assert keys.digest("gwk_fixed_x") not in text
    assert {(k["id"], k["source"]) for k in listing["data"]} == {("fixed", "values"), ("k2", "admin")}


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("POST", "/admin/keys", {"team": "nope"}, 400, "invalid_request"),
    ("POST", "/admin/keys", {"team": "search", "id": "Bad_Id"}, 400, "invalid_request"),
    ("POST", "/admin/keys", {"team": "search", "models": ["gpt-9"]}, 400, "invalid_request"),
    ("POST", "/admin/keys", {"team": "search", "expires_at": "tomorrow"}, 400, "invalid_request"),
    ("POST", "/admin/keys", {"team": "search", "id": "fixed"}, 409, "key_conflict"),
    ("POST", "/admin/keys/fixed/rotate", {}, 409, "key_conflict"),
    ("POST", "/admin/keys/missing/rotate", {}, 404, "key_not_found"),
    ("POST", "/admin/keys/missing/rotate", {"grace_seconds": -1}, 404, "key_not_found"),
    ("DELETE", "/admin/keys/missing", None, 404, "key_not_found"),
    ("PATCH", "/admin/keys/missing", {"models": None}, 404, "key_not_found"),
    ("GET", "/admin/other", None, 404, "unknown_endpoint"),
    ("PUT", "/admin/keys", None, 405, "method_not_allowed"),
])
def test_refusals(app: AdminApp, method: str, path: str, body: object, status: int, code: str) -> None:
    got, out = call(app, method, path, body)
    assert (got, out["error"]["code"]) == (status, code), out


def test_a_wrong_token_changes_nothing(app: AdminApp) -> None:
    status, out = call(app, "POST", "/admin/keys", {"team": "search", "id": "k3"}, token="gwa_wrong")
    assert (status, out["error"]["code"]) == (401, "admin_unauthorized")
    assert call(app, "GET", "/admin/keys/k3")[0] == 404


@pytest.mark.parametrize(("identity_section", "problem"), [
    ({"workloads": {"principals": [{"name": "a", "team": "search"}]}}, "exactly one of spiffe"),
    ({"workloads": {"principals": [{"name": "a", "spiffe": "spiffe://td/*/x", "team": "search"}]}}, "ending in /*"),
    ({"workloads": {"principals": [{"name": "a", "dns": "a.*.svc", "team": "search"}]}}, "starting with *."),
    ({"workloads": {"principals": [{"name": "a", "spiffe": "spiffe://td/x", "team": "ads"}]}}, "not in teams"),
    ({"workloads": {"trustedProxies": ["10.0.0.300/32"]}}, "give a CIDR"),
    ({"workloads": {"principals": [{"name": "a", "dns": "x.svc", "team": "search"},
                                   {"name": "b", "dns": "x.svc", "team": "search"}]}}, "repeats 'x.svc'"),
    ({"oidc": {"providers": [{"name": "p", "issuer": "i", "jwks": {}, "teamClaim": "t"}]}}, "exactly one of file"),
    ({"oidc": {"providers": [{"name": "p", "issuer": "i", "jwks": {"file": "/j"}}]}}, "needs teamClaim"),
    ({"keyAdmin": {"enabled": True, "admins": [{"name": "a", "sha256": "0" * 64}]}}, "keyAdmin.file is required"),
    ({"keyAdmin": {"enabled": True, "file": "/k"}}, "admins is empty"),
])
def test_identity_config_errors_name_the_key(identity_section: dict, problem: str) -> None:
    with pytest.raises(config.ConfigError, match=problem.replace("*", r"\*")) as e:
        config.parse({**RAW, "identity": identity_section}, "gw.yaml")
    assert str(e.value).startswith("gw.yaml: identity.")


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[AdminApp]:
    """The admin API with `audit:` on and `serve`'s own sink running, as `serve` starts them."""
    from gateway_extproc import audit
    from gateway_extproc.audit.signing import generate

    generate(tmp_path / "signing.key")
    raw = {**RAW, "identity": {"keyAdmin": {"enabled": True, "file": str(tmp_path / "keys.json"),
                                            "admins": [{"name": "root", "sha256": keys.digest(TOKEN)}]}},
           "audit": {"enabled": True, "dir": str(tmp_path / "audit"), "signingKeyFile": str(tmp_path / "signing.key"),
                     "instance": "node"}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    audit.start_admin(config.load(str(path)))
    try:
        yield AdminApp(str(path), FileAdminStore(str(tmp_path / "keys.json")))
    finally:
        audit.stop()


def test_admin_actions_go_to_serves_own_chain_without_secrets(audited: AdminApp, tmp_path: Path) -> None:
    from gateway_extproc import audit
    from gateway_extproc.audit.reports import admin_actions
    from gateway_extproc.audit.signing import load_public
    from gateway_extproc.audit.verify import verify_dir

    _, created = call(audited, "POST", "/admin/keys", {"team": "search", "id": "k1", "user": "ann"})
    _, rotated = call(audited, "POST", "/admin/keys/k1/rotate", {"grace_seconds": 0})
    call(audited, "PATCH", "/admin/keys/k1", {"models": ["chat"], "expires_at": "2030-01-01T00:00:00Z"})
    call(audited, "DELETE", "/admin/keys/k1")
    assert call(audited, "DELETE", "/admin/keys/k1", token="wrong")[0] == 401
    audit.stop()  # writes the queue and seals the chain
    root = tmp_path / "audit"
    assert [p.relative_to(root).as_posix() for p in root.rglob("*.jsonl")] == ["node-admin/gateway/000000000000.jsonl"]
    rows = admin_actions(root)["rows"]
    digest = config.load(audited.config_path).digest[:16]
    assert [(r["actor"], r["action"], r["key_id"], r["config"]) for r in rows] == [
        ("root", "create", "k1", digest), ("root", "rotate", "k1", digest), ("root", "update", "k1", digest),
        ("root", "revoke", "k1", digest), (None, "denied", None, digest)]
    assert rows[0]["team"] == "search" and rows[0]["user"] == "ann" and rows[0]["owner"] == "root"
    assert rows[2]["models"] == ["chat"] and rows[2]["expires_at"].startswith("2030-01-01")
    assert rows[4]["path"] == "/admin/keys/k1" and rows[4]["method"] == "DELETE"
    trail = (root / "node-admin/gateway/000000000000.jsonl").read_text()
    for secret in (created["key"], rotated["key"], TOKEN):
        assert secret not in trail and keys.digest(secret) not in trail
    [result] = verify_dir(root, load_public(tmp_path / "signing.key.pub"))
    assert result.status == "ok" and result.name == "node-admin/gateway"


def test_reports_on_the_admin_api(audited: AdminApp) -> None:
    call(audited, "POST", "/admin/keys", {"team": "search", "id": "k2"})
    from gateway_extproc import audit

    audit._sink.cycle()  # type: ignore[union-attr]
    auth = {"authorization": f"Bearer {TOKEN}"}
    status, out, content_type = audited.handle("GET", "/admin/reports/admin?format=csv", auth, b"")
    assert status == 200 and content_type.startswith("text/csv")
    assert out.decode().splitlines()[0] == "ts,actor,action,key_id,team,config,details"
    assert ",root,create,k2,search," in out.decode()
    status, out, content_type = audited.handle("GET", "/admin/reports/chargeback?month=2026-11&format=json",
                                               {"authorization": f"Bearer {TOKEN}"}, b"")
    assert status == 200 and content_type == "application/json" and json.loads(out)["teams"] == []
    for path, code, param in [("/admin/reports/chargeback?month=November", "invalid_request", "month"),
                              ("/admin/reports/chargeback?month=2026-11&timezone=Mars/Base", "invalid_request",
                               "timezone"),
                              ("/admin/reports/inventory?from=yesterday", "invalid_request", "from"),
                              ("/admin/reports/chargeback?month=0000-01", "invalid_request", "month"),
                              ("/admin/reports/chargeback?month=9999-12", "invalid_request", "month"),
                              ("/admin/reports/chargeback?month=2026-11%0A", "invalid_request", "month"),
                              ("/admin/reports/admin?from=0001-01-01T00:00:00%2B01:00", "invalid_request", "from"),
                              ("/admin/reports/inventory?format=xml", "invalid_request", "format"),
                              ("/admin/reports/secrets", "unknown_endpoint", None)]:
        status, body = call(audited, "GET", path)
        assert (status, body["error"]["code"], body["error"]["param"]) == (CODES[code], code, param), body
    assert call(audited, "GET", "/admin/reports/inventory", token="wrong")[0] == 401
    assert call(audited, "DELETE", "/admin/reports/inventory")[0] == 405


def test_reports_need_the_audit_trail(app: AdminApp) -> None:
    status, body = call(app, "GET", "/admin/reports/chargeback?month=2026-11")
    assert status == 404 and body["error"]["code"] == "audit_not_enabled"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["chargeback", "inventory", "admin", "x", "chargeback/", "Admin"]),
       params=st.dictionaries(st.sampled_from(["month", "timezone", "from", "to", "format", "zz"]),
                              st.one_of(st.text(max_size=40), st.from_regex(r"\d{4}-\d\d", fullmatch=True),
                                        st.datetimes().map(lambda d: d.isoformat()),
                                        st.dates().map(lambda d: d.isoformat())), max_size=5))
def test_hostile_report_queries_get_a_report_or_a_named_error(audited: AdminApp, kind: str,
                                                               params: dict[str, str]) -> None:
    from urllib.parse import urlencode

    status, out, content_type = audited.handle("GET", f"/admin/reports/{kind}?{urlencode(params)}",
                                               {"authorization": f"Bearer {TOKEN}"}, b"")
    if status == 200:
        assert content_type in ("text/csv; charset=utf-8", "application/json")
    else:
        err = json.loads(out)["error"]
        assert (status, err["code"]) in {(400, "invalid_request"), (404, "unknown_endpoint")}, err
        assert status == 404 or err["param"] in params or err["param"] == "month"


# -- the workers' Redis key lookup -------------------------------------------------------


def test_redis_lookup_survives_a_store_restart_and_fails_closed_while_it_is_down() -> None:
    """A restart closes the pooled socket of the last lookup: the next one retries on a
    fresh connection instead of answering key_store_unavailable once the store is back."""
    import redis as redis_sync

    from gateway_extproc.budgets.redis_store import connect
    from gateway_extproc.errors import GatewayError
    from gateway_extproc.keystore import RedisKeyLookup
    from gateway_extproc.keyadmin import RedisAdminStore

    from .redis_server import RedisServer

    with RedisServer(persist=True) as server:
        record = dict.fromkeys(FIELDS, "")
        record.update(id="svc", sha256="0" * 64, team="demo")
        assert RedisAdminStore(redis_sync.Redis.from_url(server.url), "default").create(record)

        async def scenario() -> None:
            lookup = RedisKeyLookup(connect(server.url), "default")

            async def get() -> object:
                lookup.cache.clear()  # as after the workers' 1 s
                return await lookup.get("svc")

            assert await get() is not None
            server.stop()
            with pytest.raises(GatewayError) as info:
                await get()
            assert info.value.code == "key_store_unavailable"  # closed while down
            server.start()
            assert await get() is not None
            server.stop()
            server.start()  # restarted while idle: the pooled socket is dead
            assert await get() is not None

        asyncio.run(scenario())


def test_redis_lookup_reads_a_reply_its_busy_loop_was_late_for_and_fails_closed_when_frozen() -> None:
    """The lookup's deadline measures the store, not this process (budgets/redis_store.py
    does the same): a reply that came in time while the loop was blocked past the deadline is
    read; a frozen store is key_store_unavailable within about its timeout."""
    import redis as redis_sync

    from gateway_extproc.budgets.redis_store import connect
    from gateway_extproc.errors import GatewayError
    from gateway_extproc.keyadmin import RedisAdminStore
    from gateway_extproc.keystore import RedisKeyLookup
    from gateway_extproc.redis_deadline import TIMEOUT_S

    from .redis_server import RedisServer

    with RedisServer() as server:
        record = dict.fromkeys(FIELDS, "")
        record.update(id="svc", sha256="0" * 64, team="demo")
        assert RedisAdminStore(redis_sync.Redis.from_url(server.url), "default").create(record)

        async def scenario() -> None:
            lookup = RedisKeyLookup(connect(server.url), "default")
            assert await lookup.get("svc") is not None  # the connection is open
            lookup.cache.clear()
            server.pause()
            pending = asyncio.ensure_future(lookup.get("svc"))
            await asyncio.sleep(0.05)  # sent
            server.resume()
            time.sleep(TIMEOUT_S + 0.2)  # the loop is blocked while the store answers
            assert await pending is not None
            lookup.cache.clear()
            server.pause()
            started = time.monotonic()
            try:
                with pytest.raises(GatewayError) as info:
                    await lookup.get("svc")
            finally:
                server.resume()
            assert info.value.code == "key_store_unavailable"
            assert time.monotonic() - started < TIMEOUT_S + 0.4

        asyncio.run(scenario())


def test_a_cancelled_caller_does_not_cancel_the_shared_lookup() -> None:
    """Callers of one id share one lookup; the one that started it may go away (Envoy
    reset its stream) and the others still get the answer, from one round trip."""
    from gateway_extproc.keystore import RedisKeyLookup

    class Slow(RedisKeyLookup):
        def __init__(self) -> None:  # no client: only the sharing is under test
            self.cache, self.inflight, self.calls = {}, {}, 0

        async def _fetch(self, id_: str) -> object:
            self.calls += 1
            await asyncio.sleep(0.1)
            return f"entry {id_}"

    async def scenario() -> None:
        lookup = Slow()
        first = asyncio.create_task(lookup.get("svc"))
        await asyncio.sleep(0.01)
        others = [asyncio.create_task(lookup.get("svc")) for _ in range(5)]
        await asyncio.sleep(0.01)
        first.cancel()
        assert await asyncio.gather(*others) == ["entry svc"] * 5
        assert first.cancelled() and lookup.calls == 1 and not lookup.inflight

    asyncio.run(scenario())


@pytest.mark.parametrize("content", ["{not json", '{"svc": {"id": "svc"}}', "[1, 2]"])
def test_an_unreadable_key_file_fails_closed_then_recovers(tmp_path: Path, content: str) -> None:
    """key_store_unavailable (503), not a 500 on every stored key, until the file is good."""
    from gateway_extproc import keystore
    from gateway_extproc.errors import GatewayError

    path = tmp_path / "keys.json"
    record = dict.fromkeys(FIELDS, "")
    record.update(id="svc", sha256="0" * 64, team="demo")
    keystore.write_file(path, {"svc": record})
    lookup = keystore.FileKeyLookup(str(path))

    async def get() -> object:
        lookup.checked = -keystore.CACHE_SECONDS  # as after the workers' 1 s
        return await lookup.get("svc")

    assert asyncio.run(get()) is not None
    path.write_text(content)
    for _ in range(2):
        with pytest.raises(GatewayError) as info:
            asyncio.run(get())
        assert (info.value.code, info.value.status) == ("key_store_unavailable", 503)
    keystore.write_file(path, {"svc": record})
    assert asyncio.run(get()) is not None


def test_a_rewrite_of_one_size_within_one_timestamp_tick_is_still_read(tmp_path: Path) -> None:
    """Revoking a key rewrites the file whole (a rename): two writes of one size within the
    file system's timestamp tick must not leave workers on the first (a revoked key served)."""
    import os

    from gateway_extproc import keystore

    path = tmp_path / "keys.json"
    record = dict.fromkeys(FIELDS, "")
    record.update(id="svc", sha256="0" * 64, team="demo", expires_at="2030-01-01T00:00:00+00:00")
    keystore.write_file(path, {"svc": record})
    lookup = keystore.FileKeyLookup(str(path))

    async def get() -> object:
        lookup.checked = -keystore.CACHE_SECONDS  # as after the workers' 1 s
        return await lookup.get("svc")

    first = asyncio.run(get())
    stamp = path.stat().st_mtime_ns
    keystore.write_file(path, {"svc": {**record, "expires_at": "2020-01-01T00:00:00+00:00"}})  # same size
    os.utime(path, ns=(stamp, stamp))  # within the same tick
    second = asyncio.run(get())
    assert first != second


def test_a_refused_call_records_no_caller_text_but_a_route(audited: AdminApp, tmp_path: Path) -> None:
    """An unauthenticated caller chooses the path and the method: a key pasted into either
    must not land in the audit trail (kept for years), nor be quoted back."""
    from gateway_extproc import audit
    from gateway_extproc.audit.reports import admin_actions

    secret = "gwk_pasted_into_the_path_by_mistake"
    status, body = call(audited, "DELETE", f"/admin/{secret}?token={secret}", token="wrong")
    assert status == 401 and secret not in json.dumps(body)
    assert call(audited, "GET", f"/admin/keys/{secret}", token="wrong")[0] == 401
    assert call(audited, "GET", "/admin/reports/chargeback", token="wrong")[0] == 401
    status, body = call(audited, "GET", f"/admin/{secret}")  # authenticated: unknown endpoint, not quoted
    assert status == 404 and secret not in json.dumps(body)
    audit.stop()
    rows = admin_actions(tmp_path / "audit")["rows"]
    assert [(r["action"], r["path"], r["method"]) for r in rows] == [
        ("denied", "(unknown)", "DELETE"), ("denied", "(unknown)", "GET"), ("denied", "/admin/reports/chargeback", "GET")]
    assert secret not in (tmp_path / "audit/node-admin/gateway/000000000000.jsonl").read_text()


def test_a_broken_gateway_yaml_does_not_stop_a_revocation(app: AdminApp) -> None:
    """A half-done edit of gateway.yaml (the workers keep serving the last good config) made
    every admin call a 500 `gateway_internal_error` that quoted the config error, before the
    caller was authenticated: a leaked key could not be revoked until someone fixed an
    unrelated typo. The admin API keeps the last config that loaded, as the workers do."""
    _, created = call(app, "POST", "/admin/keys", {"team": "search", "id": "leaked"})
    good = Path(app.config_path).read_text()
    for broken in ("version: 1\nlisten: [", "", good.replace("team: search", "team: serach", 1)):
        Path(app.config_path).write_text(broken)
        status, body = call(app, "GET", "/admin/keys", token="gwa_wrong")
        assert (status, body["error"]["code"]) == (401, "admin_unauthorized")  # nothing about the file
        assert call(app, "GET", "/admin/keys/leaked")[0] == 200
    assert call(app, "DELETE", "/admin/keys/leaked") == (200, {"id": "leaked", "revoked": True})
    Path(app.config_path).write_text(good)
    with pytest.raises(GatewayError, match="not valid"):
        lookup(app, created["key"])


def test_with_no_config_that_ever_loaded_the_admin_api_says_so_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("version: 1\nlisten: [")
    admin = AdminApp(str(path), FileAdminStore(str(tmp_path / "keys.json")))
    status, body = call(admin, "GET", "/admin/keys")
    assert status == 500 and body["error"]["code"] == "gateway_internal_error"
    assert "listen" not in body["error"]["message"] and str(path) not in body["error"]["message"]


def test_the_config_is_read_again_only_when_the_file_changes(app: AdminApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call, authenticated or not, read and validated gateway.yaml (~30 ms of the
    `serve` parent's CPU): a flood of calls with no token kept a core busy. It is read when
    the file changed (a new admin, a removed model) and not otherwise."""
    reads: list[str] = []
    real = config.load
    monkeypatch.setattr(config, "load", lambda path: reads.append(path) or real(path))
    for _ in range(50):
        assert call(app, "GET", "/admin/keys", token="gwa_wrong")[0] == 401
    assert call(app, "GET", "/admin/keys")[0] == 200 and len(reads) == 1
    raw = yaml.safe_load(Path(app.config_path).read_text())
    raw["identity"]["keyAdmin"]["admins"].append({"name": "second", "sha256": keys.digest("gwa_second-token")})
    Path(app.config_path).write_text(yaml.safe_dump(raw))
    assert call(app, "GET", "/admin/keys", token="gwa_second-token")[0] == 200 and len(reads) == 2
