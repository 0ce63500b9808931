"""Receivers from a policy's ``alerts`` list plus the global ones in the settings.

An unknown type cannot reach here (the policy model rejects it); a secret named by
``urlFromEnv`` or ``secretFromEnv`` that is not set is an error against the policy, never a silent
skip (nor, for a signing secret, an unsigned message the robot would refuse).
"""

from __future__ import annotations

from controller.core.policy import AlertmanagerReceiver, CanaryPolicy, SlackReceiver, WebhookReceiver
from controller.core.receivers import ChatReceiver, DingTalkReceiver, FeishuReceiver, WeComReceiver
from controller.notify.alertmanager import AlertmanagerNotifier
from controller.notify.dingtalk import DingTalkNotifier
from controller.notify.feishu import FeishuNotifier
from controller.notify.slack import SlackNotifier
from controller.notify.webhook import WebhookNotifier
from controller.notify.wecom import WeComNotifier
from controller.ports import Notifier
from controller.settings import Settings

__all__ = ["chat_receiver", "global_receivers", "policy_receivers"]


def _secret_url(receiver: SlackReceiver | WebhookReceiver | ChatReceiver, index: int, settings: Settings) -> str:
    if receiver.url is not None:
        return receiver.url.get_secret_value()
    assert receiver.url_from_env is not None
    return settings.secret_from_env(receiver.url_from_env, f"alerts[{index}].urlFromEnv")


def chat_receiver(receiver: ChatReceiver, index: int, settings: Settings) -> Notifier:
    """A DingTalk, Feishu or WeCom robot from its policy entry; ValueError naming what is missing."""
    url = _secret_url(receiver, index, settings)
    if isinstance(receiver, WeComReceiver):
        return WeComNotifier(url, name=receiver.name)
    assert isinstance(receiver, DingTalkReceiver | FeishuReceiver)  # the three ChatReceiver types
    secret = None
    if receiver.secret_from_env is not None:
        secret = settings.secret_from_env(receiver.secret_from_env, f"alerts[{index}].secretFromEnv")
    if isinstance(receiver, DingTalkReceiver):
        return DingTalkNotifier(url, secret=secret, name=receiver.name)
    return FeishuNotifier(url, secret=secret, name=receiver.name)


def policy_receivers(policy: CanaryPolicy, settings: Settings) -> tuple[list[Notifier], list[str]]:
    """The receivers a policy names that can be built, and why each of the others cannot.

    A receiver that cannot be built (its secret is not set) never costs the others: the policy
    keeps observing and rolling back, and refuses only to raise weights (rule R3).
    """
    built: list[Notifier] = []
    problems: list[str] = []
    for index, receiver in enumerate(policy.spec.alerts):
        try:
            if isinstance(receiver, SlackReceiver):
                built.append(SlackNotifier(_secret_url(receiver, index, settings), name=receiver.name))
            elif isinstance(receiver, WebhookReceiver):
                built.append(WebhookNotifier(_secret_url(receiver, index, settings), name=receiver.name))
            elif isinstance(receiver, AlertmanagerReceiver):
                built.append(AlertmanagerNotifier(receiver.url, name=receiver.name))
            elif isinstance(receiver, ChatReceiver):
                built.append(chat_receiver(receiver, index, settings))
        except ValueError as exc:
            problems.append(str(exc))
    return built, problems


def global_receivers(settings: Settings) -> list[Notifier]:
    """Receivers every policy (and every policy-file error) is reported to."""
    built: list[Notifier] = []
    if settings.alertmanager_url:
        built.append(AlertmanagerNotifier(settings.alertmanager_url, name="global"))
    if settings.slack_webhook_url is not None:
        built.append(SlackNotifier(settings.slack_webhook_url.get_secret_value(), name="global"))
    if settings.webhook_url is not None:
        built.append(WebhookNotifier(settings.webhook_url.get_secret_value(), name="global"))
    return built
