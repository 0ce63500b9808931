"""The chat receivers Alibaba Cloud teams use: DingTalk, Feishu/Lark and WeCom group robots.

Part of the policy model (``controller.core.policy`` puts them in its ``Receiver`` union); kept in
a module of their own so the policy module does not grow, which is also why this module imports
nothing from it (the policy imports this one). The robot's webhook URL carries its access token,
and the signing secret signs every message: both are secrets, so both are best named by an
environment variable (``urlFromEnv``, ``secretFromEnv``), are never echoed in a validation error,
and an inline ``url`` is a SecretStr that prints as asterisks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.alias_generators import to_camel

from controller.core.text import Text, checked_url

__all__ = [
    "ChatReceiver",
    "DingTalkReceiver",
    "FeishuReceiver",
    "SecretUrlReceiver",
    "SignedChatReceiver",
    "WeComReceiver",
]

#: Names of environment variables a policy may point at.
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SecretUrlReceiver(BaseModel):
    """A receiver whose URL is a secret (it carries a token): given inline or, better, named by a variable."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)

    name: Text | None = Field(
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
        description="the environment variable that holds the webhook URL (it must match SECRET_ENV_PATTERN, "
        "by default GATEWAY_CANARY_POLICY_*)",
    )

    @model_validator(mode="after")
    def _one_url(self) -> SecretUrlReceiver:
        if (self.url is None) == (self.url_from_env is None):
            raise ValueError("give exactly one of url or urlFromEnv (the name of an environment variable)")
        if self.url is not None:
            checked_url(self.url.get_secret_value())
        return self


class ChatReceiver(SecretUrlReceiver):
    """A group robot (DingTalk, Feishu, WeCom)."""


class SignedChatReceiver(ChatReceiver):
    """A group robot that can sign every message with a secret."""

    secret_from_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        max_length=128,
        description="the environment variable that holds the robot's signing secret; required when the "
        "robot's security setting is the signature (DingTalk 加签, Feishu 签名校验)",
    )


class DingTalkReceiver(SignedChatReceiver):
    """A DingTalk (钉钉) custom robot; sent as markdown, signed when ``secretFromEnv`` is given."""

    type: Literal["dingtalk"] = Field(description="which kind of receiver this is")


class FeishuReceiver(SignedChatReceiver):
    """A Feishu/Lark custom bot (自定义机器人); sent as text, signed when ``secretFromEnv`` is given."""

    type: Literal["feishu"] = Field(description="which kind of receiver this is")


class WeComReceiver(ChatReceiver):
    """A WeCom (企业微信) group robot; sent as markdown (WeCom robots have no signing)."""

    type: Literal["wecom"] = Field(description="which kind of receiver this is")
