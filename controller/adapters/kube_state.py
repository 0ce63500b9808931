"""The rollout state in a ConfigMap of its own, one per policy, in the controller's namespace.

Why a ConfigMap (and not an annotation on a gateway Service, a Lease or a custom resource): the
cloud controller reconciles the load balancer on every annotation change of a Service, so the
Services must receive weight changes only; a custom resource needs a cluster-scoped CRD installed
by a cluster admin before the first run (and Helm does not upgrade CRDs); a Lease is typed for
leader election and is what that feature will use. A ConfigMap needs nothing installed, is read
with ``kubectl get configmap gateway-canary-<policy> -o yaml``, and its ``resourceVersion`` gives
optimistic concurrency: a save against a version that changed since it was read is a Conflict.

Layout: ``data.state`` holds the JSON of ``controller.core.state``; ``data.unreadable-state`` keeps
what stood there before if it could not be read (for an operator; never read back);
``data.outbox`` the undelivered alerts; ``data.status`` what ``gateway-canary status`` shows (the
last check, the step, what the rollout waits for); ``data.leader`` the fencing token of the
leader's term that saved it (``controller.core.lease``): a save by an older term is refused, so a
deposed leader (a paused process that resumed) cannot overwrite what the new one decided.
Labelled ``app.kubernetes.io/managed-by: gateway-canary`` and ``gateway-canary.io/policy: <name>``.
Operators' commands arrive as the annotation ``gateway-canary.io/command``
(``controller.core.commands``); other annotations and labels people add are kept.

A save that meets a Conflict re-reads the object: when only its metadata moved (a command was
annotated, a label added) and the stored state and outbox are still the ones this save replaces,
it is written again on the new version, keeping what arrived. A moved state is a real conflict, and
so is a command this save answers that was taken back meanwhile (``CommandWithdrawn``: the CLI
told the operator it was not applied).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import structlog
from kubernetes import client

from controller.adapters.kube_api import json_call, resource_version
from controller.adapters.kube_rest import CoreV1
from controller.core.alerts import OutboxEntry, decode_outbox, encode_outbox
from controller.core.commands import COMMAND_ANNOTATION, answered, read_command
from controller.core.lease import FenceToken
from controller.core.policy import CanaryPolicy
from controller.core.state import RolloutState, StateUnreadable, decode_state, encode_state
from controller.core.text import bounded
from controller.errors import CommandWithdrawn, Conflict, NotLeader, ServiceNotFound
from controller.ports import Fence, SoleWriter, StoredState
from controller.rbac import state_object_name

__all__ = ["LEADER_KEY", "OUTBOX_KEY", "STATE_KEY", "STATUS_KEY", "UNREADABLE_KEY", "KubernetesStateStore"]

STATE_KEY = "state"
OUTBOX_KEY = "outbox"
STATUS_KEY = "status"
LEADER_KEY = "leader"

UNREADABLE_KEY = "unreadable-state"
_KEEP_UNREADABLE_CHARS = 16 * 1024
_log = structlog.get_logger("controller.state")


class KubernetesStateStore:
    """StateStore over ConfigMaps in one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str, *, fence: Fence | None = None) -> None:
        self._api = CoreV1(api_client)
        self.namespace = namespace
        self._fence = fence or SoleWriter()

    def load(self, policy: CanaryPolicy) -> StoredState:
        """The stored state, None when there is no object yet; garbage is reported, not raised."""
        name = state_object_name(policy.name)
        try:
            body = json_call(
                f"read ConfigMap {self.namespace}/{name}", self._api.read_namespaced_config_map, name, self.namespace
            )
        except ServiceNotFound:  # (404: the adapter's "not found" is not about Services only)
            return StoredState(state=None)
        version = resource_version(body)
        data = body.get("data") or {}
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        command_text = annotations.get(COMMAND_ANNOTATION)
        command, command_error = read_command(command_text, version)
        if command_error is not None:
            _log.warning("the command annotation is unreadable; it is dropped", policy=policy.name, error=command_error)
        base = StoredState(
            state=None,
            version=version,
            outbox=_outbox(data),
            command=command,
            command_error=command_error,
            command_text=command_text if isinstance(command_text, str) else None,
            fence=_fence(data),
        )
        raw = data.get(STATE_KEY) if isinstance(data, dict) else None
        if not isinstance(raw, str):
            return replace(base, error="the state object has no state in it")
        try:
            state = decode_state(raw)
        except StateUnreadable as exc:
            return replace(base, error=str(exc), raw=raw)
        if state.policy != policy.name:
            return replace(base, error=f"stored state belongs to policy {state.policy!r}", raw=raw)
        return replace(base, state=state)

    def save(
        self,
        policy: CanaryPolicy,
        state: RolloutState,
        previous: StoredState,
        outbox: tuple[OutboxEntry, ...] = (),
        status: str | None = None,
    ) -> StoredState:
        """Create the object, or patch it guarded by the version read; Conflict if the state moved.

        A merge patch carrying ``resourceVersion`` (a precondition, as a replace would be) changes
        only our keys: labels and annotations people added stay, and so does a command that arrived
        after the read (only an answered or unreadable one is removed).
        """
        name = state_object_name(policy.name)
        token = self._fence.token()
        self._refuse_newer_term(previous, name)
        data: dict[str, str | None] = {
            STATE_KEY: encode_state(state),
            OUTBOX_KEY: encode_outbox(outbox) if outbox else None,
        }
        if token is not None:  # (without election, a token left by an elected controller stays as it is)
            data[LEADER_KEY] = json.dumps(token.as_dict(), sort_keys=True)
        if previous.error is not None and previous.raw is not None:  # kept for an operator, never removed
            data[UNREADABLE_KEY] = bounded(previous.raw, _KEEP_UNREADABLE_CHARS)
        if status is not None:
            data[STATUS_KEY] = status
        what = f"write ConfigMap {self.namespace}/{name}"
        if not previous.version:
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": self.namespace, "labels": _labels(policy)},
                "data": {key: value for key, value in data.items() if value is not None},
            }
            self._fence.check()
            answer = json_call(what, self._api.create_namespaced_config_map, self.namespace, body)
            return StoredState(state=state, version=resource_version(answer), outbox=outbox, fence=token)
        seen = previous
        answers = answered(state, previous.command)
        for attempt in range(2):
            if answers and seen.command_text != previous.command_text:
                # the command this save answers was taken back (or replaced) while the tick ran: the
                # operator was told it was not applied, so this decision must not be recorded
                raise CommandWithdrawn(f"{what}: the command {previous.command.id} was taken back")  # type: ignore[union-attr]
            # the answered command goes (compared by its text: a bare word's id moves with the object)
            drop = seen.command_error is not None or (answers and seen.command_text == previous.command_text)
            metadata: dict[str, Any] = {"resourceVersion": seen.version, "labels": _labels(policy)}
            if drop:
                metadata["annotations"] = {COMMAND_ANNOTATION: None}
            body = {"metadata": metadata, "data": data}
            self._fence.check()
            try:
                answer = json_call(
                    what,
                    self._api.patch_namespaced_config_map,
                    name,
                    self.namespace,
                    body,
                    _content_type="application/merge-patch+json",
                )
            except Conflict:
                if attempt:
                    raise
                seen = self._moved_metadata_only(policy, previous)
                continue
            return StoredState(
                state=state, version=resource_version(answer), outbox=outbox, fence=token or previous.fence
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _refuse_newer_term(self, stored: StoredState, name: str) -> None:
        """NotLeader (and this process deposed) when a newer leader's term saved the object."""
        token = self._fence.token()
        newer = stored.fence
        if token is None or newer is None or not newer.supersedes(token):
            return
        why = f"the state object {self.namespace}/{name} was saved in term {newer.term} of {newer.holder}"
        self._fence.deposed(why)
        raise NotLeader(f"not saved: {why}, after this process's term {token.term}")

    def _moved_metadata_only(self, policy: CanaryPolicy, previous: StoredState) -> StoredState:
        """After a Conflict: the object as it is now, if only its metadata moved (else Conflict, or
        NotLeader when a newer leader's term saved it)."""
        now = self.load(policy)
        self._refuse_newer_term(now, state_object_name(policy.name))
        same_state = (now.raw if now.state is None else encode_state(now.state)) == (
            previous.raw if previous.state is None else encode_state(previous.state)
        )
        moved = now.outbox != previous.outbox or now.error != previous.error or now.fence != previous.fence
        if not same_state or moved:
            raise Conflict(f"ConfigMap {self.namespace}/{state_object_name(policy.name)}: the state changed since read")
        return now

    def commands(self, policies: Iterable[CanaryPolicy]) -> dict[str, str]:
        """Policy name -> id of the command waiting on its state object.

        One ``get`` per policy (the Role names each state object; it grants no list, which would
        show every ConfigMap of the namespace); an object missing or unreadable has no command.
        """
        waiting: dict[str, str] = {}
        for policy in policies:
            name = state_object_name(policy.name)
            try:
                body = json_call(
                    f"read ConfigMap {self.namespace}/{name}",
                    self._api.read_namespaced_config_map,
                    name,
                    self.namespace,
                )
            except ServiceNotFound:
                continue
            text = ((body.get("metadata") or {}).get("annotations") or {}).get(COMMAND_ANNOTATION)
            command, _ = read_command(text, resource_version(body))
            if command is not None:
                waiting[policy.name] = command.id
        return waiting


def _labels(policy: CanaryPolicy) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "gateway-canary",
        "app.kubernetes.io/name": "gateway-canary",
        "gateway-canary.io/policy": policy.name,
    }


def _fence(data: Any) -> FenceToken | None:
    """The token of the leader's term that last saved the object (None: none, or unreadable)."""
    text = data.get(LEADER_KEY) if isinstance(data, dict) else None
    if not isinstance(text, str):
        return None
    try:
        return FenceToken.from_dict(json.loads(text))
    except ValueError:
        return None


def _outbox(data: Any) -> tuple[OutboxEntry, ...]:
    """The undelivered alerts; an unreadable outbox is dropped (logged), never a reason to stop."""
    text = data.get(OUTBOX_KEY) if isinstance(data, dict) else None
    if not isinstance(text, str) or not text:
        return ()
    try:
        return decode_outbox(text)
    except ValueError as exc:
        _log.error("the stored outbox is unreadable; its alerts are lost", error=str(exc)[:300])
        return ()
