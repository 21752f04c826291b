"""The `identity` section of gateway.yaml: workload principals (mTLS SANs), OIDC claim
mappings and the key admin API.

Only what the ext_proc needs is read here. The Envoy-side settings of the same section
(trust domains, trusted proxies, issuers, audiences, JWKS) are rendered into envoy.yaml by
the chart and enforced there; the ext_proc never verifies a certificate or a signature.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Limits, Model, VirtualKey, _Reader

SAN_KINDS = ("spiffe", "dns")
# The settings of each part of the section (the chart's values schema: tests/test_config.py).
# Envoy's settings are among them (trustDomains, audiences, jwks, clockSkewSeconds): the chart
# copies the section verbatim, so the load takes them though the ext_proc never reads them.
IDENTITY_KEYS = ("workloads", "oidc", "keyAdmin")
WORKLOADS_KEYS = ("trustDomains", "trustedProxies", "principals")
WORKLOAD_KEYS = ("name", *SAN_KINDS, "team", "user", "models", "budget", "rateLimits", "classification")
OIDC_KEYS = ("providers",)
OIDC_PROVIDER_KEYS = ("name", "issuer", "audiences", "jwks", "userClaim", "teamClaim", "teams", "defaultTeam",
                      "models", "clockSkewSeconds")
JWKS_KEYS = ("file", "inline", "remote", "secret")  # secret: Kubernetes, the Secret mounted at file
REMOTE_JWKS_KEYS = ("url", "cacheDuration", "timeout")
KEY_ADMIN_KEYS = ("enabled", "address", "port", "file", "admins")
ADMIN_KEYS = ("name", "sha256")


@dataclass(frozen=True, slots=True)
class WorkloadRule:
    """One `identity.workloads.principals` entry: a SAN pattern and the principal it maps to.
    A pattern is exact, or has one `*` standing for exactly one path segment (URI, at the
    end) or one label (DNS, at the start)."""

    san: str  # "spiffe" (URI SAN) or "dns" (DNS SAN)
    pattern: str
    principal: "VirtualKey"

    def matches(self, value: str) -> bool:
        head, star, tail = self.pattern.partition("*")
        if not star:
            return value == self.pattern
        middle = value[len(head):len(value) - len(tail)] if len(value) > len(head) + len(tail) else ""
        sep = "/" if self.san == "spiffe" else "."
        return bool(middle) and sep not in middle and value.startswith(head) and value.endswith(tail)


@dataclass(frozen=True, slots=True)
class OidcProvider:
    """How one issuer's verified claims map to a user and a team."""

    name: str
    user_claim: str
    team_claim: str | None
    teams: dict[str, str]  # claim value -> team; empty: the claim value is the team name
    default_team: str | None
    models: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class KeyAdmin:
    """The admin API for virtual keys (its own listener, its own credentials)."""

    address: str
    port: int
    admins: dict[str, str]  # name -> SHA-256 of that admin's token
    file: str | None  # key store for budgets.store: memory (one node)


@dataclass(frozen=True, slots=True)
class Identity:
    workloads: tuple[WorkloadRule, ...] = ()
    oidc: dict[str, OidcProvider] = field(default_factory=dict)
    key_admin: KeyAdmin | None = None
    # Built from `workloads` at load: exact patterns by (san, value), wildcards longest first.
    exact: dict[tuple[str, str], "VirtualKey"] = field(default_factory=dict)
    wildcards: tuple[WorkloadRule, ...] = ()

    def workload(self, san: str, value: str) -> "VirtualKey | None":
        """The principal of a verified SAN: an exact pattern first, then the longest wildcard."""
        found = self.exact.get((san, value))
        if found is not None:
            return found
        return next((r.principal for r in self.wildcards if r.san == san and r.matches(value)), None)


