"""What the Prometheus and secrets scenarios share: a Prometheus of one test that can be killed and
restarted, a loopback proxy in front of Prometheus that misbehaves on demand, receivers for every
secret of ``report.SECRETS``, and the controller's log lines in a file scenario 7 scans.

Everything listens on 127.0.0.1 free ports and is closed by its owner.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import structlog

from controller.logs import configure_logging
from controller.settings import LogFormat
from tests.conftest import prometheus_command
from tests.faults.report import SECRETS, register_log
from tests.servers import ManagedProcess, _Quiet, _Server, free_port, wait_for

__all__ = [
    "SECRET_ALERTS",
    "Fault",
    "PrometheusProxy",
    "RestartablePrometheus",
    "RobotSink",
    "json_logs",
    "log_lines",
    "secret_env",
]


# --- a Prometheus of the test's own ----------------------------------------------------------------


class RestartablePrometheus:
    """A real Prometheus scraping the exporters on ``targets`` every second (``tests.conftest``'s
    command); ``kill()`` sends SIGKILL, ``start()`` runs it again on the same port and data directory."""

    def __init__(self, directory: Path, targets: list[int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        self._args, self._scraped = prometheus_command(directory, self.port, targets)
        self._process: ManagedProcess | None = None
        self.starts = 0

    def start(self) -> None:
        """Start; the first time, until every target was scraped, afterwards until the API is ready
        (the samples from before a kill would make "scraped" true at once)."""
        process = self._process = ManagedProcess(self._args, self.log)
        first = self.starts == 0
        self.starts += 1

        def ready() -> bool:
            if process.proc.poll() is not None:
                raise AssertionError(f"Prometheus exited with {process.proc.returncode}: see {self.log}")
            if first:
                return self._scraped()
            try:
                return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, timeout=60, interval=0.1, what=f"Prometheus ready (log: {self.log})")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; the port refuses connections at once."""
        if self._process is not None:
            self._process.stop(signal.SIGKILL)
            self._process = None

    def close(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None


# --- a Prometheus that misbehaves on demand -------------------------------------------------------


class Fault(enum.StrEnum):
    """What the proxy does with a query."""

    PASS = "pass through"
    SLOW = "slow"
    ERROR_500 = "500"
    MALFORMED = "malformed"
    #: hostile: 401 or 500 with the request's Authorization header and path echoed in the body
    ECHO_401 = "401 echoing the token"
    ECHO_500 = "500 echoing the token"
    #: hostile: 200 with the request's Authorization header as the sample's value
    ECHO_SAMPLE = "a sample echoing the token"


#: 200 answers no Prometheus sends, one per query in turn: cut-off JSON, an HTML page, no ``data``,
#: a sample that is not a number
MALFORMED_BODIES: tuple[tuple[bytes, str], ...] = (
    (b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"val', "application/json"),
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    (b'{"status":"success"}', "application/json"),
    (b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"many"]}]}}',
     "application/json"),
)  # fmt: skip


