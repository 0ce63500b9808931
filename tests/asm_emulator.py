"""An EMULATOR of ASM's IstioGateway reconciler, for the tests: not ASM, and not tested against it.

ASM's reconciler runs in Alibaba Cloud's managed control plane and cannot run here. This thread
behaves as ASM is documented to behave towards the generated gateway Service, and no further:

- it copies the effective ``serviceAnnotations`` of each IstioGateway in one namespace onto the
  gateway's Service: ``spec.serviceAnnotations`` with ``spec.overrides[<cluster id>]`` laid over it
  key by key (the reading ``controller.core.istio_gateway`` also uses; written independently here);
- it overwrites a direct edit of those keys on the Service (ASM owns them), and removes a key it
  had copied once the IstioGateway drops it;
- it reports a failure in ``status.ErrorMessage`` (capitalised, as in the Go types) instead of
  applying, when told to (``fail_with``), and clears it when it applies again.

It polls as the test control plane's admin (``ControlPlane.call``), every ``interval`` seconds, and
applies a difference only once it has been seen for ``lag`` seconds (ASM's reconcile delay).
``applying = False`` stops it applying anything (an ASM that is down). The Service of a gateway
``<name>`` is ``istio-<name>`` unless ``services`` says otherwise.

Use it as a context manager: the thread starts on entry and is stopped and joined on exit; an
error inside the thread fails the test at exit (or at the next ``wait_synced``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from controller.core.istio_gateway import ISTIO_GATEWAY_GROUP, ISTIO_GATEWAY_PLURAL
from tests.kube_cluster import ControlPlane
from tests.servers import wait_for

__all__ = ["AsmEmulator"]


class AsmEmulator:
    """ASM's copying of ``serviceAnnotations`` onto gateway Services, as a polling thread (see module doc)."""

    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        *,
        cluster_id: str | None = None,
        services: dict[str, str] | None = None,
        lag: float = 0.0,
        interval: float = 0.05,
        version: str = "v1beta1",
    ) -> None:
        self.plane = plane
        self.namespace = namespace
        self.cluster_id = cluster_id
        self.services = dict(services or {})
        self.lag = lag
        self.interval = interval
        self.version = version
        #: False: ASM applies nothing (and reports nothing) until it is set again
        self.applying = True
        #: (gateway, Service, annotations patch) of every change the emulator made to a Service
        self.applied: list[tuple[str, str, dict[str, str | None]]] = []
        self._error_message: str | None = None
        self._copied: dict[str, set[str]] = {}  # per gateway: the keys the emulator put on its Service
        self._pending: dict[str, tuple[dict[str, str | None], float]] = {}  # difference, first seen at
        self._lock = threading.Lock()
        self._pass = threading.Lock()  # held through one reconcile pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"asm-emulator-{namespace}", daemon=True)
        self._failure: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> AsmEmulator:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise AssertionError("the ASM emulator thread did not stop within 10 s")
        if self._failure is not None and kind is None:
            raise AssertionError(f"the ASM emulator failed: {self._failure!r}") from self._failure

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- switches ----------------------------------------------------------------------------------

    def fail_with(self, message: str | None) -> None:
        """Report ``message`` in every gateway's status.ErrorMessage instead of applying; None: recover."""
        with self._lock:
            self._error_message = message

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """ASM applies nothing inside the with-block (a human's edit of the Service then stands)."""
        with self._pass:  # a pass under way finishes first: nothing is applied after this returns
            self.applying = False
        try:
            yield
        finally:
            self.applying = True

    # -- observing ---------------------------------------------------------------------------------

    def service_for(self, gateway: str) -> str:
        return self.services.get(gateway, f"istio-{gateway}")

    def in_sync(self) -> bool:
        """Every IstioGateway's effective annotations are on its Service and its status says so.

        With ``fail_with`` set: every status carries the error (nothing is applied then).
        """
        self._raise_failure()
        with self._lock:
            error = self._error_message
        for gateway in self._gateways():
            if self._status_update(gateway, error) is not None:
                return False
            if error is None and self._difference(gateway):
                return False
        return True

    def wait_synced(self, timeout: float = 10.0) -> None:
        wait_for(self.in_sync, timeout=timeout, what="the ASM emulator to copy serviceAnnotations onto the Services")

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._pass:
                    if self.applying:
                        self._reconcile()
            except BaseException as exc:  # kept for the test thread: a silent emulator would hide a bug
                self._failure = exc
                return
            self._stop.wait(self.interval)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise AssertionError(f"the ASM emulator failed: {self._failure!r}") from self._failure

    def _collection(self) -> str:
        return f"/apis/{ISTIO_GATEWAY_GROUP}/{self.version}/namespaces/{self.namespace}/{ISTIO_GATEWAY_PLURAL}"

    def _gateways(self) -> list[dict[str, Any]]:
        return list(self.plane.call("GET", self._collection()).get("items") or [])

    def _effective(self, gateway: dict[str, Any]) -> dict[str, str]:
        spec = gateway.get("spec") or {}
        annotations = dict(spec.get("serviceAnnotations") or {})
        if self.cluster_id is not None:
            override = (spec.get("overrides") or {}).get(self.cluster_id) or {}
            annotations.update(override.get("serviceAnnotations") or {})
        return {key: str(value) for key, value in annotations.items()}

    def _difference(self, gateway: dict[str, Any]) -> dict[str, str | None]:
        """The annotation patch that would make the Service show what the IstioGateway says."""
        name = gateway["metadata"]["name"]
        service = self.plane.call(
            "GET", f"/api/v1/namespaces/{self.namespace}/services/{self.service_for(name)}", ok=(200, 404)
        )
        if service.get("kind") != "Service":
            return {}
        shown = service["metadata"].get("annotations") or {}
        wanted = self._effective(gateway)
        patch: dict[str, str | None] = {key: value for key, value in wanted.items() if shown.get(key) != value}
        with self._lock:
            dropped = self._copied.get(name, set()) - set(wanted)
        patch.update({key: None for key in dropped if key in shown})
        return patch

    def _reconcile(self) -> None:
        with self._lock:
            error = self._error_message
        now = time.monotonic()
        for gateway in self._gateways():
            name = gateway["metadata"]["name"]
            if error is not None:
                self._set_status(name, self._status_update(gateway, error))
                continue
            difference = self._difference(gateway)
            if not difference:
                self._pending.pop(name, None)
                self._set_status(name, self._status_update(gateway, None))
                continue
            pending = self._pending.get(name)
            if pending is None or pending[0] != difference:
                self._pending[name] = (difference, now)
                if self.lag > 0:
                    continue
            elif now - pending[1] < self.lag:
                continue
            service = self.service_for(name)
            self.plane.call(
                "PATCH",
                f"/api/v1/namespaces/{self.namespace}/services/{service}",
                {"metadata": {"annotations": difference}},
            )
            with self._lock:
                copied = self._copied.setdefault(name, set())
                copied.update(key for key, value in difference.items() if value is not None)
                copied.difference_update(key for key, value in difference.items() if value is None)
                self.applied.append((name, service, difference))
            self._pending.pop(name, None)

    @staticmethod
    def _status_update(gateway: dict[str, Any], error: str | None) -> dict[str, Any] | None:
        """The status patch ASM would write now, None when the status already says it.

        Written only on a change: every status write is a new resourceVersion of the object.
        """
        status = gateway.get("status") or {}
        if error is not None:
            return None if status.get("ErrorMessage") == error else {"Status": "Failed", "ErrorMessage": error}
        if status.get("ErrorMessage") or status.get("Status") != "Running":
            return {"Status": "Running", "ErrorMessage": None}
        return None

    def _set_status(self, name: str, status: dict[str, Any] | None) -> None:
        if status is not None:
            self.plane.call("PATCH", f"{self._collection()}/{name}/status", {"status": status}, ok=(200, 404))
