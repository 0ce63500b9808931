"""Every log line is JSON in JSON mode (the libraries' too), and no URL in it carries a secret."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest
import structlog

from controller.core.text import redact_urls
from controller.logs import configure_logging
from controller.settings import LogFormat


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Prometheus at http://user:pw@prom:9090 unreachable", "Prometheus at http://prom:9090 unreachable"),
        ("hook https://hooks.slack.com/services/T0/B0/XYZ failed", "hook https://hooks.slack.com/… failed"),
        ("to http://h/x?token=abc.", "to http://h/…"),
        ("see http://h/ and https://h2", "see http://h and https://h2"),
        ("no url here", "no url here"),
        ("HTTPS://user:pw@Prom:9090/x unreachable", "HTTPS://Prom:9090/… unreachable"),
    ],
)
def test_urls_lose_userinfo_path_and_query(text: str, shown: str) -> None:
    assert redact_urls(text) == shown


def test_the_libraries_log_json_through_structlog_and_urllib3_retries_are_quiet() -> None:
    out = io.StringIO()
    configure_logging(LogFormat.JSON, "INFO", stream=out)
    try:
        structlog.get_logger("controller.test").info("ours", url="http://a:b@c/d?e=f")
        logging.getLogger("apscheduler.scheduler").warning("job missed http://u:secret@h:1/p")
        logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=0)) after ...")
        logging.getLogger("kubernetes.client.rest").warning("noise")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "gateway-canary"]:
            root.removeHandler(handler)
    assert [line["event"] for line in lines] == ["ours", "job missed http://h:1/…"]
    assert lines[0]["url"] == "http://c/…" and lines[1]["logger"] == "apscheduler.scheduler"
    assert "secret" not in out.getvalue()


def test_console_tracebacks_are_redacted_too() -> None:
    out = io.StringIO()
    configure_logging(LogFormat.CONSOLE, "INFO", stream=out)
    try:
        try:
            raise RuntimeError("cannot reach http://user:topsecret@prom:9090/api")
        except RuntimeError:
            structlog.get_logger("controller.test").exception("boom")
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "gateway-canary"]:
            root.removeHandler(handler)
    assert "topsecret" not in out.getvalue() and "http://prom:9090/…" in out.getvalue()


class _Dribble(io.StringIO):
    """A stream that hands the other threads the CPU inside every write (as a pipe can)."""

    def write(self, text: str) -> int:
        written = 0
        for part in (text[: len(text) // 2], text[len(text) // 2 :]):
            written += super().write(part)
            time.sleep(0)
        return written


def test_lines_of_threads_logging_at_once_never_run_into_each_other() -> None:
    """structlog's writer and the standard logging's handler share one stream: each line stays whole
    (the two-replica tests once found a controller line and an APScheduler line joined)."""
    out = _Dribble()
    configure_logging(LogFormat.JSON, "INFO", stream=out)

    def ours() -> None:
        for n in range(200):
            structlog.get_logger("controller.test").info("ours", n=n)

    def theirs() -> None:
        for n in range(200):
            logging.getLogger("apscheduler.scheduler").warning("theirs %d", n)

    try:
        threads = [threading.Thread(target=work) for work in (ours, theirs, ours, theirs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        lines = out.getvalue().splitlines()
        assert len(lines) == 800
        assert all(isinstance(json.loads(line), dict) for line in lines)
    finally:
        configure_logging(LogFormat.CONSOLE, "INFO")
