"""Scenario 4 of the fault suite: kube-apiserver stopped mid-rollout and started again (etcd kept).

A rollout under way (ASM gateway at a step between the first and the last), then the session's
kube-apiserver is stopped for ``OUTAGE_SECONDS`` (CI: 6 s, large: 60 s) and started again on the
same port, certificates and etcd. The same controller process must:

- survive (same pid) with ``/healthz`` answering 200 all along (a kubelet would not restart it for
  an API server's outage) and ``gateway_canary_cluster_reachable`` at 0 during it (why nothing
  moves), 1 once the API server is back;
- retry without a hot loop (its attempts, the ticks that found the API server unreachable, are no
  closer together than half a check interval), and continue once the API server is back: the next
  step is raised (healthy run), or the ASM gateway, failing since the outage began, is rolled back
  (failing run) and alerted once;
- send no duplicate alert: no id twice, no two alerts of one kind for one outage.

(Without leader election the controller retries on its ticks, once per check interval, not with a
growing backoff: the test bounds the rate and reports the gaps it measured.)

The API server is shared by the whole session: it is started again and ready before the test ends,
whatever happens (``apiserver_outage``).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from tests.faults.harness import (
    AlertReceiver,
    Bench,
    ControllerProcess,
    Election,
    Probe,
    apiserver_outage,
    give_command,
)
from tests.faults.report import SECRETS, sized, tally
from tests.kube_cluster import Cluster, ControlPlane
from tests.servers import TrafficExporter, wait_for

TITLE = "kube-apiserver stopped and restarted mid-rollout (etcd kept)"
NAME = "outage"
OUTAGE_SECONDS = float(sized(6, 60))
#: healthy and failing outages, this many of each
ROUNDS = sized(1, 2)
REACHABLE = "gateway_canary_cluster_reachable"
#: what a controller whose API server is back may take to move again (RBAC warms up, 403s are retried)
DEADLINE = 30.0
ELECTION: Election | None = Election()  # as the chart ships it
#: never after an outage: a refusal or crash it caused, a rollback of a healthy gateway, a weight
#: it took for someone else's
FORBIDDEN = {"PolicyRefused", "TickFailed", "WeightChangedExternally", "StuckInconclusive", "CloudNotApplied"}
TROUBLE = "Kubernetes API trouble; nothing changed this tick"
MOVING = "moving again, after the API server was started again"


def says(process: ControllerProcess, reachable: float) -> bool:
    """Whether every series of the gauge (it has one) shows ``reachable``."""
    values = process.values(REACHABLE)
    return bool(values) and all(value == reachable for value in values)


def timestamp(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(sized(300, 1800))
def test_apiserver_outage_mid_rollout_is_survived_and_said(
    kube: Cluster,
    traffic: TrafficExporter,
    gateways: tuple[str, str],
    prometheus: str,
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    scenario = tally(4, TITLE)
    receiver = AlertReceiver("outage")
    hook = f"{receiver.url}/{SECRETS['webhook secret path']}/outage"
    bench = Bench(
        kube=kube,
        traffic=traffic,
        gateways=gateways,
        workdir=tmp_path,
        name=NAME,
        steps=[10, 20, 30, 40, 50, 60, 70, 80, 90],
        ccm_strict=False,  # the emulated cloud controller cannot reach the API server either
    )
    violations: list[str] = []
    figures: dict[str, list[str]] = {
        "metric at 0 after": [],
        "attempts": [],
        "moving again, after the API server was started again": [],
    }
    try:
        with bench, bench.fleet(prometheus_url=prometheus, webhook_url=hook, election=ELECTION) as fleet:
            process = fleet.start("outage")
            for kind in ["healthy", "failing"] * ROUNDS:
                run = one_outage(kind, bench, process, control_plane, receiver, prometheus, figures)
                violations += run
                scenario.run(run)
            assert process.stop() == 0, process.tail()
    finally:
        receiver.close()
    for name, values in figures.items():
        scenario.figure(name, ", ".join(values))
    print(f"scenario 4: {figures}, violations {violations}")
    assert violations == []


def one_outage(
    kind: str,
    bench: Bench,
    process: ControllerProcess,
    plane: ControlPlane,
    receiver: AlertReceiver,
    prometheus: str,
    figures: dict[str, list[str]],
) -> list[str]:
    run: list[str] = []
    kube = bench.kube
    state = bench.state() or {}
    if state.get("phase") == "Promoted":  # (not within the CI size) start again from the first step
        give_command(kube, NAME, "abort")
        wait_for(bench.rolled_back, timeout=DEADLINE, what="the abort")
        give_command(kube, NAME, "retry")
    wait_for(lambda: 0 < bench.shown()[0] < 90, timeout=DEADLINE, what="the rollout under way")
    wait_for(lambda: not (bench.state() or {}).get("pending"), timeout=DEADLINE, what="no weight change half-done")
    before = bench.shown()
    pid = process.pid
    alerts_before = len(receiver.received())
    print(f"scenario 4: {kind} outage at weights {before}")

    stopped, stopped_wall = time.monotonic(), time.time()
    with Probe(process, (REACHABLE,)) as probe, apiserver_outage(plane):
        if kind == "failing":
            bench.traffic.target.error_ratio = 0.5  # the ASM gateway fails while nobody can write
        try:
            wait_for(lambda: says(process, 0.0), timeout=OUTAGE_SECONDS + 5, what=f"{REACHABLE} 0")
            figures["metric at 0 after"].append(f"{time.monotonic() - stopped:.1f}s")
        except AssertionError:
            run.append(f"{kind}: during the outage {REACHABLE} is {process.values(REACHABLE) or 'not exported'}, not 0")
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))  # the outage's length, not a condition
        restarting = time.monotonic()
        restarting_wall = time.time()
    back = time.monotonic()
    print(f"scenario 4: API server down {back - stopped:.1f}s (restart {back - restarting:.1f}s)")

    # -- during the outage: alive, healthy, saying why
    if process.pid != pid or not process.alive():
        run.append(f"{kind}: the controller did not survive the outage (exit {process.exit_code()})")
        return run
    during = [(at, status) for at, status in probe.unhealthy() if stopped <= at <= back]
    if during:
        run.append(f"{kind}: /healthz failed {len(during)} times during the outage: {during[:3]}")
    attempts = [
        timestamp(line) for line in process.events(TROUBLE) if stopped_wall <= timestamp(line) <= restarting_wall
    ]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    figures["attempts"].append(
        f"{kind} {len(attempts)} in {restarting_wall - stopped_wall:.0f}s"
        + (f" (gaps {min(gaps):.1f}-{max(gaps):.1f}s)" if gaps else "")
    )
    if len(attempts) < 2:
        run.append(f"{kind}: {len(attempts)} attempts to reach the API server in {OUTAGE_SECONDS:.0f}s of outage")
    if gaps and min(gaps) < 0.5:
        run.append(f"{kind}: attempts {min(gaps):.2f}s apart: a hot loop, not a retry with backoff")

    # -- after: reachable again, moving again
    try:
        wait_for(lambda: says(process, 1.0), timeout=DEADLINE, what=f"{REACHABLE} back at 1")
    except AssertionError:
        run.append(f"{kind}: after the outage {REACHABLE} is {process.values(REACHABLE) or 'not exported'}, not 1")
    try:
        if kind == "healthy":
            wait_for(lambda: bench.shown()[0] > before[0], timeout=DEADLINE, what="the next step after the outage")
        else:
            wait_for(bench.rolled_back, timeout=DEADLINE, what="the rollback after the outage")
        figures["moving again, after the API server was started again"].append(
            f"{kind} {time.monotonic() - restarting:.1f}s"
        )
    except AssertionError as exc:
        run.append(f"{kind}: did not continue after the outage: {exc}; state {bench.state()}")
    if kind == "failing":
        try:
            wait_for(lambda: receiver.delivered("RolledBack", NAME), timeout=DEADLINE, what="the rollback alert")
        except AssertionError:
            run.append(f"{kind}: the rollback after the outage was not alerted")

    # -- no duplicate alert, nothing an outage must not cause
    if process.alive() and not process.healthy():
        run.append(f"{kind}: /healthz fails after the outage")
    received = receiver.received()[alerts_before:]
    answered = Counter(d.alert_id for d in received if d.answered)
    twice = {alert_id: n for alert_id, n in answered.items() if n > 1}
    if twice:
        run.append(f"{kind}: alert ids delivered more than once: {twice}")
    kinds = Counter(d.kind for d in received if d.answered)
    if any(n > 1 for n in kinds.values()):
        run.append(f"{kind}: several alerts of one kind for one outage: {dict(kinds)}")
    forbidden = {k: n for k, n in kinds.items() if k in FORBIDDEN or (k == "RolledBack" and kind == "healthy")}
    if forbidden:
        run.append(f"{kind}: alerts an outage must not cause: {forbidden}")
    try:  # nothing left half-written
        wait_for(bench.resolved, timeout=DEADLINE, what="the state object to agree with the weights")
    except AssertionError:
        run.append(f"{kind}: after the outage the state {bench.state()} disagrees with the weights {bench.shown()}")
    if kind == "failing":
        bench.heal_and_retry(prometheus)
    return run
