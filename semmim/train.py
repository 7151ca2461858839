"""The pre-training loop: data, optimiser, schedule, EMA, logging, checkpoints, exact resume, DDP.

``train(model_cfg, train_cfg)`` runs single-process or under ``torchrun`` (one process per GPU, or gloo
on CPU). It is three parts:

- :func:`setup` builds a :class:`Run`: model (optionally DDP-wrapped and ``torch.compile``'d),
  optimizer, schedule, data stream and the committed position (from a checkpoint on resume);
- :func:`train_step` is one optimizer step, **the unit of commit**: ``accum_steps`` micro-batches of
  ``batch_size`` pairs per rank, gradient clipping, AdamW, the warm-up + cosine schedule, the EMA
  update, then ``run.step += 1``. Between two calls the run's state is exactly "after step N";
- :func:`save` writes that state as a checkpoint (:mod:`semmim.checkpoint`).

Interrupts: SIGINT and SIGTERM only set a flag; the step in progress finishes, then a checkpoint is
written and ``train`` returns with ``interrupted=True`` (a second SIGINT exits at once, without
one). DataLoader workers are started with both signals blocked, so a SIGTERM sent to the whole
process group (as job schedulers do) does not kill them under the step that still needs them.

Exact resume: the data order is a pure function of (seed, epoch) (:class:`ResumableBatchSampler`),
augmentation a pure function of (seed, epoch, index), the DataLoader has its own generator, and the
forward pass takes an explicit seed per micro-batch, :func:`step_seed` (seed, step, micro-batch,
rank), so it draws no random number from the process. Each checkpoint holds model (with EMA, ITC
queue, centres), optimizer, scheduler, step, data position and the RNG states at the step boundary
— so N steps + resume + M steps = N+M steps, bit for bit.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from semmim import checkpoint as ckpt
from semmim import dist
from semmim.config import TrainConfig
from semmim.data import (
    Collator,
    DataSource,
    PairDataset,
    ResumableBatchSampler,
    SkipLog,
    make_loader,
    open_data,
)
from semmim.diagnostics import DIAG_COLUMNS
from semmim.transforms import TrainTransform

__all__ = [
    "TrainConfig",
    "Task",
    "train",
    "setup",
    "train_step",
    "save",
    "step_seed",
    "check_resume",
]

log = logging.getLogger("semmim.train")

OBJECTIVES = ("itc", "itm", "mlm", "glob", "mim")
CSV_FIELDS = ("step", "epoch", "lr", "loss", *OBJECTIVES, "pairs_per_s", "data_wait", "elapsed_s")


def csv_fields(objectives: tuple[str, ...], diagnostics: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The CSV log's columns for a task with these loss names and diagnostic columns."""
    timing = ("pairs_per_s", "data_wait", "elapsed_s")
    return ("step", "epoch", "lr", "loss", *objectives, *timing, *diagnostics)


# What a resume may not change without ``allow_changes``: each changes which pairs the remaining
# steps see (order, split or dataset) or what one step means.
RESUME_CONTRACT = (
    "data",
    "val_size",
    "validation",
    "split_seed",
    "seed",
    "batch_size",
    "accum_steps",
    "world_size",
)


