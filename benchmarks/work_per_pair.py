#!/usr/bin/env python3
"""The work of one training step per (image, caption) pair, on CPU (issue 18): FLOPs, peak memory
and seconds, for the reference path, the fast two-pass path and the one-pass student.

    python -P benchmarks/work_per_pair.py --preset tiny --batch 8 --rounds 5
    python -P benchmarks/work_per_pair.py --preset base --image-size 224 --batch 8 --no-time
    python -P benchmarks/work_per_pair.py --preset small --batch 8 --no-work --rounds 3

Paths (:data:`PATHS`, the rows of ``benchmarks/e2e_gpu.py``): ``reference`` (reference backends,
[MASK] tokens), ``fast`` (default backends, token dropping; the student encodes the full image
and the masked view), ``one_pass`` / ``one_pass75`` (``mim.student_view=masked`` at masking
ratio 0.5 / 0.75: the student encodes CLS + the kept patches once). Every step is
``e2e_gpu.TrainStep``'s: forward (explicit seed, value checks at the first step only), backward,
clip, fused AdamW, EMA; fp32 on CPU.

- **FLOPs per pair**: ``torch.utils.flop_counter.FlopCounterMode`` over the second training step
  (after a warm-up step), divided by B; next to it the analytic count
  ``e2e_gpu.train_flops`` (matrix products only) as the cross-check.
  ``--fake-flops`` counts the same on fake tensors (shapes only: no arithmetic, no memory).
- **Peak memory**: each path in its own process (a fresh allocator), with glibc's mmap threshold
  fixed at 128 KiB so freed tensors return to the OS and the resident set follows the live
  tensors. "above model": the peak RSS of the warm-up and the counted step above the RSS of the
  built model (the issue's measure: it includes AdamW's state, created at the first step, and
  the gradients); "step": the peak RSS of the counted step alone above the RSS before it
  (``/proc/self/clear_refs`` resets the peak), i.e. activations, gradients and temporaries.
- **Seconds per pair**: one intra-op thread, every path's model built and warmed up in one
  process, then ``--rounds`` rounds that each time one step of every path in turn (interleaved,
  so load from other processes hits every path alike); the median over rounds, divided by B.

Prints one table (and ``--json FILE`` writes it). Ratios are against ``reference`` and ``fast``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_gpu import PATHS, TrainStep, train_flops  # noqa: E402

ROWS = ("reference", "fast", "one_pass", "one_pass75")
MIB = 2**20


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def work(path: str, preset: str, image_size: int, B: int, T: int) -> dict:
    """FLOPs and peak memory of one training step of ``path`` (run in a fresh process)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    run = TrainStep(path, B, T, preset, image_size, device="cpu", compile=False)
    rss_model = _status_kib("VmRSS")
    _reset_peak()
    run.step()  # warm-up: value checks, AdamW state
    warm_peak = _status_kib("VmHWM")
    rss_before = _status_kib("VmRSS")
    _reset_peak()
    counter = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with counter:
        run.step()
    step_s = time.perf_counter() - t0
    step_peak = _status_kib("VmHWM")
    return {
        "path": path,
        "flops_per_pair": counter.get_total_flops() / B,
        "analytic_flops_per_pair": train_flops(run.cfg, B, T)["total"] / B,
        "peak_above_model_mib": (max(warm_peak, step_peak) - rss_model) / 1024,
        "step_peak_mib": (step_peak - rss_before) / 1024,
        "counted_step_s": step_s,
    }


