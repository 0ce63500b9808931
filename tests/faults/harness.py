"""The fault suite's harness: real controller processes, and what the tests watch them with.

``ControllerProcess`` is one ``gateway-canary run`` (``.venv/bin/python -m controller run``) as a
subprocess, configured only through its ``GATEWAY_CANARY_*`` environment, against the session's
real kube-apiserver as the controller's ServiceAccount (``tests.kube_cluster.Cluster``). A
``Fleet`` starts any number of them from one configuration (each with its own HTTP port, log and
identity) and kills every one it started when the test ends, however it ends: the tests of two
replicas (SIGKILL or SIGSTOP the leader, a rolling restart) are a ``Fleet`` with ``election=``.

What the tests watch, none of it inside the controller:

- ``AuditTail`` follows the API server's audit log as it is written. The log is written in
  blocking mode, before the client gets its answer, so a callback that SIGKILLs the controller
  on an entry (the intent saved, the target patched, the source patched) kills it at that point
  of the write-ahead protocol, give or take the few milliseconds it takes to read the entry:
  ``moment_of`` says afterwards which point the kill really hit.
- ``AlertReceiver`` is a webhook on a fixed loopback port that is alive, dead (nothing listens:
  connection refused) or hanging (reads the request and never answers), and records every
  delivery with the alert's id.
- ``apiserver_outage`` stops kube-apiserver (etcd keeps everything) and always starts it again.
- ``Probe`` samples ``/healthz`` and metrics in a thread, as a kubelet and Prometheus would.

``Bench`` is one test's rollout to kill and break: the gateway Services, the controller's Role, the
emulated cloud controller, traffic that follows the CLB, a fast policy file, and its ``Fleet``.

Every log a controller writes is registered with ``tests.faults.report.register_log`` (scenario 7
scans them all for ``SECRETS``), and every controller is given the suite's secrets.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from controller.core.cloud import BackendMode, Backends
from controller.core.commands import COMMAND_ANNOTATION
from controller.rbac import state_object_name
from tests.ccm_emulator import CcmEmulator
from tests.faults.report import SECRETS, register_log
from tests.kube_cluster import SOURCE, TARGET, AuditedWrite, Cluster, ControlPlane
from tests.servers import WEIGHT, LaggedShare, TrafficExporter, free_port, wait_for

__all__ = [
    "PYTHON",
    "AlertReceiver",
    "AuditTail",
    "Bench",
    "ControllerProcess",
    "Delivery",
    "Election",
    "Fleet",
    "Kill",
    "Moment",
    "Probe",
    "ReceiverMode",
    "Write",
    "apiserver_outage",
    "disagreement",
    "error_ratio_query",
    "give_command",
    "moment_of",
    "prometheus_value",
    "stored_state",
    "weights",
]

ROOT = Path(__file__).resolve().parents[2]
#: the project's interpreter (the one the README's commands use), else this one
PYTHON = ROOT / ".venv" / "bin" / "python" if (ROOT / ".venv" / "bin" / "python").exists() else Path(sys.executable)
_SIGNAL_WAIT_SECONDS = 20.0


# --- the controller process --------------------------------------------------------------------------


@dataclass(frozen=True)
class Election:
    """Leader election for every process of a Fleet (None there: off, the controller's default).

    Short timings by default, so that a test sees a takeover in seconds. Each process is its own
    candidate, named by its ``ControllerProcess.identity``.
    """

    lease_name: str = "gateway-canary"
    lease_duration_seconds: float = 4.0
    renew_deadline_seconds: float = 3.0
    retry_period_seconds: float = 0.5

    def env(self, identity: str) -> dict[str, str]:
        return {
            "GATEWAY_CANARY_LEADER_ELECTION": "true",
            "GATEWAY_CANARY_LEASE_NAME": self.lease_name,
            "GATEWAY_CANARY_LEASE_DURATION_SECONDS": str(self.lease_duration_seconds),
            "GATEWAY_CANARY_RENEW_DEADLINE_SECONDS": str(self.renew_deadline_seconds),
            "GATEWAY_CANARY_RETRY_PERIOD_SECONDS": str(self.retry_period_seconds),
            "GATEWAY_CANARY_IDENTITY": identity,
        }


class ControllerProcess:
    """One ``gateway-canary run`` subprocess, its HTTP endpoints and its JSON log.

    ``env`` is its whole environment: nothing of the test runner's ``GATEWAY_CANARY_*`` leaks in.
    Not started until ``start()``; a process that was started is one incarnation (a restart is a
    new ``ControllerProcess``, with a log of its own).
    """

    def __init__(self, identity: str, env: Mapping[str, str], log: Path, *, policies: Path) -> None:
        self.identity = identity
        self.env = dict(env)
        self.http_port = int(self.env["GATEWAY_CANARY_HTTP_PORT"])
        self.log = log
        self.policies = policies
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None  # monotonic
        self.paused = False  # SIGSTOPped and not continued
        self._out: Any = None

    def __repr__(self) -> str:
        return f"ControllerProcess({self.identity}, pid={self.pid}, port={self.http_port})"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> ControllerProcess:
        if self.proc is not None:
            raise AssertionError(f"{self} was started already; start a new process to restart")
        self._out = register_log(self.log).open("ab")
        self.proc = subprocess.Popen(
            [str(PYTHON), "-m", "controller", "run", "--policies", str(self.policies)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        self.started_at = time.monotonic()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout: float = 30.0) -> ControllerProcess:
        """Until ``/readyz`` answers 200; fails at once (with the log's end) if the process exits."""

        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self} exited with {self.exit_code()}:\n{self.tail()}")
            answer = self.get("/readyz")
            return answer is not None and answer.status_code == 200

        wait_for(ready, timeout=timeout, interval=0.05, what=f"{self} /readyz")
        return self

    def send(self, sig: int) -> None:
        """Send ``sig`` and return at once (SIGSTOP and SIGCONT also set ``paused``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            self.paused = sig == signal.SIGSTOP

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig``. SIGKILL, SIGTERM, SIGINT: wait for the exit and return its code. SIGSTOP
        freezes the process (``paused``), SIGCONT resumes it: both return None at once."""
        if self.proc is None or self.proc.poll() is not None:
            return self.exit_code()
        self.send(sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            return None
        if sig in (signal.SIGTERM, signal.SIGINT) and self.paused:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.paused = False
        try:
            return self.proc.wait(_SIGNAL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self.proc.poll() is not None:
                self._close_log()

    def stop(self) -> int | None:
        """A clean shutdown (SIGTERM): the exit code."""
        return self.kill(signal.SIGTERM)

    def close(self) -> None:
        """Whatever state it is in: gone (SIGKILL), its log closed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    # -- HTTP --------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 1.0) -> requests.Response | None:
        """GET on its status server; None when it does not answer."""
        try:
            return requests.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout)
        except requests.RequestException:
            return None

    def healthy(self) -> bool:
        answer = self.get("/healthz")
        return answer is not None and answer.status_code == 200

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``/metrics`` parsed: (sample name, sorted labels) -> value. Empty when it does not answer."""
        answer = self.get("/metrics")
        if answer is None or answer.status_code != 200:
            return {}
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
        return samples

    def values(self, name: str) -> list[float]:
        """Every sample named ``name``, whatever its labels ([] when it is not exported)."""
        return [value for (sample, _), value in self.metrics().items() if sample == name]

    def metric(self, name: str, **labels: str) -> float | None:
        """The one sample ``name`` with exactly ``labels`` (None: not exported, or no answer)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    # -- the log -----------------------------------------------------------------------------------

    def lines(self) -> list[dict[str, Any]]:
        """Its JSON log lines so far (anything else, such as a traceback on stderr, is skipped)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Probe:
    """Samples a process's ``/healthz`` and some metrics every ``interval`` seconds, in a thread:
    what a kubelet and a Prometheus would have seen while the with-block ran."""

    def __init__(self, process: ControllerProcess, metrics: tuple[str, ...] = (), *, interval: float = 0.25) -> None:
        self.process, self.names, self.interval = process, metrics, interval
        #: (monotonic time, /healthz status or None when it did not answer, {metric: values})
        self.samples: list[tuple[float, int | None, dict[str, list[float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe-{process.identity}", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            answer = self.process.get("/healthz")
            status = None if answer is None else answer.status_code
            values = {name: self.process.values(name) for name in self.names}
            self.samples.append((started, status, values))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def unhealthy(self) -> list[tuple[float, int | None]]:
        """The samples whose /healthz was not 200."""
        return [(at, status) for at, status, _ in self.samples if status != 200]


class Fleet:
    """Controller processes that share one configuration; every one started is killed at the end.

    ``extra_env`` adds or overrides settings for all of them (``start(extra_env=...)`` for one).
    ``election``: leader election for every process (each its own identity); None, the default,
    leaves it off. The receivers' URLs and Prometheus's token are the suite's ``SECRETS``.
    """

    def __init__(
        self,
        *,
        kube: Cluster,
        policies: Path,
        prometheus_url: str,
        workdir: Path,
        webhook_url: str | None = None,
        alertmanager_url: str | None = None,
        election: Election | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.kube = kube
        self.policies = policies
        self.workdir = workdir
        self.election = election
        self.started: list[ControllerProcess] = []
        self._numbers = itertools.count(1)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_CANARY_")}
        self.env: dict[str, str] = {
            **inherited,
            "GATEWAY_CANARY_POLICIES_DIR": str(policies),
            "GATEWAY_CANARY_KUBECONFIG": str(kube.write_kubeconfig(workdir / "controller.kubeconfig")),
            "GATEWAY_CANARY_NAMESPACE": kube.ns,
            "GATEWAY_CANARY_PROMETHEUS_URL": prometheus_url,
            "GATEWAY_CANARY_PROMETHEUS_TOKEN": SECRETS["prometheus token"],
            "GATEWAY_CANARY_HTTP_HOST": "127.0.0.1",
            "GATEWAY_CANARY_LOG_FORMAT": "json",
            "GATEWAY_CANARY_RELOAD_INTERVAL_SECONDS": "0.5",
            "GATEWAY_CANARY_COMMAND_POLL_SECONDS": "0.5",
            "GATEWAY_CANARY_FAILURE_RECHECK_SECONDS": "1",
        }
        if webhook_url is not None:
            self.env["GATEWAY_CANARY_WEBHOOK_URL"] = webhook_url
        if alertmanager_url is not None:
            self.env["GATEWAY_CANARY_ALERTMANAGER_URL"] = alertmanager_url
        self.env.update(extra_env or {})

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def process(
        self, name: str | None = None, *, extra_env: Mapping[str, str] | None = None, identity: str | None = None
    ) -> ControllerProcess:
        """A new, not yet started, process (a free port, a log of its own, its identity).

        ``identity`` (its name in the Lease) defaults to ``<name>-<n>``, new for every process, as
        the controller's own default is; give an earlier one to start a process as the same replica.
        """
        number = next(self._numbers)
        log_name = f"{name or 'controller'}-{number}"
        identity = identity or log_name
        env = {**self.env, "GATEWAY_CANARY_HTTP_PORT": str(free_port())}
        if self.election is not None:
            env.update(self.election.env(identity))
        env.update(extra_env or {})
        process = ControllerProcess(identity, env, self.workdir / f"{log_name}.log", policies=self.policies)
        self.started.append(process)
        return process

    def start(
        self,
        name: str | None = None,
        *,
        extra_env: Mapping[str, str] | None = None,
        identity: str | None = None,
        ready: bool = True,
    ) -> ControllerProcess:
        """Start a new process (and wait for ``/readyz`` unless ``ready=False``)."""
        process = self.process(name, extra_env=extra_env, identity=identity).start()
        return process.wait_ready() if ready else process

    @property
    def running(self) -> list[ControllerProcess]:
        return [process for process in self.started if process.alive()]

    def close(self) -> None:
        for process in self.started:
            process.close()


# --- the audit log as it is written ----------------------------------------------------------------


class Moment(enum.StrEnum):
    """Where in a weight change a write of the controller's is (README: the write-ahead protocol)."""

    INTENT = "intent"  # 1. the state object saved with a pending intent
    TARGET = "target"  # 2. the target Service's weight patched
    SOURCE = "source"  # 3. the source Service's weight patched
    STATE = "state"  # the state object saved with no intent pending (4., or any other save)
    OTHER = "other"  # an Event, anything else


def stored_state(write: AuditedWrite | Write) -> dict[str, Any] | None:
    """The rollout state a ConfigMap write carries (decoded), None when it carries none."""
    if write.resource != "configmaps":
        return None
    text = (write.body.get("data") or {}).get("state")
    if not isinstance(text, str):
        return None
    with contextlib.suppress(ValueError):
        state = json.loads(text)
        return state if isinstance(state, dict) else None
    return None


def moment_of(write: AuditedWrite | Write, *, target: str = TARGET, source: str = SOURCE) -> Moment:
    """Which point of the write-ahead protocol ``write`` is."""
    if write.resource == "services" and write.verb == "patch":
        annotations = (write.body.get("metadata") or {}).get("annotations") or {}
        if WEIGHT in annotations:
            return {target: Moment.TARGET, source: Moment.SOURCE}.get(write.name, Moment.OTHER)
    state = stored_state(write)
    if state is not None:
        return Moment.INTENT if state.get("pending") else Moment.STATE
    return Moment.OTHER


@dataclass(frozen=True)
class Write:
    """One write the API server answered, from its audit log (as ``AuditedWrite``, with its time)."""

    user: str
    verb: str
    resource: str
    namespace: str
    name: str
    code: int
    body: dict[str, Any] = field(repr=False)
    at: datetime  # the API server's stageTimestamp (wall clock, microseconds)
    seen: float  # monotonic time the tail read it
    user_agent: str = ""

    @property
    def moment(self) -> Moment:
        return moment_of(self)


class Kill:
    """A signal armed on the audit log: sent to ``process`` on the first write ``when`` accepts.

    ``before`` runs just before the signal (a fault injected right before a kill). ``fired``
    is set once it was sent, with the write that triggered it in ``write``. ``label`` says what
    it aims at, for the test's records.
    """

    def __init__(
        self,
        process: ControllerProcess,
        when: Callable[[Write], bool],
        *,
        sig: int = signal.SIGKILL,
        before: Callable[[], None] | None = None,
        label: str = "",
    ) -> None:
        self.process, self.when, self.sig, self.before, self.label = process, when, sig, before, label
        self.fired = threading.Event()
        self.write: Write | None = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.fired.is_set() or self.cancelled

    def __call__(self, write: Write) -> None:
        if self.done or not self.when(write):
            return
        if self.before is not None:
            self.before()
        self.process.send(self.sig)
        self.write = write
        self.fired.set()


class AuditTail:
    """The audit log's entries of one namespace from now on, read as they are written.

    Callbacks (``on_write``, ``kill_on``) run in the tail's thread for every write answered (any
    status), as soon as it is read (the file is polled every millisecond): a ``Kill`` lands a
    few milliseconds after the API server wrote the entry, before or just after the client got
    the answer, so whether the process made another write first is read afterwards (``settle``,
    then the writes). Only the writes of ``user`` (default: the controller's identity) are seen.
    """

    def __init__(self, plane: ControlPlane, namespace: str, *, user: str | None = None) -> None:
        self.plane = plane
        self.namespace = namespace
        self.user = user or f"system:serviceaccount:{namespace}:gateway-canary"
        self.errors: list[BaseException] = []
        self._writes: list[Write] = []
        self._callbacks: list[Callable[[Write], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._needle = f'"namespace":"{namespace}"'.encode()
        self._offset = plane.audit_log.stat().st_size if plane.audit_log.exists() else 0
        self._read_to = self._offset
        self._thread = threading.Thread(target=self._run, name=f"audit-tail-{namespace}", daemon=True)

    def __enter__(self) -> AuditTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def on_write(self, callback: Callable[[Write], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def kill_on(
        self,
        process: ControllerProcess,
        when: Callable[[Write], bool],
        *,
        sig: int = signal.SIGKILL,
        before: Callable[[], None] | None = None,
        label: str = "",
    ) -> Kill:
        """Send ``sig`` to ``process`` on the first write from now on that ``when`` accepts."""
        kill = Kill(process, when, sig=sig, before=before, label=label)
        with self._lock:
            self._callbacks.append(kill)
        return kill

    def writes(self) -> list[Write]:
        """Every write seen so far, oldest first."""
        self._raise_errors()
        with self._lock:
            return list(self._writes)

    def settle(self, *, quiet: float = 0.15, timeout: float = 10.0) -> list[Write]:
        """Every write, once the tail has read the whole file and nothing new came for ``quiet``
        seconds (a request a killed process had sent may still be answered after its death)."""
        last: list[float] = [time.monotonic(), -1.0]

        def quiet_now() -> bool:
            self._raise_errors()
            size = self.plane.audit_log.stat().st_size
            now = time.monotonic()
            if self._read_to < size or size != last[1]:
                last[:] = [now, float(size)]
                return False
            return now - last[0] >= quiet

        wait_for(quiet_now, timeout=timeout, interval=0.01, what="the audit log to be read to its end")
        return self.writes()

    def wait(self, predicate: Callable[[Write], bool], *, after: int = 0, timeout: float) -> Write:
        """The first write from index ``after`` on that satisfies ``predicate``."""

        def found() -> Write | None:
            return next((w for w in self.writes()[after:] if predicate(w)), None)

        result: Write = wait_for(found, timeout=timeout, interval=0.02, what="an audited write")
        return result

    def _raise_errors(self) -> None:
        if self.errors:
            raise AssertionError(f"the audit tail failed: {self.errors[0]!r}") from self.errors[0]

    def _run(self) -> None:
        buffered = b""
        handle = None
        try:
            while not self._stop.is_set():
                if handle is None:
                    if not self.plane.audit_log.exists():
                        time.sleep(0.01)
                        continue
                    handle = self.plane.audit_log.open("rb")
                    handle.seek(self._offset)
                chunk = handle.read()
                if not chunk:
                    self._read_to = handle.tell()
                    if self.plane.audit_log.stat().st_size < handle.tell():  # rotated or truncated
                        handle.close()
                        handle, self._offset, buffered = None, 0, b""
                    time.sleep(0.001)
                    continue
                buffered += chunk
                *complete, buffered = buffered.split(b"\n")
                for line in complete:
                    if self._needle in line:
                        self._entry(line)
                self._read_to = handle.tell() - len(buffered)
        except BaseException as exc:  # kept for the test to see; the tail stops
            self.errors.append(exc)
        finally:
            if handle is not None:
                handle.close()

    def _entry(self, line: bytes) -> None:
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if entry.get("stage") != "ResponseComplete" or ref.get("namespace") != self.namespace:
            return
        if entry.get("user", {}).get("username") != self.user:
            return
        write = Write(
            user=self.user,
            verb=entry["verb"],
            resource=ref.get("resource", ""),
            namespace=self.namespace,
            name=ref.get("name", ""),
            code=int(entry.get("responseStatus", {}).get("code", 0)),
            body=entry.get("requestObject") or {},
            at=datetime.fromisoformat(entry["stageTimestamp"].replace("Z", "+00:00")),
            seen=time.monotonic(),
            user_agent=str(entry.get("userAgent", "")),
        )
        with self._lock:
            self._writes.append(write)
            self._callbacks = [c for c in self._callbacks if not (isinstance(c, Kill) and c.done)]
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(write)


# --- Kubernetes as the tests see it ------------------------------------------------------------------


def disagreement(state: dict[str, Any] | None, target: int, source: int) -> str | None:
    """Why the state object disagrees with the weights the Services show (None: it agrees).

    No intent open: it records exactly those weights. An intent open (a change half-written):
    each Service shows its side's "from" or "to" value (README, the write-ahead protocol).
    """
    if state is None:
        return "there is no state object"
    pending = state.get("pending")
    if pending:
        sides = (
            target in (pending["from_target"], pending["target"]),
            source in (pending["from_source"], pending["source"]),
        )
        return None if all(sides) else f"the Services show {target}/{source}, the open intent is {pending}"
    recorded = (state["target_weight"], state["source_weight"])
    return (
        None if recorded == (target, source) else f"the Services show {target}/{source}, the state records {recorded}"
    )


def weights(kube: Cluster, *, target: str = TARGET, source: str = SOURCE) -> tuple[str | None, str | None]:
    """The weight annotations of both gateway Services, as stored (strings, None when missing)."""
    return kube.annotations(target).get(WEIGHT), kube.annotations(source).get(WEIGHT)


def give_command(kube: Cluster, policy: str, command: str) -> None:
    """An operator's command as ``kubectl annotate configmap gateway-canary-<policy> ...`` gives it."""
    kube.plane.call(
        "PATCH",
        f"/api/v1/namespaces/{kube.ns}/configmaps/{state_object_name(policy)}",
        {"metadata": {"annotations": {COMMAND_ANNOTATION: command}}},
    )


@contextlib.contextmanager
def apiserver_outage(plane: ControlPlane) -> Iterator[None]:
    """kube-apiserver stopped for the with-block (etcd keeps running); started again and ready
    afterwards whatever happened, since the whole session shares it."""
    plane.stop_apiserver()
    try:
        yield
    finally:
        plane.start_apiserver(wait=True)


# --- Prometheus as the controller sees it ---------------------------------------------------------------


def prometheus_value(prometheus: str, query: str) -> float | None:
    """The first sample of an instant query (0.0 for an empty answer), None when Prometheus fails."""
    try:
        answer = requests.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=2).json()
    except (requests.RequestException, ValueError):
        return None
    result = (answer.get("data") or {}).get("result") or []
    return float(result[0]["value"][1]) if result else 0.0


def error_ratio_query(workload: str, namespace: str, window: str) -> str:
    """The 5xx ratio of one gateway over ``window``, as the errorRate gate asks Prometheus for it."""
    selector = f'reporter="source",source_workload="{workload}",source_workload_namespace="{namespace}"'
    return (
        f'(sum(rate(istio_requests_total{{{selector},response_code=~"5.."}}[{window}])) or vector(0))'
        f" / sum(rate(istio_requests_total{{{selector}}}[{window}]))"
    )


# --- an alert receiver that dies and hangs ---------------------------------------------------------------


class ReceiverMode(enum.StrEnum):
    ALIVE = "alive"  # answers 200
    DEAD = "dead"  # nothing listens on its port: connection refused
    HANGING = "hanging"  # accepts, reads the request, never answers (until it is alive or dead again)


@dataclass(frozen=True)
class Delivery:
    """One request the receiver got; ``answered``: it said 200 (the alert counts as delivered)."""

    at: float  # monotonic
    path: str
    alert_id: str | None
    idempotency_key: str | None
    kind: str | None
    policy: str | None
    answered: bool
    body: Any = field(repr=False, default=None)


class AlertReceiver:
    """A JSON webhook on a fixed port of 127.0.0.1 (its URL stays the same while it dies and comes back)."""

    def __init__(self, name: str = "receiver") -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.deliveries: list[Delivery] = []
        self.mode = ReceiverMode.DEAD
        self._lock = threading.Lock()
        self._release = threading.Event()  # ends the hanging requests
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.set_mode(ReceiverMode.ALIVE)

    def set_mode(self, mode: ReceiverMode) -> None:
        with self._lock:
            previous, self.mode = self.mode, mode
            if mode is not ReceiverMode.HANGING:
                self._release.set()
            else:
                self._release = threading.Event()
        if mode is ReceiverMode.DEAD and previous is not ReceiverMode.DEAD:
            self._shut()
        elif mode is not ReceiverMode.DEAD and previous is ReceiverMode.DEAD:
            self._serve()

    def close(self) -> None:
        self.set_mode(ReceiverMode.DEAD)

    def delivered(self, kind: str | None = None, policy: str | None = None) -> list[Delivery]:
        """The requests it answered 200, oldest first (``kind``, ``policy``: only those alerts)."""
        with self._lock:
            return [
                d
                for d in self.deliveries
                if d.answered and (kind is None or d.kind == kind) and (policy is None or d.policy == policy)
            ]

    def received(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def _serve(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = None
                fields = body if isinstance(body, dict) else {}
                with receiver._lock:
                    hanging = receiver.mode is ReceiverMode.HANGING
                    release = receiver._release
                    receiver.deliveries.append(
                        Delivery(
                            at=time.monotonic(),
                            path=self.path,
                            alert_id=fields.get("id"),
                            idempotency_key=self.headers.get("Idempotency-Key"),
                            kind=fields.get("kind"),
                            policy=fields.get("policy"),
                            answered=not hanging,
                            body=body,
                        )
                    )
                if hanging:
                    release.wait(300)
                    self.close_connection = True  # and no answer at all
                    return
                data = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name=f"receiver-{self.name}", daemon=True)
        self._thread.start()

    def _shut(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)


# --- one test's rollout ---------------------------------------------------------------------------------

_POLICY = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata:
  name: {name}
spec:
  source: {{service: {ns}/{source_service}, workload: {source}}}
  target: {{service: {ns}/{target_service}, workload: {target}}}
  schedule:
    steps: {steps}
    bakeTime: {bake}
  analysis:
    interval: {interval}
    window: {window}
    minRequests: 10
    failureThreshold: {failure_threshold}
  gates:
    errorRate: {{max: 0.05}}
  routes: {{check: false}}   # no Istio Gateways here
  cloud: {{shareTolerance: {tolerance}, deficitGrace: {grace}}}
  alerts:
{alerts}
"""


class Bench:
    """One test's rollout: the two gateway Services in its namespace (ASM at 0, the old one at
    100), the controller's Role for one policy, the EMULATED cloud controller (tests/ccm_emulator.py)
    confirming each weight write and applying it to a 20-node CLB, traffic following the CLB's
    applied weights half a second late (as in tests/test_end_to_end.py), and the policy file.

    Fast by design: a check every second over a 4 s window, a short bake. ``alerts`` are the
    policy's receivers, as YAML flow mappings (``{type: webhook, name: a, url: ...}``).
    """

    def __init__(
        self,
        *,
        kube: Cluster,
        traffic: TrafficExporter,
        gateways: tuple[str, str],
        workdir: Path,
        name: str,
        steps: list[int],
        bake: str = "1s",
        interval: str = "1s",
        window: str = "4s",
        failure_threshold: int = 2,
        alerts: list[str] | None = None,
        ccm_strict: bool = True,
    ) -> None:
        self.kube, self.traffic, self.name, self.steps = kube, traffic, name, steps
        self.window, self.workloads = window, gateways
        self.workdir = workdir
        self.policies = workdir / "policies"
        self.policies.mkdir(parents=True, exist_ok=True)
        self.policy_text = _POLICY.format(
            name=name,
            ns=kube.ns,
            source_service=SOURCE,
            target_service=TARGET,
            source=gateways[0],
            target=gateways[1],
            steps=json.dumps(steps),
            bake=bake,
            interval=interval,
            window=window,
            failure_threshold=failure_threshold,
            tolerance=0.1,
            grace="5s",
            alerts="\n".join(f"    - {receiver}" for receiver in alerts or []) or "    []",
        )
        self.ccm = CcmEmulator(kube.plane, kube.ns, lag=0.2, strict=ccm_strict)
        self._entered = False

    def __enter__(self) -> Bench:
        self.kube.add_gateways()
        self.kube.grant(self.kube.policy(name=self.name))
        self.ccm.__enter__()
        self._entered = True
        for service in (TARGET, SOURCE):
            self.ccm.provision(service, Backends(BackendMode.CLUSTER, nodes=20))
        self.traffic.share = LaggedShare(self.ccm.clb_target_share, 0.5)
        self.traffic.move_to(self.kube.ns)
        (self.policies / f"{self.name}.yaml").write_text(self.policy_text)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.traffic.share = lambda: 0.0
        if self._entered:
            self.ccm.__exit__(exc_type, exc, tb)

    def fleet(self, *, prometheus_url: str, **options: Any) -> Fleet:
        """A Fleet for this rollout (``options``: Fleet's, e.g. ``webhook_url``, ``election``, ``extra_env``)."""
        return Fleet(kube=self.kube, policies=self.policies, prometheus_url=prometheus_url, workdir=self.workdir,
                     **options)  # fmt: skip

    def target_weight(self) -> int:
        return int(self.kube.annotations(TARGET)[WEIGHT])

    def shown(self) -> tuple[int, int]:
        """Both weights as integers (-1: missing)."""
        target, source = weights(self.kube)
        return int(target or "-1"), int(source or "-1")

    def resolved(self) -> dict[str, Any] | None:
        """The state once no weight change is half-done and it agrees with the Services."""
        state = self.state()
        if state is None or state.get("pending"):
            return None
        return state if disagreement(state, *self.shown()) is None else None

    def rolled_back(self) -> dict[str, Any] | None:
        """The state once the rollout is RolledBack, written (0/100) and with no intent open."""
        state = self.resolved()
        return state if state is not None and state["phase"] == "RolledBack" and self.shown() == (0, 100) else None

    def heal_and_retry(self, prometheus: str, *, timeout: float = 30.0) -> None:
        """The ASM gateway healthy again, its errors out of the window, and ``retry``: until it has weight."""
        self.traffic.target.error_ratio = 0.0
        wait_for(
            lambda: prometheus_value(prometheus, self.target_errors()) == 0.0,
            timeout=timeout,
            what="the ASM gateway's 5xx to leave the window",
        )
        give_command(self.kube, self.name, "retry")
        wait_for(lambda: self.shown()[0] > 0, timeout=timeout, what="the retried rollout to start")

    def state(self) -> dict[str, Any] | None:
        return self.kube.state(self.name)

    def outbox(self) -> dict[str, list[str]]:
        """The state object's outbox: alert id -> the receivers it is not delivered to yet."""
        data = self.kube.configmap(state_object_name(self.name)).get("data") or {}
        entries = json.loads(data.get("outbox") or "[]")
        return {entry["alert"]["id"]: list(entry["receivers"]) for entry in entries}

    def target_error_ratio(self) -> str:
        """The query of the ASM gateway's 5xx ratio over the policy's window."""
        return error_ratio_query(self.workloads[1], self.kube.ns, self.window)

    def target_errors(self) -> str:
        """The query of the ASM gateway's 5xx rate over the policy's window (0 once they left it)."""
        selector = f'reporter="source",source_workload="{self.workloads[1]}",source_workload_namespace="{self.kube.ns}"'
        return f'sum(rate(istio_requests_total{{{selector},response_code=~"5.."}}[{self.window}])) or vector(0)'
