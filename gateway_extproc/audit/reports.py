"""Reports computed from the audit trail: chargeback per team, the model inventory, and the
key admin actions.

Both read request records only, so they add up to what the gateway counted: tokens and cost
are the same numbers `genai_tokens_total` and `genai_request_cost_dollars_total` were
incremented with. A team's budget comes from the config version in force at its last
request of the period (configs/<sha256>.yaml kept by the writer), so the report shows the
budget that applied, not today's.

`render` is the one entry point for both the CLI (`gateway-extproc report ...`) and the key
admin listener (`GET /admin/reports/...`): it checks the parameters, computes the report and
formats it, so the two can never disagree.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from ..config import load_yaml
from ..errors import quoted  # a caller's value (the admin API's query) may be a pasted key
from .records import records
from .writer import CONFIGS

REFUSED = frozenset({"refused", "blocked"})


def month_range(month: str, tz: str = "UTC") -> tuple[str, str]:
    """`YYYY-MM` in time zone `tz` (use budgets.timezone, so the month is the budget's) ->
    [start, end) as ISO strings in the trail's format (UTC)."""
    y, m = (int(x) for x in month.split("-"))
    zone = ZoneInfo(tz)
    start = datetime(y, m, 1, tzinfo=zone)
    end = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=zone)
    return tuple(t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in (start, end))  # type: ignore[return-value]


@dataclass
class Totals:
    requests: int = 0
    refused: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_nano: int = 0
    first_seen: str = ""
    last_seen: str = ""

    def add(self, rec: dict[str, Any]) -> None:
        self.requests += 1
        self.refused += rec.get("decision") in REFUSED
        self.input_tokens += rec.get("input_tokens") or 0
        self.output_tokens += rec.get("output_tokens") or 0
        self.cached_tokens += rec.get("cached_tokens") or 0
        self.cost_nano += rec.get("cost_nano") or 0
        ts = rec["ts"]
        self.first_seen = min(self.first_seen or ts, ts)
        self.last_seen = max(self.last_seen, ts)

    def row(self) -> dict[str, Any]:
        return {"requests": self.requests, "refused": self.refused, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "cached_tokens": self.cached_tokens,
                "cost_usd": _usd(self.cost_nano)}


@dataclass
class TeamReport:
    totals: Totals = field(default_factory=Totals)
    by: dict[str, dict[str, Totals]] = field(default_factory=lambda: {k: {} for k in ("key", "user", "model",
                                                                                      "provider")})
    config: str = ""
    config_ts: str = ""


def _usd(nano: int) -> str:
    return str((Decimal(nano) / Decimal(10**9)).quantize(Decimal("0.000001")))


_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "cost_nano")
_NAMES = ("team", "key_id", "user", "model", "provider", "config", "decision")


def _requests(root: Path, start: str, end: str) -> Iterable[dict[str, Any]]:
    """Request records of a team in [start, end), of the shape the writer writes (a field of
    another type is tampering: skipped here, named by verify)."""
    for rec in records(root, frozenset({"request"})):
        if start <= rec["ts"] < end and rec.get("team") and all(
                type(rec.get(k)) in (int, type(None)) for k in _COUNTS) and all(
                isinstance(rec.get(k), (str, type(None))) for k in _NAMES):
            yield rec


def chargeback(root: Path, month: str, tz: str = "UTC") -> dict[str, Any]:
    start, end = month_range(month, tz)
    teams: dict[str, TeamReport] = {}
    for rec in _requests(root, start, end):
        t = teams.setdefault(rec["team"], TeamReport())
        t.totals.add(rec)
        for dim in ("key", "user", "model", "provider"):
            value = rec.get("key_id" if dim == "key" else dim)
            if value:
                t.by[dim].setdefault(value, Totals()).add(rec)
        if rec["ts"] >= t.config_ts and rec.get("config"):
            t.config, t.config_ts = rec["config"], rec["ts"]
    configs = _configs(root)
    out = []
    for name in sorted(teams):
        t = teams[name]
        budget = _monthly_budget(configs.get(t.config), name)
        row = {"team": name, **t.totals.row(), "monthly_budget_usd": budget,
               "share_used": float(Decimal(t.totals.cost_nano) / Decimal(10**9) / Decimal(budget)) if budget else None,
               "config": t.config}
        for dim, values in t.by.items():
            row[f"by_{dim}"] = [{dim: v, **values[v].row()} for v in sorted(values)]
        out.append(row)
    return {"month": month, "timezone": tz, "from": start, "to": end, "teams": out}


def inventory(root: Path, start: str = "", end: str = "~") -> dict[str, Any]:
    rows: dict[tuple[str, str, str], Totals] = {}
    for rec in _requests(root, start, end):
        rows.setdefault((rec["team"], rec.get("model") or "", rec.get("provider") or ""), Totals()).add(rec)
    return {"from": start or None, "to": None if end == "~" else end, "rows": [
        {"team": t, "model": m, "provider": p, "first_seen": v.first_seen, "last_seen": v.last_seen, **v.row()}
        for (t, m, p), v in sorted(rows.items())]}


def admin_actions(root: Path, start: str = "", end: str = "~") -> dict[str, Any]:
    """Key admin API calls on the record (serve's own chain): who changed which key, when,
    under which config version, and the credentials refused; oldest first."""
    rows = [{k: v for k, v in rec.items() if k not in ("prev", "seq", "type")}
            for rec in records(root, frozenset({"admin"})) if start <= rec["ts"] <= end]
    rows.sort(key=lambda r: r["ts"])
    return {"from": start or None, "to": None if end == "~" else end, "rows": rows}


