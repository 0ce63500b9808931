"""Turning policy YAML text into validated policies, with errors as ``file:line: field: message``.

Parsing is separated from reading files so it stays pure; ``load_directory`` in the runtime reads
the files and hands their text here. One bad document never hides the others: every document is
validated on its own and the good ones are returned beside the errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from controller.core.policy import CanaryPolicy, Receiver

__all__ = [
    "MAX_ALIASES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "LoadResult",
    "PolicyError",
    "SourcedPolicy",
    "check_conflicts",
    "decode_policy_file",
    "parse_policy_text",
]

_Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class PolicyError:
    """One problem in one file, located as precisely as the YAML allows."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        # One line, always: a message that spans lines would lose its file:line in a log or terminal.
        where = f"{self.field}: " if self.field else ""
        return " ".join(f"{self.file}:{self.line}: {where}{self.message}".split())


@dataclass(frozen=True, slots=True)
class SourcedPolicy:
    """A valid policy and where it was written."""

    policy: CanaryPolicy
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a file (or a directory) yielded: the good policies, the errors, and warnings.

    A warning does not stop a policy (it is valid) but points at what is likely a mistake.
    """

    policies: tuple[SourcedPolicy, ...]
    errors: tuple[PolicyError, ...]
    warnings: tuple[PolicyError, ...] = ()


#: Limits on what a policy file may be; hostile or broken input is rejected for that file alone,
#: in well under a second and bounded memory (billion laughs, recursion, huge files).
MAX_FILE_BYTES = 256 * 1024
MAX_ALIASES = 20  # *references in a file; policies rarely need one
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_NODES = 20_000  # values after aliases are expanded


class _Limit(yaml.MarkedYAMLError):
    """A file beyond the limits above."""


class _LineLoader(yaml.SafeLoader):
    """A safe loader that also records the line of every mapping key and sequence item,
    and counts aliases as it composes (a recursive or fanned-out alias is refused, not expanded)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _Limit(None, None, f"more than {MAX_ALIASES} aliases (*references)", event.start_mark)
        node: yaml.Node | None = super().compose_node(parent, index)
        return node


