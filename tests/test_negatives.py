"""Hard negatives and contrastive targets that know image identity (issue 11 §2).

A batch can hold the same image twice (one record per caption, or the same pair drawn twice):
such pairs must never be each other's ITM "hard negative", and count as ITC positives."""

import pytest
import torch
import torch.nn.functional as F

from semmim import build_model, from_preset, objectives
from semmim.losses import itc_loss, sample_hard_negatives, soft_cross_entropy
from semmim.objectives import matching_pairs as _matching_pairs

# rows 0,1 show image 7; rows 2,3,4 image 3; row 5 image 9 (alone)
IDS = torch.tensor([7, 7, 3, 3, 3, 9])


def same_image(ids: torch.Tensor) -> torch.Tensor:
    return ids[:, None] == ids[None]


def test_excluded_columns_are_never_drawn_and_the_rest_follow_softmax():
    gen = torch.Generator().manual_seed(0)
    sim = 1.5 * torch.randn(6, 6, generator=gen)
    sim[0, 1] = sim[2, 3] = 8.0  # the duplicate is by far the most similar: still excluded
    exclude = same_image(IDS)
    n = 4000
    draws = torch.stack([sample_hard_negatives(sim, gen, exclude) for _ in range(n)])  # (n, 6)
    counts = F.one_hot(draws, 6).sum(0).double()  # (row, column)
    assert counts[exclude].sum() == 0
    expected = F.softmax(sim.double().masked_fill(exclude, float("-inf")), 1) * n
    allowed = ~exclude
    chi2 = ((counts - expected) ** 2 / expected.clamp_min(1e-12))[allowed].sum()
    dof = int(allowed.sum()) - 6  # per row: allowed columns − 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # ≈ p < 1e-4 for χ²(dof)


def test_a_row_with_every_column_excluded_falls_back_to_the_others():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(4, 4, generator=gen)
    everything = torch.ones(4, 4, dtype=torch.bool)
    for _ in range(50):
        neg = sample_hard_negatives(sim, gen, everything)
        assert (neg != torch.arange(4)).all() and ((neg >= 0) & (neg < 4)).all()
    with pytest.raises(ValueError, match=r"exclude: expected a \(4, 4\) bool tensor"):
        sample_hard_negatives(sim, gen, everything[:3])
    with pytest.raises(ValueError, match="sim: expected a"):
        sample_hard_negatives(sim[:1, :1], gen)


def test_matching_pairs_by_image_id_and_identical_caption():
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 5, 6, 102, 0], [101, 5, 7, 102, 0]] * 2)
    mask = (ids > 0).long()
    same = _matching_pairs(ids, mask.bool(), None)
    expect = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool).repeat(2, 2)
    assert torch.equal(same, expect)  # identical token rows match even without ids
    image_ids = torch.tensor([0, 1, 2, 3, 4, 2])  # rows 2 and 5: one image, one caption twice
    same = _matching_pairs(ids, mask.bool(), image_ids)
    assert torch.equal(same, expect | same_image(image_ids))


def test_itc_positives_split_the_target_mass():
    gen = torch.Generator().manual_seed(0)
    B, Q = 6, 5
    s = [torch.randn(B, B + Q, generator=gen) for _ in range(4)]
    pos = same_image(IDS)
    alpha = 0.4
    got = itc_loss(*s, alpha, pos)
    hard = torch.zeros(B, B + Q)
    hard[:, :B] = pos.float() / pos.float().sum(1, keepdim=True)
    ref = (
        soft_cross_entropy(s[0], alpha * F.softmax(s[2], 1) + (1 - alpha) * hard).mean()
        + soft_cross_entropy(s[1], alpha * F.softmax(s[3], 1) + (1 - alpha) * hard).mean()
    ) / 2
    torch.testing.assert_close(got, ref)
    eye = torch.eye(B, dtype=torch.bool)
    torch.testing.assert_close(itc_loss(*s, alpha, eye), itc_loss(*s, alpha))
    with pytest.raises(ValueError, match="positives: expected a"):
        itc_loss(*s, alpha, pos.float())


def duplicated_batch(model):
    """6 pairs: rows 0/1 the same (image, caption) twice; rows 2,3,4 one image with three
    captions (4 repeats 2's caption); row 5 alone."""
    S = model.cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 3, S, S, generator=g)
    images = img[torch.tensor([0, 0, 1, 1, 1, 2])]
    caps = ["a red circle", "a red circle", "two squares", "a blue thing", "two squares", "sky"]
    enc = model.tokenizer(caps, padding=True, return_tensors="pt")
    return images, enc["input_ids"], enc["attention_mask"]


def test_model_never_draws_a_duplicate_as_hard_negative(monkeypatch):
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", **{"loss.mlm": 0.0, "loss.glob": 0.0, "loss.mim": 0.0}))
    images, ids, am = duplicated_batch(model)
    drawn = []

    def spy(sim, generator=None, exclude=None):
        out = sample_hard_negatives(sim, generator, exclude)
        drawn.append(out)
        return out

    monkeypatch.setattr("semmim.objectives.sample_hard_negatives", spy)
    matches = same_image(IDS)
    for seed in range(40):
        model(images, ids, am, seed=seed, image_ids=IDS)
    assert len(drawn) == 80  # per forward: one text per image, one image per text
    rows = torch.arange(6)
    for neg in drawn:
        assert not matches[rows, neg].any(), neg
    # Without ids only identical captions are known: the exact duplicate (rows 0/1) is still
    # never drawn, which is the common case (one record drawn twice).
    drawn.clear()
    for seed in range(40):
        model(images, ids, am, seed=seed)
    for neg in drawn:
        assert neg[0] != 1 and neg[1] != 0 and neg[2] != 4 and neg[4] != 2


