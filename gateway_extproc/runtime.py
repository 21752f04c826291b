"""What a running ext_proc process holds: the validated config plus provider credentials.

Credentials are read once at load (env var or file), never per request, and never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import config as config_mod
from . import logs, tokens
from .config import Backend, ConfigError, GatewayConfig, Provider
from .budgets.gate import BudgetGate
from .budgets.store import BudgetStore, MemoryBudgetStore
from .identity import KeyLookup
from .keystore import FileKeyLookup, RedisKeyLookup
from .policy.classification import Policy
from .processors.provider_response import credential_parts
from .telemetry.metrics import TEAM_DAILY_BUDGET, TEAM_DAILY_REMAINING, Labels

log = structlog.get_logger("gateway_extproc.runtime")


@dataclass(frozen=True, slots=True)
class Retired:
    """The backends and credentials of the config a reload replaced. A request the router
    admitted under that config may start an attempt (its first, or a fallback) after the
    reload; if the new config dropped that backend (a model removed), the attempt is still
    built from the config the request was admitted under instead of failing with a 500.
    Only the one config before: no chain of old runtimes is kept alive."""

    version: str  # that config's Runtime.version, as the router put it in `gw.config`
    backends: dict[str, Backend]
    credentials: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    credentials: dict[str, str | None]  # provider name -> key; None when the source was empty
    labels: Labels
    budget: BudgetGate | None = None  # None: no budgets or rate limits configured
    policy: Policy | None = None  # None: no classification section
    keys: KeyLookup | None = None  # keys created through the admin API; None: no key admin
    secrets: tuple[str, ...] = ()  # every credential's value, cut from every provider answer
    retired: Retired | None = None  # the replaced config's backends, for attempts admitted under it
    # A short name for this gateway.yaml (its SHA-256's first 16 hex digits; "" when the
    # config came from no file), which the router passes to the attempts (`gw.config`).
    version: str = ""

    def backend(self, backend_id: str, version: str) -> tuple[Backend, str | None] | None:
        """An attempt's backend and credential: from this config, else (a reload dropped it)
        from the replaced one when the router admitted the request under that (`version`)."""
        if (backend := self.config.backends.get(backend_id)) is not None:
            return backend, self.credentials.get(backend.provider.name)
        old = self.retired
        if old is not None and version and version == old.version and (backend := old.backends.get(backend_id)):
            return backend, old.credentials.get(backend.provider.name)
        return None

    @classmethod
    def load(cls, path: str | os.PathLike[str], previous: "Runtime | None" = None) -> "Runtime":
        return cls.from_config(config_mod.load(path), previous)

    @classmethod
    def from_config(cls, cfg: GatewayConfig, previous: "Runtime | None" = None) -> "Runtime":
        """`previous`: the runtime being replaced by a reload; its budget store is kept when
        the store settings did not change, so in-memory balances survive a reload."""
        for model in cfg.models.values():
            tokens.counter(model.tokenizer)("warm up")  # load encodings now, not on a request
        labels = Labels(cfg.teams, cfg.models, cfg.providers, cfg.backends)
        gate = None
        if cfg.budgets and cfg.budgets.enabled:
            old = previous.budget if previous else None
            same = old is not None and _store_settings(old.cfg) == _store_settings(cfg)
            gate = BudgetGate(cfg, old.store if same and old else _budget_store(cfg))
        try:  # what the scanner checks as it compiles (rule tiers, custom patterns): a config error too
            policy = Policy(cfg.classification) if cfg.classification else None
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
        old_keys = previous.keys if previous and _key_settings(previous.config) == _key_settings(cfg) else None
        credentials = {name: _read_credential(p) for name, p in cfg.providers.items()}
        secrets = tuple(sorted({c for c in credentials.values() if c}))
        logs.known_secrets(credential_parts(secrets))  # masked in every log line, whatever their shape
        retired = Retired(previous.version, previous.config.backends, previous.credentials) if previous else None
        runtime = cls(cfg, credentials, labels, gate, policy, old_keys or _key_lookup(cfg), secrets, retired,
                      cfg.digest[:16])
        # Only now, with the file accepted: a reload rejected above keeps the budgets in force
        # on the gauge too, and a team whose daily budget is gone loses its series.
        daily = {team: limits.budget.daily_nano / 1e9 for team, limits in cfg.teams.items()
                 if limits.budget and limits.budget.daily_nano is not None}
        TEAM_DAILY_BUDGET.retain((team,) for team in daily)
        TEAM_DAILY_REMAINING.retain((team,) for team in daily)
        for team, dollars in daily.items():
            TEAM_DAILY_BUDGET.labels(team).set(dollars)
        return runtime


def _store_settings(cfg: GatewayConfig) -> tuple[object, ...]:
    b = cfg.budgets
    return (b.store, b.redis_url, b.redis_password_env, b.org) if b else ()


def _key_settings(cfg: GatewayConfig) -> tuple[object, ...]:
    admin = cfg.identity.key_admin
    return (admin.file, *_store_settings(cfg)) if admin else ()


def _key_lookup(cfg: GatewayConfig) -> KeyLookup | None:
    """Where the workers find keys created through the admin API (docs/identity.md)."""
    admin, b = cfg.identity.key_admin, cfg.budgets
    if admin is None:
        return None
    if b is not None and b.store == "redis":
        from .budgets.redis_store import connect

        client = connect(b.redis_url or "")
        if b.redis_password_env:
            client.connection_pool.connection_kwargs["password"] = os.environ.get(b.redis_password_env)
        return RedisKeyLookup(client, b.org)
    assert admin.file is not None
    return FileKeyLookup(admin.file)


def _budget_store(cfg: GatewayConfig) -> BudgetStore:
    b = cfg.budgets
    assert b is not None
    if b.store == "memory":
        return MemoryBudgetStore()
    from .budgets.redis_store import RedisBudgetStore, connect

    client = connect(b.redis_url or "")
    if b.redis_password_env:
        client.connection_pool.connection_kwargs["password"] = os.environ.get(b.redis_password_env)
    return RedisBudgetStore(client, f"gw:{{{b.org}}}:")


def _read_credential(p: Provider) -> str | None:
    problem = None
    if p.credential_env is not None:
        value = os.environ.get(p.credential_env, "").strip()
        source = f"env {p.credential_env}"
    else:
        try:
            value = Path(p.credential_file or "").read_text(encoding="utf-8").strip()
        except OSError as exc:
            value, problem = "", exc.strerror or type(exc).__name__
        except UnicodeDecodeError:  # (its message would quote nothing secret, but it was a traceback)
            value, problem = "", "not UTF-8 text"
        source = f"file {p.credential_file}"
    if not value:
        # Only the ext_proc's copy is missing; Envoy may still inject it natively (docs/configuration.md).
        log.warning("provider_credential_unavailable", provider=p.name, source=source,
                    **({"problem": problem} if problem else {}))
    return value or None
