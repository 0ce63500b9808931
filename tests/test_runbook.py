"""docs/runbook.md, held to what on-call relies on at 3 a.m.

- every alert kind links to a section that exists (``RUNBOOK_ANCHORS``), and so does every
  anchor the chart's PrometheusRule and dashboards use;
- every section says Meaning / Impact / Diagnosis / Mitigation, in that order;
- every ``gateway-canary`` command in a bash block is one the CLI has, with options it takes;
- every ``kubectl annotate`` is a command on a state ConfigMap, never anything on a Service.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from controller.cli import EXIT_CODES
from controller.core.alerts import RUNBOOK_ANCHORS
from controller.core.commands import COMMAND_ANNOTATION
from controller.core.enums import AlertKind, Command

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "runbook.md"

#: Anchors linked from outside the controller: the chart's PrometheusRule and dashboards (the
#: runbook's first version named its sections so).
LEGACY_ANCHORS = ("rolledback", "refused", "stuck", "ticksfailing", "notchecking", "alertingbroken")
#: The situations on-call looks for without an alert.
SITUATION_ANCHORS = ("stop-everything", "resume-after-fix", "change-threshold", "windows-and-approvals")
PARTS = ("Meaning", "Impact", "Diagnosis", "Mitigation")

#: The operator commands and their options, as specified while controller/cli.py was being written.
#: FALLBACK ONLY: a command the CLI has (a key of EXIT_CODES) is checked against the CLI itself, its
#: real options included; this list holds the runbook to the specification for a command not written
#: yet. Once every command is in EXIT_CODES it is not consulted (and may go).
_CLUSTER = {"--kubeconfig", "--context", "-n", "--namespace"}
_COMMAND = _CLUSTER | {"--by", "--wait"}
OPERATOR_COMMANDS: dict[str, set[str]] = {
    "status": _CLUSTER | {"--watch", "--timeout", "-o", "--output"},
    "pause": _COMMAND,
    "resume": _COMMAND,
    "approve": _COMMAND,
    "abort": _COMMAND,
    "retry": _COMMAND,
    "promote": _COMMAND | {"--full", "--yes"},
    "plan": set(),
    "validate": {"-o", "--output"},
}


_SERVICE_WORDS = ("svc", "service", "services")


def runbook_text() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


def anchors(text: str) -> set[str]:
    """Explicit ``<a id="...">`` anchors (one per line, before a heading)."""
    return set(re.findall(r'^<a id="([a-z0-9-]+)"></a>$', text, re.MULTILINE))


def sections(text: str) -> dict[str, str]:
    """Each ``## `` section's title -> its body (up to the next ``## `` heading)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # no headings in code
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def bash_lines(text: str) -> list[str]:
    """Every command line of every ```bash block, comments removed."""
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


