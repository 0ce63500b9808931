"""Logging set up once: structlog, JSON in a container, readable on a terminal.

Library modules get a logger with ``structlog.get_logger()`` and bind the policy name; no module
prints. What the client libraries log through the standard ``logging`` (APScheduler, urllib3,
kubernetes) goes through the same processors, so in JSON mode every line is JSON. urllib3's
per-retry warnings (one per attempt while Prometheus is down: hundreds a minute) are silenced:
the failed check is logged once, with its reason. Every string in every line has its URLs
reduced to scheme://host (no userinfo, path or query: that is where secrets are).

Both writers (structlog's and the standard logging's handler) write through one ``_Lines``: each
line in one write, under one lock, flushed. Two of them writing the same stream, each with its own
lock, once joined a line of one thread to a line of another (found by the two-replica tests).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

from controller.core.text import redact_urls
from controller.settings import LogFormat

__all__ = ["configure_logging", "redact"]

_HANDLER_NAME = "gateway-canary"
#: loggers whose warnings repeat per retry or per request, kept to errors
_QUIETED = ("urllib3.connectionpool", "urllib3.util.retry", "kubernetes.client.rest")


class _Lines:
    """A stream whose every ``write`` is whole: written and flushed under one lock."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            written = int(self._out.write(text))
            self._out.flush()
        return written

    def flush(self) -> None:
        """Every write was flushed already."""

    def isatty(self) -> bool:
        return bool(self._out.isatty())


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact_urls(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def redact(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: URLs in every value lose their userinfo, path and query."""
    for key, value in list(event.items()):
        event[key] = _scrub(value)
    return event


def configure_logging(fmt: LogFormat = LogFormat.AUTO, level: str = "INFO", *, stream: Any = None) -> None:
    """Configure structlog, and route the standard logging of the client libraries through it."""
    out = _Lines(stream or sys.stderr)
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
    # Tracebacks are made text before redaction, in both modes: an exception's message may hold a URL.
    tail: list[Any] = [structlog.processors.format_exc_info, redact, renderer]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # message and newline in one write (the factory asks for a TextIO: it uses write and flush)
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, out)),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))  # the libraries: warnings and errors
    for name in _QUIETED:
        logging.getLogger(name).setLevel(logging.ERROR)
