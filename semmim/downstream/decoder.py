"""Text decoder for captioning: causal self-attention + cross-attention to image tokens, KV cache.

The decoder is the text encoder followed by the fusion encoder, made causal (BLIP initialises its
decoder from its text encoder the same way): ``text.depth`` layers of causal self-attention +
MLP, then ``fusion.depth`` layers that add cross-attention to the image tokens, then the MLM
head (tied to the word embeddings) as the language-model head. Parameter names match
:class:`semmim.layers.TextEncoder` / ``FusionEncoder`` / ``MLMHead``, so
:meth:`TextDecoder.from_encoders` copies a (pre-trained) model's weights one to one.

Decoding (:func:`generate`) keeps a :class:`KVCache`: the self-attention keys/values of the
prefix are stored per layer and only the newest token is run each step; the cross-attention
keys/values of the image tokens are computed once. Greedy and beam search share one loop (greedy
= beam 1). Shapes: B batch, T tokens, L image tokens, D width, H heads, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from semmim.layers import MLP, CrossAttention, MLMHead, OpCalls, dropout_layer

__all__ = ["KVCache", "TextDecoder", "generate"]


@dataclass
class KVCache:
    """Per-layer self-attention keys/values of the prefix ``(B, H, t, Dh)`` and the image
    cross-attention keys/values ``(B, L, H, Dh)``; ``length`` = tokens already decoded."""

    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    length: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (B',) of every cached tensor (beam search re-orders beams)."""
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.self_kv]
        self.cross_kv = [
            None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross_kv
        ]


class CausalSelfAttention(nn.Module):
    """Self-attention where token t sees tokens <= t; with a cache, new tokens see the prefix.

    Same parameters (``qkv``, ``proj``) as :class:`semmim.layers.SelfAttention`.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = dropout_layer(dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, t, D) new tokens; past (k, v) (B, H, t0, Dh) → ((B, t, D), (k, v) with t0+t)."""
        B, t, D = x.shape
        q, k, v = self.qkv(x).view(B, t, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, t, Dh)
        t0 = 0
        if past is not None:
            t0 = past[0].shape[2]
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # New query i (absolute position t0 + i) sees keys 0 .. t0 + i.
        keys = torch.arange(t0 + t, device=x.device)
        allowed = keys[None, :] <= (t0 + torch.arange(t, device=x.device))[:, None]  # (t, t0+t)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, t, D))), (k, v)


