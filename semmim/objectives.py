"""SemMIM's objectives as units over the towers and buffers they are given.

:class:`~semmim.model.SemMIM` builds the towers (``net`` and its EMA copy ``ema``), owns the
buffers (ITC queues, prototype centres) and wires the objectives up in its ``forward``; each
unit here takes what it reads and writes explicitly, so the model's ``state_dict`` keys are
those of its own modules and buffers. The loss formulas themselves are in :mod:`semmim.losses`.

- ITC: :func:`itc` against [momentum batch | queue], :func:`itc_positives` (queued pairs of the
  same image count as positives), :func:`enqueue`.
- ITM: :func:`itm` with hard negatives (:func:`matching_pairs` are never negatives).
- MLM: :func:`mlm`, distilled from the EMA.
- Prototype agreement: :func:`prototype_agreement`, the one unit behind both the global
  agreement (:func:`global_agreement`, image CLS) and the MIM head (:func:`mim`, masked patches):
  loss, diagnostics, centre update.
- The masked view the student sees (:func:`masked_view`), the patch scores of text-guided
  masking (:func:`patch_score_features`) and the patch–text alignment loss that can train them
  (:func:`patch_alignment`); ψ's bound on the text it adds (:func:`bound_text_residual`).
- :func:`mim_reliance`: diagnostics of what the MIM targets and predictions depend on.

Shape letters: B batch, P patches, M masked, T tokens, Dv/Dt vision/text width, E ITC width,
K prototypes, Q queue length, N rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from semmim.config import MIMConfig, MLMConfig, SemMIMConfig
from semmim.diagnostics import head_diagnostics
from semmim.dist import all_gather_no_grad, mean_over_ranks
from semmim.layers import OpCalls, PrototypeHead, fp32_region
from semmim.losses import itc_loss, mlm_loss, pixel_targets, sample_hard_negatives
from semmim.masking import mlm_mask, mlm_positions, random_mask, text_guided_mask
from semmim.views import second_view

__all__ = [
    "unit",
    "matching_pairs",
    "itc_positives",
    "itc",
    "enqueue",
    "itm",
    "mlm",
    "update_center",
    "prototype_agreement",
    "global_agreement",
    "masked_view",
    "patch_score_features",
    "patch_alignment",
    "text_patch_scores",
    "image_mask",
    "bound_text_residual",
    "teacher_inputs",
    "mim",
    "mim_reliance",
]


def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in float32 (also under autocast): (..., E) → float32 (..., E)."""
    with fp32_region(x):
        return F.normalize(x.float(), dim=-1)


# ------------------------------------------------------------------------------------------ ITC
@torch.no_grad()
def matching_pairs(
    input_ids: torch.Tensor, key_mask: torch.Tensor, image_ids: torch.Tensor | None
) -> torch.Tensor:
    """(B, B) bool: pair j matches pair i (same image id, or identical caption tokens and mask).

    Vectorised (a (B, B, T) comparison), no host sync; the diagonal is True.
    """
    same = ((input_ids[:, None] == input_ids[None]) & (key_mask[:, None] == key_mask[None])).all(-1)
    if image_ids is not None:
        image_ids = image_ids.to(input_ids.device)
        same = same | (image_ids[:, None] == image_ids[None])
    return same


def itc_positives(
    same: torch.Tensor, image_ids: torch.Tensor | None, id_queue: torch.Tensor
) -> torch.Tensor:
    """ITC positives: ``same`` (B, B), or with ``image_ids`` (B,) and a queue, (B, B+Q): also the
    queued pairs of the same image (``id_queue`` (Q,), -1 = no id)."""
    if image_ids is None or id_queue.numel() == 0:
        return same
    # a copy: the queue is written in place after the loss (compiled backward must not
    # recompute this from the updated buffer; as image_queue.clone())
    queued = image_ids.to(id_queue.device)[:, None] == id_queue.clone()[None]  # (B, Q)
    return torch.cat([same, queued], dim=1)


