from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway_extproc.budgets.windows import current_windows, day_span

NY = ZoneInfo("America/New_York")


def test_utc_windows():
    day, month = current_windows(datetime(2026, 11, 23, 15, 30, tzinfo=UTC))
    assert (day.kind, day.id, day.ends_at) == ("daily", "2026-11-23", datetime(2026, 11, 24, tzinfo=UTC))
    assert (month.kind, month.id, month.ends_at) == ("monthly", "2026-11", datetime(2026, 12, 1, tzinfo=UTC))


def test_seconds_until_reset_and_ttl():
    now = datetime(2026, 11, 23, 23, 0, tzinfo=UTC)
    day, _ = current_windows(now)
    assert day.seconds_until_reset(now) == 3600
    assert day.ttl_s(now) == 3600 + 86400
    assert day.seconds_until_reset(now + timedelta(hours=2)) == 0


def test_the_local_date_names_the_window():
    tokyo = ZoneInfo("Asia/Tokyo")
    day, _ = current_windows(datetime(2026, 11, 22, 20, 0, tzinfo=UTC), tokyo)  # 05:00 on the 23rd in Tokyo
    assert day.id == "2026-11-23"
    assert day.ends_at == datetime(2026, 11, 24, tzinfo=tokyo)


@pytest.mark.parametrize(("local_day", "hours"), [((2026, 3, 8), 23), ((2026, 11, 1), 25), ((2026, 6, 1), 24)])
def test_dst_days_are_23_or_25_hours_long(local_day, hours):
    noon = datetime(*local_day, 12, tzinfo=NY)
    day, _ = current_windows(noon, NY)
    previous, _ = current_windows(noon - timedelta(days=1), NY)
    assert day.ends_at - previous.ends_at == timedelta(hours=hours)
    assert day.ends_at.astimezone(NY).replace(tzinfo=None) == datetime(*local_day) + timedelta(days=1)


def test_both_repeated_hours_at_fall_back_are_the_same_day():
    first, second = (datetime(2026, 11, 1, 1, 30, fold=f, tzinfo=NY) for f in (0, 1))
    assert first != second.astimezone(UTC)
    assert current_windows(first, NY) == current_windows(second, NY)
    assert current_windows(first, NY)[0].seconds_until_reset(first) == 23.5 * 3600


def test_month_and_year_ends():
    day, month = current_windows(datetime(2026, 12, 31, 23, 59, 59, tzinfo=NY), NY)
    assert (day.id, month.id) == ("2026-12-31", "2026-12")
    assert day.ends_at == month.ends_at == datetime(2027, 1, 1, tzinfo=NY)
    assert current_windows(datetime(2027, 1, 1, tzinfo=NY), NY)[1].id == "2027-01"
    assert current_windows(datetime(2026, 1, 31, 12, tzinfo=UTC))[1].ends_at == datetime(2026, 2, 1, tzinfo=UTC)
    assert current_windows(datetime(2028, 2, 28, 12, tzinfo=UTC))[0].ends_at == datetime(2028, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"])
def test_windows_tile_time_for_a_whole_year(zone):
    """Every window ends exactly where the next begins, including where DST skips midnight
    (America/Santiago) or shifts by half an hour (Lord Howe)."""
    tz = ZoneInfo(zone)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    while now < datetime(2027, 1, 1, tzinfo=UTC):
        for window in current_windows(now, tz):
            assert window.ends_at > now
            kind = 0 if window.kind == "daily" else 1
            assert current_windows(window.ends_at - timedelta(microseconds=1), tz)[kind].id == window.id
            assert current_windows(window.ends_at, tz)[kind].id != window.id
        now += timedelta(hours=5)


def test_santiago_day_without_a_midnight_ends_when_the_clock_jumps():
    santiago = ZoneInfo("America/Santiago")
    day, _ = current_windows(datetime(2026, 9, 5, 12, tzinfo=santiago), santiago)
    assert day.ends_at == datetime(2026, 9, 6, 4, tzinfo=UTC)  # 00:00 -04 == 01:00 -03
    assert current_windows(day.ends_at, santiago)[0].id == "2026-09-06"


def test_naive_now_is_rejected():
    with pytest.raises(ValueError):
        current_windows(datetime(2026, 11, 23, 12))


@pytest.mark.parametrize("zone", ["UTC", "America/Santiago", "Australia/Lord_Howe"])
def test_day_span_agrees_with_the_daily_window_for_a_whole_year(zone):
    """The span the budget gate caches (it asks the calendar again only outside it) holds
    `now`, names the same day as the daily window and ends where that window ends."""
    tz = ZoneInfo(zone)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    while now < datetime(2027, 1, 1, tzinfo=UTC):
        day, start, end = day_span(now, tz)
        daily = current_windows(now, tz)[0]
        assert start <= now.timestamp() < end and day == daily.id and end == daily.ends_at.timestamp()
        assert day_span(datetime.fromtimestamp(start, UTC), tz)[0] == day
        assert day_span(datetime.fromtimestamp(start, UTC) - timedelta(microseconds=1), tz)[0] != day
        now += timedelta(hours=7)