def parse_identity(r: "_Reader", doc: dict[str, Any], teams: dict[str, "Limits"], models: dict[str, "Model"],
                   users: dict[str, "Limits"], fail_open: bool, tiers: tuple[str, ...], budgets_store: str) -> Identity:
    from .config import SHA256_HEX, VirtualKey, _limits

    ident = r.keys(r.mapping(doc.get("identity") or {}, "identity"), "identity", IDENTITY_KEYS)
    wl = r.keys(r.mapping(ident.get("workloads") or {}, "identity.workloads"), "identity.workloads", WORKLOADS_KEYS)
    for i, cidr in enumerate(r.list(wl, "trustedProxies", "identity.workloads")):
        try:
            ipaddress.ip_network(cidr)
        except (TypeError, ValueError):
            r.fail(f"identity.workloads.trustedProxies[{i}]", f"is {cidr!r}; give a CIDR such as 127.0.0.6/32")
    rules = []
    names: set[str] = set()
    for i, raw in enumerate(r.list(wl, "principals", "identity.workloads")):
        at = f"identity.workloads.principals[{i}]"
        p, name = _named(r, raw, at, names, WORKLOAD_KEYS)
        names.add(name)
        kinds = [k for k in SAN_KINDS if k in p]
        if len(kinds) != 1:
            r.fail(at, "needs exactly one of spiffe: <URI SAN pattern> or dns: <DNS SAN pattern>")
        pattern = r.string(p[kinds[0]], f"{at}.{kinds[0]}")
        star = pattern.count("*")
        if kinds[0] == "spiffe" and (not pattern.startswith("spiffe://") or star > 1
                                     or (star and not pattern.endswith("/*"))):
            r.fail(f"{at}.spiffe", f"is {pattern!r}; use spiffe://<trust domain>/<path>, optionally ending in /*")
        if kinds[0] == "dns" and (star > 1 or (star and not pattern.startswith("*."))):
            r.fail(f"{at}.dns", f"is {pattern!r}; use a DNS name, optionally starting with *.")
        if any(x.san == kinds[0] and x.pattern == pattern for x in rules):
            r.fail(f"{at}.{kinds[0]}", f"repeats {pattern!r}; each pattern maps to one principal")
        team = _team(r, p.get("team"), f"{at}.team", teams)
        allowed = _models(r, p.get("models"), f"{at}.models", models)
        user = p.get("user")
        if user is not None:
            r.string(user, f"{at}.user")
        principal = VirtualKey(f"workload:{name}", "", team, allowed, None, user,
                               _limits(r, p, at, fail_open, models, tiers))
        rules.append(WorkloadRule(kinds[0], pattern, principal))
    oidc = {}
    oi = r.keys(r.mapping(ident.get("oidc") or {}, "identity.oidc"), "identity.oidc", OIDC_KEYS)
    for i, raw in enumerate(r.list(oi, "providers", "identity.oidc")):
        at = f"identity.oidc.providers[{i}]"
        p, name = _named(r, raw, at, oidc, OIDC_PROVIDER_KEYS)
        r.string(p.get("issuer"), f"{at}.issuer")
        jwks = r.keys(r.mapping(p.get("jwks"), f"{at}.jwks"), f"{at}.jwks", JWKS_KEYS)
        if sum(k in jwks for k in ("file", "inline", "remote")) != 1:
            r.fail(f"{at}.jwks", "needs exactly one of file: /path, inline: '<JWKS JSON>' or remote: {url: https://...}")
        if "remote" in jwks:
            remote = r.keys(r.mapping(jwks["remote"], f"{at}.jwks.remote"), f"{at}.jwks.remote", REMOTE_JWKS_KEYS)
            _credential_free(r, remote.get("url"), f"{at}.jwks.remote.url")
        team_map = r.mapping(p.get("teams") or {}, f"{at}.teams")
        for value, team in team_map.items():
            _team(r, team, f"{at}.teams.{value}", teams)
        default_team = p.get("defaultTeam")
        if default_team is not None:
            _team(r, default_team, f"{at}.defaultTeam", teams)
        team_claim = p.get("teamClaim")
        if team_claim is None and default_team is None:
            r.fail(at, "needs teamClaim (a claim naming the team) or defaultTeam")
        oidc[name] = OidcProvider(name, r.string(p.get("userClaim", "sub"), f"{at}.userClaim"),
                                  r.string(team_claim, f"{at}.teamClaim") if team_claim is not None else None,
                                  dict(team_map), default_team, _models(r, p.get("models"), f"{at}.models", models))
    admin = None
    # Checked on or off: a misspelt `enabled` would leave the admin API off without a word.
    ka = r.keys(r.mapping(ident.get("keyAdmin") or {}, "identity.keyAdmin"), "identity.keyAdmin", KEY_ADMIN_KEYS)
    if ka.get("enabled"):
        port = ka.get("port", 9190)
        if type(port) is not int or not 0 < port < 65536:
            r.fail("identity.keyAdmin.port", "must be a port number")
        admins = {}
        for i, a in enumerate(r.list(ka, "admins", "identity.keyAdmin")):
            a = r.keys(r.mapping(a, f"identity.keyAdmin.admins[{i}]"), f"identity.keyAdmin.admins[{i}]", ADMIN_KEYS)
            digest = r.string(a.get("sha256"), f"identity.keyAdmin.admins[{i}].sha256")
            if not SHA256_HEX.match(digest):
                r.fail(f"identity.keyAdmin.admins[{i}].sha256", "must be 64 lowercase hex digits "
                       "(`gateway-extproc keys admin-token` prints one)")
            admins[r.string(a.get("name"), f"identity.keyAdmin.admins[{i}].name")] = digest
        if not admins:
            r.fail("identity.keyAdmin.admins", "is empty; add {name, sha256} (`gateway-extproc keys admin-token`)")
        file = r.path(ka["file"], "identity.keyAdmin.file") if ka.get("file") else None
        if budgets_store != "redis" and file is None:
            r.fail("identity.keyAdmin.file", "is required with budgets.store: memory (keys then live in this "
                   "file on one node); or use budgets.store: redis so every replica shares them")
        admin = KeyAdmin(r.string(ka.get("address", "127.0.0.1"), "identity.keyAdmin.address"), port, admins, file)
    exact = {(r.san, r.pattern): r.principal for r in rules if "*" not in r.pattern}
    wildcards = tuple(sorted((r for r in rules if "*" in r.pattern), key=lambda r: -len(r.pattern)))
    return Identity(tuple(rules), oidc, admin, exact, wildcards)


