"""The sequential gate end to end, beside the threshold gate, in one controller process.

Everything real but the traffic and the cloud, as in ``tests/test_end_to_end.py`` and
``bench/rollback.py``: ``gateway-canary run`` as a subprocess under the Role ``gateway-canary rbac``
prints, kube-apiserver + etcd, a Prometheus of this test's own scraping two traffic exporters every
second, and the emulated cloud controller (each exporter's split follows the CLB weights it applies
to its pair of Services, half a second late).

Two gateway pairs, two policies, 1 s checks:

* ``seq`` judges only ``errorRate.sequential`` (alpha 0.01, minEffect 1.5; the response-mix gate
  off, so that nothing else can fail it);
* ``thr`` judges only ``errorRate.maxIncrease`` 0.01 over a 10 s window, failureThreshold 2 (and the
  default response-mix gate, which 5xx do not touch).

Both hold weight 10 of 1000 requests/s (about 100/s on each ASM gateway), with Poisson noise and
0.5 % 5xx on all four gateways. After a healthy stretch of 20 s at the step, in which neither may
roll back, both ASM gateways go to 5 % 5xx at the same moment; the time from then to each target
Service's weight annotation reading "0" is measured (and printed, and recorded in the report).

The noise is real, so the healthy stretch is the sequential gate's false-alarm guarantee at work:
under equal rates it rejects with probability at most alpha (1 %) over the whole step, and far less
over these 20 s; the threshold gate's 10 s window is further from its limit than that.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bench.rollback import POLICY as ROLLBACK_POLICY
from controller.core.cloud import BackendMode, Backends
from controller.core.loader import parse_policy_text
from tests.ccm_emulator import CcmEmulator
from tests.conftest import prometheus_command
from tests.faults.harness import ControllerProcess, Fleet
from tests.kube_cluster import CLB_READY, SOURCE, TARGET, Cluster
from tests.servers import (
    LB_ID,
    MEASURED,
    VGROUP,
    WEIGHT,
    GatewayTraffic,
    LaggedShare,
    ManagedProcess,
    TrafficExporter,
    WebhookSink,
    free_port,
    wait_for,
)

TOTAL_RPS = 1000.0  # per pair: the ASM gateway's 10 % is about 100 requests/s
STEP = 10
BASE_5XX = 0.005
FAULT_5XX = 0.05
HEALTHY_S = 20.0  # at the step, before the fault
ROLLBACK_DEADLINE_S = 45.0  # from the fault, for each policy
POLL_S = 0.05

SEQ, THR = "seq", "thr"
#: the pair of each policy: (source Service, target Service)
SERVICES = {SEQ: (SOURCE, TARGET), THR: ("istio-ingressgateway-b", "istio-ingressgateway-asm-b")}
GATES = {
    SEQ: "{errorRate: {sequential: {alpha: 0.01, minEffect: 1.5}}, responseMix: {enabled: false}}",
    THR: "{errorRate: {maxIncrease: 0.01}}",
}
LABELS = {
    SEQ: "errorRate.sequential alpha 0.01 minEffect 1.5",
    THR: "errorRate.maxIncrease 0.01, 10 s window, failureThreshold 2",
}

#: the benchmark's policy (bench/rollback.py) with this test's webhook receiver
POLICY = (
    ROLLBACK_POLICY
    + """\
  alerts:
    - type: webhook
      name: e2e
      url: {hook}
