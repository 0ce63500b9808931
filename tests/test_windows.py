"""Advance windows (controller.core.windows, ``schedule.advanceWindows``): when the weight may go up.

Judged in the windows' own time zone: a window's hours and a freeze date are local. An overnight
window belongs to the day it starts on; a freeze date is the local date of the moment judged.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from controller.core.policy import AdvanceWindows
from controller.core.windows import describe, next_opening, window_blocker, zone
from tests.helpers import make_policy

SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")


def windows(*spans: dict[str, Any], tz: str = "UTC", freeze: tuple[str, ...] = ()) -> AdvanceWindows:
    return AdvanceWindows.model_validate({"timeZone": tz, "windows": list(spans), "freezeDates": list(freeze)})


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def instant(moment: datetime | None) -> datetime | None:
    """The same moment in UTC: an opening is returned in local time, and a local time in a DST gap
    or fold never compares equal to another zone's (PEP 495), even at the same instant."""
    return None if moment is None else moment.astimezone(UTC)


WORKDAYS = {"days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "hours": "10:00-16:00"}
OFFICE_SHANGHAI = windows(WORKDAYS, tz="Asia/Shanghai")


# --- inside or outside -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "inside"),
    [
        (datetime(2026, 11, 24, 10, 0), True),  # a Tuesday: the start is inside
        (datetime(2026, 11, 24, 15, 59), True),
        (datetime(2026, 11, 24, 16, 0), False),  # the end is not
        (datetime(2026, 11, 24, 9, 59), False),
        (datetime(2026, 11, 28, 12, 0), False),  # a Saturday
    ],
)
def test_a_window_is_judged_in_its_own_zone(local: datetime, inside: bool) -> None:
    now = local.replace(tzinfo=SHANGHAI).astimezone(UTC)  # the controller's clock is UTC
    assert (window_blocker(OFFICE_SHANGHAI, now) is None) is inside
    assert (next_opening(OFFICE_SHANGHAI, now) == now) is inside


def test_outside_says_which_windows_and_when_the_next_opens_in_local_time() -> None:
    now = utc(2026, 11, 24, 12, 0)  # Tue 20:00 in Shanghai
    assert next_opening(OFFICE_SHANGHAI, now) == utc(2026, 11, 25, 2, 0)  # Wed 10:00 CST
    assert window_blocker(OFFICE_SHANGHAI, now) == (
        "outside the advance windows (Mon-Fri 10:00-16:00 Asia/Shanghai); next opens 2026-11-25 10:00 CST"
    )


def test_the_local_date_decides_the_day_not_the_utc_date() -> None:
    # Sunday 20:00 UTC is already Monday 04:00 in Shanghai: the window opens the same local morning
    assert next_opening(OFFICE_SHANGHAI, utc(2026, 11, 29, 20, 0)) == utc(2026, 11, 30, 2, 0)
    # Friday 09:00 UTC is Friday 17:00 there: closed until Monday
    assert next_opening(OFFICE_SHANGHAI, utc(2026, 11, 27, 9, 0)) == utc(2026, 11, 30, 2, 0)


def test_the_whole_day_by_default_and_several_windows_combine() -> None:
    always = windows({})
    for now in (utc(2026, 11, 24, 0, 0), utc(2026, 11, 24, 23, 59, 59), utc(2026, 11, 29, 12)):
        assert window_blocker(always, now) is None
    split = windows({"days": ["Mon"], "hours": "08:00-09:00"}, {"days": ["Mon"], "hours": "13:00-14:00"})
    monday = datetime(2026, 11, 30, tzinfo=UTC)
    assert next_opening(split, monday + timedelta(hours=9)) == monday + timedelta(hours=13)
    assert next_opening(split, monday + timedelta(hours=14)) == monday + timedelta(days=7, hours=8)
    assert describe(split) == "Mon 08:00-09:00, Mon 13:00-14:00 UTC"


