"""``semmim probe``: the training diagnostics of a trained checkpoint, on held-out images.

What the MIM targets rest on (blank-image / other-caption agreement, the teacher's caption flips,
ψ's text/image norm ratio), each objective's gradient norm on the image and text encoders, and,
for images with an alpha channel, the text-guided mask's overlap with object coverage: the
columns of :mod:`semmim.diagnostics`, averaged over the evaluated pairs (batches of at least two
pairs: the rolled caption and ITM need two). The model runs in eval mode (no dropout, no queue or
centre update: nothing in the checkpoint changes), one forward and one gradient pass per
objective per batch; the step's random draws (mask noise, ITM negatives) come from the batch's
index, so a probe is repeatable.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from semmim.diagnostics import COVERAGE_COLUMNS, GRAD_COLUMNS, STEP_COLUMNS

__all__ = ["ProbeResult", "probe_checkpoint", "format_probe"]

MEANING = {
    "diag_mim_agree": "student = teacher code, real image + caption",
    "diag_mim_agree_blank": "... blank (white) image + real caption",
    "diag_mim_agree_shuffled": "... real image + another pair's caption",
    "diag_mim_target_caption_flip": "teacher codes changed by another caption",
    "diag_mim_psi_ratio": "‖ψ text residual‖ / ‖patch feature‖",
    "diag_glob_agree": "global head: student = teacher code",
    "diag_mask_overlap": "mask ∩ mask of the same noise alone (1 = text moves nothing)",
    "diag_cov_overlap_hard": "hard text top-M ∩ M most-covered patches / M",
    "diag_cov_overlap_mask": "the noisy mask ∩ M most-covered patches / M",
    "diag_cov_score_corr": "corr(text score, patch coverage)",
}


@dataclass
class ProbeResult:
    """means: column → mean over pairs; pairs: how many were probed; chance: M/P (a random
    mask's expected overlap with the most-covered patches); described: what was probed."""

    means: dict[str, float]
    pairs: int
    chance: float
    described: str


def probe_checkpoint(
    ckpt: str,
    data: str | None = None,
    split: str = "val",
    batch_size: int = 32,
    max_pairs: int = 0,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> ProbeResult:
    """Probe a pre-training checkpoint (see the module notes).

    ckpt / data / split / device: as ``semmim eval``'s (the held-out split of the run's data by
    default); batch_size ≥ 2; max_pairs: stop after this many pairs (0 = all). Raises ValueError
    / FileNotFoundError naming the option at fault.
    """
    from semmim.data import Collator, PairDataset
    from semmim.eval_checkpoint import open_checkpoint_eval
    from semmim.train import Task
    from semmim.transforms import EvalTransform

    if batch_size < 2:
        raise ValueError(f"--batch-size: must be >= 2 (the probes pair captions), got {batch_size}")
    if max_pairs < 0:
        raise ValueError(f"--max-pairs: must be >= 0, got {max_pairs}")
    job = open_checkpoint_eval(ckpt, data=data, split=split, num_workers=num_workers, device=device)
    if job.extra["task"] != "pretrain":
        raise ValueError(
            f"--ckpt: {job.path} is a {job.extra['task']!r} checkpoint; probe needs a pre-training one"
        )
    model, cfg, source = job.model, job.model_cfg, job.source
    records = source.val[:max_pairs] if max_pairs else source.val
    if len(records) < 2:
        raise ValueError(
            f"--data: the {split} split has {len(records)} pair(s); probe needs at least 2"
        )
    max_len = min(job.tcfg.max_text_len, cfg.text.max_len)
    dataset = PairDataset(records, EvalTransform(cfg.vision.image_size), alpha=True)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=Collator(model.tokenizer, max_len, records),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # not the global RNG
    )
    model.eval()
    task = Task()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    pairs = 0
    bar = tqdm(total=len(records), desc="probe", unit="pair", disable=not progress, file=sys.stderr)
    try:
        for i, batch in enumerate(loader):
            n = len(batch.get("images", []))
            bar.update(n + len(batch["bad"]))
            if n < 2:
                continue
            _, parts = task.loss(model, batch, job.device, i, True, diagnostics=True)
            for k, v in parts.items():
                if k.startswith("diag_"):
                    sums[k] = sums.get(k, 0.0) + float(v) * n
                    counts[k] = counts.get(k, 0) + n
            pairs += n
    finally:
        bar.close()
    if pairs == 0:
        raise ValueError(f"--data: no batch of at least 2 readable pairs in the {split} split")
    order = {c: i for i, c in enumerate(STEP_COLUMNS)}
    means = {k: sums[k] / counts[k] for k in sorted(sums, key=lambda c: order.get(c, len(order)))}
    P = cfg.vision.num_patches
    return ProbeResult(means, pairs, cfg.num_masked / P, job.describe())


def format_probe(result: ProbeResult) -> str:
    """The probe as a text table: each column, its mean, what it means; references last."""
    lines = [result.described, f"{result.pairs} pairs probed", ""]
    for k, v in result.means.items():
        if k in GRAD_COLUMNS:
            continue
        lines.append(f"{k:34s} {v:8.4f}  {MEANING.get(k, '')}")
    grads = {k: v for k, v in result.means.items() if k in GRAD_COLUMNS}
    if grads:
        lines += ["", "gradient norm of weight·loss    image encoder   text encoder"]
        for name in dict.fromkeys(k.split("_")[2] for k in grads):
            vis = grads.get(f"diag_grad_{name}_vision", 0.0)
            txt = grads.get(f"diag_grad_{name}_text", 0.0)
            lines.append(f"  {name:28s} {vis:14.4f} {txt:14.4f}")
    if any(k in result.means for k in COVERAGE_COLUMNS):
        lines += ["", f"a random mask overlaps the most-covered patches {result.chance:.2f} (M/P)"]
    else:
        lines += ["", "no coverage columns: the images have no alpha channel"]
    return "\n".join(lines)
