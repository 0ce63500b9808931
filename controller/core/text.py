"""Free text that leaves the controller (logs, reasons, Events, alerts, the state): made safe to show.

Pure string work, shared by the core, the adapters and the logging set-up.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["MAX_REASON_CHARS", "Text", "bounded", "checked_url", "printable", "redact_urls"]

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


_URL_SHAPE = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#\[\]]*@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@]*)(?::(?P<port>[0-9]*))?(?P<rest>[/?#].*)?$"
)


def checked_url(text: str) -> str:
    """An http(s) URL with a host; ValueError saying what is wrong, never echoing the URL (a secret).

    Parsed here by a pattern, not urllib (the core imports no I/O library, urllib included).
    """
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError("the URL contains spaces or control characters")
    match = _URL_SHAPE.match(text)
    if not text.lower().startswith(("http://", "https://")):
        raise ValueError("the URL must start with http:// or https://")
    if match is None:
        raise ValueError("not a URL (its host or port is malformed, e.g. unbalanced [ ])")
    if not match.group("host"):
        raise ValueError("the URL has no host")
    port = match.group("port")
    if port is not None and (not port or not 0 < int(port) < 65536):
        raise ValueError("the URL's port is not a number from 1 to 65535")
    return text


def printable(value: str | None) -> str | None:
    """``value`` unless it holds control characters (ValueError: they would forge log lines)."""
    if value is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("contains control characters (newlines, tabs, escapes)")
    return value


#: Free text people give things: no control characters (they would forge log lines and alert text).
Text = Annotated[str, BeforeValidator(lambda v: printable(v) if isinstance(v, str) else v)]