def test_an_opening_is_a_minute_boundary_at_or_after_now() -> None:
    spec = windows({"hours": "10:30-11:00"})
    assert next_opening(spec, utc(2026, 11, 24, 10, 29, 59, 500000)) == utc(2026, 11, 24, 10, 30)
    assert next_opening(spec, utc(2026, 11, 24, 10, 30, 0, 1)) == utc(2026, 11, 24, 10, 30, 0, 1)  # now: inside
    assert next_opening(spec, utc(2026, 11, 24, 11, 0)) == utc(2026, 11, 25, 10, 30)


@pytest.mark.parametrize(
    ("days", "text"),
    [
        (["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], "daily"),
        (["Fri", "Mon", "Wed"], "Mon,Wed,Fri"),
        (["Tue", "Mon"], "Mon,Tue"),  # two days are listed, not a range
        (["Sat", "Sun", "Fri"], "Fri-Sun"),
    ],
)
def test_days_are_described_in_week_order(days: list[str], text: str) -> None:
    assert (
        describe(windows({"days": days, "hours": "01:00-02:00"}, tz="Asia/Tokyo")) == f"{text} 01:00-02:00 Asia/Tokyo"
    )


# --- overnight windows -------------------------------------------------------------------------------

FRIDAY_NIGHT = windows({"days": ["Fri"], "hours": "22:00-02:00"})


@pytest.mark.parametrize(
    ("now", "inside"),
    [
        (utc(2026, 11, 27, 21, 59), False),  # Friday
        (utc(2026, 11, 27, 22, 0), True),
        (utc(2026, 11, 27, 23, 59), True),
        (utc(2026, 11, 28, 0, 0), True),  # Saturday: the tail of Friday's window
        (utc(2026, 11, 28, 1, 59), True),
        (utc(2026, 11, 28, 2, 0), False),
        (utc(2026, 11, 28, 23, 0), False),  # Saturday evening: Saturday is not listed
        (utc(2026, 11, 27, 1, 0), False),  # Friday early: Thursday's window, not listed
    ],
)
def test_an_overnight_window_belongs_to_the_day_it_starts(now: datetime, inside: bool) -> None:
    assert (window_blocker(FRIDAY_NIGHT, now) is None) is inside


def test_the_next_overnight_opening_is_the_evening_it_starts() -> None:
    assert next_opening(FRIDAY_NIGHT, utc(2026, 11, 28, 2, 0)) == utc(2026, 12, 4, 22, 0)
    assert next_opening(FRIDAY_NIGHT, utc(2026, 11, 24, 12, 0)) == utc(2026, 11, 27, 22, 0)


def test_a_frozen_evening_leaves_the_tail_after_midnight_open() -> None:
    """A freeze date is the local date of the moment: the window's tail on the next date is open."""
    spec = windows({"days": ["Fri"], "hours": "22:00-02:00"}, freeze=("2026-11-27",))
    assert window_blocker(spec, utc(2026, 11, 27, 23, 0)) == (
        "a freeze date (2026-11-27 UTC) holds raises; next opens 2026-11-28 00:00 UTC"
    )
    assert next_opening(spec, utc(2026, 11, 27, 12, 0)) == utc(2026, 11, 28, 0, 0)
    assert window_blocker(spec, utc(2026, 11, 28, 1, 0)) is None
    # ...and a frozen morning closes the tail of the evening before
    morning = windows({"days": ["Fri"], "hours": "22:00-02:00"}, freeze=("2026-11-28",))
    assert window_blocker(morning, utc(2026, 11, 27, 23, 0)) is None
    assert window_blocker(morning, utc(2026, 11, 28, 1, 0)).startswith("a freeze date (2026-11-28 UTC)")  # type: ignore[union-attr]
    assert next_opening(morning, utc(2026, 11, 28, 1, 0)) == utc(2026, 12, 4, 22, 0)


# --- freeze dates ------------------------------------------------------------------------------------


def test_a_freeze_range_closes_every_date_in_it_and_the_next_opening_skips_it() -> None:
    spec = windows({"hours": "10:00-16:00"}, freeze=("2026-11-25..2026-11-27",))
    assert window_blocker(spec, utc(2026, 11, 24, 11, 0)) is None  # the day before
    for day in (25, 26, 27):
        blocker = window_blocker(spec, utc(2026, 11, day, 11, 0))
        assert blocker == "a freeze date (2026-11-25..2026-11-27 UTC) holds raises; next opens 2026-11-28 10:00 UTC"
    assert next_opening(spec, utc(2026, 11, 24, 17, 0)) == utc(2026, 11, 28, 10, 0)
    assert window_blocker(spec, utc(2026, 11, 28, 10, 0)) is None


def test_freeze_dates_are_local_dates() -> None:
    spec = windows({}, tz="Asia/Shanghai", freeze=("2026-11-25",))
    # 2026-11-24 17:00 UTC is 2026-11-25 01:00 in Shanghai: frozen, whatever the UTC date says
    assert window_blocker(spec, utc(2026, 11, 24, 17, 0)).startswith("a freeze date (2026-11-25 Asia/Shanghai)")  # type: ignore[union-attr]
    assert next_opening(spec, utc(2026, 11, 24, 17, 0)) == utc(2026, 11, 25, 16, 0)  # 26th 00:00 CST
    assert window_blocker(spec, utc(2026, 11, 24, 15, 59)) is None  # 24th 23:59 CST
    assert window_blocker(spec, utc(2026, 11, 25, 16, 0)) is None


def test_several_freeze_entries_in_a_row_are_all_skipped() -> None:
    spec = windows({"days": ["Mon"]}, freeze=("2026-11-30", "2026-12-07..2026-12-08"))
    assert next_opening(spec, utc(2026, 11, 29, 12, 0)) == utc(2026, 12, 14, 0, 0)


def test_a_freeze_longer_than_the_horizon_opens_nothing() -> None:
    spec = windows({}, freeze=("2026-01-01..2028-12-31",))
    now = utc(2026, 11, 24, 12, 0)
    assert next_opening(spec, now) is None
    assert window_blocker(spec, now) == (
        "a freeze date (2026-01-01..2028-12-31 UTC) holds raises; nothing opens within a year"
    )


def test_no_windows_spec_never_blocks() -> None:
    assert window_blocker(None, utc(2026, 11, 24, 3, 0)) is None


# --- daylight saving time ----------------------------------------------------------------------------


def test_a_window_in_the_hour_skipped_by_dst_opens_when_the_clocks_jump() -> None:
    # Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC)
    spec = windows({"hours": "02:00-04:00"}, tz="Europe/Berlin")
    opening = next_opening(spec, utc(2026, 3, 28, 23, 0))  # 00:00 CET
    assert instant(opening) == utc(2026, 3, 29, 1, 0)
    assert window_blocker(spec, utc(2026, 3, 29, 1, 30)) is None  # 03:30 CEST
    assert window_blocker(spec, utc(2026, 3, 29, 2, 0)) == (  # 04:00 CEST: closed
        "outside the advance windows (daily 02:00-04:00 Europe/Berlin); next opens 2026-03-30 02:00 CEST"
    )
    assert instant(next_opening(spec, utc(2026, 3, 29, 2, 0))) == utc(2026, 3, 30, 0, 0)


def test_an_opening_in_the_hour_skipped_by_dst_is_named_by_a_time_that_exists() -> None:
    """The reason an operator reads names the moment the window opens: 02:00 does not exist that night."""
    spec = windows({"hours": "02:00-04:00"}, tz="Europe/Berlin")
    blocker = window_blocker(spec, utc(2026, 3, 28, 23, 0))  # 00:00 CET
    assert blocker is not None
    assert blocker.endswith("next opens 2026-03-29 03:00 CEST"), blocker


def test_a_window_in_the_hour_repeated_by_dst_is_open_both_times() -> None:
    # Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:00-03:00 happens twice
    spec = windows({"hours": "02:00-03:00"}, tz="Europe/Berlin")
    assert instant(next_opening(spec, utc(2026, 10, 24, 22, 0))) == utc(2026, 10, 25, 0, 0)  # the first 02:00
    assert window_blocker(spec, utc(2026, 10, 25, 0, 30)) is None  # 02:30 CEST
    assert window_blocker(spec, utc(2026, 10, 25, 1, 30)) is None  # 02:30 CET
    assert window_blocker(spec, utc(2026, 10, 25, 2, 0)) is not None  # 03:00 CET
    assert instant(next_opening(spec, utc(2026, 10, 25, 2, 0))) == utc(2026, 10, 26, 1, 0)  # 02:00 CET


def test_a_window_keeps_its_local_hours_across_a_dst_change() -> None:
    spec = windows({"hours": "09:00-17:00"}, tz="Europe/Berlin")
    assert next_opening(spec, utc(2026, 3, 27, 20, 0)) == utc(2026, 3, 28, 8, 0)  # 09:00 CET
    assert next_opening(spec, utc(2026, 3, 29, 20, 0)) == utc(2026, 3, 30, 7, 0)  # 09:00 CEST


# --- the policy validates windows when it loads -----------------------------------------------------


def test_zone_names_are_iana_names() -> None:
    assert zone("Asia/Shanghai") == SHANGHAI
    for bad in ("Mars/Olympus_Mons", "", "../etc/passwd", "/etc/localtime", "Europe/../UTC"):
        with pytest.raises(ValueError, match="is not an IANA time zone name"):
            zone(bad)


def schedule_with(advance_windows: dict[str, Any]) -> dict[str, Any]:
    return {"steps": [10, 100], "bakeTime": "1m", "advanceWindows": advance_windows}


@pytest.mark.parametrize(
    ("advance_windows", "message"),
    [
        ({"timeZone": "Mars/Olympus_Mons", "windows": [{}]}, "'Mars/Olympus_Mons' is not an IANA time zone name"),
        ({"timeZone": "../../etc/passwd", "windows": [{}]}, "is not an IANA time zone name"),
        ({"windows": [{"hours": "25:00-26:00"}]}, "write HH:MM-HH:MM with a 24-hour clock"),
        ({"windows": [{"hours": "9:00-10:00"}]}, "write HH:MM-HH:MM with a 24-hour clock"),
        ({"windows": [{"hours": "10:00-10:60"}]}, "write HH:MM-HH:MM with a 24-hour clock"),
        ({"windows": [{"hours": "10:00"}]}, "write HH:MM-HH:MM with a 24-hour clock"),
        ({"windows": [{"hours": "10:00-24:30"}]}, "24:00 is the latest end"),
        ({"windows": [{"hours": "24:00-02:00"}]}, "write HH:MM-HH:MM with a 24-hour clock"),
        ({"windows": [{"hours": "10:00-10:00"}]}, "the window is empty"),
        ({"windows": []}, "at least 1 item"),
        ({"timeZone": "UTC"}, "windows"),
        ({"windows": [{"days": []}]}, "at least 1 item"),
        ({"windows": [{"days": ["Monday"]}]}, "days"),
        ({"windows": [{}], "freezeDates": ["2026-02-30"]}, "'2026-02-30': day is out of range"),
        ({"windows": [{}], "freezeDates": ["2026-13-01"]}, "'2026-13-01': month must be in 1..12"),
        ({"windows": [{}], "freezeDates": ["next friday"]}, "write YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD"),
        ({"windows": [{}], "freezeDates": ["2026-12-24.."]}, "write YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD"),
        ({"windows": [{}], "freezeDates": ["2026-12-31..2026-12-24"]}, "the range ends before it starts"),
        ({"windows": [{}], "freezeDates": ["2026-12-24..2026-02-30"]}, "day is out of range"),
        ({"windows": [{"hours": "10:00-11:00", "tz": "UTC"}]}, "Extra inputs are not permitted"),
    ],
)
def test_a_policy_with_a_bad_window_does_not_load(advance_windows: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        make_policy(schedule=schedule_with(advance_windows))
    assert message in str(raised.value)
    assert "advanceWindows" in str(raised.value)


def test_a_good_window_loads_with_its_defaults() -> None:
    policy = make_policy(schedule=schedule_with({"windows": [{"days": ["Sat"], "hours": "22:00-06:00"}]}))
    spec = policy.spec.schedule.advance_windows
    assert spec is not None and spec.time_zone == "UTC" and spec.freeze_dates == []
    assert spec.windows[0].minutes() == (22 * 60, 6 * 60)
    assert windows({}).windows[0].minutes() == (0, 1440)
    assert windows({}).windows[0].days == ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
