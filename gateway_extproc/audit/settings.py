"""The `audit:` section of gateway.yaml, validated once at load (docs/audit.md).

Parsed here rather than in config.py so the audit trail's settings live with the code that
uses them; config.py calls `parse` with its reader, so errors name file, key and fix like
every other section, and a setting it does not know is refused with a suggestion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from ..config import _Reader

FSYNC_POLICIES = ("always", "interval", "never")
# The stream of events that have no tier (config changes, refusals before classification,
# or every event when classification is off). It keeps the longest retention of all, so
# the config versions a request names outlive the request.
GATEWAY_STREAM = "gateway"
# The settings gateway.yaml's `audit:` takes: what the chart renders from its `audit` values
# (signingKey.file as signingKeyFile; the Secrets, publicKey and persistence are Kubernetes'
# and stay in the chart), and `enabled` for a file written by hand (tests/test_config.py).
AUDIT_KEYS = ("enabled", "dir", "signingKeyFile", "instance", "checkpointSeconds", "fsync", "fsyncIntervalSeconds",
              "queueSize", "segmentBytes", "segmentSeconds", "retention", "redisStream")
RETENTION_KEYS = ("days", "tiers")
REDIS_STREAM_KEYS = ("url", "key", "maxLen", "passwordEnv")


@dataclass(frozen=True, slots=True)
class RedisStream:
    url: str
    key: str
    max_len: int
    password_env: str | None


@dataclass(frozen=True, slots=True)
class AuditSettings:
    dir: str
    signing_key_file: str
    instance: str  # "" = the host name (a pod's name in Kubernetes)
    checkpoint_seconds: float
    fsync: str  # always | interval | never
    fsync_interval_seconds: float
    queue_size: int
    segment_bytes: int
    segment_seconds: float
    retention_days: int  # events without a tier-specific rule
    tier_retention_days: dict[str, int] = field(default_factory=dict)
    redis: RedisStream | None = None

    def days_for(self, stream: str) -> int:
        if stream == GATEWAY_STREAM:
            return max([self.retention_days, *self.tier_retention_days.values()])
        return self.tier_retention_days.get(stream, self.retention_days)


def parse(raw: Any, reader: "_Reader", tiers: tuple[str, ...]) -> AuditSettings | None:
    if raw is None:
        return None
    fail = reader.fail
    # Checked on or off: a misspelt `enabled` would leave the trail off without a word.
    reader.keys(reader.mapping(raw, "audit"), "audit", AUDIT_KEYS)
    if raw.get("enabled", True) is not True:
        if raw.get("enabled") is not False:
            fail("audit.enabled", "must be true or false")
        return None

    def string(key: str, default: str | None = None) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str) or not value:
            fail(f"audit.{key}", "must be a non-empty string")
        return value

    def number(key: str, default: float, minimum: float, integer: bool = False) -> Any:
        value = raw.get(key, default)
        if type(value) not in ((int,) if integer else (int, float)) or value < minimum:
            fail(f"audit.{key}", f"must be {'an integer' if integer else 'a number'} >= {minimum}")
        return value

    fsync = raw.get("fsync", "interval")
    if fsync not in FSYNC_POLICIES:
        fail("audit.fsync", f"is {fsync!r}; use always, interval or never (docs/audit.md, fsync policy)")
    retention = raw.get("retention") or {}
    if not isinstance(retention, dict):
        fail("audit.retention", "must be a mapping {days, tiers: {<tier>: days}}")
    reader.keys(retention, "audit.retention", RETENTION_KEYS)
    days = retention.get("days", 365)
    if type(days) is not int or days < 1:
        fail("audit.retention.days", "must be an integer >= 1 (days)")
    per_tier = retention.get("tiers") or {}
    if not isinstance(per_tier, dict):
        fail("audit.retention.tiers", "must map tier names to days")
    for tier, value in per_tier.items():
        if tier not in tiers:
            fail(f"audit.retention.tiers.{tier}", f"is not a classification tier; use one of "
                 f"{', '.join(tiers) or '(none: classification is off)'}")
        if type(value) is not int or value < 1:
            fail(f"audit.retention.tiers.{tier}", "must be an integer >= 1 (days)")
    redis = None
    r = raw.get("redisStream") or {}
    if not isinstance(r, dict):
        fail("audit.redisStream", "must be a mapping {url, key, maxLen}")
    reader.keys(r, "audit.redisStream", REDIS_STREAM_KEYS)
    if r.get("url"):
        key, max_len = r.get("key", "gw:audit"), r.get("maxLen", 1_000_000)
        if not isinstance(key, str) or not key:
            fail("audit.redisStream.key", "must be a non-empty string")
        if type(max_len) is not int or max_len < 1:
            fail("audit.redisStream.maxLen", "must be a positive integer")
        if problem := redis_url_problem(str(r["url"])):
            fail("audit.redisStream.url", problem)
        if password_in_url(str(r["url"])):
            fail("audit.redisStream.url", "carries a password, which would be copied into the audit trail's own "
                 "copies of each config version; keep redis://[user@]host:port/db and set "
                 "audit.redisStream.passwordEnv to the environment variable that holds it")
        password_env = r.get("passwordEnv") or None
        if password_env is not None:
            reader.env_name(password_env, "audit.redisStream.passwordEnv", "password")
        redis = RedisStream(str(r["url"]), key, max_len, password_env)
    instance = raw.get("instance", "")
    if not isinstance(instance, str) or "/" in instance:
        fail("audit.instance", "must be a name without '/' (empty: the host name)")
    return AuditSettings(
        dir=string("dir"), signing_key_file=string("signingKeyFile"), instance=instance,
        checkpoint_seconds=number("checkpointSeconds", 10, 0.01), fsync=fsync,
        fsync_interval_seconds=number("fsyncIntervalSeconds", 1, 0.01),
        queue_size=number("queueSize", 10000, 1, integer=True),
        segment_bytes=number("segmentBytes", 64 * 1024 * 1024, 4096, integer=True),
        segment_seconds=number("segmentSeconds", 3600, 1), retention_days=days,
        tier_retention_days=dict(per_tier), redis=redis)


def redis_url_problem(url: str) -> str | None:
    """What the Redis client would refuse when the store is built at start, or read as something
    else (a database that is no number became db 0); None for a usable URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.scheme == "unix"):
        return "is not a Redis URL; use redis://host:port/db, rediss://... or unix:///path"
    try:
        bad_port = parts.port is not None and not 0 < parts.port < 65536
    except ValueError:  # not a number, or past 65535
        bad_port = True
    if bad_port:
        return f"has port {parts.netloc.rpartition(':')[2]}; a port is 1-65535"
    db = parts.path.strip("/") if parts.scheme != "unix" else ""
    if db and not db.isdigit():
        return f"names database {db!r}; a Redis database is a number (redis://host:port/0)"
    return None


def password_in_url(url: str) -> bool:
    """Whether a Redis URL carries a password (`:pw@`, `user:pw@`, `?password=`): gateway.yaml
    is copied into the audit trail and a ConfigMap, so a secret goes in an environment variable."""
    parts = urlsplit(url)
    return ":" in parts.netloc.rpartition("@")[0] or any(k.lower() == "password" for k, _ in parse_qsl(parts.query))
