"""The cloud controller's arithmetic and answers, and the runbook's preflight (controller.core.cloud).

The figures are the cloud controller's documented algorithm (alibaba-cloud-facts.md): Cluster
``max(1, w // nodes)`` per node, ENI ``max(1, w // pods)`` per pod, Local
``max(1, w * podsOnNode // totalPods)`` per node with pods; no annotation is 100 per backend.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.core import cloud
from controller.core.cloud import BackendMode, Backends, CloudEvent, Confirmation, ServiceFacts

CLUSTER_20 = Backends(BackendMode.CLUSTER, nodes=20)


# --- the effective split ----------------------------------------------------------------------------


def test_cluster_mode_twenty_nodes_ten_ninety_gives_the_asm_gateway_twenty_percent() -> None:
    assert cloud.backend_weights(10, CLUSTER_20) == (1,) * 20  # 10 // 20 = 0, raised to 1
    assert cloud.backend_weights(90, CLUSTER_20) == (4,) * 20
    assert cloud.effective_share(10, 90, CLUSTER_20, CLUSTER_20) == pytest.approx(20 / (20 + 80))
    assert cloud.requested_share(10, 90) == pytest.approx(0.10)
    split = cloud.split(10, 90, CLUSTER_20, CLUSTER_20)
    assert split.describe().startswith("requested 10.0%, effective 20.0%")
    assert split.off_by() == pytest.approx(0.10)


def test_cluster_mode_at_a_hundred_nodes_every_non_zero_weight_collapses_to_one() -> None:
    many = Backends(BackendMode.CLUSTER, nodes=120)
    assert cloud.effective_share(10, 90, many, many) == pytest.approx(0.5)
    assert cloud.effective_share(1, 99, many, many) == pytest.approx(0.5)


def test_eni_mode_spreads_over_pods() -> None:
    target, source = Backends(BackendMode.ENI, pods=3), Backends(BackendMode.ENI, pods=7)
    assert cloud.backend_weights(50, target) == (16, 16, 16)
    assert cloud.backend_weights(50, source) == (7,) * 7
    assert cloud.effective_share(50, 50, target, source) == pytest.approx(48 / (48 + 49))
    assert cloud.backend_weights(1, target) == (1, 1, 1)


def test_local_mode_spreads_by_the_pods_on_each_node() -> None:
    local = Backends(BackendMode.LOCAL, pods_per_node=(3, 1, 0))
    assert local.count == 2  # a node without a pod is no backend
    assert cloud.backend_weights(40, local) == (30, 10)  # 40*3//4, 40*1//4
    assert cloud.backend_weights(2, local) == (1, 1)  # 2*3//4 = 1, 2*1//4 = 0 -> 1
    source = Backends(BackendMode.LOCAL, pods_per_node=(2, 2))
    assert cloud.effective_share(40, 60, local, source) == pytest.approx(40 / (40 + 60))


def test_a_service_without_the_weight_gets_a_hundred_per_backend_and_swamps_the_other() -> None:
    two = Backends(BackendMode.CLUSTER, nodes=2)
    assert cloud.backend_weights(None, two) == (100, 100)
    assert cloud.effective_share(50, None, two, two) == pytest.approx(50 / 250)


def test_zero_is_zero_on_every_backend_and_nothing_at_all_is_no_share() -> None:
    assert cloud.backend_weights(0, CLUSTER_20) == (0,) * 20
    assert cloud.effective_share(0, 100, CLUSTER_20, CLUSTER_20) == 0.0
    assert cloud.effective_share(0, 0, CLUSTER_20, CLUSTER_20) is None
    assert cloud.effective_share(10, 90, Backends(BackendMode.ENI, pods=0), Backends(BackendMode.ENI, pods=0)) is None


@given(
    target=st.integers(0, 100),
    source=st.integers(0, 100),
    nodes=st.integers(1, 200),
)
def test_the_effective_share_is_a_share_and_follows_the_weights(target: int, source: int, nodes: int) -> None:
    backends = Backends(BackendMode.CLUSTER, nodes=nodes)
    share = cloud.effective_share(target, source, backends, backends)
    if target == source == 0:
        assert share is None
        return
    assert share is not None and 0.0 <= share <= 1.0
    assert (share == 0.0) == (target == 0) and (share == 1.0) == (source == 0)
    if target > 0 and source > 0:  # more weight never means less share
        higher = cloud.effective_share(min(100, target + 1), source, backends, backends)
        assert higher is not None and higher >= share


# --- the cloud controller's confirmation ------------------------------------------------------------

WRITE = datetime(2026, 11, 29, 10, 0, 0, 400_000, tzinfo=UTC)
TIMEOUT = timedelta(minutes=3)


def event(reason: str, seconds: float, message: str = "", count: int = 1, order: int = 0) -> CloudEvent:
    at = WRITE.replace(microsecond=0) + timedelta(seconds=seconds)
    warning = reason != "EnsuredLoadBalancer"
    return CloudEvent(reason, message or reason, at, warning=warning, count=count, order=order)


def judge(*events: CloudEvent, after: float = 10) -> cloud.ConfirmationState:
    return cloud.confirmation(events, WRITE, WRITE + timedelta(seconds=after), TIMEOUT, service="ns/asm")


def test_a_success_newer_than_the_write_confirms_it() -> None:
    assert judge(event("EnsuredLoadBalancer", 3)).status is Confirmation.CONFIRMED
    assert judge(event("EnsuredLoadBalancer", 0)).status is Confirmation.CONFIRMED  # same second: whole seconds


def test_an_aggregated_success_from_before_the_write_is_not_a_confirmation() -> None:
    stale = event("EnsuredLoadBalancer", -60, count=12)  # count 12: seen many times, last a minute ago
    assert judge(stale).status is Confirmation.WAITING
    assert judge(stale, after=181).status is Confirmation.UNCONFIRMED


def test_failures_and_skips_hold_with_the_cloud_controllers_message() -> None:
    failed = judge(event("SyncLoadBalancerFailed", 4, "Error syncing load balancer [lb-1]: Throttling"))
    assert failed.status is Confirmation.FAILED and "Throttling" in failed.detail
    assert failed.reason == "ns/asm: the cloud controller answered SyncLoadBalancerFailed"  # stable: said once
    skipped = judge(event("SkipSyncBackends", 4, "Skip delete and update backends to vgroup rsp-1"))
    assert skipped.status is Confirmation.FAILED and "SkipSyncBackends" in skipped.reason
    assert judge(event("UnAvailableLoadBalancer", 4)).status is Confirmation.FAILED


def test_the_newest_answer_wins_and_a_tie_goes_to_the_failure() -> None:
    assert judge(event("SyncLoadBalancerFailed", 2), event("EnsuredLoadBalancer", 9)).applied  # a retry succeeded
    assert not judge(event("EnsuredLoadBalancer", 2), event("SyncLoadBalancerFailed", 9)).applied
    assert not judge(event("EnsuredLoadBalancer", 5), event("SyncLoadBalancerFailed", 5)).applied
    # within one second the API server's write order decides: a retry that succeeded right after
    assert judge(event("SyncLoadBalancerFailed", 5, order=7), event("EnsuredLoadBalancer", 5, order=9)).applied
    assert not judge(event("EnsuredLoadBalancer", 5, order=9), event("SyncLoadBalancerFailed", 5, order=11)).applied


def test_a_normal_skip_is_no_failure() -> None:
    harmless = CloudEvent("SkipSyncBackends", "Not sync pods whose ip is not in vpc cidrs", WRITE, warning=False)
    assert judge(harmless, event("EnsuredLoadBalancer", 3)).applied
    assert judge(harmless).status is Confirmation.WAITING


def test_silence_is_waiting_then_unconfirmed_and_other_reasons_are_no_answer() -> None:
    changed = event("AnnotationChanged", 1)
    assert judge(changed, after=179).status is Confirmation.WAITING
    late = judge(changed, after=181)
    assert late.status is Confirmation.UNCONFIRMED and "no EnsuredLoadBalancer" in late.reason


def test_combined_the_worst_side_decides() -> None:
    ok = cloud.ConfirmationState(Confirmation.CONFIRMED, "a")
    waiting = cloud.ConfirmationState(Confirmation.WAITING, "b")
    failed = cloud.ConfirmationState(Confirmation.FAILED, "c")
    assert cloud.combined([ok, waiting]).status is Confirmation.WAITING
    assert cloud.combined([failed, ok, waiting]) == failed
    assert cloud.combined([]).applied


def flow(
    target: float | None, source: float | None, expected: float | None, *, confirmed: str = "ok", settled: float = 60
) -> cloud.Traffic:
    states = {
        "ok": cloud.ConfirmationState(Confirmation.CONFIRMED, "ok"),
        "waiting": cloud.ConfirmationState(Confirmation.WAITING, "ns/asm: waiting"),
    }
    return cloud.traffic(
        target_requests=target,
        source_requests=source,
        expected=expected,
        tolerance=0.05,
        max_deficit=0.3,
        confirmed=states[confirmed],
        settled_for=timedelta(seconds=settled),
        grace=timedelta(seconds=30),
    )


def test_traffic_settles_until_confirmed_and_one_window_on_unless_it_already_follows() -> None:
    assert flow(200, 800, 0.20, confirmed="waiting").settling == (
        "settling: the weight write is not confirmed (ns/asm: waiting)"
    )
    assert flow(170, 830, 0.20, settled=5) == cloud.Traffic()  # within 5 points: follows already
    early = flow(20, 980, 0.20, settled=5)  # the window still holds traffic from before the write
    assert early.deficit is None and early.settling is not None and "moves to new weights late" in early.settling
    assert flow(None, 1000, 0.20) == cloud.Traffic()  # the target's count unknown: the gates say so
    assert flow(20, 980, None) == cloud.Traffic()  # backends unknown: only the confirmation counts
    assert flow(0, 0, 0.20) == cloud.Traffic()  # no traffic at all: nothing to compare


def test_a_persistent_shortfall_beyond_the_noise_is_a_traffic_deficit_with_its_likely_causes() -> None:
    gone = flow(20, 980, 0.20)  # 2 % of requests where the CLB sends 20 %
    assert gone.settling is None and gone.deficit is not None
    assert "gets 2.0% of requests, the weights give it 20.0%" in gone.deficit
    assert "TLS certificate (credentialName)" in gone.deficit and "CLB not applying the weight" in gone.deficit
    assert flow(0, 1000, 0.20).deficit is not None  # the target's series absent: no request at all
    # more traffic than the weights give is no deficit (not the target's fault): settling
    more = flow(400, 600, 0.20)
    assert more.deficit is None and more.settling is not None
    # a shortfall within maxDeficit (30 %) is not one, nor is one within the noise of a few requests
    assert flow(150, 850, 0.20).deficit is None
    assert flow(1, 19, 0.20).deficit is None  # 4 expected, 1 seen: 3 missing < 4 sigma of 2
    # however small the step: all of a 2 % share lost is a deficit (within the 5-point tolerance)
    small = flow(0, 5000, 0.02)
    assert small.deficit is not None and "no series at all" in small.deficit
    assert flow(50, 950, 0.10).deficit is not None  # 5 % of 10 %: half lost, 50 missing > 4 sigma (40)


# --- preflight --------------------------------------------------------------------------------------

GOOD = {
    cloud.LB_ID: "lb-1",
    cloud.VGROUP_PORT: "rsp-a:80,rsp-b:443",
    cloud.FORCE_OVERRIDE: "false",
    cloud.SCHEDULER: "wrr",
    cloud.WEIGHT: "0",
}


def facts(name: str, **changes: str | None) -> ServiceFacts:
    annotations = {**GOOD, **changes}
    kept = {key: value for key, value in annotations.items() if value is not None}
    return ServiceFacts(f"istio-system/{name}", kept, ports=(80, 443), workloads=(name,))


def failed(items: tuple[cloud.PreflightItem, ...]) -> list[str]:
    return [item.check for item in items if not item.ok]


def test_preflight_passes_a_setup_as_the_runbook_describes() -> None:
    items = cloud.preflight(facts("asm"), facts("old", **{cloud.WEIGHT: "100"}), target_workload="asm")
    assert failed(items) == []
    assert cloud.blocking(items) is None
    assert all(item.line().startswith("✓") for item in items)


@pytest.mark.parametrize(
    ("target", "source", "check", "fix"),
    [
        ({cloud.LB_ID: "lb-2"}, {}, "same CLB", "point both at the one reused CLB"),
        ({}, {cloud.LB_ID: None}, "same CLB", "annotate both Services"),
        ({cloud.VGROUP_PORT: "rsp-a:80, rsp-b:443"}, {}, "vServer groups of istio-system/asm", "no spaces"),
        ({}, {cloud.VGROUP_PORT: "rsp-a:80,rsp-b:8080"}, "vServer groups of istio-system/old", "Service's ports"),
        ({cloud.VGROUP_PORT: "rsp-a:80,rsp-c:443"}, {}, "same vServer groups", "old gateway's vServer group"),
        ({cloud.FORCE_OVERRIDE: None}, {}, "listeners kept on istio-system/asm", '"false"'),
        ({}, {cloud.FORCE_OVERRIDE: "true"}, "listeners kept on istio-system/old", '"false"'),
        ({cloud.SCHEDULER: "rr"}, {}, "weighted scheduler on istio-system/asm", "wrr"),
        ({}, {cloud.SCHEDULER: None}, "weighted scheduler on istio-system/old", "wrr"),
        ({cloud.WEIGHT: None}, {}, "weight present on istio-system/asm", '"0" on the ASM gateway'),
        ({}, {cloud.WEIGHT: None}, "weight present on istio-system/old", '"100" on the old one'),
    ],
)
def test_each_preflight_refusal_names_the_object_the_annotation_and_the_fix(
    target: dict[str, str | None], source: dict[str, str | None], check: str, fix: str
) -> None:
    items = cloud.preflight(facts("asm", **target), facts("old", **source), target_workload="asm")
    # (a malformed or different vgroup-port also makes the two incomparable: "same vServer groups")
    assert [c for c in failed(items) if c != "same vServer groups" or check == c] == [check]
    refusal = cloud.blocking(items)
    assert refusal is not None and check in refusal and fix in refusal
    (item,) = [item for item in items if item.check == check]
    assert item.line().startswith("✗") and "fix:" in item.line()


def test_a_malformed_vgroup_port_is_refused_and_never_raises() -> None:
    for raw in ("rsp-a", "rsp-a:8²", "rsp-a:0", ":80", "rsp-a:99999"):
        items = cloud.preflight(facts("asm", **{cloud.VGROUP_PORT: raw}), facts("old"))
        assert "vServer groups of istio-system/asm" in failed(items), raw


def test_rr_only_warns_when_the_policy_says_so() -> None:
    items = cloud.preflight(facts("asm", **{cloud.SCHEDULER: "rr"}), facts("old"), require_wrr=False)
    (item,) = [item for item in items if not item.ok]
    assert item.warn_only and not item.blocks and item.line().startswith("!")
    assert cloud.blocking(items) is None


def test_an_asm_gateway_canary_upgrade_in_progress_refuses() -> None:
    upgrading = ServiceFacts("istio-system/asm", GOOD, ports=(80, 443), workloads=("asm", "asm-canary"))
    items = cloud.preflight(upgrading, facts("old"), target_workload="asm")
    assert failed(items) == ["no ASM gateway canary upgrade"]
    refusal = cloud.blocking(items)
    assert refusal is not None and "asm-canary" in refusal and "finish or cancel" in refusal