def test_itm_rows_without_any_negative_are_left_out():
    """Every pair shows the same image: no row has a negative, only the positives are scored."""
    torch.manual_seed(0)
    model = build_model(from_preset("tiny")).eval()
    images, ids, am = duplicated_batch(model)
    net = model.net
    with torch.no_grad():
        v, t = net.vision(images), net.text(ids, am)
        fi = F.normalize(net.vision_proj(v[:, 0]), dim=-1)
        ft = F.normalize(net.text_proj(t[:, 0]), dim=-1)
        everything = torch.ones(6, 6, dtype=torch.bool)
        loss = objectives.itm(
            net,
            v,
            t,
            am.bool(),
            fi,
            ft,
            torch.Generator().manual_seed(0),
            model._temperature(),
            everything,
        )
        positives = net.itm_head(net.fusion(t, am, v)[:, 0])
        ref = F.cross_entropy(positives, torch.ones(6, dtype=torch.long))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    out = model(images, ids, am, seed=0, image_ids=torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(out.losses["itm"]) and torch.isfinite(out.losses["itc"])


@pytest.mark.parametrize(
    "bad", [torch.zeros(5, dtype=torch.long), torch.zeros(6), torch.zeros(6, 1, dtype=torch.long)]
)
def test_bad_image_ids_name_the_argument(bad):
    model = build_model(from_preset("tiny"))
    with pytest.raises(ValueError, match=r"image_ids: expected a \(6,\) integer tensor"):
        model(*duplicated_batch(model), image_ids=bad)


def test_itc_queue_positives_split_the_target_mass_with_the_batch():
    gen = torch.Generator().manual_seed(1)
    B, Q = 6, 5
    s = [torch.randn(B, B + Q, generator=gen) for _ in range(4)]
    inbatch = same_image(IDS)
    queued = torch.zeros(B, Q, dtype=torch.bool)
    queued[0, 2] = queued[1, 2] = queued[5, [0, 4]] = True
    pos = torch.cat([inbatch, queued], 1)
    alpha = 0.3
    hard = pos.float() / pos.float().sum(1, keepdim=True)
    ref = (
        soft_cross_entropy(s[0], alpha * F.softmax(s[2], 1) + (1 - alpha) * hard).mean()
        + soft_cross_entropy(s[1], alpha * F.softmax(s[3], 1) + (1 - alpha) * hard).mean()
    ) / 2
    torch.testing.assert_close(itc_loss(*s, alpha, pos), ref)
    # no queued positive = the (B, B) form
    empty = torch.cat([inbatch, torch.zeros(B, Q, dtype=torch.bool)], 1)
    torch.testing.assert_close(itc_loss(*s, alpha, empty), itc_loss(*s, alpha, inbatch))
    with pytest.raises(ValueError, match=r"\(6, 6\) or \(6, 11\)"):
        itc_loss(*s, alpha, pos[:, :-1])


def test_queue_keeps_image_ids_and_treats_them_as_positives(monkeypatch):
    torch.manual_seed(0)
    cfg = from_preset("tiny", **{"loss.mlm": 0.0, "itc.queue_size": 12})
    model = build_model(cfg)
    images, ids, am = duplicated_batch(model)
    assert torch.equal(model.id_queue, torch.full((12,), -1))
    model(images, ids, am, seed=0, image_ids=IDS + 100)
    assert model.id_queue[:6].tolist() == (IDS + 100).tolist() and (model.id_queue[6:] == -1).all()
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return itc_loss(*args)

    monkeypatch.setattr("semmim.objectives.itc_loss", spy)
    model(images, ids, am, seed=1, image_ids=IDS + 100)
    pos = seen[-1]
    assert pos.shape == (6, 18)
    # queued column j (of the first batch) is a positive of row i exactly when the ids match
    queue_then = torch.cat([IDS + 100, torch.full((6,), -1)])
    assert torch.equal(pos[:, 6:], (IDS + 100)[:, None] == queue_then[None])
    assert int(pos[:, 6:].sum()) == 2 + 2 + 3 + 3 + 3 + 1  # the first batch's same-image pairs
    model(images, ids, am, seed=2)  # without ids: entries -1, never positives
    assert (model.id_queue[0:6] == -1).all()  # the pointer wrapped to slot 0 after 12
    with pytest.raises(ValueError, match="image_ids: must be >= 0"):
        model(images, ids, am, seed=3, image_ids=IDS - 4)


def test_state_dict_without_id_queue_loads_with_empty_ids():
    model = build_model(from_preset("tiny"))
    state = model.state_dict()
    del state["id_queue"]
    other = build_model(from_preset("tiny"))
    other.id_queue.fill_(7)
    other.load_state_dict(state)
    assert (other.id_queue == -1).all()
