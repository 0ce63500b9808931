"""Two controller processes against the real kube-apiserver: one writer, whatever happens to them.

Each process is ``gateway-canary run`` with leader election on (short timings: a 4 s Lease, a 3 s
renew deadline, a 0.5 s retry period), started by the fault suite's harness, as the controller's
ServiceAccount. The API server's audit log is the witness: every write carries the writing
replica's name in its User-Agent (``gateway-canary/<version> (<identity>)``).

- SIGKILL the leader: the other takes over once the Lease has been silent for its duration and
  finishes the rollout from the state object.
- SIGSTOP the leader the moment it saved an intent (its next request would patch the ASM
  gateway's Service), past its Lease, then SIGCONT: the API server accepts no write of it any more
  (no Service, no state, no Event, no Lease); the new leader completes the change. Its fence
  refuses every write it had not checked yet; a request it had checked in the microseconds
  before the signal and sends on resuming is refused by the resourceVersion it carries (the new
  leader has written that object since): the figure says how many were sent, and none accepted.
- A rolling restart mid-rollout (start a new pod, SIGTERM an old one, twice, as a Deployment's
  RollingUpdate with maxSurge 1 and maxUnavailable 0 does): the writers follow one another,
  never interleaved; each SIGTERMed leader hands over at once by releasing the Lease.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.faults.harness import (
    AlertReceiver,
    AuditTail,
    Bench,
    ControllerProcess,
    Election,
    Fleet,
    Moment,
    moment_of,
    weights,
)
from tests.faults.report import SECRETS, tally
from tests.kube_cluster import AuditedWrite, Cluster
from tests.servers import MEASURED, TrafficExporter, wait_for

#: ``GATEWAY_CANARY_TAKEOVER_TIMING=15,10,2`` runs them with other timings (scripts/bench_takeover.py: the defaults)
_TIMING = [float(x) for x in os.environ.get("GATEWAY_CANARY_TAKEOVER_TIMING", "4,3,0.5").split(",")]
ELECTION = Election(
    lease_duration_seconds=_TIMING[0], renew_deadline_seconds=_TIMING[1], retry_period_seconds=_TIMING[2]
)
_LABEL = f"{_TIMING[0]:g} s Lease, {_TIMING[2]:g} s retry"
STEPS = [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
NAME = "two"


def leads(process: ControllerProcess) -> bool:
    return process.metric("gateway_canary_is_leader") == 1.0


def writer(write: AuditedWrite) -> str:
    """The replica a write came from, from its User-Agent (``gateway-canary/x (identity)``)."""
    agent = write.user_agent
    return agent[agent.rfind("(") + 1 : agent.rfind(")")] if "(" in agent else agent


def controller_writes(kube: Cluster) -> list[AuditedWrite]:
    """The controllers' accepted writes in this namespace, oldest first (the Lease included)."""
    return [w for w in kube.plane.audited_writes(kube.ns) if w.user == kube.controller_user and w.code < 400]


def interleavings(writes: list[AuditedWrite]) -> list[str]:
    """Where a writer wrote again after another had begun: two writers overlapping."""
    finished: set[str] = set()
    current: str | None = None
    found = []
    for write in writes:
        who = writer(write)
        if who != current:
            if who in finished:
                found.append(f"{who} wrote {write.verb} {write.resource}/{write.name} at {write.at} after {current}")
            if current is not None:
                finished.add(current)
            current = who
    return found


def when(write: AuditedWrite) -> datetime:
    return datetime.fromisoformat(write.at.replace("Z", "+00:00"))


def target_weight(kube: Cluster) -> int:
    return int(weights(kube)[0] or 0)


def started_rollout(kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], tmp_path: Path) -> Bench:
    return Bench(kube=kube, traffic=traffic, gateways=gateways, workdir=tmp_path, name=NAME, steps=STEPS, bake="2s")


def two_replicas(fleet: Fleet) -> tuple[ControllerProcess, ControllerProcess]:
    """The first leads (started alone), the second stands by, ready, with is_leader 0."""
    first = fleet.start("replica")
    wait_for(lambda: leads(first), timeout=20, what=f"{first.identity} leads")
    second = fleet.start("replica")
    assert second.metric("gateway_canary_is_leader") == 0.0  # ready, and standing by
    return first, second


