"""Feishu / Lark custom bot (自定义机器人), optionally signed ("签名校验").

Our own code, not a library's: see ``controller.notify.robot``. The protocol, as Feishu documents
it for custom bots:

- POST ``{"msg_type": "text", "content": {"text": ...}}`` to the webhook URL
  (``https://open.feishu.cn/open-apis/bot/v2/hook/<token>``). Plain text, not a card: every
  Feishu and Lark client shows it the same, and URLs in it are clickable;
- signed mode: the body also gets ``"timestamp"`` (now in SECONDS, as a string) and ``"sign"``,
  base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b"")): the secret is in the key, the
  message is empty (unlike DingTalk's); Feishu refuses a timestamp more than an hour off;
- the answer is ``{"code": 0, "msg": "success"}`` (older deployments: ``{"StatusCode": 0}``); a
  non-zero code (19021 bad signature, 9499 bad request, 11232 rate limit) means nobody saw it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from controller.core.alerts import Alert
from controller.notify.http import post_json_reply
from controller.notify.robot import SignedRobot, check_reply, fit_utf8, title_and_lines, url_secrets

__all__ = ["FeishuNotifier", "feishu_sign"]

#: Bytes of text sent (Feishu takes request bodies up to about 20 KB; JSON escaping needs room).
MAX_TEXT_BYTES = 16_000


def feishu_sign(timestamp_s: str, secret: str) -> str:
    """The body's ``sign`` for ``timestamp_s``."""
    digest = hmac.new(f"{timestamp_s}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class FeishuNotifier(SignedRobot):
    """Posts the alert as text; the URL (its token) and the secret never appear in names or logs."""

    kind = "feishu"
    label = "Feishu"

    def send(self, alert: Alert, *, timeout: float) -> None:
        """One delivery attempt, signed anew (a retry an hour later must not reuse an old timestamp)."""
        title, lines = title_and_lines(alert)
        head = "\n".join([title, *lines])
        tail = (f"\nrunbook: {alert.runbook_url}" if alert.runbook_url else "") + f"\nalert id {alert.id}"
        body: dict[str, Any] = {"msg_type": "text", "content": {"text": fit_utf8(head, tail, MAX_TEXT_BYTES)}}
        if self._secret is not None:
            timestamp = str(int(self._clock()))
            body.update(timestamp=timestamp, sign=feishu_sign(timestamp, self._secret))
        reply = post_json_reply(self.name, self._url, body, timeout=timeout)
        secrets = [*url_secrets(self._url), *([self._secret] if self._secret else [])]
        check_reply(
            self.name, reply, code_keys=("code", "StatusCode"), message_keys=("msg", "StatusMessage"), secrets=secrets
        )
