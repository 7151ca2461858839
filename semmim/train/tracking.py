"""Experiment tracking: ``semmim train --report-to tensorboard,wandb``.

What is reported is what ``log.csv`` holds, nothing computed for it: every CSV row (written at
each ``--log-every`` step from values the log already read to the host) becomes one scalar per
column, tagged ``train/<column>`` (``train/loss``, ``train/itc``, ``train/lr``,
``train/diag_mim_entropy`` …) at the row's step; at the end of each session the loss and
diagnostics plots (``loss.png``, ``diagnostics.png``) as images ``plots/loss`` /
``plots/diagnostics`` and the held-out evaluation's numbers as ``eval/<name>``; at the start the
model and train configs (flattened ``model.vision.dim``, ``train.lr`` …) as hyper-parameters and
as text. Only rank 0 reports.

Resume continues the same run: TensorBoard writes into ``OUT/tensorboard`` again and purges the
steps after the checkpoint (the rows ``log.csv`` drops, see :func:`semmim.train.logs.open_csv`);
W&B resumes the run whose id is stored in ``OUT/wandb_run_id``.

W&B never needs the network: ``WANDB_MODE`` is respected when set; otherwise the run is online
only when an API key is configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``),
else offline (``OUT/wandb/offline-run-*``, upload later with ``wandb sync``). An online start that
fails or takes longer than 60 s falls back to offline with a warning.

Both trackers are optional extras (``pip install 'semmim[tensorboard]'`` / ``'semmim[wandb]'``),
imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import netrc
import os
import secrets
from typing import Any

from semmim.run_config import REPORTERS, parse_reporters

log = logging.getLogger("semmim.train")

__all__ = [
    "REPORTERS",
    "TrackingError",
    "Tracker",
    "check_available",
    "parse_reporters",
    "wandb_mode",
]

WANDB_ID_FILE = "wandb_run_id"
TENSORBOARD_DIR = "tensorboard"


class TrackingError(ValueError):
    """A tracker that cannot be used (not installed); the message names the extra to install."""


def check_available(names: tuple[str, ...]) -> None:
    """TrackingError naming the extra to install for each reporter whose package is missing
    (checked without importing it)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise TrackingError(
                f"--report-to {name}: the {name} package is not installed; install the extra: "
                f"pip install 'semmim[{name}]'"
            )


