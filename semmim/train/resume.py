"""The resume rules, in one place: which checkpoint, which configs, what a resume may change.

:func:`resume_point` applies them for ``semmim train --resume`` / ``semmim finetune --resume``
(before the data is opened) and for :func:`semmim.train.setup` when it is not handed a
:class:`ResumePoint` already made.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from semmim import checkpoint as ckpt
from semmim.config import SemMIMConfig, TrainConfig

log = logging.getLogger("semmim.train")

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


@dataclass
class ResumePoint:
    """A checkpoint to continue, with the rules applied: ``model_cfg`` is the checkpoint's,
    ``tcfg`` the run config to continue with (the contract checked)."""

    state: dict[str, Any]
    path: str
    model_cfg: SemMIMConfig
    tcfg: TrainConfig


def resume_point(
    out: str,
    world_size: int,
    allow_changes: bool = False,
    task_name: str = "pretrain",
    *,
    tcfg: TrainConfig | None = None,
    changes: dict[str, Any] | None = None,
    model_sets: dict[str, Any] | None = None,
    preset_given: bool = False,
) -> ResumePoint:
    """Apply the resume rules to the newest intact checkpoint of ``OUT/checkpoints``.

    - The checkpoint must be a run of ``task_name``.
    - Its model config is used: ``model_sets`` (command-line ``--set`` keys) are validated (a
      misspelled key is an error, as on a fresh run), then ignored with a warning, as is a
      ``--preset`` (``preset_given``).
    - The run config is ``tcfg`` as given, or the saved one with ``changes`` (the run options
      given on the command line) applied and a saved ``stop_at`` dropped.
    - The contract (:data:`RESUME_CONTRACT`, :func:`check_resume`) holds unless ``allow_changes``
      (then the changes are logged).

    Raises FileNotFoundError (no intact checkpoint) or ValueError, each starting ``--resume:``.
    """
    if (tcfg is None) == (changes is None):
        raise TypeError("resume_point: give exactly one of tcfg (as given) and changes")
    try:
        state, path = ckpt.load_latest_intact(
            os.path.join(out, "checkpoints"), "cpu", ckpt.TRAIN_KEYS
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--resume: {err}") from None
    saved_task = state.get("task", "pretrain")
    if saved_task != task_name:
        raise ValueError(
            f"--resume: the checkpoint {path} is a {saved_task!r} run, not {task_name!r}"
        )
    model_cfg = SemMIMConfig.from_dict(state["config"])
    if model_sets:
        model_cfg.override(model_sets)  # a misspelled key is an error, as on a fresh run
    if preset_given or model_sets:
        log.warning("--resume: the checkpoint's model config is used; --preset/model --set ignored")
    if tcfg is None:
        tcfg = TrainConfig.from_dict({**state["train_config"], "stop_at": 0}).override(changes)
    check_resume(state, path, tcfg, world_size, allow_changes)
    return ResumePoint(state, path, model_cfg, tcfg)
