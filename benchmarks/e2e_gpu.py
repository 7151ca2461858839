#!/usr/bin/env python3
"""End-to-end GPU check (issue 9 §7): the headline numbers of a whole SemMIM training step.

Run by ``benchmarks/gpu_check.sh`` (its first call, before anything optional), one section per
call (each under its own ``timeout``), then ``--section table``:

    python -P benchmarks/e2e_gpu.py --section fast            # (a) default backends, token dropping, bf16
    python -P benchmarks/e2e_gpu.py --section reference       # (c) reference backends, [MASK] path, fp32
    python -P benchmarks/e2e_gpu.py --section reference_bf16  # (c') (c) under bf16 autocast
    python -P benchmarks/e2e_gpu.py --section fast_compiled   # (b) (a) under torch.compile, (a)'s batch
    python -P benchmarks/e2e_gpu.py --section one_pass        # (d), (d') one-pass student at ratio 0.5, 0.75, (a)'s batch
    python -P benchmarks/e2e_gpu.py --section reference_compiled  # (c'') (c') under torch.compile, (c')'s batch
    python -P benchmarks/e2e_gpu.py --section train           # `small`, 200 steps, embedded data, bf16
    python -P benchmarks/e2e_gpu.py --section table           # one table: pairs/s, peak memory, MFU, ratios

Without ``--section`` every section runs in order in one process. (a)-(c') use the ``base`` preset
at 224 px (P = 196) and T = 32 caption tokens; each finds the largest batch that fits (doubling
from ``--min-batch``, then one step between the last fit and the first failure; any allocation
failure counts as "does not fit", :func:`is_oom`), then times ``--steps`` training steps
(forward with an explicit seed and ``check_inputs=False`` after a validating first step,
backward, clip, fused AdamW, EMA) after warm-up, with CUDA events. (c') against (a) is "ours vs
theirs at the same precision"; (c'') against (b) is the same comparison with both compiled (at
(c')'s batch; without (c')'s result in ``--out``, e.g. in gpu_check.sh's second call, it searches
(c')'s batch first); (c) is the fp32 reference the kernels are checked against.
(d) / (d') (``mim.student_view=masked``, issue 18: the student ViT encodes only CLS + the kept
patches, once) run at (a)'s batch, so their peak memory and pairs/s compare with (a) at one batch.

MFU counts the model's matrix-product FLOPs analytically (:func:`train_flops`: 2·m·n·k per
product; backward = 2× forward for the trained model; the EMA model runs forward only) over the
time, against the dense bf16 peak of the card the run is on (:func:`card_peak`, datasheet values
by ``torch.cuda.get_device_name()``: H100 SXM / PCIe / NVL, H200 / H200 NVL, GH200; an unknown
card gets no MFU, and the table says so). A measured 8192³ bf16 product ran at 770-800 TFLOP/s
on this workplace's H100 and H200 (/work/.library/device/KINDS.md), ~80% of the datasheet. The
fp32 reference path is reported against the same bf16 peak (what the card could do), so its MFU
is low by design.

Results (JSONs, the training's run directory and log) go to ``--out`` (default
/tmp/semmim-e2e), never to the lease's ``$OUT``: gpu_check.sh packs the logs and JSONs itself.

On a machine without a CUDA GPU every measuring section prints its plan and stops at its first
GPU step with exit code 3 and a message saying so (the default test tier checks this).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time

NO_GPU_EXIT = 3
SECTIONS = (
    "fast",
    "reference",
    "reference_bf16",
    "fast_compiled",
    "one_pass",
    "reference_compiled",
    "train",
    "table",
)

# Dense bf16 tensor-core peaks (FLOP/s, NVIDIA datasheets; the sparse figures are twice these),
# matched in order against torch.cuda.get_device_name(): the form factors first, since
# "NVIDIA H100 NVL" and "NVIDIA H100 PCIe" also contain "H100".
CARD_PEAKS_BF16 = (
    ("H100 NVL", "H100 NVL", 835e12),
    ("H100 PCIe", "H100 PCIe", 756e12),
    ("H200 NVL", "H200 NVL", 835e12),
    ("GH200", "GH200", 989e12),
    ("H100", "H100 SXM", 989e12),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"
    ("H200", "H200 SXM", 989e12),  # "NVIDIA H200"
)

# Substrings of the messages of allocation failures that are not torch.OutOfMemoryError (cuBLAS /
# cuDNN workspaces, cudaMalloc from extensions and Triton launches), matched case-insensitively.
OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudaerrormemoryallocation",
    "failed to allocate",
    "cuda_error_out_of_memory",
)
PATHS = {
    "fast": {
        "label": "(a) fast: default backends + token dropping, bf16",
        "overrides": {"mim.drop_tokens": True},
        "amp": True,
        "compile": False,
    },
    "fast_compiled": {
        "label": "(b) fast, torch.compile",
        "overrides": {"mim.drop_tokens": True},
        "amp": True,
        "compile": True,
    },
    "reference": {
        "label": "(c) reference: reference backends, [MASK] tokens, fp32",
        "overrides": {"mim.drop_tokens": False, "kernels.backend": "reference"},
        "amp": False,
        "compile": False,
    },
    "reference_bf16": {
        "label": "(c') reference, bf16 (same precision as (a))",
        "overrides": {"mim.drop_tokens": False, "kernels.backend": "reference"},
        "amp": True,
        "compile": False,
    },
    "reference_compiled": {
        "label": "(c'') reference, bf16, torch.compile, (c')'s batch",
        "overrides": {"mim.drop_tokens": False, "kernels.backend": "reference"},
        "amp": True,
        "compile": True,
    },
    "one_pass": {
        "label": "(d) one-pass student, ratio 0.5, bf16, (a)'s batch",
        "overrides": {"mim.drop_tokens": True, "mim.student_view": "masked"},
        "amp": True,
        "compile": False,
    },
    "one_pass75": {
        "label": "(d') one-pass student, ratio 0.75, bf16, (a)'s batch",
        "overrides": {
            "mim.drop_tokens": True,
            "mim.student_view": "masked",
            "masking.ratio": 0.75,
        },
        "amp": True,
        "compile": False,
    },
}
# the section that measures each path (the one-pass section measures both ratios)
SECTION_PATHS = {"one_pass": ("one_pass", "one_pass75")}


def card_peak(name: str) -> tuple[str, float] | None:
    """(card label, dense bf16 peak in FLOP/s) for a ``torch.cuda.get_device_name()`` string, or
    None for a card not in :data:`CARD_PEAKS_BF16` (then no MFU is reported)."""
    for key, label, peak in CARD_PEAKS_BF16:
        if key.lower() in name.lower():
            return label, peak
    return None


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure of any kind: ``torch.OutOfMemoryError`` and the
    RuntimeErrors (CUDA, cuBLAS, cuDNN, Triton) whose message says the allocation failed. Other
    errors are bugs, not "does not fit", and must propagate."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    msg = str(exc).lower()
    return any(m in msg for m in OOM_MESSAGES)


# ---------------------------------------------------------------- FLOPs


def _self_layer(L: int, D: int, F: int) -> float:
    """Self-attention transformer layer on L tokens: qkv, QKᵀ, AV, proj, MLP (D→F→D)."""
    return 2 * L * (4 * D * D + 2 * D * F) + 4 * L * L * D


def _cross(Lq: int, Lk: int, D: int, Dk: int) -> float:
    """Cross-attention: q and out projections (D×D), kv projection of the context (Dk→2D)."""
    return 4 * Lq * D * D + 4 * Lk * Dk * D + 4 * Lq * Lk * D


def train_flops(cfg, B: int, T: int) -> dict[str, float]:
    """Matrix-product FLOPs of one training step of ``cfg`` at batch B, T caption tokens.

    Returns {"student_fwd", "ema_fwd", "total"}; total = 3·student_fwd + ema_fwd. The
    one-pass student (``mim.student_view="masked"``) runs its ViT once on CLS + the P − M kept
    patches, and its fusion (ITM, MLM) reads those R + 1 keys; the EMA reads the full image.
    """
    v, t, h = cfg.vision, cfg.text, cfg.head
    P, Dv, Dt, E = v.num_patches, v.dim, t.dim, cfg.itc.embed_dim
    Fv, Q, M = int(Dv * v.mlp_ratio), cfg.itc.queue_size, cfg.num_masked
    N = max(1, math.ceil(cfg.mlm.prob * T))
    patch = 2 * P * 3 * v.patch_size**2 * Dv

    def vit(L: int) -> float:
        return patch + v.depth * _self_layer(L, Dv, Fv)

    bert = t.depth * _self_layer(T, Dt, t.intermediate)

    def fusion(Lk: int) -> float:  # Lk image keys
        return cfg.fusion.depth * (_self_layer(T, Dt, t.intermediate) + _cross(T, Lk, Dt, Dv))

    mlm_head = N * (2 * Dt * Dt + 2 * Dt * t.vocab_size)
    itc = B * 2 * (Dv + Dt) * E + 2 * 2 * B * (B + Q) * E

    def head(rows: int) -> float:
        return 2 * rows * (Dv * h.hidden + h.hidden**2 + h.hidden * h.bottleneck)

    def logits(rows: int) -> float:
        return 2 * rows * h.bottleneck * h.num_prototypes

    w, mim = cfg.loss, cfg.mim
    # image tokens the student's ITC / ITM / MLM read: the full image, or (one-pass) CLS + kept
    Ls = P - M + 1 if cfg.one_pass else P + 1
    student = B * vit(Ls) + B * bert + itc
    ema = B * vit(P + 1) + B * bert + itc
    if w.itm > 0:
        student += 3 * B * fusion(Ls)
    if w.mlm > 0:
        student += B * (bert + fusion(Ls) + mlm_head)
        ema += B * (bert + fusion(P + 1) + mlm_head)
    if cfg.draws_mask and cfg.masking.strategy == "text_guided":
        ema += B * P * 2 * Dv * E  # text-guided masking scores in ITC space
    if mim.enabled and (w.glob > 0 or w.mim > 0):
        if not cfg.one_pass:  # the two-pass student's second ViT pass, on the masked view
            student += B * vit(P - M + 1 if mim.drop_tokens else P + 1)
        if w.glob > 0:
            student += head(B) + logits(B)
            ema += head(B) + logits(B)
        if w.mim > 0:
            pred = mim.predictor_depth * (_self_layer(P + 1, Dv, Fv) + _cross(P + 1, T, Dv, Dt))
            student += B * pred
            if mim.target == "pixel":
                student += 2 * B * M * Dv * 3 * v.patch_size**2
            else:
                student += head(B * M) + logits(B * M)
                ema += head(B * M) + logits(B * M)
                if mim.text_in_target:
                    ema += B * _cross(M, T, Dv, Dt)
    return {"student_fwd": student, "ema_fwd": ema, "total": 3 * student + ema}


# ---------------------------------------------------------------- steps on the GPU


def _need_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        print(
            "e2e: no CUDA GPU on this machine (torch.cuda.is_available() is False): the "
            "end-to-end section needs one; nothing was measured.",
            flush=True,
        )
        sys.exit(NO_GPU_EXIT)


def _batch(cfg, B: int, T: int, device: str, seed: int = 0):
    """Random pixels and captions of T tokens ([CLS] w_1 .. w_{T-2} [SEP]), all real."""
    import torch

    g = torch.Generator().manual_seed(seed)
    S = cfg.vision.image_size
    images = torch.randn(B, 3, S, S, generator=g)
    ids = torch.randint(1000, 20000, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    am = torch.ones(B, T, dtype=torch.long)
    return images.to(device), ids.to(device), am.to(device)


class TrainStep:
    """One model + fused AdamW; :meth:`step` is one whole training step as training runs it:
    forward (explicit seed; value checks at the first step only), backward, clip, AdamW, EMA.

    path: a key of :data:`PATHS` (overrides, autocast, compile; ``compile`` overrides the
    latter); also used by ``benchmarks/bench_model.py`` on CPU, where it runs fp32 (autocast
    is applied on CUDA only).
    """

    def __init__(
        self,
        path: str,
        B: int,
        T: int,
        preset: str,
        image_size: int,
        device: str = "cuda",
        compile: bool | None = None,
    ):
        import torch

        from semmim import build_model, from_preset

        spec = PATHS[path]
        self.cfg = from_preset(preset, {"vision.image_size": image_size, **spec["overrides"]})
        torch.manual_seed(0)
        self.model = build_model(self.cfg).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.05, fused=True)
        compile = spec["compile"] if compile is None else compile
        self.forward = torch.compile(self.model) if compile else self.model
        self.device_type = torch.device(device).type
        self.amp = spec["amp"] and self.device_type == "cuda"
        self.batch = _batch(self.cfg, B, T, device)
        self.n = 0

    def step(self) -> None:
        import torch

        self.model.set_step(self.n, 10_000)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.forward(*self.batch, seed=self.n, check_inputs=self.n == 0)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.model.update_momentum()
        self.n += 1


def _free() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _fits(run: TrainStep, B: int, args) -> bool:
    """Two training steps of ``run``'s model at batch B fit in memory (the model, its EMA and
    the optimizer state are built once for the whole search)."""
    import torch

    try:
        run.batch = _batch(run.cfg, B, args.tokens, "cuda")
        for _ in range(2):
            run.step()
        torch.cuda.synchronize()
        return True
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        return False
    finally:
        run.batch = None
        run.opt.zero_grad(set_to_none=True)
        _free()


def search_batch(path: str, args) -> int:
    """Largest batch (doubling from --min-batch, then one midpoint) whose steps fit in memory."""
    t0, ok, bad, B = time.time(), 0, 0, args.min_batch
    run = TrainStep(path, B, args.tokens, args.preset, args.image_size)
    while B <= args.max_batch and time.time() - t0 < args.search_s:
        fit = _fits(run, B, args)
        print(f"  batch {B:5d}: {'fits' if fit else 'out of memory'}", flush=True)
        if not fit:
            bad = B
            break
        ok, B = B, 2 * B
    if ok and bad and time.time() - t0 < args.search_s:
        mid = (ok + bad) // 2 // 8 * 8
        if mid > ok and _fits(run, mid, args):
            print(f"  batch {mid:5d}: fits", flush=True)
            ok = mid
    del run
    _free()
    if not ok:
        raise SystemExit(f"e2e {path}: batch {args.min_batch} does not fit")
    return ok


def measure(path: str, B: int, args) -> dict:
    """Warm-up (compile included), then ``args.steps`` timed steps with CUDA events."""
    import torch

    _free()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    run = TrainStep(path, B, args.tokens, args.preset, args.image_size)
    for _ in range(args.warmup):
        run.step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        run.step()
    end.record()
    torch.cuda.synchronize()
    step_s = start.elapsed_time(end) / 1e3 / args.steps
    flops = train_flops(run.cfg, B, args.tokens)["total"]
    device = torch.cuda.get_device_name()
    card = card_peak(device)
    return {
        "path": path,
        "label": PATHS[path]["label"],
        "batch": B,
        "steps": args.steps,
        "step_s": step_s,
        "pairs_per_s": B / step_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "flops_per_step": flops,
        "device": device,
        "card": card[0] if card else None,
        "peak_bf16": card[1] if card else None,
        "mfu": flops / step_s / card[1] if card else None,
        "warmup_s": warm_s,
    }


def _write(args, name: str, result: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"e2e_{name}.json"), "w") as f:
        json.dump(result, f, indent=1)


def section_path(path: str, args) -> None:
    print(f"== e2e {PATHS[path]['label']}", flush=True)
    _need_gpu()
    import torch

    print(f"  {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if path in ("fast_compiled", "one_pass", "one_pass75"):
        fast = os.path.join(args.out, "e2e_fast.json")
        if not os.path.exists(fast):
            raise SystemExit(f"e2e {path}: needs (a)'s result {fast}; run --section fast")
        with open(fast) as f:
            B = json.load(f)["batch"]  # the same batch as (a): compile once, at that shape
    elif path == "reference_compiled":
        ref = _read(args, "reference_bf16")  # compile once, at (c')'s batch
        B = ref["batch"] if ref else search_batch("reference_bf16", args)
    else:
        B = search_batch(path, args)
    result = measure(path, B, args)
    if path == "reference":
        # the memory target compares the two paths at one batch: (a) at (c)'s batch
        _free()
        torch.cuda.reset_peak_memory_stats()
        run = TrainStep("fast", B, args.tokens, args.preset, args.image_size)
        for _ in range(2):
            run.step()
        torch.cuda.synchronize()
        result["fast_peak_gib_at_this_batch"] = torch.cuda.max_memory_allocated() / 2**30
        del run
    print(
        f"  batch {B}: {result['step_s'] * 1e3:.1f} ms/step, {result['pairs_per_s']:.1f} pairs/s,"
        f" peak {result['peak_gib']:.1f} GiB, MFU {_pct(result['mfu'])}",
        flush=True,
    )
    _write(args, path, result)


def section_train(args) -> int:
    """200 steps of `small` on the embedded data under bf16 (the CLI's CUDA default); the mean
    loss of the last 20 logged steps must be below that of the first 20."""
    print("== e2e small training, embedded data, bf16", flush=True)
    _need_gpu()
    out = os.path.join(args.out, "train_small")
    cmd = [
        sys.executable, "-P", "-m", "semmim", "train", "--preset", "small",
        "--steps", str(args.train_steps), "--out", out, "--log-every", "1",
        "--set", "train.eval_at_end=false", "--set", "train.amp=true",
    ]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (open(os.path.join(args.out, "train_small.log"), "w")).write(proc.stdout + proc.stderr)
    if proc.returncode:
        print(proc.stdout[-2000:] + proc.stderr[-2000:])
        print(f"  training FAILED (exit {proc.returncode})")
        return 1
    logs = glob.glob(os.path.join(out, "**", "log.csv"), recursive=True)
    with open(logs[0]) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
    first, last = statistics.mean(losses[:20]), statistics.mean(losses[-20:])
    fell = last < first
    result = {
        "steps": len(losses),
        "first20": first,
        "last20": last,
        "fell": fell,
        "wall_s": time.time() - t0,
    }
    _write(args, "train", result)
    print(
        f"  {len(losses)} steps in {result['wall_s']:.0f} s: loss {first:.3f} (first 20) -> "
        f"{last:.3f} (last 20): {'falls' if fell else 'DOES NOT FALL'}",
        flush=True,
    )
    return 0 if fell else 1


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table_lines(rows: dict[str, dict], train: dict | None, args) -> list[str]:
    """The end-to-end table from the sections' JSON results (``rows``: path -> result)."""
    lines = []
    devices = sorted({r.get("device", "?") for r in rows.values()})
    cards = {(r.get("card"), r.get("peak_bf16")) for r in rows.values()}
    peak = (
        ", ".join(
            f"{c} {p / 1e12:.0f} TFLOP/s dense bf16" if c else "card unknown: no MFU"
            for c, p in sorted(cards, key=str)
        )
        or "-"
    )
    lines.append(
        f"== e2e table: {args.preset} {args.image_size} px, T={args.tokens}, {args.steps} timed "
        f"steps; device {' / '.join(devices) or '-'}; MFU vs {peak}"
    )
    lines.append(
        f"{'path':<52} {'batch':>5} {'ms/step':>8} {'pairs/s':>8} {'peak GiB':>8} {'MFU':>6}"
    )
    for name in PATHS:
        r = rows.get(name)
        if r is None:
            lines.append(f"{PATHS[name]['label']:<52} (not measured)")
            continue
        lines.append(
            f"{r['label']:<52} {r['batch']:>5} {r['step_s'] * 1e3:>8.1f} {r['pairs_per_s']:>8.1f}"
            f" {r['peak_gib']:>8.1f} {_pct(r['mfu']):>6}"
        )
    if not rows:
        lines.append("(no results: every measuring section failed or was skipped)")
    a, b = rows.get("fast"), rows.get("fast_compiled")
    c, c16 = rows.get("reference"), rows.get("reference_bf16")
    if a and c16:
        lines.append(
            f"fast / reference bf16 (same precision): "
            f"{a['pairs_per_s'] / c16['pairs_per_s']:.2f}x pairs/s"
        )
    if a and c:
        mem = c.get("fast_peak_gib_at_this_batch")
        lines.append(
            f"fast / reference fp32: {a['pairs_per_s'] / c['pairs_per_s']:.2f}x pairs/s (target >= 3x);"
            f" peak memory at the reference's batch {c['batch']}: "
            + (f"{mem / c['peak_gib']:.2f}x (target <= 0.6x)" if mem else "not measured")
        )
    if a:
        lines.append(f"fast MFU {_pct(a['mfu'])} (target >= 40%)")
    if a and b:
        lines.append(f"compiled / eager fast: {b['pairs_per_s'] / a['pairs_per_s']:.2f}x pairs/s")
    c2 = rows.get("reference_compiled")
    if b and c2:
        lines.append(
            f"fast / reference, both bf16 and compiled: "
            f"{b['pairs_per_s'] / c2['pairs_per_s']:.2f}x pairs/s"
            + ("" if b["batch"] == c2["batch"] else f" (batches {b['batch']} / {c2['batch']})")
        )
    for name in ("one_pass", "one_pass75"):
        d = rows.get(name)
        if a and d:
            lines.append(
                f"{name} / fast at batch {d['batch']}: {d['pairs_per_s'] / a['pairs_per_s']:.2f}x "
                f"pairs/s, {d['peak_gib'] / a['peak_gib']:.2f}x peak memory, "
                f"{d['flops_per_step'] / a['flops_per_step']:.2f}x FLOPs"
                + (
                    f", {d['flops_per_step'] / c['flops_per_step'] * c['batch'] / d['batch']:.2f}x"
                    " the reference's FLOPs per pair"
                    if c
                    else ""
                )
            )
    if train:
        lines.append(
            f"small training: loss {train['first20']:.3f} -> {train['last20']:.3f} over "
            f"{train['steps']} steps in {train['wall_s']:.0f} s "
            f"({'falls' if train['fell'] else 'DOES NOT FALL'})"
        )
    return lines


def _read(args, name: str) -> dict | None:
    p = os.path.join(args.out, f"e2e_{name}.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def section_table(args) -> None:
    rows = {name: r for name in PATHS if (r := _read(args, name)) is not None}
    print("\n".join(table_lines(rows, _read(args, "train"), args)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", choices=SECTIONS, default=None, help="default: all, in order")
    ap.add_argument("--list-sections", action="store_true", help="print the sections and stop")
    ap.add_argument("--out", default="/tmp/semmim-e2e", help="results (never the lease's $OUT)")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tokens", type=int, default=32, help="caption length T")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per path")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-batch", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--search-s", type=float, default=60.0, help="time cap of a batch search")
    ap.add_argument("--train-steps", type=int, default=200)
    args = ap.parse_args(argv)
    if args.list_sections:
        print("\n".join(SECTIONS))
        return 0
    os.makedirs(args.out, exist_ok=True)

    from semmim import from_preset

    cfg = from_preset(args.preset, {"vision.image_size": args.image_size})
    f64 = train_flops(cfg, 64, args.tokens)["total"]
    print(
        f"plan: {args.preset} at {args.image_size} px (P={cfg.vision.num_patches}, "
        f"M={cfg.num_masked}), T={args.tokens}; paths {', '.join(PATHS)}: batch search from "
        f"{args.min_batch}, {args.warmup} warm-up + {args.steps} timed steps each; small "
        f"training {args.train_steps} steps; {f64 / 64 / 1e9:.1f} GFLOP per pair per step "
        f"(matrix products); results in {args.out}",
        flush=True,
    )
    sections = [args.section] if args.section else list(SECTIONS)
    status = 0
    for s in sections:
        if s in PATHS or s in SECTION_PATHS:
            for path in SECTION_PATHS.get(s, (s,)):
                section_path(path, args)
        elif s == "train":
            status |= section_train(args)
        else:
            section_table(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
