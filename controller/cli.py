"""``gateway-canary``: run, demo, validate, plan, status, the on-call commands, schema, rbac, preflight, migrate-config.

The only module that writes to the terminal directly (the demo's narrative, validation
results, the schema); everything else logs through structlog.

The command line is Typer (built on click, which it vendors) rather than hand-written argparse: every
command gets ``--help``, usage errors exit 2 with a message on stderr, and shell completion comes
with ``--install-completion``. Tables and colour are rich's, which leaves the colour out when the
output is not a terminal or ``NO_COLOR`` is set. ``main`` stays the entry point and returns the exit
code; ``kubectl_plugin`` is the same commands as ``kubectl gateway-canary``.

Shared pieces for the commands that talk to a cluster or print data:

- ``KubeOptions`` with ``KubeconfigOption``, ``ContextOption`` and ``NamespaceOption`` (declared
  once, used as a command's parameter annotations);
- ``OutputFormat`` (``-o table|json|yaml``, ``OutputOption``) and ``emit``, which prints one value
  in that format;
- ``EXIT_CODES``, each command's exit codes: its ``--help`` shows them, and the README's table can
  be generated from it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import structlog
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from controller.core.alerts import Alert
from controller.core.enums import Command
from controller.core.loader import PolicyError, SourcedPolicy
from controller.core.policy import CanaryPolicy
from controller.errors import GatewayCanaryError
from controller.logs import configure_logging
from controller.operate import COMMAND_EXIT, STATUS_EXIT
from controller.policy_files import policy_files, read_policies
from controller.settings import LogFormat, Settings, invalid_settings

if TYPE_CHECKING:
    from controller.runtime.leader import LeaderElector

__all__ = [
    "DEFAULT_NAMESPACE",
    "EXIT_CODES",
    "ContextOption",
    "KubeOptions",
    "KubeconfigOption",
    "NamespaceOption",
    "OutputFormat",
    "OutputOption",
    "app",
    "emit",
    "kubectl_plugin",
    "main",
]

PROG = "gateway-canary"
_log = structlog.get_logger("controller.cli")
KUBECTL_PROG = "kubectl gateway-canary"

_USAGE_ERROR = "a usage error (an unknown option, a missing or bad argument; the usage is on stderr)"


#: the commands an operator gives a running controller, in the order --help lists them
_OPERATOR_COMMANDS = (Command.PAUSE, Command.RESUME, Command.APPROVE, Command.ABORT, Command.RETRY, Command.PROMOTE)


def _with_usage_error(codes: Mapping[int, str]) -> dict[int, str]:
    """Every command exits 2 on a usage error, besides its own meaning of 2 (if any)."""
    return {**codes, 2: f"{codes[2]}, or {_USAGE_ERROR}" if 2 in codes else _USAGE_ERROR}


#: Every command's exit codes and what they mean: the one source for its ``--help`` and the README.
EXIT_CODES: Mapping[str, Mapping[int, str]] = {
    command: _with_usage_error(codes)
    for command, codes in {
        "run": {
            0: "stopped by SIGTERM or SIGINT",
            2: "bad settings (one line each, variable name first), no cluster, or the HTTP port is taken",
        },
        "demo": {0: "the demo climbed, rolled back and delivered its alert", 1: "it did not play out so"},
        "validate": {
            0: "every policy is valid",
            1: "a policy file has an error, or no policy file was found",
            2: "a path does not exist",
        },
        "schema": {0: "the schema was printed"},
        "rbac": {
            0: "the Roles and RoleBindings were printed",
            1: "a policy file has an error, or no policy was found: nothing printed",
            2: "--service-account is not NAMESPACE/NAME, or a path does not exist",
        },
        "preflight": {
            0: "every item passed",
            1: "an item failed",
            2: "the policies, the settings or the cluster could not be read",
        },
        "migrate-config": {
            0: "the Gateways still lacking were printed (none lacking: nothing printed)",
            2: "the policies, the settings or the cluster could not be read",
        },
        "plan": {0: "the plan was printed", 1: "the policy file is invalid", 2: "the file does not exist"},
        "status": dict(STATUS_EXIT),
        **{command.value: dict(COMMAND_EXIT) for command in _OPERATOR_COMMANDS},
    }.items()
}


def _exit_codes_help(command: str) -> str:
    """The epilog of a command's ``--help``: a line per code."""
    return "\n".join(["Exit codes:", *(f"{code}  {text}" for code, text in sorted(EXIT_CODES[command].items()))])


