"""Free text that leaves the controller (logs, reasons, Events, alerts, the state): made safe to show.

Pure string work, shared by the core, the adapters and the logging set-up.
"""

from __future__ import annotations

import re

__all__ = ["MAX_REASON_CHARS", "bounded", "redact_urls"]

#: Free text that is persisted (reasons, refusals) is cut to this many characters.
MAX_REASON_CHARS = 600

#: A URL in free text: scheme, then what may hold secrets (userinfo, path tokens, query).
_URL = re.compile(r"\b(https?)://([^\s/?#'\"<>]+)([^\s'\"<>]*)", re.IGNORECASE)


def redact_urls(text: str) -> str:
    """Every URL in ``text`` reduced to scheme://host[:port]: no userinfo, no path, no query.

    Secrets live in all three (``http://user:password@host``, Slack's path token, ``?token=``), so
    free text that is logged, persisted, sent in an alert or put in an Event shows only where.
    """

    def shorten(match: re.Match[str]) -> str:
        host = match.group(2).rsplit("@", 1)[-1]
        rest = "/…" if match.group(3) not in ("", "/") else ""
        return f"{match.group(1)}://{host}{rest}"

    return _URL.sub(shorten, text)


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` with URLs redacted, cut to ``limit`` characters, marked as cut."""
    text = redact_urls(text)
    return text if len(text) <= limit else text[: limit - 15] + " …[truncated]"
