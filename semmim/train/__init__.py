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

One concern per module:

- :mod:`~semmim.train.loop`: :func:`train`, the session's steps, :func:`train_step`, :func:`step_seed`;
- :mod:`~semmim.train.run`: :func:`setup` (the :class:`Run`), :func:`save` (checkpoint payloads);
- :mod:`~semmim.train.task`: the :class:`Task` interface and the pre-training task;
- :mod:`~semmim.train.resume`: the resume rules, applied in one place (:func:`resume_point`);
- :mod:`~semmim.train.optim`: AdamW parameter groups and the learning-rate schedule;
- :mod:`~semmim.train.logs`: the CSV log, the progress-bar postfix and the plots;
- :mod:`~semmim.train.signals`: the stop request (SIGINT / SIGTERM) and blocked signals for workers.
"""

from semmim.run_config import TrainConfig
from semmim.train.logs import CSV_FIELDS, csv_fields, plot_diagnostics, plot_losses
from semmim.train.loop import diagnostic_step, step_seed, train, train_step
from semmim.train.optim import lr_lambda, param_groups
from semmim.train.resume import (
    RESUME_CONTRACT,
    ResumePoint,
    check_resume,
    resume_changes,
    resume_point,
)
from semmim.train.run import Run, build_transform, save, setup
from semmim.train.signals import StopRequest
from semmim.train.task import OBJECTIVES, Task, open_run_data

__all__ = [
    "CSV_FIELDS",
    "OBJECTIVES",
    "RESUME_CONTRACT",
    "ResumePoint",
    "Run",
    "StopRequest",
    "Task",
    "TrainConfig",
    "build_transform",
    "check_resume",
    "csv_fields",
    "diagnostic_step",
    "lr_lambda",
    "open_run_data",
    "param_groups",
    "plot_diagnostics",
    "plot_losses",
    "resume_changes",
    "resume_point",
    "save",
    "setup",
    "step_seed",
    "train",
    "train_step",
]
