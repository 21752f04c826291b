"""Who is calling: one principal per request, from what Envoy verified and the caller's key.

Three credentials can arrive together (docs/identity.md):

- a workload identity: the SPIFFE ID (URI SAN) or DNS SAN of a client certificate Envoy
  verified, read from the `x-forwarded-client-cert` header Envoy itself wrote (the listener
  sanitizes any XFCC a client sends; only configured trusted proxies may forward one);
- OIDC claims: the payload Envoy's jwt_authn filter verified, read from dynamic metadata
  (namespace `envoy.filters.http.jwt_authn`), never from a header;
- a virtual key (`gwk_<id>_<secret>`), from values or from the key store.

The principal's team, id and key-level limits come from the first present of workload,
key, token; its user from the token when there is one; its model allow-list is the
intersection of every credential's list. Nothing here verifies a certificate or a signature:
Envoy did, and a request only reaches this code after it did.
"""

from __future__ import annotations

import functools
import hmac
import urllib.parse
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from . import keys
from .config import GatewayConfig, VirtualKey
from .errors import GatewayError
from .identity_config import OidcProvider

XFCC = "x-forwarded-client-cert"
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"


class StoredKey(Protocol):
    key: VirtualKey
    previous_sha256: str | None  # the hash before the last rotation, while its grace lasts
    previous_until: datetime | None


class KeyLookup(Protocol):
    async def get(self, id_: str) -> StoredKey | None: ...


def presented_key(headers: dict[str, str]) -> str | None:
    """The caller's key from `Authorization: Bearer` (OpenAI SDKs) or `x-api-key` (Anthropic).

    Two different values there are refused (`identity_conflict`) rather than one picked: the
    other would go unchecked, and which one wins must never decide what a caller may do.
    (A verified OIDC token is not here: Envoy removed it after verifying.)"""
    bearer = keys.bearer(headers.get("authorization"))
    api_key = headers.get("x-api-key") or None
    if bearer is not None and api_key is not None and not hmac.compare_digest(bearer.encode(), api_key.encode()):
        raise GatewayError("identity_conflict", "Two different API keys were sent (`Authorization` and "
                           "`x-api-key`); send one.")
    return bearer or api_key


def xfcc_first(value: str) -> dict[str, list[str]]:
    """The first element of an XFCC header as {key: [values]} (keys lower-cased)."""
    out: dict[str, list[str]] = {}
    for name, item in xfcc_pairs(value):
        out.setdefault(name, []).append(item)
    return out