def test_a_killed_leader_is_replaced_within_the_lease_and_the_rollout_goes_on(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> None:
    scenario = tally(8, "two replicas: SIGKILL the leader -> takeover, the rollout goes on")
    bench = started_rollout(kube, traffic, gateways, tmp_path)
    with bench, bench.fleet(prometheus_url=prometheus, election=ELECTION) as fleet:
        leader, standby = two_replicas(fleet)
        wait_for(lambda: target_weight(kube) >= 10, timeout=60, what="the rollout under way")
        killed_at = time.monotonic()
        killed_wall = datetime.now(UTC)
        leader.kill(signal.SIGKILL)
        wait_for(lambda: leads(standby), timeout=ELECTION.lease_duration_seconds * 3, what="the takeover")
        takeover = time.monotonic() - killed_at
        MEASURED.setdefault(f"takeover after SIGKILL of the leader ({_LABEL})", []).append(takeover)
        scenario.figure("takeover after SIGKILL", f"{takeover:.2f}s ({_LABEL})")
        # it had to see the Lease silent for the whole duration (its last renewal came before the kill)
        limit = ELECTION.lease_duration_seconds + 2 * ELECTION.retry_period_seconds + 1.0  # + /metrics polling
        violations = [] if takeover <= limit else [f"takeover took {takeover:.2f}s > {limit}s"]

        # the new leader continues from the state object: two more steps
        before = target_weight(kube)
        higher = [step for step in STEPS if step > before][:2]
        wait_for(lambda: target_weight(kube) >= higher[-1], timeout=90, what=f"the rollout on to {higher[-1]}")
        state_object = kube.configmap(f"gateway-canary-{NAME}")
        assert f'"holder": "{standby.identity}"' in state_object["data"]["leader"]
        late = [w for w in controller_writes(kube) if writer(w) == leader.identity and when(w) > killed_wall]
        violations += [f"the killed leader wrote {w.resource}/{w.name}" for w in late]
        violations += interleavings([w for w in controller_writes(kube) if w.resource != "leases"])
        scenario.run(violations)
        assert violations == []


def test_a_leader_paused_past_its_lease_writes_nothing_when_it_resumes(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> None:
    """SIGSTOP the moment the leader saved an intent: its very next request would patch a Service."""
    scenario = tally(9, "two replicas: SIGSTOP the leader mid-write past its Lease, SIGCONT -> no write")
    bench = started_rollout(kube, traffic, gateways, tmp_path)
    with (
        bench,
        AuditTail(kube.plane, kube.ns) as tail,
        bench.fleet(prometheus_url=prometheus, election=ELECTION) as fleet,
    ):
        leader, standby = two_replicas(fleet)
        wait_for(lambda: target_weight(kube) >= 5, timeout=60, what="the rollout under way")
        pause = tail.kill_on(leader, lambda w: w.moment is Moment.INTENT, sig=signal.SIGSTOP)
        wait_for(pause.fired.is_set, timeout=60, what="the leader saving an intent (then SIGSTOP)")
        intent = pause.write
        assert intent is not None
        # the standby sees the Lease silent, takes it, and finishes the change the intent records
        wait_for(lambda: leads(standby), timeout=ELECTION.lease_duration_seconds * 3, what="the takeover")
        wait_for(
            lambda: (
                f'"holder": "{standby.identity}"'
                in (kube.configmap(f"gateway-canary-{NAME}")["data"].get("leader") or "")
            ),
            timeout=20,
            what="the new leader's token in the state object",
        )
        # ...and has written the ASM gateway's Service since: a request the paused process had checked
        # its Lease for and not yet sent is then refused by the Service's resourceVersion
        wait_for(
            lambda: any(
                moment_of(w) is Moment.TARGET for w in controller_writes(kube) if writer(w) == standby.identity
            ),
            timeout=20,
            what="the new leader writing the target",
        )
        resumed_wall = datetime.now(UTC)
        leader.kill(signal.SIGCONT)
        # the resumed process finds its term over (its elector says so) and retires its tick in flight,
        # which stops at the fence before its next write
        wait_for(lambda: leader.events("standing by: the policies run on the leader"), timeout=20, what="stand-by")
        tail.settle(timeout=20)  # (the new leader renews every 0.5 s: never quiet for long)
        sent = [
            w for w in kube.plane.audited_writes(kube.ns) if writer(w) == leader.identity and when(w) >= resumed_wall
        ]
        accepted = [w for w in sent if w.code < 400]
        violations = [f"the resumed process wrote {w.verb} {w.resource}/{w.name} at {w.at}" for w in accepted]
        scenario.figure("writes sent after SIGCONT", f"{len(sent)} sent, {len(accepted)} accepted")
        moments = [moment_of(w) for w in controller_writes(kube) if writer(w) == standby.identity]
        assert Moment.TARGET in moments  # the new leader completed (or moved on from) the recorded change
        assert leader.alive() and leader.metric("gateway_canary_is_leader") == 0.0
        scenario.run(violations)
        assert violations == []


def test_a_rolling_restart_mid_rollout_has_no_overlapping_writers(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> None:
    scenario = tally(10, "two replicas: rolling restart mid-rollout -> no overlapping writers")
    bench = started_rollout(kube, traffic, gateways, tmp_path)
    with bench, bench.fleet(prometheus_url=prometheus, election=ELECTION) as fleet:
        old = list(two_replicas(fleet))
        wait_for(lambda: target_weight(kube) >= 10, timeout=60, what="the rollout under way")
        handovers: list[float] = []
        for retiring in old:  # maxSurge 1, maxUnavailable 0: a new pod ready, then an old one goes
            fleet.start("replica")
            was_leading = leads(retiring)
            stopped_at = time.monotonic()
            assert retiring.stop() == 0
            if was_leading:
                wait_for(
                    lambda: any(leads(p) for p in fleet.running), timeout=ELECTION.lease_duration_seconds * 3,
                    what="the next leader",
                )  # fmt: skip
                handovers.append(time.monotonic() - stopped_at)
        assert handovers, "one of the old replicas led"
        for seconds in handovers:
            MEASURED.setdefault("leader handover on SIGTERM (Lease released)", []).append(seconds)
        scenario.figure("handover on SIGTERM", f"{max(handovers):.2f}s")
        weight = target_weight(kube)
        wait_for(lambda: target_weight(kube) > weight or weight == 100, timeout=60, what="the rollout going on")
        violations = interleavings([w for w in controller_writes(kube) if w.resource != "leases"])
        writers = {writer(w) for w in controller_writes(kube) if w.resource != "leases"}
        assert len(writers) >= 2  # the writes really changed hands
        # released, the Lease was taken at once: well within the lease duration
        violations += [f"handover took {s:.2f}s" for s in handovers if s >= ELECTION.lease_duration_seconds]
        scenario.run(violations)
        assert violations == []


def test_two_replicas_send_one_rollback_alert(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> None:
    """Before leader election, two replicas sent a rollback's alert twice (seen once in three faulty
    rollouts): now only the leader decides and alerts."""
    scenario = tally(11, "two replicas: a failing ASM gateway -> one rollback, one alert")
    receiver = AlertReceiver("two-replicas")
    bench = started_rollout(kube, traffic, gateways, tmp_path)
    try:
        hook = f"{receiver.url}/{SECRETS['webhook secret path']}"
        with bench, bench.fleet(prometheus_url=prometheus, election=ELECTION, webhook_url=hook) as fleet:
            two_replicas(fleet)
            wait_for(lambda: target_weight(kube) >= 10, timeout=60, what="the rollout under way")
            traffic.target.error_ratio = 0.5
            wait_for(lambda: weights(kube) == ("0", "100"), timeout=60, what="the rollback")
            wait_for(lambda: receiver.delivered(kind="RolledBack"), timeout=30, what="the rollback alert")
            tail_end = [(p, p.events("alert")) for p in fleet.running]
            wait_for(  # every alert the controllers logged has arrived
                lambda: len(receiver.delivered()) >= sum(len(lines) for _, lines in tail_end), timeout=30
            )
        rolled = receiver.delivered(kind="RolledBack")
        ids = [d.alert_id for d in rolled]
        violations = [f"RolledBack delivered {len(rolled)} times ({len(set(ids))} ids)"] if len(rolled) != 1 else []
        alerting = {p.identity for p, lines in tail_end if any(line.get("kind") == "RolledBack" for line in lines)}
        violations += [f"{len(alerting)} replicas alerted the rollback"] if len(alerting) != 1 else []
        scenario.run(violations)
        assert violations == []
    finally:
        traffic.target.error_ratio = 0.0
        receiver.close()
