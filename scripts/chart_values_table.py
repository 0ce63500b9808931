"""Print (or, with --write, refresh) the values table of charts/gateway-canary/README.md.

Each key of values.yaml with its default and the ``# --`` comment above it, so the table cannot
drift from the values (tests/test_chart.py checks that the README holds exactly this table).
Usage: .venv/bin/python scripts/chart_values_table.py [--write]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "gateway-canary"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"


def rows() -> list[tuple[str, str, str]]:
    """(key path, default as JSON, description) for every documented key, in file order."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    found: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("# --"):
            comment = [text.removeprefix("# --").strip()]
            continue
        if text.startswith("#") and comment:
            comment.append(text.lstrip("#").strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not match:
            comment = []
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        path = [key for _, key in stack]
        if comment:
            node = values
            for key in path:
                node = node[key]
            found.append((".".join(path), json.dumps(node), " ".join(comment)))
        comment = []
    return found


def table() -> str:
    out = ["| key | default | meaning |", "| --- | --- | --- |"]
    out += [f"| `{key}` | `{default}` | {meaning} |" for key, default, meaning in rows()]
    return "\n".join(out)


def main() -> int:
    readme = CHART / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    fresh = text[:start] + "\n" + table() + "\n" + text[end:]
    if "--write" in sys.argv:
        readme.write_text(fresh)
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
