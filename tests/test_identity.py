"""Unit tests for gateway_extproc.keys (key format, hashing) and gateway_extproc.identity."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime, timedelta, timezone

import pytest

from gateway_extproc import config, identity, keys
from gateway_extproc.errors import GatewayError

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def authenticate(*args: object, **kwargs: object) -> config.VirtualKey:
    return asyncio.run(identity.authenticate(*args, **kwargs))  # type: ignore[arg-type]


# -- keys --------------------------------------------------------------------------------


def test_generate_format_and_uniqueness() -> None:
    a, b = keys.generate("team-a"), keys.generate("team-a")
    assert a != b
    for key in (a, b):
        assert key.startswith("gwk_team-a_")
        secret = key[len("gwk_team-a_"):]
        assert len(secret) >= 43  # 32 random bytes, url-safe base64
        assert keys.key_id(key) == "team-a"


def test_digest_is_sha256_hex_of_whole_key() -> None:
    key = "gwk_demo_local-only-demo-key-not-for-production"
    assert keys.digest(key) == hashlib.sha256(key.encode()).hexdigest()
    # The checked-in demo key's digest (helm/values-local.yaml).
    assert keys.digest(key) == "a7baa7e5f53345537bc5793fb8307925150db658ff1cb2781f9208ed483e1a8a"
    assert config.SHA256_HEX.match(keys.digest(keys.generate("x")))


@pytest.mark.parametrize(("key", "expected"), [
    ("gwk_demo_secret", "demo"),
    ("gwk_demo_sec_ret", "demo"),  # secrets may contain '_' (token_urlsafe)
    ("gwk_a-b-1_-x", "a-b-1"),
    ("gwk_demo_", None),  # no secret
    ("gwk_demo", None),  # no separator
    ("gwk__secret", None),  # no id
    ("gwk_", None),
    ("GWK_demo_secret", None),
    ("sk-proj-abcdef", None),
    ("demo_secret", None),
    ("", None),
    # Not an id any key can have (keys.ID): refused before any lookup.
    ("gwk_Demo_secret", None),
    ("gwk_" + "a" * 64 + "_secret", None),
    ("gwk_" + "a" * 63 + "_secret", "a" * 63),
    ("gwk_-lead_secret", None),
    ("gwk_caf\u00e9_secret", None),
    ("gwk_demo\n_secret", None),
    ("gwk_a{b}_secret", None),
])
def test_key_id(key: str, expected: str | None) -> None:
    assert keys.key_id(key) == expected


def test_matches() -> None:
    key = keys.generate("demo")
    assert keys.matches(key, keys.digest(key))
    assert not keys.matches(key, keys.digest(key + "x"))
    assert not keys.matches(key, None)
    assert not keys.matches(key, "")
    assert not keys.matches(key, keys.digest(key).upper())  # stored digests are lowercase hex


# -- identity ----------------------------------------------------------------------------

GOOD = keys.generate("good")
LIMITED = keys.generate("limited")
EXPIRED = keys.generate("expired")
FUTURE = keys.generate("future")


@pytest.fixture(scope="module")
def cfg() -> config.GatewayConfig:
    return config.parse({
        "version": 1,
        "listen": ["unix:///tmp/gw.sock"],
        "providers": [{"name": "openai", "kind": "openai", "baseURL": "https://api.openai.com/v1",
                       "credential": {"env": "OPENAI_API_KEY"}}],
        "models": [{"name": "chat", "backends": [{"provider": "openai", "model": "gpt-4o-mini"}]}],
        "teams": [{"name": "search"}, {"name": "ads"}],
        "keys": [
            {"id": "good", "sha256": keys.digest(GOOD), "team": "search"},
            {"id": "limited", "sha256": keys.digest(LIMITED), "team": "ads", "models": ["chat"]},
            {"id": "expired", "sha256": keys.digest(EXPIRED), "team": "ads",
             "expiresAt": (NOW - timedelta(seconds=1)).isoformat()},
            {"id": "future", "sha256": keys.digest(FUTURE), "team": "ads",
             "expiresAt": (NOW + timedelta(days=1)).isoformat()},
        ],
    }, "test.yaml")


@pytest.mark.parametrize(("headers", "expected_id"), [
    ({"authorization": f"Bearer {GOOD}"}, "good"),
    ({"authorization": f"bearer {GOOD}"}, "good"),  # scheme is case-insensitive
    ({"authorization": f"BEARER   {GOOD}  "}, "good"),  # surrounding whitespace ignored
    ({"x-api-key": GOOD}, "good"),  # Anthropic SDK style
    ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": LIMITED}, "limited"),  # non-bearer -> x-api-key
    ({"authorization": "Bearer ", "x-api-key": LIMITED}, "limited"),  # empty bearer -> x-api-key
    ({"authorization": f"Bearer {GOOD}", "x-api-key": GOOD}, "good"),  # the same key twice (two different: a conflict)
    ({"authorization": f"Bearer {FUTURE}"}, "future"),  # not yet expired
])
def test_authenticate_ok(cfg: config.GatewayConfig, headers: dict[str, str], expected_id: str) -> None:
    entry = authenticate(headers, cfg, NOW)
    assert entry is cfg.keys[expected_id]


def test_authenticated_entry_carries_team_and_models(cfg: config.GatewayConfig) -> None:
    entry = authenticate({"x-api-key": LIMITED}, cfg, NOW)
    assert entry.team == "ads" and entry.allows("chat") and not entry.allows("other")


def _wrong_secret(key: str) -> str:
    """Same id, different secret."""
    return key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "missing_api_key"),
    ({"authorization": "Bearer "}, "missing_api_key"),
    ({"authorization": "Bearer"}, "missing_api_key"),
    ({"authorization": f"Basic {GOOD}"}, "missing_api_key"),  # only Bearer is read from authorization
    ({"x-api-key": ""}, "missing_api_key"),
    ({"authorization": "Bearer not-a-gateway-key"}, "invalid_api_key"),  # malformed
    ({"authorization": "Bearer sk-proj-0123456789abcdef"}, "invalid_api_key"),  # provider key
    ({"authorization": "Bearer gwk_good"}, "invalid_api_key"),  # malformed: no secret
    ({"authorization": "Bearer gwk_good_"}, "invalid_api_key"),
    ({"x-api-key": "gwk_nobody_" + GOOD.split("_", 2)[2]}, "invalid_api_key"),  # unknown id
    ({"authorization": f"Bearer {_wrong_secret(GOOD)}"}, "invalid_api_key"),  # right id, wrong secret
    ({"authorization": f"Bearer {LIMITED.replace('gwk_limited_', 'gwk_good_')}"}, "invalid_api_key"),  # swapped id
    ({"authorization": f"Bearer {GOOD}x"}, "invalid_api_key"),
    ({"authorization": f"Bearer {EXPIRED}"}, "expired_api_key"),
])
def test_authenticate_rejects(cfg: config.GatewayConfig, headers: dict[str, str], code: str) -> None:
    with pytest.raises(GatewayError) as info:
        authenticate(headers, cfg, NOW)
    err = info.value
    assert err.code == code
    assert err.status == 401
    assert err.type == "authentication_error"
    presented = identity.presented_key(headers)
    if presented:
        # The presented key (or its secret part) never appears in what the client or logs see.
        secret = presented.rsplit("_", 1)[-1]
        for text in (err.message, str(err), err.body().decode()):
            assert presented not in text
            if len(secret) > 8:
                assert secret not in text


def test_expired_message_names_the_key_id_only(cfg: config.GatewayConfig) -> None:
    with pytest.raises(GatewayError) as info:
        authenticate({"authorization": f"Bearer {EXPIRED}"}, cfg, NOW)
    assert "'expired'" in info.value.message
    assert "expired" in info.value.message and EXPIRED not in info.value.message


def test_key_expires_exactly_at_expires_at(cfg: config.GatewayConfig) -> None:
    expires_at = cfg.keys["future"].expires_at
    assert expires_at is not None
    authenticate({"x-api-key": FUTURE}, cfg, expires_at - timedelta(microseconds=1))
    with pytest.raises(GatewayError) as info:
        authenticate({"x-api-key": FUTURE}, cfg, expires_at)
    assert info.value.code == "expired_api_key"


def test_wrong_secret_on_expired_key_is_invalid_not_expired(cfg: config.GatewayConfig) -> None:
    """Expiry is only revealed to someone who holds the key."""
    with pytest.raises(GatewayError) as info:
        authenticate({"x-api-key": _wrong_secret(EXPIRED)}, cfg, NOW)
    assert info.value.code == "invalid_api_key"


@pytest.mark.parametrize(("headers", "expected"), [
    ({"authorization": "Bearer abc"}, "abc"),
    ({"authorization": "Token abc"}, None),
    ({"authorization": "Token abc", "x-api-key": "k"}, "k"),
    ({"x-api-key": "k"}, "k"),
    ({}, None),
])
def test_presented_key(headers: dict[str, str], expected: str | None) -> None:
    assert identity.presented_key(headers) == expected


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer gwk_a_one", "x-api-key": "gwk_b_two"},
    {"authorization": "bearer gwk_a_one", "x-api-key": "gwk_a_one-more"},
    {"authorization": "Bearer gwk_a_one", "x-api-key": "junk"},
])
def test_two_different_keys_are_a_conflict_not_a_pick(headers: dict[str, str]) -> None:
    with pytest.raises(GatewayError) as info:
        identity.presented_key(headers)
    assert (info.value.code, info.value.status) == ("identity_conflict", 403)
    assert "gwk_a_one" not in info.value.message


@pytest.mark.parametrize("around", ["\u00a0", "\u3000", "\u2003", "\u0085", "\u1680", "\u200b"])
def test_only_spaces_and_tabs_surround_a_bearer_key(around: str) -> None:
    """HTTP's whitespace is SP and HTAB (RFC 9110 OWS). Python's str.strip() also took Unicode
    spaces off a bearer key (a NBSP or ideographic space pasted with it was the key), while the
    same value in x-api-key, or with an OIDC issuer configured, was refused: one rule now."""
    key = "gwk_demo_secret"
    assert identity.presented_key({"authorization": f"Bearer \t{key} \t"}) == key
    for value in (f"Bearer {key}{around}", f"Bearer {around}{key}"):
        assert identity.presented_key({"authorization": value}) != key, repr(value)


def test_the_same_key_in_both_headers_is_one_key() -> None:
    assert identity.presented_key({"authorization": "Bearer  gwk_a_one", "x-api-key": "gwk_a_one"}) == "gwk_a_one"


# -- workload identity (XFCC written by Envoy) and principal combination ----------------

from hypothesis import given, strategies as st  # noqa: E402

from gateway_extproc.identity_config import WorkloadRule  # noqa: E402


@pytest.mark.parametrize(("header", "expected"), [
    ("By=spiffe://td/gw;Hash=ab;URI=spiffe://td/ns/a/sa/b", {"by": ["spiffe://td/gw"], "hash": ["ab"],
                                                            "uri": ["spiffe://td/ns/a/sa/b"]}),
    ('Hash=1;URI="spiffe://td/x";DNS=a.svc;DNS=b.svc,By=p;URI=spiffe://td/proxy',
     {"hash": ["1"], "uri": ["spiffe://td/x"], "dns": ["a.svc", "b.svc"]}),
    ('Subject="CN=a,O=b;c";URI=spiffe://td/y', {"subject": ["CN=a,O=b;c"], "uri": ["spiffe://td/y"]}),
    ('Subject="say \\"hi\\"";URI=u', {"subject": ['say "hi"'], "uri": ["u"]}),
    ("", {}),
    ("garbage", {}),
])
def test_xfcc_first_element(header: str, expected: dict[str, list[str]]) -> None:
    assert identity.xfcc_first(header) == expected


@given(st.text(max_size=300))
def test_xfcc_parser_never_raises(header: str) -> None:
    identity.xfcc_first(header)


@pytest.mark.parametrize(("san", "pattern", "value", "matches"), [
    ("spiffe", "spiffe://td/ns/p/sa/*", "spiffe://td/ns/p/sa/api", True),
    ("spiffe", "spiffe://td/ns/p/sa/*", "spiffe://td/ns/p/sa/", False),
    ("spiffe", "spiffe://td/ns/p/sa/*", "spiffe://td/ns/p/sa/api/extra", False),
    ("spiffe", "spiffe://td/ns/p/sa/*", "spiffe://td/ns/px/sa/api", False),
    ("spiffe", "spiffe://td/ns/p/sa/api", "spiffe://td/ns/p/sa/api", True),
    ("spiffe", "spiffe://td/ns/p/sa/api", "spiffe://td/ns/p/sa/api2", False),
    ("dns", "*.web.svc", "a.web.svc", True),
    ("dns", "*.web.svc", "a.b.web.svc", False),
    ("dns", "*.web.svc", ".web.svc", False),
    ("dns", "*.web.svc", "web.svc", False),
])
def test_workload_patterns(san: str, pattern: str, value: str, matches: bool) -> None:
    principal = config.VirtualKey("workload:x", "", "t", None, None)
    assert WorkloadRule(san, pattern, principal).matches(value) is matches


def _identity_config() -> config.GatewayConfig:
    raw = {"version": 1, "listen": ["unix:///tmp/gw.sock"],
           "providers": [{"name": "openai", "kind": "openai", "baseURL": "https://api.openai.com/v1",
                          "credential": {"env": "OPENAI_API_KEY"}}],
           "models": [{"name": n, "backends": [{"provider": "openai", "model": "gpt-4o-mini"}]} for n in ("m1", "m2")],
           "teams": [{"name": "payments"}], "identity": {
        "workloads": {"principals": [
            {"name": "pay", "spiffe": "spiffe://td/ns/pay/sa/*", "team": "payments", "models": ["m1", "m2"]},
            {"name": "pay-batch", "spiffe": "spiffe://td/ns/pay/sa/batch", "team": "payments", "models": ["m1"]}]},
        "oidc": {"providers": [{"name": "corp", "issuer": "https://i", "jwks": {"inline": "{}"}, "teamClaim": "groups",
                                "teams": {"grp-pay": "payments"}, "models": ["m2"]}]}}}
    return config.parse(raw)


def test_principal_precedence_and_allow_list_intersection() -> None:
    cfg = _identity_config()
    pay = {"x-forwarded-client-cert": "By=x;URI=spiffe://td/ns/pay/sa/api"}
    key = authenticate(pay, cfg, NOW)
    assert (key.id, key.team, key.models) == ("workload:pay", "payments", frozenset({"m1", "m2"}))
    assert authenticate({"x-forwarded-client-cert": "URI=spiffe://td/ns/pay/sa/batch"}, cfg, NOW).id == \
        "workload:pay-batch"  # exact beats wildcard
    claims = {"corp": {"sub": "alice", "groups": ["other", "grp-pay"]}}
    both = authenticate(pay, cfg, NOW, claims)
    assert (both.id, both.team, both.user, both.models) == ("workload:pay", "payments", "alice", frozenset({"m2"}))
    token = authenticate({}, cfg, NOW, claims)
    assert (token.id, token.team, token.user) == ("token:corp", "payments", "alice")
    with pytest.raises(GatewayError) as e:
        authenticate({}, cfg, NOW, {"corp": {"sub": "bob", "groups": ["unknown"]}})
    assert e.value.code == "identity_not_mapped"
    with pytest.raises(GatewayError) as e:
        authenticate({"x-forwarded-client-cert": "URI=spiffe://td/ns/other/sa/x"}, cfg, NOW)
    assert e.value.code == "identity_not_mapped"


@pytest.mark.parametrize(("xfcc", "outcome"), [
    # Several URI SANs: an X.509-SVID has one, and Envoy's unquoted XFCC cannot tell them from
    # one SAN holding ';URI=…' (a CA-signed `…/ns/other/sa/x;URI=spiffe://…/pay/sa/api`).
    ("URI=spiffe://td/ns/pay/sa/batch;URI=spiffe://td/ns/pay/sa/api", "identity_conflict"),
    ("URI=spiffe://td/ns/other/sa/x;URI=spiffe://td/ns/pay/sa/api", "identity_conflict"),
    ("URI=spiffe://td/ns/pay/sa/api;URI=spiffe://td/ns/pay/sa/web", "identity_conflict"),
    ('URI=spiffe://td/ns/other/sa/x";URI="spiffe://td/ns/pay/sa/api', "identity_conflict"),  # quote smuggling
    ("DNS=a.other.svc;URI=spiffe://td/ns/pay/sa/api", "identity_conflict"),  # a URI after a DNS SAN
    ('URI=spiffe://td/ns/other/sa/x"', "identity_conflict"),
    ("URI=spiffe://td/ns/other/sa/x,URI=spiffe://td/ns/pay/sa/api", "identity_not_mapped"),  # next element
    ("Hash=ab;URI=spiffe://td/ns/pay/sa/api;DNS=a.svc;DNS=b.svc", "workload:pay"),
    ('By=spiffe://td/gw;Subject="CN=x;URI=y";URI=spiffe://td/ns/pay/sa/api', "workload:pay"),
])
def test_a_certificate_with_ambiguous_sans_is_a_conflict_not_a_pick(xfcc: str, outcome: str) -> None:
    cfg = _identity_config()
    if outcome.startswith("workload:"):
        assert authenticate({"x-forwarded-client-cert": xfcc}, cfg, NOW).id == outcome
        return
    with pytest.raises(GatewayError) as e:
        authenticate({"x-forwarded-client-cert": xfcc}, cfg, NOW)
    assert e.value.code == outcome
    assert e.value.status == 403


def test_budget_levels_follow_the_user_a_workload_carries() -> None:
    """One workload principal, many end users: each request's plan has its own user level."""
    from gateway_extproc.budgets.gate import BudgetGate
    from gateway_extproc.budgets.store import MemoryBudgetStore

    raw = {"version": 1, "listen": ["unix:///tmp/gw.sock"],
           "providers": [{"name": "openai", "kind": "openai", "baseURL": "https://api.openai.com/v1",
                          "credential": {"env": "OPENAI_API_KEY"}}],
           "models": [{"name": "m1", "backends": [{"provider": "openai", "model": "g",
                                                   "pricing": {"input": 1, "output": 1}}]}],
           "teams": [{"name": "payments", "budget": {"daily": 10}}],
           "users": [{"name": "alice", "budget": {"daily": 1}}, {"name": "bob", "budget": {"daily": 2}}],
           "identity": {"workloads": {"principals": [{"name": "pay", "spiffe": "spiffe://td/ns/p/sa/*",
                                                      "team": "payments"}]}}}
    cfg = config.parse(raw)
    gate = BudgetGate(cfg, MemoryBudgetStore())
    workload = cfg.identity.workloads[0].principal
    from dataclasses import replace
    names = {user: {lv.name for lv in gate.shape(replace(workload, user=user), cfg.models["m1"], NOW).levels}
             for user in ("alice", "bob")}
    assert "user:alice" in names["alice"] and "user:bob" in names["bob"] and "user:alice" not in names["bob"]
    assert "team:payments" in names["alice"] and "key:workload:pay" in names["bob"]


