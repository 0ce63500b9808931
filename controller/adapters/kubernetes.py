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

A target declared as an ASM ``IstioGateway`` (``target.istioGateway``): ASM generates the target
Service from that object and overwrites a direct edit of its annotations, so the target's weight
is read from and written to the IstioGateway (on the ASM control plane, through ``asm_client``),
where ``controller.core.istio_gateway`` says the value reaching the data-plane cluster lives. The
data-plane Service is still read (its CLB annotations are checked, the weight it shows is
reported) and carries the Events, but its weight is never written.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.adapters.kube_api import TIMEOUT, build_api_client, json_call, resource_version, translate
from controller.adapters.kube_rest import AuthorizationV1, CoreV1, CustomObjects
from controller.core import cloud
from controller.core.istio_gateway import (
    ISTIO_GATEWAY_GROUP,
    ISTIO_GATEWAY_PLURAL,
    ISTIO_GATEWAY_VERSIONS,
    IstioGatewayWeight,
    effective_weight,
    parse_weight,
)
from controller.core.policy import CanaryPolicy, IstioGatewayRef, ServiceRef
from controller.core.schedule import Weights, source_first
from controller.errors import (
    AccessDenied,
    ClusterError,
    ClusterUnavailable,
    ServiceNotFound,
    WeightChangedExternally,
)
from controller.ports import Fence, PairSnapshot, SoleWriter
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

WEIGHT_ANNOTATION = cloud.WEIGHT
LB_ID_ANNOTATION = cloud.LB_ID
VGROUP_ANNOTATION = cloud.VGROUP_PORT
IGNORE_WEIGHT_ANNOTATION = cloud.IGNORE_WEIGHT
#: Where gateway-canary 0.1 kept its state (version 1); adopted, then removed.
LEGACY_STATE_ANNOTATION = "gateway-canary.io/state"

_MERGE_PATCH = "application/merge-patch+json"
_CONFLICT_RETRIES = 5
_log = structlog.get_logger("controller.kubernetes")


