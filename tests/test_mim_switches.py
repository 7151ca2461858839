"""Issue 17's model switches: ψ's bound (``mim.psi_scale``, ``mim.psi_max_ratio``), the MIM
loss's stop-gradient into the text encoder (``mim.text_grad``), the trained patch score of
text-guided masking (``masking.score=patch`` + ``loss.patch``) and the cosine momentum schedule's
form. Mixed precision, host reads and torch.compile of each: tests/test_gpu_path.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semmim import build_model, from_preset, objectives
from semmim.diagnostics import objective_grad_norms

SMALL = {"vision.image_size": 32, "itc.queue_size": 16, "loss.mlm": 0.0}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def _model(overrides=None, seed=0):
    torch.manual_seed(seed)
    return build_model(from_preset("tiny", {**SMALL, **(overrides or {})}))


def _batch(model, B=4):
    captions = ["a red circle", "a blue star on the left", "two green squares", "a cross"][:B]
    tok = model.tokenizer(captions, padding=True, return_tensors="pt")
    S = model.cfg.vision.image_size
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 3, S, S, generator=g), tok["input_ids"], tok["attention_mask"]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("mim.psi_scale", -0.1, "psi_scale"),
        ("mim.psi_max_ratio", -1.0, "psi_max_ratio"),
        ("mim.text_grad", "no", "text_grad"),
        ("masking.score", "fusion", "score"),
        ("masking.patch_pool_temp", 0.0, "patch_pool_temp"),
        ("loss.patch", -1.0, "patch"),
    ],
)
def test_new_keys_are_validated_by_name(key, value, match):
    with pytest.raises(ValueError, match=match):
        from_preset("tiny", {key: value})


def test_patch_score_needs_its_loss():
    with pytest.raises(ValueError, match="masking.score.*loss.patch"):
        from_preset("tiny", {"masking.score": "patch", "loss.patch": 0.0})
    assert from_preset("tiny", {"masking.score": "patch"}).loss.patch == 1.0


def test_defaults_are_unchanged_spec_values():
    cfg = from_preset("tiny")
    assert (cfg.mim.psi_scale, cfg.mim.psi_max_ratio, cfg.mim.text_grad) == (1.0, 0.0, True)
    assert (cfg.masking.score, cfg.glob.views) == ("itc", "same")
    assert build_model(cfg).net.patch_proj is None


# ------------------------------------------------------------------------------------------ ψ
def _psi(model, v, text, mask):
    with torch.no_grad():
        return objectives.teacher_inputs(model.ema, model.cfg.mim, v, text, mask.bool())


def test_psi_scale_scales_the_text_residual():
    base = _model()
    images, ids, mask = _batch(base)
    with torch.no_grad():
        v = base.ema.vision(images)[:, 1:]
        text = base.ema.text(ids, mask)
        residual = base.ema.predictor.text_residual(v, text, mask)
    full = _psi(base, v, text, mask)
    torch.testing.assert_close(full, base.ema.predictor.cross_step(v, text, mask))  # spec
    for scale in (0.0, 0.25):
        m = _model({"mim.psi_scale": scale})
        torch.testing.assert_close(_psi(m, v, text, mask), v + scale * residual)
    off = _model({"mim.text_in_target": False})
    torch.testing.assert_close(
        _psi(_model({"mim.psi_scale": 0.0}), v, text, mask), _psi(off, v, text, mask)
    )


@pytest.mark.parametrize("ratio", [0.1, 0.5, 100.0])
def test_psi_max_ratio_caps_the_residual_per_patch(ratio):
    m = _model({"mim.psi_max_ratio": ratio})
    images, ids, mask = _batch(m)
    with torch.no_grad():
        v = m.ema.vision(images)[:, 1:]
        text = m.ema.text(ids, mask)
        residual = m.ema.predictor.text_residual(v, text, mask)
    added = _psi(m, v, text, mask) - v
    r = added.norm(dim=-1) / v.norm(dim=-1)
    assert (r <= ratio * (1 + 1e-4)).all()
    # never scaled up: where the residual was already below the cap it is unchanged
    below = residual.norm(dim=-1) <= ratio * v.norm(dim=-1)
    torch.testing.assert_close(added[below], residual[below], rtol=1e-5, atol=1e-6)
    if ratio < 1:  # at init the residual is ~0.9 of the patch: the cap binds somewhere
        assert (~below).any()
        cos = F.cosine_similarity(added, residual, dim=-1)
        assert (cos > 0.9999).all()  # direction kept, only the length changes


# ------------------------------------------------------------------------------- text_grad
def test_text_grad_false_stops_the_mim_gradient_into_the_text_encoder():
    norms = {}
    for text_grad in (True, False):
        m = _model({"mim.text_grad": text_grad}).train()
        out = m(*_batch(m), seed=4)
        towers = {"vision": m.net.vision, "text": m.net.text}
        norms[text_grad] = {
            k: float(v) for k, v in objective_grad_norms(out.losses, m.cfg.loss, towers).items()
        }
        torch.testing.assert_close(out.losses["mim"], out.losses["mim"])  # finite, computed
    assert norms[True]["diag_grad_mim_text"] > 0
    assert norms[False]["diag_grad_mim_text"] == 0.0
    assert norms[False]["diag_grad_mim_vision"] > 0
    assert norms[False]["diag_grad_itc_text"] > 0  # the other objectives still train it


def test_text_grad_false_keeps_the_forward_values():
    a, b = _model(), _model({"mim.text_grad": False})
    batch = _batch(a)
    la, lb = a.eval()(*batch, seed=2).losses, b.eval()(*batch, seed=2).losses
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------- patch score
def _naive_patch_alignment(patch, text, same, pool_temp, temp):
    B = patch.shape[0]
    logits = torch.empty(B, B)
    for i in range(B):
        for j in range(B):
            c = patch[i] @ text[j]  # (L,)
            logits[i, j] = (torch.softmax(c / pool_temp, 0) * c).sum() / temp
    loss = 0.0
    for direction in (logits, logits.T):
        for i in range(B):
            pos = same[i].float() / same[i].float().sum()
            loss = loss - (pos * torch.log_softmax(direction[i], 0)).sum() / B
    return loss / 2


def test_patch_alignment_matches_a_naive_loop():
    m = _model({"masking.score": "patch"})
    images, ids, mask = _batch(m)
    image_embeds = m.net.vision(images)
    text_feat = objectives.unit(m.net.text_proj(m.net.text(ids, mask)[:, 0]))
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # pairs 0 and 1 show one image
    temp = torch.tensor(0.07)
    got = objectives.patch_alignment(m.cfg, m.net, image_embeds, text_feat, temp, same)
    patch = objectives.unit(m.net.patch_proj(image_embeds[:, 1:]))
    want = _naive_patch_alignment(patch, text_feat, same, m.cfg.masking.patch_pool_temp, 0.07)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert m.net.patch_proj.weight.grad.abs().sum() > 0


def test_patch_score_masks_with_patch_proj_and_the_loss_is_logged():
    m = _model({"masking.score": "patch"}).train()
    images, ids, mask = _batch(m)
    out = m(images, ids, mask, seed=3)
    assert "patch" in out.losses and math.isfinite(float(out.losses["patch"]))
    # the mask is the hard top-M of cos(ema.patch_proj(patch), text) at tau = 0
    hard = _model({"masking.score": "patch", "masking.tau": 0.0}).eval()
    hard.load_state_dict(m.state_dict())
    out = hard(images, ids, mask, seed=3)
    scores = objectives.text_patch_scores(hard.cfg, hard.ema, images, ids, mask)
    top = scores.topk(hard.cfg.num_masked, dim=1).indices.sort(1).values
    torch.testing.assert_close(out.mask_idx, top)
    itc_scores = objectives.text_patch_scores(_model().cfg, hard.ema, images, ids, mask)
    assert not torch.allclose(scores, itc_scores)  # a different projection


def test_patch_loss_raises_object_patches_on_a_toy_problem():
    """Four images, each a 'background' of shared patches plus one object patch that only its
    caption describes: a few steps of the patch loss alone on ``patch_proj`` (features fixed)
    put the object patch at the top of the text-guided score."""
    torch.manual_seed(0)
    m = _model({"masking.score": "patch"})
    E, D = m.cfg.itc.embed_dim, m.cfg.vision.dim
    B, P = 4, m.cfg.vision.num_patches
    background = torch.randn(1, 1, D).expand(B, P, D).clone()
    objects = torch.randn(B, D)
    where = torch.tensor([0, 1, 2, 3])
    background[torch.arange(B), where] = objects
    tokens = torch.cat([torch.zeros(B, 1, D), background], dim=1)  # (B, P+1, D)
    text = F.normalize(torch.randn(B, E), dim=-1)
    opt = torch.optim.Adam(m.net.patch_proj.parameters(), lr=1e-2)
    same = torch.eye(B, dtype=torch.bool)
    for _ in range(60):
        loss = objectives.patch_alignment(m.cfg, m.net, tokens, text, torch.tensor(0.07), same)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = objectives.unit(m.net.patch_proj(tokens[:, 1:])) @ text.T  # (B, P, B)
        own = scores[torch.arange(B), :, torch.arange(B)]  # (B, P) vs its own caption
    assert torch.equal(own.argmax(1), where)


# -------------------------------------------------------------------------------- momentum
def test_cosine_momentum_is_dino_form():
    """DINO / iBOT: m(k) = 1 − (1 − m0)·(cos(πk/K) + 1)/2, from m0 = 0.996 to 1 over the run."""
    m = _model({"momentum.schedule": "cosine", "momentum.momentum": 0.996})
    K = 40
    for k in range(K + 1):
        m.set_step(k, K)
        want = 1 - (1 - 0.996) * (math.cos(math.pi * k / K) + 1) / 2
        assert math.isclose(m.momentum, want, rel_tol=0, abs_tol=1e-12)