@given(sa=st.sampled_from(["api", "batch", "x", None]), sub=st.one_of(st.none(), st.text(min_size=1, max_size=8)),
       groups=st.lists(st.sampled_from(["grp-pay", "other", ""]), max_size=3))
def test_combined_principal_never_widens_an_allow_list(sa: str | None, sub: str | None, groups: list[str]) -> None:
    cfg = _CFG
    headers = {"x-forwarded-client-cert": f"URI=spiffe://td/ns/pay/sa/{sa}"} if sa else {}
    claims = {"corp": {"sub": sub, "groups": groups}} if sub is not None else None
    workload = cfg.identity.workload("spiffe", f"spiffe://td/ns/pay/sa/{sa}") if sa else None
    try:
        p = authenticate(headers, cfg, NOW, claims)
    except GatewayError as e:
        assert e.code in ("identity_not_mapped", "missing_api_key")
        return
    present = [x.models for x in (workload,) if x is not None] + ([cfg.identity.oidc["corp"].models] if claims else [])
    for allowed in present:
        assert allowed is None or (p.models is not None and p.models <= allowed)
    if workload is not None:
        assert (p.id, p.team) == (workload.id, workload.team)
        assert p.user == (sub if claims else workload.user)


_CFG = _identity_config()


def test_a_verified_token_that_names_nobody_is_not_mapped_rather_than_missing() -> None:
    with pytest.raises(GatewayError) as e:
        authenticate({}, _CFG, NOW, {"corp": {"iss": "https://i"}})
    assert e.value.code == "identity_not_mapped"


