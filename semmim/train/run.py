"""Building a run (model, optimizer, schedule, data stream, restored state) and checkpointing it."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from semmim import checkpoint as ckpt
from semmim import dist
from semmim.checkpoint_dcp import by_names, flat_tensors, load_into
from semmim.data import (
    DataError,
    DataSource,
    PairDataset,
    ResumableBatchSampler,
    SkipLog,
    StreamBatches,
    make_loader,
    stop_workers,
)
from semmim.data.stream import open_stream_batches
from semmim.dist import local_shard
from semmim.run_config import TrainConfig
from semmim.rundir import RunDirError, is_no_space, no_space_message, write_json
from semmim.train.fsdp import is_sharded, shard_model
from semmim.train.logs import Window
from semmim.train.optim import lr_lambda, param_groups
from semmim.train.resume import ResumePoint, check_data_listing, resume_point
from semmim.train.signals import signals_blocked
from semmim.train.task import Task, open_run_data
from semmim.transforms import TrainTransform

log = logging.getLogger("semmim.train")


def _device(tcfg: TrainConfig) -> str | None:
    return None if tcfg.device == "auto" else tcfg.device


def build_transform(tcfg: TrainConfig, source: DataSource, image_size: int) -> TrainTransform:
    """The training transform: the data source's recommended augmentation unless overridden."""
    scale = source.crop_scale if tcfg.crop_scale_min < 0 else (tcfg.crop_scale_min, 1.0)
    flip = source.flip if tcfg.flip == "auto" else tcfg.flip
    return TrainTransform(image_size, scale=scale, flip=flip)


class BatchStream:
    """The loader's batches in order, across epochs; tracks the data position (epoch, batch)."""

    def __init__(self, loader, sampler: ResumableBatchSampler, epoch: int, batch: int) -> None:
        self.loader, self.sampler = loader, sampler
        self.epoch, self.batch_in_epoch = epoch, batch
        self._it = None

    def _start(self) -> None:
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        with signals_blocked():  # workers are forked here (the first time)
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
        stop_workers(it)


