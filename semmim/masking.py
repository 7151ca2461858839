"""Which image patches and text tokens to mask (no gradients anywhere here).

Image masks come as ``(keep_idx (B, R), mask_idx (B, M), mask (B, P))``: both index tensors
sorted ascending, disjoint, together covering 0..P−1 (patch indices; the CLS token is not a
patch and is never masked). Text-guided masking calls ``semmim.kernels.topk_mask``.
"""

from __future__ import annotations

import math

import torch

from semmim import kernels
from semmim.layers import OpCalls

__all__ = ["text_guided_mask", "random_mask", "mlm_mask", "mlm_positions"]

ImageMask = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _nothing_masked(batch: int, num_patches: int, device: torch.device | str) -> ImageMask:
    keep_idx = torch.arange(num_patches, device=device).expand(batch, num_patches).contiguous()
    mask_idx = torch.empty(batch, 0, dtype=torch.long, device=device)
    return keep_idx, mask_idx, torch.zeros(batch, num_patches, dtype=torch.bool, device=device)


@torch.no_grad()
def text_guided_mask(
    patch_feat: torch.Tensor,
    text_feat: torch.Tensor,
    num_masked: int,
    *,
    tau: float,
    seed: int,
    ops: OpCalls | None = None,
) -> ImageMask:
    """Mask the top-M patches by s_i / tau + Gumbel noise, s_i = cos(patch_feat_i, text_feat).

    patch_feat (B, P, d), text_feat (B, d); tau = 0 means no noise (hard top-M of s).
    Deterministic given ``seed``. ``ops``: the model's :class:`~semmim.layers.OpCalls`
    (backend and validation of the top-k op; default: automatic dispatch, validating).
    Returns keep_idx (B, P−M), mask_idx (B, M), mask (B, P).
    """
    ops = ops if ops is not None else OpCalls()
    B, P, _ = patch_feat.shape
    if num_masked == 0:
        return _nothing_masked(B, P, patch_feat.device)
    noise = None
    if tau > 0:
        noise = kernels.gumbel_noise((B, P), seed=seed, device=patch_feat.device)
    return ops.topk_mask(
        patch_feat, text_feat, num_masked, noise=noise, tau=tau if tau > 0 else 1.0
    )


@torch.no_grad()
def random_mask(
    batch: int, num_patches: int, num_masked: int, *, seed: int, device: torch.device | str
) -> ImageMask:
    """Uniformly random M-subset per image (the ``masking.strategy=random`` ablation).

    Deterministic given ``seed``. Returns keep_idx (B, P−M), mask_idx (B, M), mask (B, P).
    """
    if num_masked == 0:
        return _nothing_masked(batch, num_patches, device)
    noise = kernels.gumbel_noise((batch, num_patches), seed=seed, device=device)
    order = noise.argsort(dim=1, descending=True)  # (B, P), a random permutation per row
    mask_idx = order[:, :num_masked].sort(dim=1).values
    keep_idx = order[:, num_masked:].sort(dim=1).values
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, mask_idx, True)
    return keep_idx, mask_idx, mask


@torch.no_grad()
def mlm_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prob: float,
    mask_frac: float,
    random_frac: float,
    mask_token_id: int,
    vocab_size: int,
    special_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: in each caption choose max(1, round(prob · n)) of its n real, non-special
    tokens (a uniformly random subset); of those, ``mask_frac`` → [MASK], ``random_frac`` →
    a random token, the rest unchanged.

    A fixed count per caption (as BERT's data pipeline) bounds the predicted tokens per row by
    ceil(prob · T), so the model can run the vocabulary head on those positions only.
    input_ids, attention_mask (B, T); special_ids (S,) int64 on the same device.
    Returns (masked_ids (B, T), labels (B, T) with −100 at positions not to predict).
    """

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=input_ids.device)

    candidate = attention_mask.bool() & ~torch.isin(input_ids, special_ids)  # (B, T)
    n_real = candidate.sum(1)  # (B,)
    n_chosen = torch.where(n_real > 0, (prob * n_real).round().clamp_min(1), 0)  # (B,)
    order = uniform().masked_fill(~candidate, -1.0).argsort(dim=1, descending=True)  # (B, T)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )  # rank of each token
    chosen = candidate & (rank < n_chosen[:, None])
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    u = uniform()
    to_mask = chosen & (u < mask_frac)
    to_random = chosen & (u >= mask_frac) & (u < mask_frac + random_frac)
    random_ids = torch.randint(
        vocab_size, input_ids.shape, generator=generator, device=input_ids.device
    )
    ids = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    ids = torch.where(to_random, random_ids, ids)
    return ids, labels


def mlm_positions(labels: torch.Tensor, prob: float) -> torch.Tensor:
    """Sorted (B, N) positions covering every predicted token of :func:`mlm_mask`'s labels,
    N = max(1, ceil(prob · T)) (fixed, so no host sync); extra slots hold label −100."""
    N = max(1, math.ceil(prob * labels.shape[1]))
    return (labels >= 0).to(torch.int8).topk(N, dim=1).indices.sort(dim=1).values
