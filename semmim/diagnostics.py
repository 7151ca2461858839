"""Training diagnostics of the semantic objectives: is the teacher collapsing, uniform, ignored?

The global-agreement and MIM losses can fail quietly: every row's teacher target on one prototype
(collapse), a uniform teacher (nothing to learn), a student that never agrees with it, a text-guided
mask that is no different from a random one. :func:`head_diagnostics` and :func:`mask_overlap` measure
these on device, from tensors the forward pass already has; the model computes them only when called
with ``diagnostics=True`` (training: every ``train.diag_every`` steps) and returns 0-d tensors, which
the training loop reads on the host only at its log steps. Nothing here reads a tensor value on the
host or draws from a global random generator.

Columns (``SemMIMOutput.diagnostics`` keys, CSV ``log.csv`` columns), for ``H`` in ``glob`` (image
CLS, one row per image) and ``mim`` (one row per masked patch):

- ``diag_H_entropy``: mean over rows of the entropy (nats) of the teacher target
  ``q = softmax((t − c) / τ_t)``; in [0, log K]. Near 0: one-hot targets; near log K: uniform.
- ``diag_H_eff_k``: ``exp(entropy of the row-mean q)``, the number of prototypes the batch's targets
  spread over; in [1, K]. Near 1: every row targets the same prototypes (collapse).
- ``diag_H_used``: how many distinct prototypes are the argmax of some row's target; in
  [1, min(K, rows)].
- ``diag_H_agree``: fraction of rows whose student argmax equals the teacher argmax; in [0, 1].
- ``diag_mask_overlap``: mean over images of |mask ∩ R| / M, R the random mask of the *same*
  Gumbel noise (top-M of the noise alone: the mask the step would use if the text scored every
  patch alike); in [0, 1]. Near 1: the noise decides and the text barely moves the mask; near
  M/P (the overlap of independent masks): the text decides. ``masking.strategy=random`` gives 1
  exactly. (An *independent* random mask would say nothing: any mask of size M overlaps it M/P
  on average.) With ``masking.tau=0`` there is no noise and R is independent (expect M/P).

What the MIM targets rest on (semantic MIM; :func:`semmim.objectives.mim_reliance`), all over
the step's masked patches, "codes" = argmax of the centred teacher / student logits:

- ``diag_mim_agree_blank``: the student's code equals the teacher's (real image, real caption)
  when the student's image is blank (every pixel white) and its caption real. Chance is ~1/K.
  Close to ``diag_mim_agree``: the targets are predictable from the caption alone, i.e. they
  carry the caption, not the image (an audit found 0.58 vs 0.71 in a trained default run).
- ``diag_mim_agree_shuffled``: the same with the real image and another pair's caption (the
  batch's captions rolled by one). Far below ``diag_mim_agree``: the prediction leans on the
  caption. Healthy: blank ≪ real, and blank not far above shuffled.
- ``diag_mim_target_caption_flip``: fraction of masked patches whose *teacher* code changes
  when ψ reads the rolled caption instead; 0 without text in the target. Near 1: the caption
  decides the target.
- ``diag_mim_psi_ratio``: mean over masked patches of ‖what ψ adds‖ / ‖patch feature‖ (after
  ``mim.psi_scale`` / ``mim.psi_max_ratio``); 0 without text in the target.

Gradient norms per objective (:func:`objective_grad_norms`, training diagnostic steps and
``semmim probe``): ``diag_grad_<objective>_<tower>`` = ‖∇ (weight · loss)‖₂ over the parameters
of the student's image encoder (``vision``) or text encoder (``text``), each objective's loss
differentiated on its own (one extra backward pass per objective, on diagnostic steps only).
0 where an objective does not reach a tower (the global loss never reaches the text encoder).

Object coverage (:func:`coverage_overlap`; only for data whose images have an alpha channel,
e.g. Tux Paint stamps: the batch then carries ``alpha`` (B, S, S), the transformed alpha):
a patch's coverage is its mean alpha; C = its M most-covered patches (ties: lower index).

- ``diag_cov_overlap_hard``: mean over images of |hard text top-M ∩ C| / M, the hard top-M
  (τ = 0, no noise) of the text-guided score (``masking.score``), whatever the strategy.
- ``diag_cov_overlap_mask``: the same for the mask the step used.
- ``diag_cov_score_corr``: mean over images of the Pearson correlation of that score with
  coverage (0 for an image whose coverage or score is constant).
A random mask overlaps C by M/P in expectation (the plot's and the probe's reference).

In a multi-process run each rank reports its own batch (no all-reduce).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from semmim.masking import random_mask
from semmim.transforms import IMAGE_MEAN, IMAGE_STD

__all__ = [
    "DIAG_COLUMNS",
    "RELIANCE_COLUMNS",
    "GRAD_COLUMNS",
    "COVERAGE_COLUMNS",
    "STEP_COLUMNS",
    "head_diagnostics",
    "mask_overlap",
    "blank_images",
    "objective_grad_norms",
    "coverage_overlap",
    "check_ranges",
]

HEADS = ("glob", "mim")
HEAD_STATS = ("entropy", "eff_k", "used", "agree")
RELIANCE_COLUMNS: tuple[str, ...] = (
    "diag_mim_agree_blank",
    "diag_mim_agree_shuffled",
    "diag_mim_target_caption_flip",
    "diag_mim_psi_ratio",
)
# what the model's forward(diagnostics=True) returns (default SemMIM: all of them)
DIAG_COLUMNS: tuple[str, ...] = (
    *(f"diag_{h}_{s}" for h in HEADS for s in HEAD_STATS),
    "diag_mask_overlap",
    *RELIANCE_COLUMNS,
)
GRAD_OBJECTIVES = ("itc", "itm", "mlm", "glob", "mim", "patch")
TOWERS = ("vision", "text")
GRAD_COLUMNS: tuple[str, ...] = tuple(f"diag_grad_{o}_{t}" for o in GRAD_OBJECTIVES for t in TOWERS)
COVERAGE_COLUMNS: tuple[str, ...] = (
    "diag_cov_overlap_hard",
    "diag_cov_overlap_mask",
    "diag_cov_score_corr",
)
# every diagnostic column of a pre-training step (log.csv): the model's, then the task's
STEP_COLUMNS: tuple[str, ...] = (*DIAG_COLUMNS, *GRAD_COLUMNS, *COVERAGE_COLUMNS)


@torch.no_grad()
def head_diagnostics(
    prefix: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
) -> dict[str, torch.Tensor]:
    """Entropy, effective K, prototypes in use and top-1 agreement of one prototype head.

    Args:
        prefix: "glob" or "mim" (the column names' middle part).
        student, teacher: (..., K) logits; rows are flattened.
        center: (K,) the centre the loss subtracted from the teacher logits this step.
        teacher_temp: τ_t of this step.

    Returns 0-d float32 tensors ``{"diag_<prefix>_entropy", ..._eff_k, ..._used, ..._agree}``.
    """
    K = teacher.shape[-1]
    t = teacher.detach().float().reshape(-1, K)  # (N, K)
    s = student.detach().float().reshape(-1, K)  # (N, K)
    logq = torch.log_softmax((t - center.float()) / teacher_temp, dim=-1)  # (N, K)
    q = logq.exp()
    entropy = -(q * logq).sum(-1).mean()
    mean_q = q.mean(0)  # (K,)
    mean_entropy = -(mean_q * torch.log(mean_q.clamp_min(1e-30))).sum()
    top_t = t.sub(center.float()).argmax(-1)  # (N,) the target's mode
    used = torch.zeros(K, device=t.device).index_fill_(0, top_t, 1.0).sum()
    agree = (s.argmax(-1) == top_t).float().mean()
    return {
        f"diag_{prefix}_entropy": entropy,
        f"diag_{prefix}_eff_k": mean_entropy.exp(),
        f"diag_{prefix}_used": used,
        f"diag_{prefix}_agree": agree,
    }


@torch.no_grad()
def mask_overlap(
    mask: torch.Tensor,
    num_masked: int,
    *,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over images of |mask ∩ random mask| / M, random mask of the same size M.

    mask (B, P) bool: the mask the step used; the random mask is the top-M of ``noise`` (B, P)
    (the model passes the Gumbel noise the mask itself was drawn with, see the module notes)
    or of ``kernels.gumbel_noise`` from ``seed`` (an explicit seed: no global generator, no
    host read). Returns ``{"diag_mask_overlap": 0-d float32}``.
    """
    B, P = mask.shape
    _, _, rand = random_mask(B, P, num_masked, seed=seed, noise=noise, device=mask.device)
    both = (mask & rand).float().sum(1)  # (B,)
    return {"diag_mask_overlap": (both / max(num_masked, 1)).mean()}


def blank_images(images: torch.Tensor) -> torch.Tensor:
    """A blank batch like ``images`` (B, 3, S, S): every pixel white, normalised as the
    transforms normalise (white is also what a transparent background becomes)."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device, dtype=torch.float32)
    std = torch.tensor(IMAGE_STD, device=images.device, dtype=torch.float32)
    white = ((1.0 - mean) / std).to(images.dtype).view(1, 3, 1, 1)
    return white.expand_as(images).contiguous()


def objective_grad_norms(
    losses: dict[str, torch.Tensor],
    weights: Any,
    towers: dict[str, torch.nn.Module],
) -> dict[str, torch.Tensor]:
    """‖∇ (weight · loss)‖₂ of each objective over each tower's parameters, 0-d float32.

    losses: the step's unweighted losses (name → 0-d tensor with a graph); weights: an object
    with the weight of each as an attribute (``cfg.loss``); towers: name → module (e.g.
    ``{"vision": net.vision, "text": net.text}``). One ``torch.autograd.grad`` per objective,
    with ``retain_graph`` (the step's own backward follows), which writes no ``.grad``. Keys
    ``diag_grad_<objective>_<tower>``; 0 where the objective does not reach the tower.
    """
    params = {t: [p for p in m.parameters() if p.requires_grad] for t, m in towers.items()}
    flat = [p for ps in params.values() for p in ps]
    out: dict[str, torch.Tensor] = {}
    for name, loss in losses.items():
        if name not in GRAD_OBJECTIVES or not loss.requires_grad:
            continue
        grads = torch.autograd.grad(
            loss * getattr(weights, name), flat, retain_graph=True, allow_unused=True
        )
        start = 0
        for tower, ps in params.items():
            sq = [g.float().pow(2).sum() for g in grads[start : start + len(ps)] if g is not None]
            start += len(ps)
            norm = torch.stack(sq).sum().sqrt() if sq else loss.new_zeros((), dtype=torch.float32)
            out[f"diag_grad_{name}_{tower}"] = norm.detach()
    return out


@torch.no_grad()
def coverage_overlap(
    score: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor, num_masked: int, patch_size: int
) -> dict[str, torch.Tensor]:
    """The text-guided mask against object coverage (module notes), 0-d float32 each.

    score (B, P): the text-guided score of each patch (before noise); mask (B, P) bool: the
    step's mask; alpha (B, S, S) in [0, 1]: the transformed alpha channel (S = √P ·
    patch_size). Returns :data:`COVERAGE_COLUMNS`. No host read.
    """
    B, P = score.shape
    M = max(num_masked, 1)
    coverage = F.avg_pool2d(alpha[:, None].float(), patch_size).flatten(1)  # (B, P)
    if coverage.shape != score.shape:
        raise ValueError(
            f"alpha: {tuple(alpha.shape)} pools to {tuple(coverage.shape)} patches with "
            f"patch_size={patch_size}, but the score has {tuple(score.shape)}"
        )

    def top_m(values: torch.Tensor) -> torch.Tensor:  # (B, P) bool, ties to the lower index
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :num_masked]
        return torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, True)

    covered = top_m(coverage)
    hard = top_m(score.float())
    s = score.float() - score.float().mean(1, keepdim=True)
    c = coverage - coverage.mean(1, keepdim=True)
    denom = (s.pow(2).sum(1) * c.pow(2).sum(1)).sqrt()
    corr = torch.where(denom > 0, (s * c).sum(1) / denom.clamp_min(1e-30), torch.zeros_like(denom))
    return {
        "diag_cov_overlap_hard": ((hard & covered).float().sum(1) / M).mean(),
        "diag_cov_overlap_mask": ((mask & covered).float().sum(1) / M).mean(),
        "diag_cov_score_corr": corr.mean(),
    }


def check_ranges(row: dict[str, float], num_prototypes: int) -> list[str]:
    """What in a logged row lies outside the ranges above (empty when all is in range); for tests
    and sanity checks of a log. ``num_prototypes`` is K."""
    bad = []
    tol = 1e-4
    log_k = math.log(num_prototypes)
    for key, value in row.items():
        if not key.startswith("diag_") or value is None or value == "":
            continue
        v = float(value)
        if key.endswith("_entropy"):
            lo, hi = 0.0, log_k
        elif key.endswith("_eff_k") or key.endswith("_used"):
            lo, hi = 1.0, float(num_prototypes)
        elif key.startswith("diag_grad_") or key.endswith("_psi_ratio"):
            lo, hi = 0.0, math.inf
        elif key.endswith("_corr"):
            lo, hi = -1.0, 1.0
        else:  # agreement, overlap
            lo, hi = 0.0, 1.0
        if not (lo - tol <= v <= hi * (1 + tol) + tol):
            bad.append(f"{key}={v} not in [{lo}, {hi}]")
    return bad
