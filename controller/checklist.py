"""``gateway-canary preflight POLICY...``: the runbook's checklist, ✓/✗ per item, without raising anything.

The same checks the controller runs before its first raise (``controller.runtime.cloud_watch``):
both Services on one CLB, vServer groups without spaces and on the Service's ports, listeners kept
(``force-override-listeners: "false"``), the WRR scheduler, both weights present, no ASM gateway
canary upgrade, route parity, and what the weight annotations read (an IstioGateway's conflicting
overrides included). Then the schedule with the share each step requests and the share the CLB
will really send at today's backends. It reads, never writes; exit 0 when every item passes,
1 when any fails, 2 when the policies or the cluster cannot be read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TextIO

from pydantic import ValidationError

from controller.adapters.cloud import KubernetesCloudInspector
from controller.adapters.istio_routes import KubernetesIstioRoutes
from controller.adapters.kube_api import data_and_asm_clients
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.core import cloud
from controller.core.loader import SourcedPolicy
from controller.core.schedule import FULL, target_steps, weights_for
from controller.errors import GatewayCanaryError
from controller.logs import configure_logging
from controller.policy_files import policy_files, read_policies
from controller.runtime.cloud_watch import preflight_items
from controller.settings import Settings, invalid_settings

__all__ = ["preflight_main"]

_PROG = "gateway-canary preflight"


def preflight_main(paths: Sequence[str], *, output: TextIO, errors: TextIO | None = None) -> int:
    """Print each policy's checklist; 0 all pass, 1 something fails, 2 nothing could be checked."""
    problems_to = errors if errors is not None else sys.stderr
    try:
        policies, policy_errors, _ = read_policies(policy_files(paths))
    except FileNotFoundError as exc:
        print(f"{_PROG}: {exc}", file=problems_to)
        return 2
    for error in policy_errors:
        print(error, file=problems_to)
    if policy_errors or not policies:
        if not policies and not policy_errors:
            print(f"{_PROG}: no policy files found", file=problems_to)
        return 2
    try:
        settings = Settings()
    except ValidationError as exc:
        for problem in invalid_settings(exc):
            print(problem, file=problems_to)
        return 2
    configure_logging(settings.log_format, "ERROR", stream=problems_to)
    failed = 0
    try:
        with ExitStack() as stack:
            api, asm = data_and_asm_clients(
                stack, settings.kubeconfig, settings.kube_context, settings.asm_kubeconfig, settings.asm_context
            )
            pair = KubernetesGatewayPair(api, asm_client=asm, state_namespace=settings.namespace)
            inspector = KubernetesCloudInspector(api)
            routes = KubernetesIstioRoutes(api, asm)
            for item in policies:
                lines, bad = _checklist(item, pair, inspector, routes)
                output.write("\n".join(lines) + "\n")
                failed += bad
    except GatewayCanaryError as exc:
        print(f"{_PROG}: {' '.join(str(exc).split())}", file=problems_to)
        return 2
    output.write(f"{failed} item(s) failed\n" if failed else "every item passed\n")
    output.flush()
    return 1 if failed else 0


def _checklist(
    item: SourcedPolicy,
    pair: KubernetesGatewayPair,
    inspector: KubernetesCloudInspector,
    routes: KubernetesIstioRoutes,
) -> tuple[list[str], int]:
    """One policy's lines and how many of its items failed. Raises GatewayCanaryError."""
    policy = item.policy
    lines = [f"policy {policy.name} ({item.file}): {policy.spec.source.service} -> {policy.spec.target.service}"]
    checks = list(preflight_items(inspector, policy))
    seen = pair.observe(policy)
    weights = f"target {seen.target_weight}, source {seen.source_weight}"
    checks.append(cloud.PreflightItem("weights readable and writable", seen.refusal is None, seen.refusal or weights))
    if policy.spec.routes.check:
        parity = routes.parity(policy)
        refusal = parity.refusal(item.file)
        served = "every host:port the source gateway serves is served by the ASM gateway"
        checks.append(cloud.PreflightItem("route parity", refusal is None, refusal or served))
    lines += [f"  {check.line()}" for check in checks]
    lines += _schedule(item, inspector, seen.source_weight)
    return lines, sum(1 for check in checks if check.blocks)


def _schedule(item: SourcedPolicy, inspector: KubernetesCloudInspector, source_now: int | None) -> list[str]:
    """Each step's requested and effective share at today's backends."""
    policy = item.policy
    target = inspector.backends(policy.spec.target.service)
    source = inspector.backends(policy.spec.source.service)
    mode = policy.spec.schedule.weight_mode
    tolerance = policy.spec.cloud.share_tolerance
    header = "  schedule (share the weights request -> share the CLB sends"
    if target is None or source is None:
        header += "; backends unreadable, effective share unknown"
    lines = [header + "):"]
    for step in target_steps(policy.spec.schedule):
        weights = weights_for(FULL, mode, promoted=True) if step >= FULL else weights_for(step, mode)
        source_weight = weights.source if weights.source is not None else source_now
        split = cloud.split(weights.target, source_weight, target, source)
        warn = "  ! differs by more than the tolerance" if split.off_by() > tolerance else ""
        lines.append(f"    weight {weights.target:>3}/{source_weight}: {split.describe()}{warn}")
    return lines
