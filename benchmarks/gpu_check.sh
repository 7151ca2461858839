#!/usr/bin/env bash
# The one prepared GPU check (a few minutes on one H100/H200): build semmim._C with CUDA, run the
# cuda test tier of every op in fp32/fp16/bf16 and of the model (tests/test_gpu_path.py), the GPU
# benchmark tables, then the end-to-end section (benchmarks/e2e_gpu.py): `base` at 224 px, the
# fast path eager and compiled vs the reference path (pairs/s, peak memory, MFU) and a 200-step
# `small` training that must lower its loss.
#   usage (on the GPU machine, repo root):  bash benchmarks/gpu_check.sh
# Logs go to $OUT (or /tmp/semmim-gpu); the speed-up table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/semmim-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
(git rev-parse HEAD 2>/dev/null || echo "no git") | tee "$OUT/commit.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== build (SEMMIM_CUDA=1, sm_90)"
t0=$(date +%s)
SEMMIM_CUDA=1 SEMMIM_CUDA_ARCHS=${SEMMIM_CUDA_ARCHS:-90} timeout 300 \
  $PY -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
$PY -P -m semmim.kernels.info | tee "$OUT/info.txt"

# Each op gets its own cuda-tier run and benchmark run (with timeouts), so one failure or hang
# leaves the others' results; the last lines printed are the speed-up tables.
OPS=${SEMMIM_OPS:-"masked_gather topk_mask cross_attention prototype_cross_entropy"}
for op in $OPS; do
  echo "== cuda tier: $op (fp32/fp16/bf16)"
  timeout "${SEMMIM_TEST_TIMEOUT:-200}" $PY -P -m pytest "tests/test_$op.py" -m cuda -q \
    -p no:cacheprovider -o addopts="" -rfE 2>&1 | tee "$OUT/tests_$op.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
for op in $OPS; do
  echo "== benchmark: $op (cuda rows)"
  timeout "${SEMMIM_BENCH_TIMEOUT:-150}" $PY -P -m pytest "benchmarks/bench_$op.py" --benchmark-only \
    -q -p no:cacheprovider -k "cuda or copy" --benchmark-columns=median \
    --benchmark-json="$OUT/bench_$op.json" >"$OUT/bench_$op.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/bench_$op.log" | head -5
done
echo "== cuda tier: the model (bf16 / fp16 + GradScaler steps, no syncs)"
timeout "${SEMMIM_TEST_TIMEOUT:-200}" $PY -P -m pytest tests/test_gpu_path.py -m cuda -q \
  -p no:cacheprovider -o addopts="" -rfE 2>&1 | tee "$OUT/tests_gpu_path.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for op in $OPS; do
  sed -n '/semmim speed-up table/,/^$/p' "$OUT/bench_$op.log" | grep -v "^-"
done

# End to end, each section under its own timeout (seconds, 8 minutes together; never run yet
# on a GPU, so the typical times are estimates: about half of each).
E2E="$PY -P benchmarks/e2e_gpu.py --out $OUT"
for part in fast:${SEMMIM_E2E_FAST_S:-120} fast_compiled:${SEMMIM_E2E_COMPILED_S:-150} \
            reference:${SEMMIM_E2E_REF_S:-120} train:${SEMMIM_E2E_TRAIN_S:-90}; do
  timeout "${part#*:}" $E2E --section "${part%%:*}" 2>&1 | tee "$OUT/e2e_${part%%:*}.log" | tail -4
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "e2e ${part%%:*}: FAILED or timed out"; status=1; }
done
$E2E --section table | tee "$OUT/e2e_table.txt"
exit $status
