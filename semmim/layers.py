"""Transformer building blocks: ViT (pre-LN), BERT (post-LN), fusion and MIM-predictor layers.

Cross-attention and the kept-patch gather go through :class:`OpCalls`, the model's one way of
calling ``semmim.kernels`` (so faster backends drop in); self-attention uses PyTorch's SDPA.

Dropout (``dropout`` arguments, default 0 = none, ``nn.Identity``): on self-attention
probabilities (SDPA's ``dropout_p``, training mode only) and on the output of every residual
branch (attention projection, cross-attention projection, MLP), as BERT's
``attention_probs_dropout_prob`` / ``hidden_dropout_prob``. Cross-attention probabilities get
no dropout: the fused cross-attention kernels have none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from semmim import kernels
from semmim.config import KernelsConfig
from semmim.kernels.registry import OP_NAMES

__all__ = [
    "OpCalls",
    "fp32_region",
    "SelfAttention",
    "CrossAttention",
    "PrototypeHead",
    "VisionEncoder",
    "TextEncoder",
    "FusionEncoder",
    "Predictor",
    "MLMHead",
    "GradCheckpointing",
    "set_grad_checkpointing",
]


class OpCalls:
    """How one model calls :mod:`semmim.kernels`: each op's ``backend=`` (from
    :class:`~semmim.config.KernelsConfig`) and the ``validate=`` flag, passed to every call.

    One method per op of :data:`semmim.kernels.registry.OP_SPECS` (the one op list), named as
    the op, with the op's own arguments: ``ops.masked_gather(x, index)`` is
    ``semmim.kernels.masked_gather(x, index, backend=..., validate=...)`` (see each op's
    docstring for shapes); the op's module is imported at its first call. The model owns one
    instance and hands it to each layer that calls an op (its EMA copy shares it), so settings
    belong to a model, never to the process. ``validate`` is what the ops get now:
    :meth:`semmim.SemMIM.forward` sets it to False for a ``check_inputs=False`` call (no value
    checks, so no device→host sync) and restores it afterwards.
    """

    def __init__(self, cfg: KernelsConfig | None = None) -> None:
        cfg = cfg if cfg is not None else KernelsConfig()
        self.backends: dict[str, str | None] = {op: cfg.backend_for(op) for op in OP_NAMES}
        self.configured: bool = cfg.validate  # what the config asks for
        self.validate: bool = cfg.validate

    @contextlib.contextmanager
    def values_checked(self, check_inputs: bool) -> Iterator[None]:
        """Within: the ops validate tensor values only when the config asks and
        ``check_inputs`` is True (a model's ``forward(check_inputs=False)``: no host sync)."""
        saved = self.validate
        self.validate = self.configured and check_inputs
        try:
            yield
        finally:
            self.validate = saved

    def __repr__(self) -> str:
        chosen = {k: v for k, v in self.backends.items() if v is not None}
        return f"OpCalls(backends={chosen or 'auto'}, validate={self.validate})"


def _op_call(op: str):
    def call(self: OpCalls, *args: Any, **kwargs: Any) -> Any:
        # looked up per call (not bound once), so a test's monkeypatch of the op is seen
        fn = getattr(kernels, op)
        return fn(*args, backend=self.backends[op], validate=self.validate, **kwargs)

    call.__name__ = call.__qualname__ = op
    call.__doc__ = f":func:`semmim.kernels.{op}` with this model's backend and validate flag."
    return call


for _op in OP_NAMES:
    setattr(OpCalls, _op, _op_call(_op))


def fp32_region(x: torch.Tensor):
    """Context that turns autocast off on ``x``'s device: softmax, log-softmax and
    L2-normalisation of logits run in float32 inside it (callers cast with ``.float()``)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    x (B, L, D), key_mask (B, L) bool, True = real token (None = all real) → (B, L, D).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = dropout_layer(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).unbind(2)  # (B,L,H,Dh)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B,H,L,Dh)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B,1,1,L)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries (B, Lq, Dq) attend to context (B, Lk, Dk).

    key_mask (B, Lk) bool, True = real key; a query row with no real key gets zeros.
    Returns (B, Lq, Dq).
    """

    def __init__(
        self, dim: int, ctx_dim: int, heads: int, dropout: float = 0.0, ops: OpCalls | None = None
    ) -> None:
        super().__init__()
        self.heads = heads
        self.ops = ops if ops is not None else OpCalls()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = dropout_layer(dropout)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, Lq, D = x.shape
        Lk, H = ctx.shape[1], self.heads
        q = self.q(x).view(B, Lq, H, D // H)
        k, v = self.kv(ctx).view(B, Lk, 2, H, D // H).unbind(2)  # strided views (B,Lk,H,Dh)
        y = self.ops.cross_attention(q, k, v, key_mask)  # (B,Lq,H,Dh)
        return self.drop(self.proj(y.reshape(B, Lq, D)))


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` when p = 0 (no module that does nothing)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class MLP(nn.Sequential):
    """Linear → GELU (exact, as BERT) → Linear → dropout (keys ``0`` and ``2`` hold weights)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), dropout_layer(dropout)
        )


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + SA(LN x), then + MLP(LN x). (B, L, D) → (B, L, D)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, eps: float = 1e-6, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PredictorBlock(nn.Module):
    """MIM predictor φ layer (pre-LN): patch self-attention, cross-attention to text, MLP.

    x (B, P+1, Dv), text (B, T, Dt), text_mask (B, T) bool → (B, P+1, Dv).
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        heads: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        ops: OpCalls | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, text_dim, heads, dropout, ops)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def text_residual(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """CA(LN x, text): what the cross-attention step adds to x (same shape as x)."""
        return self.cross(self.norm_cross(x), text, text_mask)

    def cross_step(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x + CA(LN x, text): the step ψ reuses (with EMA weights) to put text into targets."""
        return x + self.text_residual(x, text, text_mask)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = self.cross_step(x, text, text_mask)
        return x + self.mlp(self.norm2(x))


class BertLayer(nn.Module):
    """Post-LN BERT layer: LN(x + SA x), then LN(x + MLP x). (B, T, D) → (B, T, D)."""

    def __init__(
        self, dim: int, heads: int, intermediate: int, eps: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, intermediate, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, key_mask))
        return self.norm2(x + self.mlp(x))


class FusionLayer(nn.Module):
    """Post-LN fusion layer (ALBEF): text self-attention, cross-attention to image, MLP.

    x (B, T, Dt), text_mask (B, T), image (B, Li, Dv), image_mask (B, Li) or None → (B, T, Dt).
    """

    def __init__(
        self,
        dim: int,
        image_dim: int,
        heads: int,
        intermediate: int,
        eps: float,
        dropout: float = 0.0,
        ops: OpCalls | None = None,
    ) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross = CrossAttention(dim, image_dim, heads, dropout, ops)
        self.norm_cross = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, intermediate, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        text_mask: torch.Tensor | None,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, text_mask))
        x = self.norm_cross(x + self.cross(x, image, image_mask))
        return self.norm2(x + self.mlp(x))


class PrototypeHead(nn.Module):
    """h: MLP dim→hidden→hidden→bottleneck, L2-normalise, weight-normalised linear →K, no bias.

    The last layer's weight rows are normalised (weight norm with g fixed to 1, as DINO's
    default), so logits are cosines. x (..., dim) → float32 logits (..., K).

    Under autocast the MLP runs in the low precision; the L2-normalisations and the cosine
    logits run in float32, because the losses divide them by temperatures as small as 0.04:
    a bfloat16 cosine (spacing 2^-8 near 1) would move a logit by up to 0.1 before the softmax.
    """

    def __init__(self, dim: int, hidden: int, bottleneck: int, num_prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) → float32 L2-normalised bottleneck features z (..., bottleneck): what
        :func:`semmim.kernels.prototype_cross_entropy` takes with the raw ``prototypes`` (the
        model's losses call the op; :meth:`forward` gives the logits themselves)."""
        h = self.mlp(x)
        with fp32_region(h):
            return F.normalize(h.float(), dim=-1)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Features z (..., bottleneck) from :meth:`features` → float32 cosine logits (..., K)."""
        with fp32_region(z):
            return F.linear(z, F.normalize(self.prototypes.float(), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


class MLMHead(nn.Module):
    """BERT prediction head: dense → GELU → LN → decoder tied to the word embeddings (+bias).

    x (B, T, D) → logits (B, T, V).
    """

    def __init__(self, dim: int, word_embeddings: nn.Embedding, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, self.word_embeddings.weight, self.bias)


class GradCheckpointing:
    """timm's ``set_grad_checkpointing`` switch for a module that runs a stack of blocks: when on,
    each block's activations are recomputed in backward instead of stored (less memory, one more
    forward per block). Off by default; the EMA copy, made before the switch is set, keeps it off
    and runs under no_grad anyway."""

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """x through every block of ``blocks`` (``block(x, *args)``), checkpointed when the
        switch is on and autograd records."""
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x


def set_grad_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """Set the :class:`GradCheckpointing` switch of every block stack inside ``module``."""
    for m in module.modules():
        if isinstance(m, GradCheckpointing):
            m.set_grad_checkpointing(enable)


class VisionEncoder(GradCheckpointing, nn.Module):
    """ViT: 16-px patches, CLS token, learned absolute positions, pre-LN blocks, final LN.

    ``dist_token``: a DeiT distillation token after CLS, with its own position (``pos_embed``
    is then (1, P+2, D)); it takes part in attention but is dropped from every output, so the
    outputs keep the (B, P+1, D) / (B, R+1, D) layout. Three entry points, all returning
    normalised tokens:
    ``forward(images)`` (B,3,S,S) → (B, P+1, D) on the full image;
    ``forward_masked(images, mask)`` replaces masked patches by a learned [MASK] embedding;
    ``forward_kept(images, keep_idx)`` runs only CLS + the R kept patches → (B, R+1, D).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        mask_token: bool,
        eps: float = 1e-6,
        dropout: float = 0.0,
        dist_token: bool = False,
        ops: OpCalls | None = None,
    ) -> None:
        super().__init__()
        self.ops = ops if ops is not None else OpCalls()
        self.num_patches = (image_size // patch_size) ** 2
        self.num_prefix = 2 if dist_token else 1  # CLS (+ distillation) token(s) before patches
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if dist_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + self.num_patches, dim))
        # Only the mask-token path owns a [MASK] embedding, so every parameter gets a gradient.
        self.mask_token = nn.Parameter(torch.zeros(dim)) if mask_token else None
        self.blocks = nn.ModuleList(
            ViTBlock(dim, heads, mlp_ratio, eps, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → patch embeddings without positions (B, P, D)."""
        return self.patch_embed(images).flatten(2).transpose(1, 2)

    def _run(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, L, D) with positions added → normalised [CLS; patches] (B, 1+L, D)."""
        prefix = self.cls_token
        if self.dist_token is not None:
            prefix = torch.cat([prefix, self.dist_token], dim=1)  # (1, 2, D)
        prefix = (prefix + self.pos_embed[:, : self.num_prefix]).expand(patches.shape[0], -1, -1)
        x = torch.cat([prefix, patches], dim=1)  # (B, num_prefix+L, D)
        x = self.norm(self.run_blocks(self.blocks, x))
        if self.dist_token is not None:
            x = torch.cat([x[:, :1], x[:, 2:]], dim=1)  # drop the distillation token
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self.patchify(images) + self.pos_embed[:, self.num_prefix :])

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, P) bool, True = masked → (B, P+1, D)."""
        x = self.patchify(images)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        return self._run(x + self.pos_embed[:, self.num_prefix :])

    def forward_kept(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """keep_idx (B, R) sorted → (B, R+1, D); positions are added inside the gather."""
        x = self.ops.masked_gather(
            self.patchify(images), keep_idx, self.pos_embed[0, self.num_prefix :]
        )
        return self._run(x)


class TextEncoder(GradCheckpointing, nn.Module):
    """BERT-style encoder (word + position + token-type embeddings, LN, post-LN layers).

    input_ids (B, T) int64, attention_mask (B, T) → (B, T, D). Parameter layout maps 1:1 onto
    Hugging Face BertModel (see :mod:`semmim.pretrained`).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        intermediate: int,
        max_len: int,
        type_vocab_size: int,
        eps: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = dropout_layer(dropout)
        self.layers = nn.ModuleList(
            BertLayer(dim, heads, intermediate, eps, dropout) for _ in range(depth)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings.weight[0]
        )
        x = self.drop(self.norm(x))
        return self.run_blocks(self.layers, x, attention_mask.bool())


class FusionEncoder(GradCheckpointing, nn.Module):
    """Text tokens (queries) fused with image tokens (keys/values).

    text (B, T, Dt), text_mask (B, T), image (B, Li, Dv), image_mask (B, Li) or None →
    (B, T, Dt); its CLS (position 0) feeds ITM.
    """

    def __init__(
        self,
        dim: int,
        image_dim: int,
        depth: int,
        heads: int,
        intermediate: int,
        eps: float,
        dropout: float = 0.0,
        ops: OpCalls | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            FusionLayer(dim, image_dim, heads, intermediate, eps, dropout, ops)
            for _ in range(depth)
        )

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.run_blocks(self.layers, text, text_mask.bool(), image, image_mask)


class Predictor(GradCheckpointing, nn.Module):
    """MIM predictor φ: patch queries with self-attention and cross-attention to the text.

    x (B, P+1, Dv) full-length image tokens, text (B, T, Dt), text_mask (B, T) → (B, P+1, Dv).
    ``cross_step`` (the first layer's cross-attention residual step) is ψ's building block.
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        ops: OpCalls | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PredictorBlock(dim, text_dim, heads, mlp_ratio, dropout, ops) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.run_blocks(self.blocks, x, text, text_mask.bool()))

    def cross_step(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """One cross-attention residual step (first layer): x (B, L, Dv) → (B, L, Dv)."""
        return self.blocks[0].cross_step(x, text, text_mask.bool())

    def text_residual(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """What :meth:`cross_step` adds to x: (B, L, Dv) → (B, L, Dv)."""
        return self.blocks[0].text_residual(x, text, text_mask.bool())
