"""The Kubernetes API calls the adapters make, as plain requests through the client's ``ApiClient``.

The ``kubernetes`` package's generated API classes (``CoreV1Api`` and the like) import, with the
first of them, the pydantic model of every object their methods name (some 270 for ``CoreV1Api``:
about 21 MiB resident and 0.3 s at start-up), and validate each call's arguments with pydantic.
The adapters only ever want raw JSON (``kube_api.json_call``), so these classes keep the names and
arguments of the few generated methods the adapters call and send the same requests through the
same ``ApiClient`` (``param_serialize`` then ``call_api``): its configuration, authentication
(token refresh included), user agent and connection pool. As the generated methods do with
``_preload_content=False``, a call returns the urllib3 response (its body read) and a non-2xx answer
raises the client's ``ApiException``; errors are translated by ``kube_api``, as before.

Only the methods used are here: a new call is one line naming its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes.client.api_client import ApiClient
from kubernetes.client.exceptions import ApiException

__all__ = [
    "AuthenticationV1",
    "AuthorizationV1",
    "CoordinationV1",
    "CoreV1",
    "CustomObjects",
    "DiscoveryV1",
]

_JSON = "application/json"
_MERGE_PATCH = "application/merge-patch+json"
_NAMESPACED = "/namespaces/{namespace}"


class _Resource:
    """Requests to one API server through its ``ApiClient``."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api_client = api_client

    def _request(
        self,
        method: str,
        path: str,
        path_params: Mapping[str, str],
        body: object = None,
        *,
        query: Mapping[str, object] | None = None,
        _content_type: str | None = None,
        _request_timeout: float | tuple[float, float] | None = None,
        _preload_content: bool = False,  # (accepted as the generated methods take it; the answer is always raw)
    ) -> Any:
        headers = {"Accept": _JSON}
        if body is not None:  # a PATCH is a merge patch unless named otherwise (never a plain JSON body: 415)
            headers["Content-Type"] = _content_type or (_MERGE_PATCH if method == "PATCH" else _JSON)
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            path_params=dict(path_params),
            query_params=[(key, value) for key, value in (query or {}).items() if value is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        answer = self.api_client.call_api(*request, _request_timeout=_request_timeout)
        answer.read()  # type: ignore[no-untyped-call]  # the body, so that the connection goes back to the pool even when nobody reads it
        if not 200 <= answer.status <= 299:
            raise ApiException.from_response(http_resp=answer, body=None, data=None)
        return answer.response


def _paging(limit: int | None, _continue: str | None, **selectors: str | None) -> dict[str, object]:
    return {**selectors, "limit": limit, "continue": _continue}


class CoreV1(_Resource):
    """``/api/v1``: Services, ConfigMaps, Events, Nodes."""

    _SERVICE = f"/api/v1{_NAMESPACED}/services/{{name}}"
    _CONFIG_MAPS = f"/api/v1{_NAMESPACED}/configmaps"
    _EVENTS = f"/api/v1{_NAMESPACED}/events"

    def read_namespaced_service(self, name: str, namespace: str, **options: Any) -> Any:
        return self._request("GET", self._SERVICE, {"name": name, "namespace": namespace}, **options)

    def patch_namespaced_service(self, name: str, namespace: str, body: object, **options: Any) -> Any:
        return self._request("PATCH", self._SERVICE, {"name": name, "namespace": namespace}, body, **options)

    def read_namespaced_config_map(self, name: str, namespace: str, **options: Any) -> Any:
        path = f"{self._CONFIG_MAPS}/{{name}}"
        return self._request("GET", path, {"name": name, "namespace": namespace}, **options)

    def create_namespaced_config_map(self, namespace: str, body: object, **options: Any) -> Any:
        return self._request("POST", self._CONFIG_MAPS, {"namespace": namespace}, body, **options)

    def patch_namespaced_config_map(self, name: str, namespace: str, body: object, **options: Any) -> Any:
        path = f"{self._CONFIG_MAPS}/{{name}}"
        return self._request("PATCH", path, {"name": name, "namespace": namespace}, body, **options)

    def list_namespaced_config_map(
        self, namespace: str, label_selector: str | None = None, limit: int | None = None, **options: Any
    ) -> Any:
        query = {"labelSelector": label_selector, "limit": limit}
        return self._request("GET", self._CONFIG_MAPS, {"namespace": namespace}, query=query, **options)

    def create_namespaced_event(self, namespace: str, body: object, **options: Any) -> Any:
        return self._request("POST", self._EVENTS, {"namespace": namespace}, body, **options)

    def list_namespaced_event(
        self,
        namespace: str,
        field_selector: str | None = None,
        limit: int | None = None,
        _continue: str | None = None,
        **options: Any,
    ) -> Any:
        query = _paging(limit, _continue, fieldSelector=field_selector)
        return self._request("GET", self._EVENTS, {"namespace": namespace}, query=query, **options)

    def list_node(
        self, label_selector: str | None = None, limit: int | None = None, _continue: str | None = None, **options: Any
    ) -> Any:
        query = _paging(limit, _continue, labelSelector=label_selector)
        return self._request("GET", "/api/v1/nodes", {}, query=query, **options)


class DiscoveryV1(_Resource):
    """``discovery.k8s.io/v1``: EndpointSlices."""

    def list_namespaced_endpoint_slice(
        self,
        namespace: str,
        label_selector: str | None = None,
        limit: int | None = None,
        _continue: str | None = None,
        **options: Any,
    ) -> Any:
        path = f"/apis/discovery.k8s.io/v1{_NAMESPACED}/endpointslices"
        query = _paging(limit, _continue, labelSelector=label_selector)
        return self._request("GET", path, {"namespace": namespace}, query=query, **options)


class AuthorizationV1(_Resource):
    """``authorization.k8s.io/v1``: what this identity may do."""

    def create_self_subject_access_review(self, body: object, **options: Any) -> Any:
        return self._request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {}, body, **options)


