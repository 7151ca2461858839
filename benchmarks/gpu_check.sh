#!/usr/bin/env bash
# The prepared GPU check, sized for the device lease (one call <= 600 s; at most 8 files come
# back from $OUT; the reply carries the last 12,000 characters of output).
#
#   bash benchmarks/gpu_check.sh          first call: the headline, <= 480 s by its caps
#       build (offline) -> end-to-end rows (fast, reference fp32, reference bf16, compiled fast,
#       one-pass student at 0.5 and 0.75) -> 200-step bf16 `small` training -> smoke cuda tier (model shapes, one
#       dtype each; the time that is left)
#   bash benchmarks/gpu_check.sh --full   second call: build, the full cuda tiers (every dtype)
#       and the kernel benchmark tables
#   bash benchmarks/gpu_check.sh --plan [--full]   anywhere, no GPU: prints the sections and
#       their caps and checks that the caps fit the budget (exit 1 when they do not)
#
# Every section runs under `timeout -k` with min(its cap, time left before the deadline); a
# section that would start with too little time left is skipped and listed. Logs and JSONs stay
# in a /tmp work folder; on exit (trap) $OUT receives exactly two files: summary.txt (device,
# driver, versions, commit, the section list, every table, the end-to-end table last) and
# gpu_check_logs.tar.gz (logs, JSONs, the training's log.csv; no run directory or checkpoint).
# The summary is printed last. Exit: 0 all passed, 1 a section failed or was skipped,
# 3 no CUDA GPU (summary and tarball are still written).
#
# Environment: OUT (default /tmp/semmim-gpu-out), SEMMIM_COMMIT (the commit under test: .git may
# not travel to the device), PYTHON (default python3), SEMMIM_DEADLINE_S (default 480; --full 540).
set -uo pipefail

MODE=first
PLAN=0
for a in "$@"; do
  case "$a" in
    --full) MODE=full ;;
    --plan) PLAN=1 ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$a' (expected --full, --plan)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
KILL_GRACE=5  # seconds between TERM and KILL; counted against the deadline
MIN_START=15  # a section with less time than this left before the deadline is skipped
NO_GPU_EXIT=3
OPS="masked_gather topk_mask cross_attention prototype_cross_entropy"

# ---------------------------------------------------------------- the plan: name, cap (s), what
# A cap of the last section of the first call is its floor: it also gets whatever time the
# sections before it left unused.
if [ "$MODE" = first ]; then
  BUDGET=${SEMMIM_DEADLINE_S:-480}
  SECTIONS=(
    "device 10 nvidia-smi, versions, CUDA visible"
    "build 120 pip install --no-build-isolation . (semmim._C with CUDA, sm_90)"
    "e2e_fast 60 e2e (a) fast path: our backends + token dropping, bf16"
    "e2e_reference 50 e2e (c) reference path, fp32"
    "e2e_reference_bf16 50 e2e (c') reference path, bf16: ours vs theirs at one precision"
    "e2e_fast_compiled 70 e2e (b) fast path under torch.compile, (a)'s batch"
    "e2e_one_pass 40 e2e (d) one-pass student at ratio 0.5 and 0.75, (a)'s batch"
    "e2e_reference_compiled 0 e2e (c'') reference, bf16, compiled: only on time left unused (>= 60 s)"
    "train_small 40 200 steps of small, embedded data, bf16: the loss must fall"
    "smoke_tier 20 cuda tier at the model's shapes, one dtype each (+ the time left)"
    "finalise 20 e2e table, summary.txt, tarball"
  )
else
  BUDGET=${SEMMIM_DEADLINE_S:-540}
  SECTIONS=(
    "device 10 nvidia-smi, versions, CUDA visible"
    "build 110 pip install --no-build-isolation . (semmim._C with CUDA, sm_90)"
  )
  for op in $OPS; do SECTIONS+=("tier_$op 55 cuda tier of $op, fp32/fp16/bf16"); done
  SECTIONS+=("tier_model 50 cuda tier of the model (bf16/fp16 steps, no syncs)")
  for op in $OPS; do SECTIONS+=("bench_$op 30 benchmark table of $op (cuda rows)"); done
  SECTIONS+=("finalise 20 tables, summary.txt, tarball")
