"""Advance windows: when the weight may go up (``schedule.advanceWindows``).

Pure: ``now`` is given, never read. Only raises wait for a window; analysis, rollback and any
write that lowers the ASM gateway's share run at any time (the decision's ``_permit``).

Time zones come from the IANA database (``zoneinfo``; the ``tzdata`` package supplies it where
the system has none, e.g. a slim container). A window is judged in local time, so a window of
10:00-16:00 in Asia/Shanghai stays 10:00-16:00 there whatever the controller's clock zone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from controller.core.policy import AdvanceWindows, TimeWindow

__all__ = ["next_opening", "window_blocker", "zone"]

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
#: how far ahead an opening is searched for (freeze dates can close a long stretch)
_HORIZON_DAYS = 400


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ValueError naming it when there is no such zone."""
    if not name or name.startswith(("/", ".")) or ".." in name:
        raise ValueError(f"{name[:64]!r} is not an IANA time zone name (e.g. Asia/Shanghai, UTC)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"{name[:64]!r} is not an IANA time zone name (e.g. Asia/Shanghai, UTC)") from exc


def _frozen(spec: AdvanceWindows, day: date) -> str | None:
    """The freeze entry covering ``day`` (a local date), if any."""
    for entry in spec.freeze_dates:
        first, _, last = entry.partition("..")
        if date.fromisoformat(first) <= day <= date.fromisoformat(last or first):
            return entry
    return None


def _open_intervals(window: TimeWindow, day: date) -> list[tuple[int, int]]:
    """Minutes of ``day`` (local) the window covers: its own opening, and the tail of the
    previous day's overnight opening."""
    start, end = window.minutes()
    covered: list[tuple[int, int]] = []
    overnight = end <= start
    if _DAY_NAMES[day.weekday()] in window.days:
        covered.append((start, 1440 if overnight else end))
    if overnight and _DAY_NAMES[(day - timedelta(days=1)).weekday()] in window.days:
        covered.append((0, end))
    return covered


def _inside(spec: AdvanceWindows, local: datetime) -> bool:
    minute = local.hour * 60 + local.minute
    return any(start <= minute < end for window in spec.windows for start, end in _open_intervals(window, local.date()))


def describe(spec: AdvanceWindows) -> str:
    """The windows in words, for reasons and ``plan``."""
    parts = [f"{_days(window.days)} {window.hours}" for window in spec.windows]
    return f"{', '.join(parts)} {spec.time_zone}"


def _days(days: Sequence[str]) -> str:
    if len(days) == 7:
        return "daily"
    indexes = sorted(_DAY_NAMES.index(day) for day in days)
    if indexes == list(range(indexes[0], indexes[-1] + 1)) and len(indexes) > 2:
        return f"{_DAY_NAMES[indexes[0]]}-{_DAY_NAMES[indexes[-1]]}"
    return ",".join(_DAY_NAMES[i] for i in indexes)


def next_opening(spec: AdvanceWindows, now: datetime) -> datetime | None:
    """The first moment at or after ``now`` a raise may happen (``now`` itself when inside a
    window and not frozen; else in UTC); None when nothing opens within the search horizon."""
    tz = zone(spec.time_zone)
    local = now.astimezone(tz)
    if _inside(spec, local) and _frozen(spec, local.date()) is None:
        return now
    for offset in range(_HORIZON_DAYS + 1):
        day = local.date() + timedelta(days=offset)
        if _frozen(spec, day) is not None:
            continue
        # every interval start is a candidate (0 included: the tail of an overnight window opens
        # at midnight when the evening before was frozen or not yet reached)
        starts = sorted({start for window in spec.windows for start, _ in _open_intervals(window, day)})
        for minute in starts:
            # through UTC: a start in the hour a DST change skips names the moment that exists
            moment = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=tz).astimezone(UTC).astimezone(tz)
            if moment >= local and _inside(spec, moment):
                return moment.astimezone(UTC)
    return None


def window_blocker(spec: AdvanceWindows | None, now: datetime) -> str | None:
    """Why a raise may not happen at ``now`` (None: it may), with when it next may."""
    if spec is None:
        return None
    tz = zone(spec.time_zone)
    local = now.astimezone(tz)
    frozen = _frozen(spec, local.date())
    opening = next_opening(spec, now)
    if opening == now:
        return None
    when = "nothing opens within a year" if opening is None else f"next opens {_local(opening, tz)}"
    if frozen is not None:
        return f"a freeze date ({frozen} {spec.time_zone}) holds raises; {when}"
    return f"outside the advance windows ({describe(spec)}); {when}"


def _local(moment: datetime, tz: ZoneInfo) -> str:
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
