"""The chat receivers Alibaba Cloud teams use: DingTalk, Feishu/Lark and WeCom group robots.

Part of the policy model (``controller.core.policy`` puts them in its ``Receiver`` union); kept in
a module of their own so the policy module does not grow, which is also why this module imports
nothing from it (the policy imports this one). The robot's webhook URL carries its access token,
and the signing secret signs every message: both are secrets, so both are best named by an
environment variable (``urlFromEnv``, ``secretFromEnv``), are never echoed in a validation error,
and an inline ``url`` is a SecretStr that prints as asterisks.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator
from pydantic.alias_generators import to_camel

__all__ = ["ChatReceiver", "DingTalkReceiver", "FeishuReceiver", "WeComReceiver"]

#: Names of environment variables a policy may point at.
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: scheme://[userinfo@]host[:port][rest]; enough to refuse what cannot be a webhook URL.
_URL = re.compile(
    r"^https?://(?:[^@/?#\s]*@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@\s]+)(?::(?P<port>\d{1,5}))?(?:[/?#]|$)",
    re.IGNORECASE,
)


def _checked_url(text: str) -> str:
    """An http(s) URL with a host; ValueError saying what is wrong, never the URL (it holds the token).

    A pattern, not urllib: the core imports no I/O library. Deliberately smaller than the policy's
    own check (which this module cannot import without a cycle): the adapter rejects the rest.
    """
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError("the URL contains spaces or control characters")
    if not text.lower().startswith(("http://", "https://")):
        raise ValueError("the URL must start with http:// or https://")
    match = _URL.match(text)
    if match is None:
        raise ValueError("not a URL with a host (and, if given, a port)")
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError("the URL's port is not a number from 1 to 65535")
    return text


def _printable(value: Any) -> Any:
    if isinstance(value, str) and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("contains control characters (newlines, tabs, escapes)")
    return value


#: A receiver's name: shown in logs and metrics, so no control characters (they would forge lines).
_Name = Annotated[str, BeforeValidator(_printable)]


class ChatReceiver(BaseModel):
    """A group robot reached at a secret webhook URL: given inline or, better, named by a variable."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)

    name: _Name | None = Field(
        default=None,
        max_length=63,
        description="what logs, metrics and delivery outcomes call this receiver (unique in the policy; "
        "'global' is taken); default: its type, host and a digest of its URL",
    )
    url: SecretStr | None = Field(
        default=None, description="the webhook URL inline; it is a secret (it carries a token): prefer urlFromEnv"
    )
    url_from_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        max_length=128,
        description="the environment variable that holds the webhook URL (it carries the robot's token)",
    )

    @model_validator(mode="after")
    def _one_url(self) -> ChatReceiver:
        if (self.url is None) == (self.url_from_env is None):
            raise ValueError("give exactly one of url or urlFromEnv (the name of an environment variable)")
        if self.url is not None:
            _checked_url(self.url.get_secret_value())
        return self


class DingTalkReceiver(ChatReceiver):
    """A DingTalk (钉钉) custom robot; sent as markdown, signed when ``secretFromEnv`` is given."""

    type: Literal["dingtalk"] = Field(description="which kind of receiver this is")
    secret_from_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        max_length=128,
        description="the environment variable that holds the robot's signing secret (加签, 'SEC...'); "
        "required when the robot's security setting is the signature",
    )


class FeishuReceiver(ChatReceiver):
    """A Feishu/Lark custom bot (自定义机器人); sent as text, signed when ``secretFromEnv`` is given."""

    type: Literal["feishu"] = Field(description="which kind of receiver this is")
    secret_from_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        max_length=128,
        description="the environment variable that holds the bot's signing secret (签名校验); "
        "required when the bot's security setting is the signature",
    )


class WeComReceiver(ChatReceiver):
    """A WeCom (企业微信) group robot; sent as markdown (WeCom robots have no signing)."""

    type: Literal["wecom"] = Field(description="which kind of receiver this is")
