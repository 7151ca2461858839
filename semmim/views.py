"""A second view of a batch of images, made on device (``glob.views="cross"``).

iBOT and DINO compute the global (CLS) agreement between two *different* views of an image; the
spec's global loss compares a masked crop with the same crop unmasked. The data pipeline makes
one crop per image; the second view is made here from the batch tensor instead, so every data
loader (folder, JSON, CSV, webdataset, the embedded source) gets it without change:

- a random resized crop (area fraction in [``crop_min``, 1] of the first view, aspect ratio
  log-uniform in [3/4, 4/3], position uniform) resampled bilinearly to the same S × S, and
- a horizontal flip with probability 1/2,

as one ``affine_grid`` / ``grid_sample`` per batch. Every draw comes from a ``torch.Generator``
seeded with the step's seed, so the view is a pure function of (images, seed): an exact resume
draws the same views, and no host read happens. Colour jitter and blur (DINO's other
augmentations) are left out: the views differ in geometry only. The crop is taken from the
first view (already a crop of the image), not from the original image; the first view's own
caption swap on flips does not matter here because only the teacher's image CLS reads this view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["view_params", "apply_view", "second_view"]


def view_params(batch: int, seed: int, crop_min: float, device: torch.device) -> torch.Tensor:
    """The affine maps (B, 2, 3) of :func:`second_view` (normalised coordinates, as
    ``F.affine_grid`` takes them): [[±w, 0, cx], [0, h, cy]], w and h the crop's width and
    height as fractions of the side, (cx, cy) its centre, − for a flipped view."""
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(batch, 5, generator=gen, device=device)  # (B, 5) in [0, 1)
    area = crop_min + (1.0 - crop_min) * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (1.0 - w) * (2.0 * u[:, 2] - 1.0)  # the crop stays inside the image
    cy = (1.0 - h) * (2.0 * u[:, 3] - 1.0)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    return torch.stack(
        [torch.stack([w * sign, zero, cx], dim=1), torch.stack([zero, h, cy], dim=1)], dim=1
    )


def apply_view(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample images (B, C, S, S) through the affine maps theta (B, 2, 3) (output pixel →
    input position, normalised coordinates), bilinear, same size and dtype. The identity map
    returns the images (pixel centres land on pixel centres); [[-1, 0, 0], [0, 1, 0]] mirrors
    them."""
    B, C, H, W = images.shape
    grid = F.affine_grid(theta.float(), [B, C, H, W], align_corners=False)  # (B, H, W, 2)
    view = F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return view.to(images.dtype)


def second_view(images: torch.Tensor, seed: int, crop_min: float = 0.4) -> torch.Tensor:
    """images (B, 3, S, S) → a second view (B, 3, S, S), same dtype: random resized crop +
    horizontal flip drawn from ``seed`` (module notes). No gradient is needed (the teacher
    reads it); the call makes no host read."""
    return apply_view(images, view_params(images.shape[0], seed, crop_min, images.device))
