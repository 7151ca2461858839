"""The loop: one optimizer step (the unit of commit), the steps of a session, ``train``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from semmim import dist
from semmim.data import DataSource
from semmim.eval import run_evaluation
from semmim.run_config import TrainConfig
from semmim.rundir import RunLock, write_json
from semmim.train import fsdp
from semmim.train.logs import (
    csv_fields,
    format_dispatch,
    open_csv,
    plot_diagnostics,
    plot_losses,
    postfix,
)
from semmim.train.resume import ResumePoint
from semmim.train.run import Run, save, setup
from semmim.train.signals import StopRequest
from semmim.train.task import Task
from semmim.train.tracking import Tracker, check_available, open_tracker, parse_reporters

log = logging.getLogger("semmim.train")


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The forward pass's seed for micro-batch ``micro`` of optimizer step ``step`` on ``rank``.

    The first 62 bits of BLAKE2b-64 of ``"semmim:{seed}:{step}:{micro}:{rank}"``: a pure function of
    the run seed and the position, so a resumed run draws the same masks, MLM tokens and noise,
    distinct per rank and micro-batch, and no random number is read from the process's RNG.
    """
    digest = hashlib.blake2b(f"semmim:{seed}:{step}:{micro}:{rank}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 2


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
    run.task.on_progress(run.model, run.step, run.total_steps)
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
        sync = fsdp.no_sync(run.eager) if no_sync else contextlib.nullcontext()
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
    if run.sharded:
        fsdp.finish_backward(run.model)  # the replicated (0-d) parameters' gradients
    if tcfg.grad_clip > 0 and run.sharded:
        fsdp.clip_grad_norm(run.model, tcfg.grad_clip)
    elif tcfg.grad_clip > 0:
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.task.after_optimizer_step(run.model)
    run.step += 1
    return {"losses": losses, "diagnostics": diag, "pairs": pairs, "wait": wait, "lr": lr}


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
    checkpoint: ResumePoint | None = None,
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

    The run directory is owned for the whole call (:class:`semmim.rundir.RunLock`, rank 0): a
    second process training into it gets :class:`semmim.rundir.RunDirError` naming this one.
    """
    main = int(os.environ.get("RANK", "0")) == 0
    lock = RunLock(tcfg.out, what="run") if main else contextlib.nullcontext()
    with lock:
        return _train_locked(
            model_cfg, tcfg, resume, source, return_model, checkpoint, allow_changes, task
        )


def _train_locked(
    model_cfg, tcfg, resume, source, return_model, checkpoint, allow_changes, task
) -> dict[str, Any]:
    if int(os.environ.get("RANK", "0")) == 0:
        check_available(parse_reporters(tcfg.report_to))  # before the model is built
    stop = StopRequest()
    stop.install()  # from here on a signal is a stop request, even during setup
    tracker = None
    try:
        try:
            run = setup(model_cfg, tcfg, resume, source, checkpoint, allow_changes, task)
            tracker = open_tracker(run)
            interrupted, history, seconds = _loop(run, stop, tracker)
        finally:
            stop.restore()
        return _finish(run, interrupted, history, seconds, return_model, tracker)
    finally:
        if tracker is not None:
            tracker.close()


def _finish(run, interrupted, history, seconds, return_model, tracker) -> dict[str, Any]:
    """The session's summary, plots and final evaluation (rank 0), reported to the trackers."""
    tcfg = run.tcfg
    info = run.info
    total_wait, total_time = seconds
    finished = not interrupted and run.step >= run.total_steps
    evaluate = tcfg.eval_at_end and finished and bool(run.source.val)
    model = run.model
    if run.sharded and (evaluate or return_model):  # gathered on every rank (a collective)
        model = fsdp.full_model(
            run.model,
            lambda: run.task.build_model(run.model_cfg, pretrained=False).to(info.device),
        )
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
        if tracker is not None:
            tracker.log_plots(run.out_dir, run.step)
        if evaluate:
            summary["eval"] = run_evaluation(
                run.task,
                model,
                run.source,
                run.model_cfg,
                run.tcfg,
                run.info.device,
                os.path.join(run.out_dir, "eval.json"),
            )
            if tracker is not None:
                tracker.log_eval(summary["eval"], run.step)
        write_json(
            os.path.join(run.out_dir, "summary.json"),
            {k: v for k, v in summary.items() if k != "history"},
        )
    dist.barrier()
    if return_model:
        summary["model"] = model
    return summary


def _loop(
    run: Run, stop: StopRequest, tracker: Tracker | None = None
) -> tuple[bool, list[dict[str, float]], tuple]:
    """Steps until ``stop_at`` or a stop request, logging and checkpointing; a final checkpoint."""
    tcfg = run.tcfg
    info = run.info
    csv_file, writer = (
        open_csv(
            os.path.join(run.out_dir, "log.csv"),
            run.step,
            csv_fields(run.task.objectives, run.task.diagnostics),
            tcfg.log_every,
        )
        if info.is_main
        else (None, None)
    )
    history: list[dict[str, float]] = []
    window = run.window  # restored on resume: the first row averages the same steps
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
                    log.info("kernels (first step): %s", format_dispatch(used))
            else:
                result = train_step(run)
            window.add(result["losses"], result["pairs"], result["wait"])
            window.add_diagnostics(result["diagnostics"])
            total_wait += result["wait"]
            total_time += time.perf_counter() - t_step
            bar.update(1)
            on_grid = run.step % tcfg.log_every == 0
            if on_grid or run.step == stop_at:
                row = window.row()
                row.update(step=run.step, epoch=run.stream.epoch, lr=result["lr"])
                row["elapsed_s"] = run.elapsed()
                history.append(row)
                if writer is not None:
                    writer.writerow(row)
                    csv_file.flush()
                if tracker is not None:  # the row's values: no further host read
                    tracker.log_row(row)
                bar.set_postfix(postfix(row), refresh=False)
                if on_grid:
                    # A row at a --stop-at between log steps keeps its window (checkpointed):
                    # the resumed run's next row then averages the same steps as one run's.
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
