"""Fine-tuning models built from a (pre-trained) SemMIM: VQA answer classifier and captioner.

Both take their encoders from :class:`semmim.model.Towers` (the trained ``net`` of a SemMIM,
not its EMA copy) and have the loop's interface: ``forward(images, input_ids, attention_mask,
*, seed, check_inputs, …) -> (loss, {name: loss})`` and ``tokenizer``; they have no schedules and
no momentum model, so their tasks do nothing around an optimizer step.

VQA design — a classifier over the N most frequent answers, not an answer decoder: VQA v2 is
scored on a closed answer set in practice (ALBEF/BLIP's decoder ranks the same ~3k-answer
candidate list, after a first-token top-k), and a classifier gives one forward per question
instead of k decoder passes, trains with the soft VQA scores directly (binary cross-entropy
per answer, as ViLT and BUTD), and learns within minutes on a CPU. The captioning decoder
(:mod:`semmim.downstream.decoder`) stays a separate module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semmim.config import SemMIMConfig
from semmim.downstream.decoder import TextDecoder, generate
from semmim.model import SemMIM, Towers
from semmim.tokenizer import load_tokenizer

__all__ = ["pretrained_towers", "VQAModel", "CaptionModel"]


def pretrained_towers(cfg: SemMIMConfig, state: dict | None = None) -> Towers:
    """The ``net`` of a SemMIM built from ``cfg`` (its ``*.pretrained`` loaders run), with the
    weights of a pre-training checkpoint's ``state["model"]`` when given."""
    base = SemMIM(cfg)
    if state is not None:
        base.load_state_dict(state["model"])
    return base.net


class _Downstream(nn.Module):
    """Common parts: config, tokenizer, SemMIM's input validator."""

    check_inputs = SemMIM.check_inputs  # one validator: reads self.cfg and self.special_ids

    def __init__(self, cfg: SemMIMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = load_tokenizer()
        tok = self.tokenizer
        special = [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
        self.register_buffer("special_ids", torch.tensor(special), persistent=False)


class VQAModel(_Downstream):
    """Image → ViT; question → text encoder → fusion with the image; fused [CLS] → MLP →
    one logit per answer of the vocabulary (N answers)."""

    def __init__(self, cfg: SemMIMConfig, num_answers: int, towers: Towers | None = None) -> None:
        super().__init__(cfg)
        if num_answers < 1:
            raise ValueError(f"num_answers: must be >= 1, got {num_answers}")
        towers = towers if towers is not None else Towers(cfg)
        self.ops = towers.ops
        self.vision, self.text, self.fusion = towers.vision, towers.text, towers.fusion
        D = cfg.text.dim
        self.head = nn.Sequential(
            nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, num_answers)
        )
        for m in self.head:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=m.in_features**-0.5)
                nn.init.zeros_(m.bias)

    def logits(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, 3, S, S), (B, T), (B, T) → answer logits (B, N)."""
        image = self.vision(images)
        fused = self.fusion(self.text(input_ids, attention_mask), attention_mask, image)
        return self.head(fused[:, 0])

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        targets: torch.Tensor,
        seed: int | None = None,
        check_inputs: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Binary cross-entropy against the soft VQA scores ``targets`` (B, N) in [0, 1], summed
        over answers and averaged over questions. ``seed`` is unused (nothing random but
        dropout, which draws from torch's generator)."""
        if check_inputs:
            self.check_inputs(images, input_ids, attention_mask)
        with self.ops.values_checked(check_inputs):  # no value checks (host syncs) after step 1
            logits = self.logits(images, input_ids, attention_mask)
        if targets.shape != logits.shape:
            raise ValueError(f"targets: expected {tuple(logits.shape)}, got {tuple(targets.shape)}")
        loss = F.binary_cross_entropy_with_logits(
            logits.float(), targets.float(), reduction="sum"
        ) / len(logits)
        return loss, {"vqa": loss.detach()}


class CaptionModel(_Downstream):
    """Image → ViT tokens → :class:`TextDecoder` (initialised from the text + fusion encoders
    and the MLM head). [CLS] starts a caption, [SEP] ends it."""

    def __init__(
        self, cfg: SemMIMConfig, label_smoothing: float = 0.1, towers: Towers | None = None
    ) -> None:
        super().__init__(cfg)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {label_smoothing}")
        towers = towers if towers is not None else Towers(cfg)
        self.ops = towers.ops
        self.label_smoothing = label_smoothing
        self.vision = towers.vision
        self.decoder = TextDecoder.from_encoders(towers.text, towers.fusion, towers.mlm_head, cfg)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        seed: int | None = None,
        check_inputs: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Language-model loss (next-token cross-entropy with label smoothing) on the caption
        ``input_ids`` (B, T) = [CLS] words [SEP] [PAD]…; padding is not predicted."""
        if check_inputs:
            self.check_inputs(images, input_ids, attention_mask)
        with self.ops.values_checked(check_inputs):  # no value checks (host syncs) after step 1
            image = self.vision(images)
            logits = self.decoder(input_ids[:, :-1], image)  # (B, T-1, V)
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=self.label_smoothing,
        )
        return loss, {"lm": loss.detach()}

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        beam_size: int = 1,
        max_len: int = 30,
        use_cache: bool = True,
    ) -> list[str]:
        """Captions for images (B, 3, S, S): greedy (beam 1) or beam search, KV-cached."""
        self.check_inputs(images, None, None)
        tok = self.tokenizer
        ids = generate(
            self.decoder,
            self.vision(images),
            tok.cls_token_id,
            tok.sep_token_id,
            tok.pad_token_id,
            max_len=max_len,
            beam_size=beam_size,
            use_cache=use_cache,
        )
        return [tok.decode(row, skip_special_tokens=True).strip() for row in ids.tolist()]
