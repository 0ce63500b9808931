"""docs/policies.md's field reference is generated from the model (scripts/policy_reference.py), and
is checked here against the docs, the JSON Schema and the example policies, so none can drift."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from controller.core.durations import parse_duration
from controller.core.loader import parse_policy_text
from controller.core.policy import CanaryPolicy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "policies").glob("*.yaml"))


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("policy_reference", ROOT / "scripts" / "policy_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_docs_policies_md_holds_the_generated_reference(reference: ModuleType) -> None:
    text = (ROOT / "docs" / "policies.md").read_text()
    assert reference.BEGIN in text and reference.END in text, f"no reference markers: run {reference.COMMAND}"
    between = text[text.index(reference.BEGIN) + len(reference.BEGIN) : text.index(reference.END)]
    assert between.strip() == reference.section().strip(), (
        f"docs/policies.md is out of date with controller/core/policy.py: run {reference.COMMAND}"
    )
    assert text.index(reference.HEADING) < text.index(reference.BEGIN)


def _schema_paths(schema: dict[str, Any], defs: dict[str, Any], path: str) -> Iterator[str]:
    """Every key path the JSON Schema allows; a map's keys are data, not fields."""
    if "$ref" in schema:
        yield from _schema_paths(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, path)
    for alternative in schema.get("anyOf", []) + schema.get("oneOf", []):
        yield from _schema_paths(alternative, defs, path)
    if "items" in schema:
        yield from _schema_paths(schema["items"], defs, f"{path}[]")
    for key, value in schema.get("properties", {}).items():
        child = f"{path}.{key}" if path else key
        yield child
        yield from _schema_paths(value, defs, child)


def test_every_documented_field_is_in_the_json_schema_and_back(reference: ModuleType) -> None:
    schema = CanaryPolicy.model_json_schema(by_alias=True)
    in_schema = set(_schema_paths(schema, schema.get("$defs", {}), ""))
    documented = {row.path for row in reference.rows()}
    assert documented - in_schema == set(), "documented but not in `gateway-canary schema`"
    assert in_schema - documented == set(), "in the schema but not documented"


def test_every_row_has_a_type_and_a_default_that_parses(reference: ModuleType) -> None:
    for row in reference.rows():
        assert row.type, row.path
        if row.default == reference.REQUIRED:
            continue
        value = yaml.safe_load(row.default)
        if row.type == "duration" and value is not None:
            assert reference.duration_text(parse_duration(value)) == row.default, row.path
    rows = {row.path: row for row in reference.rows()}
    # defaults come from the parent's default where it has one, not from the nested model's own
    assert rows["spec.analysis.onTrafficDeficit.action"].default == "rollback"
    assert rows["spec.analysis.onMissingData.action"].default == "hold"
    assert rows["spec.schedule.bakeTime"].default == "5m"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_policy_validates_and_uses_documented_fields(reference: ModuleType, path: Path) -> None:
    result = parse_policy_text(path.read_text(), str(path))
    assert result.errors == (), "\n".join(map(str, result.errors))
    assert result.policies
    types = {row.path: row.type for row in reference.rows()}

    def undocumented(node: Any, prefix: str) -> Iterator[str]:
        if isinstance(node, list):
            for item in node:
                yield from undocumented(item, f"{prefix}[]")
        elif isinstance(node, dict) and not types.get(prefix, "").startswith("map"):
            for key, value in node.items():
                child = f"{prefix}.{key}" if prefix else str(key)
                if child not in types:
                    yield child
                yield from undocumented(value, child)

    for document in yaml.safe_load_all(path.read_text()):
        assert list(undocumented(document, "")) == []


def test_write_appends_the_section_once_and_leaves_the_rest(reference: ModuleType) -> None:
    written = reference.refreshed("# Policies\n\nhand-written text\n")
    assert written.startswith("# Policies\n\nhand-written text\n\n## Every field\n\n<!-- policy-reference:start -->")
    assert reference.refreshed(written) == written
    assert reference.section() in written


def test_every_field_has_a_description_of_its_own(reference: ModuleType) -> None:
    assert reference.undocumented() == [], f"add description= to these fields, then run {reference.COMMAND}"
    assert [row.path for row in reference.rows() if not row.description.strip()] == []


def test_the_script_fails_naming_each_field_without_a_description(
    reference: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from typing import Literal

    from pydantic import BaseModel, Field

    class Receiver(BaseModel):
        type: Literal["hook"]
        url: str = Field(description="where to post")

    class Inner(BaseModel):
        bake_time: int = Field(default=5, alias="bakeTime")  # no description
        steps: list[int] = Field(default_factory=list, description="the weights")

    class Policy(BaseModel):
        inner: Inner = Field(description="the inner part")
        alerts: list[Receiver | None] = Field(default_factory=list)  # no description

    doc = tmp_path / "policies.md"
    doc.write_text("# Policies\n")
    monkeypatch.setattr(reference, "CanaryPolicy", Policy)
    monkeypatch.setattr(reference, "DOC", doc)
    assert reference.undocumented() == ["inner.bakeTime", "alerts", "alerts[].type"]
    assert reference.main(["--write"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "3 policy field(s) without a description" in captured.err
    for path in ("inner.bakeTime", "alerts", "alerts[].type"):
        assert f"  {path}\n" in captured.err
    assert doc.read_text() == "# Policies\n", "nothing is written while a field lacks a description"


def test_every_alert_template_field_is_documented() -> None:
    from controller.core.templates import TEMPLATE_FIELDS

    text = (ROOT / "docs" / "policies.md").read_text()
    missing = [name for name in TEMPLATE_FIELDS if f"`{name}`" not in text]
    assert not missing, f"docs/policies.md does not name the template fields {missing}"


def test_the_documented_template_example_loads() -> None:
    import yaml

    from controller.core.policy import CanaryPolicy

    text = (ROOT / "docs" / "policies.md").read_text()
    example = text.split("## Alert text and receivers")[1].split("```yaml\n")[1].split("```")[0]
    shop = yaml.safe_load((ROOT / "policies" / "shop-ingress.yaml").read_text())
    given = yaml.safe_load(example)
    shop["metadata"]["labels"] = given["metadata"]["labels"]
    shop["spec"]["alertTemplate"] = given["spec"]["alertTemplate"]
    assert CanaryPolicy.model_validate(shop).spec.alert_template == given["spec"]["alertTemplate"]
