"""Print (or, with --write, refresh) the field reference at the end of docs/policies.md.

Every field of ``controller.core.policy.CanaryPolicy``, found by walking the model (nested models,
lists of them and discriminated unions such as the alert receivers): its YAML path, its type as
the JSON Schema states it, its default as it would be written in YAML, and its description (the
``Field`` description and the docstring of the model or enum it holds). Then
``policies/shop-ingress.yaml`` verbatim as a complete example. tests/test_policy_reference.py
checks that docs/policies.md holds exactly this section, so it cannot drift from the model.

Every field must have a ``description=`` of its own (what it does, why, its unit): a field without
one makes the script print its YAML path on stderr and exit 1, with or without --write (nothing is
written then).
Usage: .venv/bin/python scripts/policy_reference.py [--write]
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from controller.core.policy import CanaryPolicy

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "policies.md"
EXAMPLE = ROOT / "policies" / "shop-ingress.yaml"
BEGIN, END = "<!-- policy-reference:start -->", "<!-- policy-reference:end -->"
HEADING = "## Every field"
COMMAND = ".venv/bin/python scripts/policy_reference.py --write"
REQUIRED = "required"


@dataclass(frozen=True)
class Row:
    """One field: its YAML path (``spec.alerts[].type``), type, default and description."""

    path: str
    type: str
    default: str
    description: str


# -- the walk ------------------------------------------------------------------------------------


def rows() -> list[Row]:
    """Every field of a policy, in model order, parents before their fields."""
    return _model_rows(CanaryPolicy, "", None)


def _model_rows(model: type[BaseModel], prefix: str, instance: BaseModel | None) -> list[Row]:
    found: list[Row] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        default: Any = getattr(instance, name) if instance is not None else _own_default(field)
        found.append(Row(path, _field_type(model, field, name), _default_text(default), _description(field)))
        found += _children(field.annotation, path, default)
    return found


def _children(annotation: Any, path: str, default: Any) -> list[Row]:
    """The rows of the model(s) a field holds: ``path.x`` for a model, ``path[].x`` for a list of them."""
    annotation = _strip(annotation)
    if _is_model(annotation):
        return _model_rows(annotation, f"{path}.", default if isinstance(default, BaseModel) else None)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        variants = [_strip(arg) for arg in typing.get_args(annotation) if _strip(arg) is not type(None)]
        models = [arg for arg in variants if _is_model(arg)]
        if len(models) > 1:
            return _union_rows(models, path)
        return [row for arg in variants for row in _children(arg, path, default)]
    if origin is list:
        (item,) = typing.get_args(annotation)
        return _children(item, f"{path}[]", None)
    return []  # a scalar, or a map whose keys are data (labels), not options


def _union_rows(models: list[type[BaseModel]], path: str) -> list[Row]:
    """A discriminated union (``type: slack`` ...): a field all variants share alike is one row;
    the discriminator lists the variants; a field that differs gets a row per variant."""
    per_variant = {model: {row.path: row for row in _model_rows(model, f"{path}.", None)} for model in models}
    tags = {model: _tag(model) for model in models}
    ordered: list[str] = []
    for by_path in per_variant.values():
        ordered += [key for key in by_path if key not in ordered]
    found: list[Row] = []
    discriminator = f"{path}.{_discriminator(models)}" if all(tags.values()) else None
    if discriminator is not None:
        meaning = " ".join(f"`{tags[model]}`: {_summary(model)}" for model in models)
        kinds = " or ".join(f"`{tags[model]}`" for model in models)
        found.append(Row(discriminator, kinds, REQUIRED, f"which kind of {_last(path)} this is. {meaning}"))
    for key in ordered:
        if key == discriminator:
            continue
        groups: dict[Row, list[type[BaseModel]]] = {}
        for model in models:
            if key in per_variant[model]:
                groups.setdefault(per_variant[model][key], []).append(model)
        for row, group in groups.items():
            only = ", ".join(f"`{tags[model]}`" for model in group)
            shared = len(group) == len(models)
            found.append(
                row if shared else Row(row.path, row.type, row.default, f"({only} only) {row.description}".strip())
            )
    return found


def _discriminator(models: list[type[BaseModel]]) -> str:
    """The alias of the Literal field every variant has (``type``)."""
    shared = set.intersection(*(set(_literal_fields(model)) for model in models))
    return sorted(shared)[0] if shared else ""


def _literal_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {
        field.alias or name: typing.get_args(field.annotation)[0]
        for name, field in model.model_fields.items()
        if typing.get_origin(field.annotation) is typing.Literal and len(typing.get_args(field.annotation)) == 1
    }


def _tag(model: type[BaseModel]) -> str:
    values = list(_literal_fields(model).values())
    return str(values[0]) if len(values) == 1 else ""


def _last(path: str) -> str:
    name = path.rsplit(".", 1)[-1].removesuffix("[]")
    return name.removesuffix("s") if name.endswith("s") else name


def _strip(annotation: Any) -> Any:
    """``Annotated[X, ...]`` is X."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _own_default(field: FieldInfo) -> Any:
    if field.is_required():
        return REQUIRED
    return field.get_default(call_default_factory=True)


