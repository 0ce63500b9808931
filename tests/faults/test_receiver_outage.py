"""Scenario 5 of the fault suite: alert receivers dead or hanging during a rollback, kill -9 right after.

Three webhook receivers hear of the rollout: ``global`` (GATEWAY_CANARY_WEBHOOK_URL) and ``b`` (the
policy's, by ``urlFromEnv``) are the ones that die or hang; ``c`` (the policy's) stays alive all
along. Each run rolls back a failing ASM gateway (50 % 5xx):

- ``alive``: every receiver answers (the baseline);
- ``dead``: ``global`` and ``b`` refuse connections (nothing listens on their ports) during the
  rollback, and the controller is SIGKILLed the moment the rollback's source patch is answered (its
  intent still open); restarted while they are still dead, then they come back;
- ``hanging``: ``global`` and ``b`` accept, read the request and never answer; SIGKILL the moment
  the rollback is marked complete in the state object; restarted while they still hang, then back.

The promise: the rollback is not delayed (from the failure being visible in Prometheus to the
target's patch to 0, compared with the alive run; a delivery that held the tick would add the 20 s
critical-alert timeout the controller runs with here); the alert is kept in the state object's
outbox while undelivered, and every receiver gets it once it is back, across the restart, with one
alert id for the rollback. Duplicates beyond the idempotency rules are violations: a receiver
acknowledging the same id twice from one process (the dispatcher never re-sends an acknowledged
id), or a second id for one rollback. A re-send of the same id by the restarted process (it cannot
know what its predecessor delivered after its last save) is allowed and counted.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.harness import (
    AlertReceiver,
    AuditTail,
    Bench,
    ControllerProcess,
    Delivery,
    Election,
    Fleet,
    Moment,
    ReceiverMode,
    Write,
    prometheus_value,
    stored_state,
)
from tests.faults.report import SECRETS, sized, tally
from tests.kube_cluster import Cluster
from tests.servers import WEIGHT, TrafficExporter, wait_for

TITLE = "alert receivers dead or hanging during a rollback, kill -9 right after it"
NAME = "receivers"
#: alive (the baseline), then dead and hanging, this many times each
ROUNDS = sized(1, 3)
#: a delivery attempt to a hanging receiver lasts this long: a tick that waited for it would show it
CRITICAL_TIMEOUT = 20.0
#: how much later than the slowest alive run a rollback may land with receivers dead or hanging:
#: checks run every second and two failed ones roll back, so runs differ by a check or two; a tick
#: that waited for a receiver would be late by the 20 s timeout (hanging) or forever (dead, retried)
SLACK_SECONDS = 5.0
ELECTION: Election | None = Election()  # as the chart ships it
DEADLINE = 30.0


def value_of(write: Write) -> int:
    return int(write.body["metadata"]["annotations"][WEIGHT])


def is_rollback_source(write: Write) -> bool:
    return write.code == 200 and write.moment is Moment.SOURCE and value_of(write) == 100


def is_rollback_done(write: Write) -> bool:
    state = stored_state(write) or {}
    return write.code == 200 and state.get("phase") == "RolledBack" and not state.get("pending")


class Receivers:
    """The three receivers: ``global`` and ``b`` fail on demand, ``c`` never does."""

    def __init__(self) -> None:
        self.by_name = {name: AlertReceiver(name) for name in ("global", "b", "c")}
        path = SECRETS["webhook secret path"]
        self.urls = {name: f"{r.url}/{path}/{name}" for name, r in self.by_name.items()}

    def failing(self, mode: ReceiverMode) -> None:
        for name in ("global", "b"):
            self.by_name[name].set_mode(mode)

    def close(self) -> None:
        for receiver in self.by_name.values():
            receiver.close()

    def rollback_deliveries(self, since: float) -> dict[str, list[Delivery]]:
        return {
            name: [d for d in r.received() if d.kind == "RolledBack" and d.policy == NAME and d.at >= since]
            for name, r in self.by_name.items()
        }


@pytest.mark.timeout(600)
def test_dead_or_hanging_receivers_delay_no_rollback_and_lose_no_alert(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> None:
    scenario = tally(5, TITLE)
    receivers = Receivers()
    alerts = [
        "{type: webhook, name: b, urlFromEnv: GATEWAY_CANARY_POLICY_HOOK_B}",
        "{type: webhook, name: c, urlFromEnv: GATEWAY_CANARY_POLICY_HOOK_C}",
    ]
    bench = Bench(kube=kube, traffic=traffic, gateways=gateways, workdir=tmp_path, name=NAME, steps=[20, 40, 60, 80],
                  alerts=alerts)  # fmt: skip
    delays: dict[str, list[float]] = {"alive": [], "dead": [], "hanging": []}
    beside: list[float] = []  # the alive receiver's delivery, after the rollback's intent, beside failing ones
    resent = 0
    runs: list[list[str]] = []
    try:
        with bench, AuditTail(kube.plane, kube.ns) as tail:
            fleet = bench.fleet(
                prometheus_url=prometheus,
                webhook_url=receivers.urls["global"],
                election=ELECTION,
                extra_env={
                    "GATEWAY_CANARY_POLICY_HOOK_B": receivers.urls["b"],
                    "GATEWAY_CANARY_POLICY_HOOK_C": receivers.urls["c"],
                    "GATEWAY_CANARY_NOTIFY_CRITICAL_TIMEOUT_SECONDS": str(CRITICAL_TIMEOUT),
                    "GATEWAY_CANARY_NOTIFY_TIMEOUT_SECONDS": "2",
                    "GATEWAY_CANARY_NOTIFY_BACKOFF_SECONDS": "0.2",
                    "GATEWAY_CANARY_NOTIFY_BACKOFF_MAX_SECONDS": "1",
                },
            )
            with fleet:
                process = fleet.start("receivers")
                for kind in ["alive"] + ["dead", "hanging"] * ROUNDS:
                    if runs:
                        scenario.run(runs[-1])  # (the last one once the whole test is judged)
                    runs.append([])
                    process, delay, resends = one_run(kind, bench, fleet, process, tail, receivers, prometheus,
                                                      runs[-1], beside)  # fmt: skip
                    resent += resends
                    if delay is not None:
                        delays[kind].append(delay)
                assert process.stop() == 0, process.tail()
    finally:
        receivers.close()

    # over the whole test (carried by the last run): no other alert; no rollback delayed
    last = runs[-1]
    kinds = Counter(d.kind for r in receivers.by_name.values() for d in r.received())
    if set(kinds) - {"RolledBack"}:
        last.append(f"alerts other than the rollbacks': {dict(kinds)}")
    slowest_alive = max(delays["alive"])
    for kind in ("dead", "hanging"):
        for delay in delays[kind]:
            if delay > slowest_alive + SLACK_SECONDS:
                late = f"receivers {kind}: the rollback took {delay:.2f}s after the failure was visible"
                last.append(f"{late}, {slowest_alive:.2f}s with all alive")
    scenario.run(last)
    violations = [v for run in runs for v in run]
    for kind, values in delays.items():
        if values:
            scenario.figure(f"failure visible -> weight 0, receivers {kind}", "/".join(f"{v:.2f}s" for v in values))
    if beside:
        scenario.figure("alive receiver's alert after the rollback's intent", f"max {max(beside):.2f}s")
    scenario.figure("same id re-sent by the restarted controller (allowed)", str(resent))
    print(f"scenario 5: delays {delays}, beside {beside}, re-sent {resent}, violations {violations}")
    assert violations == []
    assert all(delays.values())


def one_run(
    kind: str,
    bench: Bench,
    fleet: Fleet,
    process: ControllerProcess,
    tail: AuditTail,
    receivers: Receivers,
    prometheus: str,
    run: list[str],
    beside: list[float],
) -> tuple[ControllerProcess, float | None, int]:
    """One rollback with the receivers ``kind``; the process running afterwards, the rollback's delay
    after the failure was visible, and how many times the restarted process re-sent a delivered id."""
    # the ASM gateway carries traffic, and Prometheus sees it
    wait_for(lambda: bench.shown()[0] > 0, timeout=DEADLINE, what="the rollout to start")
    requests_query = bench.target_error_ratio().split(" / ")[1]
    wait_for(lambda: (prometheus_value(prometheus, requests_query) or 0) > 0, timeout=DEADLINE, what="target traffic")
    failing = {"alive": ReceiverMode.ALIVE, "dead": ReceiverMode.DEAD, "hanging": ReceiverMode.HANGING}[kind]
    receivers.failing(failing)
    before = len(tail.writes())
    since = time.monotonic()
    kill = None
    if kind == "dead":
        kill = tail.kill_on(process, is_rollback_source)
    elif kind == "hanging":
        kill = tail.kill_on(process, is_rollback_done)

    bench.traffic.target.error_ratio = 0.5
    wait_for(
        lambda: (prometheus_value(prometheus, bench.target_error_ratio()) or 0) > 0.05,
        timeout=DEADLINE,
        interval=0.05,
        what="the failure to be visible in Prometheus",
    )
    visible = time.time()
    zero = tail.wait(lambda w: w.code == 200 and w.moment is Moment.TARGET and value_of(w) == 0, after=before,
                     timeout=DEADLINE)  # fmt: skip
    delay = zero.at.timestamp() - visible
    intent = next(
        w
        for w in tail.writes()[before:]
        if w.moment is Moment.INTENT and ((stored_state(w) or {}).get("pending") or {}).get("rollback")
    )

    restarted_at = None
    killed_at = None
    rollback_id = None
    if kill is not None:
        if not kill.fired.wait(DEADLINE):
            run.append(f"{kind}: the kill right after the rollback never fired")
        process.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        tail.settle()
        # the undelivered alert is in the state object, for the next process
        outbox = bench.outbox()
        waiting = {
            alert_id: names for alert_id, names in outbox.items() if set(names) & {"webhook:global", "webhook:b"}
        }
        if not waiting:
            run.append(f"{kind}: after the kill the outbox holds no undelivered alert: {outbox}")
        else:
            rollback_id = next(iter(waiting))
        restarted_at = time.monotonic()  # (it may deliver before /readyz answers)
        process = fleet.start("receivers")
        # the new process tries the receivers that are still down before they come back
        if failing is ReceiverMode.HANGING:
            wait_for(
                lambda: all(
                    any(d.at >= restarted_at for d in receivers.by_name[n].received()) for n in ("global", "b")
                ),
                timeout=DEADLINE,
                what="the restarted controller to try the hanging receivers",
            )
        else:
            wait_for(
                lambda: len({line.get("receiver") for line in process.events("alert delivery failed; retrying")}) >= 2,
                timeout=DEADLINE,
                what="the restarted controller to try the dead receivers",
            )
    receivers.failing(ReceiverMode.ALIVE)

    # every receiver gets the rollback's alert; one id for the rollback
    def all_delivered() -> bool:
        got = receivers.rollback_deliveries(since)
        return all(any(d.answered for d in deliveries) for deliveries in got.values())

    try:
        wait_for(all_delivered, timeout=DEADLINE, what="the rollback alert at every receiver")
    except AssertionError:
        got = receivers.rollback_deliveries(since)
        run.append(f"{kind}: not delivered everywhere: { ({n: [d.answered for d in ds] for n, ds in got.items()}) }")
    try:  # (the alert goes out when the rollback is decided: its write may still be completing)
        wait_for(bench.rolled_back, timeout=DEADLINE, what="the rollback written and its intent closed")
    except AssertionError:
        run.append(f"{kind}: the rollout is not rolled back: {bench.state()}")
    got = receivers.rollback_deliveries(since)
    ids = {d.alert_id for deliveries in got.values() for d in deliveries}
    if len(ids) != 1 or (rollback_id is not None and ids != {rollback_id}):
        run.append(f"{kind}: {len(ids)} alert ids for one rollback: {sorted(map(str, ids))} (outbox: {rollback_id})")
    resends = 0
    for name, deliveries in got.items():
        answered = [d for d in deliveries if d.answered]
        if any(d.idempotency_key != d.alert_id for d in deliveries):
            run.append(f"{kind}: {name} got an Idempotency-Key other than the alert id")
        first = [d for d in answered if killed_at is None or d.at < killed_at]
        second = [d for d in answered if restarted_at is not None and d.at >= restarted_at]
        for lifetime in (first, second):
            repeats = Counter(d.alert_id for d in lifetime)
            if any(n > 1 for n in repeats.values()):
                run.append(f"{kind}: {name} acknowledged one id {max(repeats.values())} times from one process")
        resends += len(second) if first else 0
        if failing is ReceiverMode.HANGING and name != "c" and all(d.answered for d in deliveries):
            run.append(f"{kind}: {name} was never left hanging: the run did not test what it says")
    c = [d for d in got["c"] if d.answered and (killed_at is None or d.at < killed_at)]
    if kind != "alive" and c:
        beside.append(c[0].at - intent.seen)
        if c[0].at - intent.seen > 2.0:
            run.append(f"{kind}: the alive receiver heard of the rollback {c[0].at - intent.seen:.2f}s after it")

    # once delivered, the outbox lets go of it (the next save of the state object)
    try:
        wait_for(lambda: not bench.outbox(), timeout=DEADLINE, what="the outbox to empty")
    except AssertionError:
        run.append(f"{kind}: the outbox still holds {bench.outbox()} after delivery")
    weights = bench.shown()
    if weights != (0, 100):
        run.append(f"{kind}: weights {weights} after the rollback")
    bench.heal_and_retry(prometheus)
    return process, delay, resends