fi

cap_of() {
  local s
  for s in "${SECTIONS[@]}"; do
    read -r n c _ <<<"$s"
    [ "$n" = "$1" ] && { echo "$c"; return; }
  done
  echo "gpu_check.sh: no section '$1'" >&2
  exit 2
}

print_plan() {
  local total=0 s n c what
  printf '%-22s %5s  %s\n' section cap what
  for s in "${SECTIONS[@]}"; do
    read -r n c what <<<"$s"
    printf '%-22s %5s  %s\n' "$n" "$c" "$what"
    total=$((total + c))
  done
  printf 'total %d s of caps; budget %d s (mode %s); kill grace %d s per section\n' \
    "$total" "$BUDGET" "$MODE" "$KILL_GRACE"
  if [ "$total" -gt "$BUDGET" ]; then
    echo "PLAN OVER BUDGET: $total s > $BUDGET s"
    return 1
  fi
  echo "plan fits: $total s <= $BUDGET s"
}

if [ "$PLAN" = 1 ]; then
  print_plan
  exit $?
fi

# ---------------------------------------------------------------- the run
OUT=${OUT:-/tmp/semmim-gpu-out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/semmim-gpu-check.XXXXXX)
export PYTHONUNBUFFERED=1
T0=$(date +%s)
STATUS=0
SUMMARY_ROWS=()  # "name|status|seconds"
SKIPPED=()
TABLES=()        # files whose content goes into summary.txt, in order (the e2e table last)

elapsed() { echo $(($(date +%s) - T0)); }

commit() {
  if [ -n "${SEMMIM_COMMIT:-}" ]; then
    echo "$SEMMIM_COMMIT (SEMMIM_COMMIT)"
  else
    local c
    c=$(git rev-parse HEAD 2>/dev/null) && echo "$c (git)" ||
      echo "unknown: no .git here and SEMMIM_COMMIT unset"
  fi
}

# run_section NAME CAP CMD...: runs CMD under timeout -k with min(CAP, time left), output to
# $WORK/NAME.log, the last lines printed; records the outcome.
run_section() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - $(elapsed) - KILL_GRACE - $(cap_of finalise)))
  local limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$MIN_START" ] && [ "$limit" -lt "$cap" ]; then
    SKIPPED+=("$name (deadline: ${left} s left)")
    SUMMARY_ROWS+=("$name|skipped: deadline|0")
    echo "== $name: skipped, ${left} s left before the ${BUDGET} s deadline"
    STATUS=1
    return 1
  fi
  echo "== $name (limit ${limit} s, at $(elapsed) s)"
  local t=$(date +%s) rc
  timeout -k "$KILL_GRACE" "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t)) st=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    st="timed-out(${limit}s)"
  elif [ "$rc" -ne 0 ]; then
    st="FAILED(rc=$rc)"
  fi
  [ "$rc" -eq 0 ] || STATUS=1
  SUMMARY_ROWS+=("$name|$st|$took")
  tail -n "${TAIL_LINES:-3}" "$WORK/$name.log" | cut -c1-160
  echo "   -> $st in ${took} s"
  return "$rc"
}

skip_rest() {  # every section not run yet is listed as skipped with the reason
  local why=$1 s n
  for s in "${SECTIONS[@]}"; do
    read -r n _ <<<"$s"
    case " ${DONE[*]:-} " in *" $n "*) continue ;; esac
    [ "$n" = finalise ] && continue
    SKIPPED+=("$n ($why)")
    SUMMARY_ROWS+=("$n|skipped: $why|0")
  done
}

