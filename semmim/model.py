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

from semmim import kernels
from semmim.config import SemMIMConfig
from semmim.diagnostics import head_diagnostics, mask_overlap
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
from semmim.pretrained import load_bert_fusion_into, load_bert_into, load_vit_into
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


@torch.no_grad()
def _matching_pairs(
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


def _check_image_ids(image_ids: torch.Tensor | None, B: int, read_values: bool) -> None:
    """The one check of ``forward``'s ``image_ids``: None or a (B,) integer tensor; with
    ``read_values`` (a host read) also every id >= 0 (-1 marks an empty queue slot)."""
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


class Towers(nn.Module):
    """Every part with parameters that the momentum model copies: encoders, φ, projections,
    heads. Parts an ablation does not use are not built (so every built parameter trains).
    """

    def __init__(self, cfg: SemMIMConfig, ops: OpCalls | None = None) -> None:
        super().__init__()
        ops = ops if ops is not None else OpCalls(cfg.kernels)
        self.ops = ops  # how every layer here calls the kernels (a downstream model's too)
        v, t, mim = cfg.vision, cfg.text, cfg.mim
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
        self.vision_proj = nn.Linear(v.dim, cfg.itc.embed_dim)
        self.text_proj = nn.Linear(t.dim, cfg.itc.embed_dim)
        self.itm_head = nn.Linear(t.dim, 2)
        self.mlm_head = MLMHead(t.dim, self.text.word_embeddings, t.layer_norm_eps)
        self.predictor = self.predictor_pos = self.predictor_mask_token = None
        self.head = self.pixel_head = None
        if mim.enabled:
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

    def __init__(self, cfg: SemMIMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, SemMIMConfig):
            raise ValueError(f"cfg: expected SemMIMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.ops = OpCalls(cfg.kernels)  # shared by net and ema (the deepcopy keeps it)
        self.net = Towers(cfg, self.ops)
        if cfg.text.pretrained:
            load_bert_into(self.net.text, cfg.text.pretrained, cfg.text)
        if cfg.fusion.pretrained_from_text:
            load_bert_fusion_into(self.net.fusion, cfg.text.pretrained, cfg.text, cfg.fusion.depth)
        if cfg.vision.pretrained:
            load_vit_into(self.net.vision, cfg.vision.pretrained, cfg.vision)
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

        self.tokenizer = load_tokenizer()
        tok = self.tokenizer
        if len(tok) != cfg.text.vocab_size:
            raise ValueError(f"text.vocab_size: {cfg.text.vocab_size} != tokenizer size {len(tok)}")
        self.mask_token_id = tok.mask_token_id
        special = [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
        self.register_buffer("special_ids", torch.tensor(special), persistent=False)
        # the schedules' current values as 0-d tensors for forward: a compiled forward reads
        # them as inputs instead of baking each step's float in (a recompile per step)
        self.register_buffer("_alpha", torch.tensor(0.0), persistent=False)
        self.register_buffer("_mim_teacher_temp", torch.tensor(0.0), persistent=False)
        self.set_progress(0.0)

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
        _check_image_ids(image_ids, images.shape[0], read_values=check_inputs)
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
        if diag is not None and cfg.mim.enabled and cfg.num_masked > 0:
            diag_noise = mask_noise
            if diag_noise is None:
                diag_noise = kernels.gumbel_noise(
                    (B, cfg.vision.num_patches), seed=seed + 3, device=images.device
                )
        alpha = self._alpha
        key_mask = attention_mask.bool()
        same = _matching_pairs(input_ids, key_mask, image_ids)  # (B, B) bool, diagonal True

        temp = self._temperature()
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
            positives = same
            if image_ids is not None and cfg.itc.queue_size > 0:
                # a copy: the queue is written in place after the loss (compiled backward
                # must not recompute this from the updated buffer; as image_queue.clone())
                queued = image_ids.to(self.id_queue.device)[:, None] == self.id_queue.clone()[None]
                positives = torch.cat([same, queued], dim=1)  # (B, B+Q)
            losses["itc"] = self._itc(
                image_feat, text_feat, image_feat_m, text_feat_m, alpha, temp, positives
            )
        if w.itm > 0:
            losses["itm"] = self._itm(
                image_embeds, text_embeds, key_mask, image_feat, text_feat, gen, temp, same
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
            keep_idx, mask_idx, mask = self._image_mask(image_embeds_m, text_feat_m, mask_noise)
            if diag_noise is not None:
                diag.update(mask_overlap(mask, cfg.num_masked, noise=diag_noise))
            image_losses = self._masked_image(
                images, keep_idx, mask_idx, mask, text_embeds, key_mask, image_embeds_m,
                text_embeds_m, diag,
            )  # fmt: skip
            for k, v in image_losses.items():
                losses[k] = v
        if self.training and w.itc > 0 and cfg.itc.queue_size > 0:
            self._enqueue(image_feat_m, text_feat_m, image_ids)
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
        alpha: torch.Tensor,
        temp: torch.Tensor,
        same: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image–text contrastive loss against [momentum batch | queue] keys (float32 features
        and similarities: they are divided by a temperature near 0.07); ``same`` (B, B) marks
        the in-batch positives, or (B, B+Q) also the queued ones."""
        with fp32_region(image_feat):
            with torch.no_grad():
                image_keys = torch.cat([image_feat_m, self.image_queue.clone()])  # (B+Q, E)
                text_keys = torch.cat([text_feat_m, self.text_queue.clone()])  # (B+Q, E)
                sim_i2t_m = image_feat_m @ text_keys.T / temp
                sim_t2i_m = text_feat_m @ image_keys.T / temp
            sim_i2t = image_feat @ text_keys.T / temp  # (B, B+Q)
            sim_t2i = text_feat @ image_keys.T / temp  # (B, B+Q)
            return itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, alpha, same)

    def _itm(
        self,
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

        ``same`` (B, B) bool (symmetric): pairs that match, never drawn as negatives. A row
        that matches the whole batch has no negative: its two negative rows are left out of the
        loss (label −100) instead of teaching that a match is a mismatch.
        """
        B = image_embeds.shape[0]
        with torch.no_grad(), fp32_region(image_feat):
            sim = image_feat @ text_feat.T / temp  # (B, B) float32
            neg_text = sample_hard_negatives(sim, gen, same)  # (B,) per image
            neg_image = sample_hard_negatives(sim.T, gen, same)  # (B,) per text
        images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])  # (3B, P+1, Dv)
        texts = torch.cat([text_embeds, text_embeds[neg_text], text_embeds])  # (3B, T, Dt)
        masks = torch.cat([key_mask, key_mask[neg_text], key_mask])  # (3B, T)
        fused = self.net.fusion(texts, masks, images)[:, 0]  # (3B, Dt)
        # rows: B positives (label 1), then the two kinds of negatives (label 0)
        labels = (torch.arange(3 * B, device=fused.device) < B).long()
        if same is not None:
            no_negative = same.all(1).to(fused.device)  # (B,)
            ignore = torch.cat([torch.zeros_like(no_negative), no_negative, no_negative])
            labels = labels.masked_fill(ignore, -100)
        return F.cross_entropy(self.net.itm_head(fused).float(), labels)

    def _mlm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_embeds_m: torch.Tensor,
        alpha: torch.Tensor,
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
        self,
        image_embeds_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keep_idx (B, R), mask_idx (B, M), mask (B, P) from the configured strategy, with
        the Gumbel noise (B, P) of :meth:`_mask_noise`."""
        c, M = self.cfg.masking, self.cfg.num_masked
        if c.strategy == "random":
            B, L, _ = image_embeds_m.shape
            return random_mask(B, L - 1, M, noise=noise, device=image_embeds_m.device)
        patch_feat_m = self.ema.vision_proj(image_embeds_m[:, 1:])  # (B, P, E) in ITC space
        return text_guided_mask(patch_feat_m, text_feat_m, M, tau=c.tau, noise=noise, ops=self.ops)

    def _mask_noise(self, B: int, seed: int, device: torch.device) -> torch.Tensor | None:
        """The image mask's Gumbel noise (B, P) from ``seed`` (None when no mask is drawn or
        the text-guided mask has tau = 0)."""
        cfg, M = self.cfg, self.cfg.num_masked
        if not cfg.mim.enabled or not (cfg.loss.glob > 0 or cfg.loss.mim > 0) or M == 0:
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
    ) -> dict[str, torch.Tensor]:
        """Global agreement and MIM on the masked view (keep_idx (B, R), mask_idx (B, M),
        mask (B, P) from :meth:`_image_mask`); ``diag``: where diagnostics go (None = none)."""
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
            if diag is not None:  # diagnostic steps only: the (B, K) logits themselves
                with torch.no_grad():
                    diag.update(
                        head_diagnostics(
                            "glob",
                            net.head.logits(z),
                            ema.head.logits(z_m),
                            self.glob_center,
                            cfg.glob.teacher_temp,
                        )
                    )
            if self.training:
                _update_center(self.glob_center, teacher_mean, cfg.glob.center_momentum)
        if cfg.loss.mim > 0:
            losses["mim"] = (
                self._mim_loss(
                    images,
                    x,
                    mask_idx,
                    text_embeds,
                    key_mask,
                    image_embeds_m,
                    text_embeds_m,
                    diag,
                )  # fmt: skip
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
        diag: dict[str, torch.Tensor] | None = None,
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
            v = self._teacher_inputs(v, text_embeds_m, key_mask)  # ψ: (B, M, Dv)
            z_m = ema.head.features(v).flatten(0, 1)  # (B·M, bottleneck)
        B, M = pred.shape[:2]
        z = net.head.features(pred).flatten(0, 1)  # (B·M, bottleneck)
        per_patch, teacher_mean = self.ops.prototype_cross_entropy(  # (B·M,), (K,)
            z, z_m, net.head.prototypes.float(), ema.head.prototypes.float(), self.mim_center,
            cfg.mim.student_temp, self._mim_teacher_temp,
        )  # fmt: skip
        if diag is not None:  # diagnostic steps only: the (B·M, K) logits themselves
            with torch.no_grad():
                diag.update(
                    head_diagnostics(
                        "mim",
                        net.head.logits(z),
                        ema.head.logits(z_m),
                        self.mim_center,
                        self._mim_teacher_temp,
                    )
                )
        if self.training:
            batch_center = self._mim_batch_center(
                teacher_mean, image_embeds_m, text_embeds_m, key_mask
            )
            _update_center(self.mim_center, batch_center, cfg.mim.center_momentum)
        return per_patch.view(B, M).mean(1).mean(0)

    @torch.no_grad()
    def _teacher_inputs(
        self, v: torch.Tensor, text_embeds_m: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """ψ: EMA patch features v (B, L, Dv) → what the MIM teacher head reads (B, L, Dv).

        With ``mim.text_in_target``, one cross-attention step of the EMA φ to the text (all
        tokens, or only the text CLS with ``mim.psi="text_cls"``), then the EMA φ's final
        LayerNorm with ``mim.psi_norm``. Per token (no patch–patch mixing), so ψ of a subset of
        patches equals that subset of ψ of all patches.
        """
        c, ema = self.cfg.mim, self.ema
        if not c.text_in_target:
            return v
        text_mask = key_mask
        if c.psi == "text_cls":  # a single key: adds the projected text CLS
            text_mask = torch.zeros_like(key_mask)
            text_mask[:, 0] = True
        v = ema.predictor.cross_step(v, text_embeds_m, text_mask)
        return ema.predictor.norm(v) if c.psi_norm else v

    @torch.no_grad()
    def _mim_batch_center(
        self,
        masked: torch.Tensor,
        image_embeds_m: torch.Tensor,
        text_embeds_m: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """What the MIM centre c2 moves towards this step, (K,) (before the all-reduce).

        ``mim.center_over="masked"``: the mean teacher logits of the masked patches (``masked``:
        those logits (…, K), or already their mean (K,)). ``"all"`` (iBOT): the mean over all P
        patches of every image, the teacher head run on ψ of the whole EMA patch sequence.
        """
        K = masked.shape[-1]
        if self.cfg.mim.center_over == "masked":
            return masked.reshape(-1, K).mean(0)
        v = self._teacher_inputs(image_embeds_m[:, 1:], text_embeds_m, key_mask)  # (B, P, Dv)
        return self.ema.head(v).reshape(-1, K).mean(0)

    @torch.no_grad()
    def _enqueue(
        self,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> None:
        """Write the (all-gathered) momentum features and image ids (-1 without ids) at the
        ring pointer, on device."""
        # float32 features into the queue's dtype (a model cast with .half() has fp16 queues)
        image_feat_m = all_gather_no_grad(image_feat_m.to(self.image_queue.dtype))
        text_feat_m = all_gather_no_grad(text_feat_m.to(self.text_queue.dtype))
        if image_ids is None:
            ids = torch.full((image_feat_m.shape[0],), -1, device=self.id_queue.device)
        else:
            ids = all_gather_no_grad(image_ids.to(self.id_queue.device, torch.long))
        Q, n = self.image_queue.shape[0], image_feat_m.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % Q  # (n,)
        self.image_queue.index_copy_(0, idx, image_feat_m)
        self.text_queue.index_copy_(0, idx, text_feat_m)
        self.id_queue.index_copy_(0, idx, ids)
        self.queue_ptr.copy_((self.queue_ptr + n) % Q)
