"""The key admin API without HTTP (AdminApp) over the one-node file store, and the workers'
file lookup reading what it writes; identity config errors."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from gateway_extproc import config, identity, keys
from gateway_extproc.errors import GatewayError
from gateway_extproc.keyadmin import AdminApp, FileAdminStore
from gateway_extproc.keystore import FileKeyLookup

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
