"""The CSV log, the window of losses between log steps, the progress-bar postfix and the plots."""

from __future__ import annotations

import csv
import io
import math
import os
import time
from typing import Any

import torch

from semmim.diagnostics import STEP_COLUMNS
from semmim.rundir import read_json, write_text
from semmim.train.task import OBJECTIVES

CSV_FIELDS = ("step", "epoch", "lr", "loss", *OBJECTIVES, "pairs_per_s", "data_wait", "elapsed_s")


def csv_fields(objectives: tuple[str, ...], diagnostics: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The CSV log's columns for a task with these loss names and diagnostic columns."""
    timing = ("pairs_per_s", "data_wait", "elapsed_s")
    return ("step", "epoch", "lr", "loss", *objectives, *timing, *diagnostics)


class Window:
    """Accumulates losses and timings between log steps without host syncs per step.

    Its :meth:`state` goes into every checkpoint and :meth:`load` restores it on resume, so the
    first log row after a resume averages the same steps (bit for bit the same sums) as the run
    that was not interrupted: the log of a resumed run reads as one run.
    """

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

    def state(self) -> dict[str, Any]:
        """The partial window as plain data (CPU tensors): what :meth:`load` takes back."""
        return {
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
            "diag_sums": {k: v.detach().cpu() for k, v in self.diag_sums.items()},
            "diag_steps": self.diag_steps,
            "steps": self.steps,
            "pairs": self.pairs,
            "wait": self.wait,
            "seconds": time.perf_counter() - self.t0,
        }

    def load(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Continue the window :meth:`state` saved (an empty dict: a fresh window)."""
        self.reset()
        if not state:
            return
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.diag_sums = {k: v.to(device) for k, v in state["diag_sums"].items()}
        self.diag_steps, self.steps = int(state["diag_steps"]), int(state["steps"])
        self.pairs, self.wait = int(state["pairs"]), float(state["wait"])
        self.t0 = time.perf_counter() - float(state["seconds"])

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


def mask_overlap_references(m_over_p: float | None) -> list[tuple[float, str]]:
    """The reference lines of the mask-overlap panel, labelled as :mod:`semmim.diagnostics`
    defines the metric: 1 = the mask of random masking (the text moves nothing), M/P = what a
    mask the text alone decides overlaps the random one by."""
    refs = [(1.0, "1 = random masking (text moves nothing)")]
    if m_over_p is not None:
        refs.append((m_over_p, "M/P = the text decides"))
    return refs


def plot_diagnostics(csv_path: str, png_path: str, num_prototypes: int = 0) -> bool:
    """Plot the ``diag_*`` columns of the CSV log beside the losses: teacher entropy (with log K),
    effective K and prototypes in use (with K), student–teacher agreement (real image, blank
    image, another caption; the teacher's codes flipped by another caption), text-vs-random mask
    overlap (with 1 = random masking, and M/P when ``config.json`` beside the log gives it), ψ's
    text/image norm ratio, per-objective gradient norms on the image and on the text encoder,
    and the mask's overlap with object coverage (with M/P = a random mask). Returns False (and
    writes nothing) when the log has no diagnostics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in STEP_COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    if not cols:
        return False
    chance = None
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "config.json")
    if os.path.exists(cfg_path):
        model = read_json(cfg_path).get("model", {})
        num_prototypes = num_prototypes or model.get("head", {}).get("num_prototypes", 0)
        v = model.get("vision", {})
        if v.get("image_size") and v.get("patch_size"):
            p = (v["image_size"] // v["patch_size"]) ** 2
            chance = round(model.get("masking", {}).get("ratio", 0.5) * p) / p

    def series(col):
        pts = [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
        return [s for s, _ in pts], [v for _, v in pts]

    def ending(*stats):
        return lambda c: any(c.endswith("_" + s) for s in stats) and "_grad_" not in c

    agreement = ("agree", "agree_blank", "agree_shuffled", "target_caption_flip")
    panels = [
        (
            "teacher entropy (nats)",
            ending("entropy"),
            [(math.log(num_prototypes), "log K")] if num_prototypes else [],
            False,
        ),
        (
            "prototypes: effective K, in use",
            ending("eff_k", "used"),
            [(num_prototypes, "K")],
            False,
        ),
        ("top-1 codes: agreement; teacher flips", ending(*agreement), [], False),
        (
            "text-guided vs random mask overlap",
            ending("mask_overlap"),
            mask_overlap_references(chance),
            False,
        ),
        ("ψ: ‖text residual‖ / ‖patch‖", ending("psi_ratio"), [], False),
        ("grad norm on the image encoder", lambda c: c.endswith("_vision"), [], True),
        ("grad norm on the text encoder", lambda c: c.endswith("_text"), [], True),
        (
            "mask ∩ most-covered patches / M",
            ending("overlap_hard", "overlap_mask"),
            [(chance, "M/P = random mask")] if chance else [],
            False,
        ),
        ("corr(text score, coverage)", ending("score_corr"), [(0.0, "0")], False),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    for ax, (title, wanted, refs, log_scale) in zip(axes.flat, panels):
        for col in cols:
            if wanted(col):
                steps, values = series(col)
                if log_scale and not any(v > 0 for v in values):
                    continue  # an objective that never reaches this tower
                ax.plot(steps, values, label=col.removeprefix("diag_"), marker=".")
        # reference lines only beside a series: an empty panel (e.g. coverage on data without
        # alpha) shows nothing rather than a reference for a metric that was not measured
        for (ref, ref_label), style in zip(refs if ax.lines else [], ("--", ":")):
            if ref is not None:
                ax.axhline(ref, color="grey", linestyle=style, linewidth=1, label=ref_label)
        if log_scale and ax.lines:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def open_csv(
    path: str, resume_step: int, fieldnames: tuple[str, ...] = CSV_FIELDS, log_every: int = 1
) -> tuple[Any, csv.DictWriter]:
    """Open the CSV log for appending; on resume drop rows logged after the checkpoint's step,
    and a row at the checkpoint's step itself when it is off the ``log_every`` grid (written by
    a ``--stop-at``: its steps are averaged again, with the following ones, in the next row), so
    the log of a resumed run has the rows of one uninterrupted run.

    The header and the kept rows are written atomically (a crash here leaves the old log), then
    the file is opened for appending one row per log step.
    """
    rows: list[dict[str, str]] = []
    if resume_step > 0 and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [
                r
                for r in csv.DictReader(f)
                if int(r["step"]) < resume_step
                or (int(r["step"]) == resume_step and resume_step % log_every == 0)
            ]
    text = io.StringIO()
    kept = csv.DictWriter(text, fieldnames=fieldnames, extrasaction="ignore")
    kept.writeheader()
    kept.writerows(rows)
    write_text(path, text.getvalue())
    f = open(path, "a", newline="")  # noqa: SIM115 - closed by the caller
    return f, csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")


def format_dispatch(used: dict[str, set[str]]) -> str:
    return ", ".join(f"{op}={'/'.join(sorted(b))}" for op, b in sorted(used.items())) or "none"


_NOT_LOSSES = {"step", "epoch", "lr", "pairs_per_s", "data_wait", "elapsed_s"}


def postfix(row: dict[str, float]) -> dict[str, str]:
    post = {k: f"{row[k]:.3f}" for k in row if k not in _NOT_LOSSES and not k.startswith("diag_")}
    post["pairs/s"] = f"{row['pairs_per_s']:.0f}"
    post["wait"] = f"{100 * row['data_wait']:.0f}%"
    return post
