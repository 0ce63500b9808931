"""Clocks: the wall clock, and a compressed one for the demo."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

__all__ = ["CompressedClock", "SystemClock"]


class SystemClock:
    """The real time, UTC."""

    def now(self) -> datetime:
        """Now."""
        return datetime.now(UTC)


class CompressedClock:
    """Time that runs ``factor`` times faster than the wall clock, from the moment it is made.

    The demo uses it so a policy with real-looking durations (10s checks, 1m bakes) plays out in
    seconds, with the same engine and scheduler as production.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self._start_wall = datetime.now(UTC)
        self._start_mono = time.monotonic()

    def now(self) -> datetime:
        """Compressed now."""
        elapsed = time.monotonic() - self._start_mono
        return self._start_wall + timedelta(seconds=elapsed * self.factor)
