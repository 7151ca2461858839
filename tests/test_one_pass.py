"""The one-pass student (issue 18): ``mim.student_view=masked``.

The student ViT encodes only CLS + the kept patches, once, and that encoding serves ITC, ITM,
MLM, the global agreement and MIM; the EMA encodes the full image (forward only). The
bf16-autocast step and the host-read check run in tests/test_gpu_path.py (its CASES include the
one-pass cases); the compiled step is here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from run_helpers import small_run
from test_gpu_path import SMALL_IMAGES, Trainer, _close, make_batch, make_model

from semmim import from_preset
from semmim.checkpoint import load_checkpoint
from semmim.layers import VisionEncoder
from semmim.train import train

ONE_PASS = {"mim.student_view": "masked"}
VARIANTS = [
    {},
    {"masking.ratio": 0.75},
    {"mim.target": "pixel"},
    {"masking.strategy": "random"},
    {"mim.enabled": False},  # albef: FLIP-style masked ITC / ITM / MLM
]
VARIANT_IDS = [",".join(f"{k}={v}" for k, v in v.items()) or "default" for v in VARIANTS]


def test_config_key_validated_with_its_name():
    assert from_preset("tiny").mim.student_view == "full"
    assert from_preset("tiny", ONE_PASS).one_pass
    with pytest.raises(ValueError, match=r"mim\.student_view: .*drop_tokens=True"):
        from_preset("tiny", {**ONE_PASS, "mim.drop_tokens": False})
    with pytest.raises(ValueError, match=r"mim\.student_view: must be one of \['full', 'masked'\]"):
        from_preset("tiny", {"mim.student_view": "half"})
    # without MIM the one-pass student still needs at least one visible patch
    with pytest.raises(ValueError, match=r"masking\.ratio: .*at least one must stay visible"):
        from_preset("tiny", {**ONE_PASS, "mim.enabled": False, "masking.ratio": 0.99})
    from_preset("tiny", {"mim.enabled": False, "masking.ratio": 0.99})  # two-pass: no mask
    assert from_preset("tiny", {**ONE_PASS, "mim.unmasked_from": 0.9}).mim.unmasked_from == 0.9
    with pytest.raises(
        ValueError, match=r"mim\.unmasked_from: must be in \[0\.0, 1\.0\], got 1\.5"
    ):
        from_preset("tiny", {**ONE_PASS, "mim.unmasked_from": 1.5})
    with pytest.raises(ValueError, match=r"mim\.unmasked_from: 0\.9 .*needs student_view='masked'"):
        from_preset("tiny", {"mim.unmasked_from": 0.9})


def _vision_calls(model):
    """Count the sequence length of every ViT pass of net and ema: {"net": [L...], "ema": [...]}."""
    seen = {"net": [], "ema": []}
    hooks = []
    for name in seen:
        enc = getattr(model, name).vision

        def hook(_mod, args, _name=name):
            seen[_name].append(args[0].shape[1])

        hooks.append(enc.blocks[0].register_forward_pre_hook(hook))
    return seen, hooks


@pytest.mark.parametrize("overrides", VARIANTS, ids=VARIANT_IDS)
def test_student_encodes_the_masked_view_once(overrides):
    """One student ViT pass of CLS + R kept patches (R = P − M), one EMA pass of the full image;
    every fusion call of the student (ITM, MLM) reads R+1 image keys; every trainable parameter
    gets a finite gradient; the losses of the two-pass model are all there."""
    model = make_model({**overrides, **ONE_PASS})
    cfg = model.cfg
    P, M = cfg.vision.num_patches, cfg.num_masked
    assert M > 0
    seen, hooks = _vision_calls(model)
    fusion_keys = []
    hooks.append(
        model.net.fusion.register_forward_pre_hook(
            lambda _m, args: fusion_keys.append(args[2].shape[1])
        )
    )
    images, ids, am = make_batch(model)
    out = model(images, ids, am, seed=3)
    for h in hooks:
        h.remove()
    assert seen == {"net": [P - M + 1], "ema": [P + 1]}, seen
    assert fusion_keys and set(fusion_keys) == {P - M + 1}, fusion_keys
    assert out.keep_idx.shape == (4, P - M) and out.mask.sum(1).eq(M).all()
    two_pass = make_model(overrides)(images, ids, am, seed=3)
    assert out.losses.keys() == two_pass.losses.keys()
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_two_pass_student_runs_the_vit_twice():
    """The default (full) student: full image and masked view, so the counter above can fail."""
    model = make_model({})
    P, M = model.cfg.vision.num_patches, model.cfg.num_masked
    seen, hooks = _vision_calls(model)
    model(*make_batch(model), seed=3)
    for h in hooks:
        h.remove()
    assert seen == {"net": [P + 1, P - M + 1], "ema": [P + 1]}


def test_one_pass_features_are_those_of_the_kept_patches():
    """The ITC image features of the one-pass step are the student's features of the kept
    patches (its mask), not of the full image: the ITC loss recomputed from forward_kept matches,
    the one from the full image does not."""
    from semmim import objectives as obj

    model = make_model(ONE_PASS).eval()  # eval: no queue or centre update between the two
    images, ids, am = make_batch(model)
    out = model(images, ids, am, seed=5)
    net, ema = model.net, model.ema
    with torch.no_grad():
        text_feat = obj.unit(net.text_proj(net.text(ids, am)[:, 0]))
        image_feat_m = obj.unit(ema.vision_proj(ema.vision(images)[:, 0]))
        text_feat_m = obj.unit(ema.text_proj(ema.text(ids, am)[:, 0]))
        same = obj.matching_pairs(ids, am.bool(), None)

        def itc_of(image_embeds):
            return obj.itc(
                obj.unit(net.vision_proj(image_embeds[:, 0])), text_feat, image_feat_m,
                text_feat_m, model.image_queue, model.text_queue, model._alpha,
                model._temperature(), same,
            )  # fmt: skip

        kept = itc_of(net.vision.forward_kept(images, out.keep_idx))
        full = itc_of(net.vision(images))
    torch.testing.assert_close(out.losses["itc"], kept)
    assert not torch.allclose(out.losses["itc"], full)


def test_forward_kept_runs_one_vit_call(monkeypatch):
    """The student's pass is VisionEncoder.forward_kept (the gather path), called once."""
    calls = []
    real = VisionEncoder.forward_kept
    monkeypatch.setattr(
        VisionEncoder, "forward_kept", lambda self, *a: calls.append(1) or real(self, *a)
    )
    model = make_model(ONE_PASS)
    model(*make_batch(model), seed=0)
    assert calls == [1]


