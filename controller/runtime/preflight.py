"""Checks of the settings against the machine, before the controller starts: one line per problem.

What pydantic cannot see from the values alone: a host that does not resolve, a port already in
use, a kubeconfig or CA file that cannot be read. Each problem names its variable and never
shows a secret (for a secret URL, only its host).
"""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from controller.core.text import checked_url
from controller.notify.http import safe_host
from controller.settings import Settings

__all__ = ["settings_problems"]

_PREFIX = "GATEWAY_CANARY_"


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return True


def _readable_file(path: Path) -> str | None:
    if not path.is_file():
        return f"{path} is not a file"
    try:
        path.read_bytes()
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    return None


def settings_problems(settings: Settings) -> list[str]:
    """Every problem found, as ``GATEWAY_CANARY_<NAME>: what is wrong``."""
    problems: list[str] = []
    urls: dict[str, str | None] = {
        "PROMETHEUS_URL": settings.prometheus_url,
        "ALERTMANAGER_URL": settings.alertmanager_url,
        "WEBHOOK_URL": settings.webhook_url.get_secret_value() if settings.webhook_url else None,
        "SLACK_WEBHOOK_URL": settings.slack_webhook_url.get_secret_value() if settings.slack_webhook_url else None,
    }
    for name, url in urls.items():
        if url is None:
            continue
        checked_url(url)  # (the settings already did; it also guards what safe_host reads)
        host = safe_host(url)
        if not _resolves(host):
            problems.append(f"{_PREFIX}{name}: the host {host} does not resolve")
    if settings.http_port:
        with socket.socket() as probe:
            try:
                probe.bind((settings.http_host, settings.http_port))
            except OSError as exc:
                what = "is already in use" if exc.errno == 98 else f"cannot be bound ({exc.strerror or exc})"
                problems.append(f"{_PREFIX}HTTP_PORT: {settings.http_host}:{settings.http_port} {what}")
    for name, path in (("KUBECONFIG", settings.kubeconfig), ("ASM_KUBECONFIG", settings.asm_kubeconfig)):
        problem = None if path is None else _kubeconfig_problem(path)
        if problem:
            problems.append(f"{_PREFIX}{name}: {problem}")
    if settings.prometheus_ca_file is not None:
        problem = _readable_file(settings.prometheus_ca_file)
        if problem:
            problems.append(f"{_PREFIX}PROMETHEUS_CA_FILE: {problem}")
    return problems


def _kubeconfig_problem(path: Path) -> str | None:
    """Why ``path`` is no readable kubeconfig, or None."""
    problem = _readable_file(path)
    if problem is None:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            document = None
        if not isinstance(document, dict) or "clusters" not in document:
            problem = f"{path} is not a kubeconfig (a YAML mapping with clusters)"
    return problem