# --- cluster options, for the commands that talk to a cluster (status, pause, resume, ...) -------

#: The namespace of the state objects when neither -n, GATEWAY_CANARY_NAMESPACE nor the context names one.
DEFAULT_NAMESPACE = "gateway-canary"
#: how long the running controller reuses a Service's CLB backends (and the Node list): they change
#: with Nodes and endpoints, not per tick (docs/benchmarks.md: most API requests at 500 policies)
BACKENDS_CACHE_SECONDS = 30.0
_CLUSTER_PANEL = "Cluster"


@dataclass(frozen=True, slots=True)
class KubeOptions:
    """Which cluster and namespace a command talks to, as ``kubectl`` spells them.

    ``kubeconfig``: ``--kubeconfig``; None leaves the choice to the kubernetes client (``KUBECONFIG``,
    else ``~/.kube/config``, else in-cluster). ``context``: ``--context``; None is the kubeconfig's
    current context. ``namespace``: ``-n/--namespace``, else ``GATEWAY_CANARY_NAMESPACE`` (the option
    reads it), else None: ``resolved_namespace`` then takes the context's namespace, else
    ``gateway-canary``. A command declares the three options once each with the annotations below::

        @app.command()
        def status(kubeconfig: KubeconfigOption = None, context: ContextOption = None,
                   namespace: NamespaceOption = None) -> int:
            kube = KubeOptions(kubeconfig=kubeconfig, context=context, namespace=namespace)
    """

    kubeconfig: str | None
    context: str | None
    namespace: str | None

    def resolved_namespace(self, context_namespace: str | None) -> str:
        """The namespace to use, given the one the kubeconfig context names (if any)."""
        return self.namespace or context_namespace or DEFAULT_NAMESPACE


KubeconfigOption = Annotated[
    str | None,
    typer.Option(
        "--kubeconfig",
        help="the kubeconfig file (default: KUBECONFIG, else ~/.kube/config, else in-cluster)",
        rich_help_panel=_CLUSTER_PANEL,
        show_default=False,
    ),
]
ContextOption = Annotated[
    str | None,
    typer.Option(
        "--context",
        help="the kubeconfig context (default: its current context)",
        rich_help_panel=_CLUSTER_PANEL,
        show_default=False,
    ),
]
NamespaceOption = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        envvar="GATEWAY_CANARY_NAMESPACE",
        help=f"where the state objects live (default: GATEWAY_CANARY_NAMESPACE, else the context's, "
        f"else {DEFAULT_NAMESPACE})",
        rich_help_panel=_CLUSTER_PANEL,
        show_default=False,
        show_envvar=False,  # named in the help text, in its place in the order
    ),
]


# --- output formats, for the commands whose output is data -------------------------------------


class OutputFormat(StrEnum):
    """``-o``: a table for people, JSON or YAML for programs."""

    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


OutputOption = Annotated[
    OutputFormat | None,
    typer.Option("--output", "-o", help="table, json or yaml"),
]

_Data = TypeVar("_Data")