@dataclass
class Run:
    """Everything :func:`setup` builds; ``step`` and the stream's position are the committed state."""

    model_cfg: Any
    tcfg: TrainConfig
    info: dist.DistInfo
    model: nn.Module  # the task's model itself, unwrapped (state_dict, the task's step hooks)
    eager: nn.Module  # model, DDP(model) or FSDP2-sharded model: the first, checked step
    forward: nn.Module  # what runs the other steps: ``eager``, or torch.compile of it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    source: DataSource
    stream: BatchStream | StreamBatches
    skips: SkipLog
    total_steps: int
    out_dir: str
    ckpt_dir: str
    task: Task = field(default_factory=Task)
    step: int = 0
    start_step: int = 0
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    window: Window = field(default_factory=Window)  # the log rows' partial window (checkpointed)
    data_listing: dict[str, Any] | None = None  # source.listing(), saved for --resume to check

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """bf16 under ``amp="bf16"`` (any device) or ``"auto"`` on CUDA; else None (fp32)."""
        amp = self.tcfg.amp
        on = amp == "bf16" or (amp == "auto" and self.info.device.type == "cuda")
        return torch.bfloat16 if on else None

    @property
    def sharded(self) -> bool:
        """True when the model is FSDP2-sharded (``--fsdp`` with more than one process)."""
        return is_sharded(self.model)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def setup(
    model_cfg,
    tcfg: TrainConfig,
    resume: bool = False,
    source: DataSource | None = None,
    checkpoint: ResumePoint | None = None,
    allow_changes: bool = False,
    task: Task | None = None,
) -> Run:
    """Build the run: model, optimizer, schedule, data stream; on resume restore the checkpoint.

    On resume the rules of :func:`semmim.train.resume.resume_point` apply to the newest intact
    checkpoint of ``OUT/checkpoints`` (the checkpoint's model config; a resume that breaks the
    contract raises ValueError naming the changes unless ``allow_changes``; the task must be the
    checkpoint's), unless ``checkpoint`` is a :class:`ResumePoint` they were already applied to
    (then ``tcfg`` is its ``tcfg``). ``task``: what to train (default: pre-training).
    """
    task = task or Task()

    info = dist.init_distributed(_device(tcfg))
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    out_dir, ckpt_dir = tcfg.out, os.path.join(tcfg.out, "checkpoints")
    state = None
    if resume:
        point = checkpoint or resume_point(
            tcfg.out, info.world_size, allow_changes, task.name, tcfg=tcfg
        )
        state, model_cfg = point.state, point.model_cfg
    if source is None:
        source = open_run_data(tcfg, task)  # before the model: classes may come from the data
    listing = source.listing()  # saved in config.json and every checkpoint
    if state is not None:
        check_data_listing(state, listing, source, point.path, allow_changes)
    if state is None:
        model_cfg = task.model_config(model_cfg)
    if info.is_main:
        write_json(
            os.path.join(out_dir, "config.json"),
            {
                "model": model_cfg.to_dict(),
                "train": tcfg.to_dict(),
                "world_size": info.world_size,
                "data_listing": listing,  # semmim ablate compares its runs' data
                **(
                    {"task": task.name, "task_config": task.config()}
                    if task.name != "pretrain"
                    else {}
                ),
            },
        )

    # Same init on every rank (DDP also broadcasts rank 0's), then per-rank randomness.
    torch.manual_seed(tcfg.seed)
    model = task.build_model(model_cfg, pretrained=state is None).to(info.device)
    if state is None and tcfg.init:  # --init albef:FILE (a resume has the weights already)
        from semmim.albef import init_from

        init_from(model, tcfg.init, out_dir if info.is_main else None, task.name)
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
    # alpha channels (where the images have them) for the object-coverage diagnostics
    alpha = bool(task.diagnostics)
    if source.streaming:
        stream: BatchStream | StreamBatches = open_stream_batches(
            source,
            tcfg,
            info,
            transform,
            task.collate(model, None, max_len),
            signals_blocked,
            alpha,
        )
        total_steps = tcfg.steps
    else:
        if tcfg.data_resampled:
            raise DataError(f"--data-resampled: {source.spec!r} is not a wds: stream")
        dataset = PairDataset(source.train, transform, tcfg.seed, alpha=alpha)
        sampler = ResumableBatchSampler(
            len(dataset), tcfg.batch_size, tcfg.seed, info.rank, info.world_size
        )
        collate = task.collate(model, source.train, max_len)
        loader = make_loader(dataset, sampler, collate, tcfg.num_workers, tcfg.seed)
        stream = BatchStream(loader, sampler, 0, 0)
        steps_per_epoch = max(1, len(sampler) // tcfg.accum_steps)
        total_steps = tcfg.steps or math.ceil(tcfg.epochs * steps_per_epoch)
    warmup = tcfg.warmup_steps if tcfg.warmup_steps >= 0 else max(1, total_steps // 20)

    eager: nn.Module = model
    if tcfg.fsdp and info.distributed:
        eager = shard_model(model)  # in place: the optimizer below holds the sharded params
    elif info.distributed:
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
    step, elapsed_before = 0, 0.0
    window = Window()
    if state is not None:
        window.load(state.get("log_window", {}), info.device)
        if state.get("sharded") or is_sharded(model):
            # by parameter names: onto a sharded or an unsharded model, any process count
            load_into(model, optimizer, by_names(state, model, optimizer))
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if isinstance(stream, StreamBatches):
            positions = state.get("data_stream") or []
            if len(positions) != info.world_size:
                raise DataError(
                    f"--resume: a wds: stream continues on the {len(positions)} processes that "
                    f"saved its position, not {info.world_size} (each rank reads its own shards)"
                )
            stream.load(positions[info.rank])
        else:
            stream.epoch, stream.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        elapsed_before = float(state.get("elapsed_s", 0.0))
        skips.load(state.get("skip_log", {}))
        rngs = state["rng"]
        if info.rank < len(rngs):
            ckpt.set_rng_state(rngs[info.rank])
        if info.is_main:
            log.info("resumed from step %d (epoch %d)", step, stream.epoch)
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
        stream=stream,
        skips=skips,
        total_steps=total_steps,
        out_dir=out_dir,
        ckpt_dir=ckpt_dir,
        task=task,
        step=step,
        start_step=step,
        elapsed_before=elapsed_before,
        window=window,
        data_listing=listing,
    )


def save(run: Run, final: bool = False) -> str | None:
    """Checkpoint the committed state (call it between steps); every rank must call it.

    Returns the path on rank 0. If a DataLoader worker died (its SIGCHLD error can surface inside
    ``torch.save``), the loader is shut down and the write retried once.
    """
    info = run.info
    rngs = [ckpt.rng_state()]
    streams = [run.stream.state()] if run.source.streaming else []
    if info.distributed:
        rngs = [None] * info.world_size
        torch.distributed.all_gather_object(rngs, ckpt.rng_state())
        if streams:
            streams = [None] * info.world_size
            torch.distributed.all_gather_object(streams, run.stream.state())
    path = None
    if run.tcfg.fsdp:
        path = _save_sharded(run, rngs, streams)
    elif info.is_main:
        for attempt in (1, 2):
            payload = _payload(run, rngs, streams)
            try:
                path = ckpt.save_checkpoint(payload, run.ckpt_dir, run.step, run.tcfg.keep_ckpts)
                break
            except (OSError, RuntimeError) as err:
                need = _tensor_bytes(payload)
                if is_no_space(err, run.ckpt_dir, need):
                    # save_checkpoint wrote nothing in place: the previous checkpoint and
                    # ``latest`` are as they were.
                    raise RunDirError(no_space_message(run.ckpt_dir, need)) from None
                if attempt == 2 or "DataLoader worker" not in str(err):
                    raise
                log.warning("a data worker died (%s); stopping the loader, writing again", err)
                run.stream.close()
        if final:
            log.info("checkpoint %s", path)
    dist.barrier()
    return path


def _save_sharded(run: Run, rngs: list[dict[str, Any]], streams: list[dict]) -> str | None:
    """``--fsdp``: every rank writes its shards of one sharded step (:mod:`semmim.checkpoint_dcp`)."""
    shards, groups = flat_tensors(run.model, run.optimizer)
    payload = _payload(run, rngs, streams, tensors=False) if run.info.is_main else {}
    payload["optimizer_groups"] = groups
    try:
        return ckpt.save_checkpoint(
            payload, run.ckpt_dir, run.step, run.tcfg.keep_ckpts, shards, run.info.is_main
        )
    except OSError as err:
        need = sum(_tensor_bytes(local_shard(t)) for t in shards.values())
        if is_no_space(err, run.ckpt_dir, need):
            raise RunDirError(no_space_message(run.ckpt_dir, need)) from None
        raise


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a checkpoint payload (about the size of its file)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _payload(
    run: Run, rngs: list[dict[str, Any]], streams: list[dict], tensors: bool = True
) -> dict[str, Any]:
    """The checkpoint's state; without ``tensors`` (sharded steps) no model / optimizer state;
    ``streams``: each rank's stream position (``wds:`` data), else empty."""
    return {
        **(
            {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
            if tensors
            else {}
        ),
        "scheduler": run.scheduler.state_dict(),
        "step": run.step,
        "epoch": run.stream.epoch,
        "batch_in_epoch": run.stream.batch_in_epoch,
        "rng": rngs,
        "config": run.model_cfg.to_dict(),
        "train_config": run.tcfg.to_dict(),
        "total_steps": run.total_steps,
        "world_size": run.info.world_size,
        "data_listing": run.data_listing,  # what --resume checks the data against
        "skipped": run.skips.summary(),
        "skip_log": run.skips.state(),
        "elapsed_s": run.elapsed(),
        "log_window": run.window.state(),
        **({"data_stream": streams} if streams else {}),  # each rank's stream position
        **(
            {"task": run.task.name, "task_config": run.task.config()}
            if run.task.name != "pretrain"
            else {}
        ),
    }
