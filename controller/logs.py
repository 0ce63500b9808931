"""Logging set up once: structlog, JSON in a container, readable on a terminal.

Library modules get a logger with ``structlog.get_logger()`` and bind the policy name; no
module prints.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from controller.settings import LogFormat

__all__ = ["configure_logging"]


def configure_logging(fmt: LogFormat = LogFormat.AUTO, level: str = "INFO", *, stream: Any = None) -> None:
    """Configure structlog (and route stdlib logging of the client libraries through it)."""
    out = stream or sys.stderr
    use_json = fmt is LogFormat.JSON or (fmt is LogFormat.AUTO and not out.isatty())
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty(), sort_keys=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer] if use_json else [*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # The client libraries log through stdlib logging; keep them quiet unless they warn.
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(levelname)s %(name)s: %(message)s")