def invocations(line: str) -> list[list[str]]:
    """The simple commands of a line (split at pipes and ``&&``/``;``), each as its words."""
    words = shlex.split(line, comments=True)
    commands: list[list[str]] = [[]]
    for word in words:
        if word in ("|", "||", "&&", ";"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def cli_calls(line: str) -> list[list[str]]:
    """The ``gateway-canary`` (or ``kubectl gateway-canary``) calls in a line: the words after it."""
    calls = []
    for words in invocations(line):
        if words[0] == "gateway-canary":
            calls.append(words[1:])
        elif words[:2] == ["kubectl", "gateway-canary"]:
            calls.append(words[2:])
    return calls


def test_every_alert_kind_has_its_section() -> None:
    assert set(RUNBOOK_ANCHORS) == set(AlertKind)  # no kind left without a link
    present = anchors(runbook_text())
    missing = {kind.value: anchor for kind, anchor in RUNBOOK_ANCHORS.items() if anchor not in present}
    assert not missing


@pytest.mark.parametrize("anchor", LEGACY_ANCHORS + SITUATION_ANCHORS)
def test_linked_and_situation_anchors_exist(anchor: str) -> None:
    assert anchor in anchors(runbook_text())


def test_anchors_sit_right_before_headings_and_every_link_resolves() -> None:
    text = runbook_text()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("<a id="):
            following = next(item for item in lines[index + 1 :] if not item.startswith("<a id="))
            assert following.startswith("## "), f"anchor {line} is not followed by a heading"
        if line.startswith("## "):
            assert index and lines[index - 1].startswith("<a id="), f"{line!r} has no anchor of its own"
    assert len(re.findall(r'^<a id="', text, re.MULTILINE)) == len(anchors(text))  # none repeated
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors(text), f"link to #{target} has no anchor"


def test_every_section_has_meaning_impact_diagnosis_mitigation() -> None:
    found = sections(runbook_text())
    assert found
    for title, body in found.items():
        positions = []
        for part in PARTS:
            hits = [m.start() for m in re.finditer(rf"^\*\*{part}\.\*\*", body, re.MULTILINE)]
            assert len(hits) == 1, f"section {title!r}: {len(hits)} '**{part}.**' parts"
            positions.append(hits[0])
        assert positions == sorted(positions), f"section {title!r}: parts out of order"


def cli_options() -> dict[str, set[str]]:
    """Each command of the CLI (the keys of EXIT_CODES) -> the options it takes, read from the CLI;
    the specification's list for a command the CLI does not have yet."""
    import typer.main

    from controller.cli import app

    commands = getattr(typer.main.get_command(app), "commands", {})  # a group (typer's own click)
    assert set(EXIT_CODES) <= set(commands)
    written = {
        name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}
        for name, command in commands.items()
        if name in EXIT_CODES
    }
    return {**OPERATOR_COMMANDS, **written}


def test_every_cli_command_exists_and_takes_its_options() -> None:
    known = cli_options()
    calls = [call for line in bash_lines(runbook_text()) for call in cli_calls(line)]
    used = {call[0] for call in calls if call}
    assert set(OPERATOR_COMMANDS) - {"validate"} <= used  # the runbook shows each operator command
    for call in calls:
        assert call and call[0] in known, f"gateway-canary {' '.join(call)}: no such command"
        options = {word.split("=", 1)[0] for word in call[1:] if word.startswith("-")}
        unknown = options - known[call[0]]
        assert not unknown, f"gateway-canary {' '.join(call)}: unknown option(s) {unknown}"


def test_operator_command_words_are_the_controllers() -> None:
    assert {"pause", "resume", "approve", "abort", "retry", "promote"} == {command.value for command in Command}


def test_commands_go_to_the_state_configmap_and_nothing_to_a_service() -> None:
    annotated = 0
    for line in bash_lines(runbook_text()):
        for words in invocations(line):
            if words[0] != "kubectl":
                continue
            targets_service = any(w in _SERVICE_WORDS or w.startswith(("svc/", "service/")) for w in words)
            assert not (targets_service and any("gateway-canary.io/" in w for w in words)), line
            if "annotate" not in words:
                continue
            annotated += 1
            at = words.index("annotate")
            kind, name = words[at + 1], words[at + 2]
            assert kind == "configmap" and name.startswith("gateway-canary-"), line
            keys = [w for w in words[at + 3 :] if not w.startswith("-")]
            assert keys, line
            for key in keys:
                word = key[:-1] if key.endswith("-") else key.split("=", 1)[0]
                assert word == COMMAND_ANNOTATION, line
                if "=" in key:
                    assert key.split("=", 1)[1] in {command.value for command in Command}, line
            assert words[words.index("-n") + 1] == "gateway-canary", line
    assert annotated >= len(Command)  # each command has its kubectl line


def test_every_cli_command_line_has_its_kubectl_equivalent() -> None:
    lines = bash_lines(runbook_text())
    for command in Command:
        cli = [line for line in lines if any(call[:1] == [command.value] for call in cli_calls(line))]
        kubectl = f"{COMMAND_ANNOTATION}={command.value}"
        assert cli, f"no gateway-canary {command.value} line"
        assert any(kubectl in line for line in lines), f"no kubectl line for {command.value}"
