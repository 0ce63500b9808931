"""``gateway-canary``: run, demo, validate, schema, rbac, preflight, migrate-config.

The only module that writes to the terminal directly (the demo's narrative, validation
results, the schema); everything else logs through structlog.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from pydantic import ValidationError

from controller.core.alerts import Alert
from controller.core.loader import PolicyError, SourcedPolicy
from controller.core.policy import CanaryPolicy
from controller.errors import GatewayCanaryError
from controller.logs import configure_logging
from controller.policy_files import policy_files, read_policies
from controller.settings import LogFormat, Settings, invalid_settings

__all__ = ["main"]


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


def _cmd_validate(paths: Sequence[str]) -> int:
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


def _cmd_rbac(paths: Sequence[str], service_account: str, state_namespace: str | None) -> int:
    """Print the Roles and RoleBindings the policies need; refuse while any policy file is bad."""
    import yaml

    from controller.core.policy import ServiceRef
    from controller.rbac import controller_rbac

    namespace, _, name = service_account.partition("/")
    try:
        account = ServiceRef(namespace=namespace, name=name)
    except ValidationError:
        print(f"--service-account {service_account!r}: expected NAMESPACE/NAME, both DNS labels", file=sys.stderr)
        return 2
    loaded = _load_reporting_errors(paths)
    if loaded is None:
        return 2
    _, policies, errors = loaded
    if errors or not policies:
        print("no RBAC printed: fix the policy files first" if errors else "no policies found", file=sys.stderr)
        return 1
    objects = controller_rbac((item.policy for item in policies), account, state_namespace=state_namespace)
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
    real = KubernetesGatewayPair(
        api, asm_client=asm, state_namespace=settings.namespace, check_write_access=not settings.dry_run
    )
    real_store = KubernetesStateStore(api, settings.namespace)
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
            cloud=KubernetesCloudInspector(api),
            routes=KubernetesIstioRoutes(api, asm),
        )
    except OSError as exc:  # the port was taken between the check and now
        print(
            f"GATEWAY_CANARY_HTTP_PORT: cannot serve on {settings.http_host}:{settings.http_port}: {exc}",
            file=sys.stderr,
        )
        return 2
    service.run_forever()
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gateway-canary")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m controller``."""
    parser = argparse.ArgumentParser(prog="gateway-canary", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"gateway-canary {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the controller (settings from GATEWAY_CANARY_* variables)")
    run.add_argument("--policies", help="policies directory (overrides GATEWAY_CANARY_POLICIES_DIR)")
    run.add_argument("--dry-run", action="store_true", help="log intended writes, write nothing")
    demo = sub.add_parser("demo", help="a full migration against simulated gateways, no cluster")
    demo.add_argument("--speed", type=float, default=60.0, help="time compression factor (default 60)")
    demo.add_argument("--verbose", action="store_true", help="show every check's log line")
    demo.add_argument(
        "--scenario",
        choices=["errors", "missing-route"],
        default="errors",
        help="what breaks on the ASM gateway: 5xx (default), or a host without a route (404 NR)",
    )
    validate = sub.add_parser("validate", help="validate policy files or directories")
    validate.add_argument("paths", nargs="+")
    sub.add_parser("schema", help="print the policy JSON Schema (for editors)")
    rbac = sub.add_parser("rbac", help="print the least-privilege Roles and RoleBindings the policies need")
    rbac.add_argument("paths", nargs="+", help="policy files or directories")
    rbac.add_argument(
        "--service-account",
        default="gateway-canary/gateway-canary",
        help="NAMESPACE/NAME the controller runs as (default gateway-canary/gateway-canary)",
    )
    rbac.add_argument(
        "--state-namespace",
        help="where the controller keeps its state objects (GATEWAY_CANARY_NAMESPACE; default: the account's)",
    )
    preflight = sub.add_parser(
        "preflight", help="the migration runbook's checklist for the policies (reads the cluster, writes nothing)"
    )
    preflight.add_argument("paths", nargs="+", help="policy files or directories")
    migrate = sub.add_parser(
        "migrate-config", help="print the ASM-side Istio Gateways the ASM gateway still lacks (to review and apply)"
    )
    migrate.add_argument("paths", nargs="+", help="policy files or directories")
    args = parser.parse_args(argv)
    if args.command == "preflight":
        from controller.checklist import preflight_main

        return preflight_main(args.paths, output=sys.stdout)
    if args.command == "migrate-config":
        from controller.migrate import migrate_config_main

        return migrate_config_main(args.paths, output=sys.stdout)
    if args.command == "validate":
        return _cmd_validate(args.paths)
    if args.command == "schema":
        return _cmd_schema()
    if args.command == "demo":
        return _cmd_demo(args.speed, args.verbose, args.scenario)
    if args.command == "rbac":
        return _cmd_rbac(args.paths, args.service_account, args.state_namespace)
    return _cmd_run(args.policies, args.dry_run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
