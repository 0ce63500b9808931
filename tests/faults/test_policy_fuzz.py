"""Scenario 6 of the fault suite: fuzzed policy files never crash, and every rejection says file:line.

Beyond ``tests/test_policy_input.py`` (which mutates scalars of the parsed text in memory), the
documents here are near-valid policies written as FILES, byte for byte, and read the two ways the
controller reads them: ``read_policies`` (``gateway-canary validate``, ``rbac``, ``preflight``) and
the ``PolicyCatalog`` of ``gateway-canary run``. Mutations: fields dropped, retyped, renamed or
added; wrong enums, bad durations, huge numbers, deep nesting, templates and labels; then, on the
text, duplicate keys, tabs, non-UTF-8 bytes, a BOM, CRLF, NUL, truncation, YAML tags, anchors and
merge keys, several documents, and the same policy in two files.

Promises, per example: no exception escapes either reader; every error and warning is one line
``<file>:<line>: ...`` naming a file of the example and a line inside it; both readers accept the
same policies and report the same errors; a valid policy round-trips (dumped to YAML and read
again it is the same policy) and the controller can use it at once (queries, steps, fingerprint,
its alert text).
"""

from __future__ import annotations

import enum
import re
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from controller.core.alerts import build_alert
from controller.core.durations import format_promql_duration
from controller.core.enums import AlertKind, Severity
from controller.core.loader import PolicyError, SourcedPolicy, parse_policy_text
from controller.core.policy import CanaryPolicy
from controller.core.queries import queries_for
from controller.core.schedule import target_steps
from controller.policy_files import policy_files, read_policies
from controller.runtime.policy_source import PolicyCatalog
from tests.faults.report import LARGE, sized, tally

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "policies").glob("*.yaml"))]
FILE_NAMES = ("a.yaml", "b policy.yml", "c.yaml")
EXAMPLE_COUNT = sized(400, 10_000)

# --- values -----------------------------------------------------------------------------------------

DURATIONS = ["30s", "1h30m", "250ms", "1.5ms", "0s", "-1s", "1h30", "10y", "1e3s", "30 s", "P1D", "999999999d",
             "365d", "366d", "0.0001s", "", "5m5m", "1.2.3s"]  # fmt: skip
ENUM_NEAR_MISSES = ["hold", "rollback", "Hold", "ROLLBACK", "pause", "complementary", "target-only", "targetOnly",
                    "zero", "inconclusive", "slack", "webhook", "alertmanager", "dingtalk", "feishu", "wecom",
                    "teams", "Mon", "monday", "Sun", "", "null"]  # fmt: skip
TEMPLATES = ["{{ policy }}: {{ reason }}", "{{ policy }} {{ labels.env }}", "{{ nope }}", "{{", "}} {{ reason",
             "{{ reason | upper }}", "x" * 5000, "{{ weights_after }} \u202e", "line\nbreak {{ kind }}"]  # fmt: skip
ODD_TEXTS = ["http://", "https://hooks.example/x", "ftp://x", "http://[::1", "a/b", "ns/", "/name", "UPPER/Case",
             "a" * 300, "\x1b[31mred", "é/ü"]  # fmt: skip
HUGE = [10**30, -(10**30), 2**63, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 1e-320, 0, -1]

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(DURATIONS + ENUM_NEAR_MISSES),
    st.sampled_from(ODD_TEXTS),
)
CONTAINERS = st.one_of(
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=8), SCALARS, max_size=3),
    st.lists(st.integers(-5, 150), max_size=8),  # steps-like
)


TREE_MUTATIONS = ["drop", "retype", "rename", "add", "enum", "duration", "huge", "deep", "container", "dup item",
                  "template", "labels"]  # fmt: skip
TEXT_MUTATIONS = ["dup key", "tab", "tag", "comment", "indent", "merge", "alias", "long", "blank"]
BYTE_MUTATIONS = ["latin-1", "bom", "crlf", "nul", "truncate", "utf-16", "lone surrogate", "control"]
#: characters a paste or an editor can leave in a file: controls YAML refuses, and YAML's odd line breaks
CONTROLS = ["\x1f", "\x7f", "\x0b", "\x0c", "\x1b", "\x85", "\u2028", "\ufeff", "\x08"]


def nested(depth: int, leaf: Any) -> Any:
    for level in range(depth):
        leaf = [leaf] if level % 2 else {"a": leaf}
    return leaf