class DecoderLayer(nn.Module):
    """Post-LN decoder layer: LN(x + causal SA x) [, LN(x + CA(x, image))], LN(x + MLP x).

    Without ``image_dim`` it has a :class:`semmim.layers.BertLayer`'s parameters, with it a
    :class:`semmim.layers.FusionLayer`'s.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        intermediate: int,
        eps: float,
        image_dim: int | None = None,
        dropout: float = 0.0,
        ops: OpCalls | None = None,
    ) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross = self.norm_cross = None
        if image_dim is not None:
            self.cross = CrossAttention(dim, image_dim, heads, dropout, ops)
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, intermediate, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def image_kv(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of the image tokens (B, L, Dv) → 2 × (B, L, H, Dh)."""
        B, L, _ = image.shape
        H, D = self.cross.heads, self.cross.q.out_features
        return self.cross.kv(image).view(B, L, 2, H, D // H).unbind(2)

    def forward(
        self,
        x: torch.Tensor,
        image_kv: tuple[torch.Tensor, torch.Tensor] | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, kv = self.attn(x, past)
        x = self.norm1(x + y)
        if self.cross is not None:
            B, t, D = x.shape
            q = self.cross.q(x).view(B, t, self.cross.heads, D // self.cross.heads)
            # the layer's OpCalls (the model's backend / validate settings), as CrossAttention
            y = self.cross.ops.cross_attention(q, image_kv[0], image_kv[1], None)  # (B, t, H, Dh)
            x = self.norm_cross(x + self.cross.drop(self.cross.proj(y.reshape(B, t, D))))
        return self.norm2(x + self.mlp(x)), kv


class TextDecoder(nn.Module):
    """Causal text decoder conditioned on image tokens; ``forward`` returns logits (B, T, V).

    Args: the text encoder's sizes (``vocab_size``, ``dim``, ``heads``, ``intermediate``,
    ``max_len``, ``type_vocab_size``, ``eps``), ``text_depth`` layers without and
    ``fusion_depth`` layers with cross-attention to image tokens of width ``image_dim``;
    ``ops``: the model's :class:`semmim.layers.OpCalls` (how cross-attention calls the kernels).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        text_depth: int,
        fusion_depth: int,
        heads: int,
        intermediate: int,
        max_len: int,
        type_vocab_size: int,
        eps: float,
        image_dim: int,
        text_dropout: float = 0.0,
        fusion_dropout: float = 0.0,
        ops: OpCalls | None = None,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = dropout_layer(text_dropout)
        self.layers = nn.ModuleList(
            [
                DecoderLayer(dim, heads, intermediate, eps, None, text_dropout)
                for _ in range(text_depth)
            ]
            + [
                DecoderLayer(dim, heads, intermediate, eps, image_dim, fusion_dropout, ops)
                for _ in range(fusion_depth)
            ]
        )
        self.head = MLMHead(dim, self.word_embeddings, eps)

    @classmethod
    def from_encoders(
        cls, text: nn.Module, fusion: nn.Module, mlm_head: nn.Module, cfg
    ) -> TextDecoder:
        """A decoder initialised from a text encoder, fusion encoder and MLM head (copies).

        ``cfg``: the :class:`semmim.SemMIMConfig` they were built from.
        """
        t = cfg.text
        dec = cls(
            t.vocab_size,
            t.dim,
            t.depth,
            cfg.fusion.depth,
            t.heads,
            t.intermediate,
            t.max_len,
            t.type_vocab_size,
            t.layer_norm_eps,
            cfg.vision.dim,
            t.dropout,
            cfg.fusion.dropout,
            fusion.layers[0].cross.ops if len(fusion.layers) else None,  # the model's op calls
        )
        state = {}
        for k, v in text.state_dict().items():
            state[k] = v  # word/position/token-type embeddings, norm, layers.i.*
        for k, v in fusion.state_dict().items():
            _, i, rest = k.split(".", 2)  # layers.j.rest
            state[f"layers.{t.depth + int(i)}.{rest}"] = v
        for k, v in mlm_head.state_dict().items():
            state[f"head.{k}"] = v
        missing, unexpected = dec.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"decoder initialisation: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        return dec

    def forward(
        self,
        input_ids: torch.Tensor,
        image: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, t) → logits (B, t, V).

        Without ``cache``: the whole sequence, causally (training, uncached decoding); ``image``
        (B, L, Dv) is required. With a cache: ``input_ids`` are the next tokens after
        ``cache.length`` cached ones; the first call (empty cache) takes ``image`` and stores its
        cross-attention keys/values, later calls reuse them (``image`` ignored).
        """
        B, t = input_ids.shape
        t0 = cache.length if cache is not None else 0
        if t0 + t > self.max_len:
            raise ValueError(f"input_ids: {t0 + t} tokens > text.max_len={self.max_len}")
        if cache is not None and not cache.cross_kv:
            if image is None:
                raise ValueError("image: the first call with an empty cache needs image tokens")
            cache.cross_kv = [
                None if lay.cross is None else lay.image_kv(image) for lay in self.layers
            ]
            cache.self_kv = [None] * len(self.layers)
        if cache is None:
            if image is None:
                raise ValueError("image: image tokens (B, L, Dv) are required without a cache")
            cross = [None if lay.cross is None else lay.image_kv(image) for lay in self.layers]
        else:
            cross = cache.cross_kv
        pos = torch.arange(t0, t0 + t, device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings.weight[0]
        )
        x = self.drop(self.norm(x))
        for n, layer in enumerate(self.layers):
            past = cache.self_kv[n] if cache is not None else None
            x, kv = layer(x, cross[n], past)
            if cache is not None:
                cache.self_kv[n] = kv
        if cache is not None:
            cache.length = t0 + t
        return self.head(x)


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    image: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int = 20,
    beam_size: int = 1,
    use_cache: bool = True,
    length_penalty: float = 0.0,
) -> torch.Tensor:
    """Greedy (``beam_size=1``) or beam-search decoding. Returns token ids (B, <= max_len + 1).

    image (B, L, Dv) image tokens. Every sequence starts with ``bos_id``; after ``eos_id`` a
    sequence is padded with ``pad_id``. Beam search keeps the ``beam_size`` best prefixes by
    summed log-probability; a finished beam is carried on unchanged (its only continuation is
    [PAD] at log-probability 0). The best beam by score / length**``length_penalty`` is
    returned (0 = plain sum, as greedy). ``use_cache=False`` re-runs the whole prefix every
    step (for testing the cache).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size: must be >= 1, got {beam_size}")
    if max_len < 1:
        raise ValueError(f"max_len: must be >= 1, got {max_len}")
    B, K = image.shape[0], beam_size
    device = image.device
    image = image.repeat_interleave(K, 0)  # (B·K, L, Dv): beams of one image are adjacent
    tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one until the first step
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)
    cache = KVCache() if use_cache else None
    steps = min(max_len, decoder.max_len - 1)
    for _ in range(steps):
        if cache is not None:
            logits = decoder(tokens[:, -1:], image, cache)[:, -1]
        else:
            logits = decoder(tokens, image)[:, -1]
        logp = logits.float().log_softmax(-1)  # (B·K, V)
        V = logp.shape[-1]
        finished = torch.full_like(logp, float("-inf"))
        finished[:, pad_id] = 0.0
        logp = torch.where(done[:, None], finished, logp)
        total = (scores.view(B * K, 1) + logp).view(B, K * V)
        top, idx = total.topk(K, dim=1)  # (B, K) sorted best first
        beam, token = idx // V, idx % V
        rows = (torch.arange(B, device=device)[:, None] * K + beam).flatten()  # (B·K,)
        token = token.flatten()
        tokens = torch.cat([tokens[rows], token[:, None]], 1)
        lengths = lengths[rows] + (~done[rows]).float()
        done = done[rows] | (token == eos_id)
        scores = top
        if cache is not None:
            cache.reorder(rows)
        if bool(done.all()):
            break
    final = scores.flatten() / lengths.clamp(min=1) ** length_penalty
    best = final.view(B, K).argmax(1)
    return tokens.view(B, K, -1)[torch.arange(B, device=device), best]
