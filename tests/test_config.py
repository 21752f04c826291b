"""Unit tests for gateway_extproc.config: parsing into frozen objects and every validation."""

from __future__ import annotations

import copy
import re
import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_extproc import config
from gateway_extproc.config import ConfigError

SOURCE = "deploy/gateway.yaml"
DIGEST = "a7baa7e5f53345537bc5793fb8307925150db658ff1cb2781f9208ed483e1a8a"


def valid() -> dict[str, Any]:
    """A complete, valid gateway.yaml document (fresh copy per call)."""
    return copy.deepcopy({
        "version": 1,
        "listen": ["unix:///tmp/gw/extproc-0.sock", "127.0.0.1:9001"],
        "maxRequestBytes": 4096,
        "providers": [
            {"name": "openai", "kind": "openai", "baseURL": "https://api.openai.com/v1/",
             "credential": {"env": "OPENAI_API_KEY"}},
            {"name": "azure", "kind": "openai", "baseURL": "http://azure.example:8443/openai/v1",
             "credential": {"file": "/run/secrets/azure"}},
            {"name": "bare", "kind": "openai", "baseURL": "http://bare.example",
             "credential": {"env": "BARE_KEY"}},
        ],
        "models": [
            {"name": "default-chat", "tokenizer": "o200k_base",
             "backends": [{"provider": "openai", "model": "gpt-4o-mini"}]},
            {"name": "fallback-chat",
             "backends": [
                 {"provider": "openai", "model": "gpt-4o", "priority": 0, "weight": 3},
                 {"provider": "azure", "model": "gpt-4o-azure", "priority": 1},
             ]},
        ],
        "teams": [{"name": "search"}, {"name": "ads"}],
        "keys": [
            {"id": "search-prod", "sha256": DIGEST, "team": "search"},
            {"id": "ads-1", "sha256": "0" * 64, "team": "ads", "models": ["default-chat"],
             "expiresAt": "2027-01-31T00:00:00Z"},
        ],
    })


# -- valid config ------------------------------------------------------------------------


def test_valid_config_parses_into_frozen_objects() -> None:
    cfg = config.parse(valid(), SOURCE)

    assert cfg.source == SOURCE
    assert cfg.listen == ("unix:///tmp/gw/extproc-0.sock", "127.0.0.1:9001")
    assert cfg.max_request_bytes == 4096
    assert set(cfg.teams) == {"search", "ads"}
    assert list(cfg.providers) == ["openai", "azure", "bare"]
    assert list(cfg.models) == ["default-chat", "fallback-chat"]
    assert list(cfg.keys) == ["search-prod", "ads-1"]

    for obj, attr in ((cfg, "source"), (cfg.providers["openai"], "base_url"), (cfg.models["default-chat"], "name"),
                      (cfg.models["default-chat"].backends[0], "model"), (cfg.keys["ads-1"], "team")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, "changed")


@pytest.mark.parametrize(("name", "base_path", "env", "file"), [
    ("openai", "/v1", "OPENAI_API_KEY", None),  # trailing slash stripped
    ("azure", "/openai/v1", None, "/run/secrets/azure"),
    ("bare", "", "BARE_KEY", None),  # no path at all
])
def test_provider_fields(name: str, base_path: str, env: str | None, file: str | None) -> None:
    p = config.parse(valid(), SOURCE).providers[name]
    assert (p.name, p.kind, p.base_path, p.credential_env, p.credential_file) == (name, "openai", base_path, env, file)


def test_models_backends_and_defaults() -> None:
    cfg = config.parse(valid(), SOURCE)
    chat, fallback = cfg.models["default-chat"], cfg.models["fallback-chat"]

    assert chat.tokenizer == "o200k_base"
    assert fallback.tokenizer == "estimate"  # default

    (only,) = chat.backends
    assert only.id == "openai/gpt-4o-mini"
    assert only.provider is cfg.providers["openai"]
    assert (only.model, only.priority, only.weight) == ("gpt-4o-mini", 0, 1)  # defaults

    assert [b.id for b in fallback.backends] == ["openai/gpt-4o", "azure/gpt-4o-azure"]
    assert [(b.priority, b.weight) for b in fallback.backends] == [(0, 3), (1, 1)]

    # Every backend of every model, by id: what Envoy's endpoint metadata names.
    assert set(cfg.backends) == {"openai/gpt-4o-mini", "openai/gpt-4o", "azure/gpt-4o-azure"}
    assert cfg.backends["azure/gpt-4o-azure"] is fallback.backends[1]


def test_key_allows() -> None:
    cfg = config.parse(valid(), SOURCE)
    everything, limited = cfg.keys["search-prod"], cfg.keys["ads-1"]

    assert everything.models is None  # default ["*"]
    assert everything.team == "search" and everything.sha256 == DIGEST
    assert everything.allows("default-chat") and everything.allows("fallback-chat")
    assert everything.allows("anything-at-all")

    assert limited.models == frozenset({"default-chat"})
    assert limited.allows("default-chat")
    assert not limited.allows("fallback-chat")


def test_key_star_among_names_means_every_model() -> None:
    doc = valid()
    doc["keys"][1]["models"] = ["default-chat", "*"]
    assert config.parse(doc, SOURCE).keys["ads-1"].models is None


def test_key_with_empty_model_list_allows_nothing() -> None:
    doc = valid()
    doc["keys"][1]["models"] = []
    key = config.parse(doc, SOURCE).keys["ads-1"]
    assert key.models == frozenset()
    assert not key.allows("default-chat")


UTC = timezone.utc


@pytest.mark.parametrize(("raw", "expected"), [
    ("2027-01-31T00:00:00Z", datetime(2027, 1, 31, tzinfo=UTC)),
    ("2027-01-31T00:00:00+00:00", datetime(2027, 1, 31, tzinfo=UTC)),
    ("2027-01-31T02:00:00+02:00", datetime(2027, 1, 31, tzinfo=UTC)),  # same instant
    ("2027-01-31T00:00:00", datetime(2027, 1, 31, tzinfo=UTC)),  # naive string -> UTC
    ("2027-01-31", datetime(2027, 1, 31, tzinfo=UTC)),  # date-only string -> midnight UTC
    (datetime(2027, 1, 31, 12, 30), datetime(2027, 1, 31, 12, 30, tzinfo=UTC)),  # naive (YAML) -> UTC
    (datetime(2027, 1, 31, tzinfo=timezone(timedelta(hours=-5))),
     datetime(2027, 1, 31, 5, 0, tzinfo=UTC)),
    (None, None),
])
def test_expires_at(raw: Any, expected: datetime | None) -> None:
    doc = valid()
    doc["keys"][0]["expiresAt"] = raw
    expires = config.parse(doc, SOURCE).keys["search-prod"].expires_at
    assert expires == expected
    if expires is not None:
        assert expires.tzinfo is not None  # always comparable with an aware "now"


def test_expires_at_absent_is_none() -> None:
    assert config.parse(valid(), SOURCE).keys["search-prod"].expires_at is None


def test_max_request_bytes_default() -> None:
    doc = valid()
    del doc["maxRequestBytes"]
    assert config.parse(doc, SOURCE).max_request_bytes == 10 * 1024 * 1024


def test_empty_teams_and_keys_are_allowed() -> None:
    doc = valid()
    doc["teams"], doc["keys"] = [], None
    cfg = config.parse(doc, SOURCE)
    assert cfg.teams == {} and cfg.keys == {}


