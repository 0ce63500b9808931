"""The operator's side of the state objects: what ``gateway-canary status`` and the commands use.

It runs as the person at the terminal (their kubeconfig), never as the controller: it lists the
state objects (by label), reads them, and writes a command as an annotation with a merge patch
(never a Service: that would cost a CLB reconcile). The controller answers in the state; this
side waits for that answer and, if none comes, takes its command back so that a controller
started later does not act on a stale one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from controller.adapters.kube_api import build_api_client, json_call, resource_version
from controller.adapters.kube_rest import AuthenticationV1, CoreV1
from controller.core.commands import COMMAND_ANNOTATION, CommandRequest, encode_command, read_command
from controller.core.enums import Command
from controller.core.state import CommandRecord, RolloutState, StateUnreadable, decode_state
from controller.errors import ClusterUnavailable, Conflict, ServiceNotFound
from controller.rbac import state_object_name

__all__ = ["CommandWaiting", "KubernetesOperator", "PolicyView", "context_namespace", "kubeconfig_user"]

_MANAGED = "app.kubernetes.io/managed-by=gateway-canary"
_MERGE = "application/merge-patch+json"


class CommandWaiting(Conflict):
    """Another command waits on the state object for the controller's answer."""


@dataclass(frozen=True, slots=True)
class PolicyView:
    """One policy as its state object shows it."""

    name: str
    state: RolloutState | None
    #: the stored state's JSON as it is (``status -o json`` prints it: it decodes back to ``state``)
    state_json: dict[str, Any] | None
    #: what the controller wrote for ``status`` (None: an older controller, or not yet)
    status: dict[str, Any] | None
    #: why the state could not be read
    error: str | None = None
    #: a command written and not answered yet
    waiting: CommandRequest | None = None


def _context(kubeconfig: str | None, context: str | None) -> dict[str, Any]:
    """The kubeconfig context named (or the current one), {} when there is none."""
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, TypeError):
        return {}
    chosen = next((c for c in contexts or [] if c.get("name") == context), None) if context else active
    return dict((chosen or {}).get("context") or {})


def context_namespace(kubeconfig: str | None, context: str | None) -> str | None:
    """The namespace the kubeconfig context names (None: none, or no kubeconfig)."""
    return _context(kubeconfig, context).get("namespace") or None


def kubeconfig_user(kubeconfig: str | None, context: str | None) -> str | None:
    """The user name the kubeconfig context names (who gave a command, when the API cannot say)."""
    return _context(kubeconfig, context).get("user") or None


