"""Operators' commands through the runner and the store, in-process (the store is in memory).

What the end-to-end tests cannot show in seconds: a command given in the middle of a long bake
does not cost the bake (the annotation changes the object's version, not the state), a bare word
annotated by hand is answered once, and an unreadable annotation is dropped and said.
"""

from __future__ import annotations

from datetime import timedelta

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.commands import CommandRequest, encode_command
from controller.core.enums import Command, Phase
from tests.helpers import PASS, HandClock, ScriptedChecks, make_policy, runner_for

POLICY = make_policy(
    schedule={"steps": [10, 50, 100], "bakeTime": "10m", "approvalAt": [50]}, analysis={"interval": "30s"}
)


def rig():  # type: ignore[no-untyped-def]
    pair, store, checks, clock = (
        InMemoryGatewayPair(target_weight=0, source_weight=100),
        InMemoryStateStore(),
        ScriptedChecks(),
        HandClock(),
    )
    runner = runner_for(POLICY, pair=pair, store=store, metrics=object(), collector=checks, clock=clock)
    runner.tick()  # Start: 10/90
    assert pair.target_weight == 10
    checks.next = PASS
    return pair, store, runner, clock


def command(name: Command, ident: str, by: str = "alice") -> str:
    return encode_command(CommandRequest(name, ident, by))


def test_an_early_approval_does_not_cost_the_bake_in_progress() -> None:
    pair, store, runner, clock = rig()
    for _ in range(15):  # 7.5 minutes of passing checks: the run is open (nothing is saved meanwhile)
        clock.at += timedelta(seconds=30)
        runner.tick()
    store.give("shop", command(Command.APPROVE, "a1"))  # annotated: a new version of the object
    clock.at += timedelta(seconds=30)
    runner.tick()
    state = store.state_of("shop")
    assert state is not None and state.last_command is not None and state.last_command.id == "a1"
    assert state.last_command.applied and 50 in state.approved
    for _ in range(5):  # 2.5 minutes more complete the 10 minutes: the raise to 50 follows at once
        clock.at += timedelta(seconds=30)
        runner.tick()
    assert pair.target_weight == 50


def test_a_bare_word_is_answered_once_and_removed() -> None:
    pair, store, runner, clock = rig()
    store.give("shop", "pause")
    clock.at += timedelta(seconds=30)
    runner.tick()
    state = store.state_of("shop")
    assert state is not None and state.phase is Phase.PAUSED
    assert state.last_command is not None and state.last_command.by == "kubectl annotate"
    assert "shop" not in store.pending_commands  # the save that answered it removed it
    history = len(state.history)
    clock.at += timedelta(seconds=30)
    runner.tick()
    after = store.state_of("shop")
    assert after is not None and len(after.history) == history  # not answered twice
    assert [e.reason for e in pair.events].count("CommandPause") == 1


def test_an_unreadable_command_is_dropped_and_nothing_changes() -> None:
    pair, store, runner, clock = rig()
    store.give("shop", "promote-everything-now")
    clock.at += timedelta(seconds=30)
    runner.tick()
    state = store.state_of("shop")
    assert state is not None and state.phase is Phase.PROGRESSING and pair.target_weight == 10
    assert "shop" not in store.pending_commands