def fake_flops(path: str, preset: str, image_size: int, B: int, T: int) -> dict:
    """FLOPs per pair of one training forward + backward of ``path`` counted on fake tensors
    (``FakeTensorMode``: shapes only, no arithmetic; seconds instead of minutes for ``base`` on
    a CPU). The model is built for real, then run in eval mode so that no real buffer is
    written by a fake op; dropout and the queue / centre updates do no matrix product, so the
    count equals the training step's (checked against the real count on ``tiny``)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    run = TrainStep(path, B, T, preset, image_size, device="cpu", compile=False)
    model = run.model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(allow_non_fake_inputs=True), counter:
        out = model(*run.batch, seed=1, check_inputs=False)
        torch.autograd.grad(out.loss, params, allow_unused=True)
    return {
        "path": path,
        "flops_per_pair": counter.get_total_flops() / B,
        "analytic_flops_per_pair": train_flops(run.cfg, B, T)["total"] / B,
    }


def work_in_subprocess(path: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [
        sys.executable, "-P", os.path.abspath(__file__), "--one-work", path,
        "--preset", args.preset, "--image-size", str(args.image_size),
        "--batch", str(args.batch), "--tokens", str(args.tokens),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(
            f"work_per_pair {path}: failed\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def seconds(paths: tuple[str, ...], args) -> dict[str, list[float]]:
    """Seconds per pair of each path, one value per round (interleaved rounds, one thread)."""
    import torch

    torch.set_num_threads(1)
    runs = {
        p: TrainStep(p, args.batch, args.tokens, args.preset, args.image_size, "cpu") for p in paths
    }
    for run in runs.values():
        run.step()  # value checks
        run.step()  # steady state
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(args.rounds):
        for p, run in runs.items():
            t0 = time.perf_counter()
            run.step()
            times[p].append((time.perf_counter() - t0) / args.batch)
    return times


def _ratio(x: float | None, y: float | None) -> str:
    return "" if x is None or not y else f" ({x / y:.2f}x)"


def table(args, rows: dict[str, dict]) -> list[str]:
    lines = [
        f"work per pair: {args.preset} {args.image_size} px, B={args.batch}, T={args.tokens}, "
        f"fp32, CPU (ratios vs reference; seconds: 1 thread, median of {args.rounds} interleaved "
        f"rounds)",
        f"{'path':<11} {'GFLOP/pair (counted)':>24} {'analytic':>9} {'MiB above model':>20} "
        f"{'MiB step':>16} {'s/pair':>16} {'s/pair vs fast':>14}",
    ]
    ref, fast = rows.get("reference", {}), rows.get("fast", {})
    for p, r in rows.items():
        f, a = r.get("flops_per_pair"), r.get("analytic_flops_per_pair")
        m, ms, s = r.get("peak_above_model_mib"), r.get("step_peak_mib"), r.get("s_per_pair")
        cells = [
            f"{f / 1e9:.2f}{_ratio(f, ref.get('flops_per_pair'))}" if f else "-",
            f"{a / 1e9:.2f}" if a else "-",
            f"{m:.0f}{_ratio(m, ref.get('peak_above_model_mib'))}" if m is not None else "-",
            f"{ms:.0f}{_ratio(ms, ref.get('step_peak_mib'))}" if ms is not None else "-",
            f"{s:.4f}{_ratio(s, ref.get('s_per_pair'))}" if s else "-",
            f"{s / fast['s_per_pair']:.2f}x" if s and fast.get("s_per_pair") else "-",
        ]
        lines.append(
            f"{p:<11} {cells[0]:>24} {cells[1]:>9} {cells[2]:>20} {cells[3]:>16} {cells[4]:>16} "
            f"{cells[5]:>14}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--image-size", type=int, default=0, help="0 = the preset's")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="caption length T")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (interleaved)")
    ap.add_argument("--paths", nargs="+", default=list(ROWS), choices=list(PATHS))
    ap.add_argument("--no-work", action="store_true", help="skip FLOPs and memory")
    ap.add_argument("--no-time", action="store_true", help="skip the timed rounds")
    ap.add_argument(
        "--fake-flops",
        action="store_true",
        help="FLOPs only, counted on fake tensors (no arithmetic, no memory measure)",
    )
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--one-work", default="", help=argparse.SUPPRESS)  # the per-path subprocess
    args = ap.parse_args(argv)
    if not args.image_size:
        from semmim import from_preset

        args.image_size = from_preset(args.preset).vision.image_size
    if args.one_work:
        print(
            json.dumps(work(args.one_work, args.preset, args.image_size, args.batch, args.tokens))
        )
        return 0
    rows: dict[str, dict] = {p: {"path": p} for p in args.paths}
    if args.fake_flops:
        for p in args.paths:
            rows[p].update(fake_flops(p, args.preset, args.image_size, args.batch, args.tokens))
            print(f"  {p}: {rows[p]}", flush=True)
    elif not args.no_work:
        for p in args.paths:
            rows[p].update(work_in_subprocess(p, args))
            print(f"  {p}: {rows[p]}", flush=True)
    if not args.no_time:
        for p, ts in seconds(tuple(args.paths), args).items():
            rows[p]["s_per_pair"] = statistics.median(ts)
            rows[p]["s_per_pair_rounds"] = ts
    load = os.getloadavg()
    lines = table(args, rows) + [
        f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    ]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "load": load}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
