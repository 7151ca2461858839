"""Training diagnostics (issue 13 §2), the MIM-centre / ψ-norm switches (§3) and the split seed."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
from run_helpers import small_run

from semmim import build_model, from_preset, objectives
from semmim.diagnostics import (
    COVERAGE_COLUMNS,
    DIAG_COLUMNS,
    GRAD_COLUMNS,
    blank_images,
    check_ranges,
    coverage_overlap,
    head_diagnostics,
    mask_overlap,
    objective_grad_norms,
)
from semmim.run_config import TrainConfig
from semmim.train import Task, resume_changes, setup, train, train_step

SMALL = {"vision.image_size": 32, "itc.queue_size": 16, "loss.mlm": 0.0}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def _tcfg(out, **kw) -> TrainConfig:
    return small_run(out, **{"data": "synthetic:24:8", "steps": 3, **kw})


def _batch(model, B=4):
    captions = ["a red circle", "a blue star on the left", "two green squares", "a cross"][:B]
    tok = model.tokenizer(captions, padding=True, return_tensors="pt")
    S = model.cfg.vision.image_size
    return torch.randn(B, 3, S, S), tok["input_ids"], tok["attention_mask"]


# ------------------------------------------------------------------------------- the functions
def test_head_diagnostics_on_known_distributions():
    K, N = 16, 32
    zeros = torch.zeros(N, K)
    d = head_diagnostics("glob", zeros, zeros, torch.zeros(K), 0.04)  # uniform teacher
    assert d["diag_glob_entropy"].item() == pytest.approx(math.log(K), rel=1e-5)
    assert d["diag_glob_eff_k"].item() == pytest.approx(K, rel=1e-4)
    # Every row's target on prototype 3: collapse (entropy 0, effective K 1, one in use).
    t = torch.zeros(N, K)
    t[:, 3] = 1.0
    d = head_diagnostics("mim", t, t, torch.zeros(K), 0.01)
    assert d["diag_mim_entropy"].item() == pytest.approx(0.0, abs=1e-3)
    assert d["diag_mim_eff_k"].item() == pytest.approx(1.0, abs=1e-3)
    assert d["diag_mim_used"].item() == 1.0 and d["diag_mim_agree"].item() == 1.0
    # Row i targets prototype i % K (all K in use, effective K = K); student agrees on half.
    t = torch.nn.functional.one_hot(torch.arange(N) % K, K).float() * 10
    s = t.clone()
    s[: N // 2] = s[: N // 2].roll(1, dims=1)
    d = head_diagnostics("glob", s, t, torch.zeros(K), 0.04)
    assert d["diag_glob_used"].item() == K
    assert d["diag_glob_eff_k"].item() == pytest.approx(K, rel=1e-3)
    assert d["diag_glob_agree"].item() == pytest.approx(0.5)
    # The centre is subtracted before the argmax and the softmax.
    center = torch.zeros(K)
    center[3] = 100.0
    t = torch.zeros(N, K)
    t[:, 3] = 1.0
    t[:, 5] = 0.5
    d = head_diagnostics("glob", t, t, center, 0.04)
    assert d["diag_glob_agree"].item() == 0.0  # the centred target's mode is 5, the student's 3


def test_mask_overlap_measures_how_far_the_text_moves_the_mask():
    """Against the random mask of the same noise: 1 when the text scores every patch alike
    (or strategy=random), towards M/P as the text score dominates the noise."""
    from semmim import kernels
    from semmim.masking import random_mask, text_guided_mask

    B, P, M, d = 256, 16, 8, 8
    noise = kernels.gumbel_noise((B, P), seed=4)
    _, _, rand = random_mask(B, P, M, noise=noise, device="cpu")
    assert mask_overlap(rand, M, noise=noise)["diag_mask_overlap"].item() == 1.0
    text = torch.randn(B, d)
    patches = torch.randn(B, P, d)
    flat = text[:, None].expand(B, P, d).contiguous()  # every patch scores the same
    values = []
    for feats in (flat, patches):
        for tau in (10.0, 0.1, 0.003):
            mask = text_guided_mask(feats, text, M, tau=tau, noise=noise)[2]
            values.append(mask_overlap(mask, M, noise=noise)["diag_mask_overlap"].item())
    assert values[:3] == [1.0, 1.0, 1.0]  # the text says nothing: the noise's mask
    assert values[3] > values[4] > values[5]  # a sharper text score moves the mask further
    assert values[5] == pytest.approx(M / P, abs=0.06)  # text-dominated: as independent


def test_mask_overlap_of_random_masks_is_m_over_p():
    from semmim.masking import random_mask

    B, P, M = 4000, 16, 4
    _, _, mask = random_mask(B, P, M, seed=1, device="cpu")
    assert mask_overlap(mask, M, seed=1)["diag_mask_overlap"].item() == 1.0  # same seed: same mask
    value = mask_overlap(mask, M, seed=2)["diag_mask_overlap"].item()
    assert value == pytest.approx(M / P, abs=0.01)


def test_check_ranges_flags_values_out_of_range():
    assert check_ranges({"diag_glob_entropy": 1.0, "diag_mim_agree": 0.5}, 8) == []
    bad = check_ranges({"diag_glob_entropy": 3.0, "diag_mim_eff_k": 0.5, "diag_mim_agree": 2}, 8)
    assert len(bad) == 3


# ------------------------------------------------------------------------------- in the model
def test_forward_diagnostics_only_when_asked_and_without_host_reads(monkeypatch):
    from test_gpu_path import count_host_reads

    import semmim.model as M
    import semmim.objectives as O

    calls = []
    for module, name in ((O, "head_diagnostics"), (M, "mask_overlap")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k)
        )
    model = build_model(from_preset("tiny", SMALL)).train()
    batch = _batch(model)
    out = model(*batch, seed=1, check_inputs=False)
    assert out.diagnostics == {} and calls == []  # a plain step does no diagnostic work
    with count_host_reads() as reads:
        out = model(*batch, seed=2, check_inputs=False, diagnostics=True)
    assert reads == [], reads[0]
    assert sorted(calls) == ["head_diagnostics", "head_diagnostics", "mask_overlap"]
    assert set(out.diagnostics) == set(DIAG_COLUMNS)
    assert all(v.dim() == 0 for v in out.diagnostics.values())
    assert check_ranges({k: v.item() for k, v in out.diagnostics.items()}, 256) == []
    # The ALBEF baseline has no prototype heads and no mask: no diagnostics, no error.
    albef = build_model(from_preset("tiny", {**SMALL, "mim.enabled": False})).train()
    assert albef(*batch, seed=1, diagnostics=True).diagnostics == {}


def test_training_log_has_diagnostic_columns_in_range_and_a_plot(tmp_path):
    train(from_preset("tiny", SMALL), _tcfg(tmp_path, steps=4, diag_every=2))
    with open(tmp_path / "log.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert set(DIAG_COLUMNS) | set(GRAD_COLUMNS) <= set(reader.fieldnames)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    # the objectives this run has (MLM off, no patch loss) reach the towers they reach
    grads = [c for c in GRAD_COLUMNS if "_mlm_" not in c and "_patch_" not in c]
    for r in rows:  # diag_every=2: steps 2 and 4 carry them, 1 and 3 leave the cells empty
        filled = [r[c] != "" for c in (*DIAG_COLUMNS, *grads)]
        assert all(filled) if int(r["step"]) % 2 == 0 else not any(filled), r
        assert check_ranges(r, 256) == []
        assert float(r["loss"]) > 0
    assert os.path.exists(tmp_path / "diagnostics.png") and os.path.exists(tmp_path / "loss.png")


def test_non_diagnostic_steps_do_not_ask_the_model(tmp_path, monkeypatch):
    asked = []
    real = Task.loss

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("diagnostics", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Task, "loss", spy)
    run = setup(from_preset("tiny", SMALL), _tcfg(tmp_path, steps=6, log_every=3))
    results = [train_step(run, check_inputs=i == 0) for i in range(6)]
    run.stream.close()
    assert asked == [False, False, True, False, False, True]  # diag_every 0 = log_every (3)
    assert [bool(r["diagnostics"]) for r in results] == asked
    assert not any(k.startswith("diag_") for r in results for k in r["losses"])


@pytest.mark.parametrize(
    "sets",
    [{}, {"masking.score": "patch", "glob.views": "cross", "mim.psi_max_ratio": 0.5}],
    ids=["default", "issue17_switches"],
)
def test_diagnostic_steps_leave_the_training_trajectory_unchanged(tmp_path, sets):
    """Diagnostics (blank-image/rolled-caption probes, per-objective gradient norms, coverage)
    on every other step train the same weights as a run without any: they draw no random
    numbers the training uses, write no .grad and move no centre or queue. A grid may therefore
    vary --diag-every between runs it compares."""

    def run_(out, **kw):
        run = setup(from_preset("tiny", {**SMALL, **sets}), _tcfg(out, steps=6, **kw))
        results = [train_step(run, check_inputs=i == 0) for i in range(6)]
        run.stream.close()
        state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return results, state

    r_diag, s_diag = run_(tmp_path / "diag", log_every=1, diag_every=2)
    r_plain, s_plain = run_(tmp_path / "plain", log_every=100, diag_every=100)
    assert any(k.startswith("diag_grad_") for k in r_diag[1]["diagnostics"])  # they did run
    assert not any(r["diagnostics"] for r in r_plain)
    for a, b in zip([r["losses"] for r in r_diag], [r["losses"] for r in r_plain]):
        for k in b:
            assert float(a[k]) == float(b[k]), k
    assert s_diag.keys() == s_plain.keys()
    for k in s_plain:
        assert torch.equal(s_diag[k], s_plain[k]), k


# ------------------------------------------------------------------------- issue 17's probes
def test_mim_reliance_matches_a_direct_recomputation():
    """Blank-image / rolled-caption agreement and the teacher's caption flips, recomputed here
    from the towers (eval mode: the centre does not move)."""
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", SMALL)).eval()
    model.mim_center.normal_(std=0.02)  # a non-zero centre: the codes must subtract it
    images, ids, mask = batch = _batch(model)
    out = model(*batch, seed=9, diagnostics=True)
    d = {k: float(v) for k, v in out.diagnostics.items()}
    net, ema, cfg = model.net, model.ema, model.cfg
    keys = mask.bool()
    with torch.no_grad():
        v = torch.stack([ema.vision(images)[b, 1:][out.mask_idx[b]] for b in range(4)])
        text_m = ema.text(ids, mask)

        def teacher(text, k):
            z = objectives.teacher_inputs(ema, cfg.mim, v, text, k)
            return (ema.head(z) - model.mim_center).argmax(-1)

        def student(imgs, text, k):
            _, x = objectives.masked_view(cfg, model.ops, net, imgs, out.keep_idx, out.mask)
            pred = net.predictor(x, text, k)[:, 1:]
            pred = torch.stack([pred[b][out.mask_idx[b]] for b in range(4)])
            return net.head(pred).argmax(-1)

        codes = teacher(text_m, keys)
        text = net.text(ids, mask)
        blank = student(blank_images(images), text, keys)
        rolled = student(images, text.roll(1, 0), keys.roll(1, 0))
        flips = teacher(text_m.roll(1, 0), keys.roll(1, 0)) != codes
        residual = ema.predictor.text_residual(v, text_m, keys)
    assert math.isclose(d["diag_mim_agree_blank"], (blank == codes).float().mean().item())
    assert math.isclose(d["diag_mim_agree_shuffled"], (rolled == codes).float().mean().item())
    assert math.isclose(d["diag_mim_target_caption_flip"], flips.float().mean().item())
    ratio = (residual.norm(dim=-1) / v.norm(dim=-1)).mean().item()
    assert math.isclose(d["diag_mim_psi_ratio"], ratio, rel_tol=1e-4)
    assert 0.3 < ratio < 3  # at init the residual is of the patch feature's size
    assert d["diag_mim_target_caption_flip"] > 0  # random weights: the caption moves codes
    # blank images are constant white, in the transforms' normalisation
    assert blank_images(images).std(dim=(2, 3)).max() == 0
    # without text in the target the teacher cannot flip with the caption
    off = build_model(from_preset("tiny", {**SMALL, "mim.text_in_target": False})).eval()
    d_off = off(*batch, seed=9, diagnostics=True).diagnostics
    assert float(d_off["diag_mim_target_caption_flip"]) == 0.0
    assert float(d_off["diag_mim_psi_ratio"]) == 0.0
    # pixel targets have no codes: no reliance columns, no error
    pixel = build_model(from_preset("tiny", {**SMALL, "mim.target": "pixel"})).eval()
    assert "diag_mim_agree_blank" not in pixel(*batch, seed=9, diagnostics=True).diagnostics


def test_objective_grad_norms_match_separate_backward_passes():
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", SMALL)).train()
    batch = _batch(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(*batch, seed=4)
    towers = {"vision": model.net.vision, "text": model.net.text}
    weights = from_preset("tiny", {**SMALL, "loss.mim": 0.5}).loss
    got = objective_grad_norms(out.losses, weights, towers)
    assert set(got) == {f"diag_grad_{k}_{t}" for k in out.losses for t in towers}
    assert all(p.grad is None for p in model.parameters())  # nothing written into .grad
    assert got["diag_grad_glob_text"] == 0  # the global loss never reaches the text encoder
    for name in out.losses:
        model.load_state_dict(state)
        model.zero_grad()
        fresh = model(*batch, seed=4)
        (fresh.losses[name] * getattr(weights, name)).backward()
        for tower, module in towers.items():
            sq = sum(p.grad.pow(2).sum() for p in module.parameters() if p.grad is not None)
            want = math.sqrt(float(sq)) if torch.is_tensor(sq) else 0.0
            assert math.isclose(
                float(got[f"diag_grad_{name}_{tower}"]), want, rel_tol=1e-4, abs_tol=1e-7
            ), (name, tower)


def test_coverage_overlap_on_known_masks():
    """2×2 patches of 4 pixels; the object covers patches 0 and 3 of image 0, patch 1 fully and
    patch 2 partly of image 1; M = 2."""
    alpha = torch.zeros(2, 4, 4)
    alpha[0, :2, :2] = 1  # patch 0
    alpha[0, 2:, 2:] = 1  # patch 3
    alpha[1, :2, 2:] = 1  # patch 1
    alpha[1, 2, 0] = 1  # a quarter of patch 2
    coverage = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0.25, 0]])
    mask = torch.tensor([[True, True, False, False], [False, True, True, False]])
    good = coverage_overlap(coverage, mask, alpha, 2, 2)
    assert set(good) == set(COVERAGE_COLUMNS)
    assert float(good["diag_cov_overlap_hard"]) == 1.0  # the score is the coverage itself
    assert float(good["diag_cov_overlap_mask"]) == 0.75  # 1/2 and 2/2
    assert math.isclose(float(good["diag_cov_score_corr"]), 1.0, rel_tol=1e-6)
    bad = coverage_overlap(-coverage, mask, alpha, 2, 2)
    assert float(bad["diag_cov_overlap_hard"]) == 0.0
    assert math.isclose(float(bad["diag_cov_score_corr"]), -1.0, rel_tol=1e-6)
    flat = coverage_overlap(torch.ones(2, 4), mask, alpha, 2, 2)
    assert float(flat["diag_cov_score_corr"]) == 0.0  # a constant score: no correlation
    # random scores: the hard top-M overlaps the most-covered patches M/P on average
    g = torch.Generator().manual_seed(0)
    big_alpha = (torch.rand(512, 8, 8, generator=g) > 0.5).float()
    rand = coverage_overlap(
        torch.rand(512, 16, generator=g), torch.zeros(512, 16, dtype=torch.bool), big_alpha, 8, 2
    )
    assert abs(float(rand["diag_cov_overlap_hard"]) - 0.5) < 0.03
    with pytest.raises(ValueError, match="alpha"):
        coverage_overlap(coverage, mask, torch.zeros(2, 6, 6), 2, 2)


def test_step_diagnostics_add_grad_norms_and_coverage_with_alpha():
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", SMALL)).train()
    images, ids, mask = _batch(model)
    batch = {"images": images, "input_ids": ids, "attention_mask": mask}
    _, parts = Task().loss(model, batch, "cpu", 3, True, diagnostics=True)
    assert {c for c in GRAD_COLUMNS if "_mlm_" not in c and "_patch_" not in c} <= set(parts)
    assert not set(COVERAGE_COLUMNS) & set(parts)  # no alpha: no coverage columns
    batch["alpha"] = torch.rand(4, 32, 32)
    loss, parts = Task().loss(model, batch, "cpu", 3, True, diagnostics=True)
    assert set(COVERAGE_COLUMNS) <= set(parts)
    assert check_ranges({k: float(v) for k, v in parts.items() if k.startswith("diag_")}, 256) == []
    loss.backward()  # the step's own backward still runs after the per-objective passes


# ------------------------------------------------------------------------------- §3 switches
def test_candidate_cause_switches_are_config_fields():
    cfg = from_preset(
        "tiny",
        {
            "mim.teacher_temp": 0.05,
            "mim.teacher_temp_final": 0.05,
            "mim.teacher_temp_warmup": 0.0,
            "glob.teacher_temp": 0.05,
            "loss.mim": 0.5,
            "loss.glob": 2.0,
            "masking.ratio": 0.25,
            "head.num_prototypes": 64,
            "mim.center_over": "all",
            "mim.psi_norm": True,
        },
    )
    assert cfg.mim.center_over == "all" and cfg.mim.psi_norm is True
    assert from_preset("tiny").mim.center_over == "masked" and not from_preset("tiny").mim.psi_norm
    with pytest.raises(ValueError, match="center_over"):
        from_preset("tiny", {"mim.center_over": "some"})
    with pytest.raises(ValueError, match="psi_norm"):
        from_preset("tiny", {"mim.psi_norm": "yes"})


def _expected_center(model, batch, mask_idx, over):
    """The MIM batch centre computed from the EMA towers directly (momentum 0: centre = it)."""
    images, ids, mask = batch
    ema = model.ema
    with torch.no_grad():
        v = ema.vision(images)[:, 1:]  # (B, P, Dv)
        text = ema.text(ids, mask)
        if over == "masked":
            v = torch.stack([v[b, mask_idx[b]] for b in range(len(v))])  # (B, M, Dv)
        v = ema.predictor.cross_step(v, text, mask.bool())
        if model.cfg.mim.psi_norm:
            v = ema.predictor.norm(v)
        return ema.head(v).reshape(-1, model.cfg.head.num_prototypes).mean(0)


@pytest.mark.parametrize(
    "over,psi_norm", [("masked", False), ("all", False), ("all", True), ("masked", True)]
)
def test_mim_center_over_and_psi_norm(over, psi_norm):
    cfg = from_preset(
        "tiny",
        {**SMALL, "mim.center_over": over, "mim.psi_norm": psi_norm, "mim.center_momentum": 0.0},
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch(model)
    out = model(*batch, seed=5)
    expected = _expected_center(model, batch, out.mask_idx, over)
    torch.testing.assert_close(model.mim_center, expected, rtol=1e-4, atol=1e-5)
    other = _expected_center(model, batch, out.mask_idx, "all" if over == "masked" else "masked")
    assert not torch.allclose(model.mim_center, other, atol=1e-4)  # the switch matters


def test_psi_norm_normalises_the_teacher_inputs():
    """At init ψ's output has std > 1 (residual cross-attention on LayerNorm'd features);
    psi_norm brings it to the student's 1.0 (the EMA φ's final LayerNorm, weight 1 bias 0)."""
    outs = {}
    for psi_norm in (False, True):
        torch.manual_seed(0)
        model = build_model(from_preset("tiny", {**SMALL, "mim.psi_norm": psi_norm}))
        images, ids, mask = _batch(model)
        with torch.no_grad():
            v = model.ema.vision(images)[:, 1:]
            outs[psi_norm] = objectives.teacher_inputs(
                model.ema, model.cfg.mim, v, model.ema.text(ids, mask), mask.bool()
            )
    assert outs[False].std(-1).mean() > 1.05
    torch.testing.assert_close(
        outs[True].std(-1, unbiased=False).mean(), torch.tensor(1.0), atol=1e-3, rtol=0
    )
    assert not torch.allclose(outs[False], outs[True])


# ------------------------------------------------------------------------------- split seed
def test_split_seed_is_the_held_out_seed_and_in_the_resume_contract():
    task = Task()
    a = task.open_data(TrainConfig(data="synthetic:8:4", seed=0))
    b = task.open_data(TrainConfig(data="synthetic:8:4", seed=7))
    c = task.open_data(TrainConfig(data="synthetic:8:4", split_seed=7))
    assert a.split_seed == b.split_seed == 0 and c.split_seed == 7
    assert [r.caption for r in a.val] == [r.caption for r in b.val]  # --seed moves nothing
    assert [r.caption for r in a.val] != [r.caption for r in c.val]
    state = {"train_config": TrainConfig().to_dict(), "world_size": 1}
    assert resume_changes(state, TrainConfig(split_seed=1), 1) == ["split_seed: 0 -> 1"]
    del state["train_config"]["split_seed"]  # a checkpoint from before the field
    assert resume_changes(state, TrainConfig(), 1) == []


# ------------------------------------------------------------------------ alpha → coverage
def _stamp(path, side: int, left: bool) -> None:
    """An RGBA stamp: an opaque red block on the left (or right) half, transparent elsewhere."""
    from PIL import Image

    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    box = (0, 0, side // 2, side) if left else (side // 2, 0, side, side)
    image.paste((255, 0, 0, 255), box)
    image.save(path)


def test_transforms_carry_the_alpha_channel_through_crop_and_flip(tmp_path):
    import random

    from PIL import Image

    from semmim.transforms import EvalTransform, TrainTransform

    _stamp(tmp_path / "s.png", 64, left=True)
    image = Image.open(tmp_path / "s.png")
    t, cap, alpha = EvalTransform(32).apply(image, "left", alpha=True)
    assert alpha.shape == (32, 32) and alpha[:, :14].min() > 0.99 and alpha[:, 18:].max() < 0.01
    torch.testing.assert_close(t, EvalTransform(32)(image, "left")[0], rtol=0, atol=0)
    no_crop = TrainTransform(32, scale=(1.0, 1.0))
    flipped = None
    for seed in range(8):  # half the draws flip: the alpha flips with the image and caption
        t2, cap2, a2 = no_crop.apply(image, "on the left", random.Random(seed), alpha=True)
        t3, cap3 = no_crop(image, "on the left", random.Random(seed))
        torch.testing.assert_close(t2, t3, rtol=0, atol=0)  # the RGB path is unchanged
        assert cap2 == cap3
        if cap2 == "on the right":
            flipped = a2
            torch.testing.assert_close(a2, alpha.flip(-1), rtol=0, atol=1e-6)
    assert flipped is not None
    rgb = Image.new("RGB", (8, 8))
    assert EvalTransform(8).apply(rgb, "x", alpha=True)[2] is None


def test_training_on_rgba_stamps_logs_coverage_overlap(tmp_path):
    folder = tmp_path / "stamps"
    folder.mkdir()
    for i in range(8):
        _stamp(folder / f"s{i}.png", 48, left=i % 2 == 0)
        (folder / f"s{i}.txt").write_text(f"a red block number {i}\n")
    out = tmp_path / "run"
    train(
        from_preset("tiny", SMALL),
        _tcfg(out, data=f"folder:{folder}", steps=2, diag_every=1, val_size=0),
    )
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert all(r[c] != "" for c in COVERAGE_COLUMNS), r
        assert check_ranges(r, 256) == []
