"""The optimiser's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "temp", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on biases, norms, embeddings, tokens, temperature.

    A model's ``no_weight_decay()`` names (timm's convention; :meth:`semmim.SemMIM.no_weight_decay`
    lists its position embeddings and learned tokens, e.g. ``net.predictor_pos``) are never
    decayed; the generic rules below cover the rest. Only parameters that require gradients
    (the EMA copy does not) are included.
    """
    named = getattr(model, "no_weight_decay", None)
    no_decay_names = set(named()) if callable(named) else set()
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            p.ndim < 2
            or name in no_decay_names
            or id(p) in no_decay_ids
            or any(k in leaf for k in _NO_DECAY_NAMES)
            or "embed" in leaf
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Multiplier of the base lr at step s: linear warm-up to 1, then cosine down to ``min_lr_ratio``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