def _console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr) as it is now (pytest swaps them): colour on a terminal only.

    rich already leaves colour out off a terminal and, with ``NO_COLOR``, on one; here ``NO_COLOR``
    also drops bold and dim, so that nothing but text is written.
    """
    no_color = bool(os.environ.get("NO_COLOR"))
    return Console(stderr=stderr, highlight=False, color_system=None if no_color else "auto")


def emit(data: _Data, fmt: OutputFormat, table_builder: Callable[[_Data], RenderableType]) -> None:
    """Print ``data`` as ``fmt``: ``table_builder(data)`` drawn by rich, or JSON, or YAML (both sorted).

    ``data`` must be plain (dicts, lists, str, int, float, bool, None) for JSON and YAML.
    """
    if fmt is OutputFormat.TABLE:
        _console().print(table_builder(data))
    elif fmt is OutputFormat.JSON:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(data, sort_keys=True), end="")


def _load_reporting_errors(
    paths: Sequence[str],
) -> tuple[list[Path], list[SourcedPolicy], list[PolicyError]] | None:
    """Files, valid policies and errors, the errors already printed; None (printed) for a bad path."""
    try:
        files = policy_files(paths)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return None
    policies, errors, warnings = read_policies(files)
    for problem in [*errors, *warnings]:
        print(problem, file=sys.stderr)
    return files, policies, errors


def _cmd_validate(paths: Sequence[str], output: OutputFormat | None = None) -> int:
    if output is not None:
        return _validate_as_data(paths, output)
    loaded = _load_reporting_errors(paths)
    if loaded is None:
        return 2
    files, policies, errors = loaded
    for item in policies:
        print(f"ok  {item.file}:{item.line}  {item.policy.name}")
    print(f"{len(policies)} valid, {len(errors)} error(s) in {len(files)} file(s)")
    if not files:
        print("no policy files found", file=sys.stderr)
        return 1
    return 1 if errors else 0


def _problem(error: PolicyError) -> dict[str, object]:
    return {"file": error.file, "line": error.line, "field": error.field, "message": error.message}


def _validate_as_data(paths: Sequence[str], output: OutputFormat) -> int:
    """``validate -o``: everything on stdout as data; only a path that does not exist goes to stderr."""
    try:
        files = policy_files(paths)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    policies, errors, warnings = read_policies(files)
    report: dict[str, object] = {
        "files": [str(file) for file in files],
        "policies": [{"file": item.file, "line": item.line, "name": item.policy.name} for item in policies],
        "errors": [_problem(error) for error in errors],
        "warnings": [_problem(warning) for warning in warnings],
    }

    def table(_: object) -> Table:
        rows = Table(
            "", "where", "policy / field", "message",
            caption=f"{len(policies)} valid, {len(errors)} error(s) in {len(files)} file(s)",
        )  # fmt: skip
        for item in policies:  # Text, not markup: a file name or a message may hold brackets
            rows.add_row(Text("ok", style="green"), Text(f"{item.file}:{item.line}"), Text(item.policy.name))
        for kind, style, problems in (("error", "red", errors), ("warning", "yellow", warnings)):
            for problem in problems:
                where = Text(f"{problem.file}:{problem.line}")
                rows.add_row(Text(kind, style=style), where, Text(problem.field), Text(problem.message))
        return rows

    emit(report, output, table)
    return 1 if errors or not files else 0


def _cmd_rbac(paths: Sequence[str], service_account: str, state_namespace: str | None, lease_name: str) -> int:
    """Print the Roles and RoleBindings the policies need; refuse while any policy file is bad."""
    import re

    import yaml

    from controller.core.policy import ServiceRef
    from controller.rbac import controller_rbac

    namespace, _, name = service_account.partition("/")
    try:
        account = ServiceRef(namespace=namespace, name=name)
    except ValidationError:
        print(f"--service-account {service_account!r}: expected NAMESPACE/NAME, both DNS labels", file=sys.stderr)
        return 2
    if len(lease_name) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", lease_name):
        print(f"--lease-name {lease_name[:60]!r}: expected a DNS subdomain name (a Lease's name)", file=sys.stderr)
        return 2
    loaded = _load_reporting_errors(paths)
    if loaded is None:
        return 2
    _, policies, errors = loaded
    if errors or not policies:
        print("no RBAC printed: fix the policy files first" if errors else "no policies found", file=sys.stderr)
        return 1
    objects = controller_rbac(
        (item.policy for item in policies), account, state_namespace=state_namespace, lease_name=lease_name
    )
    print(f"# gateway-canary RBAC for {len(policies)} policy(ies); ServiceAccount {account}")
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def _cmd_schema() -> int:
    schema = CanaryPolicy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gateway-canary CanaryPolicy"
    print(json.dumps(schema, indent=2, sort_keys=True))
    return 0


def _cmd_demo(speed: float, verbose: bool, scenario: str) -> int:
    from controller.demo import SCENARIOS, run_demo

    configure_logging(LogFormat.CONSOLE, "INFO" if verbose else "ERROR")

    def show_alert(alert: Alert) -> None:
        print("\n--- alert delivered ------------------------------------------")
        print(alert.text())
        print("---------------------------------------------------------------\n")

    print(f"gateway-canary demo: simulated gateways, time x{speed:g}, no cluster needed")
    result = run_demo(speed=speed, scenario=scenario, on_change=lambda line: print(f"  {line}"), on_alert=show_alert)
    if result.state_json is not None:
        from datetime import UTC, datetime

        from controller.operate import DemoView, render_policy

        print("\n$ gateway-canary status demo-shop      # what the status command shows now")
        view = DemoView("demo-shop", result.state_json, result.status, None)
        _console().print(render_policy(view, datetime.now(UTC)))
        print()
    if result.rolled_back and result.alerts:
        print(
            f"demo finished in {result.seconds:.1f}s: climbed to {result.highest_weight}, "
            f"rolled back to 0 after {SCENARIOS[scenario]}, alert delivered"
        )
        return 0
    print(
        f"demo did NOT play out as expected: rolled_back={result.rolled_back}, "
        f"alerts={len(result.alerts)}, highest weight {result.highest_weight}",
        file=sys.stderr,
    )
    return 1


def _settings_or_report(policies: str | None, dry_run: bool) -> Settings | None:
    """The settings, or None after printing one line per problem (variable name first)."""
    from controller.runtime.preflight import settings_problems

    overrides: dict[str, object] = {}
    if policies is not None:
        overrides["policies_dir"] = Path(policies)
    if dry_run:
        overrides["dry_run"] = True
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        for problem in invalid_settings(exc):
            print(problem, file=sys.stderr)
        return None
    problems = settings_problems(settings)
    for problem in problems:
        print(problem, file=sys.stderr)
    return None if problems else settings


def _cmd_run(policies: str | None, dry_run: bool) -> int:
    from controller.adapters.cloud import KubernetesCloudInspector
    from controller.adapters.dry_run import DryRunGatewayPair, DryRunStateStore
    from controller.adapters.istio_routes import KubernetesIstioRoutes
    from controller.adapters.kube_api import data_and_asm_clients
    from controller.adapters.kube_state import KubernetesStateStore
    from controller.adapters.kubernetes import KubernetesGatewayPair
    from controller.adapters.prometheus import PrometheusMetricsSource
    from controller.runtime.clock import SystemClock
    from controller.runtime.service import ControllerService
    from controller.settings import PrometheusConnection

    settings = _settings_or_report(policies, dry_run)
    if settings is None:
        return 2
    configure_logging(settings.log_format, settings.log_level)
    clients = ExitStack()  # open as long as the process runs
    try:
        api, asm = data_and_asm_clients(
            clients, settings.kubeconfig, settings.kube_context, settings.asm_kubeconfig, settings.asm_context
        )
    except GatewayCanaryError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    identity = settings.identity or f"{socket.gethostname()}_{secrets.token_hex(4)}"
    for each in {id(api): api, id(asm): asm}.values():  # the API server's audit log names the replica
        each.user_agent = f"gateway-canary/{_version()} ({identity})"
    elector = _elector(settings, api, identity)
    real = KubernetesGatewayPair(
        api,
        asm_client=asm,
        state_namespace=settings.namespace,
        check_write_access=not settings.dry_run,
        fence=elector,
    )
    real_store = KubernetesStateStore(api, settings.namespace, fence=elector)
    pair = DryRunGatewayPair(real) if settings.dry_run else real
    store = DryRunStateStore(real_store) if settings.dry_run else real_store
    sources: dict[tuple[object, ...], PrometheusMetricsSource] = {}

    def metrics_for(policy: CanaryPolicy) -> PrometheusMetricsSource:
        connection = PrometheusConnection(settings, policy.spec.prometheus)
        key = connection.key()
        if key not in sources:
            sources[key] = PrometheusMetricsSource(connection)
        return sources[key]

    try:
        service = ControllerService(
            settings,
            pair=pair,
            store=store,
            metrics_for=metrics_for,
            clock=SystemClock(),
            cloud=KubernetesCloudInspector(api, backends_cache_seconds=BACKENDS_CACHE_SECONDS),
            routes=KubernetesIstioRoutes(api, asm),
            elector=elector,
        )
    except OSError as exc:  # the port was taken between the check and now
        print(
            f"GATEWAY_CANARY_HTTP_PORT: cannot serve on {settings.http_host}:{settings.http_port}: {exc}",
            file=sys.stderr,
        )
        return 2
    service.run_forever()
    return 0


def _elector(settings: Settings, api: Any, identity: str) -> LeaderElector | None:
    """The leader elector when election is on (never for a dry run: it must not take the Lease from
    the controller it watches)."""
    from controller.adapters.kube_lease import KubernetesLeaseStore
    from controller.core.lease import LeaseTiming
    from controller.runtime.clock import SystemClock
    from controller.runtime.leader import LeaderElector

    if not settings.leader_election:
        return None
    if settings.dry_run:
        _log.info("dry run: no leader election (a dry run writes nothing and never takes the Lease)")
        return None
    timing = LeaseTiming(
        settings.lease_duration_seconds, settings.renew_deadline_seconds, settings.retry_period_seconds
    )
    leases = KubernetesLeaseStore(
        api, settings.namespace, settings.lease_name, timeout_seconds=settings.renew_deadline_seconds
    )
    _log.info("leader election on", identity=identity, lease=f"{settings.namespace}/{settings.lease_name}")
    return LeaderElector(leases, identity, timing, clock=SystemClock())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gateway-canary")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


# --- the commands ------------------------------------------------------------------------------

app = typer.Typer(
    name=PROG,
    epilog="Exit codes: 0 success, 1 the command's check failed, 2 a usage error or input that could "
    "not be read; each command's --help lists its own.",
    context_settings={"help_option_names": ["-h", "--help"]},  # -h as argparse had it
    pretty_exceptions_enable=False,  # a plain traceback, never one with locals (settings hold secrets)
)

PathsArgument = Annotated[
    list[str], typer.Argument(help="policy files or directories", metavar="PATH", show_default=False)
]


class DemoScenario(StrEnum):
    """What breaks on the ASM gateway in the demo (``controller.demo.SCENARIOS``)."""

    ERRORS = "errors"
    MISSING_ROUTE = "missing-route"


def _show_version(value: bool) -> None:
    if value:
        print(f"{PROG} {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Metric-gated traffic migration between two ingress gateways sharing one Alibaba Cloud CLB."""