def _named(r: "_Reader", raw: Any, at: str, taken: Collection[str],
           allowed: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """An entry of a list whose `name` must be a unique id, with no setting outside `allowed`:
    the entry and its name."""
    from .config import KEY_ID  # config imports this module

    entry = r.keys(r.mapping(raw, at), at, allowed)
    name = r.string(entry.get("name"), f"{at}.name")
    if not KEY_ID.match(name) or name in taken:
        r.fail(f"{at}.name", "must be unique, lowercase letters, digits and '-'")
    return entry, name


def _team(r: "_Reader", team: Any, at: str, teams: dict[str, "Limits"]) -> str:
    team = r.string(team, at)
    if team not in teams:
        r.fail(at, f"is {team!r}, not in teams; add it to teams or fix the name")
    return team


def _models(r: "_Reader", allowed: Any, at: str, models: dict[str, "Model"]) -> frozenset[str] | None:
    if allowed is None:
        return None
    if not isinstance(allowed, list) or not all(isinstance(x, str) for x in allowed):
        r.fail(at, "must be a list of model names, or [\"*\"] for all")
    for name in allowed:
        if name != "*" and name not in models:
            r.fail(at, f"names {name!r}, which is not in models")
    return None if "*" in allowed else frozenset(allowed)


def _credential_free(r: "_Reader", url: object, at: str) -> None:
    """Refuse, without quoting, a URL carrying `user:password@` or a credential in its query:
    gateway.yaml (and Envoy's config) is a ConfigMap and is copied into the audit trail. A
    JWKS is public; Envoy would not send a URL's user:password anyway."""
    from urllib.parse import urlsplit

    from .config import credential_in_query  # config imports this module

    if not isinstance(url, str):
        return
    parts = urlsplit(url)
    if "@" in parts.netloc or credential_in_query(parts.query):
        r.fail(at, "carries a credential (user:password@ or a token in its query), which would be copied into the "
               "ConfigMap and the audit trail's copies of each config version; remove it (a JWKS is public)")