finalise() {
  local rc=$?
  trap - EXIT INT TERM
  [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ] && STATUS=$rc
  if [ "$MODE" = first ] && [ -n "${E2E_RAN:-}" ]; then
    timeout -k 2 10 $E2E --section table >"$WORK/e2e_table.txt" 2>&1
  fi
  local sum="$WORK/summary.txt"
  {
    echo "semmim GPU check, mode $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(commit)"
    cat "$WORK/device.txt" 2>/dev/null || echo "device: not read"
    echo "total $(elapsed) s of a ${BUDGET} s budget; exit $STATUS"
    echo
    printf '%-30s %-26s %7s\n' section status seconds
    local r n st t
    for r in "${SUMMARY_ROWS[@]}"; do
      IFS='|' read -r n st t <<<"$r"
      printf '%-30s %-26s %7s\n' "$n" "$st" "$t"
    done
    if [ "${#SKIPPED[@]}" -gt 0 ]; then
      echo "skipped (${#SKIPPED[@]}): ${SKIPPED[*]}"
    fi
    local f
    for f in "${TABLES[@]}"; do
      [ -s "$f" ] || continue
      echo
      head -c 2500 "$f"
    done
    if [ "$MODE" = first ]; then
      echo
      if [ -s "$WORK/e2e_table.txt" ]; then cat "$WORK/e2e_table.txt"; else echo "(no e2e table)"; fi
    fi
  } >"$sum"
  cp "$sum" "$OUT/summary.txt"
  # logs and JSONs only: the training run's checkpoints and the build tree stay in /tmp
  (cd "$WORK" && find . -maxdepth 4 -type f \( -name '*.log' -o -name '*.json' -o -name '*.txt' \
    -o -name 'log.csv' \) -print0 | tar --null -czf "$OUT/gpu_check_logs.tar.gz" -T -)
  echo
  echo "== summary ($OUT/summary.txt; logs in $OUT/gpu_check_logs.tar.gz, work folder $WORK)"
  # keep the printed tail under ~10,000 characters; the file itself is complete
  if [ "$(wc -c <"$sum")" -gt 9500 ]; then
    echo "(summary longer than 9,500 characters: its last 9,500 follow; the file has it all)"
    tail -c 9500 "$sum"
  else
    cat "$sum"
  fi
  exit "$STATUS"
}
trap finalise EXIT
trap 'STATUS=130; exit 130' INT TERM

DONE=()
done_() { DONE+=("$1"); }

# ---- device
echo "== device (mode $MODE, budget ${BUDGET} s, results to $OUT, logs in $WORK)"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    2>/dev/null | sed 's/^/gpu: /' || echo "gpu: nvidia-smi not found"
  timeout -k 2 60 $PY -c "
import sys, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f'not importable ({e.__class__.__name__})'
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, python {sys.version.split()[0]}')
print(f'torch device: {name}')
" 2>&1
} >"$WORK/device.txt"
cat "$WORK/device.txt"
SUMMARY_ROWS+=("device|ok|$(elapsed)")
done_ device
if ! grep -q "^torch device: " "$WORK/device.txt" || grep -q "^torch device: no CUDA GPU" "$WORK/device.txt"; then
  echo "gpu_check.sh: no CUDA GPU on this machine (torch not importable, or"
  echo "torch.cuda.is_available() is False): nothing was built or measured."
  skip_rest "no CUDA GPU"
  STATUS=$NO_GPU_EXIT
  exit "$NO_GPU_EXIT"
fi

# ---- build (offline: no build isolation, no dependencies fetched)
if run_section build "$(cap_of build)" env SEMMIM_CUDA=1 SEMMIM_CUDA_ARCHS="${SEMMIM_CUDA_ARCHS:-90}" \
  $PY -m pip install --no-build-isolation --no-deps --no-index -q . ; then
  timeout -k 2 30 $PY -P -m semmim.kernels.info >"$WORK/kernels_info.txt" 2>&1
  TABLES+=("$WORK/kernels_info.txt")
else
  tail -30 "$WORK/build.log"
  done_ build
  skip_rest "build failed"
  exit 1
fi
done_ build

