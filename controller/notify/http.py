"""The one HTTP POST all receivers share; failures become NotificationError without the URL.

``post_json`` judges the HTTP status alone (Slack, webhooks, Alertmanager). Chat robots (DingTalk,
Feishu, WeCom) answer HTTP 200 even when they refuse a message and put the verdict in the body
(``{"errcode": 310000, ...}``), so ``post_json_reply`` returns the status and the body for the
caller to judge (``controller.notify.robot.check_reply``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from controller.errors import NotificationError, NotificationTimeout

__all__ = ["JsonReply", "post_json", "post_json_reply", "receiver_name", "safe_host"]


def safe_host(url: str) -> str:
    """The host of a URL, for names and logs; never its path or query (Slack puts secrets there)."""
    return urlsplit(url).hostname or "?"


def receiver_name(kind: str, name: str | None, url: str) -> str:
    """A receiver's name: the one given, else the host and a short digest of the whole URL.

    Names key delivery and de-duplication, so two receivers must never share one by accident (two
    Slack channels, two webhooks on one host); 24 bits of a hash tell them apart and reveal nothing.
    """
    if name:
        return f"{kind}:{name}"
    digest = hashlib.sha256(url.encode()).hexdigest()[:6]
    return f"{kind}:{safe_host(url)}#{digest}"


def _post(name: str, url: str, body: Any, *, timeout: float, headers: dict[str, str] | None) -> requests.Response:
    try:
        return requests.post(url, json=body, timeout=timeout, headers=headers)
    except requests.Timeout as exc:
        raise NotificationTimeout(f"{name}: no answer within {timeout:g}s (it may have arrived)") from exc
    except requests.RequestException as exc:
        raise NotificationError(f"{name}: {type(exc).__name__}") from exc


def post_json(name: str, url: str, body: Any, *, timeout: float, headers: dict[str, str] | None = None) -> None:
    """POST ``body`` as JSON; any failure is a NotificationError naming the receiver, not the URL."""
    response = _post(name, url, body, timeout=timeout, headers=headers)
    if not 200 <= response.status_code < 300:
        raise NotificationError(f"{name}: HTTP {response.status_code}")


@dataclass(frozen=True, slots=True)
class JsonReply:
    """What a receiver answered: the HTTP status and the JSON body (None when it was not JSON)."""

    status: int
    body: Any


def post_json_reply(
    name: str, url: str, body: Any, *, timeout: float, headers: dict[str, str] | None = None
) -> JsonReply:
    """POST ``body`` as JSON and return the answer, whatever its status; transport failures as in post_json."""
    response = _post(name, url, body, timeout=timeout, headers=headers)
    try:
        parsed: Any = response.json()
    except ValueError:
        parsed = None
    return JsonReply(response.status_code, parsed)
