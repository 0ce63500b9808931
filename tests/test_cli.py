"""The command line: --help everywhere, usage errors exit 2, ``validate -o``, colour on a terminal only,
the kubectl plugin entry point, and the shared cluster options and output formats."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from rich.table import Table
from typer.testing import CliRunner

from controller.cli import (
    EXIT_CODES,
    ContextOption,
    KubeconfigOption,
    KubeOptions,
    NamespaceOption,
    OutputFormat,
    emit,
    kubectl_plugin,
    main,
)
from controller.policy_files import policy_files, read_policies
from tests.test_policies import BROKEN

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ESC = "\x1b["

OPTIONS = {
    "run": ["--policies", "--dry-run"],
    "demo": ["--speed", "--verbose", "--scenario"],
    "validate": ["PATH", "--output", "-o"],
    "schema": [],
    "rbac": ["PATH", "--service-account", "--state-namespace"],
    "preflight": ["PATH"],
    "migrate-config": ["PATH"],
}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env
    )


def plain_env(**extra: str) -> dict[str, str]:
    """The environment without anything that forces or forbids colour, plus ``extra``."""
    forcing = ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE")
    env = {key: value for key, value in os.environ.items() if key not in forcing}
    return {**env, "TERM": "xterm-256color", "COLUMNS": "200", **extra}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_command_has_help_naming_its_options_and_exit_codes(command: str, flag: str, capsys) -> None:
    assert main([command, flag]) == 0
    out = capsys.readouterr().out
    assert f"gateway-canary {command}" in out
    for option in OPTIONS[command]:
        assert option in out, option
    assert "Exit codes:" in out
    for code in EXIT_CODES[command]:
        assert f" {code}  " in out


def test_the_top_level_help_lists_every_command_and_completion(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in OPTIONS:
        assert command in out
    assert "--install-completion" in out and "--show-completion" in out and "--version" in out


def test_every_command_has_its_exit_codes_and_each_names_the_usage_error() -> None:
    from controller.cli import app

    assert set(EXIT_CODES) == {command.name for command in app.registered_commands} >= set(OPTIONS)
    for command, codes in EXIT_CODES.items():
        assert 0 in codes and "usage error" in codes[2], command


def test_the_demo_scenarios_are_the_demos() -> None:
    from controller.cli import DemoScenario
    from controller.demo import SCENARIOS

    assert [scenario.value for scenario in DemoScenario] == list(SCENARIOS)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "Usage: gateway-canary"),  # no command
        (("bogus",), "No such command"),
        (("validate",), "Missing argument"),
        (("validate", "policies", "-o", "xml"), "'xml' is not one of"),
        (("demo", "--scenario", "nope"), "'nope' is not one of"),
        (("demo", "--speed", "fast"), "--speed"),
        (("rbac", "policies", "--no-such-option"), "No such option"),
    ],
)
def test_usage_errors_exit_2_with_the_usage_on_stderr_and_no_traceback(args: tuple[str, ...], needle: str) -> None:
    result = cli(*args, env=plain_env())
    assert result.returncode == 2, result
    assert needle in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_main_returns_the_exit_code_instead_of_raising(capsys) -> None:
    assert main(["validate"]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("gateway-canary ")
    assert main(["validate", str(ROOT / "no-such-dir")]) == 2


def test_validate_json_round_trips_the_shipped_policies() -> None:
    result = cli("validate", "policies/", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    files = policy_files(["policies/"])
    policies, _, warnings = read_policies(files)
    assert report == {
        "files": [str(file) for file in files],
        "policies": [{"file": item.file, "line": item.line, "name": item.policy.name} for item in policies],
        "errors": [],
        "warnings": [{"file": w.file, "line": w.line, "field": w.field, "message": w.message} for w in warnings],
    }
    assert {policy["name"] for policy in report["policies"]} == {"shop-ingress", "api-ingress"}
    assert result.stdout == json.dumps(report, indent=2, sort_keys=True) + "\n"
    as_yaml = cli("validate", "policies/", "-o", "yaml")
    assert as_yaml.returncode == 0 and yaml.safe_load(as_yaml.stdout) == report


def test_validate_json_locates_each_error_by_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN)
    result = cli("validate", str(bad), "policies/", "-o", "json")
    assert result.returncode == 1
    assert result.stderr == ""  # the problems are in the data
    report = json.loads(result.stdout)
    assert report["files"][0] == str(bad) and len(report["files"]) == 3
    assert len(report["policies"]) == 2  # the good files still load beside the bad one
    assert {
        "file": str(bad),
        "line": 9,
        "field": "spec.schedule.steps",
        "message": "steps must be strictly increasing: 10 is followed by 5",
    } in report["errors"]
    by_field = {error["field"]: error for error in report["errors"]}
    assert by_field["spec.alerts[0]"]["line"] == 16
    assert by_field["spec.gates.errorRate.max"]["line"] == 14
    assert all(error["file"] == str(bad) for error in report["errors"])


def test_validate_json_on_an_empty_directory_is_1_and_a_missing_path_2(tmp_path: Path) -> None:
    empty = cli("validate", str(tmp_path), "-o", "json")
    assert empty.returncode == 1
    assert json.loads(empty.stdout) == {"files": [], "policies": [], "errors": [], "warnings": []}
    missing = cli("validate", str(tmp_path / "nope"), "-o", "json")
    assert missing.returncode == 2 and missing.stdout == ""
    assert "no such file or directory" in missing.stderr


def test_validate_table_names_the_policies_and_the_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN)
    result = cli("validate", str(bad), "policies/", "-o", "table", env=plain_env())
    assert result.returncode == 1
    assert "shop-ingress" in result.stdout and "spec.schedule.steps" in result.stdout
    assert "2 valid, 5 error(s) in 3 file(s)" in result.stdout


def test_the_kubectl_plugin_is_installed_and_names_itself() -> None:
    plugin = BIN / "kubectl-gateway_canary"
    assert plugin.exists(), "pip install -e . installs the kubectl-gateway_canary console script"
    result = subprocess.run([str(plugin), "--help"], capture_output=True, text=True, timeout=60, env=plain_env())
    assert result.returncode == 0, result.stderr
    assert "Usage: kubectl gateway-canary" in result.stdout
    assert "--install-completion" not in result.stdout  # a script for "kubectl gateway-canary" would not work
    wrong = subprocess.run([str(plugin), "validate"], capture_output=True, text=True, timeout=60, env=plain_env())
    assert wrong.returncode == 2 and "kubectl gateway-canary validate" in wrong.stderr
    validated = subprocess.run([str(plugin), "validate", "policies/"], capture_output=True, text=True, cwd=ROOT)
    assert validated.returncode == 0 and "2 valid, 0 error(s)" in validated.stdout


def test_the_kubectl_plugin_function_is_the_same_commands(capsys) -> None:
    assert kubectl_plugin(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "gateway-canary CanaryPolicy"


@pytest.mark.parametrize(
    "args", [("--help",), ("validate", "--help"), ("validate", "policies/", "-o", "table"), ("validate",)]
)
def test_no_escape_codes_when_not_a_terminal(args: tuple[str, ...]) -> None:
    result = cli(*args, env=plain_env())
    assert result.stdout + result.stderr
    assert ESC not in result.stdout and ESC not in result.stderr


def on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """What the command writes when its stdout and stderr are a terminal (a pseudo-terminal)."""
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "controller", *args],
            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, cwd=ROOT, env=env, timeout=60,
        )  # fmt: skip
    finally:
        os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert result.returncode == 0
    return b"".join(chunks).decode()


def test_colour_on_a_terminal_unless_no_color() -> None:
    coloured = on_a_terminal("validate", "policies/", "-o", "table", env=plain_env())
    assert ESC in coloured and "shop-ingress" in coloured
    plain = on_a_terminal("validate", "policies/", "-o", "table", env=plain_env(NO_COLOR="1"))
    assert ESC not in plain and "shop-ingress" in plain


def test_emit_prints_json_yaml_and_tables(capsys) -> None:
    data = {"b": [1, 2], "a": {"z": None, "y": "x"}}

    def table(value: dict[str, object]) -> Table:
        rows = Table("key")
        for key in value:
            rows.add_row(key)
        return rows

    emit(data, OutputFormat.JSON, table)
    assert capsys.readouterr().out == json.dumps(data, indent=2, sort_keys=True) + "\n"
    emit(data, OutputFormat.YAML, table)
    assert capsys.readouterr().out == yaml.safe_dump(data)
    emit(data, OutputFormat.TABLE, table)
    out = capsys.readouterr().out
    assert "key" in out and "a" in out and ESC not in out


kube_app = typer.Typer()
seen: list[KubeOptions] = []


@kube_app.command()
def _status(
    kubeconfig: KubeconfigOption = None, context: ContextOption = None, namespace: NamespaceOption = None
) -> None:
    seen.append(KubeOptions(kubeconfig=kubeconfig, context=context, namespace=namespace))


def test_the_cluster_options_make_kube_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_CANARY_NAMESPACE", raising=False)
    runner = CliRunner()
    seen.clear()
    assert runner.invoke(kube_app, ["--kubeconfig", "/k", "--context", "prod", "-n", "ops"]).exit_code == 0
    assert runner.invoke(kube_app, []).exit_code == 0
    assert runner.invoke(kube_app, [], env={"GATEWAY_CANARY_NAMESPACE": "from-env"}).exit_code == 0
    assert runner.invoke(kube_app, ["--namespace", "flag"], env={"GATEWAY_CANARY_NAMESPACE": "env"}).exit_code == 0
    assert seen == [
        KubeOptions("/k", "prod", "ops"),
        KubeOptions(None, None, None),
        KubeOptions(None, None, "from-env"),
        KubeOptions(None, None, "flag"),
    ]
    assert seen[1].resolved_namespace("from-context") == "from-context"
    assert seen[1].resolved_namespace(None) == "gateway-canary"
    assert seen[2].resolved_namespace("from-context") == "from-env"
    helped = runner.invoke(kube_app, ["--help"], env={"COLUMNS": "200"})
    assert all(option in helped.output for option in ("--kubeconfig", "--context", "--namespace", "-n", "Cluster"))
