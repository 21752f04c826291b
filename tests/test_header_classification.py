"""Request headers classified with the body (policy/headers.py, `Policy.check_request`):
which lines are scanned, where findings land, what the forwarded headers become, and that
no error message ever quotes a header's value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_extproc import config, keys
from gateway_extproc.errors import GatewayError
from gateway_extproc.policy.classification import Policy, Verdict
from gateway_extproc.policy.headers import (OWNED, SEPARATOR, Header, HeaderEdit, edit, forwarded, joined, place,
                                            where)
from gateway_extproc.policy.scanner import Finding
from gateway_extproc.render import chart_values, render_values

ROOT = Path(__file__).resolve().parent.parent
CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.com"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
ALLOWED_EMAIL = "support@example.com"
SDK_HEADERS = {  # what the openai and anthropic SDKs send, plus tracing: never a finding
    "user-agent": "OpenAI/Python 1.99.9", "x-stainless-lang": "python", "x-stainless-package-version": "1.99.9",
    "x-stainless-os": "Linux", "x-stainless-arch": "x64", "x-stainless-runtime": "CPython",
    "x-stainless-runtime-version": "3.11.7", "x-stainless-async": "false", "x-stainless-retry-count": "0",
    "x-stainless-read-timeout": "600", "x-stainless-timeout": "600", "accept": "application/json",
    "content-type": "application/json", "openai-beta": "assistants=v2", "anthropic-version": "2023-06-01",
    "anthropic-beta": "prompt-caching-2024-07-31,tools-2024-05-16", "x-stainless-helper-method": "stream",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "congo=t61rcWkgMzE",
    "x-request-id": "8d6b2c4e-1f0a-4c55-9e0b-000000000123", "idempotency-key": "stainless-python-retry-3b1f1c7e"}
MONITOR_KEY = keys.generate("monitor")


@pytest.fixture(scope="module")
def setup() -> tuple[Policy, config.GatewayConfig]:
    values = chart_values([ROOT / "helm" / "values-local.yaml"])
    values["keys"].append({"id": "monitor", "sha256": keys.digest(MONITOR_KEY), "team": "demo",
                           "classification": {"mode": "monitor"}})
    values["classification"]["allowlist"] = [{"value": ALLOWED_EMAIL, "reason": "the public support address"}]
    cfg = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "values-local (rendered)")
    assert cfg.classification is not None
    return Policy(cfg.classification), cfg


def check(setup: tuple[Policy, config.GatewayConfig], headers: dict[str, str] | list[tuple[str, str]],
          content: str = "Nothing sensitive here.", model: str = "default-chat", key: str = "demo") -> Verdict:
    policy, cfg = setup
    pairs = headers.items() if isinstance(headers, dict) else headers
    lines = forwarded(((k, v.encode()) for k, v in pairs), ())
    k = cfg.keys[key]
    return policy.check_request({"model": model, "messages": [{"role": "user", "content": content}]}, k,
                                cfg.teams.get(k.team), None, cfg.models[model], "demo", lines)


def refused(setup, headers, **kw) -> GatewayError:  # type: ignore[no-untyped-def]
    with pytest.raises(GatewayError) as err:
        check(setup, headers, **kw)
    return err.value


# -- which lines are scanned -------------------------------------------------------------


def test_forwarded_keeps_what_reaches_the_provider_in_wire_order() -> None:
    lines = forwarded([(":path", b"/v1/chat/completions"), (":authority", b"gw"), ("user-agent", b"a"),
                       ("authorization", b"Bearer k"), ("x-request-id", b"r"), ("x-b", b"1"), ("x-b", b"2"),
                       ("content-length", b"9"), ("x-latin", b"caf\xe9")], removed={"authorization"})
    assert lines == (Header("user-agent", "a"), Header("x-b", "1"), Header("x-b", "2"),
                     Header("x-latin", "caf\xe9", utf8=False))
    assert lines[-1].encode("caf\xe9 [X]") == b"caf\xe9 [X]"  # written back as it came


@given(st.lists(st.tuples(st.sampled_from([":path", ":method", "x-request-id", "content-length", "user-agent",
                                           "x-a", "cookie", "x-gateway-model"]), st.binary(max_size=20)),
                max_size=12))
def test_forwarded_never_keeps_pseudo_owned_or_removed_lines(entries: list[tuple[str, bytes]]) -> None:
    removed = {"cookie", "x-gateway-model"}
    lines = forwarded(entries, removed)
    assert [h.name for h in lines] == [n for n, _ in entries if n in ("user-agent", "x-a")]
    for h, (_, raw) in zip(lines, [e for e in entries if e[0] in ("user-agent", "x-a")]):
        assert h.encode(h.text) == raw  # every byte is seen, and can be written back


# -- where findings land -------------------------------------------------------------------

_TEXT = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=15)


def offsets(texts: list[str]) -> list[int]:
    out, pos = [], 0
    for t in texts:
        out.append(pos)
        pos += len(t) + len(SEPARATOR)
    return out


@given(st.lists(_TEXT, min_size=1, max_size=6), st.data())
def test_place_clips_each_finding_to_the_headers_it_covers(texts: list[str], data: st.DataObject) -> None:
    headers = [Header(f"x-{i}", t) for i, t in enumerate(texts)]
    whole = joined(headers)
    start = data.draw(st.integers(0, len(whole)))
    end = data.draw(st.integers(start, len(whole)))
    finding = Finding("credit_card", "credit_card", start, end, whole[start:end], 0)
    placed = place(headers, [finding])
    pieces = []
    for i in sorted(placed):
        [piece] = placed[i]
        assert 0 <= piece.start < piece.end <= len(texts[i]) and piece.index == i
        assert piece.value == finding.value  # the whole value: one placeholder wherever it lies
        pieces.append(texts[i][piece.start:piece.end])
    assert "".join(pieces) == "".join(texts)[0:0] + "".join(
        t[max(0, start - a):max(0, min(len(t), end - a))] for t, a in zip(texts, offsets(texts)))


def test_edit_sends_each_name_once_and_removes_names_with_findings() -> None:
    headers = [Header("x-a", "1"), Header("x-b", "mail x"), Header("x-b", "ok"), Header("x-7", "v")]
    assert edit(headers, ["1", "mail x", "ok", "v"], ()) is None
    assert edit(headers, ["1", "mail [EMAIL_1]", "ok", "v"], [3]) == HeaderEdit({"x-b": b"mail [EMAIL_1], ok"},
                                                                                ("x-7",))


@given(st.lists(st.tuples(st.text(min_size=1, max_size=70), _TEXT), min_size=1, max_size=5), st.data())
def test_where_quotes_plain_names_only_and_never_a_value(lines: list[tuple[str, str]], data: st.DataObject) -> None:
    headers = [Header(n, v) for n, v in lines]
    at = data.draw(st.lists(st.integers(0, len(headers) - 1), max_size=5))
    in_names = set(data.draw(st.lists(st.integers(0, len(headers) - 1), max_size=3)))
    said = where(headers, at, in_names)
    for i in at:
        name = headers[i].name
        plain = len(name) <= 64 and name[:1].isalpha() and all(c in "abcdefghijklmnopqrstuvwxyz-" for c in name)
        named = any(h.name == name for j, h in enumerate(headers) if j in in_names)  # its name holds a finding
        assert (repr(name) in said) == (plain and not named and i not in in_names) or (
            repr(name) in said and any(headers[j].name == name and j not in in_names for j in at))
        value = lines[i][1]
        assert any(value == h.name for h in headers) or repr(value) not in said
    assert ("header" in said) == bool(at) or "name" in said


def test_a_key_sent_as_a_header_name_is_never_quoted(setup) -> None:
    """A header name that is itself a key (it holds a finding, or has digits or underscores,
    as keys do) is never quoted back, not even when its value holds a finding too."""
    for name in ("sk-proj-abc123def456ghi789jkl012mno345pqr", "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                 "gwk_demo_local-only-demo-key-not-for-production", "akiaiosfodnn7example"):
        for value in ("4111 1111 1111 1111", "AKIAIOSFODNN7EXAMPLE"):
            err = refused(setup, [(name, value)])
            assert name not in err.message and name[:12] not in err.message, err.message
            assert "request header" in err.message


# -- decisions -------------------------------------------------------------------------------


def test_ordinary_sdk_headers_have_no_findings(setup) -> None:
    verdict = check(setup, SDK_HEADERS)
    assert verdict.headers is None and verdict.tier == "public"


@pytest.mark.parametrize("name", ["user-agent", "x-anything", "openai-beta", "X-Odd-Casing"])
def test_a_card_in_a_header_is_a_tier_violation_naming_the_header(setup, name: str) -> None:
    err = refused(setup, {**SDK_HEADERS, name.lower(): f"client {CARD}"})
    assert err.code == "classification_violation" and f"request header {name.lower()!r}" in err.message
    assert "4111" not in err.message


def test_a_card_next_to_numeric_headers_is_still_a_card(setup) -> None:
    err = refused(setup, {"x-retry": "7", "x-card": CARD, "x-stainless-retry-count": "0"})
    assert err.code == "classification_violation" and "'x-card'" in err.message
    verdict = check(setup, [("x-part", "9"), ("x-part", CARD), ("x-part", "0")], model="private-chat")
    assert verdict.headers == HeaderEdit({"x-part": b"9, [CREDIT_CARD_1], 0"}, ())


def test_encoded_values_in_headers_are_decoded_like_the_body(setup) -> None:
    import base64
    import urllib.parse
    for value in (base64.b64encode(CARD.encode()).decode(), urllib.parse.quote(f"card={CARD}"),
                  CARD.replace(" ", "\u00a0")):
        assert refused(setup, {"x-data": value}).code == "classification_violation", value


def test_a_secret_in_a_header_blocks_as_in_the_body(setup) -> None:
    err = refused(setup, {"x-upload-key": AWS_KEY})
    assert err.code == "content_blocked" and "request header 'x-upload-key'" in err.message and "AKIA" not in str(err)
    soft_or_monitor = check(setup, {"x-upload-key": AWS_KEY}, key="monitor")
    assert soft_or_monitor.headers is None  # monitor: logged only


def test_a_redact_finding_is_redacted_in_place_with_the_bodys_placeholder(setup) -> None:
    verdict = check(setup, {"user-agent": "app/1.0", "x-contact": f"mail {EMAIL} now"}, content=f"Write to {EMAIL}.")
    assert verdict.headers == HeaderEdit({"x-contact": b"mail [EMAIL_1] now"}, ())
    assert verdict.body is not None and verdict.body["messages"][0]["content"] == "Write to [EMAIL_1]."
    clean_body = check(setup, {"x-contact": EMAIL})
    assert clean_body.body is None and clean_body.headers == HeaderEdit({"x-contact": b"[EMAIL_1]"}, ())


def test_a_finding_in_a_header_name_removes_the_header(setup) -> None:
    name = "x-4111111111111111"
    err = refused(setup, {name: "1"})
    assert "a request header's name" in err.message and "4111" not in err.message
    assert check(setup, {name: "1", "x-ok": "1"}, model="private-chat").headers == HeaderEdit({}, (name,))


def test_allowlisted_values_and_monitor_mode_pass_unchanged(setup) -> None:
    assert check(setup, {"x-contact": ALLOWED_EMAIL}).headers is None
    verdict = check(setup, {"user-agent": f"client {CARD}"}, key="monitor")
    assert verdict.headers is None and verdict.tier == "restricted"  # monitor: served anyway, as for a body


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_characters="\x7f"), max_size=40),
       st.sampled_from(["user-agent", "x-a", "x-b-1", "openai-beta"]))
def test_no_answer_quotes_a_header_value(setup, noise: str, name: str) -> None:
    value = f"{noise} {CARD} {noise}"
    try:
        verdict = check(setup, {name: value})
    except GatewayError as err:
        assert CARD not in err.message and "1111" not in err.message.replace(CARD, "")
        try:  # the message for the card alone: its own words (`rest` is in `restricted`) quote nothing
            check(setup, {name: CARD})
            template = ""
        except GatewayError as alone:
            template = alone.message
        assert len(noise.strip()) < 4 or noise.strip() not in err.message or noise.strip() in template
    else:  # the noise made it another value (a longer number): still never a card
        assert verdict.headers is None or b"4111 1111 1111 1111" not in b"".join(verdict.headers.set.values())


def effective(lines: list[tuple[str, str]], change: HeaderEdit | None) -> list[tuple[str, str]]:
    """The header lines the provider gets after the router applies `change`."""
    if change is None:
        return lines
    out = [(n, v) for n, v in lines if n not in change.set and n not in change.remove]
    return out + [(n, v.decode("latin-1")) for n, v in change.set.items()]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user-agent", "x-a", "x-b", "x-note", "openai-beta", "x-stainless-os"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12).map(str.strip)), max_size=6),
       st.integers(0, 6), st.sampled_from([0]), st.sampled_from([CARD, "4111-1111-1111-1111", "4111111111111111"]),
       st.sampled_from(["default-chat", "private-chat"]))
def test_a_card_placed_anywhere_in_the_headers_never_leaves_whole(setup, lines: list[tuple[str, str]], at: int,
                                                                  groups: int, card: str, model: str) -> None:
    """Wherever the card goes (inside any value, between any neighbours: digits, letters),
    the request is refused or the card does not reach the provider. (A card split over two
    headers is not joined: docs/classification.md.)"""
    lines = list(lines)
    at = min(at, len(lines))
    cut = 5 * groups - 1 if groups and card != "4111111111111111" else 0  # a compact card goes whole
    head, tail = card[:cut].strip(" -"), card[cut:].strip(" -")
    if head and tail:
        lines[at:at] = [("x-split", head), ("x-split-2", tail)]
    else:
        lines.insert(at, ("x-card", f"is {card} ok"))
    try:
        verdict = check(setup, lines, model=model)
    except GatewayError as err:
        assert err.code == "classification_violation" and "4111" not in err.message
        return
    assert model == "private-chat"
    sent = "\n".join(v for _, v in effective(lines, verdict.headers))
    assert "41111111" not in "".join(c for c in sent if c.isdigit())


def test_constant_values_are_not_scanned_but_their_variants_are(setup) -> None:
    assert forwarded([("content-type", b"application/json"), ("accept", b"*/*")], ()) == ()
    assert refused(setup, {"content-type": f"application/json; charset={CARD}"}).code == "classification_violation"
