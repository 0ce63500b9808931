"""Scenario 1 of the fault suite: kill -9 at 50 moments of rollouts, each followed by a restart.

One rollout (steps 5, 10, ... 95, then 100; a check every second over a 3 s window, a 1 s bake)
under a real ``gateway-canary run`` against the real kube-apiserver, Prometheus and the emulated
cloud controller, killed with SIGKILL again and again, and started again each time. The moments:

- the three points of the write-ahead protocol (README, "State"): right after the intent is saved
  in the state object, after the target Service's patch, after the source Service's patch. The
  test tails the API server's audit log (written before the client gets its answer) and sends the
  signal the moment the entry appears; the process may still make its next write within those
  milliseconds, so each kill is classified afterwards by the last write the process made;
- the same points, and the final save, of a restarted controller completing what its predecessor
  left half-written (a kill during the recovery);
- uniformly random moments.

After each kill, before the restart: both weights are integers in [0, 100], never both 0, and the
state object agrees with them (no intent open: the weights it records; an intent open: each
Service shows its "from" or its "to"). After the restart: the open intent is resolved, the rollout
continues, and no target weight goes above the highest step verified before the kill until the new
process has its own evidence (a PASS in its own log; before the start, a check that read the
baseline), and then only to the next step. Some kills come with the ASM gateway failing (50 %
5xx) just before: the restarted controller rolls back to 0 and the webhook hears of it exactly
once (one alert id per rollback; a re-send of that id is allowed). Over the whole test, every pair
of weights the Services went through is replayed from the audit log: never both 0, and the
Services' patches change the weight and nothing else.

``GATEWAY_CANARY_FAULTS_SEED`` repeats a plan. Leader election is on, as the chart ships it: every
incarnation campaigns under the same identity (a container restarted in its pod, as far as the Lease
goes), so it takes the Lease at once in a new term: every restart is also a new term whose fencing
token replaces the old one in the state object (with a fresh identity each would wait out the
killed process's Lease, 4 s here, 15 s with the shipped timings).
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    AlertReceiver,
    AuditTail,
    Bench,
    ControllerProcess,
    Election,
    Fleet,
    Kill,
    Moment,
    Write,
    disagreement,
    give_command,
    stored_state,
    weights,
)
from tests.faults.report import SECRETS, sized, tally
from tests.kube_cluster import TARGET, Cluster
from tests.servers import WEIGHT, TrafficExporter, wait_for

TITLE = "kill -9 at random moments of rollouts (intent, target, source writes), restarted"
NAME = "shop"
STEPS = list(range(5, 100, 5))  # then 100
KILLS = sized(50, 200)
#: of the kills, those with the ASM gateway failing just before
FAULTS = sized(5, 25)
#: after a kill that left an intent open, how often the next kill lands in the restarted
#: controller's recovery (the rest wait for the next raise)
CHAIN = 0.85
#: leader election for the controller processes (None: off, the controller's default)
ELECTION: Election | None = Election()
#: what a restarted controller may take for anything: resolving the open intent, a rollback
DEADLINE = 30.0
#: the alerts this rollout may raise; anything else (a weight "changed by someone else" after a
#: restart, a crash, a refusal) is a violation
ALLOWED_ALERTS = {"RolledBack", "Promoted"}
RANDOM = "random"


@dataclass
class Run:
    """One kill and what came of it."""

    index: int
    aim: str  # a Moment's value, or RANDOM
    fault: bool
    hit: str = "?"  # the last write the killed process made
    precise: bool = False
    violations: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        fault = ", target failing" if self.fault else ""
        self.violations.append(f"kill {self.index} (aimed at {self.aim}{fault}, hit {self.hit}): {what}")


@dataclass
class Life:
    """One controller process: the highest target weight verified before it started, and the
    index of the first audited write that is its own."""

    process: ControllerProcess
    ceiling: int
    first_write: int


def next_step(weight: int) -> int:
    return next((step for step in [*STEPS, 100] if step > weight), 100)


def plan(rng: random.Random) -> list[tuple[str, bool]]:
    """(aim, fault) per kill: the protocol's three points and random moments; faults spread out."""
    aims = [Moment.INTENT.value, Moment.TARGET.value, Moment.SOURCE.value, RANDOM, RANDOM]
    kills = [(aims[i % len(aims)], False) for i in range(KILLS)]
    rng.shuffle(kills)
    for index in rng.sample(range(2, KILLS), FAULTS):  # not the first two: the rollout is under way
        kills[index] = (kills[index][0], True)
    return kills