"""
)


def _weights(kube: Cluster) -> dict[str, str | None]:
    """Every Service's weight annotation in the test's namespace, in one list call."""
    items = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/services")["items"]
    return {item["metadata"]["name"]: (item["metadata"].get("annotations") or {}).get(WEIGHT) for item in items}


def _write_policy(directory: Path, name: str, kube: Cluster, traffic: TrafficExporter, hook: str) -> None:
    source_service, target_service = SERVICES[name]
    text = POLICY.format(
        name=name, ns=kube.ns, source_service=source_service, target_service=target_service,
        source=traffic.source.workload, target=traffic.target.workload, step=STEP, interval=1, window=10,
        min_requests=10, threshold=2, gates=GATES[name], hook=hook,
    )  # fmt: skip
    loaded = parse_policy_text(text, f"{name}.yaml")
    assert not loaded.errors and len(loaded.policies) == 1, f"the test's policy {name} is invalid: {loaded.errors}"
    (directory / f"{name}.yaml").write_text(text)


@contextlib.contextmanager
def _rig(kube: Cluster, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Both pairs' traffic, Prometheus, Services, cloud and policies; the controller running."""
    with contextlib.ExitStack() as stack:
        rng = random.Random()  # the noise of real traffic; each exporter its own stream
        traffic = {
            name: TrafficExporter(
                GatewayTraffic(f"gw-{name}", error_ratio=BASE_5XX),
                GatewayTraffic(f"gw-{name}-asm", error_ratio=BASE_5XX),
                total_rps=TOTAL_RPS,
                noise=random.Random(rng.getrandbits(64)),
            )
            for name in (SEQ, THR)
        }
        for exporter in traffic.values():
            stack.callback(exporter.close)
        port = free_port()
        args, scraped = prometheus_command(tmp_path, port, [e.server.port for e in traffic.values()])
        prometheus = ManagedProcess(args, tmp_path / "prometheus.log")  # starts while the rest is set up
        stack.callback(prometheus.stop)

        kube.add_gateways()  # the pair of SEQ, on lb-test
        source_b, target_b = SERVICES[THR]
        own_clb = {**CLB_READY, LB_ID: "lb-test-b", VGROUP: "rsp-test-b:80"}
        kube.add_service(target_b, {**own_clb, WEIGHT: "0"})
        kube.add_service(source_b, {**own_clb, WEIGHT: "100"})
        kube.grant(*(kube.policy(*SERVICES[name], name=name) for name in (SEQ, THR)))
        ccm = stack.enter_context(CcmEmulator(kube.plane, kube.ns, lag=0.2))
        for service in (*SERVICES[SEQ], *SERVICES[THR]):
            # 10 Nodes: weight 10 of 100 is exactly 1 per Node, so the CLB sends the ASM gateway 10 %
            # (over 20 Nodes the CCM's max(1, w // nodes) would make it 20 %)
            ccm.provision(service, Backends(BackendMode.CLUSTER, nodes=10))
        for name, exporter in traffic.items():
            source, target = SERVICES[name]
            exporter.share = LaggedShare(partial(ccm.clb_target_share, target, source), 0.5)
            exporter.move_to(kube.ns)
            stack.callback(setattr, exporter, "share", lambda: 0.0)  # before the CCM stops answering
        wait_for(scraped, timeout=60, interval=0.2, what=f"Prometheus's first scrape (log: {tmp_path})")

        sink = WebhookSink()
        stack.callback(sink.close)
        policies = tmp_path / "policies"
        policies.mkdir()
        for name, exporter in traffic.items():
            _write_policy(policies, name, kube, exporter, f"{sink.url}/hook/{name}")
        fleet = stack.enter_context(
            Fleet(kube=kube, policies=policies, prometheus_url=f"http://127.0.0.1:{port}", workdir=tmp_path)
        )
        controller = fleet.start("controller", ready=False).wait_ready(60)
        yield {"traffic": traffic, "sink": sink, "controller": controller}