def xfcc_pairs(value: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of an XFCC header's first element, in order (keys lower-cased).

    Elements are separated by ',', pairs by ';', and a value may be double-quoted (then it
    may hold ',', ';' and '=', with '\\"' for a quote). The first element describes the
    original client: each hop appends its own after it."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        eq = value.find("=", i)
        if eq < 0:
            break
        name = value[i:eq].strip().lower()
        i = eq + 1
        if i < n and value[i] == '"':
            i += 1
            chars = []
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(value[i])
                i += 1
            item = "".join(chars)
            i += 1  # closing quote
        else:
            end = i
            while end < n and value[end] not in ",;":
                end += 1
            item, i = value[i:end], end
        out.append((name, item))
        if i < n and value[i] == ",":
            break  # end of the first element
        i += 1  # past ';'
    return out


def workload_sans(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The verified SANs of the calling workload: URI SANs (SPIFFE IDs) first, then DNS.

    Read from the certificate itself when Envoy forwards it (XFCC `Cert`, which the chart
    asks for): exactly the SANs the CA signed, whatever characters they hold. Else (a trusted
    proxy's XFCC without it) from the `URI` and `DNS` pairs, which Envoy writes unquoted: a
    CA-signed SAN holding `;URI=…` (or a quote) then reads as one more SAN, so what such a
    SAN makes is refused there, as from the certificate: several URI SANs (an X.509-SVID has
    exactly one SPIFFE ID), a URI after a DNS SAN (Envoy writes URIs first), or a value
    holding a quote."""
    xfcc = headers.get(XFCC)
    if not xfcc:
        return []
    first = xfcc_pairs(xfcc)
    cert = next((v for k, v in first if k == "cert" and v), None)
    pairs = list(certificate_sans(cert)) if cert is not None else [
        (k, v) for k, v in first if k in ("uri", "dns") and v]
    kinds = [k for k, _ in pairs]
    if kinds.count("uri") > 1 or ("dns" in kinds and "uri" in kinds[kinds.index("dns"):]) \
            or any('"' in v for _, v in pairs):
        raise GatewayError("identity_conflict", "The client certificate's subject alternative names are "
                           "ambiguous (several URI SANs, or a SAN holding `;`, `,` or a quote); a workload "
                           "certificate carries exactly one SPIFFE ID.")
    return [("spiffe" if k == "uri" else "dns", v) for k, v in pairs]


@functools.lru_cache(maxsize=1024)
def certificate_sans(encoded: str) -> tuple[tuple[str, str], ...]:
    """("uri" | "dns", value) of a URL-encoded PEM certificate, URIs first (Envoy verified it;
    cached: a workload presents the same certificate on every request)."""
    try:
        cert = x509.load_pem_x509_certificate(urllib.parse.unquote(encoded).encode("latin-1"))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    except ValueError:
        raise GatewayError("identity_conflict", "The client certificate Envoy forwarded could not be read.") from None
    return tuple([("uri", u) for u in names.get_values_for_type(x509.UniformResourceIdentifier)]
                 + [("dns", d) for d in names.get_values_for_type(x509.DNSName)])


def claim_name(value: Any) -> str | None:
    """A claim value as a name: a non-empty string, or an integer as its digits.

    Envoy hands the verified payload over as a protobuf Struct, whose numbers are doubles
    (`"sub": 4711` arrives as 4711.0). Only a double below 2^53 is the integer the token held
    (2^53 + 1 arrives as 2^53), so a larger one names nobody rather than a neighbour; booleans,
    fractions, lists and objects name nobody either."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (value.is_integer() and abs(value) < 2 ** 53):
        return None
    return str(int(value))


def token_principal(provider: OidcProvider, claims: dict[str, Any]) -> tuple[str | None, str | None]:
    """(user, team) from one issuer's verified claims; team None when nothing maps."""
    user = claim_name(claims.get(provider.user_claim))
    team = None
    if provider.team_claim is not None:
        value = claims.get(provider.team_claim)
        for v in value if isinstance(value, list) else [value]:
            name = claim_name(v)
            if name is not None:
                team = provider.teams.get(name) if provider.teams else name
                if team is not None:
                    break
    return user, team or provider.default_team


async def authenticate(headers: dict[str, str], config: GatewayConfig, now: datetime,
                       claims: dict[str, Any] | None = None, store: KeyLookup | None = None) -> VirtualKey:
    ident = config.identity
    workload, unmapped = None, None
    if ident.workloads:
        sans = workload_sans(headers)
        for kind in ("spiffe", "dns"):  # URI SANs first; DNS SANs only when no URI SAN maps
            found = {p.id: p for k, v in sans if k == kind and (p := ident.workload(k, v)) is not None}
            if len(found) > 1:
                # An X.509-SVID has one SPIFFE ID; a certificate naming several principals
                # is not taken for whichever its SAN order puts first.
                raise GatewayError("identity_conflict", "The client certificate names several workloads ("
                                   f"{', '.join(sorted(found))[:300]}); it must name one.")
            if found:
                workload = next(iter(found.values()))
                break
        unmapped = sans[0][1] if workload is None and sans else None
    token, token_user = None, None
    for name, payload in (claims or {}).items():
        provider = ident.oidc.get(name)
        if provider is None or not isinstance(payload, dict):
            continue
        token_user, team = token_principal(provider, payload)
        if token_user is not None and len(ident.oidc) > 1:
            # Each issuer names its own users: `sub` "alice" of two IdPs is two people, so with
            # several issuers a user is `<provider>:<claim>` (a provider name holds no `:`).
            token_user = f"{name}:{token_user}"
        # team "" when the claims map to no team of this gateway: then the token names a user only.
        token = VirtualKey(f"token:{name}", "", team if team in config.teams else "", provider.models, None,
                           token_user)
        break
    key = await _key(headers, config, now, store) if presented_key(headers) is not None else None
    base = workload or key or (token if token is not None and token.team else None)
    if base is None:
        if token is not None:
            raise GatewayError("identity_not_mapped", "The token is valid but maps to no team on this gateway.")
        if unmapped is not None:
            raise GatewayError("identity_not_mapped", f"The client certificate's identity {unmapped[:200]!r} "
                               "maps to no principal on this gateway.")
        raise GatewayError("missing_api_key", "No API key: send `Authorization: Bearer <key>`.")
    if workload is not None and key is not None and key.team != workload.team:
        raise GatewayError("identity_conflict", f"The API key belongs to team {key.team!r} but the client "
                           f"certificate to team {workload.team!r}; send one or the other.")
    allowed = [p.models for p in (workload, key, token) if p is not None and p.models is not None]
    models = frozenset.intersection(*allowed) if allowed else None
    user = token_user if token is not None and token_user is not None else base.user
    if models == base.models and user == base.user:
        return base
    return replace(base, models=models, user=user)


async def _key(headers: dict[str, str], config: GatewayConfig, now: datetime, store: KeyLookup | None) -> VirtualKey:
    key = presented_key(headers)
    assert key is not None
    id_ = keys.key_id(key)
    entry = config.keys.get(id_) if id_ else None
    previous: str | None = None
    if entry is None and id_ is not None and store is not None:
        stored = await store.get(id_)
        if stored is not None:
            entry = stored.key
            if stored.previous_sha256 and stored.previous_until and stored.previous_until > now:
                previous = stored.previous_sha256
    # Both hashes are always compared, so timing does not tell a rotated key from a new one.
    digest = keys.digest(key)
    ok_current = hmac.compare_digest(digest, entry.sha256 if entry and entry.sha256 else keys.DUMMY)
    ok_previous = hmac.compare_digest(digest, previous or keys.DUMMY)
    if entry is None or not (ok_current or (previous is not None and ok_previous)):
        raise GatewayError("invalid_api_key", "The API key is not valid for this gateway.")
    if entry.expires_at is not None and entry.expires_at <= now:
        raise GatewayError("expired_api_key", f"The API key {entry.id!r} has expired; ask for a new one.")
    return entry