def itc(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    alpha: torch.Tensor,
    temp: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image–text contrastive loss against [momentum batch | queue] keys.

    *_feat, *_feat_m (B, E) float32 unit features; *_queue (Q, E); ``positives`` (B, B) marks
    the in-batch positives, or (B, B+Q) also the queued ones (:func:`itc_positives`). Features
    and similarities are float32 (they are divided by a temperature near 0.07). → scalar.
    """
    with fp32_region(image_feat):
        with torch.no_grad():
            image_keys = torch.cat([image_feat_m, image_queue.clone()])  # (B+Q, E)
            text_keys = torch.cat([text_feat_m, text_queue.clone()])  # (B+Q, E)
            sim_i2t_m = image_feat_m @ text_keys.T / temp
            sim_t2i_m = text_feat_m @ image_keys.T / temp
        sim_i2t = image_feat @ text_keys.T / temp  # (B, B+Q)
        sim_t2i = text_feat @ image_keys.T / temp  # (B, B+Q)
        return itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, alpha, positives)


@torch.no_grad()
def enqueue(
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    id_queue: torch.Tensor,
    queue_ptr: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_ids: torch.Tensor | None = None,
) -> None:
    """Write the (all-gathered) momentum features (B, E) and image ids (B,) (-1 without ids)
    into the ring buffers (Q, E), (Q, E), (Q,) at ``queue_ptr`` (0-d) and advance it, on
    device."""
    # float32 features into the queue's dtype (a model cast with .half() has fp16 queues)
    image_feat_m = all_gather_no_grad(image_feat_m.to(image_queue.dtype))
    text_feat_m = all_gather_no_grad(text_feat_m.to(text_queue.dtype))
    if image_ids is None:
        ids = torch.full((image_feat_m.shape[0],), -1, device=id_queue.device)
    else:
        ids = all_gather_no_grad(image_ids.to(id_queue.device, torch.long))
    Q, n = image_queue.shape[0], image_feat_m.shape[0]
    idx = (queue_ptr + torch.arange(n, device=queue_ptr.device)) % Q  # (n,)
    image_queue.index_copy_(0, idx, image_feat_m)
    text_queue.index_copy_(0, idx, text_feat_m)
    id_queue.index_copy_(0, idx, ids)
    queue_ptr.copy_((queue_ptr + n) % Q)


# ------------------------------------------------------------------------------------------ ITM
def itm(
    towers,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    key_mask: torch.Tensor,
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    gen: torch.Generator,
    temp: torch.Tensor,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """ITM over B positives, B (image, hard negative text), B (hard negative image, text).

    ``towers``: the :class:`~semmim.model.Towers` whose fusion encoder and ITM head score the
    pairs. image_embeds (B, P+1, Dv), text_embeds (B, T, Dt), key_mask (B, T) bool, unit
    features (B, E). ``same`` (B, B) bool (symmetric): pairs that match, never drawn as
    negatives. A row that matches the whole batch has no negative: its two negative rows are
    left out of the loss (label −100) instead of teaching that a match is a mismatch. → scalar.
    """
    B = image_embeds.shape[0]
    with torch.no_grad(), fp32_region(image_feat):
        sim = image_feat @ text_feat.T / temp  # (B, B) float32
        neg_text = sample_hard_negatives(sim, gen, same)  # (B,) per image
        neg_image = sample_hard_negatives(sim.T, gen, same)  # (B,) per text
    images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])  # (3B, P+1, Dv)
    texts = torch.cat([text_embeds, text_embeds[neg_text], text_embeds])  # (3B, T, Dt)
    masks = torch.cat([key_mask, key_mask[neg_text], key_mask])  # (3B, T)
    fused = towers.fusion(texts, masks, images)[:, 0]  # (3B, Dt)
    # rows: B positives (label 1), then the two kinds of negatives (label 0)
    labels = (torch.arange(3 * B, device=fused.device) < B).long()
    if same is not None:
        no_negative = same.all(1).to(fused.device)  # (B,)
        ignore = torch.cat([torch.zeros_like(no_negative), no_negative, no_negative])
        labels = labels.masked_fill(ignore, -100)
    return F.cross_entropy(towers.itm_head(fused).float(), labels)


# ------------------------------------------------------------------------------------------ MLM
def mlm(
    net,
    ema,
    ops: OpCalls,
    cfg: MLMConfig,
    vocab_size: int,
    mask_token_id: int,
    special_ids: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_embeds: torch.Tensor,
    image_embeds_m: torch.Tensor,
    alpha: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Masked language modelling through ``net``'s fusion encoder, distilled from ``ema``'s.

    input_ids, attention_mask (B, T); image_embeds(_m) (B, P+1, Dv) of net / ema. → scalar.
    """
    ids, labels = mlm_mask(
        input_ids,
        attention_mask,
        prob=cfg.prob,
        mask_frac=cfg.mask_frac,
        random_frac=cfg.random_frac,
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
        special_ids=special_ids,
        generator=gen,
    )
    pos = mlm_positions(labels, cfg.prob)  # (B, N): the vocabulary head runs only here
    labels = labels.gather(1, pos)  # (B, N)
    fused = net.fusion(net.text(ids, attention_mask), attention_mask, image_embeds)
    logits = net.mlm_head(ops.masked_gather(fused, pos))  # (B, N, V)
    with torch.no_grad():
        fused_m = ema.fusion(ema.text(ids, attention_mask), attention_mask, image_embeds_m)
        logits_m = ema.mlm_head(ops.masked_gather(fused_m, pos))
    return mlm_loss(logits, labels, logits_m, alpha)


# ---------------------------------------------------------------------- prototype agreement
@torch.no_grad()
def update_center(center: torch.Tensor, batch_center: torch.Tensor, momentum: float) -> None:
    """center (K,) ← m·center + (1−m)·batch_center, the batch's mean teacher logits (K,),
    averaged across ranks."""
    center.mul_(momentum).add_(mean_over_ranks(batch_center), alpha=1 - momentum)


def prototype_agreement(
    name: str,
    ops: OpCalls,
    head: PrototypeHead,
    head_m: PrototypeHead,
    z: torch.Tensor,
    z_m: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float | torch.Tensor,
    center_momentum: float,
    *,
    diag: dict[str, torch.Tensor] | None = None,
    update: bool = False,
    batch_center: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DINO/iBOT agreement of a student head with its centred, sharpened EMA teacher.

    z, z_m (N, bottleneck): student / teacher features (:meth:`PrototypeHead.features`; z_m
    without gradient); ``center`` (K,) the head's centre buffer. Returns the float32 per-row
    loss (N,). ``diag``: also put :func:`~semmim.diagnostics.head_diagnostics` ``name`` there
    (the (N, K) logits themselves: diagnostic steps only). ``update`` (training): move
    ``center`` towards the batch's mean teacher logits, or towards ``batch_center(that mean)``.
    """
    # fp32 features and prototypes, whatever the model's dtype (PrototypeHead docstring)
    per_row, teacher_mean = ops.prototype_cross_entropy(  # (N,), (K,)
        z, z_m, head.prototypes.float(), head_m.prototypes.float(), center,
        student_temp, teacher_temp,
    )  # fmt: skip
    if diag is not None:
        with torch.no_grad():
            diag.update(
                head_diagnostics(name, head.logits(z), head_m.logits(z_m), center, teacher_temp)
            )
    if update:
        target = teacher_mean if batch_center is None else batch_center(teacher_mean)
        update_center(center, target, center_momentum)
    return per_row


def global_agreement(
    cfg: SemMIMConfig,
    ops: OpCalls,
    net,
    ema,
    cls_masked: torch.Tensor,
    cls_m: torch.Tensor,
    center: torch.Tensor,
    *,
    diag: dict[str, torch.Tensor] | None = None,
    update: bool = False,
    images: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Global agreement: the student's CLS of the masked view (B, Dv) against the EMA's CLS of
    the full image (B, Dv), through the prototype head. → scalar (mean over images).

    ``glob.views="cross"``: the teacher's CLS is instead the EMA's CLS of a second view of
    ``images`` (B, 3, S, S), :func:`semmim.views.second_view` drawn from ``seed``."""
    c = cfg.glob
    z = net.head.features(cls_masked)  # (B, bottleneck)
    with torch.no_grad():
        if c.views == "cross":
            if images is None or seed is None:
                raise ValueError("glob.views='cross' needs the images and the step's seed")
            # seed + 5: a stream of its own (the mask noise draws from seed, the ITM / MLM
            # generator from seed + 1, the diagnostics' noise from seed + 3)
            cls_m = ema.vision(second_view(images, seed + 5, c.crop_min))[:, 0]  # (B, Dv)
        z_m = ema.head.features(cls_m)  # (B, bottleneck)
    return prototype_agreement(
        "glob", ops, net.head, ema.head, z, z_m, center, c.student_temp, c.teacher_temp,
        c.center_momentum, diag=diag, update=update,
    ).mean()  # fmt: skip


def masked_view(
    cfg: SemMIMConfig,
    ops: OpCalls,
    net,
    images: torch.Tensor,
    keep_idx: torch.Tensor,
    mask: torch.Tensor,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's masked view: images (B, 3, S, S), keep_idx (B, R), mask (B, P) →
    (CLS of the masked view (B, Dv), what φ reads (B, P+1, Dv): the encoded view with the
    predictor's positions, [MASK] at masked slots). ``mim.drop_tokens``: the ViT runs on CLS +
    kept patches only (``kept`` (B, R+1, Dv): that encoding when the one-pass student already
    ran it); else on the full sequence with the [MASK] embedding at masked slots."""
    P = cfg.vision.num_patches
    if cfg.mim.drop_tokens:
        if kept is None:
            kept = net.vision.forward_kept(images, keep_idx)  # (B, R+1, Dv)
        patches = ops.masked_scatter_fill(  # (B, P, Dv), [MASK]+pos at masked slots
            kept[:, 1:], keep_idx, net.predictor_mask_token, P, pos=net.predictor_pos[0, 1:]
        )
        return kept[:, 0], torch.cat([kept[:, :1] + net.predictor_pos[:, :1], patches], dim=1)
    full = net.vision.forward_masked(images, mask)  # (B, P+1, Dv)
    return full[:, 0], full + net.predictor_pos


def patch_score_features(cfg: SemMIMConfig, towers, image_embeds: torch.Tensor) -> torch.Tensor:
    """The patches of image tokens (B, L+1, Dv) projected into ITC space, (B, L, E), as the
    text-guided mask scores them: ``vision_proj`` (``masking.score="itc"``) or ``patch_proj``
    (``"patch"``)."""
    proj = towers.patch_proj if cfg.masking.score == "patch" else towers.vision_proj
    return proj(image_embeds[:, 1:])


def patch_alignment(
    cfg: SemMIMConfig,
    net,
    image_embeds: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    same: torch.Tensor,
) -> torch.Tensor:
    """Patch–text alignment loss (``masking.score="patch"``), which trains ``patch_proj``.

    image_embeds (B, L+1, Dv) the student's image tokens (L = P, or the kept patches when the
    student encodes only those); text_feat (B, E) unit ITC text features; temp the ITC
    temperature (its value only: this loss does not move it); same (B, B) the matching pairs
    (positives). Image i and caption j score s_ij = Σ_l softmax_l(c_ijl / patch_pool_temp)·c_ijl,
    c_ijl the cosine of patch l of image i with caption j: a soft maximum over patches, so
    s_ij is high when *some* patches match the caption. InfoNCE over the batch, both ways
    (s / temp), targets spread over the positives. Patches all images share (a plain background)
    cannot tell captions apart, so the loss raises the caption's object patches. → scalar.
    """
    patch = unit(net.patch_proj(image_embeds[:, 1:]))  # (B, L, E) float32
    with fp32_region(patch):
        cos = torch.einsum("ile,je->ijl", patch, text_feat.float())  # (B, B, L)
        weights = torch.softmax(cos / cfg.masking.patch_pool_temp, dim=-1)
        logits = (weights * cos).sum(-1) / temp.detach().float()  # (B, B): image i, caption j
        targets = same.float() / same.float().sum(1, keepdim=True)  # (B, B), rows sum to 1
        i2t = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
        t2i = -(targets.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def text_patch_scores(
    cfg: SemMIMConfig,
    ema,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The text-guided mask's score of every patch before noise, (B, P): the cosine of the EMA's
    patch features (:func:`patch_score_features`) with its ITC text feature, for images
    (B, 3, S, S) and captions (B, T). An extra EMA pass: for diagnostics."""
    patch = unit(patch_score_features(cfg, ema, ema.vision(images)))  # (B, P, E)
    text = unit(ema.text_proj(ema.text(input_ids, attention_mask)[:, 0]))  # (B, E)
    return torch.einsum("bpe,be->bp", patch, text)


@torch.no_grad()
def image_mask(
    cfg: SemMIMConfig,
    ops: OpCalls,
    ema,
    image_embeds_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked view's mask from ``masking.strategy``: keep_idx (B, R), mask_idx (B, M), mask
    (B, P). "text_guided" scores the EMA's patches (B, P+1, Dv), projected into ITC space,
    against its text features (B, E); ``noise``: the Gumbel noise (B, P) or None (tau = 0)."""
    c, M = cfg.masking, cfg.num_masked
    if c.strategy == "random":
        B, L, _ = image_embeds_m.shape
        return random_mask(B, L - 1, M, noise=noise, device=image_embeds_m.device)
    patch_feat_m = patch_score_features(cfg, ema, image_embeds_m)  # (B, P, E) in ITC space
    return text_guided_mask(patch_feat_m, text_feat_m, M, tau=c.tau, noise=noise, ops=ops)


def bound_text_residual(
    v: torch.Tensor, residual: torch.Tensor, scale: float, max_ratio: float
) -> torch.Tensor:
    """ψ's text residual (B, L, Dv) times ``scale``, then (``max_ratio`` > 0) scaled down per
    token so that its L2 norm is at most ``max_ratio`` times that of the patch feature v
    (B, L, Dv); never scaled up. Scale 1 and ratio 0 return ``residual`` itself."""
    if scale != 1.0:
        residual = residual * scale
    if max_ratio > 0:
        with fp32_region(v):
            r_norm = residual.float().norm(dim=-1, keepdim=True)  # (B, L, 1)
            cap = max_ratio * v.float().norm(dim=-1, keepdim=True)
            factor = (cap / r_norm.clamp_min(1e-12)).clamp(max=1.0)
        residual = residual * factor.to(residual.dtype)
    return residual


@torch.no_grad()
def teacher_inputs(
    ema, cfg: MIMConfig, v: torch.Tensor, text_embeds_m: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """ψ: EMA patch features v (B, L, Dv) → what the MIM teacher head reads (B, L, Dv).

    With ``mim.text_in_target``, one cross-attention step of the EMA φ to the text (all
    tokens, or only the text CLS with ``mim.psi="text_cls"``), its residual bounded by
    ``mim.psi_scale`` / ``mim.psi_max_ratio`` (:func:`bound_text_residual`), then the EMA φ's
    final LayerNorm with ``mim.psi_norm``. Per token (no patch–patch mixing), so ψ of a subset
    of patches equals that subset of ψ of all patches.
    """
    if not cfg.text_in_target:
        return v
    # psi="text_cls": a single key, the text CLS (adds a projected text CLS)
    text_mask = key_mask if cfg.psi == "cross_attention" else _cls_only(key_mask)
    residual = ema.predictor.text_residual(v, text_embeds_m, text_mask)
    v = v + bound_text_residual(v, residual, cfg.psi_scale, cfg.psi_max_ratio)
    return ema.predictor.norm(v) if cfg.psi_norm else v


def mim(
    cfg: SemMIMConfig,
    ops: OpCalls,
    net,
    ema,
    images: torch.Tensor,
    x: torch.Tensor,
    mask_idx: torch.Tensor,
    text_embeds: torch.Tensor,
    key_mask: torch.Tensor,
    image_embeds_m: torch.Tensor,
    text_embeds_m: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    *,
    diag: dict[str, torch.Tensor] | None = None,
    update: bool = False,
) -> torch.Tensor:
    """Masked image modelling: mean over images of the mean over that image's masked patches.

    x (B, P+1, Dv): the masked view with the predictor's positions (what φ reads); mask_idx
    (B, M); text_embeds (B, T, Dt) and key_mask (B, T) for φ's cross-attention; the EMA's
    image_embeds_m (B, P+1, Dv) and text_embeds_m (B, T, Dt) for the targets. ``mim.target``
    "pixel": MSE to normalised pixels; "semantic": :func:`prototype_agreement` with the teacher
    head on ψ of the EMA's patches (``center``: the MIM centre). → scalar.
    """
    c = cfg.mim
    # mim.text_grad=False: φ reads the text, but the MIM loss does not train the text encoder
    text = text_embeds if c.text_grad else text_embeds.detach()
    pred = net.predictor(x, text, key_mask)  # (B, P+1, Dv)
    pred = ops.masked_gather(pred[:, 1:], mask_idx)  # (B, M, Dv)
    if c.target == "pixel":
        target = ops.masked_gather(
            pixel_targets(images, cfg.vision.patch_size), mask_idx
        )  # (B, M, 3·p·p)
        per_patch = (net.pixel_head(pred).float() - target.float()).pow(2).mean(-1)  # (B, M)
        return per_patch.mean(1).mean(0)
    with torch.no_grad():
        v = ops.masked_gather(image_embeds_m[:, 1:], mask_idx)  # (B, M, Dv)
        v = teacher_inputs(ema, c, v, text_embeds_m, key_mask)  # ψ: (B, M, Dv)
        z_m = ema.head.features(v).flatten(0, 1)  # (B·M, bottleneck)
    B, M = pred.shape[:2]
    z = net.head.features(pred).flatten(0, 1)  # (B·M, bottleneck)

    @torch.no_grad()
    def batch_center(masked_mean: torch.Tensor) -> torch.Tensor:
        # mim.center_over: "masked" = the masked patches' mean teacher logits; "all" (iBOT) =
        # the mean over all P patches of every image, the teacher head on ψ of the whole sequence
        if c.center_over == "masked":
            return masked_mean
        v_all = teacher_inputs(ema, c, image_embeds_m[:, 1:], text_embeds_m, key_mask)
        K = masked_mean.shape[-1]
        return ema.head(v_all).reshape(-1, K).mean(0)

    per_patch = prototype_agreement(
        "mim", ops, net.head, ema.head, z, z_m, center, c.student_temp, teacher_temp,
        c.center_momentum, diag=diag, update=update, batch_center=batch_center,
    )  # fmt: skip
    return per_patch.view(B, M).mean(1).mean(0)


@torch.no_grad()
def mim_reliance(
    cfg: SemMIMConfig,
    ops: OpCalls,
    net,
    ema,
    images: torch.Tensor,
    keep_idx: torch.Tensor,
    mask: torch.Tensor,
    mask_idx: torch.Tensor,
    text_embeds: torch.Tensor,
    key_mask: torch.Tensor,
    image_embeds_m: torch.Tensor,
    text_embeds_m: torch.Tensor,
    center: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """What the semantic MIM targets and predictions rest on (diagnostic steps only).

    The teacher's code (argmax of the centred teacher logits) of each masked patch is compared
    with the student's argmax code when the student sees a blank image (every pixel the
    normalised white of :func:`semmim.diagnostics.blank_images`, the real caption), the real
    image with another pair's caption (the batch's captions rolled by one), and with the
    teacher's own code under the rolled caption. Same mask, same centre (the one the loss uses).
    Shapes as :func:`mim`; ``keep_idx`` (B, R), ``mask`` (B, P) for :func:`masked_view`.
    Returns the 0-d float32 tensors of :data:`semmim.diagnostics.RELIANCE_COLUMNS`.
    """
    from semmim.diagnostics import blank_images  # diagnostics imports this module

    c = cfg.mim
    v = ops.masked_gather(image_embeds_m[:, 1:], mask_idx)  # (B, M, Dv)
    text_m_rolled, key_rolled = text_embeds_m.roll(1, 0), key_mask.roll(1, 0)

    def teacher_codes(text_m: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:  # (B, M)
        return (ema.head(teacher_inputs(ema, c, v, text_m, keys)).float() - center).argmax(-1)

    def student_codes(imgs: torch.Tensor, text: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        _, x = masked_view(cfg, ops, net, imgs, keep_idx, mask)
        pred = ops.masked_gather(net.predictor(x, text, keys)[:, 1:], mask_idx)  # (B, M, Dv)
        return net.head(pred).float().argmax(-1)

    codes = teacher_codes(text_embeds_m, key_mask)
    blank = student_codes(blank_images(images), text_embeds, key_mask)
    rolled = student_codes(images, text_embeds.roll(1, 0), key_rolled)
    if c.text_in_target:
        residual = ema.predictor.text_residual(
            v, text_embeds_m, key_mask if c.psi == "cross_attention" else _cls_only(key_mask)
        )
        residual = bound_text_residual(v, residual, c.psi_scale, c.psi_max_ratio)
        ratio = (residual.float().norm(dim=-1) / v.float().norm(dim=-1).clamp_min(1e-12)).mean()
    else:
        ratio = v.new_zeros((), dtype=torch.float32)
    return {
        "diag_mim_agree_blank": (blank == codes).float().mean(),
        "diag_mim_agree_shuffled": (rolled == codes).float().mean(),
        "diag_mim_target_caption_flip": (teacher_codes(text_m_rolled, key_rolled) != codes)
        .float()
        .mean(),
        "diag_mim_psi_ratio": ratio,
    }


def _cls_only(key_mask: torch.Tensor) -> torch.Tensor:
    """A key mask (B, T) with only the text CLS (position 0) as key (``mim.psi="text_cls"``)."""
    only = torch.zeros_like(key_mask)
    only[:, 0] = True
    return only