def _watch(
    kube: Cluster, controller: ControllerProcess, until: Callable[[dict[str, str | None]], bool], *, timeout: float
) -> dict[str, str | None]:
    """Poll the Services' weights until ``until`` holds or ``timeout`` passes (then: the last read)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = _weights(kube)
        if until(seen) or time.monotonic() >= deadline:
            return seen
        assert controller.alive(), f"the controller exited:\n{controller.tail()}"
        time.sleep(POLL_S)


@pytest.mark.integration
def test_sequential_and_threshold_gates_roll_back_the_same_fault(
    kube: Cluster, tmp_path: Path, record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    with _rig(kube, tmp_path) as rig:
        traffic, sink, controller = rig["traffic"], rig["sink"], rig["controller"]
        targets = {name: SERVICES[name][1] for name in (SEQ, THR)}

        def tail() -> str:
            return f"weights {_weights(kube)}; controller log ({controller.log}):\n{controller.tail(40)}"

        at_step = _watch(kube, controller, lambda w: all(w[t] == str(STEP) for t in targets.values()), timeout=60)
        assert all(at_step[t] == str(STEP) for t in targets.values()), f"not both at {STEP}: {tail()}"

        # the healthy stretch: equal 5xx rates, neither target may go back to 0
        reached = time.monotonic()
        while (left := reached + HEALTHY_S - time.monotonic()) > 0:
            seen = _watch(kube, controller, lambda w: any(w[t] != str(STEP) for t in targets.values()), timeout=left)
            assert all(seen[t] == str(STEP) for t in targets.values()), f"moved while healthy: {tail()}"
        for name in (SEQ, THR):
            state = kube.state(name) or {}
            assert (state.get("phase"), state.get("target_weight")) == ("Progressing", STEP), (name, state, tail())
        # and the sequential gate judged in it (no pass on no traffic: its evidence was counted)
        passed = controller.metric("gateway_canary_checks_total", policy=SEQ, verdict="PASS") or 0.0
        assert passed >= 5, f"{SEQ} passed {passed} checks in {HEALTHY_S:g} s at the step: {tail()}"
        e_value = controller.metric("gateway_canary_gate_value", policy=SEQ, gate="errorRateSequential")
        shown_e = "not exported" if e_value is None else f"{e_value:.3g}"
        healthy = f"{HEALTHY_S:g} s healthy at weight {STEP}: {SEQ} passed {passed:.0f} checks, e-value {shown_e}"
        print(healthy)
        with capsys.disabled():
            print(f"\n{healthy}")

        # the fault, on both ASM gateways at once
        for exporter in traffic.values():
            exporter.advance()  # the traffic so far at the healthy rates (the exporters accumulate at scrapes)
        for exporter in traffic.values():
            exporter.target.error_ratio = FAULT_5XX
        injected = time.monotonic()
        zero_after: dict[str, float] = {}

        def note(weights: dict[str, str | None]) -> bool:
            for name, target in targets.items():
                if name not in zero_after and weights[target] == "0":
                    zero_after[name] = time.monotonic() - injected
            return len(zero_after) == len(targets)

        _watch(kube, controller, note, timeout=ROLLBACK_DEADLINE_S)
        for exporter in traffic.values():
            exporter.target.error_ratio = BASE_5XX

        shown = {name: f"{zero_after[name]:.2f} s" if name in zero_after else "no rollback" for name in targets}
        figures = ", ".join(f"{name} ({LABELS[name]}) {value}" for name, value in shown.items())
        line = f"5xx {BASE_5XX:.1%} -> {FAULT_5XX:.0%} on both ASM gateways -> target weight 0: {figures}"
        print(line)  # in the report on failure
        with capsys.disabled():
            print(line)
        for name, seconds in zero_after.items():
            record_property(f"rollback_seconds_{name}", round(seconds, 3))
            MEASURED.setdefault(f"5xx 0.5% -> 5% -> target weight 0, {LABELS[name]}", []).append(seconds)
        assert set(zero_after) == {SEQ, THR}, f"not rolled back within {ROLLBACK_DEADLINE_S:g} s: {tail()}"

        # why: the sequential policy names its gate and its confidence sequence
        states = {
            name: wait_for(
                lambda name=name: (s := kube.state(name)) and s["pending"] is None and s["phase"] == "RolledBack" and s,
                timeout=10,
                what=f"{name}'s rollback saved",
            )
            for name in (SEQ, THR)
        }
        seq_state, thr_state = states[SEQ], states[THR]
        assert seq_state["last_failed_gate"] == "errorRateSequential", seq_state
        assert "errorRateSequential" in seq_state["reason"] and "CS [" in seq_state["reason"], seq_state["reason"]
        assert thr_state["last_failed_gate"] == "errorRateIncrease", thr_state
        alerts = {
            name: wait_for(
                lambda name=name: [b for b in sink.bodies(f"/hook/{name}") if b.get("kind") == "RolledBack"],
                timeout=20,
                what=f"{name}'s RolledBack alert",
            )[0]
            for name in (SEQ, THR)
        }
        assert "errorRateSequential" in alerts[SEQ]["reason"] and "CS [" in alerts[SEQ]["reason"], alerts[SEQ]
        assert alerts[SEQ]["weightsAfter"] == {"target": 0, "source": 100}
        assert "errorRateIncrease" in alerts[THR]["reason"], alerts[THR]
        with capsys.disabled():
            print(f"{SEQ}'s rollback: {seq_state['reason']}")