if [ "$MODE" = first ]; then
  E2E="$PY -P benchmarks/e2e_gpu.py --out $WORK --steps 10 --warmup 2 --search-s 20"
  E2E_RAN=1
  for s in fast reference reference_bf16 fast_compiled; do
    run_section "e2e_$s" "$(cap_of "e2e_$s")" $E2E --section "$s"
    done_ "e2e_$s"
  done
  # (d) the one-pass student (issue 18); an e2e_gpu.py without the section (an older commit
  # under test) is listed, not failed
  if $PY -P benchmarks/e2e_gpu.py --list-sections 2>/dev/null | grep -qx one_pass; then
    run_section e2e_one_pass "$(cap_of e2e_one_pass)" $E2E --section one_pass
  else
    SUMMARY_ROWS+=("e2e_one_pass|not in this commit|0")
  fi
  done_ e2e_one_pass
  # (c'') the reference path compiled (issue 18: "ours vs theirs", both compiled): it has no cap
  # of its own and runs only on the time the sections above left unused, keeping the caps of
  # those after it
  left=$((BUDGET - $(elapsed) - KILL_GRACE - $(cap_of finalise) - $(cap_of train_small) \
    - $(cap_of smoke_tier) - KILL_GRACE))
  if [ "$left" -ge 60 ] && $PY -P benchmarks/e2e_gpu.py --list-sections 2>/dev/null |
    grep -qx reference_compiled; then
    run_section e2e_reference_compiled "$left" $E2E --section reference_compiled
  else
    SUMMARY_ROWS+=("e2e_reference_compiled|skipped: ${left} s left of the 60 s it needs|0")
  fi
  done_ e2e_reference_compiled
  run_section train_small "$(cap_of train_small)" $E2E --section train
  done_ train_small
  # smoke tier: whatever time is left (at least its cap by the plan)
  left=$((BUDGET - $(elapsed) - KILL_GRACE - $(cap_of finalise)))
  smoke=$(cap_of smoke_tier)
  [ "$left" -gt "$smoke" ] && smoke=$left
  TAIL_LINES=6 run_section smoke_tier "$smoke" $PY -P -m pytest tests/test_masked_gather.py \
    tests/test_topk_mask.py tests/test_cross_attention.py tests/test_prototype_cross_entropy.py \
    tests/test_gpu_path.py -m "cuda and smoke" -q -p no:cacheprovider -o addopts="" -rfE
  done_ smoke_tier
  if [ -f "$WORK/smoke_tier.log" ]; then
    { echo "smoke tier:"; grep -E "passed|failed|error" "$WORK/smoke_tier.log" | tail -1
      grep -E "^(FAILED|ERROR)" "$WORK/smoke_tier.log" | head -20; } >"$WORK/smoke_result.txt"
    TABLES+=("$WORK/smoke_result.txt")
  fi
else
  for op in $OPS; do
    run_section "tier_$op" "$(cap_of "tier_$op")" $PY -P -m pytest "tests/test_$op.py" -m cuda -q \
      -p no:cacheprovider -o addopts="" -rfE
    done_ "tier_$op"
    if [ -f "$WORK/tier_$op.log" ]; then
      { echo "cuda tier $op:"; grep -E "passed|failed|error" "$WORK/tier_$op.log" | tail -1
        grep -E "^(FAILED|ERROR)" "$WORK/tier_$op.log" | head -10; } >"$WORK/tier_${op}_result.txt"
      TABLES+=("$WORK/tier_${op}_result.txt")
    fi
  done
  run_section tier_model "$(cap_of tier_model)" $PY -P -m pytest tests/test_gpu_path.py -m cuda -q \
    -p no:cacheprovider -o addopts="" -rfE
  done_ tier_model
  for op in $OPS; do
    run_section "bench_$op" "$(cap_of "bench_$op")" $PY -P -m pytest "benchmarks/bench_$op.py" \
      --benchmark-only -q -p no:cacheprovider -k "cuda or copy" --benchmark-columns=median \
      --benchmark-json="$WORK/bench_$op.json"
    done_ "bench_$op"
    if [ -f "$WORK/bench_$op.log" ]; then
      sed -n '/semmim speed-up table/,/^$/p' "$WORK/bench_$op.log" | grep -v "^-" \
        >"$WORK/bench_${op}_table.txt"
      TABLES+=("$WORK/bench_${op}_table.txt")
    fi
  done
fi
exit "$STATUS"
