"""What the three chat robots (DingTalk, Feishu, WeCom) share: judging their answer, fitting the text.

Written here rather than taken from a library: no well-kept PyPI package covers all three with
signing and with the answer's code checked (``apprise`` posts to Feishu unsigned and trusts HTTP
200; ``dingtalkchatbot`` covers DingTalk alone and has been unmaintained since 2022), and each
protocol is one signed JSON POST.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit

from controller.core.alerts import Alert
from controller.core.text import redact_urls
from controller.errors import NotificationError
from controller.notify.http import JsonReply, receiver_name

__all__ = ["SignedRobot", "check_reply", "fit_utf8", "title_and_lines", "url_secrets"]

#: Characters of a robot's error message kept in an exception (it is logged with every retry).
_MESSAGE_CHARS = 160
_CUT = "\n…[truncated]"


def check_reply(
    name: str,
    reply: JsonReply,
    *,
    code_keys: tuple[str, ...],
    message_keys: tuple[str, ...],
    secrets: Iterable[str],
) -> None:
    """Raise a NotificationError unless the robot answered 2xx with 0 under the first of ``code_keys``.

    The robots answer HTTP 200 to a message they refuse (bad signature, rate limit, keyword
    missing) and say so in the body, so the status alone would count a lost page as delivered. An
    answer without a code (a proxy's HTML page, an empty body) is a failure too: only the robot's
    own 0 says the message reached the group. The robot's message is kept, short, with URLs reduced
    to their host and every secret (``secrets``) cut out, because the exception is logged.
    """
    body = reply.body if isinstance(reply.body, dict) else {}
    code = next((body[key] for key in code_keys if key in body), None)
    if 200 <= reply.status < 300 and code == 0 and not isinstance(code, bool):
        return
    message = next((str(body[key]) for key in message_keys if body.get(key)), "")
    status = "" if 200 <= reply.status < 300 else f"HTTP {reply.status}, "
    why = f"code {_scrub(str(code), secrets)}" if code is not None else "an answer without a code"
    detail = f": {_scrub(message, secrets)}" if message else ""
    raise NotificationError(f"{name}: {status}{why}{detail}")


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = redact_urls(text)
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def url_secrets(url: str) -> list[str]:
    """The parts of a webhook URL that may hold its token: the URL, long path segments, query values."""
    parts = urlsplit(url)
    segments = [segment for segment in parts.path.split("/") if len(segment) >= 16]
    return [url, *segments, *(value for _, value in parse_qsl(parts.query))]


def fit_utf8(head: str, tail: str, limit: int) -> str:
    """``head + tail`` in at most ``limit`` UTF-8 bytes, cutting ``head`` (never mid-character).

    ``tail`` (the runbook link and the alert id) always survives: a page cut short must still say
    where to look and which alert it is.
    """
    whole = head + tail
    if len(whole.encode()) <= limit:
        return whole
    budget = limit - len(tail.encode()) - len(_CUT.encode())
    if budget <= 0:
        return whole.encode()[:limit].decode(errors="ignore")
    return head.encode()[:budget].decode(errors="ignore") + _CUT + tail


def title_and_lines(alert: Alert) -> tuple[str, list[str]]:
    """The alert's first line (its title) and the others, from ``Alert.body()``.

    A template whose first line is blank still gets a title (DingTalk refuses an empty one): the summary.
    """
    title, _, rest = alert.body().lstrip("\n").partition("\n")
    return (title if title.strip() else alert.summary), rest.splitlines()


class SignedRobot:
    """What a robot that signs its messages keeps: the URL and secret (never shown) and a clock."""

    #: the receiver kind in names ("dingtalk") and in messages ("DingTalk")
    kind: ClassVar[str]
    label: ClassVar[str]

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` gives the Unix time in seconds for the signature's timestamp (a test's hand)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a {self.label} webhook URL must start with http:// or https://")
        self._url = url
        self._secret = secret or None
        self._clock = clock
        self.name = receiver_name(self.kind, name, url)