@app.command("run", epilog=_exit_codes_help("run"))
def _run(
    policies: Annotated[
        str | None,
        typer.Option(help="policies directory (overrides GATEWAY_CANARY_POLICIES_DIR)", show_default=False),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="log intended writes, write nothing")] = False,
) -> None:
    """Run the controller (settings from GATEWAY_CANARY_* variables)."""
    raise typer.Exit(_cmd_run(policies, dry_run))


@app.command("demo", epilog=_exit_codes_help("demo"))
def _demo(
    speed: Annotated[float, typer.Option(help="time compression factor")] = 60.0,
    verbose: Annotated[bool, typer.Option("--verbose", help="show every check's log line")] = False,
    scenario: Annotated[
        DemoScenario,
        typer.Option(help="what breaks on the ASM gateway: 5xx (errors), or a host without a route (404 NR)"),
    ] = DemoScenario.ERRORS,
) -> None:
    """A full migration against simulated gateways, no cluster."""
    raise typer.Exit(_cmd_demo(speed, verbose, scenario.value))


@app.command("validate", epilog=_exit_codes_help("validate"))
def _validate(
    paths: PathsArgument,
    output: OutputOption = None,
) -> None:
    """Validate policy files or directories.

    Without -o: a line per valid policy and a summary; the problems on stderr, as file:line: field: message.

    With -o, on stdout: the files, valid policies (file, line, name), errors and warnings (file, line, field, message).
    """
    raise typer.Exit(_cmd_validate(paths, output))