def protocol_write(aim: str, fault: bool) -> Callable[[Write], bool]:
    """The writes a kill aimed at ``aim`` fires on. With a fault, only one that leaves the ASM
    gateway carrying traffic below 100 (a promoted rollout is terminal: it does not roll back)."""

    def when(write: Write) -> bool:
        if write.code != 200 or write.moment.value != aim:
            return False
        if not fault:
            return True
        if write.moment is Moment.INTENT:
            pending = (stored_state(write) or {}).get("pending") or {}
            return not pending.get("rollback") and (pending.get("from_target") or 0) > 0 and pending["target"] < 100
        return 0 < weight_of(write) < 100

    return when


def weight_of(write: Write) -> int:
    return int(write.body["metadata"]["annotations"][WEIGHT])


def timestamp(line: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))


def raised_without_evidence(life: Life, writes: list[Write]) -> list[str]:
    """A process's first target write above the ceiling it started with must follow evidence of
    its own (a PASS; for a start, a check that read the baseline) and go to the next step only."""
    problems: list[str] = []
    checks = life.process.events("check")
    for write in writes[life.first_write :]:
        if write.moment is not Moment.TARGET or write.code != 200 or weight_of(write) <= life.ceiling:
            continue
        value, who = weight_of(write), life.process.identity
        before = [line for line in checks if timestamp(line) < write.at]
        if life.ceiling == 0:  # a start: R7, the source read as a real baseline
            evidence = any(((line.get("source") or {}).get("requests") or 0) >= 10 for line in before)
        else:
            evidence = any(line.get("verdict") == "PASS" for line in before)
        if not evidence:
            problems.append(f"{who} raised the target to {value} (above {life.ceiling}) without a check of its own")
        if value != next_step(life.ceiling):
            problems.append(f"{who} raised the target from {life.ceiling} straight to {value}")
        break
    return problems