class KubernetesOperator:
    """Reads the state objects in one namespace and gives them commands."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self._client = api_client
        self._api = CoreV1(api_client)
        self.namespace = namespace

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None, namespace: str) -> KubernetesOperator:
        """From a kubeconfig (or in-cluster). Raises ClusterUnavailable."""
        return cls(build_api_client(Path(kubeconfig) if kubeconfig else None, context), namespace)

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()  # type: ignore[no-untyped-call]

    def who_am_i(self) -> str | None:
        """The user the API server authenticates this client as (SelfSubjectReview), None if it cannot say."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        try:
            answer = json_call("who am I", AuthenticationV1(self._client).create_self_subject_review, body)
        except Exception:  # an older API server, a denied review: the kubeconfig's name will do
            return None
        name = ((answer.get("status") or {}).get("userInfo") or {}).get("username")
        return str(name) if name else None

    def policies(self) -> list[PolicyView]:
        """Every policy with a state object in the namespace, by name."""
        body = json_call(
            f"list ConfigMaps in {self.namespace}",
            self._api.list_namespaced_config_map,
            self.namespace,
            label_selector=_MANAGED,
        )
        views = [_view(item) for item in body.get("items") or []]
        return sorted((v for v in views if v is not None), key=lambda v: v.name)

    def policy(self, name: str) -> PolicyView | None:
        """One policy's view; None when it has no state object (no controller ever ran it)."""
        body = self._read(name)
        return None if body is None else _view(body, name)

    def _read(self, name: str) -> dict[str, Any] | None:
        object_name = state_object_name(name)
        try:
            return json_call(
                f"read ConfigMap {self.namespace}/{object_name}",
                self._api.read_namespaced_config_map,
                object_name,
                self.namespace,
            )
        except ServiceNotFound:
            return None

    def give(self, name: str, request: CommandRequest) -> None:
        """Write the command on the policy's state object, unless another one waits for its answer.

        Guarded by the object's version, so two people cannot overwrite each other's command
        unnoticed: a waiting command is refused (CommandWaiting), except that an ``abort`` replaces
        anything but another abort. Raises ServiceNotFound when there is no state object.
        """
        object_name = state_object_name(name)
        for _ in range(3):
            body = self._read(name)
            if body is None:
                raise ServiceNotFound(f"ConfigMap {self.namespace}/{object_name}: not found")
            view = _view(body, name)
            waiting = None if view is None else view.waiting
            if waiting is not None and (request.command is not Command.ABORT or waiting.command is Command.ABORT):
                raise CommandWaiting(
                    f"{waiting.command.value} by {waiting.by} (id {waiting.id}) waits for the controller's answer; "
                    "wait for it, or take it back: kubectl annotate ... gateway-canary.io/command-"
                )
            if self._annotate(name, body, encode_command(request)):
                return
        raise ClusterUnavailable(f"could not give the command: ConfigMap {self.namespace}/{object_name} keeps changing")

    def _annotate(self, name: str, body: dict[str, Any], command: str | None) -> bool:
        """Set (or with None remove) the command on the object as read in ``body``; False when it
        moved since (the controller wrote meanwhile: look again)."""
        object_name = state_object_name(name)
        patch = {"metadata": {"resourceVersion": resource_version(body), "annotations": {COMMAND_ANNOTATION: command}}}
        try:
            json_call(
                f"annotate ConfigMap {self.namespace}/{object_name}",
                self._api.patch_namespaced_config_map,
                object_name,
                self.namespace,
                patch,
                _content_type=_MERGE,
            )
        except Conflict:
            return False
        return True

    def answer(self, name: str, ident: str) -> CommandRecord | None:
        """The controller's answer to command ``ident`` (None: not yet)."""
        view = self.policy(name)
        record = None if view is None or view.state is None else view.state.last_command
        return record if record is not None and record.id == ident else None

    def take_back(self, name: str, ident: str) -> CommandRecord | None:
        """Remove command ``ident`` if it is still unanswered; the answer if it came meanwhile."""
        for _ in range(3):
            body = self._read(name)
            if body is None:
                return None
            view = _view(body, name)
            answered = None if view is None or view.state is None else view.state.last_command
            if answered is not None and answered.id == ident:
                return answered
            waiting = view.waiting if view is not None else None
            if waiting is None or waiting.id != ident:
                return None
            if self._annotate(name, body, None):
                return None
        raise ClusterUnavailable(f"could not take back command {ident}: the state object keeps changing")


def _view(item: dict[str, Any], name: str | None = None) -> PolicyView | None:
    metadata = item.get("metadata") or {}
    policy = name or (metadata.get("labels") or {}).get("gateway-canary.io/policy")
    if not policy:
        return None
    data = item.get("data") or {}
    waiting, _ = read_command((metadata.get("annotations") or {}).get(COMMAND_ANNOTATION), resource_version(item))
    status = _json_object(data.get("status"))
    raw = data.get("state")
    if not isinstance(raw, str):
        return PolicyView(policy, None, None, status, "the state object has no state in it", waiting)
    try:
        state = decode_state(raw)
    except StateUnreadable as exc:
        return PolicyView(policy, None, _json_object(raw), status, str(exc), waiting)
    if waiting is not None and state.last_command is not None and state.last_command.id == waiting.id:
        waiting = None
    return PolicyView(policy, state, _json_object(raw), status, None, waiting)


def _json_object(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
