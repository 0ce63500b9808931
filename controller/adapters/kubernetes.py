"""The two gateways' Services through the official ``kubernetes`` client.

Only this module imports ``kubernetes``. It reads both Services, refuses policies whose Services
the cloud controller would not apply a weight to, writes ONLY the weight and state annotations
with a JSON merge patch guarded by ``resourceVersion``, and emits Events on the target Service.

Before the first write of a rollout (target weight 0) it asks the API server
(SelfSubjectAccessReview) whether its identity may patch both Services, so a Role that covers only
one of them refuses the policy with a clear reason instead of failing halfway through the first
weight change. Once the target carries traffic it never refuses on permissions alone: a rollback
must always be attempted, and the writes' own 403s are reported.

Write order: the target first (weight + state in one patch, so they never disagree), then the
source. A rollback therefore cuts the target's traffic with its first request, and a restart
between the two patches finds the state already describing the intended pair and completes it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from controller.core.policy import CanaryPolicy, ServiceRef
from controller.core.schedule import Weights
from controller.core.state import RolloutState, decode_state, encode_state
from controller.errors import (
    AccessDenied,
    ClusterError,
    ClusterUnavailable,
    ServiceNotFound,
    WeightChangedExternally,
)
from controller.ports import PairSnapshot
from controller.rbac import AccessCheck, access_needed

__all__ = [
    "IGNORE_WEIGHT_ANNOTATION",
    "LB_ID_ANNOTATION",
    "STATE_ANNOTATION",
    "VGROUP_ANNOTATION",
    "WEIGHT_ANNOTATION",
    "KubernetesGatewayPair",
    "build_api_client",
]

_PREFIX = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-"
WEIGHT_ANNOTATION = _PREFIX + "weight"
LB_ID_ANNOTATION = _PREFIX + "id"
VGROUP_ANNOTATION = _PREFIX + "vgroup-port"
IGNORE_WEIGHT_ANNOTATION = _PREFIX + "ignore-weight-update"
STATE_ANNOTATION = "gateway-canary.io/state"

_MERGE_PATCH = "application/merge-patch+json"
_TIMEOUT = (3.0, 10.0)
_CONFLICT_RETRIES = 5
_log = structlog.get_logger("controller.kubernetes")


def build_api_client(kubeconfig: Path | None = None, context: str | None = None) -> client.ApiClient:
    """In-cluster config when running in a Pod, else the kubeconfig (explicit path or default)."""
    if kubeconfig is None:
        try:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return client.ApiClient(configuration)
        except ConfigException:
            pass
    try:
        api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig) if kubeconfig else None, context=context
        )
        return api
    except (ConfigException, OSError) as exc:
        raise ClusterUnavailable(f"no usable Kubernetes configuration: {exc}") from exc


def parse_weight(raw: str | None) -> int | None:
    """The annotation's integer, None when absent; ValueError for what the cloud controller rejects."""
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not 0 <= int(text) <= 100:
        raise ValueError(f"weight annotation {raw!r} is not an integer in [0,100]")
    return int(text)


def _translate(exc: Exception, what: str) -> ClusterError:
    if isinstance(exc, ApiException):
        status = exc.status or 0
        detail = _api_message(exc)
        if status == 404:
            return ServiceNotFound(f"{what}: not found")
        if status in (401, 403):
            return AccessDenied(
                f"{what}: forbidden for the controller's identity ({status}): {detail}; "
                "grant what `gateway-canary rbac` prints"
            )
        return ClusterUnavailable(f"{what}: API server answered {status}: {detail}")
    return ClusterUnavailable(f"{what}: API server unreachable: {type(exc).__name__}")


