"""Image transforms written on PIL + torch (no torchvision).

Every random transform takes an explicit ``random.Random`` so that augmentation is a pure function of
(seed, epoch, sample index): the same sample gets the same crop in every worker layout and after a
resume (see :func:`sample_rng`).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# ALBEF / CLIP normalisation constants.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {
    "left": "right",
    "right": "left",
    "Left": "Right",
    "Right": "Left",
    "LEFT": "RIGHT",
    "RIGHT": "LEFT",
}


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A ``random.Random`` that depends only on (seed, epoch, index), stable across processes."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def swap_left_right(caption: str) -> str:
    """Swap the words "left" and "right" (whole words, case kept) so a caption matches a mirrored image."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], caption)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto ``background``.

    Wide greyscale is scaled to 0..255, where Pillow's own ``convert`` clips: integer (``I;16*``
    from 16-bit PNG / TIFF, and ``I``) from 0..65535 (else every value above 255 is white), float
    (``F``, e.g. a 32-bit float TIFF) from 0..1, the convention of float images (else all
    black). Values outside the range are clipped; NaN is black.
    """
    if image.mode.startswith("I") or image.mode == "F":
        # 65535 / 257 = 255 exactly; values outside the 16-bit range (mode I is 32-bit) are clipped.
        wide = np.asarray(image, dtype=np.float64)
        wide = np.nan_to_num(wide * 255.0 if image.mode == "F" else wide / 257.0, nan=0.0)
        grey = np.clip(np.rint(wide), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey)  # (H, W) uint8 -> mode L
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The image's alpha channel (mode L) when it has one (RGBA, LA, PA, or a palette image
    with a transparent colour), else None: the object coverage of a stamp on a transparent
    background (:func:`semmim.diagnostics.coverage_overlap`)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        return image.convert("RGBA").getchannel("A")
    return None


def alpha_tensor(alpha: Image.Image) -> torch.Tensor:
    """Mode-L alpha channel -> float tensor (H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(alpha, dtype=np.uint8).copy()).float().div_(255.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(tensor: torch.Tensor, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """Channel-wise (x - mean) / std of a (3, H, W) tensor."""
    m = torch.tensor(mean, dtype=tensor.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=tensor.dtype).view(3, 1, 1)
    return (tensor - m) / s


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Pick a crop box (left, top, right, bottom) covering ``scale`` of the area with aspect in ``ratio``.

    Same algorithm as torchvision's RandomResizedCrop: 10 tries, then a centre crop fallback.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclass(frozen=True)
class TrainTransform:
    """Training augmentation: random resized crop, horizontal flip with caption fix-up, normalise.

    Args:
        image_size: output side length in pixels.
        scale: area fraction range of the random crop; ``(1.0, 1.0)`` disables cropping.
        ratio: aspect-ratio range of the random crop.
        flip: ``"swap"`` flips half the images and swaps "left"/"right" in their captions, ``"none"``
            never flips (use it when captions have other orientation words).
    """

    image_size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: str = "swap"

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if self.flip not in ("swap", "none"):
            raise ValueError(f"flip must be 'swap' or 'none', got {self.flip!r}")

    def __call__(
        self, image: Image.Image, caption: str, rng: random.Random
    ) -> tuple[torch.Tensor, str]:
        """Return (normalised tensor (3, S, S), possibly left/right-swapped caption)."""
        tensor, caption, _ = self.apply(image, caption, rng)
        return tensor, caption

    def apply(
        self, image: Image.Image, caption: str, rng: random.Random, alpha: bool = False
    ) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        """As :meth:`__call__`, plus (``alpha`` True and the image has an alpha channel) the
        alpha channel through the same crop, resize and flip, (S, S) in [0, 1]; else None.
        The RGB result and the draws from ``rng`` are the same either way."""
        a = alpha_channel(image) if alpha else None
        image = to_rgb(image)
        size = (self.image_size, self.image_size)
        box = None
        if self.scale != (1.0, 1.0):
            box = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        image = image.resize(size, Image.BICUBIC, box=box)
        a = a.resize(size, Image.BICUBIC, box=box) if a is not None else None
        if self.flip == "swap" and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            a = a.transpose(Image.FLIP_LEFT_RIGHT) if a is not None else None
            caption = swap_left_right(caption)
        return normalize(to_tensor(image)), caption, alpha_tensor(a) if a is not None else None


@dataclass(frozen=True)
class EvalTransform:
    """Evaluation transform: resize to a square (as ALBEF does) and normalise; deterministic."""

    image_size: int

    def __call__(
        self, image: Image.Image, caption: str, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, str]:
        """Return (normalised tensor (3, S, S), caption unchanged)."""
        tensor, caption, _ = self.apply(image, caption, rng)
        return tensor, caption

    def apply(
        self,
        image: Image.Image,
        caption: str,
        rng: random.Random | None = None,
        alpha: bool = False,
    ) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        """As :meth:`__call__`, plus the resized alpha channel (S, S) in [0, 1] when ``alpha``
        and the image has one (else None)."""
        size = (self.image_size, self.image_size)
        a = alpha_channel(image) if alpha else None
        image = to_rgb(image).resize(size, Image.BICUBIC)
        a = alpha_tensor(a.resize(size, Image.BICUBIC)) if a is not None else None
        return normalize(to_tensor(image)), caption, a
