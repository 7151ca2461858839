"""SemMIM: ALBEF (ITC, ITM, MLM) + global agreement + semantic masked image modelling.

    cfg = from_preset("tiny")
    model = build_model(cfg)          # SemMIM(cfg, tokenizer) + the *.pretrained weights
    out = model(images, input_ids, attention_mask)   # (B,3,S,S) float, (B,T), (B,T)
    out.loss.backward(); opt.step(); model.update_momentum()

Shape letters: B batch, P patches, R kept, M masked, T tokens, Dv/Dt vision/text width,
E ITC embedding width, K prototypes. The four hot ops (masked gather/scatter, top-k masking,
cross-attention, the prototype cross-entropy of the agreement and MIM losses) are called only
through the model's :class:`~semmim.layers.OpCalls` (``model.ops``), which passes
``cfg.kernels``' backend and the ``validate`` flag to every call. The objectives themselves are
in :mod:`semmim.objectives`; this module builds the towers, owns the buffers (queues, centres),
runs the schedules and the EMA, and wires the objectives up in ``forward``.

Mixed precision: under ``torch.autocast`` the encoders run in the low precision; ITC
similarities, prototype logits and every softmax / log-softmax / L2-normalisation that feeds a
loss run in float32 (see :func:`~semmim.layers.fp32_region`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from semmim import kernels
from semmim import objectives as obj
from semmim.config import SemMIMConfig
from semmim.diagnostics import mask_overlap
from semmim.dist import local_shard
from semmim.inputs import check_image_ids, check_inputs, special_token_ids
from semmim.layers import (
    FusionEncoder,
    MLMHead,
    OpCalls,
    Predictor,
    PrototypeHead,
    TextEncoder,
    VisionEncoder,
    set_grad_checkpointing,
)

__all__ = ["SemMIM", "SemMIMOutput", "Towers", "build_model", "load_pretrained"]


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

    ``parts`` (a subset of :attr:`PARTS`): what to build, e.g. a downstream model's encoders
    only; a part left out is None. "mlm" (its decoder is the text embedding table) needs "text".
    """

    PARTS = ("vision", "text", "fusion", "itc", "itm", "mlm", "mim")

    def __init__(
        self, cfg: SemMIMConfig, ops: OpCalls | None = None, parts: tuple[str, ...] = PARTS
    ) -> None:
        super().__init__()
        unknown = sorted(set(parts) - set(self.PARTS))
        if unknown or ("mlm" in parts and "text" not in parts):
            raise ValueError(
                f"parts: expected a subset of {self.PARTS} (mlm with text), got {parts}"
            )
        ops = ops if ops is not None else OpCalls(cfg.kernels)
        self.ops = ops  # how every layer here calls the kernels (a downstream model's too)
        v, t, mim = cfg.vision, cfg.text, cfg.mim
        self.vision = self.text = self.fusion = self.vision_proj = self.text_proj = None
        self.patch_proj = None  # masking.score="patch": the patches' own ITC-space projection
        self.itm_head = self.mlm_head = None
        if "vision" in parts:
            self.vision = VisionEncoder(
                v.image_size,
                v.patch_size,
                v.dim,
                v.depth,
                v.heads,
                v.mlp_ratio,
                mask_token=mim.enabled and not mim.drop_tokens,
                eps=v.layer_norm_eps,
                dropout=v.dropout,
                dist_token=v.dist_token,
                ops=ops,
            )
        if "text" in parts:
            self.text = TextEncoder(
                t.vocab_size,
                t.dim,
                t.depth,
                t.heads,
                t.intermediate,
                t.max_len,
                t.type_vocab_size,
                t.layer_norm_eps,
                t.dropout,
            )
        if "fusion" in parts:
            self.fusion = FusionEncoder(
                t.dim,
                v.dim,
                cfg.fusion.depth,
                t.heads,
                t.intermediate,
                t.layer_norm_eps,
                cfg.fusion.dropout,
                ops,
            )
        if "itc" in parts:
            self.vision_proj = nn.Linear(v.dim, cfg.itc.embed_dim)
            self.text_proj = nn.Linear(t.dim, cfg.itc.embed_dim)
            if cfg.masking.score == "patch":
                self.patch_proj = nn.Linear(v.dim, cfg.itc.embed_dim)
        if "itm" in parts:
            self.itm_head = nn.Linear(t.dim, 2)
        if "mlm" in parts:
            self.mlm_head = MLMHead(t.dim, self.text.word_embeddings, t.layer_norm_eps)
        self.predictor = self.predictor_pos = self.predictor_mask_token = None
        self.head = self.pixel_head = None
        if mim.enabled and "mim" in parts:
            self.predictor = Predictor(
                v.dim, t.dim, mim.predictor_depth, v.heads, v.mlp_ratio, v.dropout, ops
            )
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

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of the free parameters that must not be weight-decayed:
        position embeddings and learned tokens (timm's ``no_weight_decay()`` convention). Biases,
        norms and embedding tables are left to the optimiser's generic rules."""
        names = {
            "vision.pos_embed",
            "vision.cls_token",
            "vision.dist_token",
            "vision.mask_token",
            "predictor_pos",
            "predictor_mask_token",
        }
        return names & {n for n, _ in self.named_parameters()}


@dataclass
class SemMIMOutput:
    """loss: weighted sum (scalar). losses: each enabled objective's unweighted value.
    keep_idx (B, R), mask_idx (B, M), mask (B, P): the image mask used (None without MIM).
    diagnostics: 0-d tensors of :mod:`semmim.diagnostics` (only with ``diagnostics=True``)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    keep_idx: torch.Tensor | None = None
    mask_idx: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class SemMIM(nn.Module):
    """The SemMIM model with its momentum (EMA) copy, ITC queues and DINO centres.

    ``self.net`` trains; ``self.ema`` is its exponential moving average (``requires_grad``
    False, updated only by :meth:`update_momentum`). Queues and centres are buffers, so the
    state dict holds everything a checkpoint needs. Optimise only parameters with
    ``requires_grad`` (the EMA's are frozen). Schedules follow :meth:`set_step`.
    """

    def __init__(self, cfg: SemMIMConfig, tokenizer) -> None:
        """Randomly initialised; reads no file. ``tokenizer``: the caption tokenizer (its
        [PAD]/[CLS]/[SEP]/[MASK] ids are MLM's and the input check's; ``len`` must equal
        ``text.vocab_size``). :func:`build_model` loads the tokenizer and pretrained weights."""
        super().__init__()
        if not isinstance(cfg, SemMIMConfig):
            raise ValueError(f"cfg: expected SemMIMConfig, got {type(cfg).__name__}")
        if len(tokenizer) != cfg.text.vocab_size:
            raise ValueError(
                f"text.vocab_size: {cfg.text.vocab_size} != tokenizer size {len(tokenizer)}"
            )
        self.cfg = cfg
        self.ops = OpCalls(cfg.kernels)  # shared by net and ema (the deepcopy keeps it)
        self.net = Towers(cfg, self.ops)
        self.ema = copy.deepcopy(self.net, {id(self.ops): self.ops}).requires_grad_(False).eval()
        self.temp = nn.Parameter(torch.tensor(cfg.itc.temp))

        E, Q, K = cfg.itc.embed_dim, cfg.itc.queue_size, cfg.head.num_prototypes
        self.register_buffer("image_queue", F.normalize(torch.randn(Q, E), dim=1))  # (Q, E)
        self.register_buffer("text_queue", F.normalize(torch.randn(Q, E), dim=1))  # (Q, E)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # the image id of each queued pair (-1: none given, or a slot not yet written)
        self.register_buffer("id_queue", torch.full((Q,), -1, dtype=torch.long))
        self.register_buffer("glob_center", torch.zeros(K))
        self.register_buffer("mim_center", torch.zeros(K))

        self.tokenizer = tokenizer
        self.mask_token_id = tokenizer.mask_token_id
        special = torch.tensor(special_token_ids(tokenizer))
        self.register_buffer("special_ids", special, persistent=False)
        # the schedules' current values as 0-d tensors for forward: a compiled forward reads
        # them as inputs instead of baking each step's float in (a recompile per step)
        self.register_buffer("_alpha", torch.tensor(0.0), persistent=False)
        self.register_buffer("_mim_teacher_temp", torch.tensor(0.0), persistent=False)
        self.set_progress(0.0)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> SemMIM:
        """The model ``semmim export RUN --format hf DIR`` wrote to ``path`` (eval mode):
        :func:`semmim.hf_format.load_hf`."""
        from semmim.hf_format import load_hf

        return load_hf(path, cls, device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the queue kept image ids: their queue has no ids (-1)
        if prefix + "image_queue" in state_dict and prefix + "id_queue" not in state_dict:
            state_dict[prefix + "id_queue"] = torch.full_like(self.id_queue, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> SemMIM:
        """Train/eval mode for ``net``; the EMA copy stays in eval mode, so its features (ITC
        and distillation targets, masking scores, MIM targets) carry no dropout noise. (ALBEF's
        momentum encoders keep BERT's dropout; DINO-style teachers have none.)"""
        super().train(mode)
        self.ema.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute ``net``'s transformer blocks in backward (timm's switch; EMA: no_grad)."""
        set_grad_checkpointing(self.net, enable)

    def no_weight_decay(self) -> set[str]:
        """Full names of the trainable parameters that must not be weight-decayed: the ITC
        temperature and the learned tokens and position embeddings of ``net`` (see
        :meth:`Towers.no_weight_decay`; timm's convention). The optimiser adds its generic rules
        (biases, norms, embedding tables)."""
        return {"temp"} | {f"net.{n}" for n in self.net.no_weight_decay()}

    # ---------------------------------------------------------------- schedules
    def set_step(self, step: int, total_steps: int) -> None:
        """Set training progress = step / total_steps ∈ [0, 1] (default 0 until called).

        It drives the ITC/MLM distillation α (linear warm-up over ``itc.alpha_warmup``),
        the MIM teacher temperature τ_t' (``mim.teacher_temp`` → ``teacher_temp_final`` over
        ``mim.teacher_temp_warmup``) and a cosine momentum schedule. Call it every step.
        """
        if total_steps <= 0:
            raise ValueError(f"total_steps: must be > 0, got {total_steps}")
        self.set_progress(step / total_steps)

    @torch.no_grad()
    def set_progress(self, progress: float) -> None:
        """Set training progress ∈ [0, 1] directly (clamped); see :meth:`set_step`."""
        self.progress = min(max(float(progress), 0.0), 1.0)
        # the one-pass student's view this step: a Python bool (torch.compile guards on it and
        # recompiles once when the unmasked phase, mim.unmasked_from, begins)
        self.one_pass_now = self.cfg.one_pass and self.progress < self.cfg.mim.unmasked_from
        self._alpha.fill_(self.alpha)  # no host read: Python floats into device tensors
        self._mim_teacher_temp.fill_(self.mim_teacher_temp)

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

    def _temperature(self) -> torch.Tensor:
        """The ITC temperature: ``temp`` clamped to [itc.temp_min, itc.temp_max] in value, with
        the gradient of the parameter itself (as ALBEF's in-place clamp before each forward).
        The forward mutates no parameter (an in-place clamp there gave Inductor a different
        ``temp`` gradient than eager); :meth:`update_momentum` clamps the parameter."""
        c = self.cfg.itc
        return self.temp + (self.temp.clamp(c.temp_min, c.temp_max) - self.temp).detach()

    @torch.no_grad()
    def update_momentum(self) -> None:
        """EMA step, after ``optimizer.step()``: ema ← m·ema + (1−m)·param for every tensor;
        also clamps the ITC temperature parameter into [itc.temp_min, itc.temp_max]."""
        self.temp.clamp_(self.cfg.itc.temp_min, self.cfg.itc.temp_max)
        m = self.momentum
        # FSDP2: net and ema are sharded alike, so the update is local to each rank's shards
        ema = [local_shard(p) for p in self.ema.parameters()]
        net = [local_shard(p) for p in self.net.parameters()]
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
        """:func:`semmim.inputs.check_inputs` with this model's config and special tokens."""
        check_inputs(
            self.cfg, self.special_ids, images, input_ids, attention_mask, read_values=read_values
        )

    # ---------------------------------------------------------------- encoders
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → image tokens (B, P+1, Dv), CLS first (for :meth:`itm_score`)."""
        return self.net.vision(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → L2-normalised ITC image features (B, E)."""
        self.check_inputs(images, None, None)
        return obj.unit(self.net.vision_proj(self.net.vision(images)[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T), (B, T) → L2-normalised ITC text features (B, E)."""
        self.check_inputs(None, input_ids, attention_mask)
        text = self.net.text(input_ids, attention_mask)
        return obj.unit(self.net.text_proj(text[:, 0]))

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
        image_ids: torch.Tensor | None = None,
        diagnostics: bool = False,
    ) -> SemMIMOutput:
        """All enabled objectives on a batch of matching (image, caption) pairs.

        images (B, 3, S, S) float; input_ids, attention_mask (B, T). ``seed`` makes every
        random choice (image mask, MLM mask, ITM negatives) deterministic; None draws one from
        torch's global CPU generator (a host read: training passes a seed per step). Dropout
        (``*.dropout`` > 0, training mode) draws from torch's global generator, which
        checkpoints save. In training mode the ITC queue and the centres update; in eval mode
        nothing is mutated.

        check_inputs: True runs the model's value checks (empty captions, token-id range) and
        calls the ops with ``validate=cfg.kernels.validate``; False skips every check that
        reads tensor values (ops get ``validate=False``), so the call makes no device→host
        sync. Shape, dtype and device checks run either way.

        ``image_ids`` (B,) int, optional: which image each pair shows (pairs sharing an id share
        the image, e.g. several captions of one COCO image). Two pairs *match* when they share
        an image id or have identical captions (same token ids and mask; checked with or without
        ids). Matching pairs are never each other's ITM hard negatives, and are positives of
        each other in the ITC targets (ALBEF's retrieval ``idx`` rule), queued pairs included:
        the queue keeps each entry's image id, so an earlier batch's pair of the same image is a
        positive, not a negative. Ids must be >= 0 (checked with ``check_inputs``); without ids
        queued entries are negatives.

        ``diagnostics``: also compute, on device, the teacher entropy / effective K / prototypes
        in use / student–teacher agreement of the global and MIM heads and the text-vs-random mask
        overlap (:mod:`semmim.diagnostics`) into ``out.diagnostics``; no host read either way.
        """
        self.check_inputs(images, input_ids, attention_mask, read_values=check_inputs)
        check_image_ids(image_ids, images.shape[0], read_values=check_inputs)
        with self.ops.values_checked(check_inputs):
            diag: dict[str, torch.Tensor] | None = {} if diagnostics else None
            out = self._forward(images, input_ids, attention_mask, seed, image_ids, diag)
            if diag is not None:
                out.diagnostics = diag
            return out

    def _forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        seed: int | None,
        image_ids: torch.Tensor | None = None,
        diag: dict[str, torch.Tensor] | None = None,
    ) -> SemMIMOutput:
        cfg, w, net, ema = self.cfg, self.cfg.loss, self.net, self.ema
        B = images.shape[0]
        if w.itm > 0 and B < 2:
            raise ValueError("images: ITM hard negatives need a batch of at least 2 pairs")
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        # Every random draw of the step comes from `seed`, here at the start: a compiled
        # forward breaks its graph at each generator, and no later graph reads the seed.
        gen = torch.Generator(device=images.device).manual_seed(seed + 1)
        mask_noise = self._mask_noise(B, seed, images.device)  # (B, P) or None
        # the mask-overlap diagnostic compares the mask with the random mask of the *same*
        # noise (what the mask would be if the text scored every patch alike); with no noise
        # (tau = 0) with an independent random mask
        diag_noise = None
        if diag is not None and cfg.draws_mask and cfg.num_masked > 0:
            diag_noise = mask_noise
            if diag_noise is None:
                diag_noise = kernels.gumbel_noise(
                    (B, cfg.vision.num_patches), seed=seed + 3, device=images.device
                )
        alpha = self._alpha
        key_mask = attention_mask.bool()
        same = obj.matching_pairs(input_ids, key_mask, image_ids)  # (B, B) bool, diagonal True

        temp = self._temperature()
        one_pass = self.one_pass_now  # mim.student_view="masked", before mim.unmasked_from
        image_embeds = None if one_pass else net.vision(images)  # (B, P+1, Dv)
        text_embeds = net.text(input_ids, attention_mask)  # (B, T, Dt)
        text_feat = obj.unit(net.text_proj(text_embeds[:, 0]))  # (B, E) float32
        with torch.no_grad():
            image_embeds_m = ema.vision(images)
            text_embeds_m = ema.text(input_ids, attention_mask)
            image_feat_m = obj.unit(ema.vision_proj(image_embeds_m[:, 0]))
            text_feat_m = obj.unit(ema.text_proj(text_embeds_m[:, 0]))
        keep_idx = mask_idx = mask = None
        if cfg.draws_mask:  # from the EMA's full-image pass: before the one-pass student's
            keep_idx, mask_idx, mask = obj.image_mask(
                cfg, self.ops, ema, image_embeds_m, text_feat_m, mask_noise
            )
            if diag_noise is not None:
                diag.update(mask_overlap(mask, cfg.num_masked, noise=diag_noise))
        if one_pass:  # the student's only ViT pass: CLS + kept patches, (B, R+1, Dv)
            image_embeds = net.vision.forward_kept(images, keep_idx)
        image_feat = obj.unit(net.vision_proj(image_embeds[:, 0]))  # (B, E) float32

        losses: dict[str, torch.Tensor] = {}
        if w.itc > 0:
            positives = obj.itc_positives(same, image_ids, self.id_queue)  # (B, B) or (B, B+Q)
            losses["itc"] = obj.itc(
                image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                self.text_queue, alpha, temp, positives,
            )  # fmt: skip
        if w.itm > 0:
            losses["itm"] = obj.itm(
                net, image_embeds, text_embeds, key_mask, image_feat, text_feat, gen, temp, same
            )
        if w.mlm > 0:
            losses["mlm"] = obj.mlm(
                net, ema, self.ops, cfg.mlm, cfg.text.vocab_size, self.mask_token_id,
                self.special_ids, input_ids, attention_mask, image_embeds, image_embeds_m,
                alpha, gen,
            )  # fmt: skip
        if cfg.masking.score == "patch" and w.patch > 0:
            losses["patch"] = obj.patch_alignment(cfg, net, image_embeds, text_feat, temp, same)
        # Plain locals only across calls that may break a torch.compile graph (the RNG draws):
        # a per-call object held on the stack there (a bound method, an output dataclass)
        # would invalidate the resumed graph every step and recompile it.
        if cfg.mim.enabled and (w.glob > 0 or w.mim > 0):
            image_losses = self._masked_image(
                images, keep_idx, mask_idx, mask, text_embeds, key_mask, image_embeds_m,
                text_embeds_m, diag, seed=seed, kept=image_embeds if one_pass else None,
            )  # fmt: skip
            for k, v in image_losses.items():
                losses[k] = v
        if self.training and w.itc > 0 and cfg.itc.queue_size > 0:
            obj.enqueue(
                self.image_queue, self.text_queue, self.id_queue, self.queue_ptr, image_feat_m,
                text_feat_m, image_ids,
            )  # fmt: skip
        loss = images.new_zeros((), dtype=torch.float32)
        for k, v in losses.items():
            loss = loss + getattr(w, k) * v
        return SemMIMOutput(loss, losses, keep_idx, mask_idx, mask)

    def _mask_noise(self, B: int, seed: int, device: torch.device) -> torch.Tensor | None:
        """The image mask's Gumbel noise (B, P) from ``seed`` (None when no mask is drawn or
        the text-guided mask has tau = 0)."""
        cfg, M = self.cfg, self.cfg.num_masked
        if not cfg.draws_mask or M == 0:
            return None
        if cfg.masking.strategy == "text_guided" and cfg.masking.tau == 0:
            return None
        return kernels.gumbel_noise((B, cfg.vision.num_patches), seed=seed, device=device)

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
        diag: dict[str, torch.Tensor] | None = None,
        seed: int | None = None,
        kept: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Global agreement and MIM on the masked view (keep_idx (B, R), mask_idx (B, M),
        mask (B, P) from :func:`~semmim.objectives.image_mask`); ``diag``: where diagnostics go
        (None = none); ``seed``: the step's (``glob.views="cross"`` draws its view from it);
        ``kept``: the one-pass student's (B, R+1, Dv) encoding of the view (None: encode it)."""
        cfg, net, ema = self.cfg, self.net, self.ema
        semantic_mim = cfg.loss.mim > 0 and cfg.num_masked > 0 and cfg.mim.target == "semantic"
        cls_masked, x = obj.masked_view(cfg, self.ops, net, images, keep_idx, mask, kept)
        if diag is not None and semantic_mim:  # before the loss moves the MIM centre
            diag.update(obj.mim_reliance(
                cfg, self.ops, net, ema, images, keep_idx, mask, mask_idx, text_embeds,
                key_mask, image_embeds_m, text_embeds_m, self.mim_center,
            ))  # fmt: skip
        losses = {}
        if cfg.loss.glob > 0:
            losses["glob"] = obj.global_agreement(
                cfg, self.ops, net, ema, cls_masked, image_embeds_m[:, 0], self.glob_center,
                diag=diag, update=self.training, images=images, seed=seed,
            )  # fmt: skip
        if cfg.loss.mim > 0:
            losses["mim"] = images.new_zeros(()) if cfg.num_masked == 0 else obj.mim(
                cfg, self.ops, net, ema, images, x, mask_idx, text_embeds, key_mask,
                image_embeds_m, text_embeds_m, self.mim_center, self._mim_teacher_temp,
                diag=diag, update=self.training,
            )  # fmt: skip
        return losses


# ------------------------------------------------------------------------------------ factory
def load_pretrained(towers: Towers, cfg: SemMIMConfig) -> None:
    """Load the ``*.pretrained`` weights ``cfg`` names into ``towers`` (reads those files):
    ``text.pretrained`` into the text encoder (and, with ``fusion.pretrained_from_text``, its
    upper layers into the fusion encoder), ``vision.pretrained`` into the image encoder."""
    from semmim.pretrained import load_bert_fusion_into, load_bert_into, load_vit_into

    if cfg.text.pretrained:
        load_bert_into(towers.text, cfg.text.pretrained, cfg.text)
    if cfg.fusion.pretrained_from_text:
        load_bert_fusion_into(towers.fusion, cfg.text.pretrained, cfg.text, cfg.fusion.depth)
    if cfg.vision.pretrained:
        load_vit_into(towers.vision, cfg.vision.pretrained, cfg.vision)


def build_model(cfg: SemMIMConfig, pretrained: bool = True) -> SemMIM:
    """A :class:`SemMIM` with the shipped tokenizer; with ``pretrained`` also the weights that
    ``text.pretrained`` / ``vision.pretrained`` name (into ``net``, then copied into ``ema``).

    Pass ``pretrained=False`` when a checkpoint's weights follow (resume, evaluation): its saved
    config may name pretrained paths that no longer exist, and they would be overwritten anyway.
    """
    from semmim.tokenizer import load_tokenizer

    model = SemMIM(cfg, load_tokenizer())
    if pretrained and (cfg.text.pretrained or cfg.vision.pretrained):
        load_pretrained(model.net, cfg)
        model.ema.load_state_dict(model.net.state_dict())
    return model
