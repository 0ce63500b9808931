"""``status`` and the on-call commands, wired to a cluster: the glue between the CLI's options and
``controller.operate`` (what is shown and said) and ``controller.adapters.operator`` (the API)."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.live import Live

from controller.cli import KubeOptions, OutputFormat, emit
from controller.core.durations import parse_duration
from controller.core.enums import Command
from controller.errors import GatewayCanaryError
from controller.operate import (
    PolicyLike,
    finished,
    give_command,
    render_list,
    render_policy,
    status_data,
    status_exit,
    who,
)

if TYPE_CHECKING:
    from controller.adapters.operator import KubernetesOperator

__all__ = ["command_main", "status_main"]

#: how often ``--watch`` re-reads the state objects
WATCH_SECONDS = 2.0


def _connect(kube: KubeOptions, what: str) -> KubernetesOperator | None:
    """The operator's client for the namespace the options name; None after saying why not."""
    from controller.adapters.operator import KubernetesOperator, context_namespace

    namespace = kube.resolved_namespace(context_namespace(kube.kubeconfig, kube.context))
    try:
        return KubernetesOperator.connect(kube.kubeconfig, kube.context, namespace)
    except GatewayCanaryError as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return None


def _seconds(text: str, option: str) -> float | None:
    try:
        return parse_duration(text).total_seconds()
    except (ValueError, TypeError) as exc:
        print(f"{option} {text!r}: {exc}", file=sys.stderr)
        return None


def status_main(
    kube: KubeOptions, name: str | None, *, watch: bool, timeout: str, output: OutputFormat, console: Console
) -> int:
    """Show one policy or all; with ``watch``, until Promoted/RolledBack or the timeout."""
    limit = _seconds(timeout, "--timeout")
    if limit is None:
        return 2
    operator = _connect(kube, "status")
    if operator is None:
        return 2

    def read() -> list[PolicyLike] | None:
        if name is None:
            return list(operator.policies())
        view = operator.policy(name)
        return None if view is None else [view]

    def render(views: list[PolicyLike]) -> RenderableType:
        now = datetime.now(UTC)
        if name is None:
            return render_list(views, now)
        return Group(*(render_policy(view, now) for view in views))

    try:
        views = read()
        if views is None:
            print(f"no state object gateway-canary-{name} in namespace {operator.namespace}", file=sys.stderr)
            return 2
        if not watch or output is not OutputFormat.TABLE:
            _print(views, name, output, render)
            return status_exit(views)
        deadline = time.monotonic() + limit
        with Live(render(views), console=console, auto_refresh=False, transient=False) as live:
            while not finished(views) and time.monotonic() < deadline:
                time.sleep(min(WATCH_SECONDS, max(0.0, deadline - time.monotonic())))
                views = read() or views
                live.update(render(views), refresh=True)
        if not finished(views):
            print(f"status: --timeout {timeout} passed", file=sys.stderr)
            return 3
        return status_exit(views)
    except GatewayCanaryError as exc:
        print(f"status: {exc}", file=sys.stderr)
        return 2
    finally:
        operator.close()


def _print(views: list[PolicyLike], name: str | None, output: OutputFormat, render) -> None:  # type: ignore[no-untyped-def]
    if name is not None and output is not OutputFormat.TABLE:
        emit(status_data(views[0]), output, lambda _: render(views))
        return
    data = {"policies": [status_data(view) for view in views]}
    emit(data, output, lambda _: render(views))


def command_main(kube: KubeOptions, command: Command, name: str, by: str | None, wait: str, *, confirmed: bool) -> int:
    """Give one command and wait for the controller's answer (exit codes: controller.operate.COMMAND_EXIT)."""
    if not confirmed:
        print(f"{command.value} --full skips every remaining step to 100: add --yes to confirm", file=sys.stderr)
        return 2
    seconds = _seconds(wait, "--wait")
    if seconds is None:
        return 2
    operator = _connect(kube, command.value)
    if operator is None:
        return 2
    try:
        from controller.adapters.operator import kubeconfig_user

        person = who(by, operator.who_am_i, kubeconfig_user(kube.kubeconfig, kube.context))
        return give_command(operator, name, command, person, wait_seconds=seconds, say=print)
    finally:
        operator.close()
