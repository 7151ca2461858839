"""``semmim eval``'s first half: open a checkpoint, its task, model and data, for the one
evaluation path (:func:`semmim.eval.run_evaluation`). Above :mod:`semmim.eval` and the tasks
(:mod:`semmim.train`, :mod:`semmim.downstream.tasks`), which use :mod:`semmim.eval`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from semmim import checkpoint as ckpt_io
from semmim.config import SemMIMConfig
from semmim.downstream.tasks import make_task
from semmim.eval import run_evaluation
from semmim.run_config import TrainConfig
from semmim.rundir import eval_json_path, run_dir_of
from semmim.train import Task


@dataclass
class CheckpointEval:
    """A checkpoint opened for ``semmim eval`` (:func:`open_checkpoint_eval`): the task, its model
    with the checkpoint's weights, the data to evaluate (``source.val``) and the run settings."""

    path: str
    task: Any
    model: Any
    source: Any
    model_cfg: Any
    tcfg: Any
    device: torch.device
    extra: dict[str, Any]
    default_json: str = ""

    def describe(self) -> str:
        return (
            f"checkpoint {self.path} ({self.extra['task']}, step {self.extra['step']}); data "
            f"{self.source.describe()}; evaluating {self.extra['split']} split"
        )

    @property
    def json_path(self) -> str:
        """Where the results go by default (:func:`semmim.rundir.eval_json_path`): beside the
        run the checkpoint belongs to; ``eval.json`` only for the run's own evaluation."""
        return self.default_json or os.path.join(os.path.dirname(self.path), "eval.json")

    def run(self, json_path: str | None = None) -> dict[str, Any]:
        """:func:`run_evaluation` of this checkpoint (default: to :attr:`json_path`)."""
        return run_evaluation(
            self.task,
            self.model,
            self.source,
            self.model_cfg,
            self.tcfg,
            self.device,
            json_path or self.json_path,
            self.extra,
        )


def open_checkpoint_eval(
    ckpt: str,
    task: str | None = None,
    data: str | None = None,
    split: str = "val",
    rerank_k: int = 16,
    beam_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
) -> CheckpointEval:
    """Open a checkpoint for evaluation.

    Args:
        ckpt: run directory, checkpoints directory or ``step_*.pt`` file.
        task: what to evaluate (default: the checkpoint's task). A pre-training checkpoint can be
            evaluated as ``retrieval`` (zero-shot retrieval); ``vqa`` and ``caption`` need a
            checkpoint fine-tuned for that task.
        data: a data spec (default: the run's; given, it replaces the run's ``--eval-data``).
        split: ``val`` (the held-out split made as in training) or ``all`` (every pair).
        rerank_k / beam_size / batch_size / num_workers: as the ``semmim eval`` options.

    Raises ValueError / FileNotFoundError naming the option at fault (``--ckpt``, ``--task``,
    ``--beam-size``, ``--data``).
    """
    try:
        state, path = ckpt_io.open_checkpoint(ckpt, "cpu", ckpt_io.EVAL_KEYS)
        tcfg = TrainConfig.from_dict(state["train_config"])
        model_cfg = SemMIMConfig.from_dict(state["config"])
    except (FileNotFoundError, ValueError) as err:
        raise _same_kind(err, f"--ckpt: {err}") from None
    saved = state.get("task", "pretrain")
    name = task or saved
    if (name in ("vqa", "caption") or saved in ("vqa", "caption")) and name != saved:
        raise ValueError(
            f"--task {name}: {path} is a {saved!r} checkpoint (vqa and caption evaluate a "
            "checkpoint fine-tuned for that task)"
        )
    if beam_size is not None and name != "caption":
        raise ValueError(f"--beam-size: only for --task caption, not {name}")
    task_cfg = dict(state.get("task_config") or {}) if name == saved else {}
    # The comparison with the starting checkpoint belongs to the end of fine-tuning.
    task_cfg.pop("init", None)
    if beam_size is not None:
        task_cfg["beam_size"] = beam_size
    if data is not None:
        task_cfg.pop("eval_data", None)
    the_task = Task() if name == "pretrain" else make_task(name, task_cfg)
    run_cfg = tcfg.override(
        {
            "data": data if data is not None else tcfg.data,
            "num_workers": num_workers,
            "eval_batch_size": batch_size,
            "eval_rerank_k": rerank_k,
        }
    )
    try:
        source = the_task.open_data(run_cfg)
    except (ValueError, FileNotFoundError) as err:
        raise _same_kind(err, f"--data: {err}") from None
    if split == "all":
        source = dataclasses.replace(source, val=source.train + source.val)
    source = dataclasses.replace(source, eval_split=split)
    dev = torch.device(
        "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model = the_task.build_model(model_cfg, pretrained=False)
    model.load_state_dict(state["model"])
    model.to(dev)
    extra = {
        "checkpoint": path,
        "step": state["step"],
        "data": run_cfg.data or "synthetic",
        "split": split,
        "task": name,
        "skipped_listing": source.skips.summary(),
    }
    try:
        latest = ckpt_io.resolve_checkpoint(run_dir_of(path))
    except (FileNotFoundError, ValueError):
        latest = None
    default_json = eval_json_path(path, data, tcfg.data, split, name, saved, latest)
    return CheckpointEval(
        path, the_task, model, source, model_cfg, run_cfg, dev, extra, default_json
    )


def _same_kind(err: Exception, message: str) -> Exception:
    """FileNotFoundError stays one (a missing file), anything else becomes a ValueError."""
    return FileNotFoundError(message) if isinstance(err, FileNotFoundError) else ValueError(message)
