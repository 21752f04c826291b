"""The key admin API: create, list, rotate, revoke and update virtual keys at run time.

It runs in the `serve` parent process on its own address (`identity.keyAdmin`), never on
Envoy's public listener, and authenticates every call with an admin token whose SHA-256
is in values (compared in constant time against every admin's hash). Keys it creates go
to the key store the workers read (keystore.py): Redis when budgets.store is redis, so
every replica sees a change within about a second, else a JSON file on this node. Keys
defined in values are listed but never changed here.

A secret is shown once, in the reply that creates or rotates it; the store keeps its
SHA-256. Every change, and every call refused for its credential, is one `admin_action`
log event and, with `audit:` on, one `admin` record in the signed audit trail (`audit`).
The same listener serves the audit trail's reports, computed by the CLI's own function.

    POST   /admin/keys                {team, id?, user?, owner?, models?, expires_at?}  -> 201 + key
    GET    /admin/keys                                                                    -> list
    GET    /admin/keys/{id}
    POST   /admin/keys/{id}/rotate    {grace_seconds?}  old and new both work until the grace ends
    PATCH  /admin/keys/{id}           {expires_at?: str|null, models?: [..]|null}
    DELETE /admin/keys/{id}           revoke
    GET    /admin/reports/chargeback?month=YYYY-MM[&timezone=Z][&format=csv|json]
    GET    /admin/reports/inventory[?from=..&to=..][&format=csv|json]
    GET    /admin/reports/admin[?from=..&to=..][&format=csv|json]
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

import structlog

from . import audit as audit_trail
from . import config as config_mod
from . import keys as keys_mod
from .api import parse_json
from .errors import GatewayError, error_body, quoted
from .keystore import FIELDS, read_file, redis_names, write_file

log = structlog.get_logger("gateway_extproc.audit")

MAX_GRACE_SECONDS = 30 * 86400
MAX_BODY_BYTES = 64 * 1024  # a key's fields are a few hundred bytes
MAX_NAME = 256  # a user or owner: it names a budget level and rides on every audit record
_PATH = re.compile(r"^/admin/keys(?:/([a-z0-9][a-z0-9-]{0,62})(/rotate)?)?/?$")
_REPORT = re.compile(r"^/admin/reports/([a-z]{1,40})/?$")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def _route(path: str) -> str:
    """The path for the audit trail and logs: one of this API's routes, else `(unknown)` —
    an unauthenticated caller chooses it, and a key pasted into it must not be kept."""
    route = path.partition("?")[0]
    return route if _PATH.match(route) or _REPORT.match(route) else "(unknown)"


def _method(method: str) -> str:
    return method if method in _METHODS else "other"


JSON = "application/json"
_CREATE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def audit(actor: str | None, action: str, key_id: str | None = None, config: str | None = None,
          **details: Any) -> None:
    """One admin action (who, what, when, under which config version). The single place admin
    actions are recorded: a log event, and a record in `serve`'s own chain of the signed audit
    trail when `audit:` is on (docs/audit.md). Never carries a secret or a hash."""
    log.info("admin_action", actor=actor, action=action, key_id=key_id,
             at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **details)
    audit_trail.admin(actor, action, key_id, config, **details)


class AdminStore(Protocol):
    def create(self, record: dict[str, str]) -> bool: ...
    def get(self, id_: str) -> dict[str, str] | None: ...
    def update(self, id_: str, fields: dict[str, str]) -> bool: ...
    def delete(self, id_: str) -> bool: ...
    def all(self) -> list[dict[str, str]]: ...


class RedisAdminStore:
    def __init__(self, client: Any, org: str) -> None:
        self.client = client
        self.record, self.ids, self.used = redis_names(org)
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)

    def create(self, record: dict[str, str]) -> bool:
        flat = [x for k, v in record.items() for x in (k, v)]
        return bool(self._create(keys=[self.record + record["id"], self.ids], args=[record["id"], *flat]))

    def get(self, id_: str) -> dict[str, str] | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.record + id_)
        pipe.hget(self.used, id_)
        raw, used = pipe.execute()
        return _decoded(raw, used) if raw else None

    def update(self, id_: str, fields: dict[str, str]) -> bool:
        return bool(self._update(keys=[self.record + id_], args=[x for k, v in fields.items() for x in (k, v)]))

    def delete(self, id_: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.record + id_)
        pipe.srem(self.ids, id_)
        pipe.hdel(self.used, id_)
        return bool(pipe.execute()[0])

    def all(self) -> list[dict[str, str]]:
        ids = sorted(i.decode() for i in self.client.smembers(self.ids))
        pipe = self.client.pipeline(transaction=False)
        for id_ in ids:
            pipe.hgetall(self.record + id_)
        pipe.hgetall(self.used)
        *records, used = pipe.execute()
        used = {k.decode(): v for k, v in used.items()}
        return [_decoded(r, used.get(id_)) for id_, r in zip(ids, records) if r]


def _decoded(raw: dict[bytes, bytes], used: bytes | None) -> dict[str, str]:
    out = {k.decode(): v.decode() for k, v in raw.items()}
    out["last_used"] = used.decode() if used else ""
    return out


class FileAdminStore:
    """One node's key file; written whole and renamed into place under a lock."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()

    def create(self, record: dict[str, str]) -> bool:
        with self.lock:
            records = read_file(self.path)
            if record["id"] in records:
                return False
            records[record["id"]] = record
            write_file(self.path, records)
            return True

    def get(self, id_: str) -> dict[str, str] | None:
        return read_file(self.path).get(id_)

    def update(self, id_: str, fields: dict[str, str]) -> bool:
        with self.lock:
            records = read_file(self.path)
            if id_ not in records:
                return False
            records[id_].update(fields)
            write_file(self.path, records)
            return True

    def delete(self, id_: str) -> bool:
        with self.lock:
            records = read_file(self.path)
            if records.pop(id_, None) is None:
                return False
            write_file(self.path, records)
            return True

    def all(self) -> list[dict[str, str]]:
        return [r for _, r in sorted(read_file(self.path).items())]