def test_default_source_name() -> None:
    doc = valid()
    doc["version"] = 2
    with pytest.raises(ConfigError, match=r"^<config>: version must be 1$"):
        config.parse(doc)


# -- validation errors -------------------------------------------------------------------

Mutate = Callable[[dict[str, Any]], Any]  # edits a valid document, returns the document to parse


def _set(path: str, value: Any) -> Mutate:
    """A mutation that sets doc[a][b]... (ints index lists) to value."""
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]

    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        for p in parts[:-1]:
            target = target[p]
        target[parts[-1]] = value
        return doc
    return apply


def _del(path: str) -> Mutate:
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]

    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        for p in parts[:-1]:
            target = target[p]
        del target[parts[-1]]
        return doc
    return apply


def _append(path: str, value: Any) -> Mutate:
    def apply(doc: dict[str, Any]) -> dict[str, Any]:
        doc[path].append(copy.deepcopy(value))
        return doc
    return apply


def _replace_doc(value: Any) -> Mutate:
    return lambda doc: value


# (case id, mutation, key path named in the message, words of the problem/fix)
ERRORS: list[tuple[str, Mutate, str, str]] = [
    # parse()
    ("top-level-not-mapping", _replace_doc(["version", 1]), "<top level>", "must be a mapping"),
    ("empty-file", _replace_doc(None), "<top level>", "must be a mapping"),
    ("version-missing", _del("version"), "version", "must be 1"),
    ("version-wrong", _set("version", 2), "version", "must be 1"),
    ("version-string", _set("version", "1"), "version", "must be 1"),
    ("providers-not-list", _set("providers", {"name": "openai"}), "providers", "must be a list"),
    ("provider-duplicate", _append("providers", valid()["providers"][0]), "providers[3].name",
     "duplicates 'openai'; provider names must be unique"),
    ("models-not-list", _set("models", "default-chat"), "models", "must be a list"),
    ("model-duplicate", _append("models", valid()["models"][0]), "models[2].name",
     "duplicates 'default-chat'; model names must be unique"),
    ("teams-not-list", _set("teams", "search"), "teams", "must be a list"),
    ("team-not-mapping", _set("teams.0", "search"), "teams[0]", "must be a mapping"),
    ("team-name-missing", _set("teams.1", {}), "teams[1].name", "must be a non-empty string"),
    ("team-name-empty", _set("teams.0.name", ""), "teams[0].name", "must be a non-empty string"),
    ("team-name-control", _set("teams.0.name", "search\r\nx-evil: 1"), "teams[0].name",
     "is 'search\\r\\nx-evil: 1', which holds '\\r'; names may not hold control characters"),
    ("keys-not-list", _set("keys", {"id": "x"}), "keys", "must be a list"),
    ("key-user-control", _set("keys.0.user", "alice\x1b[2J"), "keys[0].user",
     "is 'alice\\x1b[2J', which holds '\\x1b'; names may not hold control characters"),
    ("key-user-c1", _set("keys.0.user", "alice\x9b2J"), "keys[0].user",
     "is 'alice\\x9b2J', which holds '\\x9b'; names may not hold control characters"),
    ("key-duplicate", _append("keys", valid()["keys"][0]), "keys[2].id",
     "duplicates 'search-prod'; key ids must be unique"),
    ("listen-not-list", _set("listen", "unix:///x.sock"), "listen", "must be a list"),
    ("listen-missing", _del("listen"), "listen", "is empty; list at least one unix:///path or host:port"),
    ("listen-empty", _set("listen", []), "listen", "is empty; list at least one unix:///path or host:port"),
    ("listen-item-not-string", _set("listen.1", 9001), "listen[1]", "must be a non-empty string"),
    ("max-bytes-zero", _set("maxRequestBytes", 0), "maxRequestBytes", "must be a positive integer (bytes)"),
    ("max-bytes-negative", _set("maxRequestBytes", -1), "maxRequestBytes", "must be a positive integer (bytes)"),
    ("max-bytes-string", _set("maxRequestBytes", "10MiB"), "maxRequestBytes",
     "must be a positive integer (bytes)"),
    ("max-bytes-float", _set("maxRequestBytes", 1.5), "maxRequestBytes", "must be a positive integer (bytes)"),
    # _provider()
    ("provider-not-mapping", _set("providers.0", "openai"), "providers[0]", "must be a mapping"),
    ("provider-name-missing", _del("providers.1.name"), "providers[1].name", "must be a non-empty string"),
    ("provider-kind-missing", _del("providers.0.kind"), "providers[0].kind", "must be a non-empty string"),
    ("provider-kind-unsupported", _set("providers.0.kind", "cohere"), "providers[0].kind",
     "is 'cohere'; supported kinds: openai, azure, anthropic, bedrock, gemini"),
    ("provider-azure-api-version", _set("providers.0.kind", "azure"), "providers[0].apiVersion",
     "is required for kind azure"),
    ("provider-bedrock-region", _set("providers.0.kind", "bedrock"), "providers[0].region",
     "is required for kind bedrock"),
    ("provider-option-wrong-kind", _set("providers.0.region", "us-east-1"), "providers[0].region",
     "does not apply to kind openai; remove it"),
    ("provider-gemini-auth", lambda v: _set("providers.0.auth", "oauth")(_set("providers.0.kind", "gemini")(v)),
     "providers[0].auth", "is 'oauth'; use one of apiKey, bearer"),
    ("provider-baseurl-missing", _del("providers.0.baseURL"), "providers[0].baseURL", "must be a non-empty string"),
    ("provider-baseurl-scheme", _set("providers.0.baseURL", "ftp://api.openai.com/v1"), "providers[0].baseURL",
     "is 'ftp://api.openai.com/v1'; use http(s)://host[:port][/path]"),
    ("provider-baseurl-no-host", _set("providers.2.baseURL", "api.openai.com/v1"), "providers[2].baseURL",
     "is 'api.openai.com/v1'; use http(s)://host[:port][/path]"),
    ("provider-credential-missing", _del("providers.0.credential"), "providers[0].credential", "must be a mapping"),
    ("provider-credential-not-mapping", _set("providers.0.credential", "OPENAI_API_KEY"),
     "providers[0].credential", "must be a mapping"),
    ("provider-credential-neither", _set("providers.0.credential", {}), "providers[0].credential",
     "must have exactly one of env: VAR or file: /path"),
    # a key pasted where its variable's name goes: quoted back, it reached the terminal and every log
    ("provider-credential-env-a-key", _set("providers.0.credential", {"env": "sk-proj-S3cret"}),
     "providers[0].credential.env", "must name an environment variable (letters, digits and _, not starting with a "
     "digit), not hold the key; put the key in that variable"),
    ("provider-base-url-userinfo", _set("providers.0.baseURL", "https://user:S3cret@api.openai.com/v1"),
     "providers[0].baseURL", "carries user:password@, which Envoy would send and log as the host; remove it and give "
     "the key through credential"),
    # the gateway builds each request's path from baseURL's path: a query or fragment was dropped
    # without a word; a port out of range passed here and Envoy refused to start
    ("provider-base-url-query", _set("providers.0.baseURL", "https://api.openai.com/v1?org=a"),
     "providers[0].baseURL", "has a query or fragment, which the gateway never sends; remove it (kind azure takes "
     "apiVersion)"),
    ("provider-base-url-fragment", _set("providers.0.baseURL", "https://api.openai.com/v1#a"),
     "providers[0].baseURL", "has a query or fragment, which the gateway never sends; remove it (kind azure takes "
     "apiVersion)"),
    ("provider-base-url-port", _set("providers.0.baseURL", "http://vllm.internal:65536/v1"),
     "providers[0].baseURL", "has port 65536; a port is 1-65535"),
    ("provider-base-url-port-0", _set("providers.0.baseURL", "http://vllm.internal:0/v1"),
     "providers[0].baseURL", "has port 0; a port is 1-65535"),
    ("backend-model-newline", _set("models.0.backends.0.model", "gpt\nx"), "models[0].backends[0].model",
     "is 'gpt\\nx', which holds '\\n'; names may not hold control characters"),
    # the Redis client refused these when the store was built at start, or read db 0 for "budgets"
    ("redis-url-scheme", lambda d: d.update(budgets={"store": "redis", "redis": {"url": "redis-master:6379"}}) or d,
     "budgets.redis.url", "is not a Redis URL; use redis://host:port/db, rediss://... or unix:///path"),
    ("redis-url-port", lambda d: d.update(budgets={"store": "redis", "redis": {"url": "redis://r:99999/0"}}) or d,
     "budgets.redis.url", "has port 99999; a port is 1-65535"),
    ("redis-url-db", lambda d: d.update(budgets={"store": "redis", "redis": {"url": "redis://r:6379/budgets"}}) or d,
     "budgets.redis.url", "names database 'budgets'; a Redis database is a number (redis://host:port/0)"),
    # one provider/model twice in a model: one Envoy endpoint id, the second's pricing never used
    ("backend-duplicate", lambda d: d["models"][1]["backends"].append({"provider": "openai", "model": "gpt-4o"}) or d,
     "models[1].backends[2]", "is 'openai/gpt-4o' again (backends[0]); a backend is known by provider/model, so "
     "list each once"),
    # a Gemini key in the query, as Google's docs show it: the query is never sent (the base path
    # is), but the key was copied into the audit trail's config copies, and quoted back by the
    # scheme error when the scheme was mistyped too
    ("provider-base-url-query-key", _set("providers.0.baseURL", "https://gl.example/v1beta?key=AIzaS3cretS3cret"),
     "providers[0].baseURL", "carries a credential in its query (key=), which would be copied into the audit "
     "trail's copies of each config version; remove it and give the key through credential"),
    ("provider-base-url-query-key-bad-scheme", _set("providers.0.baseURL", "htps://az.example/openai?api-key=S3cret"),
     "providers[0].baseURL", "carries a credential in its query (api-key=), which would be copied into the audit "
     "trail's copies of each config version; remove it and give the key through credential"),
    # a second entry of one name replaced the first, budget and all: a team left unlimited
    ("team-duplicate", _append("teams", {"name": "search"}), "teams[2].name",
     "duplicates 'search'; team names must be unique"),
    ("user-duplicate", _set("users", [{"name": "u"}, {"name": "u"}]),
     "users[1].name", "duplicates 'u'; user names must be unique"),
    ("provider-credential-both", _set("providers.1.credential", {"env": "A", "file": "/b"}),
     "providers[1].credential", "must have exactly one of env: VAR or file: /path"),
    # _model()
    ("model-not-mapping", _set("models.0", "default-chat"), "models[0]", "must be a mapping"),
    ("model-name-missing", _del("models.1.name"), "models[1].name", "must be a non-empty string"),
    # `chat@restricted` would collide with the route of model chat's restricted-tier backends.
    ("model-name-at", _set("models.1.name", "chat@restricted"), "models[1].name",
     "is 'chat@restricted', which holds '@'; names may not hold control characters or any of @"),
    ("model-name-newline", _set("models.0.name", "chat\n"), "models[0].name",
     "is 'chat\\n', which holds '\\n'; names may not hold control characters or any of @"),
    ("tier-name-at", _set("classification", {"tiers": ["public", "top@secret"]}), "classification.tiers[1]",
     "is 'top@secret', which holds '@'; names may not hold control characters or any of @"),
    ("provider-name-control", _set("providers.0.name", "open\x7fai"), "providers[0].name",
     "is 'open\\x7fai', which holds '\\x7f'; names may not hold control characters"),
    ("model-tokenizer-not-string", _set("models.0.tokenizer", 200), "models[0].tokenizer",
     "must be a non-empty string"),
    ("model-tokenizer-empty", _set("models.0.tokenizer", ""), "models[0].tokenizer", "must be a non-empty string"),
    # bpe-openai knows gpt2 but would download it on first use: only bundled encodings load
    ("model-tokenizer-not-bundled", _set("models.0.tokenizer", "gpt2"), "models[0].tokenizer",
     "is 'gpt2'; use one of cl100k_base, o200k_base, voyage3_base, a path to a tokenizer.json, or estimate"),
    ("model-backends-missing", _del("models.0.backends"), "models[0].backends",
     "is empty; list at least one {provider, model}"),
    ("model-backends-empty", _set("models.1.backends", []), "models[1].backends",
     "is empty; list at least one {provider, model}"),
    ("backend-not-mapping", _set("models.1.backends.1", "azure/gpt-4o"), "models[1].backends[1]",
     "must be a mapping"),
    ("backend-provider-missing", _del("models.1.backends.1.provider"), "models[1].backends[1].provider",
     "must be a non-empty string"),
    ("backend-provider-unknown", _set("models.1.backends.1.provider", "azuer"), "models[1].backends[1].provider",
     "is 'azuer', not in providers; add it or fix the name"),
    ("backend-model-missing", _del("models.0.backends.0.model"), "models[0].backends[0].model",
     "must be a non-empty string"),
    ("backend-priority-negative", _set("models.1.backends.0.priority", -1), "models[1].backends[0].priority",
     "must be an integer >= 0"),
    ("backend-priority-string", _set("models.1.backends.0.priority", "high"), "models[1].backends[0].priority",
     "must be an integer >= 0"),
    ("backend-weight-zero", _set("models.1.backends.0.weight", 0), "models[1].backends[0].weight",
     "must be an integer >= 1"),
    ("backend-weight-float", _set("models.1.backends.0.weight", 0.5), "models[1].backends[0].weight",
     "must be an integer >= 1"),
    # _key()
    ("key-not-mapping", _set("keys.0", "search-prod"), "keys[0]", "must be a mapping"),
    ("key-id-missing", _del("keys.0.id"), "keys[0].id", "must be a non-empty string"),
    ("key-id-uppercase", _set("keys.1.id", "Ads-1"), "keys[1].id",
     "must be lowercase letters, digits and '-' (max 63)"),
    ("key-id-underscore", _set("keys.1.id", "ads_1"), "keys[1].id",
     "must be lowercase letters, digits and '-' (max 63)"),
    ("key-id-leading-dash", _set("keys.1.id", "-ads"), "keys[1].id",
     "must be lowercase letters, digits and '-' (max 63)"),
    ("key-id-too-long", _set("keys.1.id", "a" * 64), "keys[1].id",
     "must be lowercase letters, digits and '-' (max 63)"),
    # (`$` matched before a final newline, which a YAML `|` block scalar ends in: accepted,
    # the key never matched)
    ("key-sha256-final-newline", _set("keys.0.sha256", DIGEST + "\n"), "keys[0].sha256",
     "must be 64 lowercase hex digits; use `gateway-extproc keys create`"),
    ("key-sha256-missing", _del("keys.0.sha256"), "keys[0].sha256", "must be a non-empty string"),
    ("key-sha256-short", _set("keys.0.sha256", DIGEST[:-1]), "keys[0].sha256",
     "must be 64 lowercase hex digits; use `gateway-extproc keys create`"),
    ("key-sha256-uppercase", _set("keys.0.sha256", DIGEST.upper()), "keys[0].sha256",
     "must be 64 lowercase hex digits; use `gateway-extproc keys create`"),
    ("key-sha256-raw-key", _set("keys.0.sha256", "gwk_demo_secret"), "keys[0].sha256",
     "must be 64 lowercase hex digits; use `gateway-extproc keys create`"),
    ("key-team-missing", _del("keys.0.team"), "keys[0].team", "must be a non-empty string"),
    ("key-team-unknown", _set("keys.0.team", "serach"), "keys[0].team",
     "is 'serach', not in teams; add it to teams or fix the name"),
    ("key-models-not-list", _set("keys.1.models", "default-chat"), "keys[1].models",
     'must be a list of model names, or ["*"] for all'),
    ("key-models-null", _set("keys.1.models", None), "keys[1].models",
     'must be a list of model names, or ["*"] for all'),
    ("key-models-non-string", _set("keys.1.models", ["default-chat", 7]), "keys[1].models",
     'must be a list of model names, or ["*"] for all'),
    ("key-models-unknown", _set("keys.1.models", ["default-chat", "gpt-5"]), "keys[1].models",
     "names 'gpt-5', which is not in models"),
    ("key-expires-bad-string", _set("keys.1.expiresAt", "next tuesday"), "keys[1].expiresAt",
     "must be an ISO 8601 timestamp, e.g. 2027-01-31T00:00:00Z"),
    ("key-expires-number", _set("keys.1.expiresAt", 1800000000), "keys[1].expiresAt",
     "must be an ISO 8601 timestamp, e.g. 2027-01-31T00:00:00Z"),
    ("budget-beyond-exact", _set("teams.0.budget", {"daily": 10_000_000}), "teams[0].budget.daily",
     "must be a dollar amount from 0 to 9000000 (budgets are exact integers of nano-dollars)"),
]


