"""The pre-training loop: data, optimiser, schedule, EMA, logging, checkpoints, exact resume, DDP.

``train(model_cfg, train_cfg)`` runs single-process or under ``torchrun`` (one process per GPU, or gloo
on CPU). Per optimizer step it takes ``accum_steps`` micro-batches of ``batch_size`` pairs per rank,
clips the gradient norm, steps AdamW and the warm-up + cosine schedule, then updates the EMA model.

Exact resume: the data order is a pure function of (seed, epoch) (:class:`ResumableBatchSampler`),
augmentation a pure function of (seed, epoch, index), the DataLoader has its own generator, and each
checkpoint holds model (with EMA, ITC queue, centres), optimizer, scheduler, step, data position and
the RNG states captured at that step boundary — so N steps + resume + M steps = N+M steps.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from semmim import checkpoint as ckpt
from semmim import dist
from semmim.data import (
    Collator,
    DataSource,
    PairDataset,
    ResumableBatchSampler,
    SkipLog,
    make_loader,
    open_data,
)
from semmim.transforms import TrainTransform

log = logging.getLogger("semmim.train")

OBJECTIVES = ("itc", "itm", "mlm", "glob", "mim")
CSV_FIELDS = ("step", "epoch", "lr", "loss", *OBJECTIVES, "pairs_per_s", "data_wait", "elapsed_s")


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run that is not the model (``--set train.<field>=...`` changes any field).

    steps: optimizer steps; 0 = derive from ``epochs``. epochs: passes over the training pairs.
    batch_size: pairs per rank per micro-batch; effective batch = batch_size·accum_steps·world_size.
    warmup_steps: linear warm-up; -1 = 5% of the steps. min_lr_ratio: cosine floor as a fraction of lr.
    stop_at: stop (with a checkpoint) after this step as if interrupted, keeping the schedule of
        ``steps`` — for time-boxed jobs and the resume test; 0 = off.
    val_size: held-out images (fraction < 1 or a count); ignored by the synthetic data.
    crop_scale_min / flip: augmentation; -1 / "auto" = what the data source recommends.
    device: "auto" (CUDA when available), "cuda" or "cpu". amp: bf16 autocast, on CUDA only.
    threads: torch intra-op threads of the training process; 0 = torch's default.
    """

    data: str = ""
    out: str = "runs/semmim"
    steps: int = 0
    epochs: float = 0.0
    batch_size: int = 32
    accum_steps: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = -1
    grad_clip: float = 1.0
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    stop_at: int = 0
    num_workers: int = 2
    seed: int = 0
    val_size: float = 0.1
    max_text_len: int = 40
    crop_scale_min: float = -1.0
    flip: str = "auto"
    device: str = "auto"
    amp: bool = True
    grad_checkpointing: bool = False
    threads: int = 0
    eval_at_end: bool = True
    eval_rerank_k: int = 16
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                "bool": isinstance(v, bool),
                "str": isinstance(v, str),
            }[f.type]
            if not ok:
                raise ValueError(f"train.{f.name}: expected {f.type}, got {v!r}")
        for name in (
            "batch_size",
            "accum_steps",
            "log_every",
            "ckpt_every",
            "keep_ckpts",
            "max_text_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in (
            "steps",
            "epochs",
            "stop_at",
            "num_workers",
            "threads",
            "weight_decay",
            "grad_clip",
            "eval_rerank_k",
            "val_size",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr: must be > 0, got {self.lr}")
        if self.flip not in ("auto", "swap", "none"):
            raise ValueError(f"train.flip: must be auto, swap or none, got {self.flip!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"train.device: must be auto, cuda or cpu, got {self.device!r}")
        if not (self.crop_scale_min == -1.0 or 0 < self.crop_scale_min <= 1):
            raise ValueError(
                f"train.crop_scale_min: must be in (0, 1] or -1, got {self.crop_scale_min}"
            )

    def override(self, overrides: dict[str, Any]) -> TrainConfig:
        """Copy with ``{"field": value}`` changes; unknown fields raise ValueError naming them."""
        valid = [f.name for f in fields(self)]
        for key in overrides:
            if key not in valid:
                raise ValueError(f"train.{key}: unknown key; valid keys of train: {valid}")
        casted = {
            k: float(v)
            if _field_type(k) == "float" and isinstance(v, int) and not isinstance(v, bool)
            else v
            for k, v in overrides.items()
        }
        return dataclasses.replace(self, **casted)


def _field_type(name: str) -> str:
    return {f.name: f.type for f in fields(TrainConfig)}[name]


# --------------------------------------------------------------------------------- optimisation
_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "temp", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on biases, norms, embeddings, tokens, temperature.

    Only parameters that require gradients (the EMA copy does not) are included.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            p.ndim < 2
            or id(p) in no_decay_ids
            or any(k in leaf for k in _NO_DECAY_NAMES)
            or "embed" in leaf
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Multiplier of the base lr at step s: linear warm-up to 1, then cosine down to ``min_lr_ratio``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute transformer blocks in backward instead of storing their activations.

    Uses the model's own switch when it has one (``set_grad_checkpointing`` /
    ``gradient_checkpointing_enable``); otherwise wraps the forward of every student block that has
    trainable parameters (ViT, BERT, fusion and predictor layers) in ``torch.utils.checkpoint``. The
    EMA blocks have no trainable parameters, run under no_grad, and are left alone, so the EMA update is
    unaffected. Returns the number of wrapped blocks (-1 when the model's own switch was used).
    """
    for name in ("set_grad_checkpointing", "gradient_checkpointing_enable"):
        if hasattr(model, name):
            getattr(model, name)(True) if name == "set_grad_checkpointing" else getattr(
                model, name
            )()
            return -1
    block_names = ("ViTBlock", "BertLayer", "FusionLayer", "PredictorBlock")
    wrapped = 0
    for module in model.modules():
        if type(module).__name__ not in block_names:
            continue
        if not any(p.requires_grad for p in module.parameters()):
            continue
        original = module.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(
                _original, *args, use_reentrant=False, **kwargs
            )

        module.forward = forward
        wrapped += 1
    return wrapped


# ------------------------------------------------------------------------------------- logging
class _Window:
    """Accumulates losses and timings between log steps without host syncs per step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.pairs = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], pairs: int, wait: float) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        self.pairs += pairs
        self.wait += wait

    def row(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {k: (v / max(self.steps, 1)).item() for k, v in self.sums.items()}
        out["pairs_per_s"] = self.pairs / elapsed
        out["data_wait"] = self.wait / elapsed
        return out


def plot_losses(csv_path: str, png_path: str) -> None:
    """Plot the total loss and each objective from the CSV log (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in ("loss", *OBJECTIVES):
        values = [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]
        if not all(math.isnan(v) for v in values):
            ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(csv_path))) or "training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _open_csv(path: str, resume_step: int) -> tuple[Any, csv.DictWriter]:
    """Open the CSV log for appending; on resume drop rows logged after the checkpoint's step."""
    rows: list[dict[str, str]] = []
    if resume_step > 0 and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")  # noqa: SIM115 - closed by the caller
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f, writer


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt (schedulers send it before killing), main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------ the loop
def _device(tcfg: TrainConfig) -> str | None:
    return None if tcfg.device == "auto" else tcfg.device


def build_transform(tcfg: TrainConfig, source: DataSource, image_size: int) -> TrainTransform:
    """The training transform: the data source's recommended augmentation unless overridden."""
    scale = source.crop_scale if tcfg.crop_scale_min < 0 else (tcfg.crop_scale_min, 1.0)
    flip = source.flip if tcfg.flip == "auto" else tcfg.flip
    return TrainTransform(image_size, scale=scale, flip=flip)


def train(
    model_cfg,
    tcfg: TrainConfig,
    resume: bool = False,
    source: DataSource | None = None,
    return_model: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a SemMIM model; returns a summary dict (also written to ``OUT/summary.json``).

    Args:
        model_cfg: a :class:`semmim.SemMIMConfig` (ignored on resume: the checkpoint's is used).
        tcfg: run settings. On resume, pass the checkpoint's ``train_config`` with any changes.
        resume: continue from ``OUT/checkpoints/latest``.
        source: the opened ``tcfg.data`` (opened here when None).
        return_model: also return the trained model (unwrapped from DDP) as ``summary["model"]``.
    """
    from semmim import SemMIM, SemMIMConfig

    info = dist.init_distributed(_device(tcfg))
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    out_dir, ckpt_dir = tcfg.out, os.path.join(tcfg.out, "checkpoints")
    state = None
    if resume:
        state = ckpt.load_checkpoint(ckpt_dir, map_location="cpu")
        model_cfg = SemMIMConfig.from_dict(state["config"])
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(
                {
                    "model": model_cfg.to_dict(),
                    "train": dataclasses.asdict(tcfg),
                    "world_size": info.world_size,
                },
                f,
                indent=2,
            )

    # Same init on every rank (DDP also broadcasts rank 0's), then per-rank randomness.
    torch.manual_seed(tcfg.seed)
    model = SemMIM(model_cfg).to(info.device)
    torch.manual_seed(tcfg.seed + 1000 * info.rank)
    if tcfg.grad_checkpointing:
        n = enable_gradient_checkpointing(model)
        log.info("gradient checkpointing on (%s)", "model switch" if n < 0 else f"{n} blocks")

    if source is None:
        source = open_data(tcfg.data or None, tcfg.val_size, tcfg.seed)
    if info.is_main:
        log.info("data %s", source.describe())
    image_size = model_cfg.vision.image_size
    max_len = min(tcfg.max_text_len, model_cfg.text.max_len)
    dataset = PairDataset(source.train, build_transform(tcfg, source, image_size), tcfg.seed)
    sampler = ResumableBatchSampler(
        len(dataset), tcfg.batch_size, tcfg.seed, info.rank, info.world_size
    )
    loader = make_loader(
        dataset, sampler, Collator(model.tokenizer, max_len), tcfg.num_workers, tcfg.seed
    )
    steps_per_epoch = max(1, len(sampler) // tcfg.accum_steps)
    total_steps = tcfg.steps or math.ceil(tcfg.epochs * steps_per_epoch)
    if total_steps <= 0:
        raise ValueError("set --steps or --epochs (train.steps / train.epochs) to a positive value")
    warmup = tcfg.warmup_steps if tcfg.warmup_steps >= 0 else max(1, total_steps // 20)

    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )
    optimizer = torch.optim.AdamW(
        param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, tcfg.min_lr_ratio)
    )
    skips = SkipLog()
    for reason, n in source.skips.counts.items():
        skips.counts[reason] += n
    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        elapsed_before = state.get("elapsed_s", 0.0)
        skips.load(state.get("skip_log", {}))
        rngs = state["rng"]
        if info.rank < len(rngs):
            ckpt.set_rng_state(rngs[info.rank])
        else:
            torch.manual_seed(tcfg.seed + 1000 * info.rank + step)
        if info.is_main:
            log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, batch_in_epoch)

    csv_file, writer = (
        _open_csv(os.path.join(out_dir, "log.csv"), step) if info.is_main else (None, None)
    )
    use_amp = tcfg.amp and info.device.type == "cuda"
    committed = {
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "rng": ckpt.rng_state(),
    }
    history: list[dict[str, float]] = []
    window = _Window()
    total_wait, total_time = 0.0, 0.0
    start = time.perf_counter()
    stop_at = tcfg.stop_at or total_steps
    interrupted = False

    def save(final: bool = False, gather: bool = True) -> None:
        rngs = [committed["rng"]]
        if info.distributed and gather:
            rngs = [None] * info.world_size
            torch.distributed.all_gather_object(rngs, committed["rng"])
        if info.is_main:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": committed["step"],
                "epoch": committed["epoch"],
                "batch_in_epoch": committed["batch_in_epoch"],
                "rng": rngs,
                "config": model_cfg.to_dict(),
                "train_config": dataclasses.asdict(tcfg),
                "total_steps": total_steps,
                "world_size": info.world_size,
                "skipped": skips.summary(),
                "skip_log": skips.state(),
                "elapsed_s": elapsed_before + time.perf_counter() - start,
            }
            path = ckpt.save_checkpoint(payload, ckpt_dir, committed["step"], tcfg.keep_ckpts)
            if final:
                log.info("checkpoint %s", path)
        if info.distributed and gather:
            dist.barrier()

    bar = tqdm(
        total=stop_at,
        initial=step,
        desc="train",
        disable=not info.is_main,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    sampler.set_epoch(epoch, batch_in_epoch)
    it = iter(loader)
    model.train()
    try:
        with _sigterm_as_interrupt():
            while step < stop_at:
                t_step = time.perf_counter()
                wait = 0.0
                pairs = 0
                losses_sum: dict[str, torch.Tensor] = {}
                set_step = getattr(model, "set_step", None)
                if set_step is not None:
                    set_step(step, total_steps)
                for micro in range(tcfg.accum_steps):
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        epoch, batch_in_epoch = epoch + 1, 0
                        sampler.set_epoch(epoch, 0)
                        it = iter(loader)
                        batch = next(it)
                    wait += time.perf_counter() - t0
                    batch_in_epoch += 1
                    for key, reason in batch["bad"]:
                        skips.add(reason, key)
                    if "images" not in batch or len(batch["images"]) < 2:
                        continue  # nothing (or a single pair: no negatives) left after skips
                    images = batch["images"].to(info.device, non_blocking=True)
                    ids = batch["input_ids"].to(info.device, non_blocking=True)
                    mask = batch["attention_mask"].to(info.device, non_blocking=True)
                    last = micro == tcfg.accum_steps - 1
                    sync = (
                        contextlib.nullcontext()
                        if (last or not info.distributed)
                        else ddp_model.no_sync()
                    )
                    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp)
                    with sync, amp:
                        out = ddp_model(images, ids, mask)
                        (out.loss / tcfg.accum_steps).backward()
                    pairs += len(images) * info.world_size
                    for k, v in {"loss": out.loss, **out.losses}.items():
                        v = v.detach() / tcfg.accum_steps
                        losses_sum[k] = losses_sum[k] + v if k in losses_sum else v
                if tcfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], tcfg.grad_clip
                    )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                model.update_momentum()
                step += 1
                committed = {
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "rng": ckpt.rng_state(),
                }
                window.add(losses_sum, pairs, wait)
                total_wait += wait
                total_time += time.perf_counter() - t_step
                bar.update(1)
                if step % tcfg.log_every == 0 or step == stop_at:
                    row = window.row()
                    row.update(
                        step=step,
                        epoch=epoch,
                        lr=lr,
                        elapsed_s=elapsed_before + time.perf_counter() - start,
                    )
                    history.append(row)
                    if writer is not None:
                        writer.writerow(row)
                        csv_file.flush()
                    post = {k: f"{row[k]:.3f}" for k in ("loss", *OBJECTIVES) if k in row}
                    post.update(
                        {
                            "pairs/s": f"{row['pairs_per_s']:.0f}",
                            "wait": f"{100 * row['data_wait']:.0f}%",
                        }
                    )
                    bar.set_postfix(post, refresh=False)
                    window.reset()
                if step % tcfg.ckpt_every == 0 and step < stop_at:
                    save()
    except KeyboardInterrupt:
        interrupted = True
        if info.is_main:
            log.warning("interrupted: writing a checkpoint at step %d", committed["step"])
        save(final=True, gather=False)
    finally:
        bar.close()
        if csv_file is not None:
            csv_file.close()
    if not interrupted:
        save(final=True)

    summary: dict[str, Any] = {
        "step": committed["step"],
        "total_steps": total_steps,
        "interrupted": interrupted,
        "train_pairs": len(source.train),
        "heldout_pairs": len(source.val),
        "seconds": elapsed_before + time.perf_counter() - start,
        "seconds_this_session": time.perf_counter() - start,
        "data_wait_share": total_wait / max(total_time, 1e-9),
        "pairs_per_s": (committed["step"] - (state["step"] if state else 0))
        * tcfg.batch_size
        * tcfg.accum_steps
        * info.world_size
        / max(total_time, 1e-9),
        "skipped": skips.summary(),
        "history": history,
    }
    if info.is_main:
        csv_path = os.path.join(out_dir, "log.csv")
        plot_losses(csv_path, os.path.join(out_dir, "loss.png"))
        if tcfg.eval_at_end and not interrupted and committed["step"] >= total_steps and source.val:
            summary["eval"] = run_eval(model, source, model_cfg, tcfg, out_dir, info.device)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    dist.barrier()
    if return_model:
        summary["model"] = model
    return summary


def run_eval(
    model, source: DataSource, model_cfg, tcfg: TrainConfig, out_dir: str, device: torch.device
) -> dict[str, Any]:
    """Held-out evaluation at the end of training; prints the table, writes eval.json / eval.txt."""
    from semmim.eval import evaluate, format_table

    result = evaluate(
        model,
        source.val,
        image_size=model_cfg.vision.image_size,
        max_len=min(tcfg.max_text_len, model_cfg.text.max_len),
        class_names=source.class_names,
        prompt_template=source.prompt_template,
        rerank_k=tcfg.eval_rerank_k,
        batch_size=tcfg.eval_batch_size,
        num_workers=tcfg.num_workers,
        device=device,
    )
    table = format_table(result)
    print(table, flush=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "eval.txt"), "w") as f:
        f.write(table + "\n")
    return result
