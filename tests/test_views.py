"""The on-device second view of ``glob.views="cross"`` (semmim/views.py) and the cross-view
global agreement in the model."""

from __future__ import annotations

import pytest
import torch

from semmim import build_model, from_preset, objectives
from semmim.views import apply_view, second_view, view_params

SMALL = {"vision.image_size": 32, "itc.queue_size": 16, "loss.mlm": 0.0}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def test_identity_and_mirror_maps_are_exact():
    images = torch.randn(2, 3, 8, 8)
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(2, 2, 3)
    mirror = torch.tensor([[-1.0, 0, 0], [0, 1, 0]]).expand(2, 2, 3)
    torch.testing.assert_close(apply_view(images, eye), images, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_view(images, mirror), images.flip(-1), rtol=0, atol=1e-6)


def test_a_half_crop_is_the_upsampled_quarter():
    """w = h = 1/2 at centre (−1/2, −1/2): the top-left quarter, upsampled ×2 (bilinear: the
    samples lie between the quarter's pixel centres and half a pixel beyond its far edges)."""
    images = torch.arange(64.0).view(1, 1, 8, 8)  # value = 8 · row + column
    theta = torch.tensor([[[0.5, 0, -0.5], [0, 0.5, -0.5]]])
    view = apply_view(images, theta)
    assert view.shape == images.shape
    # output pixel k samples input position (k + 0.5) / 2 − 0.5 along each axis (clamped at 0)
    pos = ((torch.arange(8.0) + 0.5) / 2 - 0.5).clamp(min=0)
    torch.testing.assert_close(view[0, 0], 8 * pos[:, None] + pos[None, :])


@pytest.mark.parametrize("crop_min", [0.4, 0.9])
def test_view_params_stay_inside_the_image_and_follow_the_seed(crop_min):
    theta = view_params(512, seed=7, crop_min=crop_min, device=torch.device("cpu"))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    cx, cy = theta[:, 0, 2], theta[:, 1, 2]
    assert (w <= 1).all() and (h <= 1).all() and (w > 0).all() and (h > 0).all()
    assert (cx.abs() + w <= 1 + 1e-6).all() and (cy.abs() + h <= 1 + 1e-6).all()
    assert (w * h >= crop_min * 3 / 4 - 1e-6).all()  # area ≥ crop_min up to the side clamp
    aspect = w / h
    assert (aspect >= 3 / 4 - 1e-5).all() and (aspect <= 4 / 3 + 1e-5).all()
    flipped = (theta[:, 0, 0] < 0).float().mean()
    assert 0.4 < flipped < 0.6
    torch.testing.assert_close(theta, view_params(512, 7, crop_min, torch.device("cpu")))
    assert not torch.equal(theta, view_params(512, 8, crop_min, torch.device("cpu")))


def test_second_view_keeps_shape_and_dtype():
    images = torch.randn(3, 3, 16, 16)
    for dtype in (torch.float32, torch.bfloat16):
        view = second_view(images.to(dtype), seed=1)
        assert view.shape == images.shape and view.dtype == dtype
        assert torch.isfinite(view.float()).all()


def test_cross_view_global_agreement_reads_the_second_view(monkeypatch):
    """views=cross: the teacher's CLS is the EMA's CLS of second_view(images, seed + 5);
    same: of the images themselves. Same seed → same loss; the loss differs between them."""
    torch.manual_seed(0)
    cfg = from_preset("tiny", {**SMALL, "glob.views": "cross"})
    model = build_model(cfg).eval()
    caps = ["a red circle", "a blue star", "two green squares", "a cross"]
    tok = model.tokenizer(caps, padding=True, return_tensors="pt")
    batch = (torch.randn(4, 3, 32, 32), tok["input_ids"], tok["attention_mask"])
    seen = []
    real = objectives.second_view
    monkeypatch.setattr(
        objectives, "second_view", lambda x, s, c: seen.append((s, c)) or real(x, s, c)
    )
    a = model(*batch, seed=11).losses["glob"]
    b = model(*batch, seed=11).losses["glob"]
    assert seen == [(16, 0.4), (16, 0.4)]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    same = build_model(from_preset("tiny", SMALL))
    same.load_state_dict(model.state_dict())
    c = same.eval()(*batch, seed=11).losses["glob"]
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="views"):
        from_preset("tiny", {"glob.views": "both"})
    with pytest.raises(ValueError, match="crop_min"):
        from_preset("tiny", {"glob.crop_min": 0.0})
