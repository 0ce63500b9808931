"""The two gateways' Services through the official ``kubernetes`` client: weights, nothing else.

It reads both Services, refuses policies whose Services the cloud controller would not apply a
weight to, and writes ONLY the weight annotation, with a JSON merge patch guarded by
``resourceVersion``. The cloud controller reconciles the load balancer on every annotation change
of a Service, so the rollout's state lives elsewhere (``controller.adapters.kube_state``); the one
other annotation ever written here is the removal of version 1's state annotation, in the same
patch as the next weight write (or once, for a finished rollout).

Before the first write of a rollout (target weight 0) it asks the API server
(SelfSubjectAccessReview) whether its identity may do everything the policy needs (patch both
Services, keep the state object), so a Role that covers only part refuses the raise with a clear
reason instead of failing halfway through the first weight change. Once the target carries traffic
it never refuses on permissions alone: a rollback must always be attempted, and the writes' own
403s are reported.

Write order: the target first, then the source, so a rollback cuts the target's traffic with its
first request; except when that would show both weights at 0 (the source at 0), then the source
goes first (``controller.core.schedule.source_first``).
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Any

import structlog
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.adapters.kube_api import TIMEOUT, build_api_client, json_call, resource_version, translate
from controller.core.policy import CanaryPolicy, ServiceRef
from controller.core.schedule import Weights, source_first
from controller.errors import AccessDenied, ClusterUnavailable, ServiceNotFound, WeightChangedExternally
from controller.ports import PairSnapshot
from controller.rbac import AccessCheck, access_needed

__all__ = [
    "IGNORE_WEIGHT_ANNOTATION",
    "LB_ID_ANNOTATION",
    "LEGACY_STATE_ANNOTATION",
    "VGROUP_ANNOTATION",
    "WEIGHT_ANNOTATION",
    "KubernetesGatewayPair",
    "build_api_client",
    "parse_weight",
]

_PREFIX = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-"
WEIGHT_ANNOTATION = _PREFIX + "weight"
LB_ID_ANNOTATION = _PREFIX + "id"
VGROUP_ANNOTATION = _PREFIX + "vgroup-port"
IGNORE_WEIGHT_ANNOTATION = _PREFIX + "ignore-weight-update"
#: Where gateway-canary 0.1 kept its state (version 1); adopted, then removed.
LEGACY_STATE_ANNOTATION = "gateway-canary.io/state"

_MERGE_PATCH = "application/merge-patch+json"
_CONFLICT_RETRIES = 5
_log = structlog.get_logger("controller.kubernetes")


def parse_weight(raw: str | None) -> int | None:
    """The annotation's integer, None when absent; ValueError for what the cloud controller rejects."""
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not 0 <= int(text) <= 100:
        raise ValueError(f"weight annotation {raw[:40]!r} is not an integer in [0,100]")
    return int(text)