def test_unmasked_phase_encodes_the_full_image_as_the_two_pass_student():
    """mim.unmasked_from=0.5: before half of the steps one student ViT pass of the kept
    patches; from there the full image and the masked view, with the losses of the two-pass
    model of the same weights (FLIP's unmasked tuning)."""
    model = make_model({**ONE_PASS, "mim.unmasked_from": 0.5})
    two_pass = make_model({})
    assert model.state_dict().keys() == two_pass.state_dict().keys()
    P, M = model.cfg.vision.num_patches, model.cfg.num_masked
    batch = make_batch(model)
    fresh = copy.deepcopy(model)  # the forward below moves the queue: compare from the start
    seen, hooks = _vision_calls(model)
    model.set_step(4, 10)
    model(*batch, seed=3)
    assert seen["net"] == [P - M + 1], seen
    for h in hooks:
        h.remove()
    model = fresh
    seen, hooks = _vision_calls(model)
    model.set_step(5, 10)
    two_pass.set_step(5, 10)
    out = model(*batch, seed=3)
    for h in hooks:
        h.remove()
    assert seen["net"] == [P + 1, P - M + 1], seen
    ref = two_pass(*batch, seed=3)
    assert out.losses.keys() == ref.losses.keys()
    for k in ref.losses:
        assert torch.equal(out.losses[k], ref.losses[k]), k


@pytest.mark.parametrize("unmasked_from", [1.0, 0.5], ids=["one_pass", "unmasked_phase"])
def test_one_pass_compiled_step_matches_eager(unmasked_from):
    """Four SGD steps of the one-pass model compiled with aot_eager (graph capture,
    AOTAutograd, buffer mutations) against eager: losses and final parameters within 1e-4 of
    each tensor's largest magnitude; with mim.unmasked_from=0.5 the last two steps encode the
    full image (one recompile at the switch)."""
    overrides = {
        **ONE_PASS,
        "mim.unmasked_from": unmasked_from,
        "vision.depth": 1,
        "text.depth": 1,
        "fusion.depth": 1,
    }
    eager = make_model(overrides)
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager")
    batch = make_batch(eager)
    result = {}
    for name, model, fwd in (("eager", eager, None), ("compiled", twin, compiled)):
        trainer = Trainer(model, steps=4, sgd=True, image_ids=torch.tensor([0, 0, 1, 2]))
        losses = [trainer.step(batch, check_inputs=False, forward=fwd).losses for _ in range(4)]
        result[name] = losses, {n: p.detach().clone() for n, p in model.named_parameters()}
    (le, pe), (lc, pc) = result["eager"], result["compiled"]
    for i, (a, b) in enumerate(zip(le, lc)):
        assert a.keys() == b.keys() == {"itc", "itm", "mlm", "glob", "mim"}
        for k in a:
            _close(b[k].detach(), a[k].detach(), 1e-4, f"step {i} loss {k}")
    for n, t in pe.items():
        _close(pc[n], t, 1e-4, f"param {n}")


