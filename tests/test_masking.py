"""Image masks (text-guided and random) and BERT MLM masking: invariants and determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from semmim import build_model, from_preset
from semmim.masking import mlm_mask, mlm_positions, random_mask, text_guided_mask


def check_invariants(keep_idx, mask_idx, mask, P, M):
    B = mask.shape[0]
    assert keep_idx.shape == (B, P - M) and mask_idx.shape == (B, M) and mask.shape == (B, P)
    assert keep_idx.dtype == mask_idx.dtype == torch.int64 and mask.dtype == torch.bool
    for idx in (keep_idx, mask_idx):
        if idx.shape[1] > 1:
            assert (idx[:, 1:] > idx[:, :-1]).all(), "not strictly ascending"
    both = torch.cat([keep_idx, mask_idx], 1).sort(1).values
    assert torch.equal(both, torch.arange(P).expand(B, P)), "not a disjoint cover of 0..P-1"
    assert torch.equal(mask.sum(1), torch.full((B,), M))
    assert mask.gather(1, mask_idx).all() and not mask.gather(1, keep_idx).any()


@pytest.mark.parametrize(
    "B, P, ratio",
    [(1, 1, 0.0), (2, 4, 0.5), (3, 49, 0.75), (2, 196, 0.5), (4, 16, 0.4), (2, 9, 0.5)],
)
@pytest.mark.parametrize("tau", [0.0, 0.1, 5.0])
def test_text_guided_invariants(B, P, ratio, tau):
    g = torch.Generator().manual_seed(P)
    patch, text = torch.randn(B, P, 8, generator=g), torch.randn(B, 8, generator=g)
    M = round(ratio * P)
    keep, midx, mask = text_guided_mask(patch, text, M, tau=tau, seed=3)
    check_invariants(keep, midx, mask, P, M)


@pytest.mark.parametrize("B, P, M", [(1, 1, 0), (2, 16, 8), (3, 196, 98), (2, 9, 4)])
def test_random_invariants(B, P, M):
    check_invariants(*random_mask(B, P, M, seed=0, device="cpu"), P, M)


def test_noise_off_masks_the_most_similar_patches():
    g = torch.Generator().manual_seed(0)
    B, P, d, M = 4, 49, 16, 20
    patch, text = torch.randn(B, P, d, generator=g), torch.randn(B, d, generator=g)
    keep, midx, mask = text_guided_mask(patch, text, M, tau=0.0, seed=0)
    s = F.cosine_similarity(patch, text[:, None], dim=-1)  # (B, P)
    expected = s.topk(M, dim=1).indices.sort(1).values
    assert torch.equal(midx, expected)
    # every masked patch is at least as similar as every kept one
    assert (s.gather(1, midx).min(1).values >= s.gather(1, keep).max(1).values).all()


def test_low_temperature_follows_similarity_high_temperature_is_random():
    g = torch.Generator().manual_seed(1)
    B, P, d, M = 64, 16, 8, 4
    patch, text = torch.randn(B, P, d, generator=g), torch.randn(B, d, generator=g)
    s = F.cosine_similarity(patch, text[:, None], dim=-1)
    top = torch.zeros(B, P, dtype=torch.bool).scatter_(1, s.topk(M, 1).indices, True)
    hit_low = (text_guided_mask(patch, text, M, tau=0.01, seed=2)[2] & top).sum() / (B * M)
    hit_high = (text_guided_mask(patch, text, M, tau=100.0, seed=2)[2] & top).sum() / (B * M)
    assert hit_low > 0.95
    assert hit_high < 0.5  # random would give M/P = 0.25


def test_masks_are_deterministic_given_seed():
    patch, text = torch.randn(2, 36, 8), torch.randn(2, 8)
    a = text_guided_mask(patch, text, 18, tau=1.0, seed=7)
    b = text_guided_mask(patch, text, 18, tau=1.0, seed=7)
    c = text_guided_mask(patch, text, 18, tau=1.0, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    r1, r2 = (
        random_mask(4, 36, 18, seed=5, device="cpu"),
        random_mask(4, 36, 18, seed=5, device="cpu"),
    )
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    assert not torch.equal(r1[1], random_mask(4, 36, 18, seed=6, device="cpu")[1])


SPECIAL = torch.tensor([0, 101, 102, 103])


def test_mlm_never_touches_special_or_padding_tokens():
    B, T = 64, 20
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    ids[:, 0], ids[:, 15] = 101, 102
    ids[:, 16:] = 0
    am = (ids != 0).long()
    out, labels = mlm_mask(
        ids,
        am,
        prob=0.5,
        mask_frac=0.8,
        random_frac=0.1,
        mask_token_id=103,
        vocab_size=30522,
        special_ids=SPECIAL,
        generator=g,
    )
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 15:].any()
    assert torch.equal(out[:, [0, 15]], ids[:, [0, 15]]) and torch.equal(out[:, 16:], ids[:, 16:])
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])


def test_mlm_chooses_round_prob_n_per_caption_and_positions_cover_them():
    g = torch.Generator().manual_seed(2)
    B, T = 32, 24
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    lengths = torch.randint(1, T - 1, (B,), generator=g)  # real tokens between [CLS] and [SEP]
    ar = torch.arange(T)
    ids[:, 0] = 101
    ids[ar.expand(B, T) == lengths[:, None] + 1] = 102
    ids[ar > lengths[:, None] + 1] = 0
    am = (ids != 0).long()
    _, labels = mlm_mask(
        ids,
        am,
        prob=0.15,
        mask_frac=0.8,
        random_frac=0.1,
        mask_token_id=103,
        vocab_size=30522,
        special_ids=SPECIAL,
        generator=g,
    )
    expected = (0.15 * lengths).round().clamp_min(1)
    assert torch.equal((labels != -100).sum(1), expected.long())
    pos = mlm_positions(labels, 0.15)
    assert pos.shape == (B, math.ceil(0.15 * T))
    assert (pos[:, 1:] > pos[:, :-1]).all()
    picked = labels.gather(1, pos)
    assert torch.equal((picked != -100).sum(1), (labels != -100).sum(1))


def test_mlm_rates_follow_80_10_10():
    B, T = 256, 64
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    am = torch.ones_like(ids)
    out, labels = mlm_mask(
        ids,
        am,
        prob=0.15,
        mask_frac=0.8,
        random_frac=0.1,
        mask_token_id=103,
        vocab_size=30522,
        special_ids=SPECIAL,
        generator=g,
    )
    chosen = labels != -100
    n = chosen.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.01
    masked = (out == 103) & chosen
    unchanged = (out == ids) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    # "random" replacements may by chance equal the original token (p = 1/V), hence ~0.1
    assert abs(unchanged.sum().item() / n - 0.1) < 0.03
    assert abs((chosen & ~masked & ~unchanged).sum().item() / n - 0.1) < 0.03


# ---------------------------------------------------------------- inside the model


def _batch(model, B=4):
    caps = ["a red square", "a green circle on grass", "blue sky", "a yellow cat"][:B]
    enc = model.tokenizer(caps, padding=True, return_tensors="pt")
    S = model.cfg.vision.image_size
    images = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(0))
    return images, enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("strategy", ["text_guided", "random"])
def test_model_mask_invariants_and_seed(strategy):
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", **{"masking.strategy": strategy}))
    batch = _batch(model)
    a, b = model(*batch, seed=11), model(*batch, seed=11)
    P, M = model.cfg.vision.num_patches, model.cfg.num_masked
    assert M == round(model.cfg.masking.ratio * P)
    check_invariants(a.keep_idx, a.mask_idx, a.mask, P, M)  # patch indices: CLS is not in them
    assert torch.equal(a.mask_idx, b.mask_idx)
    model.eval()  # no queue/centre updates: same seed, same losses
    c, d = model(*batch, seed=3), model(*batch, seed=3)
    for k in c.losses:
        assert torch.equal(c.losses[k], d.losses[k]), k


def test_model_text_guided_mask_uses_momentum_similarity():
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", **{"masking.tau": 0.0}))
    images, ids, am = _batch(model)
    out = model(images, ids, am, seed=0)
    with torch.no_grad():
        v = model.ema.vision(images)
        patch = model.ema.vision_proj(v[:, 1:])
        text = model.ema.text_proj(model.ema.text(ids, am)[:, 0])
        s = F.cosine_similarity(patch, text[:, None], dim=-1)
    expected = s.topk(model.cfg.num_masked, dim=1).indices.sort(1).values
    assert torch.equal(out.mask_idx, expected)
