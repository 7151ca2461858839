"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``semmim train --fsdp``: the model, its EMA
copy and the AdamW state sharded over the ranks instead of replicated (DDP).

How the model is sharded (:func:`shard_model`):

- every transformer block (each element of a :class:`~semmim.layers.GradCheckpointing` stack:
  ViT blocks, BERT / fusion layers) of ``net`` **and of ``ema``** is its own FSDP unit, so the
  EMA copy is sharded exactly like the weights it follows; parameter ``i`` of ``ema`` and of
  ``net`` then hold the same rows on every rank and the EMA update
  (:meth:`semmim.SemMIM.update_momentum`) runs on the local shards alone, no communication;
- then the root (the whole model): embeddings, norms, projections, heads, and the MIM
  predictor's 1-2 blocks. ``SemMIM.forward`` is the only forward the loop calls, so the root
  unit gathers those once per step. The predictor's blocks stay there because ψ runs their
  ``cross_step`` both inside their ``forward`` and from outside it (a block unit would be
  resharded at the end of the inner call, before the block's MLP);
- 0-d parameters (the ITC temperature) cannot be sharded: they stay replicated (FSDP's
  ``ignored_params``) and :func:`finish_backward` averages their gradients over the ranks.

Buffers (ITC queues, image ids, centres) are not sharded: as under DDP they are updated from
all-gathered / all-reduced values, so they stay identical on every rank.

Mixed precision: the run's ``torch.autocast`` path is kept as it is (parameters gathered in
float32, autocast casts per op, the fp32 regions of :mod:`semmim.layers` hold), with gradients
reduced in float32 — so an FSDP step computes what a DDP step computes; only the order of the
float reductions differs (the tolerance is in docs/TRAINING.md).

Only APIs meant to be present in torch 2.11 and 2.13 are used (``fully_shard`` with
``ignored_params``, ``set_requires_gradient_sync``, DTensor ``to_local``); run here with 2.13 only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from semmim.dist import local_shard

__all__ = [
    "is_sharded",
    "shard_model",
    "no_sync",
    "finish_backward",
    "clip_grad_norm",
]


def is_sharded(module: nn.Module) -> bool:
    """True for a module :func:`shard_model` (``fully_shard``) has sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every block stack in ``model`` (net and ema alike)."""
    from semmim.layers import GradCheckpointing

    found = []
    for m in model.modules():
        if isinstance(m, GradCheckpointing):
            for child in m.children():
                if isinstance(child, nn.ModuleList):
                    found.extend(child)
    return found


def shard_model(model: nn.Module, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Apply ``fully_shard`` per transformer block, then to the root; returns ``model`` (now an
    ``FSDPModule``: its parameters are DTensors sharded on dim 0 over the default process group).

    Call it after the model is on its device and before the optimizer is built (the optimizer
    must hold the sharded parameters). Gradients are averaged like DDP's, in ``reduce_dtype``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # param_dtype None: parameters are gathered as stored (fp32); autocast, as on the DDP path,
    # decides each op's precision.
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    for block in _blocks(model):
        if not hasattr(block, "cross_step"):
            fully_shard(block, mp_policy=mp)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, mp_policy=mp, ignored_params=scalars or None)
    return model


@contextlib.contextmanager
def no_sync(eager: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduction) for a micro-batch that is not the last of its
    step: DDP's ``no_sync()``, or FSDP2's ``set_requires_gradient_sync(False)``."""
    if is_sharded(eager):
        eager.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            eager.set_requires_gradient_sync(True)
    else:
        with eager.no_sync():
            yield


def _replicated_grads(model: nn.Module) -> list[torch.Tensor]:
    return [
        p.grad
        for p in model.parameters()
        if p.grad is not None and getattr(p, "to_local", None) is None
    ]


@torch.no_grad()
def finish_backward(model: nn.Module) -> None:
    """After the last backward of a step: average the gradients of the parameters FSDP left
    replicated (0-d ones, :func:`shard_model`) over the ranks, as DDP does for all of them."""
    grads = _replicated_grads(model)
    if not grads or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a sharded model (DTensor shards and replicated
    gradients mixed): the global L2 norm (shards' squares summed over ranks, replicated ones
    counted once), then every gradient scaled by ``min(1, max_norm / (norm + 1e-6))``, the
    same rule. Returns the norm (0-d, on the gradients' device; no host read)."""
    shard_grads = [
        local_shard(p.grad)
        for p in model.parameters()
        if p.grad is not None and getattr(p.grad, "to_local", None) is not None
    ]
    plain = _replicated_grads(model)
    device = (shard_grads or plain)[0].device if (shard_grads or plain) else torch.device("cpu")
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for g in shard_grads:
        sq += g.float().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    for g in plain:
        sq += g.float().pow(2).sum()
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = shard_grads + plain
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm


def full_model(model: nn.Module, build) -> nn.Module:
    """An unsharded copy of a sharded ``model`` on every rank (a collective: every rank calls
    it): ``build()`` makes the plain model, the gathered full state is loaded into it. For the
    evaluation at the end and ``train(..., return_model=True)``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = build()
    plain.load_state_dict({k: local_shard(v) for k, v in state.items()})
    return plain.train(model.training)