def _has_netrc_login() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """W&B's mode for this run: ``WANDB_MODE`` when set, else "online" when an API key is
    configured, else "offline" (so a machine without an account or network never waits)."""
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") or _has_netrc_login() else "offline"


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts → ``{"model.vision.dim": 768, …}`` with scalar values (others as
    text), as hyper-parameter tables take them."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _numbers(obj: Any, prefix: str) -> dict[str, float]:
    """The finite numbers of a nested result dict as ``{prefix/a/b: value}``."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


class _TensorBoard:
    def __init__(self, out_dir: str, config: dict[str, Any], resume_step: int, log_every: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Resume: steps from here on are written again, so TensorBoard drops the old ones: the
        # rows after the checkpoint, and its own row when it was off the log grid (open_csv).
        purge = None
        if resume_step > 0:
            purge = resume_step + 1 if resume_step % log_every == 0 else resume_step
        self.logdir = os.path.join(out_dir, TENSORBOARD_DIR)
        self.writer = SummaryWriter(self.logdir, purge_step=purge)
        flat = flat_config(config)
        # hparams() and not add_hparams(): the latter writes into a new sub-run folder
        for summary in hparams(flat, {"train/loss": math.nan}):
            self.writer.file_writer.add_summary(summary, resume_step)
        text = "```\n" + json.dumps(config, indent=2) + "\n```"
        self.writer.add_text("config", text, resume_step)
        self.writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, path: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out_dir: str, config: dict[str, Any], name: str):
        import wandb

        from semmim.rundir import write_text

        id_file = os.path.join(out_dir, WANDB_ID_FILE)
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: letters and digits
            write_text(id_file, run_id + "\n")  # before init: an interrupted start resumes it
        mode = wandb_mode()
        kwargs = dict(
            project=os.environ.get("WANDB_PROJECT") or "semmim",
            name=name,
            id=run_id,
            resume="allow",
            dir=out_dir,
            config=config,
            settings=wandb.Settings(init_timeout=60, console="off"),
        )
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # wandb raises its own errors and timeouts; the run goes on
            if mode != "online":
                raise
            log.warning("wandb: online start failed (%s); logging offline to %s", err, out_dir)
            self.run = wandb.init(mode="offline", **kwargs)
        self.run.define_metric("train/step")
        for group in ("train/*", "eval/*", "plots/*"):
            self.run.define_metric(group, step_metric="train/step")
        self.wandb = wandb
        log.info("wandb: run %s (%s) in %s", run_id, mode, self.run.dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        # train/step is the x axis: a resumed run logs the steps after its checkpoint again
        # instead of having them dropped as "older than the run's last step"
        self.run.log({"train/step": step, **values})

    def image(self, tag: str, path: str, step: int) -> None:
        self.run.log({"train/step": step, tag: self.wandb.Image(path)})

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The trackers ``--report-to`` names, for rank 0 (no-op with none).

    ``config``: what goes into ``OUT/config.json`` (model and train configs); ``resume_step``:
    the step the session starts from (0 for a new run); ``log_every``: the log grid.
    """

    def __init__(
        self,
        reporters: tuple[str, ...],
        out_dir: str,
        config: dict[str, Any],
        resume_step: int = 0,
        log_every: int = 1,
    ) -> None:
        check_available(reporters)
        self.backends: list[Any] = []
        try:
            for name in reporters:
                if name == "tensorboard":
                    self.backends.append(_TensorBoard(out_dir, config, resume_step, log_every))
                    log.info("tensorboard: %s", self.backends[-1].logdir)
                elif name == "wandb":
                    run_name = os.path.basename(os.path.abspath(out_dir))
                    self.backends.append(_WandB(out_dir, config, run_name))
        except BaseException:
            self.close()
            raise

    def log_row(self, row: dict[str, float]) -> None:
        """One ``log.csv`` row (a dict with ``step``): every other column as ``train/<col>``."""
        step = int(row["step"])
        values = {f"train/{k}": float(v) for k, v in row.items() if k != "step"}
        for b in self.backends:
            b.scalars(values, step)

    def log_plots(self, out_dir: str, step: int) -> None:
        """``loss.png`` / ``diagnostics.png`` of ``out_dir`` (those that exist) as images."""
        for name in ("loss", "diagnostics"):
            path = os.path.join(out_dir, f"{name}.png")
            if os.path.isfile(path):
                for b in self.backends:
                    b.image(f"plots/{name}", path, step)

    def log_eval(self, result: dict[str, Any], step: int) -> None:
        """The numbers of an evaluation result (``eval.json``) as ``eval/…`` scalars."""
        values = _numbers(result, "eval")
        if values:
            for b in self.backends:
                b.scalars(values, step)

    def close(self) -> None:
        for b in self.backends:
            try:
                b.close()
            except Exception as err:  # a tracker's shutdown must not lose the run's result
                log.warning("closing %s failed: %s", type(b).__name__.strip("_"), err)
        self.backends = []


def open_tracker(run: Any) -> Tracker | None:
    """The :class:`Tracker` of a :class:`semmim.train.run.Run` on rank 0 (None elsewhere, or
    without ``--report-to``), starting at the run's step."""
    reporters = parse_reporters(run.tcfg.report_to)
    if not reporters or not run.info.is_main:
        return None
    config = {
        "model": run.model_cfg.to_dict(),
        "train": run.tcfg.to_dict(),
        "world_size": run.info.world_size,
    }
    return Tracker(reporters, run.out_dir, config, run.step, run.tcfg.log_every)