@app.command("schema", epilog=_exit_codes_help("schema"))
def _schema() -> None:
    """Print the policy JSON Schema (for editors)."""
    raise typer.Exit(_cmd_schema())


@app.command("rbac", epilog=_exit_codes_help("rbac"))
def _rbac(
    paths: PathsArgument,
    service_account: Annotated[
        str, typer.Option(help="NAMESPACE/NAME the controller runs as", metavar="NAMESPACE/NAME")
    ] = "gateway-canary/gateway-canary",
    state_namespace: Annotated[
        str | None,
        typer.Option(
            help="where the controller keeps its state objects (GATEWAY_CANARY_NAMESPACE; default: the account's)",
            show_default=False,
        ),
    ] = None,
    lease_name: Annotated[
        str,
        typer.Option(
            help="the Lease the replicas elect a leader with, in the state namespace (GATEWAY_CANARY_LEASE_NAME)"
        ),
    ] = "gateway-canary",
) -> None:
    """Print the least-privilege Roles and RoleBindings the policies need."""
    raise typer.Exit(_cmd_rbac(paths, service_account, state_namespace, lease_name))


@app.command("preflight", epilog=_exit_codes_help("preflight"))
def _preflight(paths: PathsArgument) -> None:
    """The migration runbook's checklist for the policies (reads the cluster, writes nothing)."""
    from controller.checklist import preflight_main

    raise typer.Exit(preflight_main(paths, output=sys.stdout))