# Envoy hands jwt_authn's payload over as a protobuf Struct, where every JSON number is a double:
# `"sub": 4711` arrives as 4711.0 (router._jwt_claims). Before, a number was no name at all, so
# a numeric user id lost its user budget and a numeric group fell to defaultTeam.
@pytest.mark.parametrize(("claims", "user", "team"), [
    ({"sub": 4711.0, "groups": [42.0]}, "4711", "payments"),
    ({"sub": 4711, "groups": 42}, "4711", "payments"),
    ({"sub": -3.0, "groups": ["grp-pay"]}, "-3", "payments"),
    # Not exact in a double (2^53 + 1 arrives as 2^53): no name rather than someone else's.
    ({"sub": float(2 ** 53), "groups": ["grp-pay"]}, None, "payments"),
    ({"sub": 1.5, "groups": [True, 42.5, "grp-pay"]}, None, "payments"),
    ({"sub": True, "groups": [{"grp-pay": 1}, ["grp-pay"]]}, None, None),
    ({"sub": {"name": "alice"}, "groups": "grp-pay"}, None, "payments"),
])
def test_numeric_claims_name_a_user_and_team_as_their_digits(claims: dict[str, object], user: str | None,
                                                              team: str | None) -> None:
    import dataclasses

    corp = dataclasses.replace(_CFG.identity.oidc["corp"], teams={"grp-pay": "payments", "42": "payments"})
    assert identity.token_principal(corp, claims) == (user, team)