def _json_call(what: str, call: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Call the client for the raw JSON (no model classes); library errors become ours."""
    try:
        # _preload_content=False returns the raw urllib3 response, not a model object.
        response = call(*args, _preload_content=False, _request_timeout=_TIMEOUT)
        body: dict[str, Any] = json.loads(response.data)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise _translate(exc, what) from exc
    return body


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message", exc.reason))
    except (ValueError, AttributeError):
        return str(exc.reason)


class KubernetesGatewayPair:
    """GatewayPair over two core/v1 Services.

    ``check_write_access=False`` (dry run) skips the write-permission check: a read-only
    identity is enough to watch what a rollout would do.
    """

    def __init__(self, api_client: client.ApiClient, *, check_write_access: bool = True) -> None:
        self._api = client.CoreV1Api(api_client)
        self._authz = client.AuthorizationV1Api(api_client)
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
            answer = _json_call(f"access review ({check})", self._authz.create_self_subject_access_review, body)
        except (AccessDenied, ServiceNotFound):
            return None  # self-reviews are not allowed here: the writes themselves will tell
        return bool(answer.get("status", {}).get("allowed"))

    def _access_refusal(self, policy: CanaryPolicy) -> str | None:
        """Why RBAC would stop this policy's writes, checked once per Service pair until a 403."""
        key = f"{policy.spec.target.service}|{policy.spec.source.service}"
        if not self._check_write_access or key in self._access_verified:
            return None
        missing: list[AccessCheck] = []
        for check in access_needed(policy):
            if check.verb == "get":
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
        body = _json_call(f"read Service {ref}", self._api.read_namespaced_service, ref.name, ref.namespace)
        self._uids[str(ref)] = str(body.get("metadata", {}).get("uid", ""))
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
        state: RolloutState | None = None
        state_error: str | None = None
        raw_state = target_ann.get(STATE_ANNOTATION)
        if raw_state:
            try:
                state = decode_state(raw_state)
                if state.policy != policy.name:
                    state_error = f"stored state belongs to policy {state.policy!r}"
                    state = None
            except ValueError as exc:
                state_error = str(exc)
        return PairSnapshot(
            target_weight=target_weight,
            source_weight=source_weight,
            state=state,
            refusal=refusal,
            state_error=state_error,
            versions=(_version(target), _version(source)),
        )

    # -- writing ---------------------------------------------------------------------------------

    def apply(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights | None,
        state: RolloutState,
        *,
        force: bool = False,
    ) -> None:
        """Patch the target (weight + state), then the source (weight); skip what is unchanged."""
        try:
            self._write(policy, seen, weights, state, force)
        except AccessDenied:
            self._access_verified.clear()  # the grant changed under us: check again before writing
            raise

    def _write(
        self, policy: CanaryPolicy, seen: PairSnapshot, weights: Weights | None, state: RolloutState, force: bool
    ) -> None:
        target_changes: dict[str, str] = {}
        # A forced write (rollback) always states both weights: what was seen may be stale.
        if weights is not None and (force or weights.target != seen.target_weight):
            target_changes[WEIGHT_ANNOTATION] = str(weights.target)
        encoded = encode_state(state)
        if seen.state is None or encode_state(seen.state) != encoded:
            target_changes[STATE_ANNOTATION] = encoded
        if target_changes:
            self._patch(policy.spec.target.service, target_changes, seen.versions[0], seen.target_weight, force)
        if weights is not None and weights.source is not None and (force or weights.source != seen.source_weight):
            self._patch(
                policy.spec.source.service,
                {WEIGHT_ANNOTATION: str(weights.source)},
                seen.versions[1],
                seen.source_weight,
                force,
            )

    def _patch(
        self, ref: ServiceRef, annotations: dict[str, str], version: str, expected: int | None, force: bool
    ) -> None:
        for _attempt in range(_CONFLICT_RETRIES):
            body = {"metadata": {"resourceVersion": version, "annotations": annotations}}
            try:
                self._api.patch_namespaced_service(
                    ref.name, ref.namespace, body, _content_type=_MERGE_PATCH, _request_timeout=_TIMEOUT
                )
                _log.debug("patched", service=str(ref), annotations=sorted(annotations))
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise _translate(exc, f"patch Service {ref}") from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise _translate(exc, f"patch Service {ref}") from exc
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
            version = _version(fresh)
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
            self._api.create_namespaced_event(ref.namespace, body, _request_timeout=_TIMEOUT)  # type: ignore[arg-type]
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _translate(exc, f"create Event for {ref}") from exc


def _annotations(body: dict[str, Any]) -> dict[str, str]:
    return dict(body.get("metadata", {}).get("annotations") or {})


def _version(body: dict[str, Any]) -> str:
    return str(body.get("metadata", {}).get("resourceVersion", ""))


def _refusal(ref: ServiceRef, annotations: dict[str, str]) -> str | None:
    """Why the cloud controller would ignore a weight on this Service, if it would."""
    if not annotations.get(LB_ID_ANNOTATION, "").strip():
        return f"Service {ref} lacks {LB_ID_ANNOTATION}: the cloud controller ignores its weight"
    if not annotations.get(VGROUP_ANNOTATION, "").strip():
        return f"Service {ref} lacks {VGROUP_ANNOTATION}: the cloud controller ignores its weight"
    if annotations.get(IGNORE_WEIGHT_ANNOTATION, "").strip().lower() == "on":
        return f'Service {ref} has {IGNORE_WEIGHT_ANNOTATION}: "on": weight updates are switched off'
    return None