@app.command("migrate-config", epilog=_exit_codes_help("migrate-config"))
def _migrate_config(paths: PathsArgument) -> None:
    """Print the ASM-side Istio Gateways the ASM gateway still lacks (to review and apply)."""
    from controller.migrate import migrate_config_main

    raise typer.Exit(migrate_config_main(paths, output=sys.stdout))


@app.command("plan", epilog=_exit_codes_help("plan"))
def _plan(
    policy_file: Annotated[str, typer.Argument(help="a policy file", metavar="POLICY_FILE", show_default=False)],
    start: Annotated[
        str | None,
        typer.Option(help="when the rollout starts (ISO 8601, e.g. 2026-12-01T10:00+08:00; default: now)"),
    ] = None,
    output: OutputOption = None,
) -> None:
    """The schedule as a table: each step's weights, bake, gates, approvals and windows, and the
    earliest wall-clock time it can be reached (every check passing, approvals at once). No cluster."""
    from controller.planning import plan_main

    raise typer.Exit(plan_main(policy_file, start, output or OutputFormat.TABLE, _console()))


@app.command("status", epilog=_exit_codes_help("status"))
def _status(  # noqa: PLR0917 (one parameter per option: typer's way)
    name: Annotated[str | None, typer.Argument(help="a policy (default: every policy)", show_default=False)] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="redraw until Promoted or RolledBack")] = False,
    timeout: Annotated[str, typer.Option(help="with --watch: give up after this long (e.g. 30m), exit 3")] = "10m",
    output: OutputOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Where each migration stands and why: phase, step, weights, what it waits for, the last check's
    gates next to their thresholds and baselines, the counts, the last command and transitions."""
    from controller.status_cmd import status_main

    kube = KubeOptions(kubeconfig=kubeconfig, context=context, namespace=namespace)
    raise typer.Exit(
        status_main(kube, name, watch=watch, timeout=timeout, output=output or OutputFormat.TABLE, console=_console())
    )


ByOption = Annotated[
    str | None,
    typer.Option(help="who gives it (default: the user the API server sees, else the kubeconfig's)"),
]
WaitOption = Annotated[str, typer.Option(help="how long to wait for the controller's answer")]
NameArgument = Annotated[str, typer.Argument(help="the policy", show_default=False)]


def _give(command: Command, name: str, by: str | None, wait: str, kube: KubeOptions, *, confirmed: bool) -> int:
    from controller.status_cmd import command_main

    return command_main(kube, command, name, by, wait, confirmed=confirmed)


def _operator_command(command: Command) -> Callable[..., None]:
    def give(  # noqa: PLR0917
        name: NameArgument,
        by: ByOption = None,
        wait: WaitOption = "60s",
        kubeconfig: KubeconfigOption = None,
        context: ContextOption = None,
        namespace: NamespaceOption = None,
    ) -> None:
        kube = KubeOptions(kubeconfig=kubeconfig, context=context, namespace=namespace)
        raise typer.Exit(_give(command, name, by, wait, kube, confirmed=True))

    return give


def _promote(  # noqa: PLR0917
    name: NameArgument,
    full: Annotated[bool, typer.Option("--full", help="skip every remaining step, to 100")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="confirm: no question is asked")] = False,
    by: ByOption = None,
    wait: WaitOption = "60s",
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    if not full:
        raise typer.BadParameter("promote needs --full (skip the remaining steps to 100)", param_hint="--full")
    kube = KubeOptions(kubeconfig=kubeconfig, context=context, namespace=namespace)
    raise typer.Exit(_give(Command.PROMOTE, name, by, wait, kube, confirmed=yes))


_COMMAND_HELP = {
    Command.PAUSE: "Hold the weights where they are; checks, alerts and rollback go on.",
    Command.RESUME: "Continue a paused rollout; the bake at this step restarts.",
    Command.APPROVE: "Pass the approval the rollout waits at (schedule.approvalAt), or the next one ahead.",
    Command.ABORT: "Roll the ASM gateway back to 0 now and alert (also after promotion).",
    Command.RETRY: "After a rollback, start again from the first step.",
    Command.PROMOTE: "With --full --yes: skip the remaining steps to 100; refused unless the last check passed.",
}
for _command in _OPERATOR_COMMANDS:
    _function = _promote if _command is Command.PROMOTE else _operator_command(_command)
    _function.__doc__ = _COMMAND_HELP[_command] + (
        "\n\nThe command is an annotation on the policy's state object (never on a gateway Service); the "
        "running controller answers within seconds. Equivalent: kubectl -n NAMESPACE annotate configmap "
        f"gateway-canary-NAME gateway-canary.io/command={_command.value} --overwrite"
    )
    app.command(_command.value, epilog=_exit_codes_help(_command.value))(_function)


def _invoke(argv: Sequence[str] | None, prog_name: str, *, completion: bool = True) -> int:
    """Run a command and return its exit code, never raising SystemExit.

    Typer's standalone mode does the error handling: a usage error prints the usage and the message
    on stderr and exits 2 (no traceback), Ctrl-C 130, a closed pipe 1. Commands end with
    ``typer.Exit(code)``.
    """
    command = typer.main.get_command(app)
    if not completion:  # a completion script for "kubectl gateway-canary" would name no real command
        command.params = [p for p in command.params if p.name not in ("install_completion", "show_completion")]
    try:
        command.main(args=argv, prog_name=prog_name, complete_var="_GATEWAY_CANARY_COMPLETE")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # sys.exit("message"), as Python itself would
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m controller``: the exit code."""
    return _invoke(argv, PROG)


def kubectl_plugin(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kubectl-gateway_canary``, which kubectl runs for ``kubectl gateway-canary``."""
    return _invoke(argv, KUBECTL_PROG, completion=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