class Restarts:
    """The scenario's moving parts, and what it has seen so far."""

    def __init__(
        self, bench: Bench, tail: AuditTail, fleet: Fleet, receiver: AlertReceiver, prometheus: str, seed: int
    ) -> None:
        self.bench, self.tail, self.fleet, self.receiver = bench, tail, fleet, receiver
        self.prometheus = prometheus
        self.rng = random.Random(seed)
        self.kills = plan(self.rng)
        self.runs: list[Run] = []
        self.lives: list[Life] = []
        self.rollbacks = 0  # decided by the test (faults, aborts): one alert id each
        self.restart_seconds: list[float] = []
        self.rollback_seconds: list[float] = []
        self.chained: Kill | None = None  # a kill armed on the restarted process's recovery

    @property
    def kube(self) -> Cluster:
        return self.bench.kube

    def rollback_ids(self) -> list[str]:
        ids: list[str] = []
        for delivery in self.receiver.delivered("RolledBack", NAME):
            if delivery.alert_id and delivery.alert_id not in ids:
                ids.append(delivery.alert_id)
        return ids

    def keep_rolling(self) -> None:
        """A promoted rollout is aborted and retried (the abort's rollback is expected: one alert)."""
        if (self.bench.state() or {}).get("phase") != "Promoted":
            return
        give_command(self.kube, NAME, "abort")
        wait_for(self.bench.rolled_back, timeout=DEADLINE, what="the abort")
        self.rollbacks += 1
        give_command(self.kube, NAME, "retry")
        wait_for(lambda: self.bench.shown()[0] > 0, timeout=DEADLINE, what="the retried rollout to start")

    # -- one run ------------------------------------------------------------------------------------

    def run(self, index: int, aim: str, fault: bool) -> Run:
        life = self.lives[-1]
        chained, self.chained = self.chained, None
        run = Run(index, aim if chained is None else chained.label, fault and chained is None)
        if chained is None:
            self.keep_rolling()
        before = len(self.tail.writes())
        self.kill(run, life, chained)
        killed_at = time.monotonic()
        writes = self.tail.settle()
        own = [w for w in writes[before:] if w.moment is not Moment.OTHER and w.code == 200]
        run.hit = own[-1].moment.value if own else "none"
        run.precise = run.aim != RANDOM and bool(own) and own[-1].moment.value == run.aim
        run.violations += raised_without_evidence(life, writes)
        state, pair = self.at_the_kill(run)
        self.restart(run, index, state, pair, len(writes), killed_at)
        if run.fault:
            self.rolled_back(run, killed_at)
        elif self.chained is None:
            try:  # the interrupted change is resolved (completed or superseded) by the new process
                wait_for(self.bench.resolved, timeout=DEADLINE, what="the open intent resolved")
            except AssertionError:
                run.fail(f"the restarted controller left the change half-done: {self.bench.state()}")
        return run

    def kill(self, run: Run, life: Life, chained: Kill | None) -> None:
        inject = (lambda: setattr(self.bench.traffic.target, "error_ratio", 0.5)) if run.fault else None
        if run.aim == RANDOM:
            moment = self.rng.uniform(0.0, 1.5)
            while run.fault:  # the ASM gateway carries traffic, two raises from promotion
                wait_for(lambda: 0 < self.bench.shown()[0] < 90, timeout=DEADLINE, what="traffic on the target")
                time.sleep(moment)  # the moment itself, not a condition
                if 0 < self.bench.shown()[0] < 90:
                    break
                self.keep_rolling()
            else:
                time.sleep(moment)
            if inject is not None:
                inject()
        else:
            kill = chained or self.tail.kill_on(life.process, protocol_write(run.aim, run.fault), before=inject)
            if not kill.fired.wait(DEADLINE):
                kill.cancelled = True
                run.fail(f"the rollout did not continue: no {run.aim} write within {DEADLINE:.0f}s")
                if inject is not None:
                    inject()
        life.process.kill(signal.SIGKILL)

    def at_the_kill(self, run: Run) -> tuple[dict[str, Any] | None, tuple[int, int] | None]:
        """The weights (integers in [0, 100], never both 0) and the state object agreeing with them."""
        state = self.bench.state()
        target, source = weights(self.kube)
        try:
            pair = int(target or ""), int(source or "")
        except ValueError:
            run.fail(f"weights are not integers: target {target!r}, source {source!r}")
            return state, None
        if not all(0 <= w <= 100 for w in pair):
            run.fail(f"weights outside [0, 100]: {pair}")
        if pair == (0, 0):
            run.fail("both weights are 0")
        problem = disagreement(state, *pair)
        if problem is not None:
            run.fail(f"after the kill the state object disagrees: {problem}")
        return state, pair

    def restart(
        self,
        run: Run,
        index: int,
        state: dict[str, Any] | None,
        pair: tuple[int, int] | None,
        first_write: int,
        killed_at: float,
    ) -> None:
        """A new process; a kill of its recovery armed before it starts, now and then."""
        pending = (state or {}).get("pending") or {}
        ceiling = max((pair or (0, 0))[0], (state or {}).get("target_weight", 0), pending.get("target") or 0)
        process = self.fleet.process("restarts", identity="restarts")
        self.lives.append(Life(process, ceiling, first_write))
        follows = self.kills[index + 1] if index + 1 < len(self.kills) else None
        chain = pending and pair is not None and not run.fault and follows and not follows[1]
        if chain and self.rng.random() < CHAIN:
            assert pair is not None
            aim = Moment.STATE if pair == (pending["target"], pending["source"]) else Moment.SOURCE
            aim = Moment.TARGET if pair[0] != pending["target"] else aim
            self.chained = self.tail.kill_on(process, protocol_write(aim.value, False), label=aim.value)
        process.start()
        try:
            process.wait_ready()
        except AssertionError:
            if self.chained is None or process.alive():
                raise  # (a chained kill may land before /readyz ever answered)
        self.restart_seconds.append(time.monotonic() - killed_at)

    def rolled_back(self, run: Run, killed_at: float) -> None:
        """After a kill with the target failing: rolled back by the new process, alerted once."""
        try:
            wait_for(self.bench.rolled_back, timeout=DEADLINE, what="the restarted controller's rollback")
        except AssertionError as exc:  # the promise broken: recorded, and the test ends here
            run.fail(f"no rollback: {exc}; state {self.bench.state()}")
            tally(1, TITLE).run(run.violations)
            raise
        self.rollback_seconds.append(time.monotonic() - killed_at)
        self.rollbacks += 1
        expected = self.rollbacks
        try:
            wait_for(lambda: len(self.rollback_ids()) >= expected, timeout=DEADLINE, what="the rollback alert")
        except AssertionError:
            run.fail(f"the rollback was not alerted ({len(self.rollback_ids())} alerts for {expected} rollbacks)")
        if len(self.rollback_ids()) > expected:
            run.fail(f"{len(self.rollback_ids())} rollback alert ids for {expected} rollbacks")
        self.bench.heal_and_retry(self.prometheus)  # healed, the errors out of the window: it continues

    # -- over the whole test ------------------------------------------------------------------------

    def whole(self, writes: list[Write]) -> list[str]:
        """Every pair of weights the Services went through, every alert, every log."""
        found: list[str] = []
        target, source = 0, 100
        for write in writes:
            if write.moment in (Moment.TARGET, Moment.SOURCE) and write.code == 200:
                annotations = write.body["metadata"]["annotations"]
                if set(annotations) != {WEIGHT}:
                    found.append(f"a Service patch changed more than the weight: {sorted(annotations)}")
                target, source = (weight_of(write), source) if write.name == TARGET else (target, weight_of(write))
                if target == source == 0:
                    found.append("a write left both weights at 0")
        kinds = Counter(d.kind for d in self.receiver.delivered(policy=NAME))
        unexpected = {kind: n for kind, n in kinds.items() if kind not in ALLOWED_ALERTS}
        if unexpected:
            found.append(f"unexpected alerts: {unexpected}")
        if len(self.rollback_ids()) != self.rollbacks:
            found.append(f"{len(self.rollback_ids())} rollback alert ids for {self.rollbacks} rollbacks")
        for life in self.lives:
            text = life.process.log.read_text(errors="replace") if life.process.log.exists() else ""
            if "tick failed unexpectedly" in text or "Traceback" in text:
                found.append(f"{life.process.identity} crashed: see {life.process.log}")
        return found


