"""DingTalk (钉钉) custom robot, optionally signed ("加签").

Our own code, not a library's: see ``controller.notify.robot``. The protocol, as DingTalk documents
it for custom robots:

- POST ``{"msgtype": "markdown", "markdown": {"title": ..., "text": ...}}`` to the webhook URL
  (``https://oapi.dingtalk.com/robot/send?access_token=...``);
- signed mode: ``timestamp`` is now in milliseconds, ``sign`` is
  urlencode(base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}"))), both appended to the
  URL's query; DingTalk refuses a timestamp more than an hour from its own clock;
- the answer is HTTP 200 with ``{"errcode": 0, "errmsg": "ok"}``; any other errcode (310000 bad
  signature or missing keyword, 130101 rate limit, 300001 bad token) means nobody saw the message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote_plus

from controller.core.alerts import Alert
from controller.notify.http import post_json_reply
from controller.notify.robot import SignedRobot, check_reply, fit_utf8, title_and_lines, url_secrets

__all__ = ["DingTalkNotifier", "dingtalk_sign"]

#: Bytes of markdown text sent; beyond it the middle of the message is cut (a safe bound: DingTalk
#: refuses an oversized message outright, and a lost rollback page is worse than a short one).
MAX_TEXT_BYTES = 18_000


def dingtalk_sign(timestamp_ms: str, secret: str) -> str:
    """The ``sign`` query value for ``timestamp_ms`` (already URL-encoded)."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return quote_plus(base64.b64encode(digest).decode())


class DingTalkNotifier(SignedRobot):
    """Posts the alert as markdown; the URL (its access token) and the secret never appear in names or logs."""

    kind = "dingtalk"
    label = "DingTalk"

    def send(self, alert: Alert, *, timeout: float) -> None:
        """One delivery attempt, signed anew (a retry an hour later must not reuse an old timestamp)."""
        title, lines = title_and_lines(alert)
        head = "\n\n".join([f"#### {title}", *(line for line in lines if line.strip())])
        tail = "".join(
            [
                f"\n\n[runbook]({alert.runbook_url})" if alert.runbook_url else "",
                f"\n\nalert id {alert.id}",
            ]
        )
        body = {"msgtype": "markdown", "markdown": {"title": title, "text": fit_utf8(head, tail, MAX_TEXT_BYTES)}}
        url = self._url
        if self._secret is not None:
            timestamp = str(round(self._clock() * 1000))
            separator = "&" if "?" in url else "?"
            url = f"{url}{separator}timestamp={timestamp}&sign={dingtalk_sign(timestamp, self._secret)}"
        reply = post_json_reply(self.name, url, body, timeout=timeout)
        secrets = [*url_secrets(self._url), *([self._secret] if self._secret else [])]
        check_reply(self.name, reply, code_keys=("errcode",), message_keys=("errmsg",), secrets=secrets)