class _Budget:
    """Nodes left to build; aliases can make a small file expand to an enormous one."""

    def __init__(self) -> None:
        self.left = MAX_NODES

    def spend(self, node: yaml.Node, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise _Limit(None, None, f"expands to more than {MAX_NODES} values (aliases?)", node.start_mark)
        if depth > MAX_DEPTH:
            raise _Limit(None, None, f"nested deeper than {MAX_DEPTH} levels (a recursive alias?)", node.start_mark)


def _construct_with_lines(
    loader: _LineLoader, node: yaml.Node, path: _Path, lines: dict[_Path, int], budget: _Budget
) -> Any:
    """Build plain Python data from a node, recording where each key and item stood.

    Duplicate keys are an error naming both lines: YAML lets the second silently win, which turned
    ``bakeTime: 10m`` followed by ``bakeTime: 0s`` into no bake at all.
    """
    budget.spend(node, len(path))
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            budget.spend(key_node, len(path) + 1)
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key == "<<":
                raise _Limit(None, None, "merge keys (<<) are not supported in policies", key_node.start_mark)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise _Limit(None, None, "a key must be a plain word", key_node.start_mark)
            if key in first_line:
                raise _Limit(
                    None,
                    None,
                    f"duplicate key {str(key)[:40]!r} (lines {first_line[key]} and {line}); the second would "
                    "silently replace the first",
                    key_node.start_mark,
                )
            first_line[key] = line
            child = (*path, str(key))
            lines[child] = line
            result[key] = _construct_with_lines(loader, value_node, child, lines, budget)
            lines[child] = line
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct_with_lines(loader, item, (*path, index), lines, budget) for index, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


def decode_policy_file(data: bytes, file: str) -> str | PolicyError:
    """A policy file's text, or why it is not one (too large, not UTF-8 text)."""
    if len(data) > MAX_FILE_BYTES:
        return PolicyError(file, 1, "", f"the file is {len(data)} bytes; a policy file may have {MAX_FILE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return PolicyError(file, line, "", f"not UTF-8 text (byte {exc.start}); save the file as UTF-8")
    if "\x00" in text:
        return PolicyError(file, text[: text.index("\x00")].count("\n") + 1, "", "a NUL byte: this is not a text file")
    return text


def _yaml_error(exc: yaml.YAMLError, file: str, text: str = "") -> PolicyError:
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow, with its index
        line = text[: exc.position].count("\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        return PolicyError(
            file, line, "", f"a control character (U+{code:04X}) YAML does not allow in a file: remove it"
        )
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        prefix = "" if isinstance(exc, _Limit) else "not valid YAML: "
        return PolicyError(file, line, "", f"{prefix}{exc.problem or exc}")
    return PolicyError(file, 1, "", f"not valid YAML: {exc}")


def parse_policy_text(text: str, file: str) -> LoadResult:
    """Validate every YAML document of one file. Never raises; every problem has a line."""
    if len(text) > MAX_FILE_BYTES:
        return LoadResult((), (PolicyError(file, 1, "", f"the file is larger than {MAX_FILE_BYTES} bytes"),))
    nodes: list[yaml.Node] = []
    try:
        loader = _LineLoader(text)  # (it checks the whole text for unprintable characters at once)
    except yaml.YAMLError as exc:
        return LoadResult((), (_yaml_error(exc, file, text),))
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                nodes.append(node)
    except yaml.YAMLError as exc:
        return LoadResult((), (_yaml_error(exc, file, text),))
    except RecursionError:
        return LoadResult((), (PolicyError(file, 1, "", f"nested deeper than {MAX_DEPTH} levels"),))
    finally:
        loader.dispose()
    policies: list[SourcedPolicy] = []
    errors: list[PolicyError] = []
    warnings: list[PolicyError] = []
    builder = _LineLoader("")
    for node in nodes:
        lines: dict[_Path, int] = {}
        try:
            data = _construct_with_lines(builder, node, (), lines, _Budget())
        except yaml.YAMLError as exc:
            errors.append(_yaml_error(exc, file))
            continue
        except RecursionError:
            errors.append(PolicyError(file, node.start_mark.line + 1, "", f"nested deeper than {MAX_DEPTH} levels"))
            continue
        doc_line = node.start_mark.line + 1
        if data is None:
            continue
        if not isinstance(data, dict):
            errors.append(
                PolicyError(
                    file,
                    doc_line,
                    "",
                    "a policy document must be a mapping (apiVersion, kind, metadata, spec)",
                )
            )
            continue
        try:
            policy = CanaryPolicy.model_validate(data)
        except ValidationError as exc:
            errors.extend(_located(exc, file, lines, doc_line))
            continue
        policies.append(SourcedPolicy(policy, file, doc_line))
        warnings.extend(_likely_mistakes(policy, file, lines, doc_line))
    return LoadResult(tuple(policies), tuple(errors), tuple(warnings))


def _likely_mistakes(policy: CanaryPolicy, file: str, lines: dict[_Path, int], doc_line: int) -> list[PolicyError]:
    """Valid, but probably not meant.

    ``sum(...)`` over series that may not exist yet (resets, a response flag) is an EMPTY vector,
    not 0, on a healthy gateway: "no data", which holds a healthy rollout. Say which it means.
    """
    found: list[PolicyError] = []
    for index, gate in enumerate(policy.spec.gates.custom):
        query = " ".join(gate.query.split())
        if "sum(" in query and "or vector(0)" not in query and "on_empty" not in gate.model_fields_set:
            path: _Path = ("spec", "gates", "custom", index, "query")
            found.append(
                PolicyError(
                    file,
                    _nearest_line(path, lines, doc_line),
                    f"spec.gates.custom[{index}].query",
                    "warning: sum(...) is an empty answer (no data, which holds the rollout) when no series "
                    "match, e.g. no resets on a healthy gateway; add `or vector(0)` to the query or set "
                    "onEmpty: zero (or onEmpty: inconclusive if no series really means no data)",
                )
            )
    return found


def _located(exc: ValidationError, file: str, lines: dict[_Path, int], doc_line: int) -> list[PolicyError]:
    found: list[PolicyError] = []
    for error in exc.errors(include_url=False):
        loc = _strip_union_tags(error["loc"])
        line = _nearest_line(loc, lines, doc_line)
        field = ".".join(str(part) if isinstance(part, str) else f"[{part}]" for part in loc).replace(".[", "[")
        found.append(PolicyError(file, line, field, _explain(error, loc)))
    return found


#: the receiver types, as the policy's discriminated union names them
_RECEIVER_TYPES = tuple(get_args(model.model_fields["type"].annotation)[0] for model in get_args(get_args(Receiver)[0]))


def _strip_union_tags(loc: Sequence[str | int]) -> _Path:
    """Drop pydantic's discriminator tags (``slack``) and validator names from error paths."""
    kept: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and (part in _RECEIVER_TYPES or "[" in part):
            continue
        kept.append(part)
    return tuple(kept)


def _nearest_line(loc: _Path, lines: dict[_Path, int], default: int) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return default


def _explain(error: Any, loc: _Path) -> str:
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        return f"unknown field{hint}"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return f"unknown receiver type; allowed: {', '.join(_RECEIVER_TYPES)}"
    if kind == "union_tag_not_found":
        return f"a receiver needs a type: {', '.join(_RECEIVER_TYPES)}"
    return message


def _allowed_fields(path: Iterable[str | int]) -> list[str]:
    """The YAML keys valid at ``path``, found by walking the model along it."""
    model: Any = CanaryPolicy
    for part in path:
        if isinstance(part, int):
            continue
        field = _field_by_alias(model, part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return sorted(info.alias or name for name, info in model.model_fields.items())


def _field_by_alias(model: type[BaseModel], alias: str) -> Any:
    for name, info in model.model_fields.items():
        if (info.alias or name) == alias:
            return info
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def check_conflicts(policies: Sequence[SourcedPolicy]) -> LoadResult:
    """Keep the first policy for each name and each Service; report the later ones.

    Two policies writing the same Service's weight would fight; the one listed first (already
    running, or earlier in file order) wins and the other is reported with both locations.
    """
    kept: list[SourcedPolicy] = []
    errors: list[PolicyError] = []
    owners: dict[str, SourcedPolicy] = {}
    names: dict[str, SourcedPolicy] = {}
    for item in policies:
        name = item.policy.name
        if name in names:
            first = names[name]
            errors.append(
                PolicyError(
                    item.file,
                    item.line,
                    "metadata.name",
                    f"policy name {name!r} is already used at {first.file}:{first.line}",
                )
            )
            continue
        services = [str(item.policy.spec.source.service), str(item.policy.spec.target.service)]
        clash = next((s for s in services if s in owners), None)
        if clash is not None:
            other = owners[clash]
            errors.append(
                PolicyError(
                    item.file,
                    item.line,
                    "spec",
                    f"Service {clash} is already managed by policy {other.policy.name!r} "
                    f"({other.file}:{other.line}); one Service, one policy",
                )
            )
            continue
        kept.append(item)
        names[name] = item
        for service in services:
            owners[service] = item
    return LoadResult(tuple(kept), tuple(errors))