class PrometheusProxy:
    """EMULATOR in front of a real Prometheus: passes queries through, or answers them as ``fault`` says.

    ``delay`` is how long a SLOW query waits before it is passed through (longer than the
    controller's timeout: the controller gives up first). ``answered`` counts the queries per
    fault; ``authorizations`` keeps the Authorization headers seen (the token was in use).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.fault = Fault.PASS
        self.delay = 0.0
        self.answered: dict[Fault, int] = dict.fromkeys(Fault, 0)
        self.authorizations: set[str] = set()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._malformed = itertools.cycle(MALFORMED_BODIES)
        proxy = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with contextlib.suppress(OSError):  # the controller gave up on a slow answer: fine
                    proxy._answer(self, body)

            do_POST = do_GET

        self.server = _Server(Handler)
        self.url = self.server.url

    def _answer(self, handler: _Quiet, body: bytes) -> None:
        with self._lock:
            fault = self.fault
            self.answered[fault] += 1
            auth = handler.headers.get("Authorization") or ""
            if auth:
                self.authorizations.add(auth)
        if fault is Fault.SLOW and self._closing.wait(self.delay):
            return  # closing: drop it
        if fault is Fault.ERROR_500:
            handler.reply(500, {"status": "error", "errorType": "internal", "error": "storage is on fire"})
        elif fault is Fault.MALFORMED:
            with self._lock:
                text, content_type = next(self._malformed)
            handler.reply(200, text, content_type)
        elif fault is Fault.ECHO_SAMPLE:
            result = [{"metric": {}, "value": [1, auth]}]
            handler.reply(200, {"status": "success", "data": {"resultType": "vector", "result": result}})
        elif fault in (Fault.ECHO_401, Fault.ECHO_500):
            status = 401 if fault is Fault.ECHO_401 else 500
            echoed = f"bad credentials {auth!r} for {handler.command} {handler.path}"
            handler.reply(status, {"status": "error", "errorType": "unauthorized", "error": echoed})
        else:
            self._forward(handler, body)

    def _forward(self, handler: _Quiet, body: bytes) -> None:
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            answer = requests.request(
                handler.command, f"{self.upstream}{handler.path}", data=body or None, headers=headers, timeout=10
            )
        except requests.RequestException as exc:
            handler.reply(502, f"upstream: {type(exc).__name__}".encode(), "text/plain")
            return
        handler.reply(answer.status_code, answer.content, answer.headers.get("Content-Type", "application/json"))

    def set(self, fault: Fault, delay: float = 0.0) -> None:
        with self._lock:
            self.fault, self.delay = fault, delay

    def close(self) -> None:
        self._closing.set()
        self.server.close()


# --- receivers for every secret ------------------------------------------------------------------


class RobotSink:
    """A DingTalk-style robot on loopback: keeps each POST (path, JSON) and answers ``{"errcode": 0}``."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                body = self.body()
                with sink._lock:
                    sink.received.append((self.path, body))
                self.reply(200, {"errcode": 0, "errmsg": "ok"})

        self.server = _Server(Handler)
        self.url = self.server.url

    def texts(self) -> list[str]:
        with self._lock:
            return [str(body.get("markdown", {}).get("text", "")) for _, body in self.received]

    def close(self) -> None:
        self.server.close()


def secret_env(receivers: str, robot: str) -> dict[str, str]:
    """Every secret of ``report.SECRETS`` as the controller is given it, the URLs on loopback servers:
    the Prometheus token; the global webhook (``{receivers}/global/<secret>``) and Slack
    (``{receivers}/slack/<secret>``) URLs; the policy's DingTalk robot (``SECRET_ALERTS``) with an
    access token in its URL and a signing secret."""
    return {
        "GATEWAY_CANARY_PROMETHEUS_TOKEN": SECRETS["prometheus token"],
        "GATEWAY_CANARY_WEBHOOK_URL": f"{receivers}/global/{SECRETS['webhook secret path']}",
        "GATEWAY_CANARY_SLACK_WEBHOOK_URL": f"{receivers}/slack/{SECRETS['slack secret path']}",
        "GATEWAY_CANARY_POLICY_ROBOT_URL": f"{robot}/robot/send?access_token={SECRETS['webhook secret path']}",
        "GATEWAY_CANARY_POLICY_ROBOT_SECRET": SECRETS["robot secret"],
    }


#: A policy's ``alerts`` (indented for ``spec``) naming the robot of ``secret_env``.
SECRET_ALERTS = (
    "  alerts:\n"
    "    - {type: dingtalk, name: robot, urlFromEnv: GATEWAY_CANARY_POLICY_ROBOT_URL,"
    " secretFromEnv: GATEWAY_CANARY_POLICY_ROBOT_SECRET}\n"
)


# --- the log of an in-process controller ------------------------------------------------------------


@contextlib.contextmanager
def json_logs(path: Path) -> Iterator[Path]:
    """The process's log lines, as the controller writes them (JSON, INFO), appended to ``path`` for
    the with-block; registered for scenario 7. Stop the controllers before the block ends."""
    root = logging.getLogger()
    level = root.level
    register_log(path)
    with path.open("a", buffering=1, encoding="utf-8") as out:
        configure_logging(LogFormat.JSON, "INFO", stream=out)
        try:
            yield path
        finally:
            structlog.reset_defaults()
            for handler in [h for h in root.handlers if h.get_name() == "gateway-canary"]:
                root.removeHandler(handler)
            root.setLevel(level)


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log (anything else in it, e.g. a traceback printed raw, is skipped)."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if line.startswith("{"):
                lines.append(json.loads(line))
    return lines
