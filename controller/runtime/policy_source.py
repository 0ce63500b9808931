"""Reading the policies directory, tolerating edits, mistakes and ConfigMap symlink swaps.

Kubernetes updates a mounted ConfigMap by swapping a ``..data`` symlink, which file-event
watchers often miss; so the directory is re-read on a timer and the *contents* compared. A file
that turns bad keeps its last good policies running (reported, not dropped): an on-call typo
must never stop the rollback protection of a live migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.core.loader import PolicyError, SourcedPolicy, check_conflicts, decode_policy_file, parse_policy_text

__all__ = ["PolicyCatalog", "PolicySnapshot", "read_policy_texts"]


def read_policy_texts(directory: Path) -> dict[str, str | PolicyError]:
    """``*.yaml``/``*.yml`` files (through symlinks), hidden entries such as ``..data`` skipped.

    A file that cannot be read, is too large or is not UTF-8 text is its error, located.
    """
    texts: dict[str, str | PolicyError] = {}
    if not directory.is_dir():
        return texts
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        try:
            texts[str(path)] = decode_policy_file(path.read_bytes(), str(path))
        except OSError as exc:
            texts[str(path)] = PolicyError(str(path), 1, "", f"cannot read the file: {exc.strerror or exc}")
    return texts


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """The policies that should run now and what is wrong in the directory."""

    policies: dict[str, SourcedPolicy]
    errors: tuple[PolicyError, ...]
    warnings: tuple[PolicyError, ...] = ()


class PolicyCatalog:
    """Remembers the last good policies of every file across reloads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._texts: dict[str, str | PolicyError] | None = None
        self._good: dict[str, tuple[SourcedPolicy, ...]] = {}
        self._running: dict[str, SourcedPolicy] = {}

    def invalidate(self) -> None:
        """Forget what was read, so the next refresh reports the directory again (after a failed reload)."""
        self._texts = None

    def refresh(self) -> PolicySnapshot | None:
        """Re-read the directory; None when no file's contents changed since the last call."""
        texts = read_policy_texts(self.directory)
        if texts == self._texts:
            return None
        errors: list[PolicyError] = []
        warnings: list[PolicyError] = []
        if not self.directory.is_dir():
            errors.append(PolicyError(str(self.directory), 0, "", "policies directory does not exist"))
        good: dict[str, tuple[SourcedPolicy, ...]] = {}
        for file, text in texts.items():
            if isinstance(text, PolicyError):
                result_policies: tuple[SourcedPolicy, ...] = ()
                errors.append(text)
            else:
                result = parse_policy_text(text, file)
                result_policies = result.policies
                errors.extend(result.errors)
                warnings.extend(result.warnings)
                if not result.policies and not result.errors:
                    warnings.append(PolicyError(file, 1, "", "no policy in this file (empty, or only comments)"))
            kept = result_policies
            if errors and any(e.file == file for e in errors):
                fresh = {item.policy.name for item in result_policies}
                kept = result_policies + tuple(
                    item for item in self._good.get(file, ()) if item.policy.name not in fresh
                )
            good[file] = kept
        self._texts = texts
        self._good = good
        ordered = [item for items in good.values() for item in items]
        running_first = sorted(ordered, key=lambda item: item.policy.name not in self._running)
        checked = check_conflicts(running_first)
        errors.extend(checked.errors)
        self._running = {item.policy.name: item for item in checked.policies}
        return PolicySnapshot(dict(self._running), tuple(errors), tuple(warnings))
