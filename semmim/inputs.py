"""The one check of a model's inputs, shared by the pre-training and the downstream models.

Shapes and dtypes cost nothing and are always checked; the empty-caption and token-range checks
read tensor values (one device→host sync) and run only with ``read_values``.
"""

from __future__ import annotations

import torch

from semmim.config import SemMIMConfig

__all__ = ["special_token_ids", "check_inputs", "check_image_ids"]


def special_token_ids(tokenizer) -> list[int]:
    """[PAD], [CLS], [SEP], [MASK] ids of ``tokenizer``: the tokens that are no caption content."""
    t = tokenizer
    return [t.pad_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id]


def check_inputs(
    cfg: SemMIMConfig,
    special_ids: torch.Tensor,
    images: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    read_values: bool = True,
) -> None:
    """Raise ValueError naming the bad argument.

    images (B, 3, S, S) float with S = ``cfg.vision.image_size``; input_ids, attention_mask
    (B, T), T <= ``cfg.text.max_len``, ids in [0, ``cfg.text.vocab_size``); every caption holds a
    token besides ``special_ids`` (S,) under its mask. None skips that argument (images alone:
    an image encoder call; input_ids None also skips attention_mask).
    """
    S = cfg.vision.image_size
    if images is not None:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images: expected a (B, 3, {S}, {S}) tensor, got "
                f"{tuple(images.shape) if torch.is_tensor(images) else images}"
            )
        if tuple(images.shape[2:]) != (S, S):
            raise ValueError(
                f"images: expected {S}x{S} pixels (vision.image_size), got "
                f"{tuple(images.shape[2:])}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images: expected a float tensor, got {images.dtype}")
    if input_ids is None:
        return
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if torch.is_tensor(input_ids) else input_ids
        raise ValueError(f"input_ids: expected a (B, T) tensor, got {got}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected int64 token ids, got {input_ids.dtype}")
    if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else attention_mask
        raise ValueError(
            f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, got {got}"
        )
    if images is not None and images.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"input_ids: batch size {input_ids.shape[0]} != images batch size {images.shape[0]}"
        )
    if input_ids.shape[1] > cfg.text.max_len:
        raise ValueError(
            f"input_ids: {input_ids.shape[1]} tokens > text.max_len={cfg.text.max_len}"
        )
    if not read_values:
        return
    content = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    empty = ~content.any(1)
    bad_id = (input_ids < 0) | (input_ids >= cfg.text.vocab_size)
    if bool(empty.any() | bad_id.any()):
        if bad_id.any():
            raise ValueError(f"input_ids: token ids must lie in [0, {cfg.text.vocab_size})")
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"input_ids: empty caption(s) at rows {rows[:8]} (no token besides "
            f"[CLS]/[SEP]/[PAD] under attention_mask)"
        )


def check_image_ids(image_ids: torch.Tensor | None, B: int, read_values: bool) -> None:
    """The one check of ``image_ids``: None or a (B,) integer tensor; with ``read_values`` (a host
    read) also every id >= 0 (-1 marks an empty queue slot)."""
    if image_ids is None:
        return
    if (
        not torch.is_tensor(image_ids)
        or image_ids.shape != (B,)
        or image_ids.is_floating_point()
        or image_ids.is_complex()
        or image_ids.dtype == torch.bool
    ):
        got = (
            f"{tuple(image_ids.shape)} {image_ids.dtype}"
            if torch.is_tensor(image_ids)
            else type(image_ids).__name__
        )
        raise ValueError(f"image_ids: expected a ({B},) integer tensor, got {got}")
    if read_values and B and bool((image_ids < 0).any()):
        raise ValueError(f"image_ids: must be >= 0, got min {int(image_ids.min())}")