# --------------------------------------------------------------------------------- optimisation
_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "temp", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on biases, norms, embeddings, tokens, temperature.

    A model's ``no_weight_decay()`` names (timm's convention; :meth:`semmim.SemMIM.no_weight_decay`
    lists its position embeddings and learned tokens, e.g. ``net.predictor_pos``) are never
    decayed; the generic rules below cover the rest. Only parameters that require gradients
    (the EMA copy does not) are included.
    """
    named = getattr(model, "no_weight_decay", None)
    no_decay_names = set(named()) if callable(named) else set()
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
            or name in no_decay_names
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


# ------------------------------------------------------------------------------------- logging
class _Window:
    """Accumulates losses and timings between log steps without host syncs per step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.diag_sums: dict[str, torch.Tensor] = {}
        self.diag_steps = 0
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

    def add_diagnostics(self, diag: dict[str, torch.Tensor]) -> None:
        """Diagnostics of one step (0-d device tensors), averaged over the steps that had them."""
        if not diag:
            return
        for k, v in diag.items():
            v = v.detach().float()
            self.diag_sums[k] = self.diag_sums[k] + v if k in self.diag_sums else v
        self.diag_steps += 1

    def row(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {k: (v / max(self.steps, 1)).item() for k, v in self.sums.items()}
        out.update({k: (v / self.diag_steps).item() for k, v in self.diag_sums.items()})
        out["pairs_per_s"] = self.pairs / elapsed
        out["data_wait"] = self.wait / elapsed
        return out


def plot_losses(csv_path: str, png_path: str) -> None:
    """Plot the total loss and each objective from the CSV log (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []
    if not rows:
        return
    timing = {"step", "epoch", "lr", "loss", "pairs_per_s", "data_wait", "elapsed_s"}
    objectives = [k for k in header if k not in timing and not k.startswith("diag_")]
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in ("loss", *objectives):
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


def plot_diagnostics(csv_path: str, png_path: str, num_prototypes: int = 0) -> bool:
    """Plot the ``diag_*`` columns of the CSV log beside the losses: teacher entropy (with log K),
    effective K and prototypes in use (with K), student–teacher agreement, text-vs-random mask
    overlap (with M/P when ``config.json`` beside the log gives it). Returns False (and writes
    nothing) when the log has no diagnostics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in DIAG_COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    if not cols:
        return False
    chance = None
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            model = json.load(f).get("model", {})
        num_prototypes = num_prototypes or model.get("head", {}).get("num_prototypes", 0)
        v = model.get("vision", {})
        if v.get("image_size") and v.get("patch_size"):
            p = (v["image_size"] // v["patch_size"]) ** 2
            chance = round(model.get("masking", {}).get("ratio", 0.5) * p) / p

    def series(col):
        pts = [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
        return [s for s, _ in pts], [v for _, v in pts]

    panels = [
        (
            "teacher entropy (nats)",
            ("entropy",),
            math.log(num_prototypes) if num_prototypes else None,
            "log K",
        ),
        ("prototypes: effective K, in use", ("eff_k", "used"), num_prototypes or None, "K"),
        ("student–teacher top-1 agreement", ("agree",), None, ""),
        ("text-guided vs random mask overlap", ("mask_overlap",), chance, "M/P (random)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, stats, ref, ref_label) in zip(axes.flat, panels):
        for col in cols:
            if any(col.endswith("_" + s) for s in stats):
                ax.plot(*series(col), label=col.removeprefix("diag_"), marker=".")
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label=ref_label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def _open_csv(
    path: str, resume_step: int, fieldnames: tuple[str, ...] = CSV_FIELDS
) -> tuple[Any, csv.DictWriter]:
    """Open the CSV log for appending; on resume drop rows logged after the checkpoint's step."""
    rows: list[dict[str, str]] = []
    if resume_step > 0 and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")  # noqa: SIM115 - closed by the caller
    writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f, writer


# ------------------------------------------------------------------------------------- signals
class StopRequest:
    """SIGINT/SIGTERM handler that records the request; the loop stops after the current step.

    A second SIGINT raises KeyboardInterrupt at once (a human pressing Ctrl-C twice); SIGTERM never
    escalates (launchers such as torchrun forward it, so a rank may receive it twice). Forked
    processes that inherit the handler ignore it (only the process that installed it stops).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pid = os.getpid()
        self._sigints = 0
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        self.signum = signum
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt("second SIGINT: exiting without a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM from now on (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Put the previous handlers back (a signal then acts as it did before)."""
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_blocked():
    """Block SIGINT/SIGTERM in this thread; processes forked meanwhile keep them blocked.

    DataLoader workers are forked under this, so a signal to the process group leaves them alive
    (the trainer stops them itself); a signal to this process stays pending, not lost, until the
    block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------------------------- tasks
class Task:
    """What the loop trains: pre-training (this class) or a downstream task (subclasses in
    :mod:`semmim.downstream.tasks`). The loop itself (optimizer, schedule, accumulation, DDP,
    autocast, logs, checkpoints, exact resume) is the same for every task; a task supplies

    - ``name`` (saved in checkpoints), ``objectives`` (loss names: CSV columns, plot lines),
      ``min_batch`` (smaller micro-batches are skipped: ITM needs two pairs for a negative);
    - :meth:`open_data` (records), :meth:`build_model` (called under ``manual_seed(seed)``),
      :meth:`collate` (records → batch), :meth:`loss` (batch → total and named losses) and
      :meth:`evaluate` (the metric table at the end); :meth:`model_config` adapts the model
      config of a fresh run (e.g. retrieval turns the MLM / MIM losses off);
    - :meth:`config` (plain dict saved in checkpoints, so a resume rebuilds the same task).
    """

    name = "pretrain"
    objectives: tuple[str, ...] = OBJECTIVES
    # Diagnostic columns (semmim.diagnostics); a task whose loss() takes no ``diagnostics``
    # argument sets () and the loop never asks for them.
    diagnostics: tuple[str, ...] = DIAG_COLUMNS
    min_batch = 2

    def config(self) -> dict[str, Any]:
        return {}

    def open_data(self, tcfg: TrainConfig) -> DataSource:
        return open_data(tcfg.data or None, tcfg.val_size, tcfg.split_seed)

    def model_config(self, model_cfg):
        """The model config a fresh run of this task trains (pre-training: as given)."""
        return model_cfg

    def build_model(self, model_cfg, pretrained: bool = True) -> nn.Module:
        """The model; ``pretrained`` False on resume (the checkpoint's weights follow)."""
        from semmim import build_model

        return build_model(model_cfg, pretrained=pretrained)

    def collate(self, model: nn.Module, records, max_len: int):
        return Collator(model.tokenizer, max_len, records)  # with image ids

    def loss(
        self,
        forward: nn.Module,
        batch: dict[str, Any],
        device,
        seed: int,
        check_inputs: bool,
        diagnostics: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named losses); with ``diagnostics`` the dict also holds the model's
        diagnostic tensors (names in :attr:`diagnostics`)."""
        images = batch["images"].to(device, non_blocking=True)
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        image_ids = batch.get("image_ids")
        if image_ids is not None:
            image_ids = image_ids.to(device, non_blocking=True)
        out = forward(
            images,
            ids,
            mask,
            seed=seed,
            check_inputs=check_inputs,
            image_ids=image_ids,
            **({"diagnostics": True} if diagnostics else {}),
        )
        if not diagnostics:
            return out.loss, out.losses
        return out.loss, {**out.losses, **out.diagnostics}

    def evaluate(self, run: Run) -> dict[str, Any]:
        return run_eval(
            run.model, run.source, run.model_cfg, run.tcfg, run.out_dir, run.info.device
        )


def open_run_data(tcfg: TrainConfig, task: Task | None = None) -> DataSource:
    """The data a run trains and evaluates on: the task's split of ``tcfg.data``, with
    ``tcfg.validation`` training images carved into a validation split (evaluated instead of
    the held-out split) when it is > 0. Every caller that opens data for a run uses this."""
    source = (task or Task()).open_data(tcfg)
    if tcfg.validation > 0:
        source = source.carve_validation(tcfg.validation, tcfg.split_seed)
    return source


# ------------------------------------------------------------------------------------ the loop
def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The forward pass's seed for micro-batch ``micro`` of optimizer step ``step`` on ``rank``.

    The first 62 bits of BLAKE2b-64 of ``"semmim:{seed}:{step}:{micro}:{rank}"``: a pure function of
    the run seed and the position, so a resumed run draws the same masks, MLM tokens and noise,
    distinct per rank and micro-batch, and no random number is read from the process's RNG.
    """
    digest = hashlib.blake2b(f"semmim:{seed}:{step}:{micro}:{rank}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 2


def _device(tcfg: TrainConfig) -> str | None:
    return None if tcfg.device == "auto" else tcfg.device


def build_transform(tcfg: TrainConfig, source: DataSource, image_size: int) -> TrainTransform:
    """The training transform: the data source's recommended augmentation unless overridden."""
    scale = source.crop_scale if tcfg.crop_scale_min < 0 else (tcfg.crop_scale_min, 1.0)
    flip = source.flip if tcfg.flip == "auto" else tcfg.flip
    return TrainTransform(image_size, scale=scale, flip=flip)


def resume_changes(state: dict[str, Any], tcfg: TrainConfig, world_size: int) -> list[str]:
    """What the resume contract (``RESUME_CONTRACT``) says changed since ``state`` was saved.

    Returns ``["batch_size: 4 -> 8", ...]``; empty when the resume continues the same run.
    """
    # A key that older checkpoints lack (e.g. split_seed) compares as its current default.
    defaults = TrainConfig().to_dict()
    saved = {**defaults, **state["train_config"], "world_size": state["world_size"]}
    now = {**tcfg.to_dict(), "world_size": world_size}
    return [
        f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_CONTRACT if saved.get(k) != now[k]
    ]


def check_resume(
    state: dict[str, Any], path: str, tcfg: TrainConfig, world_size: int, allow_changes: bool
) -> None:
    """Refuse (ValueError) a resume that breaks the contract, unless ``allow_changes`` (logged)."""
    changed = resume_changes(state, tcfg, world_size)
    if changed and not allow_changes:
        raise ValueError(
            f"--resume: refusing to continue {path} with a different {'; '.join(changed)} (the "
            "remaining steps would see other pairs, or in another order, than the run that "
            "stopped). Give the saved values, or pass --allow-changes to continue anyway"
        )
    if changed and int(os.environ.get("RANK", "0")) == 0:
        log.warning("resuming with changes (allowed): %s", "; ".join(changed))


class _BatchStream:
    """The loader's batches in order, across epochs; tracks the data position (epoch, batch)."""

    def __init__(self, loader, sampler: ResumableBatchSampler, epoch: int, batch: int) -> None:
        self.loader, self.sampler = loader, sampler
        self.epoch, self.batch_in_epoch = epoch, batch
        self._it = None

    def _start(self) -> None:
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        with _signals_blocked():  # workers are forked here (the first time)
            self._it = iter(self.loader)

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._start()
            batch = next(self._it)
        self.batch_in_epoch += 1
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


@dataclass
class Run:
    """Everything :func:`setup` builds; ``step`` and the stream's position are the committed state."""

    model_cfg: Any
    tcfg: TrainConfig
    info: dist.DistInfo
    model: nn.Module  # the SemMIM module itself (state_dict, EMA, set_step)
    eager: nn.Module  # model or DDP(model): runs the first, checked step of a session
    forward: nn.Module  # what runs the other steps: ``eager``, or torch.compile of it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    source: DataSource
    stream: _BatchStream
    skips: SkipLog
    total_steps: int
    out_dir: str
    ckpt_dir: str
    task: Task = field(default_factory=Task)
    step: int = 0
    start_step: int = 0
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """bf16 under ``amp="bf16"`` (any device) or ``"auto"`` on CUDA; else None (fp32)."""
        amp = self.tcfg.amp
        on = amp == "bf16" or (amp == "auto" and self.info.device.type == "cuda")
        return torch.bfloat16 if on else None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def setup(
    model_cfg,
    tcfg: TrainConfig,
    resume: bool = False,
    source: DataSource | None = None,
    checkpoint: tuple[dict[str, Any], str] | None = None,
    allow_changes: bool = False,
    task: Task | None = None,
) -> Run:
    """Build the run: model, optimizer, schedule, data stream; on resume restore the checkpoint.

    ``checkpoint`` is an already loaded ``(state, path)`` (else the newest intact checkpoint of
    ``OUT/checkpoints`` is loaded). A resume that breaks the contract (:func:`check_resume`)
    raises ValueError naming the changes unless ``allow_changes``. ``task``: what to train
    (default: pre-training); a resume must continue the checkpoint's task.
    """
    from semmim import SemMIMConfig

    task = task or Task()

    info = dist.init_distributed(_device(tcfg))
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    out_dir, ckpt_dir = tcfg.out, os.path.join(tcfg.out, "checkpoints")
    state = None
    if resume:
        state, path = checkpoint or ckpt.load_latest_intact(ckpt_dir, required=ckpt.TRAIN_KEYS)
        model_cfg = SemMIMConfig.from_dict(state["config"])
        saved_task = state.get("task", "pretrain")
        if saved_task != task.name:
            raise ValueError(
                f"--resume: the checkpoint {path} is a {saved_task!r} run, not {task.name!r}"
            )
        check_resume(state, path, tcfg, info.world_size, allow_changes)
    if source is None:
        source = open_run_data(tcfg, task)  # before the model: classes may come from the data
    if state is None:
        model_cfg = task.model_config(model_cfg)
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(
                {
                    "model": model_cfg.to_dict(),
                    "train": tcfg.to_dict(),
                    "world_size": info.world_size,
                    **(
                        {"task": task.name, "task_config": task.config()}
                        if task.name != "pretrain"
                        else {}
                    ),
                },
                f,
                indent=2,
            )

    # Same init on every rank (DDP also broadcasts rank 0's), then per-rank randomness.
    torch.manual_seed(tcfg.seed)
    model = task.build_model(model_cfg, pretrained=state is None).to(info.device)
    torch.manual_seed(tcfg.seed + 1000 * info.rank)
    if tcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)  # the model's switch (timm's convention)
        log.info("gradient checkpointing on")

    if info.is_main:
        log.info("data %s", source.describe())
    # A sample of each split must decode (DataError otherwise): not 0 pairs trained, then a crash.
    source.verify(held_out=tcfg.eval_at_end)
    max_len = min(tcfg.max_text_len, model_cfg.text.max_len)
    transform = build_transform(tcfg, source, model_cfg.vision.image_size)
    dataset = PairDataset(source.train, transform, tcfg.seed)
    sampler = ResumableBatchSampler(
        len(dataset), tcfg.batch_size, tcfg.seed, info.rank, info.world_size
    )
    loader = make_loader(
        dataset, sampler, task.collate(model, source.train, max_len), tcfg.num_workers, tcfg.seed
    )
    steps_per_epoch = max(1, len(sampler) // tcfg.accum_steps)
    total_steps = tcfg.steps or math.ceil(tcfg.epochs * steps_per_epoch)
    warmup = tcfg.warmup_steps if tcfg.warmup_steps >= 0 else max(1, total_steps // 20)

    eager: nn.Module = model
    if info.distributed:
        eager = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )
    # The first step runs eagerly (value checks, true dispatch record); the compiled module
    # then sees check_inputs=False only, so it compiles once.
    forward = torch.compile(eager) if tcfg.compile else eager
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
        elapsed_before = float(state.get("elapsed_s", 0.0))
        skips.load(state.get("skip_log", {}))
        rngs = state["rng"]
        if info.rank < len(rngs):
            ckpt.set_rng_state(rngs[info.rank])
        if info.is_main:
            log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, batch_in_epoch)
    return Run(
        model_cfg=model_cfg,
        tcfg=tcfg,
        info=info,
        model=model,
        eager=eager,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        source=source,
        stream=_BatchStream(loader, sampler, epoch, batch_in_epoch),
        skips=skips,
        total_steps=total_steps,
        out_dir=out_dir,
        ckpt_dir=ckpt_dir,
        task=task,
        step=step,
        start_step=step,
        elapsed_before=elapsed_before,
    )


def diagnostic_step(run: Run) -> bool:
    """Whether the step about to run (``run.step + 1``) computes diagnostics: every
    ``train.diag_every`` steps (0 = every ``log_every``), for tasks that have them."""
    every = run.tcfg.diag_every or run.tcfg.log_every
    return bool(run.task.diagnostics) and (run.step + 1) % every == 0


def train_step(run: Run, check_inputs: bool = False) -> dict[str, Any]:
    """One optimizer step (the unit of commit); returns its losses, diagnostics (a dict of 0-d
    device tensors, empty on steps without them: :func:`diagnostic_step`), pairs, data wait
    and lr.

    ``check_inputs`` runs the model's value-reading input checks (host syncs) and the step eagerly
    (``run.eager``); the loop turns them on for the first step of a session only.
    """
    tcfg, info = run.tcfg, run.info
    diag_names = set(run.task.diagnostics) if diagnostic_step(run) else set()
    diag: dict[str, torch.Tensor] = {}
    diag_micro = 0
    run.model.set_step(run.step, run.total_steps)
    amp_dtype = run.amp_dtype
    wait, pairs = 0.0, 0
    losses: dict[str, torch.Tensor] = {}
    for micro in range(tcfg.accum_steps):
        t0 = time.perf_counter()
        batch = run.stream.next()
        wait += time.perf_counter() - t0
        for key, reason in batch["bad"]:
            run.skips.add(reason, key)
        if "images" not in batch or len(batch["images"]) < run.task.min_batch:
            continue  # nothing (or a single pair: no negatives) left after skips
        last = micro == tcfg.accum_steps - 1
        no_sync = info.distributed and not last
        module = run.eager if check_inputs else run.forward
        sync = run.eager.no_sync() if no_sync else contextlib.nullcontext()
        amp = torch.autocast(
            info.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
        )
        seed = step_seed(tcfg.seed, run.step, micro, info.rank)
        with sync, amp:
            if diag_names:
                loss, parts = run.task.loss(
                    module, batch, info.device, seed, check_inputs, diagnostics=True
                )
            else:
                loss, parts = run.task.loss(module, batch, info.device, seed, check_inputs)
            (loss / tcfg.accum_steps).backward()
        pairs += len(batch["images"]) * info.world_size
        for k, v in {"loss": loss, **parts}.items():
            if k in diag_names:  # averaged over the micro-batches that ran (below)
                v = v.detach()
                diag[k] = diag[k] + v if k in diag else v
                continue
            v = v.detach() / tcfg.accum_steps
            losses[k] = losses[k] + v if k in losses else v
        diag_micro += bool(diag_names)
    diag = {k: v / diag_micro for k, v in diag.items()}
    if tcfg.grad_clip > 0:
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.model.update_momentum()
    run.step += 1
    return {"losses": losses, "diagnostics": diag, "pairs": pairs, "wait": wait, "lr": lr}


def save(run: Run, final: bool = False) -> str | None:
    """Checkpoint the committed state (call it between steps); every rank must call it.

    Returns the path on rank 0. If a DataLoader worker died (its SIGCHLD error can surface inside
    ``torch.save``), the loader is shut down and the write retried once.
    """
    info = run.info
    rngs = [ckpt.rng_state()]
    if info.distributed:
        rngs = [None] * info.world_size
        torch.distributed.all_gather_object(rngs, ckpt.rng_state())
    path = None
    if info.is_main:
        for attempt in (1, 2):
            try:
                path = ckpt.save_checkpoint(
                    _payload(run, rngs), run.ckpt_dir, run.step, run.tcfg.keep_ckpts
                )
                break
            except RuntimeError as err:
                if attempt == 2 or "DataLoader worker" not in str(err):
                    raise
                log.warning("a data worker died (%s); stopping the loader, writing again", err)
                run.stream.close()
        if final:
            log.info("checkpoint %s", path)
    dist.barrier()
    return path


def _payload(run: Run, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "step": run.step,
        "epoch": run.stream.epoch,
        "batch_in_epoch": run.stream.batch_in_epoch,
        "rng": rngs,
        "config": run.model_cfg.to_dict(),
        "train_config": run.tcfg.to_dict(),
        "total_steps": run.total_steps,
        "world_size": run.info.world_size,
        "skipped": run.skips.summary(),
        "skip_log": run.skips.state(),
        "elapsed_s": run.elapsed(),
        **(
            {"task": run.task.name, "task_config": run.task.config()}
            if run.task.name != "pretrain"
            else {}
        ),
    }


def _stop_agreed(run: Run, stop: StopRequest) -> bool:
    """Whether any rank was asked to stop (one tiny all-reduce per step when distributed)."""
    if not run.info.distributed:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=run.info.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _dispatch_recorder():
    """``semmim.kernels.record_dispatch()``: which backend each op ran in the first step."""
    from semmim.kernels import record_dispatch

    return record_dispatch()


def train(
    model_cfg,
    tcfg: TrainConfig,
    resume: bool = False,
    source: DataSource | None = None,
    return_model: bool = False,
    checkpoint: tuple[dict[str, Any], str] | None = None,
    allow_changes: bool = False,
    task: Task | None = None,
) -> dict[str, Any]:
    """Train (or resume) a SemMIM model; returns a summary dict (also written to ``OUT/summary.json``).

    Args:
        model_cfg: a :class:`semmim.SemMIMConfig` (ignored on resume: the checkpoint's is used).
        tcfg: run settings. On resume, pass the checkpoint's ``train_config`` with any changes.
        resume: continue from the newest intact checkpoint of ``OUT/checkpoints``.
        source: the opened ``tcfg.data`` (opened here when None).
        return_model: also return the trained model (unwrapped from DDP) as ``summary["model"]``.
        checkpoint / allow_changes / task: see :func:`setup` (task: default pre-training).
    """
    stop = StopRequest()
    stop.install()  # from here on a signal is a stop request, even during setup
    try:
        run = setup(model_cfg, tcfg, resume, source, checkpoint, allow_changes, task)
        interrupted, history, seconds = _loop(run, stop)
    finally:
        stop.restore()
    info = run.info
    total_wait, total_time = seconds
    summary: dict[str, Any] = {
        "step": run.step,
        "total_steps": run.total_steps,
        "interrupted": interrupted,
        "train_pairs": len(run.source.train),
        "heldout_pairs": len(run.source.val),
        "seconds": run.elapsed(),
        "seconds_this_session": time.perf_counter() - run.started,
        "data_wait_share": total_wait / max(total_time, 1e-9),
        "pairs_per_s": (run.step - run.start_step)
        * tcfg.batch_size
        * tcfg.accum_steps
        * info.world_size
        / max(total_time, 1e-9),
        "skipped": run.skips.summary(),
        "history": history,
    }
    if info.is_main:
        csv_path = os.path.join(run.out_dir, "log.csv")
        plot_losses(csv_path, os.path.join(run.out_dir, "loss.png"))
        if run.task.diagnostics:
            plot_diagnostics(csv_path, os.path.join(run.out_dir, "diagnostics.png"))
        finished = not interrupted and run.step >= run.total_steps
        if tcfg.eval_at_end and finished and run.source.val:
            summary["eval"] = run.task.evaluate(run)
        with open(os.path.join(run.out_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    dist.barrier()
    if return_model:
        summary["model"] = run.model
    return summary


def _loop(run: Run, stop: StopRequest) -> tuple[bool, list[dict[str, float]], tuple]:
    """Steps until ``stop_at`` or a stop request, logging and checkpointing; a final checkpoint."""
    tcfg = run.tcfg
    info = run.info
    csv_file, writer = (
        _open_csv(
            os.path.join(run.out_dir, "log.csv"),
            run.step,
            csv_fields(run.task.objectives, run.task.diagnostics),
        )
        if info.is_main
        else (None, None)
    )
    history: list[dict[str, float]] = []
    window = _Window()
    total_wait, total_time = 0.0, 0.0
    stop_at = tcfg.stop_at or run.total_steps
    bar = tqdm(
        total=stop_at,
        initial=run.step,
        desc="train",
        disable=not info.is_main,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    run.model.train()
    saved_at = -1
    try:
        while run.step < stop_at and not _stop_agreed(run, stop):
            t_step = time.perf_counter()
            if run.step == run.start_step:  # first step of the session: check and report
                with _dispatch_recorder() as used:
                    result = train_step(run, check_inputs=True)
                if info.is_main:
                    log.info("kernels (first step): %s", _format_dispatch(used))
            else:
                result = train_step(run)
            window.add(result["losses"], result["pairs"], result["wait"])
            window.add_diagnostics(result["diagnostics"])
            total_wait += result["wait"]
            total_time += time.perf_counter() - t_step
            bar.update(1)
            if run.step % tcfg.log_every == 0 or run.step == stop_at:
                row = window.row()
                row.update(step=run.step, epoch=run.stream.epoch, lr=result["lr"])
                row["elapsed_s"] = run.elapsed()
                history.append(row)
                if writer is not None:
                    writer.writerow(row)
                    csv_file.flush()
                bar.set_postfix(_postfix(row), refresh=False)
                window.reset()
            if run.step % tcfg.ckpt_every == 0 and run.step < stop_at:
                save(run)
                saved_at = run.step
        interrupted = stop.requested
        if interrupted and info.is_main:
            name = signal.Signals(stop.signum).name if stop.signum else "a signal"
            log.warning("%s: stopping after step %d, writing a checkpoint", name, run.step)
        if saved_at != run.step:
            save(run, final=True)
    finally:
        bar.close()
        if csv_file is not None:
            csv_file.close()
        run.stream.close()

    return interrupted, history, (total_wait, total_time)


def _format_dispatch(used: dict[str, set[str]]) -> str:
    return ", ".join(f"{op}={'/'.join(sorted(b))}" for op, b in sorted(used.items())) or "none"


_NOT_LOSSES = {"step", "epoch", "lr", "pairs_per_s", "data_wait", "elapsed_s"}


def _postfix(row: dict[str, float]) -> dict[str, str]:
    post = {k: f"{row[k]:.3f}" for k in row if k not in _NOT_LOSSES and not k.startswith("diag_")}
    post["pairs/s"] = f"{row['pairs_per_s']:.0f}"
    post["wait"] = f"{100 * row['data_wait']:.0f}%"
    return post


def run_eval(
    model,
    source: DataSource,
    model_cfg,
    tcfg: TrainConfig,
    out_dir: str,
    device: torch.device,
    write: bool = True,
) -> dict[str, Any]:
    """Held-out evaluation at the end of training; prints the table, writes eval.json / eval.txt
    (``write=False``: only returns the result)."""
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
    result["split"] = source.eval_split
    if not write:
        return result
    table = format_table(result)
    print(table, flush=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "eval.txt"), "w") as f:
        f.write(table + "\n")
    return result
