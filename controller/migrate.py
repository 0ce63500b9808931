"""``gateway-canary migrate-config POLICY...``: the ASM-side Istio Gateways a migration still needs.

The runbook's step 2 says "change ``selector.istio`` to the ASM gateway's name" for every Gateway
of the old gateway; missing one host is an outage for that host's share of traffic. This command
reads the Gateways of both sides (data plane: ``GATEWAY_CANARY_KUBECONFIG``/``_KUBE_CONTEXT``; ASM
control plane: ``GATEWAY_CANARY_ASM_KUBECONFIG``/``_ASM_CONTEXT``, else the data plane), and
prints, as one YAML stream, a copy of each source Gateway with the servers the ASM gateway lacks,
re-pointed at the ASM gateway. Each document says in a comment which host:port it adds. It writes
nothing: an engineer reviews the stream and applies it on the ASM control plane.

Everything is read before anything is printed, so a failure never leaves half a stream behind to
be applied by mistake: the exit code is 0 with the complete stream, or 2 with one line per problem
(an unreadable or invalid policy, bad settings, an unreachable or forbidden API server, a side
without the Gateway API) and no output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

import yaml
from pydantic import ValidationError

from controller.adapters.istio_routes import KubernetesIstioRoutes
from controller.adapters.kube_api import data_and_asm_clients
from controller.core.loader import PolicyError, SourcedPolicy
from controller.core.routes import MigrationManifest, RouteParity, format_selector
from controller.errors import GatewayCanaryError
from controller.logs import configure_logging
from controller.policy_files import policy_files, read_policies
from controller.settings import Settings, invalid_settings

__all__ = ["migrate_config_main"]

_PROG = "gateway-canary migrate-config"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _load(paths: Sequence[str]) -> tuple[list[SourcedPolicy], list[PolicyError]]:
    """Valid policies and every problem, as ``gateway-canary validate`` finds them."""
    files: list[Path] = []
    missing: list[PolicyError] = []
    for path in paths:  # every bad path is reported, not only the first
        try:
            files += policy_files([path])
        except FileNotFoundError:
            missing.append(PolicyError(path, 1, "", "no such file or directory"))
    policies, errors, _warnings = read_policies(files)
    return policies, errors + missing


def _render(item: SourcedPolicy, parity: RouteParity, plan: list[MigrationManifest]) -> str:
    """One policy's part of the stream: a header of comments, then one document per Gateway to add."""
    source = format_selector(parity.source_selector)
    target = format_selector(parity.target_selector)
    lines = [
        f"# {_PROG}: policy {item.policy.name} ({item.file})",
        f"# source gateway {source} -> ASM gateway {target}",
    ]
    lines += [f"# note: {_one_line(note)}" for note in parity.notes]
    lines += [f"# ignored (spec.routes.ignoreHosts): {_one_line(missing)}" for missing in parity.ignored]
    if not plan:
        lines.append(f"# nothing to migrate: every host:port of {source} is served by {target}")
        return "\n".join(lines) + "\n"
    lines.append("# review each document, then apply it on the ASM control plane (kubectl apply -f -)")
    for manifest in plan:
        lines.append("---")
        lines += [f"# adds {added.route} from Gateway {added.gateway}" for added in manifest.adds]
        lines += [
            f"# CONFLICT: {added.route.host}:{added.route.port} is {_one_line(added.reason)}: change or remove "
            "that server on the ASM side too, or this copy will not take effect"
            for added in manifest.adds
            if added.conflicting_gateway
        ]
        lines.append(yaml.safe_dump(manifest.manifest, sort_keys=False).rstrip("\n"))
    return "\n".join(lines) + "\n"


def migrate_config_main(policy_files: Sequence[str], *, output: TextIO, errors: TextIO | None = None) -> int:
    """Print the ASM-side Gateways the policies' target gateways lack; 0, or 2 with one-line errors.

    ``output`` receives the YAML stream (the command's stdout); ``errors`` the problems (stderr by
    default). Settings come from the ``GATEWAY_CANARY_*`` environment like ``run``'s.
    """
    problems_to = errors if errors is not None else sys.stderr
    policies, policy_errors = _load(policy_files)
    problems = [str(error) for error in policy_errors]
    if not policies and not problems:
        problems.append(f"{_PROG}: no policy files found in {' '.join(policy_files) or '(no paths given)'}")
    settings: Settings | None = None
    if not problems:
        try:
            settings = Settings()
        except ValidationError as exc:
            problems = invalid_settings(exc)
    if settings is None or problems:
        for problem in problems:
            print(problem, file=problems_to)
        return 2
    # Logs go with the problems, never into the YAML stream (it is piped into kubectl); INFO is
    # quieted to WARNING: a command's output is its stream, not a service's progress.
    configure_logging(
        settings.log_format, "WARNING" if settings.log_level == "INFO" else settings.log_level, stream=problems_to
    )
    sections: list[str] = []
    current: SourcedPolicy | None = None
    try:
        with ExitStack() as stack:
            data_plane, asm = data_and_asm_clients(
                stack, settings.kubeconfig, settings.kube_context, settings.asm_kubeconfig, settings.asm_context
            )
            routes = KubernetesIstioRoutes(data_plane, asm)
            for item in policies:
                current = item
                parity, plan = routes.migration(item.policy)
                sections.append(_render(item, parity, plan))
    except GatewayCanaryError as exc:
        where = f"policy {current.policy.name} ({current.file}): " if current is not None else ""
        print(f"{_PROG}: {where}{_one_line(exc)}", file=problems_to)
        return 2
    output.write("".join(sections))
    output.flush()
    return 0
