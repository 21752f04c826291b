"""gateway.yaml -> immutable, validated runtime config.

The Helm chart renders gateway.yaml from the same values as envoy.yaml, so names here
(models, backends, providers) always match Envoy's clusters and endpoint metadata.
Validation happens once at load; every error names the file, the key and the fix, and
the hot path only does dictionary lookups on the frozen result.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

PROVIDER_KINDS = ("openai",)
KEY_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """A config problem: message names file, key and fix."""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    kind: str
    base_url: str
    base_path: str  # path prefix of base_url, e.g. "/v1"
    credential_env: str | None
    credential_file: str | None


@dataclass(frozen=True, slots=True)
class Backend:
    id: str  # "<provider>/<model>", the endpoint metadata gw.backend Envoy reports
    provider: Provider
    model: str  # the provider's model name
    priority: int
    weight: int


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    tokenizer: str
    backends: tuple[Backend, ...]

    @property
    def single_backend(self) -> Backend | None:
        """The backend every attempt goes to, when there is only one."""
        return self.backends[0] if len(self.backends) == 1 else None


@dataclass(frozen=True, slots=True)
class VirtualKey:
    id: str
    sha256: str
    team: str
    models: frozenset[str] | None  # None: every model
    expires_at: datetime | None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    source: str
    listen: tuple[str, ...]
    max_request_bytes: int
    providers: dict[str, Provider]
    models: dict[str, Model]
    teams: frozenset[str]
    keys: dict[str, VirtualKey]
    backends: dict[str, Backend] = field(default_factory=dict)
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 0  # 0: no /metrics endpoint


def load(path: str | os.PathLike[str]) -> GatewayConfig:
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found; render it with `gateway-extproc render`") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc}); fix the syntax") from None
    return parse(raw, source)


def parse(raw: Any, source: str = "<config>") -> GatewayConfig:
    r = _Reader(source)
    doc = r.mapping(raw, "")
    if doc.get("version") != 1:
        r.fail("version", "must be 1")
    providers: dict[str, Provider] = {}
    for i, p in enumerate(r.list(doc, "providers")):
        provider = _provider(r, i, p)
        if provider.name in providers:
            r.fail(f"providers[{i}].name", f"duplicates {provider.name!r}; provider names must be unique")
        providers[provider.name] = provider
    models: dict[str, Model] = {}
    for i, m in enumerate(r.list(doc, "models")):
        model = _model(r, i, m, providers)
        if model.name in models:
            r.fail(f"models[{i}].name", f"duplicates {model.name!r}; model names must be unique")
        models[model.name] = model
    teams = frozenset(r.string(r.mapping(t, f"teams[{i}]").get("name"), f"teams[{i}].name")
                      for i, t in enumerate(r.list(doc, "teams")))
    keys: dict[str, VirtualKey] = {}
    for i, k in enumerate(r.list(doc, "keys")):
        key = _key(r, i, k, teams, models)
        if key.id in keys:
            r.fail(f"keys[{i}].id", f"duplicates {key.id!r}; key ids must be unique")
        keys[key.id] = key
    listen = tuple(r.string(a, f"listen[{i}]") for i, a in enumerate(r.list(doc, "listen")))
    if not listen:
        r.fail("listen", "is empty; list at least one unix:///path or host:port")
    max_bytes = doc.get("maxRequestBytes", 10 * 1024 * 1024)
    if not _is_int(max_bytes) or max_bytes <= 0:
        r.fail("maxRequestBytes", "must be a positive integer (bytes)")
    backends = {b.id: b for m in models.values() for b in m.backends}
    metrics = r.mapping(doc.get("metrics") or {}, "metrics")
    port = metrics.get("port", 0)
    if not _is_int(port) or not 0 <= port < 65536:
        r.fail("metrics.port", "must be a port number (0 disables /metrics)")
    address = r.string(metrics.get("address", "0.0.0.0"), "metrics.address")
    return GatewayConfig(source, listen, max_bytes, providers, models, teams, keys, backends, address, port)


def _is_int(value: Any) -> bool:
    """YAML booleans are ints to Python; a config number never is a boolean."""
    return type(value) is int


@cache
def _openai_encodings() -> tuple[str, ...]:
    import bpe_openai

    return tuple(sorted(bpe_openai.list_encoding_names()))


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> None:
        raise ConfigError(f"{self.source}: {key or '<top level>'} {problem}")

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping")
        return value

    def list(self, doc: dict[str, Any], key: str, at: str = "") -> list[Any]:
        value = doc.get(key) or []
        if not isinstance(value, list):
            self.fail(f"{at}.{key}" if at else key, "must be a list")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, "must be a non-empty string")
        return value


def _provider(r: _Reader, i: int, raw: Any) -> Provider:
    at = f"providers[{i}]"
    p = r.mapping(raw, at)
    name = r.string(p.get("name"), f"{at}.name")
    kind = r.string(p.get("kind"), f"{at}.kind")
    if kind not in PROVIDER_KINDS:
        r.fail(f"{at}.kind", f"is {kind!r}; supported kinds: {', '.join(PROVIDER_KINDS)}")
    base_url = r.string(p.get("baseURL"), f"{at}.baseURL")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.fail(f"{at}.baseURL", f"is {base_url!r}; use http(s)://host[:port][/path]")
    cred = r.mapping(p.get("credential"), f"{at}.credential")
    env, file = cred.get("env"), cred.get("file")
    if (env is None) == (file is None):
        r.fail(f"{at}.credential", "must have exactly one of env: VAR or file: /path")
    if env is not None:
        r.string(env, f"{at}.credential.env")
    if file is not None:
        r.string(file, f"{at}.credential.file")
    return Provider(name, kind, base_url, parts.path.rstrip("/"), env, file)


def _model(r: _Reader, i: int, raw: Any, providers: dict[str, Provider]) -> Model:
    at = f"models[{i}]"
    m = r.mapping(raw, at)
    name = r.string(m.get("name"), f"{at}.name")
    tokenizer = r.string(m.get("tokenizer", "estimate"), f"{at}.tokenizer")
    if tokenizer.endswith(".json"):
        if not Path(tokenizer).is_file():
            r.fail(f"{at}.tokenizer", f"is {tokenizer!r}, which is not a readable file; give a local tokenizer.json")
    elif tokenizer != "estimate" and tokenizer not in _openai_encodings():
        r.fail(f"{at}.tokenizer", f"is {tokenizer!r}; use one of {', '.join(_openai_encodings())}, "
               "a path to a tokenizer.json, or estimate")
    backends = []
    for j, b in enumerate(r.list(m, "backends", at)):
        bat = f"{at}.backends[{j}]"
        b = r.mapping(b, bat)
        pname = r.string(b.get("provider"), f"{bat}.provider")
        if pname not in providers:
            r.fail(f"{bat}.provider", f"is {pname!r}, not in providers; add it or fix the name")
        pmodel = r.string(b.get("model"), f"{bat}.model")
        priority, weight = b.get("priority", 0), b.get("weight", 1)
        if not _is_int(priority) or priority < 0:
            r.fail(f"{bat}.priority", "must be an integer >= 0")
        if not _is_int(weight) or weight < 1:
            r.fail(f"{bat}.weight", "must be an integer >= 1")
        backends.append(Backend(f"{pname}/{pmodel}", providers[pname], pmodel, priority, weight))
    if not backends:
        r.fail(f"{at}.backends", "is empty; list at least one {provider, model}")
    return Model(name, tokenizer, tuple(backends))


def _key(r: _Reader, i: int, raw: Any, teams: frozenset[str], models: dict[str, Model]) -> VirtualKey:
    at = f"keys[{i}]"
    k = r.mapping(raw, at)
    key_id = r.string(k.get("id"), f"{at}.id")
    if not KEY_ID.match(key_id):
        r.fail(f"{at}.id", "must be lowercase letters, digits and '-' (max 63)")
    digest = r.string(k.get("sha256"), f"{at}.sha256")
    if not SHA256_HEX.match(digest):
        r.fail(f"{at}.sha256", "must be 64 lowercase hex digits; use `gateway-extproc keys create`")
    team = r.string(k.get("team"), f"{at}.team")
    if team not in teams:
        r.fail(f"{at}.team", f"is {team!r}, not in teams; add it to teams or fix the name")
    allowed = k.get("models", ["*"])
    if not isinstance(allowed, list) or not all(isinstance(x, str) for x in allowed):
        r.fail(f"{at}.models", "must be a list of model names, or [\"*\"] for all")
    for name in allowed:
        if name != "*" and name not in models:
            r.fail(f"{at}.models", f"names {name!r}, which is not in models")
    expires = k.get("expiresAt")
    if isinstance(expires, date) and not isinstance(expires, datetime):
        expires = datetime(expires.year, expires.month, expires.day, tzinfo=timezone.utc)
    if isinstance(expires, str):
        try:
            expires = datetime.fromisoformat(expires)
        except ValueError:
            r.fail(f"{at}.expiresAt", "must be an ISO 8601 timestamp, e.g. 2027-01-31T00:00:00Z")
    if expires is not None:
        if not isinstance(expires, datetime):
            r.fail(f"{at}.expiresAt", "must be an ISO 8601 timestamp, e.g. 2027-01-31T00:00:00Z")
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=timezone.utc)
    return VirtualKey(key_id, digest, team, None if "*" in allowed else frozenset(allowed), expires)