@pytest.mark.parametrize("unmasked_from", [1.0, 0.7], ids=["one_pass", "unmasked_phase"])
def test_one_pass_resume_continues_exactly(tmp_path, one_thread, unmasked_from):
    """10 training steps straight = 5 steps, stop, resume, 5 more: the same losses and the same
    final state (weights, EMA, queue, centres); with mim.unmasked_from=0.7 the resumed half
    crosses into the unmasked phase."""
    cfg = from_preset("tiny", {**SMALL_IMAGES, **ONE_PASS, "mim.unmasked_from": unmasked_from})

    def tcfg(out, **kw):
        return small_run(out, **{"data": "synthetic:64:24", "steps": 10, **kw})

    def losses(history):
        return [tuple(r[k] for k in ("loss", "itc", "itm", "mlm", "glob", "mim")) for r in history]

    straight = train(cfg, tcfg(tmp_path / "a"))
    first = train(cfg, tcfg(tmp_path / "b", stop_at=5))
    second = train(cfg, tcfg(tmp_path / "b"), resume=True)
    assert first["step"] == 5 and second["step"] == 10
    assert losses(first["history"]) + losses(second["history"]) == losses(straight["history"])
    a = load_checkpoint(str(tmp_path / "a"))["model"]
    b = load_checkpoint(str(tmp_path / "b"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the work counted (benchmarks)
def _e2e():
    import sys

    from test_gpu_path import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import e2e_gpu
    finally:
        sys.path.pop(0)
    return e2e_gpu


def test_train_flops_of_the_one_pass_student_by_hand():
    """base at 224 px, B = 64, T = 32: the one-pass student drops the full-image ViT pass and its
    fusion (ITM's 3B rows and MLM's B) reads 99 image keys instead of 197; the EMA is unchanged."""
    e2e = _e2e()
    cfg = from_preset("base")
    two = e2e.train_flops(cfg, 64, 32)
    one = e2e.train_flops(cfg.override(ONE_PASS), 64, 32)
    assert one["ema_fwd"] == two["ema_fwd"]
    P, Dv, Dt, depth = 196, 768, 768, cfg.fusion.depth
    vit = 2 * P * 3 * 256 * Dv + 12 * e2e._self_layer(P + 1, Dv, 4 * Dv)
    cross = e2e._cross(32, P + 1, Dt, Dv) - e2e._cross(32, P - 98 + 1, Dt, Dv)
    assert two["student_fwd"] - one["student_fwd"] == pytest.approx(
        64 * vit + 4 * 64 * depth * cross
    )
    ratio75 = e2e.train_flops(cfg.override({**ONE_PASS, "masking.ratio": 0.75}), 64, 32)
    assert ratio75["total"] < one["total"] < two["total"]


def test_train_flops_agree_with_the_flop_counter():
    """FlopCounterMode over a tiny training forward + backward, per path, against the analytic
    count: the counted one-pass / two-pass ratio is the analytic one within 0.03, and each count
    within 15% of the analytic one (which leaves out element-wise work)."""
    from torch.utils.flop_counter import FlopCounterMode

    e2e = _e2e()
    counted, analytic = {}, {}
    for name, over in (("two", {}), ("one", ONE_PASS)):
        torch.manual_seed(0)
        model = make_model({**over, "vision.image_size": 64})
        batch = make_batch(model)
        T = batch[1].shape[1]
        counter = FlopCounterMode(display=False)
        with counter:
            model(*batch, seed=0).loss.backward()
        counted[name] = counter.get_total_flops()
        analytic[name] = e2e.train_flops(model.cfg, 4, T)["total"]
        assert counted[name] == pytest.approx(analytic[name], rel=0.15), name
    assert counted["one"] / counted["two"] == pytest.approx(
        analytic["one"] / analytic["two"], abs=0.03
    )


def test_e2e_lists_and_tables_the_one_pass_section(tmp_path):
    """`e2e_gpu.py --list-sections` prints one_pass (gpu_check.sh runs it when listed), and the
    table gives the one-pass rows with their ratios to (a) at one batch."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from test_gpu_path import ROOT

    proc = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / "e2e_gpu.py"), "--list-sections"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "one_pass" in proc.stdout.split(), proc.stdout
    e2e = _e2e()
    row = {"batch": 64, "step_s": 0.5, "pairs_per_s": 128.0, "peak_gib": 20.0, "mfu": None}
    rows = {
        "fast": {**row, "label": "fast", "flops_per_step": 10e12},
        "reference": {**row, "label": "ref", "flops_per_step": 12e12},
        "one_pass": {**row, "label": "one", "pairs_per_s": 192.0, "flops_per_step": 6e12},
    }
    args = SimpleNamespace(preset="base", image_size=224, tokens=32, steps=10)
    lines = e2e.table_lines(rows, None, args)
    assert any(ln.startswith("one_pass / fast at batch 64: 1.50x pairs/s") for ln in lines), lines
    assert any("0.50x the reference's FLOPs per pair" in ln for ln in lines), lines
    assert any(ln.startswith("(d') one-pass") and "(not measured)" in ln for ln in lines), lines
