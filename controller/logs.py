"""Logging set up once: structlog, JSON in a container, readable on a terminal.

Library modules get a logger with ``structlog.get_logger()`` and bind the policy name; no module
prints. What the client libraries log through the standard ``logging`` (APScheduler, urllib3,
kubernetes) goes through the same processors, so in JSON mode every line is JSON. urllib3's
per-retry warnings (one per attempt while Prometheus is down: hundreds a minute) are silenced:
the failed check is logged once, with its reason. Every string in every line has its URLs
reduced to scheme://host (no userinfo, path or query: that is where secrets are).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from controller.core.text import redact_urls
from controller.settings import LogFormat

__all__ = ["configure_logging", "redact"]

_HANDLER_NAME = "gateway-canary"
#: loggers whose warnings repeat per retry or per request, kept to errors
_QUIETED = ("urllib3.connectionpool", "urllib3.util.retry", "kubernetes.client.rest")


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
    # Tracebacks are made text before redaction, in both modes: an exception's message may hold a URL.
    tail: list[Any] = [structlog.processors.format_exc_info, redact, renderer]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
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