# --- the document tree --------------------------------------------------------------------------------

TreePath = tuple[Any, ...]


def paths(node: Any, prefix: TreePath = ()) -> list[TreePath]:
    """Every path to a value in the document (the root excluded)."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, (*prefix, index))
    return found


def parent(document: Any, path: TreePath) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


def renamed(key: Any, how: int) -> Any:
    """A typo of ``key``: case, snake_case, a plural, two letters swapped, a letter dropped."""
    if not isinstance(key, str) or len(key) < 2:
        return f"{key}x"
    variants = [
        key.upper(),
        re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key),
        key + "s",
        key[1] + key[0] + key[2:],
        key[:-1],
        key.capitalize(),
    ]
    return variants[how % len(variants)]


@st.composite
def mutated_document(draw: st.DrawFn) -> Any:
    """One shipped example with 0-4 mutations of its tree."""
    document = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(EXAMPLES))))
    for _ in range(draw(st.integers(0, 4))):
        found = paths(document)
        if not found:
            break
        path = draw(st.sampled_from(found))
        holder, last = parent(document, path), path[-1]
        action = draw(st.sampled_from(TREE_MUTATIONS))
        try:
            if action == "drop":
                del holder[last]
            elif action == "retype":
                holder[last] = draw(SCALARS)
            elif action == "rename" and isinstance(holder, dict):
                holder[renamed(last, draw(st.integers(0, 10)))] = holder.pop(last)
            elif action == "add" and isinstance(holder, dict):
                holder[draw(st.sampled_from(["extra", "note", "spec", "interval", "gates", "x-y"]))] = draw(SCALARS)
            elif action == "enum":
                holder[last] = draw(st.sampled_from(ENUM_NEAR_MISSES))
            elif action == "duration":
                holder[last] = draw(st.sampled_from(DURATIONS))
            elif action == "huge":
                holder[last] = draw(st.sampled_from(HUGE))
            elif action == "deep":
                holder[last] = nested(draw(st.integers(2, 45)), holder[last])
            elif action == "container":
                holder[last] = draw(CONTAINERS)
            elif action == "dup item" and isinstance(holder, list):
                holder.insert(last, holder[last])
            elif action == "template":
                document.setdefault("spec", {})["alertTemplate"] = draw(st.sampled_from(TEMPLATES))
            elif action == "labels":
                keys = st.sampled_from(["env", "region", "a.b/c", "Bad Key", ""])
                labels = draw(st.dictionaries(keys, st.one_of(st.text(max_size=12), SCALARS), max_size=3))
                document.setdefault("metadata", {})["labels"] = labels
        except (KeyError, IndexError, TypeError, AttributeError):
            pass  # the path went away with an earlier mutation
    return document


TAGS = ["!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14",
        "!custom x", "*nowhere", "&anchor 5", "!!float 1e400", "!!int 0x1F", "!!str"]  # fmt: skip
_KEY_LINE = re.compile(r"^(\s*)([A-Za-z][\w-]*):(.*)$")


@st.composite
def policy_file(draw: st.DrawFn) -> bytes:
    """The bytes of one file: 1-3 documents (mutated policies, now and then a scalar or a list), then
    0-3 mutations of the text or of the bytes."""
    documents = []
    for _ in range(draw(st.integers(1, 3))):
        document = draw(st.one_of(mutated_document(), mutated_document(), st.sampled_from([42, [1, 2], "text", None])))
        flow = draw(st.booleans())
        documents.append(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=flow))
    text = "---\n".join(documents)
    lines = text.splitlines()
    for _ in range(draw(st.integers(0, 3))):
        if not lines:
            break
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(TEXT_MUTATIONS))
        match = _KEY_LINE.match(lines[index])
        if action == "dup key" and match:
            lines.insert(index + 1, f"{match.group(1)}{match.group(2)}: {draw(SCALARS)!s}")
        elif action == "tab" and lines[index].startswith(" "):
            lines[index] = "\t" + lines[index].lstrip(" ")
        elif action == "tag" and match:
            lines[index] = f"{match.group(1)}{match.group(2)}: {draw(st.sampled_from(TAGS))}"
        elif action == "comment":
            lines[index] = "# " + lines[index]
        elif action == "indent":
            lines[index] = lines[index][1:] if lines[index].startswith(" ") else " " + lines[index]
        elif action == "merge" and match:
            lines.insert(index + 1, f"{match.group(1)}<<: {{a: 1}}")
        elif action == "alias" and match:
            lines[index] = f"{match.group(1)}{match.group(2)}: &x {match.group(3).strip() or '{}'}"
            lines.insert(index + 1, f"{match.group(1)}{match.group(2)}Copy: *x")
        elif action == "long":
            lines[index] += " " + "y" * draw(st.sampled_from([1000, 300_000]))
        elif action == "blank":
            lines.insert(index, "")
    data = ("\n".join(lines) + "\n").encode()
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(BYTE_MUTATIONS))
        at = draw(st.integers(0, len(data)))
        if action == "latin-1":
            data = data[:at] + "café".encode("latin-1") + data[at:]
        elif action == "bom":
            data = b"\xef\xbb\xbf" + data
        elif action == "crlf":
            data = data.replace(b"\n", b"\r\n")
        elif action == "nul":
            data = data[:at] + b"\x00" + data[at:]
        elif action == "truncate":
            data = data[:at]
        elif action == "utf-16":
            data = data.decode("utf-8", errors="replace").encode("utf-16")
        elif action == "lone surrogate":
            data = data[:at] + b"\xed\xa0\x80" + data[at:]
        elif action == "control":
            data = data[:at] + draw(st.sampled_from(CONTROLS)).encode() + data[at:]
    return data


@st.composite
def policy_directory(draw: st.DrawFn) -> dict[str, bytes]:
    """1-3 files; now and then the second one a copy of the first (the same policies twice)."""
    first = draw(policy_file())
    files = {FILE_NAMES[0]: first}
    for name in FILE_NAMES[1 : draw(st.integers(1, 3))]:
        files[name] = first if draw(st.booleans()) else draw(policy_file())
    return files


# --- the promises ---------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A dumped policy as YAML can hold it: secrets revealed, enums as their values."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, timedelta):
        return format_promql_duration(value)
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item) for item in value]
    return value


def dumped(policy: CanaryPolicy, *, exclude_unset: bool = False) -> Any:
    return plain(policy.model_dump(mode="python", by_alias=True, exclude_unset=exclude_unset))


#: what YAML counts as a line break (a lone CR too: ``grep -n`` and ``sed`` disagree there, editors do not)
LINE_BREAKS = re.compile("\r\n|\r|\n|\x85|\u2028|\u2029")


def located(problem: PolicyError, files: dict[Path, bytes]) -> str | None:
    """Why ``problem`` is not one line ``<file>:<line>: ...`` inside a file of the example, or None."""
    text = str(problem)
    path = Path(problem.file)
    if path not in files:
        return f"names a file not in the example: {text[:200]}"
    lines = len(LINE_BREAKS.split(files[path].decode("utf-8", errors="replace")))
    if "\n" in text or "\r" in text or not text.startswith(f"{problem.file}:{problem.line}: "):
        return f"not one line '<file>:<line>: ...': {text[:200]!r}"
    if not 1 <= problem.line <= lines:
        return f"line {problem.line} outside the file's {lines} lines: {text[:200]}"
    return None


def round_trip(item: SourcedPolicy) -> str | None:
    """Why the valid policy does not read back as itself from its own YAML, or None."""
    policy = item.policy
    text = yaml.safe_dump(dumped(policy, exclude_unset=True), sort_keys=False, allow_unicode=True)
    again = parse_policy_text(text, "round-trip.yaml")
    if again.errors or len(again.policies) != 1:
        return f"{item.file}:{item.line}: {policy.name} written back is rejected: {[str(e) for e in again.errors][:2]}"
    if dumped(again.policies[0].policy) != dumped(policy):
        return f"{item.file}:{item.line}: {policy.name} written back reads as another policy"
    return None


def usable(policy: CanaryPolicy) -> None:
    """What the controller does with a policy as soon as it loads it (raises if it cannot)."""
    queries = queries_for(policy)
    assert all(query.promql for plan in queries.values() for query in plan.all())
    assert target_steps(policy.spec.schedule)[-1] == 100
    policy.rollout_fingerprint()
    alert = build_alert(
        kind=AlertKind.ROLLED_BACK,
        severity=Severity.CRITICAL,
        policy=policy.name,
        reason="fuzz",
        at=datetime(2026, 1, 1, tzinfo=UTC),
        source_service=str(policy.spec.source.service),
        target_service=str(policy.spec.target.service),
        labels=policy.metadata.labels,
        template=policy.spec.alert_template,
    )
    alert.text()
    alert.body()


def violations_of(directory: Path, files: dict[Path, bytes]) -> tuple[list[str], int]:
    """The promises broken by one example's directory; and how many policies were valid."""
    found: list[str] = []
    try:
        policies, errors, warnings = read_policies(policy_files([str(directory)]))
    except Exception as exc:  # the promise under test: nothing escapes
        return [f"validate raised {type(exc).__name__}: {exc}"], 0
    try:
        snapshot = PolicyCatalog(directory).refresh()
    except Exception as exc:
        return [f"the run's catalog raised {type(exc).__name__}: {exc}"], 0
    assert snapshot is not None
    found += [f"{why}" for problem in (*errors, *warnings) if (why := located(problem, files))]
    found += [f"run: {why}" for problem in (*snapshot.errors, *snapshot.warnings) if (why := located(problem, files))]
    accepted = sorted(item.policy.name for item in policies)
    if accepted != sorted(snapshot.policies):
        found.append(f"validate accepts {accepted}, run accepts {sorted(snapshot.policies)}")
    empty = "no policy in this file"
    said = {str(e) for e in errors if empty not in e.message}
    if said != {str(e) for e in snapshot.errors}:
        found.append(f"validate and run disagree: {sorted(said ^ {str(e) for e in snapshot.errors})[:3]}")
    if not errors and not policies:
        found.append("neither a policy nor an error")
    for item in policies:
        if (why := round_trip(item)) is not None:
            found.append(why)
        try:
            usable(item.policy)
        except Exception as exc:
            found.append(f"{item.file}:{item.line}: valid, but {type(exc).__name__} when used: {exc}")
    return found, len(policies)