# -- types, from the JSON Schema (what editors and `gateway-canary schema` show) --------------------


@cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True)


def _field_type(model: type[BaseModel], field: FieldInfo, name: str) -> str:
    schema = _schema(model)
    prop = schema.get("properties", {}).get(field.alias or name, {})
    return _type_text(prop, schema.get("$defs", {}))


def _type_text(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        return "object" if "properties" in target else _type_text(target, defs)
    if "const" in schema:
        return f"`{schema['const']}`"
    if "enum" in schema:
        return " or ".join(f"`{value}`" for value in schema["enum"])
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives:
        texts = [_type_text(alt, defs) for alt in alternatives if alt.get("type") != "null"]
        if "duration" in texts:  # a duration is a string like '5m' or a number of seconds
            return "duration"
        return " or ".join(dict.fromkeys(texts))
    kind = str(schema.get("type", ""))
    if kind == "array":
        item = _type_text(schema.get("items", {}), defs)
        return f"list of {item}" if item else "list"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of string to {_type_text(schema['additionalProperties'], defs)}"
    if kind in ("integer", "number"):
        return f"{kind}{_bounds(schema)}"
    if kind == "string":
        if "(ms|s|m|h|d)" in schema.get("pattern", ""):
            return "duration"
        return "string (a secret)" if schema.get("format") == "password" else "string"
    return kind


def _bounds(schema: dict[str, Any]) -> str:
    # ge/le/gt/lt: what pydantic writes for a constrained number inside ``X | None`` (not JSON Schema)
    low, high = _first(schema, "minimum", "ge"), _first(schema, "maximum", "le")
    if low is not None and high is not None:
        return f" {_number(low)}..{_number(high)}"
    limits = {
        ">": _first(schema, "exclusiveMinimum", "gt"),
        "≥": low,
        "<": _first(schema, "exclusiveMaximum", "lt"),
        "≤": high,
    }
    shown = [f"{sign} {_number(value)}" for sign, value in limits.items() if value is not None]
    return f" {', '.join(shown)}" if shown else ""


def _first(schema: dict[str, Any], *keys: str) -> Any:
    return next((schema[key] for key in keys if key in schema), None)


# -- defaults, as YAML -----------------------------------------------------------------------------


def _default_text(value: Any) -> str:
    return value if value == REQUIRED else _yaml(value)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        return duration_text(value)
    if isinstance(value, enum.Enum):
        return _yaml(value.value)
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, str):
        return value if yaml.safe_load(value) == value and value.strip() == value and value else json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(item) for item in value) + "]"
    if isinstance(value, BaseModel):
        return _yaml(_set_fields(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_yaml(item)}" for key, item in value.items()) + "}"
    return str(value)


def _set_fields(model: BaseModel) -> dict[str, Any]:
    """The fields that differ from the model's own defaults, by alias: what one would write."""
    found: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.is_required() or value != field.get_default(call_default_factory=True):
            found[field.alias or name] = value
    return found


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return str(value)


