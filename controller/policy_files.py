"""Reading policy files the way every command does: directories expanded, errors with file and line.

Shared by ``validate``, ``rbac``, ``preflight`` and ``migrate-config`` so that they agree on
which files are policies and on what is wrong with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from controller.core.loader import PolicyError, SourcedPolicy, check_conflicts, decode_policy_file, parse_policy_text

__all__ = ["policy_files", "read_policies"]


def policy_files(paths: Sequence[str]) -> list[Path]:
    """The YAML files named, or found in the directories named; FileNotFoundError names a bad path."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
            )
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{raw}: no such file or directory")
    return files


def read_policies(files: Sequence[Path]) -> tuple[list[SourcedPolicy], list[PolicyError], list[PolicyError]]:
    """Every valid policy in the files, every error (with file and line, conflicts included), warnings."""
    policies: list[SourcedPolicy] = []
    errors: list[PolicyError] = []
    warnings: list[PolicyError] = []
    for file in files:
        try:
            text = decode_policy_file(file.read_bytes(), str(file))
        except OSError as exc:
            text = PolicyError(str(file), 1, "", f"cannot read the file: {exc.strerror or exc}")
        if isinstance(text, PolicyError):
            errors.append(text)
            continue
        result = parse_policy_text(text, str(file))
        policies.extend(result.policies)
        errors.extend(result.errors)
        warnings.extend(result.warnings)
        if not result.policies and not result.errors:
            errors.append(PolicyError(str(file), 1, "", "no policy in this file (empty, or only comments)"))
    conflicts = check_conflicts(policies)
    return list(conflicts.policies), errors + list(conflicts.errors), warnings