class AuthenticationV1(_Resource):
    """``authentication.k8s.io/v1``: who this identity is."""

    def create_self_subject_review(self, body: object, **options: Any) -> Any:
        return self._request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", {}, body, **options)


class CoordinationV1(_Resource):
    """``coordination.k8s.io/v1``: the leader-election Lease."""

    _LEASES = f"/apis/coordination.k8s.io/v1{_NAMESPACED}/leases"

    def read_namespaced_lease(self, name: str, namespace: str, **options: Any) -> Any:
        return self._request("GET", f"{self._LEASES}/{{name}}", {"name": name, "namespace": namespace}, **options)

    def create_namespaced_lease(self, namespace: str, body: object, **options: Any) -> Any:
        return self._request("POST", self._LEASES, {"namespace": namespace}, body, **options)

    def replace_namespaced_lease(self, name: str, namespace: str, body: object, **options: Any) -> Any:
        path = f"{self._LEASES}/{{name}}"
        return self._request("PUT", path, {"name": name, "namespace": namespace}, body, **options)


class CustomObjects(_Resource):
    """Custom resources by group, version and plural (Istio's Gateways)."""

    _CLUSTER = "/apis/{group}/{version}/{plural}"
    _OBJECT = "/apis/{group}/{version}" + _NAMESPACED + "/{plural}/{name}"

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **options: Any
    ) -> Any:
        where = {"group": group, "version": version, "namespace": namespace, "plural": plural, "name": name}
        return self._request("GET", self._OBJECT, where, **options)

    def patch_namespaced_custom_object(  # noqa: PLR0917
        self, group: str, version: str, namespace: str, plural: str, name: str, body: object, **options: Any
    ) -> Any:
        where = {"group": group, "version": version, "namespace": namespace, "plural": plural, "name": name}
        return self._request("PATCH", self._OBJECT, where, body, **options)

    def list_cluster_custom_object(
        self,
        group: str,
        version: str,
        plural: str,
        limit: int | None = None,
        _continue: str | None = None,
        **options: Any,
    ) -> Any:
        where = {"group": group, "version": version, "plural": plural}
        return self._request("GET", self._CLUSTER, where, query=_paging(limit, _continue), **options)