class KubernetesGatewayPair:
    """GatewayPair over two core/v1 Services, or a Service and an ASM IstioGateway.

    ``asm_client`` reaches the ASM control plane that holds IstioGateways (default: the same
    cluster as ``api_client``). ``state_namespace`` is where the state objects live (their
    permissions are part of the access review). ``check_write_access=False`` (dry run) skips the
    write-permission check: a read-only identity is enough to watch what a rollout would do.
    ``fence`` (leader election) is asked right before every write request, each retry included.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        asm_client: client.ApiClient | None = None,
        state_namespace: str = "gateway-canary",
        check_write_access: bool = True,
        fence: Fence | None = None,
    ) -> None:
        self._api = CoreV1(api_client)
        #: asked before every write request (leader election): a deposed leader writes nothing
        self._fence = fence or SoleWriter()
        self._authz = AuthorizationV1(api_client)
        asm = asm_client if asm_client is not None else api_client
        self._custom = CustomObjects(asm)
        self._asm_authz = AuthorizationV1(asm)
        #: the API version each IstioGateway answered on (ASM serves v1beta1, the Go types say v1)
        self._gateway_versions: dict[str, str] = {}
        #: per policy: the IstioGateway's resourceVersion at the last observe and where its weight lives
        self._located: dict[str, tuple[str, IstioGatewayWeight]] = {}
        self._state_namespace = state_namespace
        self._check_write_access = check_write_access
        self._access_verified: set[str] = set()
        self._uids: dict[str, str] = {}
        self._instance = socket.gethostname()

    # -- permissions -----------------------------------------------------------------------------

    def _may(self, check: AccessCheck) -> bool | None:
        """Whether RBAC allows ``check`` for this identity; None when the API server will not say."""
        attributes = {"namespace": check.namespace, "verb": check.verb, "resource": check.resource}
        if check.group:
            attributes["group"] = check.group
        if check.name:
            attributes["name"] = check.name
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        authz = self._asm_authz if check.asm else self._authz  # an IstioGateway's RBAC is the ASM plane's
        try:
            answer = json_call(f"access review ({check})", authz.create_self_subject_access_review, body)
        except (AccessDenied, ServiceNotFound):
            return None  # self-reviews are not allowed here: the writes themselves will tell
        return bool((answer.get("status") or {}).get("allowed"))

    def _access_refusal(self, policy: CanaryPolicy) -> str | None:
        """Why RBAC would stop this policy's writes, checked once per policy until a 403."""
        target = policy.spec.target
        key = f"{policy.name}|{target.service}|{policy.spec.source.service}|{target.istio_gateway}"
        if not self._check_write_access or key in self._access_verified:
            return None
        missing: list[AccessCheck] = []
        for check in access_needed(policy, self._state_namespace):
            if check.verb == "get" and check.resource in ("services", ISTIO_GATEWAY_PLURAL):
                continue  # both Services (and the IstioGateway) were just read
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

    def _read_istio_gateway(self, ref: IstioGatewayRef) -> dict[str, Any]:
        """The IstioGateway as JSON, on the API version that serves it (v1beta1, then v1 on a 404)."""
        key = str(ref)
        known = self._gateway_versions.get(key)
        versions = (known,) if known else ISTIO_GATEWAY_VERSIONS
        for version in versions:
            try:
                body = json_call(
                    f"read IstioGateway {ref} ({ISTIO_GATEWAY_GROUP}/{version})",
                    self._custom.get_namespaced_custom_object,
                    ISTIO_GATEWAY_GROUP,
                    version,
                    ref.namespace,
                    ISTIO_GATEWAY_PLURAL,
                    ref.name,
                )
            except ServiceNotFound:
                continue  # that version is not served, or the object is not there: try the next
            self._gateway_versions[key] = version
            return body
        self._gateway_versions.pop(key, None)  # the object (or its CRD) is gone: look afresh next time
        raise ServiceNotFound(
            f"read IstioGateway {ref}: not found on the ASM control plane ({ISTIO_GATEWAY_GROUP} {', '.join(versions)})"
        )

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """Read both Services and say whether the cloud controller would honour a weight on them."""
        if policy.spec.target.istio_gateway is not None:
            return self._observe_istio_gateway(policy, policy.spec.target.istio_gateway)
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

    def _observe_istio_gateway(self, policy: CanaryPolicy, ref: IstioGatewayRef) -> PairSnapshot:
        """The IstioGateway's weight as the target's, with the data-plane Service it generates.

        Refused (raises held back, rollbacks still written) when the Services fail the cloud
        controller's checks, when where the weight lives cannot be decided, while ASM reports an
        error (a new weight would not reach the Service), or when there is no weight to start from.
        """
        gateway = self._read_istio_gateway(ref)
        located = effective_weight(gateway, ref.cluster_id)
        self._located[policy.name] = (resource_version(gateway), located)
        service_ref, source_ref = policy.spec.target.service, policy.spec.source.service
        service, source = self._read(service_ref), self._read(source_ref)
        service_ann, source_ann = _annotations(service), _annotations(source)
        refusal = _refusal(service_ref, service_ann) or _refusal(source_ref, source_ann)
        service_weight = source_weight = None
        try:
            service_weight = parse_weight(service_ann.get(WEIGHT_ANNOTATION))
        except ValueError as exc:
            refusal = refusal or (
                f"Service {service_ref}: {exc}; ASM should overwrite it from {located.gateway}: "
                "look for its status.ErrorMessage and fix the Service by hand"
            )
        try:
            source_weight = parse_weight(source_ann.get(WEIGHT_ANNOTATION))
        except ValueError as exc:
            refusal = refusal or f"{exc}; the cloud controller rejects it too, fix it by hand"
        refusal = refusal or located.conflict
        if refusal is None and located.error_message is not None:
            refusal = (
                f"ASM reports an error for {located.gateway} (status.ErrorMessage: {located.error_message[:300]}): "
                f"a new weight would not reach Service {service_ref}; fix the gateway in ASM first"
            )
        if refusal is None and located.weight is None:
            refusal = (
                f"{located.gateway} has no {located.where}: ASM copies no weight onto Service {service_ref} and the "
                'cloud controller gives it 100 per backend, already a large share; set it to "0" there to start '
                "a migration"
            )
        if refusal is None and located.weight == 0:
            refusal = self._access_refusal(policy)  # as for a Service target: only while it carries no traffic
        return PairSnapshot(
            target_weight=located.weight,
            source_weight=source_weight,
            refusal=refusal,
            versions=(resource_version(gateway), resource_version(source)),
            legacy_state=service_ann.get(LEGACY_STATE_ANNOTATION),
            target_kind="IstioGateway",
            target_service_weight=service_weight,
            target_service_version=resource_version(service),
            asm_error=located.error_message,
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
        gateway = policy.spec.target.istio_gateway

        def target() -> None:
            if not target_changes:
                return
            if gateway is None:
                self._patch(policy.spec.target.service, target_changes, seen.versions[0], seen.target_weight, force)
                return
            self._patch_istio_gateway(policy, gateway, weights.target, seen, force)
            if LEGACY_STATE_ANNOTATION in target_changes:  # on the data-plane Service, not in the IstioGateway
                self._drop_legacy_on_service(policy, seen)

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
        if seen.legacy_state is None:
            return
        if policy.spec.target.istio_gateway is not None:
            self._drop_legacy_on_service(policy, seen)
            return
        self._patch(
            policy.spec.target.service, {LEGACY_STATE_ANNOTATION: None}, seen.versions[0], seen.target_weight, False
        )

    def _drop_legacy_on_service(self, policy: CanaryPolicy, seen: PairSnapshot) -> None:
        """The data-plane Service of an IstioGateway target: its weight is ASM's, so it is not compared."""
        self._patch(
            policy.spec.target.service, {LEGACY_STATE_ANNOTATION: None}, seen.target_service_version, None, True
        )

    def _patch_istio_gateway(
        self, policy: CanaryPolicy, ref: IstioGatewayRef, weight: int, seen: PairSnapshot, force: bool
    ) -> None:
        """Merge-patch ``weight`` where the IstioGateway's effective value lives, guarded by resourceVersion.

        As for a Service: a 409 is retried on the new version unless the weight itself moved since
        ``seen`` (then WeightChangedExternally, except for a forced write). Where the value lives is
        worked out again from every version read, so an override someone added meanwhile is written
        instead of the top-level value it now shadows. An unresolvable location refuses a plain
        write; a forced one (rollback) goes to every place that could reach the cluster.
        """
        version = seen.versions[0]
        cached = self._located.get(policy.name)
        located = cached[1] if cached is not None and cached[0] == version else None
        what = f"patch IstioGateway {ref}"
        for _attempt in range(_CONFLICT_RETRIES):
            if located is None:
                fresh = self._read_istio_gateway(ref)
                located = effective_weight(fresh, ref.cluster_id)
                if resource_version(fresh) != version:
                    if not force and located.conflict is not None:
                        raise WeightChangedExternally(
                            f"changed by someone else while gateway-canary was writing; not written: {located.conflict}"
                        )
                    if not force and located.weight != seen.target_weight:
                        raise WeightChangedExternally(
                            f"{located.gateway}: weight changed from {seen.target_weight} to {located.weight} by "
                            "someone else while gateway-canary was writing; not overwriting it"
                        )
                    version = resource_version(fresh)
            if located.conflict is not None and not force:
                raise ClusterError(f"{what}: not written: {located.conflict}")
            gateway_version = self._gateway_versions.get(str(ref), ISTIO_GATEWAY_VERSIONS[0])
            self._fence.check()
            if self._send(
                what,
                self._custom.patch_namespaced_custom_object,
                ISTIO_GATEWAY_GROUP,
                gateway_version,
                ref.namespace,
                ISTIO_GATEWAY_PLURAL,
                ref.name,
                located.patch(weight, version),
            ):
                _log.debug("patched", istio_gateway=str(ref), where=located.where, weight=weight)
                return
            _log.info("patch conflict, retrying on the new version", istio_gateway=str(ref))
            located = None
        raise ClusterUnavailable(f"{what}: still conflicting after {_CONFLICT_RETRIES} attempts")

    @staticmethod
    def _send(what: str, call: Callable[..., Any], *args: Any) -> bool:
        """A merge patch; False on a 409 (the version is stale), our errors for everything else."""
        try:
            call(*args, _content_type=_MERGE_PATCH, _preload_content=False, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise translate(exc, what) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise translate(exc, what) from exc
        return True

    def _patch(
        self, ref: ServiceRef, annotations: dict[str, str | None], version: str, expected: int | None, force: bool
    ) -> None:
        for _attempt in range(_CONFLICT_RETRIES):
            body = {"metadata": {"resourceVersion": version, "annotations": annotations}}
            self._fence.check()
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
        self._fence.check()
        try:
            self._api.create_namespaced_event(ref.namespace, body, _request_timeout=TIMEOUT)
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
