"""What both Kubernetes adapters share: building the client, and translating its errors into ours.

Only the modules in ``controller.adapters`` import ``kubernetes`` (an import-linter contract).
Every call asks for raw JSON (``_preload_content=False``): no model classes, and a body we did not
expect is our error, not an AttributeError deep inside the client. The calls are ``kube_rest``'s,
not the generated API classes' (which would load hundreds of pydantic models at start-up).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from controller.errors import AccessDenied, ClusterError, ClusterUnavailable, Conflict, ServiceNotFound

__all__ = ["TIMEOUT", "build_api_client", "data_and_asm_clients", "json_call", "resource_version", "translate"]

#: (connect, read) seconds for every API call: a hung API server must not hold a rollback.
TIMEOUT = (3.0, 10.0)


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


def translate(exc: Exception, what: str) -> ClusterError:
    """One of our ClusterErrors for a client exception; the API server's message kept, bounded."""
    if isinstance(exc, ApiException):
        status = exc.status or 0
        detail = _api_message(exc)[:300]
        if status == 404:
            return ServiceNotFound(f"{what}: not found")
        if status in (401, 403):
            return AccessDenied(
                f"{what}: forbidden for the controller's identity ({status}): {detail}; "
                "grant what `gateway-canary rbac` prints"
            )
        if status == 409:
            return Conflict(f"{what}: changed by someone else since it was read ({detail})")
        return ClusterUnavailable(f"{what}: API server answered {status}: {detail}")
    return ClusterUnavailable(f"{what}: API server unreachable: {type(exc).__name__}")


def json_call(
    what: str,
    call: Callable[..., Any],
    *args: Any,
    request_timeout: tuple[float, float] = TIMEOUT,
    **options: Any,
) -> dict[str, Any]:
    """Call the client for the raw JSON; library errors become ours."""
    try:
        response = call(*args, _preload_content=False, _request_timeout=request_timeout, **options)
        body = json.loads(response.data)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise translate(exc, what) from exc
    except ValueError as exc:
        raise ClusterUnavailable(f"{what}: the API server's answer is not JSON") from exc
    if not isinstance(body, dict):
        raise ClusterUnavailable(f"{what}: the API server's answer is not a JSON object")
    return body


def resource_version(body: dict[str, Any]) -> str:
    """The object's resourceVersion, the token of optimistic concurrency."""
    return str((body.get("metadata") or {}).get("resourceVersion", ""))


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message", exc.reason))
    except (ValueError, AttributeError):
        return str(exc.reason)


def data_and_asm_clients(
    stack: ExitStack,
    kubeconfig: Path | None,
    context: str | None,
    asm_kubeconfig: Path | None,
    asm_context: str | None,
) -> tuple[client.ApiClient, client.ApiClient]:
    """The data-plane cluster's client and the ASM control plane's (the same one when no ASM
    kubeconfig or context is set), closed with ``stack``. Raises GatewayCanaryError."""
    data_plane = stack.enter_context(build_api_client(kubeconfig, context))
    if asm_kubeconfig is None and asm_context is None:
        return data_plane, data_plane
    return data_plane, stack.enter_context(build_api_client(asm_kubeconfig, asm_context))
