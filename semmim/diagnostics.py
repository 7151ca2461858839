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

In a multi-process run each rank reports its own batch (no all-reduce).
"""

from __future__ import annotations

import math

import torch

from semmim.masking import random_mask

__all__ = ["DIAG_COLUMNS", "head_diagnostics", "mask_overlap", "check_ranges"]

HEADS = ("glob", "mim")
HEAD_STATS = ("entropy", "eff_k", "used", "agree")
DIAG_COLUMNS: tuple[str, ...] = (
    *(f"diag_{h}_{s}" for h in HEADS for s in HEAD_STATS),
    "diag_mask_overlap",
)


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
        else:  # agreement, overlap
            lo, hi = 0.0, 1.0
        if not (lo - tol <= v <= hi * (1 + tol) + tol):
            bad.append(f"{key}={v} not in [{lo}, {hi}]")
    return bad
