"""Calendar budget windows (a day, a month) in one configured time zone.

Budgets reset at local midnight, as finance teams expect, so a window is a calendar period
in a `zoneinfo.ZoneInfo`, not a rolling 24 h. The clock is always passed in, so tests and replicas
agree on the window for a given instant. `ends_at` is kept in UTC: subtracting two aware
datetimes that share a `ZoneInfo` ignores DST offsets, and UTC arithmetic cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal

# Counters outlive their window by a day, so a late settle or a report still finds them.
_GRACE = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Window:
    """One budget period: `id` is '2026-11-23' (daily) or '2026-11' (monthly) in local time."""

    kind: Literal["daily", "monthly"]
    id: str
    ends_at: datetime  # UTC, exclusive

    def seconds_until_reset(self, now: datetime) -> float:
        return max(0.0, (self.ends_at - _aware(now)).total_seconds())

    def ttl_s(self, now: datetime) -> int:
        """Redis TTL for this window's counters: until the window ends, plus one day."""
        return math.ceil(self.seconds_until_reset(now) + _GRACE.total_seconds())


def current_windows(now: datetime, tz: tzinfo = UTC) -> tuple[Window, Window]:
    """The (daily, monthly) windows that contain `now`, with `tz` usually a `ZoneInfo`."""
    today = _aware(now).astimezone(tz).date()
    next_month = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    return (
        Window("daily", today.isoformat(), _midnight(today + timedelta(days=1), tz)),
        Window("monthly", f"{today.year:04d}-{today.month:02d}", _midnight(next_month, tz)),
    )


def day_span(now: datetime, tz: tzinfo = UTC) -> tuple[str, float, float]:
    """The local day that contains `now`: (its id, its start and end as Unix timestamps), so
    a caller can tell whether a later instant is still in it without date arithmetic."""
    today = _aware(now).astimezone(tz).date()
    return today.isoformat(), _midnight(today, tz).timestamp(), _midnight(today + timedelta(days=1), tz).timestamp()


def _midnight(day: date, tz: tzinfo) -> datetime:
    # Where DST skips midnight (e.g. America/Santiago), fold=0 resolves the missing 00:00
    # with the pre-transition offset, which is exactly the instant the new day begins.
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware; a naive time has no unambiguous window")
    return now