class KubernetesGatewayPair:
    """GatewayPair over two core/v1 Services.

    ``state_namespace`` is where the state objects live (their permissions are part of the access
    review). ``check_write_access=False`` (dry run) skips the write-permission check: a read-only
    identity is enough to watch what a rollout would do.
    """

    def __init__(
        self, api_client: client.ApiClient, *, state_namespace: str = "gateway-canary", check_write_access: bool = True
    ) -> None:
        self._api = client.CoreV1Api(api_client)
        self._authz = client.AuthorizationV1Api(api_client)
        self._state_namespace = state_namespace
        self._check_write_access = check_write_access
        self._access_verified: set[str] = set()
        self._uids: dict[str, str] = {}
        self._instance = socket.gethostname()

    # -- permissions -----------------------------------------------------------------------------

    def _may(self, check: AccessCheck) -> bool | None:
        """Whether RBAC allows ``check`` for this identity; None when the API server will not say."""
        attributes = {"namespace": check.namespace, "verb": check.verb, "resource": check.resource}
        if check.name:
            attributes["name"] = check.name
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        try:
            answer = json_call(f"access review ({check})", self._authz.create_self_subject_access_review, body)
        except (AccessDenied, ServiceNotFound):
            return None  # self-reviews are not allowed here: the writes themselves will tell
        return bool((answer.get("status") or {}).get("allowed"))

    def _access_refusal(self, policy: CanaryPolicy) -> str | None:
        """Why RBAC would stop this policy's writes, checked once per policy until a 403."""
        key = f"{policy.name}|{policy.spec.target.service}|{policy.spec.source.service}"
        if not self._check_write_access or key in self._access_verified:
            return None
        missing: list[AccessCheck] = []
        for check in access_needed(policy, self._state_namespace):
            if check.verb == "get" and check.resource == "services":
                continue  # both Services were just read
            allowed = self._may(check)
            if allowed is None:
                _log.info("access review unavailable; relying on the writes' own answers", check=str(check))
                return None
            if not allowed:
                missing.append(check)
        degrading = [str(check) for check in missing if not check.required]
        if degrading:
            _log.warning("Kubernetes Events will not be recorded", missing=degrading, policy=policy.name)
        blocking = [str(check) for check in missing if check.required]
        if blocking:
            return (
                f"the controller's identity may not {'; '.join(blocking)} (RBAC), so a weight change would "
                "fail halfway; nothing was written: grant what `gateway-canary rbac` prints"
            )
        self._access_verified.add(key)
        return None

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, ref: ServiceRef) -> dict[str, Any]:
        body = json_call(f"read Service {ref}", self._api.read_namespaced_service, ref.name, ref.namespace)
        self._uids[str(ref)] = str((body.get("metadata") or {}).get("uid", ""))
        return body

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """Read both Services and say whether the cloud controller would honour a weight on them."""
        target = self._read(policy.spec.target.service)
        source = self._read(policy.spec.source.service)
        target_ann = _annotations(target)
        source_ann = _annotations(source)
        refusal = _refusal(policy.spec.target.service, target_ann) or _refusal(policy.spec.source.service, source_ann)
        target_weight = source_weight = None
        try:
            target_weight = parse_weight(target_ann.get(WEIGHT_ANNOTATION))
            source_weight = parse_weight(source_ann.get(WEIGHT_ANNOTATION))
        except ValueError as exc:
            refusal = refusal or f"{exc}; the cloud controller rejects it too, fix it by hand"
        if refusal is None and target_weight is None:
            refusal = (
                f"Service {policy.spec.target.service} has no {WEIGHT_ANNOTATION}: the cloud controller gives it "
                '100 per backend, already a large share; set it to "0" to start a migration'
            )
        if refusal is None and target_weight == 0:
            # Only while the target carries no traffic: later, a refusal would also hold back a
            # rollback, and cutting the target to 0 works even when the source patch is denied.
            refusal = self._access_refusal(policy)
        return PairSnapshot(
            target_weight=target_weight,
            source_weight=source_weight,
            refusal=refusal,
            versions=(resource_version(target), resource_version(source)),
            legacy_state=target_ann.get(LEGACY_STATE_ANNOTATION),
        )

    # -- writing ---------------------------------------------------------------------------------

    def write_weights(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights,
        *,
        force: bool = False,
        drop_legacy_state: bool = False,
    ) -> None:
        """Patch the target's weight, then the source's; skip what already shows the value.

        A forced write (rollback) always states both weights: what was seen may be stale.
        """
        target_changes: dict[str, str | None] = {}
        if force or weights.target != seen.target_weight:
            target_changes[WEIGHT_ANNOTATION] = str(weights.target)
        if drop_legacy_state and seen.legacy_state is not None and target_changes:
            target_changes[LEGACY_STATE_ANNOTATION] = None

        def target() -> None:
            if target_changes:
                self._patch(policy.spec.target.service, target_changes, seen.versions[0], seen.target_weight, force)

        def source() -> None:
            if weights.source is not None and (force or weights.source != seen.source_weight):
                changes: dict[str, str | None] = {WEIGHT_ANNOTATION: str(weights.source)}
                self._patch(policy.spec.source.service, changes, seen.versions[1], seen.source_weight, force)

        try:
            for write in (source, target) if source_first(weights, seen.source_weight) else (target, source):
                write()
        except AccessDenied:
            self._access_verified.clear()  # the grant changed under us: check again before writing
            raise

    def drop_legacy_state(self, policy: CanaryPolicy, seen: PairSnapshot) -> None:
        """Remove version 1's state annotation from the target once, when no weight write is coming."""
        if seen.legacy_state is not None:
            self._patch(
                policy.spec.target.service, {LEGACY_STATE_ANNOTATION: None}, seen.versions[0], seen.target_weight, False
            )

    def _patch(
        self, ref: ServiceRef, annotations: dict[str, str | None], version: str, expected: int | None, force: bool
    ) -> None:
        for _attempt in range(_CONFLICT_RETRIES):
            body = {"metadata": {"resourceVersion": version, "annotations": annotations}}
            try:
                self._api.patch_namespaced_service(
                    ref.name, ref.namespace, body, _content_type=_MERGE_PATCH, _request_timeout=TIMEOUT
                )
                _log.debug("patched", service=str(ref), annotations=sorted(annotations))
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise translate(exc, f"patch Service {ref}") from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise translate(exc, f"patch Service {ref}") from exc
            fresh = self._read(ref)
            try:
                now_weight = parse_weight(_annotations(fresh).get(WEIGHT_ANNOTATION))
            except ValueError:
                now_weight = -1
            if not force and now_weight != expected:
                raise WeightChangedExternally(
                    f"Service {ref}: weight changed from {expected} to {now_weight} by someone else while "
                    "gateway-canary was writing; not overwriting it"
                )
            _log.info("patch conflict, retrying on the new version", service=str(ref))
            version = resource_version(fresh)
        raise ClusterUnavailable(f"patch Service {ref}: still conflicting after {_CONFLICT_RETRIES} attempts")

    def record_event(self, policy: CanaryPolicy, reason: str, message: str, *, warning: bool) -> None:
        """A core/v1 Event on the target Service, visible in ``kubectl describe``."""
        ref = policy.spec.target.service
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Service",
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": self._uids.get(str(ref), ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "gateway-canary", "host": self._instance},
            "reportingComponent": "gateway-canary",
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            # The client serialises a plain dict as-is; its type hint names only the model class.
            self._api.create_namespaced_event(ref.namespace, body, _request_timeout=TIMEOUT)  # type: ignore[arg-type]
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise translate(exc, f"create Event for {ref}") from exc


def _annotations(body: dict[str, Any]) -> dict[str, str]:
    return dict((body.get("metadata") or {}).get("annotations") or {})


def _refusal(ref: ServiceRef, annotations: dict[str, str]) -> str | None:
    """Why the cloud controller would ignore a weight on this Service, if it would."""
    if not annotations.get(LB_ID_ANNOTATION, "").strip():
        return f"Service {ref} lacks {LB_ID_ANNOTATION}: the cloud controller ignores its weight"
    if not annotations.get(VGROUP_ANNOTATION, "").strip():
        return f"Service {ref} lacks {VGROUP_ANNOTATION}: the cloud controller ignores its weight"
    if annotations.get(IGNORE_WEIGHT_ANNOTATION, "").strip().lower() == "on":
        return f'Service {ref} has {IGNORE_WEIGHT_ANNOTATION}: "on": weight updates are switched off'
    return None
