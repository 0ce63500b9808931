"""WeCom (企业微信) group robot.

Our own code, not a library's: see ``controller.notify.robot``. The protocol, as WeCom documents it
for group robots:

- POST ``{"msgtype": "markdown", "markdown": {"content": ...}}`` to the webhook URL
  (``https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=<key>``); the key is the only secret
  (WeCom robots have no signing);
- ``content`` is at most 4096 bytes of UTF-8: a longer text is cut here, between characters, keeping
  the runbook link and the alert id, rather than refused there (a lost rollback page);
- the answer is ``{"errcode": 0, "errmsg": "ok"}``; any other errcode (45009 rate limit, 93000 bad
  key, 40058 content too long) means nobody saw the message.
"""

from __future__ import annotations

from controller.core.alerts import Alert
from controller.notify.http import post_json_reply, receiver_name
from controller.notify.robot import check_reply, fit_utf8, title_and_lines, url_secrets

__all__ = ["MAX_CONTENT_BYTES", "WeComNotifier"]

#: WeCom's limit on a markdown message's content, in UTF-8 bytes.
MAX_CONTENT_BYTES = 4096


class WeComNotifier:
    """Posts the alert as markdown; the URL (its key) never appears in names or logs."""

    def __init__(self, url: str, *, name: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("a WeCom webhook URL must start with http:// or https://")
        self._url = url
        self.name = receiver_name("wecom", name, url)

    def send(self, alert: Alert, *, timeout: float) -> None:
        """One delivery attempt."""
        title, lines = title_and_lines(alert)
        head = "\n".join([f"**{title}**", *lines])
        tail = (f"\n[runbook]({alert.runbook_url})" if alert.runbook_url else "") + f"\nalert id {alert.id}"
        body = {"msgtype": "markdown", "markdown": {"content": fit_utf8(head, tail, MAX_CONTENT_BYTES)}}
        reply = post_json_reply(self.name, self._url, body, timeout=timeout)
        check_reply(self.name, reply, code_keys=("errcode",), message_keys=("errmsg",), secrets=url_secrets(self._url))