@dataclass
class AdminApp:
    """The API without HTTP: (method, path, headers, body, peer) -> (status, body, content type)."""

    config_path: str
    store: AdminStore
    # The last gateway.yaml that loaded. A file that does not (an edit half done) leaves the
    # workers on their last good config; the admin API stays on it too, so a leaked key can
    # still be revoked. Before, every call was a 500 quoting the config error, unauthenticated.
    last_good: config_mod.GatewayConfig | None = None
    # The file's (inode, size, mtime) when it was last read: a call reads it again only when
    # that changed. Reading it on every call cost ~30 ms of the `serve` parent's CPU before
    # the token was checked, so a flood of unauthenticated calls could keep a core busy.
    seen: tuple[int, int, int] | None = None

    def current(self) -> config_mod.GatewayConfig:
        try:
            st = os.stat(self.config_path)
        except OSError:
            st = None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else None
        if self.last_good is not None and signature is not None and signature == self.seen:
            return self.last_good
        try:
            self.last_good = config_mod.load(self.config_path)  # always the current values
            self.seen = signature
        except config_mod.ConfigError as exc:
            if self.last_good is None:
                log.error("admin_config_failed", path=self.config_path, error=str(exc))
                raise GatewayError("gateway_internal_error", "The gateway config does not load (the log's "
                                   "admin_config_failed says why); nothing was changed.") from None
            log.error("admin_config_stale", path=self.config_path, error=str(exc))
            self.seen = signature  # (this broken file is not read again on every call)
        return self.last_good

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes,
               peer: str | None = None) -> tuple[int, bytes, str]:
        cfg = None
        try:
            cfg = self.current()
            actor = self.authenticate(cfg, headers)
            route, _, query = path.partition("?")
            report = _REPORT.match(route)
            if report is not None:
                if method != "GET":
                    raise GatewayError("method_not_allowed", f"{_method(method)} is not supported on {route}.")
                return self.report(cfg, report.group(1), query)
            match = _PATH.match(route)
            if match is None:
                raise GatewayError("unknown_endpoint", f"Unknown admin endpoint {_method(method)}: this API serves "
                                   "/admin/keys, /admin/keys/<id>, /admin/keys/<id>/rotate and /admin/reports/<kind>.")
            id_, rotate = match.group(1), match.group(2)
            data = _json(body) if method in ("POST", "PATCH") else {}
            if id_ is None and method == "GET":
                return 200, _dumps({"object": "list", "data": self.list(cfg)}), JSON
            if id_ is None and method == "POST":
                return 201, _dumps(self.create(cfg, actor, data)), JSON
            if id_ is not None and rotate and method == "POST":
                return 200, _dumps(self.rotate(cfg, actor, id_, data)), JSON
            if id_ is not None and not rotate and method == "GET":
                return 200, _dumps(self.public(self._existing(cfg, id_))), JSON
            if id_ is not None and not rotate and method == "PATCH":
                return 200, _dumps(self.update(cfg, actor, id_, data)), JSON
            if id_ is not None and not rotate and method == "DELETE":
                record = self._existing(cfg, id_)
                if not self.store.delete(id_):
                    raise GatewayError("key_not_found", f"No key {id_!r}.")
                audit(actor, "revoke", id_, _version(cfg), team=record.get("team") or None)
                return 200, _dumps({"id": id_, "revoked": True}), JSON
            raise GatewayError("method_not_allowed", f"{_method(method)} is not supported on {route}.")
        except GatewayError as err:
            if err.code == "admin_unauthorized":
                audit(None, "denied", None, _version(cfg), path=_route(path), method=_method(method), peer=peer)
            return err.status, err.body(), JSON

    def report(self, cfg: config_mod.GatewayConfig, kind: str, query: str) -> tuple[int, bytes, str]:
        """A report over this node's audit directory, by the CLI's own function (reports.render)."""
        from .audit.reports import ReportError, render

        if cfg.audit is None:
            raise GatewayError("audit_not_enabled", "The audit trail is off (audit.enabled), so there is nothing "
                               "to report on.")
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        try:
            content_type, body = render(kind, Path(cfg.audit.dir), params)
        except OSError as exc:
            raise GatewayError("gateway_internal_error", f"The audit directory could not be read ({exc.strerror}: "
                               f"{exc.filename}).") from None
        except ReportError as exc:
            if exc.param == "report":
                raise GatewayError("unknown_endpoint", f"{exc}.") from None
            raise GatewayError("invalid_request", f"{exc}.", exc.param) from None
        return 200, body, content_type

    def authenticate(self, cfg: config_mod.GatewayConfig, headers: dict[str, str]) -> str:
        admin = cfg.identity.key_admin
        token = keys_mod.bearer(headers.get("authorization"))
        digest = keys_mod.digest(token) if token is not None else keys_mod.DUMMY
        who = None
        for name, expected in (admin.admins.items() if admin else ()):
            if hmac.compare_digest(digest, expected) and who is None:  # every hash compared: constant time
                who = name
        if who is None:
            raise GatewayError("admin_unauthorized", "Send `Authorization: Bearer <admin token>` "
                               "(identity.keyAdmin.admins).")
        return who

    def _existing(self, cfg: config_mod.GatewayConfig, id_: str) -> dict[str, str]:
        if id_ in cfg.keys:
            raise GatewayError("key_conflict", f"The key {id_!r} is defined in values; change it there.")
        record = self.store.get(id_)
        if record is None:
            raise GatewayError("key_not_found", f"No key {id_!r}.")
        return record

    def list(self, cfg: config_mod.GatewayConfig) -> list[dict[str, Any]]:
        from_values = [{"id": k.id, "team": k.team, "user": k.user, "owner": None,
                        "models": sorted(k.models) if k.models is not None else None, "created": None,
                        "expires_at": k.expires_at.isoformat() if k.expires_at else None, "last_used": None,
                        "previous_valid_until": None, "source": "values"} for k in cfg.keys.values()]
        return from_values + [self.public(r) for r in self.store.all()]

    @staticmethod
    def public(record: dict[str, str]) -> dict[str, Any]:
        """What a listing shows: never the secret, never its hash."""
        return {"id": record["id"], "team": record["team"], "user": record.get("user") or None,
                "owner": record.get("owner") or None,
                "models": json.loads(record["models"]) if record.get("models") else None,
                "created": record.get("created") or None, "expires_at": record.get("expires_at") or None,
                "last_used": record.get("last_used") or None,
                "previous_valid_until": record.get("previous_until") or None, "source": "admin"}

    def create(self, cfg: config_mod.GatewayConfig, actor: str, data: dict[str, Any]) -> dict[str, Any]:
        team = data.get("team")
        if not isinstance(team, str) or team not in cfg.teams:
            raise GatewayError("invalid_request", f"team must name a team in values, not {quoted(team)}.", "team")
        id_ = data.get("id") or f"{team.lower()[:50]}-{secrets.token_hex(4)}"
        if not isinstance(id_, str) or not config_mod.KEY_ID.match(id_):
            raise GatewayError("invalid_request", "id must be lowercase letters, digits and '-' (max 63).", "id")
        if id_ in cfg.keys:
            raise GatewayError("key_conflict", f"The key {id_!r} is defined in values.")
        for name in ("user", "owner"):
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_NAME
                                      or config_mod.control_character(value) is not None):
                raise GatewayError("invalid_request", f"{name} must be a string of 1 to {MAX_NAME} characters "
                                   "without control characters.", name)
        secret = keys_mod.generate(id_)
        record = dict.fromkeys(FIELDS, "")
        record.update(id=id_, sha256=keys_mod.digest(secret), team=team, user=data.get("user") or "",
                      owner=data.get("owner") or actor, created=_now().isoformat(timespec="seconds"),
                      models=_models(cfg, data.get("models")), expires_at=_expiry(data.get("expires_at")))
        if not self.store.create(record):
            raise GatewayError("key_conflict", f"A key {id_!r} already exists.")
        audit(actor, "create", id_, _version(cfg), team=team, user=record["user"] or None, owner=record["owner"],
              models=json.loads(record["models"]) if record["models"] else None,
              expires_at=record["expires_at"] or None)
        return {**self.public(record), "key": secret}

    def rotate(self, cfg: config_mod.GatewayConfig, actor: str, id_: str, data: dict[str, Any]) -> dict[str, Any]:
        record = self._existing(cfg, id_)
        grace = data.get("grace_seconds", 3600)
        if type(grace) is not int or not 0 <= grace <= MAX_GRACE_SECONDS:
            raise GatewayError("invalid_request", f"grace_seconds must be 0..{MAX_GRACE_SECONDS}.", "grace_seconds")
        secret = keys_mod.generate(id_)
        until = (_now() + timedelta(seconds=grace)).isoformat(timespec="milliseconds")
        fields = {"sha256": keys_mod.digest(secret), "previous_sha256": record["sha256"], "previous_until": until}
        if not self.store.update(id_, fields):
            raise GatewayError("key_not_found", f"No key {id_!r}.")
        audit(actor, "rotate", id_, _version(cfg), team=record.get("team") or None, grace_seconds=grace,
              previous_valid_until=until)
        return {**self.public({**record, **fields}), "key": secret}

    def update(self, cfg: config_mod.GatewayConfig, actor: str, id_: str, data: dict[str, Any]) -> dict[str, Any]:
        record = self._existing(cfg, id_)
        fields = {}
        if "expires_at" in data:
            fields["expires_at"] = _expiry(data["expires_at"])
        if "models" in data:
            fields["models"] = _models(cfg, data["models"])
        if not fields:
            raise GatewayError("invalid_request", "Send expires_at and/or models.")
        if not self.store.update(id_, fields):
            raise GatewayError("key_not_found", f"No key {id_!r}.")
        changed = {k: (json.loads(v) if k == "models" and v else v or None) for k, v in fields.items()}
        audit(actor, "update", id_, _version(cfg), team=record.get("team") or None, **changed)
        return self.public({**record, **fields})