SCENARIO = tally(6, "Fuzzed policy files: no crash, every rejection file:line")


def test_fuzzed_policy_files_never_crash_and_every_rejection_names_file_and_line() -> None:
    """Every example is judged and tallied; the test fails at the end with the broken promises (a
    failing example is not shrunk: its violation says what it was, with the start of its file)."""
    broken: list[str] = []
    seen = {"files": 0, "valid": 0, "examples": 0}

    @settings(
        max_examples=EXAMPLE_COUNT,
        deadline=None,
        derandomize=not LARGE,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(example=policy_directory())
    def judge(example: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory(prefix="policy-fuzz-") as temporary:
            directory = Path(temporary)
            files = {directory / name: data for name, data in example.items()}
            for path, data in files.items():
                path.write_bytes(data)
            violations, valid = violations_of(directory, files)
        SCENARIO.run(violations)
        seen["examples"] += 1
        seen["files"] += len(files)
        seen["valid"] += valid
        if violations:
            start = {name: data[:160] for name, data in example.items()}
            broken.append(f"{violations[0][:300]} (example {seen['examples']}: {start})")

    judge()
    SCENARIO.figure("files", str(seen["files"]))
    SCENARIO.figure("valid policies among them", str(seen["valid"]))
    assert seen["examples"] >= EXAMPLE_COUNT
    assert not broken, f"{len(broken)} of {seen['examples']} examples broke a promise:\n" + "\n".join(broken[:10])


GOOD = """\
metadata: {name: good}
spec:
  source: {service: ns/old-gw}
  target: {service: ns/new-gw}
  schedule: {steps: [10, 100]}
  gates: {errorRate: {max: 0.05}}
"""


def test_a_control_character_in_one_file_is_its_located_error_and_the_other_files_still_load(
    tmp_path: Path,
) -> None:
    """What the fuzzing found first: a raw control character (here U+001F, a paste from a terminal)
    that YAML refuses to read. It must be that file's error, at its line, like any other."""
    (tmp_path / "a-good.yaml").write_text(GOOD)
    (tmp_path / "b-pasted.yaml").write_bytes(b"metadata: {name: pasted}\nkind: \x1f\n")
    files = {path: path.read_bytes() for path in tmp_path.iterdir()}
    violations, valid = violations_of(tmp_path, files)
    SCENARIO.run(violations)
    assert violations == [] and valid == 1
    _, errors, _ = read_policies(policy_files([str(tmp_path)]))
    assert [(Path(e.file).name, e.line) for e in errors] == [("b-pasted.yaml", 2)]
