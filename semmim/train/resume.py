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
from semmim.config import SemMIMConfig
from semmim.run_config import TrainConfig

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
    "data_resampled",
)


def own_checkpoints(out: str):
    """``accept`` for :func:`semmim.checkpoint.load_latest_intact`: refuses a checkpoint whose
    resume-contract values differ from OUT's own ``config.json`` (a ``step_*.pt`` of another
    run, e.g. copied from another seed), so ``--resume`` never falls back to it. None when OUT
    has no ``config.json``."""
    from semmim.rundir import own_checkpoint_check

    return own_checkpoint_check(out, RESUME_CONTRACT)


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


def check_data_listing(
    state: dict[str, Any],
    now: dict[str, Any] | None,
    source: Any,
    path: str,
    allow_changes: bool,
) -> None:
    """Refuse (DataError) to resume ``path`` when the data now lists other pairs than the
    run's checkpoint recorded (``data_listing``: counts and a digest of every key and caption),
    unless ``allow_changes`` (logged). The same ``--data`` spec can list other pairs on another
    machine or install: an optional decoder missing (its images skipped), files added, removed
    or edited. Checkpoints without a listing, and streams, are not checked."""
    saved = state.get("data_listing")  # ``now``: source.listing(), the data as listed today
    if saved is None or now is None or saved == now:
        return
    if (saved["train_pairs"], saved["eval_pairs"]) != (now["train_pairs"], now["eval_pairs"]):
        what = (
            f"now lists {now['train_pairs']} training and {now['eval_pairs']} "
            f"{now['eval_split']} pairs; the run trained on {saved['train_pairs']} and "
            f"evaluates {saved['eval_pairs']}"
        )
    else:
        what = "now lists the same number of pairs, but other ones (image keys or captions differ)"
    if not allow_changes:
        from semmim.data import DataError

        raise DataError(
            f"--resume: refusing to continue {path}: its data {what}, so the remaining steps "
            f"would train on other pairs than the run that stopped. The data as listed now: "
            f"{source.describe()}. Restore the data (e.g. install the missing decoder), or "
            "pass --allow-changes to continue anyway"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        log.warning("resuming on other data (allowed): the data %s", what)


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
    preset_given: bool | str = False,
) -> ResumePoint:
    """Apply the resume rules to the newest intact checkpoint of ``OUT/checkpoints``.

    - The checkpoint must be this run's: one whose contract values differ from OUT's own
      ``config.json`` (a ``step_*.pt`` of another run) is refused by name and never resumed
      (:func:`own_checkpoints`; lifted by ``allow_changes``).
    - The checkpoint must be a run of ``task_name``; another task's (``semmim train --resume``
      on a fine-tuning run) is refused naming the command that resumes it.
    - Its model config is used: ``model_sets`` (command-line ``--set`` keys) are validated (a
      misspelled key is an error, as on a fresh run); when they, or the preset ``preset_given``
      names (True: some unnamed preset), would give another model config, a warning names the
      differences and says they are ignored (none when they equal the checkpoint's).
    - The run config is ``tcfg`` as given, or the saved one with ``changes`` (the run options
      given on the command line) applied and a saved ``stop_at`` dropped.
    - The contract (:data:`RESUME_CONTRACT`, :func:`check_resume`) holds unless ``allow_changes``
      (then the changes are logged).

    Raises FileNotFoundError (no intact checkpoint) or ValueError, each starting ``--resume:``.
    """
    from semmim.config import from_preset

    if (tcfg is None) == (changes is None):
        raise TypeError("resume_point: give exactly one of tcfg (as given) and changes")
    try:
        state, path = ckpt.load_latest_intact(
            os.path.join(out, "checkpoints"),
            "cpu",
            ckpt.TRAIN_KEYS,
            accept=None if allow_changes else own_checkpoints(out),
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--resume: {err}") from None
    saved_task = state.get("task", "pretrain")
    if saved_task != task_name:
        how = "semmim train" if saved_task == "pretrain" else f"semmim finetune {saved_task}"
        raise ValueError(
            f"--resume: the checkpoint {path} is a {saved_task!r} run, not {task_name!r}; "
            f"resume it with '{how} --out {out} --resume'"
        )
    model_cfg = SemMIMConfig.from_dict(state["config"])
    given = model_cfg.override(model_sets) if model_sets else model_cfg  # validates the keys
    if isinstance(preset_given, str):
        given = from_preset(preset_given, model_sets or {})
    ignored = _config_differences(model_cfg.to_dict(), given.to_dict())
    if ignored or preset_given is True:
        log.warning(
            "--resume: the checkpoint's model config is used; --preset/model --set ignored "
            "(they differ from it in: %s)",
            "; ".join(ignored[:8]) or "unknown: no preset name given",
        )
    if tcfg is None:
        tcfg = TrainConfig.from_dict({**state["train_config"], "stop_at": 0}).override(changes)
    check_resume(state, path, tcfg, world_size, allow_changes)
    return ResumePoint(state, path, model_cfg, tcfg)


def _config_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``["vision.depth: 2 (checkpoint) vs 4 (given)", ...]`` between two model config dicts."""
    out = []
    for section in sorted(set(saved) | set(given)):
        a, b = saved.get(section), given.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out.append(f"{section}.{k}: {a.get(k)!r} (checkpoint) vs {b.get(k)!r} (given)")
        elif a != b:
            out.append(f"{section}: {a!r} (checkpoint) vs {b!r} (given)")
    return out