def _version(cfg: config_mod.GatewayConfig | None) -> str | None:
    """The config version the call was checked against, as request records name it."""
    return cfg.digest[:16] if cfg is not None else None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _json(body: bytes) -> dict[str, Any]:
    """The client API's parser (api.parse_json): Python's json let through what no store or
    log line can hold (a lone surrogate escape: the key was written, its audit line failed,
    and the caller got a 503 without the secret) and raised RecursionError, no ValueError, on
    deep nesting."""
    return parse_json(body or b"{}")


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def _models(cfg: config_mod.GatewayConfig, models: Any) -> str:
    if models is None:
        return ""
    if not isinstance(models, list) or not all(isinstance(m, str) and m in cfg.models for m in models):
        raise GatewayError("invalid_request", "models must be a list of model names in values (null: all).", "models")
    return json.dumps(sorted(set(models)))


def _expiry(value: Any) -> str:
    if value is None:
        return ""
    try:
        t = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        t = None
    if t is None:
        raise GatewayError("invalid_request", "expires_at must be ISO 8601, e.g. 2027-01-31T00:00:00Z.", "expires_at")
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()


def store_for(cfg: config_mod.GatewayConfig) -> AdminStore:
    b, admin = cfg.budgets, cfg.identity.key_admin
    assert admin is not None
    if b is not None and b.store == "redis":
        import os

        import redis

        client = redis.Redis.from_url(b.redis_url or "", socket_timeout=2, socket_connect_timeout=2)
        if b.redis_password_env:
            client.connection_pool.connection_kwargs["password"] = os.environ.get(b.redis_password_env)
        return RedisAdminStore(client, b.org)
    assert admin.file is not None
    return FileAdminStore(admin.file)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: a burst of calls from automation (a hundred key
    # creations at once) overflowed it and clients saw connections reset. Queue them instead.
    request_queue_size = 256


def start(config_path: str, cfg: config_mod.GatewayConfig) -> ThreadingHTTPServer:
    """Serve the admin API on identity.keyAdmin.address:port from a daemon thread."""
    admin = cfg.identity.key_admin
    assert admin is not None
    app = AdminApp(config_path, store_for(cfg), cfg)

    class Handler(BaseHTTPRequestHandler):
        server_version = "gateway-extproc-admin"

        def _serve(self) -> None:
            declared = (self.headers.get("content-length") or "0").strip()
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                if not (declared.isascii() and declared.isdigit()):
                    # int() of "abc" raised past this handler (no reply at all), and a negative
                    # length read until the client hung up, holding a thread per connection.
                    self.close_connection = True
                    raise GatewayError("invalid_request", "Content-Length must be a number of bytes.")
                length = int(declared)
                if length > MAX_BODY_BYTES:
                    # Its first 64 KiB were parsed as if they were all: invalid_json about JSON
                    # the caller never sent. The rest is never read, so the connection closes.
                    self.close_connection = True
                    raise GatewayError("request_too_large", f"Admin API bodies may take at most {MAX_BODY_BYTES} "
                                       "bytes.")
                body = self.rfile.read(length) if length else b""
                status, out, content_type = app.handle(self.command, self.path, headers, body, self.client_address[0])
            except GatewayError as err:
                status, out, content_type = err.status, err.body(), JSON
            except Exception:  # a store outage or a bug: the caller gets the OpenAI shape, the log the trace
                log.exception("admin_failed", path=_route(self.path))
                status, out, content_type = 503, error_body(
                    "The key store is unreachable or failed; nothing was changed unless a retry shows it.",
                    "server_error", "key_store_unavailable"), JSON
            self._reply(status, out, content_type)

        def _reply(self, status: int, out: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(out)))
            if self.close_connection:
                self.send_header("connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        def __getattr__(self, name: str) -> Any:
            """Every method is served (AdminApp answers 405 for those it does not take):
            http.server answered one without a `do_` handler with its 501 page in HTML."""
            if name.startswith("do_"):
                return self._serve
            raise AttributeError(name)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """A request http.server cannot parse, in the OpenAI shape. Its own page quoted
            the request line, which may hold a key (in the query string, say): never here."""
            too_long = code in (414, 431)
            err = GatewayError("request_headers_too_large" if too_long else "invalid_request",
                               "The request line or headers are too long." if too_long
                               else f"The request is not valid HTTP/1.1 (HTTP {code}).")
            self.close_connection = True
            if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
                self.request_version = "HTTP/1.0"  # a request line without a version: still a status line
            self._reply(err.status, err.body(), JSON)

        def log_message(self, format: str, *args: Any) -> None:  # audit() logs what matters
            pass

    server = _Server((admin.address, admin.port), Handler)
    threading.Thread(target=server.serve_forever, name="key-admin", daemon=True).start()
    log.info("key_admin_listening", address=admin.address, port=admin.port)
    return server


def admin_token() -> tuple[str, str]:
    """A new admin token and the SHA-256 that goes in values."""
    token = "gwa_" + secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()