@pytest.mark.parametrize(("mutate", "key", "fix"), [pytest.param(m, k, f, id=i) for i, m, k, f in ERRORS])
def test_validation_error_names_file_key_and_fix(mutate: Mutate, key: str, fix: str,
                                                 document: Callable[[], dict[str, Any]] = valid) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(mutate(document()), SOURCE)
    assert str(info.value) == f"{SOURCE}: {key} {fix}"


@pytest.mark.parametrize("url", ["redis://:s3cret@r:6379/0", "redis://app:s3cret@r:6379/0",
                                 "redis://r:6379/0?password=s3cret"])
def test_a_password_in_the_budget_store_url_is_refused_without_quoting_it(url: str) -> None:
    """A hand-written gateway.yaml too (the chart's render refuses it already): the file is
    copied into the audit trail."""
    doc = valid()
    doc["budgets"] = {**(doc.get("budgets") or {}), "store": "redis", "redis": {"url": url}}
    with pytest.raises(ConfigError) as info:
        config.parse(doc, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: budgets.redis.url carries a password") and "s3cret" not in str(info.value)
    doc["budgets"]["redis"] = {"url": "redis://app@r:6379/0", "passwordEnv": "REDIS_PASSWORD"}
    assert config.parse(doc, SOURCE).budgets.redis_url == "redis://app@r:6379/0"


@pytest.mark.parametrize("where", ["budgets.redis", "audit.redisStream"])
def test_a_password_where_its_variables_name_goes_is_refused_without_quoting_it(where: str) -> None:
    """The password itself pasted as `passwordEnv` (as a provider key as `credential.env`):
    it was accepted, so it went into gateway.yaml (the chart's ConfigMap) and the audit trail's
    copies of each config version, and the store was reached with no password at all."""
    password = "Sup3r-S3cret:Redis/Passw0rd!"
    doc = identity_audit_classification()
    if where == "budgets.redis":
        doc["budgets"] = {**(doc.get("budgets") or {}), "store": "redis",
                          "redis": {"url": "redis://r:6379/0", "passwordEnv": password}}
    else:
        doc["audit"]["redisStream"]["passwordEnv"] = password
    with pytest.raises(ConfigError) as info:
        config.parse(doc, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: {where}.passwordEnv must name an environment variable")
    assert password not in str(info.value) and "S3cret" not in str(info.value)
    # and the chart's render (values → the ConfigMap's gateway.yaml) refuses it, unquoted, too
    from gateway_extproc.render import RenderError, chart_values, render_values

    values = chart_values([REPO / "helm" / "values-local.yaml"])
    if where == "budgets.redis":
        values["budgets"] = {**values["budgets"], "devMemoryStore": False, "store": "redis",
                             "redis": {"url": "redis://r:6379/0", "passwordEnv": password}}
    else:
        values["audit"]["redisStream"] = {"url": "redis://r:6379/0", "passwordEnv": password}
    with pytest.raises(RenderError) as refused:
        render_values(values)
    assert f"{where}.passwordEnv" in str(refused.value) and "S3cret" not in str(refused.value)


@pytest.mark.parametrize("url", ["https://idp.example/keys?token=JwksS3cretT0ken99",
                                 "https://svc:JwksS3cretT0ken99@idp.example/keys"])
def test_a_credential_in_a_remote_jwks_url_is_refused_without_quoting_it(url: str) -> None:
    """As for a provider's baseURL and the Redis URLs: a token or password in the remote JWKS
    URL went into the ConfigMap (envoy.yaml and gateway.yaml) and the audit trail's copies of
    each config version; Envoy does not even send a URL's user:password."""
    from gateway_extproc.render import RenderError, chart_values, render_values

    doc = identity_audit_classification()
    doc["identity"]["oidc"]["providers"][0]["jwks"]["remote"]["url"] = url
    with pytest.raises(ConfigError) as info:
        config.parse(doc, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: identity.oidc.providers[0].jwks.remote.url carries a credential")
    assert "S3cret" not in str(info.value)
    values = chart_values([REPO / "helm" / "values-local.yaml"])
    values["identity"] = {"oidc": {"providers": [{"name": "corp", "issuer": "https://idp.example", "audiences": ["gw"],
                                                  "jwks": {"remote": {"url": url}}, "defaultTeam": "demo"}]}}
    with pytest.raises(RenderError) as refused:
        render_values(values)
    assert "identity.oidc.providers[0].jwks.remote.url" in str(refused.value) and "S3cret" not in str(refused.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_backends_not_a_list_names_full_key_path() -> None:
    doc = valid()
    doc["models"][0]["backends"] = {"provider": "openai", "model": "gpt-4o-mini"}
    with pytest.raises(ConfigError) as info:
        config.parse(doc, SOURCE)
    assert str(info.value) == f"{SOURCE}: models[0].backends must be a list"


@pytest.mark.parametrize("mutate", [
    _set("maxRequestBytes", True),
    _set("models.1.backends.0.weight", True),
    _set("models.1.backends.0.priority", False),
], ids=["maxRequestBytes", "weight", "priority"])
def test_booleans_are_not_integers(mutate: Mutate) -> None:
    with pytest.raises(ConfigError):
        config.parse(mutate(valid()), SOURCE)


def test_credential_source_must_be_a_string() -> None:
    doc = valid()
    doc["providers"][0]["credential"] = {"env": 123}
    with pytest.raises(ConfigError, match=r"providers\[0\]\.credential"):
        config.parse(doc, SOURCE)


# -- load() ------------------------------------------------------------------------------


def test_load_valid_file_uses_path_as_source(tmp_path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        """
version: 1
listen: [unix:///tmp/gw.sock]
providers:
  - {name: openai, kind: openai, baseURL: "https://api.openai.com/v1", credential: {env: OPENAI_API_KEY}}
models:
  - name: default-chat
    backends: [{provider: openai, model: gpt-4o-mini}]
teams: [{name: t}]
keys:
  - id: k
    sha256: %s
    team: t
    expiresAt: 2027-01-31T00:00:00Z
  - id: naive
    sha256: %s
    team: t
    expiresAt: 2027-01-31 08:00:00
""" % (DIGEST, DIGEST), encoding="utf-8")
    cfg = config.load(path)
    assert cfg.source == str(path)
    assert cfg.backends["openai/gpt-4o-mini"].model == "gpt-4o-mini"
    # YAML's own timestamps: aware stays aware, naive is taken as UTC.
    assert cfg.keys["k"].expires_at == datetime(2027, 1, 31, tzinfo=UTC)
    assert cfg.keys["naive"].expires_at == datetime(2027, 1, 31, 8, tzinfo=UTC)


def test_load_error_names_the_file(tmp_path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("version: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: version must be 1"


def test_load_missing_file(tmp_path) -> None:
    path = tmp_path / "nope" / "gateway.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: file not found; render it with `gateway-extproc render`"


@pytest.mark.parametrize("text", [
    "version: 1\nlisten: [unix:///x\n",  # unclosed flow sequence
    "version: 1\n  providers: [\n",  # bad indentation
    "a: 'unterminated\n",
])
def test_load_invalid_yaml(tmp_path, text: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML (")
    assert message.endswith("); fix the syntax")


def test_load_empty_file(tmp_path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == (f"{path}: is empty (truncated, or still being written?); render it with "
                               "`gateway-extproc render`")


def test_checked_in_render_is_valid() -> None:
    cfg = config.load(Path(__file__).resolve().parents[1] / "envoy" / "gateway.yaml")
    assert cfg.models and cfg.providers and cfg.backends


# -- classification settings: every mistake is a config error naming its key --------------

def classified() -> dict[str, Any]:
    """valid() with every classification setting in use (docs/classification.md's example)."""
    doc = valid()
    for model in doc["models"]:
        for backend in model["backends"]:
            backend["maxTier"] = "internal"
    doc["classification"] = {
        "tiers": ["public", "internal", "confidential", "restricted"], "mode": "enforce", "defaultTier": "public",
        "rules": {"email": {"action": "redact", "minTier": "internal"}, "ipv4": {"action": "monitor"},
                  "credit_card": {"critical": True}},
        "custom": [{"name": "project-falcon", "kind": "keywords", "keywords": ["falcon", "project falcon"],
                    "action": "block", "minTier": "restricted", "critical": True},
                   {"name": "employee-id", "kind": "regex", "pattern": "EMP-[0-9]{6}", "action": "redact",
                    "minTier": "confidential", "ignoreCase": True}],
        "injection": {"threshold": 1.0, "phrases": {"pretend you have no rules": 1.0}, "includeDefaults": True},
        "allowlist": [{"value": "support@example.com", "rules": ["email"], "reason": "public support address"},
                      {"pattern": "EMP-0000[0-9]{2}", "reason": "test fixtures"}],
        "outputScanning": {"enabled": True, "holdbackChars": 64}, "contentLogging": {"maxTier": "internal"}}
    return doc


def _runtime(doc: dict[str, Any]) -> Any:
    from gateway_extproc.runtime import Runtime

    return Runtime.from_config(config.parse(doc, SOURCE, local_files=False))


def test_every_classification_setting_loads() -> None:
    policy = _runtime(classified()).policy
    assert policy is not None and policy.scan_every_key
    assert set(policy.scanner.rules) >= {"project-falcon", "employee-id", "email"}


CLASSIFICATION_ERRORS = [
    ("tiers-not-list", _set("classification.tiers", 1.5), "classification.tiers",
     "must be a list of distinct names, lowest first"),
    ("tiers-mapping-item", _set("classification.tiers", [{"a": 1}]), "classification.tiers",
     "must be a list of distinct names, lowest first"),
    ("rule-action-null", _set("classification.rules.email.action", None), "classification.rules.email.action",
     "must be monitor, redact or block"),
    ("rule-misspelt", _set("classification.rules.emial", {"action": "block"}), "classification.rules.emial",
     "is no built-in rule (private_key, jwt, anthropic_key, openai_key, gateway_key, gateway_admin_token, "
     "github_token, aws_access_key, service_token, credit_card, us_ssn, iban, email, phone, ipv4, ipv6, prompt_injection); a rule of your "
     "own goes under classification.custom; did you mean email?"),
    ("rule-setting-misspelt", _set("classification.rules.email.min_tier", "restricted"),
     "classification.rules.email.min_tier", "is no setting here (action, minTier, critical); did you mean minTier?"),
    ("rule-critical-string", _set("classification.rules.email.critical", "yes"),
     "classification.rules.email.critical", "must be true or false"),
    ("custom-keywords-string", _set("classification.custom.0.keywords", "falcon"),
     "classification.custom[0].keywords", "must be a list of words or phrases"),
    ("custom-keywords-number", _set("classification.custom.0.keywords", [1]),
     "classification.custom[0].keywords", "must be a list of words or phrases"),
    ("custom-kind", _set("classification.custom.1.kind", "glob"), "classification.custom[1].kind",
     "is 'glob'; use regex (with pattern) or keywords (with keywords)"),
    ("custom-no-pattern", _del("classification.custom.1.pattern"), "classification.custom[1].pattern",
     "must be a non-empty string"),
    ("custom-built-in-name", _set("classification.custom.0.name", "email"), "classification.custom[0].name",
     "is 'email', a built-in rule's name; override it under classification.rules"),
    ("custom-min-tier", _set("classification.custom.0.minTier", "secret"), "classification.custom[0].minTier",
     "must be one of public, internal, confidential, restricted"),
    ("custom-ignore-case", _set("classification.custom.1.ignoreCase", "true"), "classification.custom[1].ignoreCase",
     "must be true or false"),
    ("injection-threshold", _set("classification.injection.threshold", "x"), "classification.injection.threshold",
     "must be a number above 0"),
    ("injection-phrase-weight", _set("classification.injection.phrases", {"a": "b"}),
     "classification.injection.phrases", "must map each text to a number (its weight)"),
    ("injection-patterns-list", _set("classification.injection.patterns", ["("]),
     "classification.injection.patterns", "must be a mapping"),
    ("allowlist-rules-string", _set("classification.allowlist.0.rules", "email"),
     "classification.allowlist[0].rules", "must be a list of rule names (empty or absent: every rule)"),
    ("allowlist-value-number", _set("classification.allowlist.0.value", 5), "classification.allowlist[0].value",
     "must be a non-empty string"),
    ("allowlist-both", _set("classification.allowlist.1.value", "EMP-000001"), "classification.allowlist[1]",
     "needs exactly one of value (the exact text) or pattern (a regex it must match whole)"),
]


@pytest.mark.parametrize(("mutate", "key", "fix"),
                         [pytest.param(m, k, f, id=i) for i, m, k, f in CLASSIFICATION_ERRORS])
def test_classification_error_names_file_key_and_fix(mutate: Mutate, key: str, fix: str) -> None:
    test_validation_error_names_file_key_and_fix(mutate, key, fix, classified)


def test_own_tier_names_need_a_tier_for_each_built_in_rule() -> None:
    """docs/classification.md: tier names are yours. The built-in rules name default tiers;
    with other names only the operator knows where their data may go, so the load says which
    rules need one (it was a ValueError traceback at start-up)."""
    doc = classified()
    doc["classification"] = {"tiers": ["open", "secret"], "contentLogging": {"maxTier": "open"}}
    for model in doc["models"]:
        for backend in model["backends"]:
            backend["maxTier"] = "secret"
    with pytest.raises(ConfigError) as info:
        _runtime(doc)
    assert str(info.value).startswith(f"{SOURCE}: classification.rules: the built-in rules iban, email, phone, ipv4, "
                                      "ipv6 keep")
    assert "give each a minTier of yours (classification.rules.<name>.minTier)" in str(info.value)
    below_top = ("iban", "email", "phone", "ipv4", "ipv6")
    doc["classification"]["rules"] = {name: {"minTier": "open"} for name in below_top}
    policy = _runtime(doc).policy
    assert policy.rank == {"open": 0, "secret": 1}
    # The rules at the top default tier (credentials, cards, SSNs) take the top of yours: a
    # built-in rule added since (gateway_admin_token, 2026-12-05) does not stop a config that
    # named a tier for every rule it knew.
    tiers = {name: r.min_tier for name, r in policy.scanner.rules.items()}
    top = ("private_key", "gateway_key", "gateway_admin_token", "credit_card", "us_ssn")
    assert {tiers[n] for n in top} == {"secret"}
    assert {tiers[n] for n in below_top} == {"open"}


def test_a_pattern_the_scanner_cannot_compile_is_a_config_error() -> None:
    doc = classified()
    doc["classification"]["custom"][1]["pattern"] = "EMP-("
    with pytest.raises(ConfigError) as info:
        _runtime(doc)
    assert str(info.value).startswith(f"{SOURCE}: custom rule 'employee-id': invalid regex")


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [at] if at else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found += _paths(child, (*at, key))
    return found


_ODD = [None, 0, -1, 2**70, 1.5, float("nan"), True, "", " ", "x", "-1", "*", "a@b", "\x00", [], [None], ["x"],
        {}, {"x": 1}, [{}], "a" * 300]


@given(edits=st.lists(st.tuples(st.sampled_from(_paths(classified())), st.sampled_from([*_ODD, "<delete>"])),
                      min_size=1, max_size=3))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_edit_loads_or_is_a_config_error_naming_the_file(edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    """The invariant behind "errors name the file, key and fix": whatever a hand edit puts
    anywhere in gateway.yaml, loading it (the parse and the runtime it builds: rules compiled,
    tiers placed) either works or raises ConfigError naming the file, never another exception
    (a TypeError or AttributeError from deep inside was a traceback at start-up)."""
    doc = classified()
    for path, value in edits:
        parent: Any = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if value == "<delete>":
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced this branch
    try:
        _runtime(doc)
    except ConfigError as exc:
        assert str(exc).startswith(f"{SOURCE}: ")


def test_cache_write_prices_parse_default_and_name_their_key_when_wrong() -> None:
    """Unnamed, a Claude backend's (anthropic, bedrock) cache writes cost Anthropic's 1.25x
    (5 minutes) and 2x (1 hour) its input price, any other's its input price."""
    doc = valid()
    doc["providers"].append({"name": "claude", "kind": "anthropic", "baseURL": "https://api.anthropic.com/v1",
                             "credential": {"env": "ANTHROPIC_API_KEY"}})
    doc["models"][0]["backends"] = [
        {"provider": "claude", "model": "claude-sonnet-4-5", "pricing": {
            "input": 3, "output": 15, "cacheWrite1h": 5,
            "longContext": {"above": 200000, "input": 6, "output": 22.5, "cacheWrite": 7}}},
        {"provider": "openai", "model": "gpt-4o-mini", "priority": 1,
         "pricing": {"input": 0.15, "output": 0.6, "cacheWrite": 0.2}}]
    claude, gpt = (b.price for b in config.parse(doc, SOURCE).models["default-chat"].backends)
    assert (claude.cache_write, claude.cache_write_1h) == (3750, 5000)
    assert (claude.long_context[1].cache_write, claude.long_context[1].cache_write_1h) == (7000, 12000)
    assert (gpt.cache_write, gpt.cache_write_1h) == (200, 150)
    doc["models"][0]["backends"][0]["pricing"] = {"input": 3, "output": 15, "cacheWrite": "1.25x"}
    with pytest.raises(ConfigError, match=r"models\[0\]\.backends\[0\]\.pricing\.cacheWrite must be a number >= 0"):
        config.parse(doc, SOURCE)


def test_a_tokenizer_json_that_does_not_load_is_a_config_error(tmp_path: Path) -> None:
    """check-config said OK and `serve` then died with a traceback from `tokenizers`."""
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    doc = valid()
    doc["models"][0]["tokenizer"] = str(bad)
    with pytest.raises(ConfigError) as info:
        config.parse(doc, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: models[0].tokenizer is {str(bad)!r}, which does not load as a "
                                      "Hugging Face tokenizer.json (")
    config.parse(doc, SOURCE, local_files=False)  # `render` for another machine does not read it


@pytest.mark.parametrize(("path", "typo", "fix"), [
    ("", "maxRequestByte", "maxRequestBytes"),
    ("metrics", "prot", "port"),
    ("providers.0", "baseUrl", "baseURL"),
    ("providers.0.credential", "evn", "env"),
    ("models.0", "maxOutputToken", "maxOutputTokens"),
    ("models.1.backends.0", "prority", "priority"),
    ("teams.0", "budegt", "budget"),
    ("keys.1", "expireAt", "expiresAt"),
    ("keys.1", "model", "models"),
], ids=lambda x: x if isinstance(x, str) and x else None)
def test_a_misspelt_setting_in_gateway_yaml_is_refused_not_ignored(path: str, typo: str, fix: str) -> None:
    """Settings are looked up by name, so a misspelt one did nothing: `expireAt` left a key
    that never expired, `budegt` a team without a limit. check-config, serve and a reload
    accepted the file."""
    doc = valid()
    node: Any = doc
    for part in path.split(".") if path else []:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[typo] = node.get(fix, 1)
    at = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split(".")).lstrip(".") if path else ""
    with pytest.raises(ConfigError) as info:
        config.parse(doc, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: {at + '.' if at else ''}{typo} is no setting here (")
    assert str(info.value).endswith(f"; did you mean {fix}?")


def test_misspelt_settings_deeper_in_are_refused() -> None:
    for edit, key in [
        (lambda d: d["models"][0]["backends"][0].__setitem__("pricing", {"input": 1, "output": 1, "cachedinput": 1}),
         "models[0].backends[0].pricing.cachedinput"),
        (lambda d: d["models"][0]["backends"][0].__setitem__("pricing", {
            "input": 1, "output": 1, "longContext": {"above": 1, "input": 2, "ouput": 2}}),
         "models[0].backends[0].pricing.longContext.ouput"),
        (lambda d: d["teams"][0].__setitem__("budget", {"dayly": 5}), "teams[0].budget.dayly"),
        (lambda d: d["teams"][0].__setitem__("rateLimits", {"requestPerMinute": 5}), "teams[0].rateLimits.requestPerMinute"),
        (lambda d: d["teams"][0].__setitem__("rateLimits", {"models": {"default-chat": {"tokensPerMin": 5}}}),
         "teams[0].rateLimits.models.default-chat.tokensPerMin"),
        (lambda d: d.__setitem__("users", [{"name": "u", "budget": {"daily": 1}, "rate": 1}]), "users[0].rate"),
        (lambda d: d.__setitem__("budgets", {"stor": "redis"}), "budgets.stor"),
        (lambda d: d.__setitem__("budgets", {"store": "redis", "redis": {"url": "redis://r:6379/0", "password": "x"}}),
         "budgets.redis.password"),
        (lambda d: d.__setitem__("budgets", {"orgLimit": {"daily": 1, "sof": 0.5}}), "budgets.orgLimit.sof"),
    ]:
        doc = valid()
        edit(doc)
        with pytest.raises(ConfigError, match=rf"^{SOURCE}: {re.escape(key)} is no setting here \("):
            config.parse(doc, SOURCE)


def identity_audit_classification() -> dict[str, Any]:
    """valid() with identity and audit sections using every setting, and classified()'s classification."""
    doc = valid()
    doc["listen"] = doc["listen"][:1]
    doc["budgets"] = {"store": "memory"}
    for model in doc["models"]:
        for backend in model["backends"]:
            backend.update(maxTier="internal", pricing={"input": 1, "output": 1})
    doc["identity"] = {
        "workloads": {"trustDomains": ["cluster.local"], "trustedProxies": ["127.0.0.6/32"],
                      "principals": [{"name": "pay", "spiffe": "spiffe://cluster.local/ns/pay/sa/*", "team": "search",
                                      "user": "pay-bot", "models": ["default-chat"], "budget": {"daily": 5},
                                      "rateLimits": {"requestsPerMinute": 10},
                                      "classification": {"defaultTier": "internal"}}]},
        "oidc": {"providers": [{"name": "corp", "issuer": "https://idp.example", "audiences": ["gw"],
                                "jwks": {"remote": {"url": "https://idp.example/keys", "cacheDuration": "600s",
                                                    "timeout": "5s"}},
                                "userClaim": "email", "teamClaim": "team", "teams": {"eng-search": "search"},
                                "defaultTeam": "ads", "models": ["*"], "clockSkewSeconds": 60}]},
        "keyAdmin": {"enabled": True, "address": "127.0.0.1", "port": 9190, "file": "/var/lib/gw/keys.json",
                     "admins": [{"name": "ops", "sha256": "1" * 64}]},
    }
    doc["classification"] = classified()["classification"]
    doc["audit"] = {"enabled": True, "dir": "/var/lib/gateway-audit", "signingKeyFile": "/etc/audit/signing.key",
                    "instance": "", "checkpointSeconds": 10, "fsync": "interval", "fsyncIntervalSeconds": 1,
                    "queueSize": 10000, "segmentBytes": 67108864, "segmentSeconds": 3600,
                    "retention": {"days": 365, "tiers": {"restricted": 2555}},
                    "redisStream": {"url": "redis://r:6379/0", "key": "gw:audit", "maxLen": 1000,
                                    "passwordEnv": "AUDIT_REDIS_PASSWORD"}}
    return doc


def test_every_identity_audit_and_classification_setting_loads() -> None:
    cfg = config.parse(identity_audit_classification(), SOURCE)
    assert cfg.identity.key_admin is not None and set(cfg.identity.oidc) == {"corp"}
    assert cfg.audit is not None and cfg.audit.redis is not None and cfg.classification is not None


@pytest.mark.parametrize(("path", "typo", "fix"), [
    ("identity", "workload", "workloads"),
    ("identity.workloads", "trustedProxy", "trustedProxies"),
    ("identity.workloads.principals.0", "budegt", "budget"),
    ("identity.oidc", "provider", "providers"),
    ("identity.oidc.providers.0", "teamclaim", "teamClaim"),
    ("identity.oidc.providers.0", "defaultteam", "defaultTeam"),
    ("identity.oidc.providers.0.jwks", "remot", "remote"),
    ("identity.oidc.providers.0.jwks.remote", "timout", "timeout"),
    ("identity.keyAdmin", "enable", "enabled"),
    ("identity.keyAdmin", "admin", "admins"),
    ("identity.keyAdmin.admins.0", "sha265", "sha256"),
    ("audit", "signingKeyfile", "signingKeyFile"),
    ("audit", "retension", "retention"),
    ("audit.retention", "tier", "tiers"),
    ("audit.redisStream", "maxlen", "maxLen"),
    ("classification", "defaulTier", "defaultTier"),
    ("classification", "allowList", "allowlist"),
    ("classification.outputScanning", "holdbackChar", "holdbackChars"),
    ("classification.contentLogging", "maxtier", "maxTier"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_a_misspelt_identity_audit_or_classification_setting_is_refused(path: str, typo: str, fix: str) -> None:
    """These sections took any key, so a typo did nothing: `teamclaim` left an OIDC issuer
    mapping every caller to its default team, `retension` kept audit events for the default
    365 days, `defaulTier` let every prompt in at the lowest tier."""
    doc = identity_audit_classification()
    node: Any = doc
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    node[typo] = node.pop(fix)
    at = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split(".")).lstrip(".")
    with pytest.raises(ConfigError) as info:
        config.parse(doc, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: {at}.{typo} is no setting here (")
    assert str(info.value).endswith(f"; did you mean {fix}?")


def test_a_misspelt_setting_in_a_section_that_is_off_is_refused_too() -> None:
    """`enabeld: true` would leave the key admin API (or the audit trail) silently off: the
    keys of a section are checked whether or not it is on."""
    for section, edit in [("identity.keyAdmin", lambda d: d.__setitem__("identity", {"keyAdmin": {"enabeld": True}})),
                          ("audit", lambda d: d.__setitem__("audit", {"enabled": False, "dri": "/x"}))]:
        doc = valid()
        edit(doc)
        with pytest.raises(ConfigError, match=rf"^{SOURCE}: {re.escape(section)}\.\w+ is no setting here \("):
            config.parse(doc, SOURCE)


@pytest.mark.parametrize(("names", "values_path"), [
    ("METRICS_KEYS", "extproc.metrics"), ("PROVIDER_KEYS", "providers[0]"),
    ("CREDENTIAL_KEYS", "providers[0].credential"), ("MODEL_KEYS", "models[0]"),
    ("BACKEND_KEYS", "models[0].backends[0]"), ("PRICE_KEYS", "models[0].backends[0].pricing"),
    ("LONG_CONTEXT_KEYS", "models[0].backends[0].pricing.longContext"), ("TEAM_KEYS", "teams[0]"),
    ("USER_KEYS", "users[0]"), ("KEY_KEYS", "keys[0]"), ("BUDGET_KEYS", "teams[0].budget"),
    ("RATE_LIMITS_KEYS", "teams[0].rateLimits"), ("PRINCIPAL_CLASSIFICATION_KEYS", "teams[0].classification"),
    ("BUDGETS_KEYS", "budgets"), ("REDIS_KEYS", "budgets.redis"),
    ("identity_config.IDENTITY_KEYS", "identity"), ("identity_config.WORKLOADS_KEYS", "identity.workloads"),
    ("identity_config.WORKLOAD_KEYS", "identity.workloads.principals[0]"),
    ("identity_config.OIDC_KEYS", "identity.oidc"), ("identity_config.OIDC_PROVIDER_KEYS", "identity.oidc.providers[0]"),
    ("identity_config.JWKS_KEYS", "identity.oidc.providers[0].jwks"),
    ("identity_config.REMOTE_JWKS_KEYS", "identity.oidc.providers[0].jwks.remote"),
    ("identity_config.KEY_ADMIN_KEYS", "identity.keyAdmin"),
    ("identity_config.ADMIN_KEYS", "identity.keyAdmin.admins[0]"),
    ("audit.settings.RETENTION_KEYS", "audit.retention"),
])
def test_the_settings_gateway_yaml_takes_are_the_charts(names: str, values_path: str) -> None:
    """The chart copies these sections from values verbatim: what its schema lets through,
    the load must take (a render would fail), and nothing more."""
    from gateway_extproc.render import CHART, _schema_at

    assert set(_keys_constant(names)) == set(_schema_at(values_path, CHART)["properties"])


def _keys_constant(names: str) -> tuple[str, ...]:
    """config.NAME, or module.NAME of a gateway_extproc module (identity_config.OIDC_KEYS)."""
    import importlib

    module, _, name = names.rpartition(".")
    return getattr(importlib.import_module(f"gateway_extproc.{module}") if module else config, name)


def test_the_audit_settings_gateway_yaml_takes_are_what_the_chart_renders() -> None:
    """The chart does not copy `audit` verbatim: it writes signingKey.file as signingKeyFile,
    leaves out what only Kubernetes uses (the key's Secret, publicKey, persistence, the
    Redis password's Secret) and adds nothing else; the load takes exactly that, and
    `enabled` (false: no trail) for a gateway.yaml written by hand."""
    import yaml

    from gateway_extproc.audit import settings
    from gateway_extproc.render import CHART, _schema_at, chart_values, merge, render_values

    k8s_only = {"signingKey", "publicKey", "persistence"}
    schema = set(_schema_at("audit", CHART)["properties"])
    assert set(settings.AUDIT_KEYS) == schema - k8s_only | {"signingKeyFile"}
    assert set(settings.REDIS_STREAM_KEYS) == set(_schema_at("audit.redisStream", CHART)["properties"]) - {
        "passwordSecret"}
    values = merge(chart_values([]), {"audit": {
        "enabled": True, "instance": "gw", "retention": {"days": 30, "tiers": {}},
        "redisStream": {"url": "redis://r:6379/0", "passwordEnv": "AUDIT_REDIS_PASSWORD",
                        "passwordSecret": {"name": "audit-redis", "key": "password"}}}})
    audit = yaml.safe_load(render_values(values)["gateway.yaml"])["audit"]
    assert set(audit) == set(settings.AUDIT_KEYS) - {"enabled"}
    assert set(audit["redisStream"]) == set(settings.REDIS_STREAM_KEYS)


REPO = Path(__file__).resolve().parents[1]
VALUES_FILES = {"defaults": [], "local": ["helm/values-local.yaml"],
                "local+identity": ["helm/values-local.yaml", "helm/values-local-identity.yaml"],  # `make run`
                **{f"examples/{p.stem}": [f"helm/examples/{p.name}"] for p in (REPO / "helm" / "examples").glob("*.yaml")}}


@pytest.mark.parametrize("files", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_every_values_file_in_the_repo_renders_a_gateway_yaml_that_loads(files: list[str]) -> None:
    """Now that every section refuses settings it does not know, what the chart writes from
    each values file here must still load (as `render` and `serve` load it)."""
    import yaml

    from gateway_extproc.render import chart_values, render_values

    rendered = yaml.safe_load(render_values(chart_values([REPO / f for f in files]))["gateway.yaml"])
    config.parse(rendered, "gateway.yaml", local_files=False)


def test_a_chart_render_with_every_identity_and_audit_value_loads() -> None:
    """Every identity and audit value the chart's schema takes, rendered, loads: the keys the
    chart copies verbatim (Envoy's among them) and those it translates (audit.signingKey)."""
    import yaml

    from gateway_extproc.render import chart_values, merge, render_values

    identity = identity_audit_classification()["identity"]
    identity["workloads"]["principals"][0]["team"] = "demo"
    identity["oidc"]["providers"][0].update(teams={"eng": "demo"}, defaultTeam="demo")
    identity["oidc"]["providers"].append({"name": "k8s", "issuer": "https://k8s.example",
                                          "jwks": {"file": "/etc/jwks/k8s.json",
                                                   "secret": {"name": "k8s-jwks", "key": "jwks.json"}},
                                          "teamClaim": "team"})
    identity["keyAdmin"]["file"] = ""  # budgets.store: redis below: keys live in Redis
    values = merge(chart_values([REPO / "helm" / "values-local.yaml"]), {
        "identity": identity,
        "budgets": {"store": "redis", "redis": {"url": "redis://redis:6379/0"}},
        "extproc": {"processes": 2},
        "audit": {"enabled": True, "instance": "gw", "queueSize": 5000, "retention": {"days": 30},
                  "redisStream": {"url": "redis://redis:6379/1", "passwordEnv": "AUDIT_REDIS_PASSWORD",
                                  "passwordSecret": {"name": "audit-redis", "key": "password"}}}})
    values["envoy"]["tls"] = {"enabled": True, "certificate": {"secretName": "", "dir": "/tls"},
                              "clientCA": {"enabled": True, "secretName": "", "key": "ca.crt", "dir": "/ca"}}
    cfg = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "gateway.yaml", local_files=False)
    assert set(cfg.identity.oidc) == {"corp", "k8s"} and cfg.identity.key_admin is not None
    assert cfg.audit is not None and cfg.audit.redis is not None


def test_the_classification_settings_gateway_yaml_takes_are_the_documented_ones() -> None:
    """The chart passes `classification` through verbatim and leaves its keys to the ext_proc
    (its schema names only `tiers`, which it routes by; tests/test_chart_k8s.py): the list the
    load takes is docs/classification.md's, whose example names every setting."""
    import yaml

    from gateway_extproc.render import CHART, _schema_at

    schema = _schema_at("classification", CHART)
    assert schema["additionalProperties"] is True and set(schema["properties"]) <= set(config.CLASSIFICATION_KEYS)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "classification.md").read_text()
    [example] = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", doc, re.S)
                 if block.startswith("classification:")]
    documented = example["classification"]
    assert set(documented) == set(config.CLASSIFICATION_KEYS)
    assert set(documented["outputScanning"]) == set(config.OUTPUT_SCANNING_KEYS)
    assert set(documented["contentLogging"]) == set(config.CONTENT_LOGGING_KEYS)
    assert set(documented["injection"]) == set(config.INJECTION_KEYS)


def test_a_budget_above_the_level_it_sits_under_loads() -> None:
    """A key's limit above its team's (or a team's above the org's) never binds, but is no
    error: an operator cutting a team's budget in an incident must not have the reload
    refused until every key under it is edited too."""
    doc = valid()
    doc["listen"] = doc["listen"][:1]
    for model in doc["models"]:
        for backend in model["backends"]:
            backend["pricing"] = {"input": 1, "output": 1}
    doc["budgets"] = {"orgLimit": {"daily": 10}}
    doc["teams"][0]["budget"] = {"daily": 5, "monthly": 100}
    doc["teams"][1]["budget"] = {"daily": 20}  # above the org's
    doc["keys"][0]["budget"] = {"daily": 50, "monthly": 50}  # above team search's daily
    cfg = config.parse(doc, SOURCE)
    assert cfg.teams["search"].budget.daily_nano == 5 * 10**9
    assert cfg.keys[doc["keys"][0]["id"]].limits.budget.daily_nano == 50 * 10**9
