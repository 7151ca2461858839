"""The objectives as plain functions of tensors (the model wires them up).

None of these synchronise with the host: no ``.item()``, no data-dependent Python branches.
Softmax, log-softmax and the cross-entropies run in float32 whatever the logits' dtype (inputs
are upcast), so bfloat16/float16 autocast changes only the matrix products before them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "soft_cross_entropy",
    "itc_loss",
    "sample_hard_negatives",
    "mlm_loss",
    "agreement_loss",
    "pixel_targets",
]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−Σ_k target_k · log_softmax(logits)_k over the last dim → float32 logits.shape[:-1]."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def itc_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    sim_i2t_m: torch.Tensor,
    sim_t2i_m: torch.Tensor,
    alpha: float | torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """ALBEF contrastive loss with momentum distillation.

    sim_* (B, B+Q): similarities / temperature against [batch keys | queue]; the positive of
    row b is column b. *_m are the momentum model's similarities. Targets mix the momentum
    softmax (weight alpha) with the positives' distribution. ``positives`` (B, B) bool,
    symmetric: in-batch pairs that match (e.g. the same image; ALBEF's retrieval fine-tuning
    ``idx`` rule), or (B, B+Q): also the queue columns that match (the same image id); each
    row's target mass is split evenly over its positives. The diagonal always counts; None =
    the diagonal only (queue columns negatives). Returns a scalar.
    """
    B, N = sim_i2t.shape
    cols = torch.arange(N, device=sim_i2t.device)
    # built without mutating a view, so torch.compile can trace it
    onehot = (cols[None, :] == cols[:B, None]).float()  # (B, B+Q), 1 at column b of row b
    if positives is not None:
        if positives.shape not in ((B, B), (B, N)) or positives.dtype != torch.bool:
            raise ValueError(
                f"positives: expected a ({B}, {B}) or ({B}, {N}) bool tensor, got "
                f"{tuple(positives.shape)} {positives.dtype}"
            )
        eye = torch.eye(B, dtype=torch.bool, device=positives.device)
        pos = (positives[:, :B] | eye).float()
        if positives.shape[1] == N and N > B:
            pos = torch.cat([pos, positives[:, B:].float()], dim=1)
        else:
            pos = torch.cat([pos, onehot[:, B:]], dim=1)
        onehot = pos / pos.sum(1, keepdim=True)
    t_i2t = alpha * F.softmax(sim_i2t_m.float(), dim=1) + (1 - alpha) * onehot
    t_t2i = alpha * F.softmax(sim_t2i_m.float(), dim=1) + (1 - alpha) * onehot
    return (
        soft_cross_entropy(sim_i2t, t_i2t).mean() + soft_cross_entropy(sim_t2i, t_t2i).mean()
    ) / 2


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor,
    generator: torch.Generator | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """One negative per row, drawn from softmax(sim) over the allowed columns.

    sim (B, B) in-batch similarities / temperature, B ≥ 2; exclude (B, B) bool, True = column
    is not a negative for that row (e.g. the same image, an identical caption); the diagonal is
    always excluded. → (B,) int64 column indices ≠ row. A row whose every column is excluded
    falls back to any column but its own (the caller should ignore those rows: they have no
    true negative in the batch, ``exclude.all(1)``). Vectorised: one ``torch.multinomial``
    call over the batch, no host sync.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
        raise ValueError(f"sim: expected a (B, B) tensor with B >= 2, got {tuple(sim.shape)}")
    B = sim.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    banned = eye
    if exclude is not None:
        if exclude.shape != (B, B) or exclude.dtype != torch.bool:
            raise ValueError(
                f"exclude: expected a ({B}, {B}) bool tensor, got "
                f"{tuple(exclude.shape)} {exclude.dtype}"
            )
        banned = exclude | eye
        banned = torch.where(banned.all(1, keepdim=True), eye, banned)
    weights = F.softmax(sim.float().masked_fill(banned, float("-inf")), dim=1)
    # A row whose softmax is not finite (inf/NaN similarities) falls back to uniform.
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (~banned).float())
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logits_m: torch.Tensor,
    alpha: float | torch.Tensor,
) -> torch.Tensor:
    """(1−α)·CE(labels) + α·CE(softmax(momentum logits)), averaged over predicted tokens.

    logits, logits_m (B, N, V); labels (B, N) with −100 = ignore. A batch without any
    predicted token gives 0 (no host sync to check). Under autocast the vocabulary logits
    come in the low precision (as in BERT/LLM mixed-precision training: the (B, N, V)
    product is the costly one); the softmaxes here are float32.
    """
    logits, logits_m = logits.float(), logits_m.float()
    valid = labels >= 0  # (B, N)
    hard = F.cross_entropy(logits.flatten(0, 1), labels.flatten().clamp_min(0), reduction="none")
    soft = soft_cross_entropy(logits, F.softmax(logits_m, dim=-1)).flatten()
    per_token = (1 - alpha) * hard + alpha * soft  # (B*T,)
    count = valid.sum().clamp_min(1)
    return (per_token * valid.flatten()).sum() / count


def agreement_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float | torch.Tensor,
) -> torch.Tensor:
    """DINO/iBOT cross-entropy between a centred, sharpened teacher and the student.

    student, teacher (..., K) logits; center (K,) or broadcastable. Returns the float32
    per-row loss, shape student.shape[:-1]; the caller decides how to average.
    """
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    return soft_cross_entropy(student.float() / student_temp, q)


def pixel_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch normalised pixels (MAE ``norm_pix_loss``): (B, 3, S, S) → (B, P, 3·p·p)."""
    B, C, S, _ = images.shape
    g, p = S // patch_size, patch_size
    x = images.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, g, g, p, p, C)
    x = x.reshape(B, g * g, p * p * C)  # (B, P, p·p·C), row-major patch order as Conv2d
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()
