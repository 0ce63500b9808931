"""Durations as people write them in policies ("30s", "5m", "1h30m") and as PromQL wants them."""

from __future__ import annotations

import math
import re
from datetime import timedelta

__all__ = ["MAX_DURATION", "format_promql_duration", "parse_duration"]

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


#: The longest duration a policy may name; more is a typo, never a plan.
MAX_DURATION = timedelta(days=365)


def parse_duration(value: object) -> timedelta:
    """Parse ``"1h30m"``, ``"45s"``, ``"250ms"`` or a number of seconds, 0 up to a year.

    Raises ValueError with the accepted forms, so the policy loader can show them to the user.
    """
    if isinstance(value, timedelta):
        return value
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        pos = 0
        total = 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if text and pos == len(text):
            seconds = total
    if seconds is None:
        shown = repr(value)[:60]
        raise ValueError(f"{shown} is not a duration: write e.g. '30s', '5m', '1h30m', '250ms' (or seconds)")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION.total_seconds():
        raise ValueError(f"{value!r:.60} is outside 0s..365d")
    return timedelta(seconds=seconds)


def format_promql_duration(value: timedelta) -> str:
    """Render a window for a PromQL range selector, in whole milliseconds or seconds."""
    millis = round(value.total_seconds() * 1000)
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"
