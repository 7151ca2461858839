"""SemMIM: ALBEF (ITC, ITM, MLM) + global agreement + semantic masked image modelling.

    cfg = from_preset("tiny")
    model = SemMIM(cfg)
    out = model(images, input_ids, attention_mask)   # (B,3,S,S) float, (B,T), (B,T)
    out.loss.backward(); opt.step(); model.update_momentum()

Shape letters: B batch, P patches, R kept, M masked, T tokens, Dv/Dt vision/text width,
E ITC embedding width, K prototypes. The four hot ops (masked gather/scatter, top-k masking,
cross-attention, the prototype cross-entropy of the agreement and MIM losses) are called only
through the model's :class:`~semmim.layers.OpCalls` (``model.ops``), which passes
``cfg.kernels``' backend and the ``validate`` flag to every call.

Mixed precision: under ``torch.autocast`` the encoders run in the low precision; ITC
similarities, prototype logits and every softmax / log-softmax / L2-normalisation that feeds a
loss run in float32 (see :func:`~semmim.layers.fp32_region`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from semmim.config import SemMIMConfig
from semmim.layers import (
    FusionEncoder,
    MLMHead,
    OpCalls,
    Predictor,
    PrototypeHead,
    TextEncoder,
    VisionEncoder,
    fp32_region,
)
from semmim.losses import (
    itc_loss,
    mlm_loss,
    pixel_targets,
    sample_hard_negatives,
)
from semmim.masking import mlm_mask, mlm_positions, random_mask, text_guided_mask
from semmim.pretrained import load_bert_into
from semmim.tokenizer import load_tokenizer

__all__ = ["SemMIM", "SemMIMOutput", "Towers", "all_gather_no_grad"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) from every rank along dim 0 (no gradient); identity alone."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def _update_center(center: torch.Tensor, batch_center: torch.Tensor, momentum: float) -> None:
    """center (K,) ← m·center + (1−m)·batch_center, the batch's mean teacher logits (K,) (the
    prototype op's ``teacher_logit_mean``), averaged across ranks."""
    if _distributed():
        batch_center = batch_center.clone()  # all_reduce works in place
        dist.all_reduce(batch_center)
        batch_center /= dist.get_world_size()
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in float32 (also under autocast): (..., E) → float32 (..., E)."""
    with fp32_region(x):
        return F.normalize(x.float(), dim=-1)


def _init_weights(module: nn.Module) -> None:
    # Linear: std = fan_in^-0.5 (≈0.02–0.036 at D=768, as BERT/ViT's 0.02); a fixed 0.02 leaves
    # narrow models (tiny, D=64) on a long plateau where fusion ignores the image.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=module.in_features**-0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Towers(nn.Module):
    """Every part with parameters that the momentum model copies: encoders, φ, projections,
    heads. Parts an ablation does not use are not built (so every built parameter trains).
    """

    def __init__(self, cfg: SemMIMConfig, ops: OpCalls | None = None) -> None:
        super().__init__()
        v, t, mim = cfg.vision, cfg.text, cfg.mim
        self.vision = VisionEncoder(
            v.image_size,
            v.patch_size,
            v.dim,
            v.depth,
            v.heads,
            v.mlp_ratio,
            mask_token=mim.enabled and not mim.drop_tokens,
            ops=ops,
        )
        self.text = TextEncoder(
            t.vocab_size,
            t.dim,
            t.depth,
            t.heads,
            t.intermediate,
            t.max_len,
            t.type_vocab_size,
            t.layer_norm_eps,
        )
        self.fusion = FusionEncoder(
            t.dim, v.dim, cfg.fusion.depth, t.heads, t.intermediate, t.layer_norm_eps, ops
        )
        self.vision_proj = nn.Linear(v.dim, cfg.itc.embed_dim)
        self.text_proj = nn.Linear(t.dim, cfg.itc.embed_dim)
        self.itm_head = nn.Linear(t.dim, 2)
        self.mlm_head = MLMHead(t.dim, self.text.word_embeddings, t.layer_norm_eps)
        self.predictor = self.predictor_pos = self.predictor_mask_token = None
        self.head = self.pixel_head = None
        if mim.enabled:
            self.predictor = Predictor(v.dim, t.dim, mim.predictor_depth, v.heads, v.mlp_ratio, ops)
            self.predictor_pos = nn.Parameter(torch.zeros(1, v.num_patches + 1, v.dim))
            if mim.drop_tokens:
                self.predictor_mask_token = nn.Parameter(torch.zeros(v.dim))
            self.head = PrototypeHead(
                v.dim, cfg.head.hidden, cfg.head.bottleneck, cfg.head.num_prototypes
            )
            if mim.target == "pixel":
                self.pixel_head = nn.Linear(v.dim, 3 * v.patch_size**2)
        self.apply(_init_weights)
        for p in (self.predictor_pos, self.predictor_mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)


@dataclass
class SemMIMOutput:
    """loss: weighted sum (scalar). losses: each enabled objective's unweighted value.
    keep_idx (B, R), mask_idx (B, M), mask (B, P): the image mask used (None without MIM)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    keep_idx: torch.Tensor | None = None
    mask_idx: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class SemMIM(nn.Module):
    """The SemMIM model with its momentum (EMA) copy, ITC queues and DINO centres.

    ``self.net`` trains; ``self.ema`` is its exponential moving average (``requires_grad``
    False, updated only by :meth:`update_momentum`). Queues and centres are buffers, so the
    state dict holds everything a checkpoint needs. Optimise only parameters with
    ``requires_grad`` (the EMA's are frozen). Schedules follow :meth:`set_step`.
    """

    def __init__(self, cfg: SemMIMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, SemMIMConfig):
            raise ValueError(f"cfg: expected SemMIMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.ops = OpCalls(cfg.kernels)  # shared by net and ema (the deepcopy keeps it)
        self.net = Towers(cfg, self.ops)
        if cfg.text.pretrained:
            load_bert_into(self.net.text, cfg.text.pretrained, cfg.text)
        self.ema = copy.deepcopy(self.net, {id(self.ops): self.ops}).requires_grad_(False)
        self.temp = nn.Parameter(torch.tensor(cfg.itc.temp))

        E, Q, K = cfg.itc.embed_dim, cfg.itc.queue_size, cfg.head.num_prototypes
        self.register_buffer("image_queue", F.normalize(torch.randn(Q, E), dim=1))  # (Q, E)
        self.register_buffer("text_queue", F.normalize(torch.randn(Q, E), dim=1))  # (Q, E)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("glob_center", torch.zeros(K))
        self.register_buffer("mim_center", torch.zeros(K))

        self.tokenizer = load_tokenizer()
        tok = self.tokenizer
        if len(tok) != cfg.text.vocab_size:
            raise ValueError(f"text.vocab_size: {cfg.text.vocab_size} != tokenizer size {len(tok)}")
        self.mask_token_id = tok.mask_token_id
        special = [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
        self.register_buffer("special_ids", torch.tensor(special), persistent=False)
        self.progress = 0.0

    # ---------------------------------------------------------------- schedules
    def set_step(self, step: int, total_steps: int) -> None:
        """Set training progress = step / total_steps ∈ [0, 1] (default 0 until called).

        It drives the ITC/MLM distillation α (linear warm-up over ``itc.alpha_warmup``),
        the MIM teacher temperature τ_t' (``mim.teacher_temp`` → ``teacher_temp_final`` over
        ``mim.teacher_temp_warmup``) and a cosine momentum schedule. Call it every step.
        """
        if total_steps <= 0:
            raise ValueError(f"total_steps: must be > 0, got {total_steps}")
        self.progress = min(max(step / total_steps, 0.0), 1.0)

    @property
    def alpha(self) -> float:
        """Current momentum-distillation weight α."""
        c = self.cfg.itc
        ramp = 1.0 if c.alpha_warmup == 0 else min(1.0, self.progress / c.alpha_warmup)
        return c.alpha * ramp

    @property
    def mim_teacher_temp(self) -> float:
        """Current τ_t' of the MIM teacher."""
        c = self.cfg.mim
        ramp = (
            1.0 if c.teacher_temp_warmup == 0 else min(1.0, self.progress / c.teacher_temp_warmup)
        )
        return c.teacher_temp + (c.teacher_temp_final - c.teacher_temp) * ramp

    @property
    def momentum(self) -> float:
        """Current EMA momentum m ("cosine": from ``momentum.momentum`` at 0 to 1 at the end)."""
        c = self.cfg.momentum
        if c.schedule == "constant":
            return c.momentum
        return 1 - (1 - c.momentum) * (math.cos(math.pi * self.progress) + 1) / 2

    @torch.no_grad()
    def update_momentum(self) -> None:
        """EMA step, after ``optimizer.step()``: ema ← m·ema + (1−m)·param for every tensor."""
        m = self.momentum
        ema = list(self.ema.parameters())
        net = list(self.net.parameters())
        torch._foreach_mul_(ema, m)
        torch._foreach_add_(ema, net, alpha=1 - m)

    # ---------------------------------------------------------------- input checks
    def check_inputs(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        *,
        read_values: bool = True,
    ) -> None:
        """Raise ValueError naming the bad argument. Shapes and dtypes cost nothing; the
        empty-caption and token-range checks read values (one device→host sync) and run only
        with ``read_values`` (``forward(check_inputs=False)`` passes False)."""
        S = self.cfg.vision.image_size
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
        if input_ids.shape[1] > self.cfg.text.max_len:
            raise ValueError(
                f"input_ids: {input_ids.shape[1]} tokens > text.max_len={self.cfg.text.max_len}"
            )
        if not read_values:
            return
        content = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        empty = ~content.any(1)
        bad_id = (input_ids < 0) | (input_ids >= self.cfg.text.vocab_size)
        if bool(empty.any() | bad_id.any()):
            if bad_id.any():
                raise ValueError(
                    f"input_ids: token ids must lie in [0, {self.cfg.text.vocab_size})"
                )
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"input_ids: empty caption(s) at rows {rows[:8]} (no token besides "
                f"[CLS]/[SEP]/[PAD] under attention_mask)"
            )

    # ---------------------------------------------------------------- encoders
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → image tokens (B, P+1, Dv), CLS first (for :meth:`itm_score`)."""
        return self.net.vision(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → L2-normalised ITC image features (B, E)."""
        self.check_inputs(images, None, None)
        return _unit(self.net.vision_proj(self.net.vision(images)[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T), (B, T) → L2-normalised ITC text features (B, E)."""
        self.check_inputs(None, input_ids, attention_mask)
        text = self.net.text(input_ids, attention_mask)
        return _unit(self.net.text_proj(text[:, 0]))

    def itm_score(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Probability that each (image, caption) pair matches, (B,).

        images: pixels (B, 3, S, S) or precomputed :meth:`image_tokens` (B, P+1, Dv);
        input_ids, attention_mask (B, T).
        """
        if images.dim() == 4:
            self.check_inputs(images, input_ids, attention_mask)
            images = self.net.vision(images)
        else:
            self.check_inputs(None, input_ids, attention_mask)
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"input_ids: batch size {input_ids.shape[0]} != images batch size {images.shape[0]}"
            )
        text = self.net.text(input_ids, attention_mask)
        fused = self.net.fusion(text, attention_mask, images)  # (B, T, Dt)
        return self.net.itm_head(fused[:, 0]).softmax(-1)[:, 1]

    # ---------------------------------------------------------------- training forward
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        seed: int | None = None,
        check_inputs: bool = True,
    ) -> SemMIMOutput:
        """All enabled objectives on a batch of matching (image, caption) pairs.

        images (B, 3, S, S) float; input_ids, attention_mask (B, T). ``seed`` makes every
        random choice (image mask, MLM mask, ITM negatives) deterministic; None draws one from
        torch's global CPU generator (a host read: training passes a seed per step). In
        training mode the ITC queue and the centres update; in eval mode nothing is mutated.

        check_inputs: True runs the model's value checks (empty captions, token-id range) and
        calls the ops with ``validate=cfg.kernels.validate``; False skips every check that
        reads tensor values (ops get ``validate=False``), so the call makes no device→host
        sync. Shape, dtype and device checks run either way.
        """
        self.check_inputs(images, input_ids, attention_mask, read_values=check_inputs)
        saved = self.ops.validate
        self.ops.validate = self.cfg.kernels.validate and check_inputs
        try:
            return self._forward(images, input_ids, attention_mask, seed)
        finally:
            self.ops.validate = saved

    def _forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        seed: int | None,
    ) -> SemMIMOutput:
        cfg, w, net, ema = self.cfg, self.cfg.loss, self.net, self.ema
        B = images.shape[0]
        if w.itm > 0 and B < 2:
            raise ValueError("images: ITM hard negatives need a batch of at least 2 pairs")
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        gen = torch.Generator(device=images.device).manual_seed(seed + 1)
        alpha = self.alpha
        key_mask = attention_mask.bool()

        with torch.no_grad():
            self.temp.clamp_(cfg.itc.temp_min, cfg.itc.temp_max)
        image_embeds = net.vision(images)  # (B, P+1, Dv)
        text_embeds = net.text(input_ids, attention_mask)  # (B, T, Dt)
        image_feat = _unit(net.vision_proj(image_embeds[:, 0]))  # (B, E) float32
        text_feat = _unit(net.text_proj(text_embeds[:, 0]))  # (B, E) float32
        with torch.no_grad():
            image_embeds_m = ema.vision(images)
            text_embeds_m = ema.text(input_ids, attention_mask)
            image_feat_m = _unit(ema.vision_proj(image_embeds_m[:, 0]))
            text_feat_m = _unit(ema.text_proj(text_embeds_m[:, 0]))

        losses: dict[str, torch.Tensor] = {}
        if w.itc > 0:
            losses["itc"] = self._itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha)
        if w.itm > 0:
            losses["itm"] = self._itm(
                image_embeds, text_embeds, key_mask, image_feat, text_feat, gen
            )
        if w.mlm > 0:
            losses["mlm"] = self._mlm(
                input_ids, attention_mask, image_embeds, image_embeds_m, alpha, gen
            )
        # Plain locals only across calls that may break a torch.compile graph (the RNG draws):
        # a per-call object held on the stack there (a bound method, an output dataclass)
        # would invalidate the resumed graph every step and recompile it.
        keep_idx = mask_idx = mask = None
        if cfg.mim.enabled and (w.glob > 0 or w.mim > 0):
            keep_idx, mask_idx, mask = self._image_mask(image_embeds_m, text_feat_m, seed)
            image_losses = self._masked_image(
                images, keep_idx, mask_idx, mask, text_embeds, key_mask, image_embeds_m,
                text_embeds_m,
            )  # fmt: skip
            for k, v in image_losses.items():
                losses[k] = v
        if self.training and w.itc > 0 and cfg.itc.queue_size > 0:
            self._enqueue(image_feat_m, text_feat_m)
        loss = images.new_zeros((), dtype=torch.float32)
        for k, v in losses.items():
            loss = loss + getattr(w, k) * v
        return SemMIMOutput(loss, losses, keep_idx, mask_idx, mask)

    def _itc(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        alpha: float,
    ) -> torch.Tensor:
        """Image–text contrastive loss against [momentum batch | queue] keys (float32 features
        and similarities: they are divided by a temperature near 0.07)."""
        with fp32_region(image_feat):
            with torch.no_grad():
                image_keys = torch.cat([image_feat_m, self.image_queue.clone()])  # (B+Q, E)
                text_keys = torch.cat([text_feat_m, self.text_queue.clone()])  # (B+Q, E)
                sim_i2t_m = image_feat_m @ text_keys.T / self.temp
                sim_t2i_m = text_feat_m @ image_keys.T / self.temp
            sim_i2t = image_feat @ text_keys.T / self.temp  # (B, B+Q)
            sim_t2i = text_feat @ image_keys.T / self.temp  # (B, B+Q)
            return itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, alpha)

    def _itm(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        key_mask: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """ITM over B positives, B (image, hard negative text), B (hard negative image, text)."""
        B = image_embeds.shape[0]
        with torch.no_grad(), fp32_region(image_feat):
            sim = image_feat @ text_feat.T / self.temp  # (B, B) float32
            neg_text = sample_hard_negatives(sim, gen)  # (B,) per image
            neg_image = sample_hard_negatives(sim.T, gen)  # (B,) per text
        images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])  # (3B, P+1, Dv)
        texts = torch.cat([text_embeds, text_embeds[neg_text], text_embeds])  # (3B, T, Dt)
        masks = torch.cat([key_mask, key_mask[neg_text], key_mask])  # (3B, T)
        fused = self.net.fusion(texts, masks, images)[:, 0]  # (3B, Dt)
        # rows: B positives (label 1), then the two kinds of negatives (label 0)
        labels = (torch.arange(3 * B, device=fused.device) < B).long()
        return F.cross_entropy(self.net.itm_head(fused).float(), labels)

    def _mlm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_embeds_m: torch.Tensor,
        alpha: float,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Masked language modelling through the fusion encoder, distilled from the EMA."""
        c = self.cfg.mlm
        ids, labels = mlm_mask(
            input_ids,
            attention_mask,
            prob=c.prob,
            mask_frac=c.mask_frac,
            random_frac=c.random_frac,
            mask_token_id=self.mask_token_id,
            vocab_size=self.cfg.text.vocab_size,
            special_ids=self.special_ids,
            generator=gen,
        )
        pos = mlm_positions(labels, c.prob)  # (B, N): the vocabulary head runs only here
        labels = labels.gather(1, pos)  # (B, N)
        net, ema = self.net, self.ema
        fused = net.fusion(net.text(ids, attention_mask), attention_mask, image_embeds)
        logits = net.mlm_head(self.ops.masked_gather(fused, pos))  # (B, N, V)
        with torch.no_grad():
            fused_m = ema.fusion(ema.text(ids, attention_mask), attention_mask, image_embeds_m)
            logits_m = ema.mlm_head(self.ops.masked_gather(fused_m, pos))
        return mlm_loss(logits, labels, logits_m, alpha)

    @torch.no_grad()
    def _image_mask(
        self, image_embeds_m: torch.Tensor, text_feat_m: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keep_idx (B, R), mask_idx (B, M), mask (B, P) from the configured strategy."""
        c, M = self.cfg.masking, self.cfg.num_masked
        if c.strategy == "random":
            B, L, _ = image_embeds_m.shape
            return random_mask(B, L - 1, M, seed=seed, device=image_embeds_m.device)
        patch_feat_m = self.ema.vision_proj(image_embeds_m[:, 1:])  # (B, P, E) in ITC space
        return text_guided_mask(patch_feat_m, text_feat_m, M, tau=c.tau, seed=seed, ops=self.ops)

    def _masked_image(
        self,
        images: torch.Tensor,
        keep_idx: torch.Tensor,
        mask_idx: torch.Tensor,
        mask: torch.Tensor,
        text_embeds: torch.Tensor,
        key_mask: torch.Tensor,
        image_embeds_m: torch.Tensor,
        text_embeds_m: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Global agreement and MIM on the masked view (keep_idx (B, R), mask_idx (B, M),
        mask (B, P) from :meth:`_image_mask`)."""
        cfg, net, ema = self.cfg, self.net, self.ema
        P, M = cfg.vision.num_patches, cfg.num_masked
        if cfg.mim.drop_tokens:
            kept = net.vision.forward_kept(images, keep_idx)  # (B, R+1, Dv)
            cls_masked = kept[:, 0]
            patches = self.ops.masked_scatter_fill(  # (B, P, Dv), [MASK]+pos at masked slots
                kept[:, 1:], keep_idx, net.predictor_mask_token, P, pos=net.predictor_pos[0, 1:]
            )
            x = torch.cat([kept[:, :1] + net.predictor_pos[:, :1], patches], dim=1)
        else:
            full = net.vision.forward_masked(images, mask)  # (B, P+1, Dv)
            cls_masked = full[:, 0]
            x = full + net.predictor_pos  # (B, P+1, Dv)

        losses = {}
        if cfg.loss.glob > 0:
            z = net.head.features(cls_masked)  # (B, bottleneck)
            with torch.no_grad():
                z_m = ema.head.features(image_embeds_m[:, 0])  # (B, bottleneck)
            # fp32 features and prototypes, whatever the model's dtype (PrototypeHead docstring)
            per_image, teacher_mean = self.ops.prototype_cross_entropy(  # (B,), (K,)
                z, z_m, net.head.prototypes.float(), ema.head.prototypes.float(), self.glob_center,
                cfg.glob.student_temp, cfg.glob.teacher_temp,
            )  # fmt: skip
            losses["glob"] = per_image.mean()
            if self.training:
                _update_center(self.glob_center, teacher_mean, cfg.glob.center_momentum)
        if cfg.loss.mim > 0:
            losses["mim"] = (
                self._mim_loss(
                    images, x, mask_idx, text_embeds, key_mask, image_embeds_m, text_embeds_m
                )
                if M > 0
                else images.new_zeros(())
            )
        return losses

    def _mim_loss(
        self,
        images: torch.Tensor,
        x: torch.Tensor,
        mask_idx: torch.Tensor,
        text_embeds: torch.Tensor,
        key_mask: torch.Tensor,
        image_embeds_m: torch.Tensor,
        text_embeds_m: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over images of the mean over that image's masked patches of the MIM loss."""
        cfg, net, ema = self.cfg, self.net, self.ema
        pred = net.predictor(x, text_embeds, key_mask)  # (B, P+1, Dv)
        pred = self.ops.masked_gather(pred[:, 1:], mask_idx)  # (B, M, Dv)
        if cfg.mim.target == "pixel":
            target = self.ops.masked_gather(
                pixel_targets(images, cfg.vision.patch_size), mask_idx
            )  # (B, M, 3·p·p)
            per_patch = (net.pixel_head(pred).float() - target.float()).pow(2).mean(-1)  # (B, M)
            return per_patch.mean(1).mean(0)
        with torch.no_grad():
            v = self.ops.masked_gather(image_embeds_m[:, 1:], mask_idx)  # (B, M, Dv)
            if cfg.mim.text_in_target:
                text_mask = key_mask
                if cfg.mim.psi == "text_cls":  # a single key: adds the projected text CLS
                    text_mask = torch.zeros_like(key_mask)
                    text_mask[:, 0] = True
                v = ema.predictor.cross_step(v, text_embeds_m, text_mask)  # ψ: (B, M, Dv)
            z_m = ema.head.features(v).flatten(0, 1)  # (B·M, bottleneck)
        B, M = pred.shape[:2]
        z = net.head.features(pred).flatten(0, 1)  # (B·M, bottleneck)
        per_patch, teacher_mean = self.ops.prototype_cross_entropy(  # (B·M,), (K,)
            z, z_m, net.head.prototypes.float(), ema.head.prototypes.float(), self.mim_center,
            cfg.mim.student_temp, self.mim_teacher_temp,
        )  # fmt: skip
        if self.training:
            _update_center(self.mim_center, teacher_mean, cfg.mim.center_momentum)
        return per_patch.view(B, M).mean(1).mean(0)

    @torch.no_grad()
    def _enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Write the (all-gathered) momentum features at the ring pointer, on device."""
        # float32 features into the queue's dtype (a model cast with .half() has fp16 queues)
        image_feat_m = all_gather_no_grad(image_feat_m.to(self.image_queue.dtype))
        text_feat_m = all_gather_no_grad(text_feat_m.to(self.text_queue.dtype))
        Q, n = self.image_queue.shape[0], image_feat_m.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % Q  # (n,)
        self.image_queue.index_copy_(0, idx, image_feat_m)
        self.text_queue.index_copy_(0, idx, text_feat_m)
        self.queue_ptr.copy_((self.queue_ptr + n) % Q)