_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def duration_text(value: timedelta) -> str:
    """``timedelta(minutes=90)`` as ``1h30m``, the way policies write durations."""
    millis = round(value.total_seconds() * 1000)
    parts: list[str] = []
    for unit, size in _UNITS:
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


# -- descriptions -----------------------------------------------------------------------------------


def _description(field: FieldInfo) -> str:
    """The field's own description, then the docstring summary of the model or enum it holds."""
    held = [_summary(kind) for kind in _held_types(field.annotation)]
    parts = [field.description or "", *held]
    return " — ".join(dict.fromkeys(part for part in parts if part))


def _held_types(annotation: Any) -> list[type]:
    """The documented classes (models, enums) a field holds, directly or as ``X | None``."""
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel | enum.Enum):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if _strip(arg) is not type(None)]
        return _held_types(args[0]) if len(args) == 1 else []
    return []


def _summary(kind: type) -> str:
    """The first paragraph of a class's own docstring, on one line, in Markdown."""
    doc = kind.__dict__.get("__doc__")
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split()).replace("``", "`")


# -- the descriptions every field must have ----------------------------------------------------------


def undocumented() -> list[str]:
    """The YAML path of every field of the policy model without a ``description=`` of its own.

    Every variant of a union counts (each alert receiver's fields, its ``type`` included: editors
    show the JSON Schema's description), and so does a field whose cell borrows the docstring of the
    model it holds: that docstring says what the model is, not what the field is for.
    """
    return list(
        dict.fromkeys(path for path, field in _fields(CanaryPolicy, "") if not (field.description or "").strip())
    )


def _fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo]]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        yield path, field
        for nested, nested_prefix in _nested(field.annotation, path):
            yield from _fields(nested, nested_prefix)


def _nested(annotation: Any, path: str) -> list[tuple[type[BaseModel], str]]:
    """The models a field holds, with the prefix of their fields' paths."""
    annotation = _strip(annotation)
    if _is_model(annotation):
        return [(annotation, f"{path}.")]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [found for arg in typing.get_args(annotation) for found in _nested(arg, path)]
    if origin is list:
        (item,) = typing.get_args(annotation)
        return _nested(item, f"{path}[]")
    return []


# -- the document --------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table() -> str:
    out = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for row in rows():
        default = row.default if row.default == REQUIRED else f"`{_cell(row.default)}`"
        out.append(f"| `{row.path}` | {_cell(row.type)} | {default} | {_cell(row.description)} |")
    return "\n".join(out)


def section() -> str:
    """What goes between the markers."""
    example = EXAMPLE.read_text().rstrip("\n")
    return "\n".join(
        [
            f"<!-- generated from controller/core/policy.py by `{COMMAND}`; edit the model, not this -->",
            "",
            "Every key a policy file may hold, by its path in the YAML (`[]`: each item of a list). "
            "A default is what the controller uses when the key is left out; `required` is required "
            "whenever its parent is given; `null` is not set. Durations are written like `30s`, `5m`, "
            "`1h30m` (or a number of seconds). `gateway-canary schema` prints the same model as a JSON "
            "Schema for editors.",
            "",
            table(),
            "",
            f"### A complete example: `{EXAMPLE.relative_to(ROOT)}`",
            "",
            "```yaml",
            example,
            "```",
        ]
    )


def refreshed(text: str) -> str:
    """``text`` (docs/policies.md) with the generated section replaced, or appended when absent."""
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{BEGIN}\n{END}\n"
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + section() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    missing = undocumented()
    if missing:
        print(
            f"{len(missing)} policy field(s) without a description: add description= to their Field(...) in "
            "controller/core/policy.py (or receivers.py), saying what the field does, why, and its unit:",
            file=sys.stderr,
        )
        for path in missing:
            print(f"  {path}", file=sys.stderr)
        return 1
    if "--write" in args:
        DOC.write_text(refreshed(DOC.read_text()))
    else:
        print(section())
    return 0


if __name__ == "__main__":
    sys.exit(main())