def _configs(root: Path) -> dict[str, Path]:
    d = root / CONFIGS
    return {p.stem[:16]: p for p in d.glob("*.yaml")} if d.is_dir() else {}


def _monthly_budget(path: Path | None, team: str) -> str | None:
    if path is None:
        return None
    doc = load_yaml(path.read_text(encoding="utf-8")) or {}
    for t in doc.get("teams") or []:
        if t.get("name") == team:
            monthly = (t.get("budget") or {}).get("monthly")
            return str(Decimal(str(monthly))) if monthly is not None else None
    return None


# A cell starting with one of these is a formula to Excel and Sheets (CSV injection, OWASP).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """A CSV row whose text cells a spreadsheet shows as text: names come from token claims (a
    user's own `name` or `email` at the IdP), keys and admins, so one starting with = + - @
    (or a tab or CR) gets a leading apostrophe. A CR becomes LF: the writer (lines end in LF)
    quotes a cell holding LF but not one holding a bare CR, which readers take as a row break,
    the next row then starting with the caller's text. Control characters become U+FFFD (the
    CSV is printed to terminals). JSON reports keep values as recorded (escaped)."""
    return {k: _cell(v) if isinstance(v, str) else v for k, v in row.items()}


# What a terminal obeys rather than shows (ESC sequences, BEL, C1 controls as CSI) and what
# reorders the text around it (bidi overrides): a user claim may hold any of it.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text for a terminal: control characters (but LF and tab) as U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def _cell(text: str) -> str:
    return printable((f"'{text}" if text.startswith(_FORMULA) else text).replace("\r", "\n"))


CHARGEBACK_COLUMNS = ("scope", "team", "name", "requests", "refused", "input_tokens", "output_tokens",
                      "cached_tokens", "cost_usd", "monthly_budget_usd", "share_used")


def chargeback_csv(report: dict[str, Any]) -> str:
    """One row per team (scope `team`), then one per key, user, model and provider of it."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CHARGEBACK_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for t in report["teams"]:
        w.writerow(_safe({"scope": "team", "name": t["team"], **t}))
        for dim in ("key", "user", "model", "provider"):
            for row in t[f"by_{dim}"]:
                w.writerow(_safe({"scope": dim, "team": t["team"], "name": row[dim], **row}))
    return buf.getvalue()


INVENTORY_COLUMNS = ("team", "model", "provider", "first_seen", "last_seen", "requests", "refused", "input_tokens",
                     "output_tokens", "cached_tokens", "cost_usd")


def inventory_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, INVENTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(_safe(row) for row in report["rows"])
    return buf.getvalue()


class ReportError(ValueError):
    """A report parameter that is wrong; `param` is its name (`--month`, `?month=`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


ADMIN_COLUMNS = ("ts", "actor", "action", "key_id", "team", "config", "details")


def admin_csv(report: dict[str, Any]) -> str:
    """One row per admin action; fields beyond the columns go to `details` as JSON."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, ADMIN_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in report["rows"]:
        extra = {k: v for k, v in row.items() if k not in ADMIN_COLUMNS}
        w.writerow(_safe({**{k: row.get(k) for k in ADMIN_COLUMNS[:-1]},
                          "details": orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode() if extra else ""}))
    return buf.getvalue()


REPORTS = ("chargeback", "inventory", "admin")
FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


def render(kind: str, root: Path, params: Mapping[str, str | None]) -> tuple[str, bytes]:
    """(content type, body) of report `kind` over the trail at `root`. params: `month`,
    `timezone` (chargeback); `from`, `to` (inventory, admin: ISO date or time, UTC; a bare date as
    `to` means the end of that day); `format` (csv, the default, or json)."""
    fmt = params.get("format") or "csv"
    if fmt not in FORMATS:
        raise ReportError("format", f"format {quoted(fmt)} must be csv or json")
    if kind == "chargeback":
        month, tz = params.get("month"), params.get("timezone") or "UTC"
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ReportError("timezone", f"timezone {quoted(tz)} is not an IANA time zone (e.g. Europe/Berlin)") \
                from None
        try:
            if not month or not _MONTH.fullmatch(month):
                raise ValueError
            month_range(month, tz)
        except (ValueError, OverflowError):
            raise ReportError("month", f"month {quoted(month or '')} must be YYYY-MM") from None
        report = chargeback(root, month, tz)
        text = chargeback_csv(report) if fmt == "csv" else None
    elif kind in ("inventory", "admin"):
        start, end = params.get("from"), params.get("to")
        window = (iso_param("from", start) if start else "", iso_param("to", end, True) if end else "~")
        report = inventory(root, *window) if kind == "inventory" else admin_actions(root, *window)
        to_csv = inventory_csv if kind == "inventory" else admin_csv
        text = to_csv(report) if fmt == "csv" else None
    else:
        raise ReportError("report", f"no report {quoted(kind)}; there are {', '.join(REPORTS)}")
    body = text.encode() if text is not None else orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    return FORMATS[fmt], body


_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def iso_param(param: str, value: str, end: bool = False) -> str:
    """A date or time as the trail writes it (UTC, microseconds, Z); a bare date as an end
    means the end of that day."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        if end and len(value) == 10:
            dt = dt.replace(hour=23, minute=59, second=59, microsecond=999999)
        return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (ValueError, OverflowError):  # not ISO, or past the calendar's ends once in UTC
        raise ReportError(param, f"{param} {quoted(value)} must be an ISO date or time, e.g. 2026-11-01") from None