@pytest.mark.timeout(sized(600, 3600))
def test_kill_9_at_random_moments_of_rollouts_then_restart(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> None:
    scenario = tally(1, TITLE)
    seed = int(os.environ.get("GATEWAY_CANARY_FAULTS_SEED") or secrets.randbelow(2**32))
    print(f"\nscenario 1: seed {seed} (GATEWAY_CANARY_FAULTS_SEED={seed} repeats the plan)")
    receiver = AlertReceiver("restarts")
    hook = f"{receiver.url}/{SECRETS['webhook secret path']}"
    bench = Bench(kube=kube, traffic=traffic, gateways=gateways, workdir=tmp_path, name=NAME, steps=STEPS, bake="1s",
                  window="3s")  # fmt: skip
    try:
        with (
            bench,
            AuditTail(kube.plane, kube.ns) as tail,
            bench.fleet(prometheus_url=prometheus, webhook_url=hook, election=ELECTION) as fleet,
        ):
            test = Restarts(bench, tail, fleet, receiver, prometheus, seed)
            test.lives.append(Life(fleet.start("restarts", identity="restarts"), 0, 0))
            for index, (aim, fault) in enumerate(test.kills):
                if test.runs:
                    scenario.run(test.runs[-1].violations)  # (the last one once the whole test is judged)
                test.runs.append(test.run(index, aim, fault))
            # after the last kill: the rollout goes on past its ceiling, and the process stops cleanly
            final = test.lives[-1]
            try:
                wait_for(
                    lambda: bench.shown()[0] > final.ceiling or (bench.state() or {}).get("phase") == "Promoted",
                    timeout=DEADLINE,
                    what="the rollout to continue after the last restart",
                )
            except AssertionError as exc:
                test.runs[-1].fail(str(exc))
            assert final.process.stop() == 0, final.process.tail()
            writes = tail.settle()
            test.runs[-1].violations += raised_without_evidence(final, writes)
    finally:
        receiver.close()

    everything = test.whole(writes)
    runs = test.runs
    scenario.run(runs[-1].violations + everything)  # the last kill's run carries what the whole test found
    hits = Counter(run.hit for run in runs)
    aimed = [run for run in runs if run.aim != RANDOM]
    scenario.figure("seed", str(seed))
    scenario.figure("kills", f"{len(runs)} ({sum(r.fault for r in runs)} with the ASM gateway failing)")
    scenario.figure("last write before the kill", ", ".join(f"{k} {v}" for k, v in sorted(hits.items())))
    scenario.figure("aimed kills that hit their point", f"{sum(r.precise for r in aimed)}/{len(aimed)}")
    scenario.figure("kill -> ready (median)", f"{statistics.median(test.restart_seconds):.2f}s")
    if test.rollback_seconds:
        scenario.figure("kill -> rolled back (median)", f"{statistics.median(test.rollback_seconds):.2f}s")
    violations = [v for run in runs for v in run.violations] + everything
    print(f"scenario 1: {len(runs)} kills, last writes {dict(hits)}, {len(violations)} violations")
    assert violations == []
    assert len(runs) == KILLS and sum(r.fault for r in runs) >= 1
    # every point of the protocol was hit at least once (not every kill fell between two changes)
    assert {Moment.INTENT.value, Moment.TARGET.value, Moment.SOURCE.value} <= set(hits), hits
