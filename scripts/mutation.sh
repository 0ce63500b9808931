#!/usr/bin/env bash
# Mutation testing of controller/core/{decision,gates}.py, killed only by the fast unit tests
# (tests/test_decision.py, test_gates.py, test_kernel_details.py, test_write_protocol.py); config in pyproject.toml.
# Starts from an empty mutants/ (git-ignored) each run, prints per-file counts, score
# = killed / (total - skipped) and survivors per function (`.venv/bin/mutmut show <name>` for a diff).
# Exits 0 whatever the score; non-zero only if mutmut itself fails (e.g. a red clean run).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -c 'import controller, pytest, pytest_timeout' 2>/dev/null || .venv/bin/pip install -q -e '.[test]'
# Pinned: the [tool.mutmut] option names have changed within 3.x.
.venv/bin/python -c 'import mutmut' 2>/dev/null || .venv/bin/pip install -q "${MUTMUT_SPEC:-mutmut==3.8.1}"
.venv/bin/mutmut --version
rm -rf mutants && mkdir mutants
start=$(date +%s)
# mutmut redraws its progress spinner on one ever-growing line: keep it in a log.
if ! .venv/bin/mutmut run >mutants/mutmut-run.log 2>&1; then
    tr '\r' '\n' <mutants/mutmut-run.log | tail -n 40 >&2
    echo "mutation.sh: mutmut run failed (log: mutants/mutmut-run.log)" >&2
    exit 1
fi
echo "mutmut run: $(($(date +%s) - start))s wall"
.venv/bin/python - <<'PY'
import json
from collections import Counter
from pathlib import Path
from mutmut.stats import status_by_exit_code

SEP, MAIN = "\u01c1", ("killed", "survived", "timeout", "skipped")  # mutmut: x_func / xǁClassǁmethod
def row(label, c):
    tested = c["total"] - c["skipped"]
    score = f"{100 * c['killed'] / tested:.1f}%" if tested else "n/a"
    print(f"{label:28}" + "".join(f"{c[k]:>9}" for k in (*MAIN, "total")) + f"{score:>8}")
print(f"{'':28}" + "".join(f"{k:>9}" for k in (*MAIN, "total")) + f"{'score':>8}")
totals, survivors = Counter(), Counter()
for path in ("controller/core/decision.py", "controller/core/gates.py"):
    codes = json.loads(Path(f"mutants/{path}.meta").read_text())["exit_code_by_key"]
    counts = Counter(status_by_exit_code[code] for code in codes.values()) + Counter(total=len(codes))
    row(path, counts)
    totals += counts
    for name, code in codes.items():
        if status_by_exit_code[code] == "survived":
            fn = name.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
            fn = fn[2:].replace(SEP, ".") if fn.startswith("x" + SEP) else fn.removeprefix("x_")
            survivors[f"{Path(path).stem}.{fn}"] += 1
row("TOTAL", totals)
if other := {k: v for k, v in totals.items() if k not in (*MAIN, "total")}:
    print("other statuses (not killed):", other)
print("score = killed / (total - skipped); survivors per function:")
print("\n".join(f"  {n:4}  {fn}" for fn, n in sorted(survivors.items())))
PY
