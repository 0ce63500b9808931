"""The README's settings table and commands stay true."""

from __future__ import annotations

from pathlib import Path

from controller.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [name for name in Settings.model_fields if f"`{name.upper()}" not in README]
    assert missing == []


def test_the_two_commands_exist() -> None:
    assert "bash scripts/demo.sh" in README and (ROOT / "scripts/demo.sh").exists()
    assert "bash scripts/test.sh" in README and (ROOT / "scripts/test.sh").exists()
    assert "scripts/test.sh" in (ROOT / ".ci/run").read_text()


def test_the_documented_role_is_what_the_rbac_command_prints(capsys) -> None:
    from controller.cli import main

    assert main(["rbac", str(ROOT / "policies" / "shop-ingress.yaml")]) == 0
    printed = capsys.readouterr().out
    assert printed.split("\n", 1)[1] in README  # the body, without the comment line naming the file
