"""The resume contract: what a resumed run may change, and the check."""

from __future__ import annotations

import logging
import os
from typing import Any

from semmim.config import TrainConfig

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


def resume_configs(
    out: str,
    explicit: dict[str, Any],
    model_sets: dict[str, Any],
    preset_given: bool | str,
    allow_changes: bool,
    task: str = "pretrain",
) -> tuple[tuple[dict[str, Any], str], Any, TrainConfig]:
    """``--resume``: (checkpoint, model config, run config) of OUT's newest intact checkpoint,
    with the run options given now (``explicit``) applied and the resume contract checked.

    The checkpoint's model config is used: ``model_sets`` are validated (a misspelled key is an
    error, as on a fresh run); when they, or the preset named by ``preset_given`` (a preset name,
    or True for "some preset"), would give another model config, a warning names the differences
    and says they are ignored. A saved ``stop_at`` is dropped. A checkpoint of another
    ``task`` (e.g. ``semmim train --resume`` on a fine-tuning run) is refused, naming the
    command that resumes it; so is a checkpoint another run made (:func:`own_checkpoints`).
    Raises FileNotFoundError (no intact checkpoint) or ValueError.
    """
    from semmim.checkpoint import TRAIN_KEYS, load_latest_intact
    from semmim.config import SemMIMConfig, from_preset

    try:
        checkpoint = load_latest_intact(
            os.path.join(out, "checkpoints"),
            "cpu",
            TRAIN_KEYS,
            accept=None if allow_changes else own_checkpoints(out),
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--resume: {err}") from None
    state = checkpoint[0]
    saved_task = state.get("task", "pretrain")
    if saved_task != task:
        how = "semmim train" if saved_task == "pretrain" else f"semmim finetune {saved_task}"
        raise ValueError(
            f"--resume: {checkpoint[1]} is a checkpoint of a {saved_task!r} run, not "
            f"{task!r}; resume it with '{how} --out {out} --resume'"
        )
    model_cfg = SemMIMConfig.from_dict(state["config"])
    given = model_cfg.override(model_sets) if model_sets else model_cfg  # validates the keys
    if isinstance(preset_given, str):
        given = from_preset(preset_given, model_sets)
    ignored = _config_differences(model_cfg.to_dict(), given.to_dict())
    if ignored or preset_given is True:
        logging.getLogger("semmim").warning(
            "--resume: the checkpoint's model config is used; --preset/model --set ignored "
            "(they differ from it in: %s)",
            "; ".join(ignored[:8]) or "unknown: no preset name given",
        )
    saved = TrainConfig.from_dict({**state["train_config"], "stop_at": 0})
    tcfg = saved.override(explicit)
    if not allow_changes:  # refuse before the data is opened (train() logs changes)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_resume(state, checkpoint[1], tcfg, world_size, False)
    return checkpoint, model_cfg, tcfg


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
