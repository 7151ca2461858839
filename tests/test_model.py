"""The SemMIM model on CPU: losses, gradients, EMA, buffers, masked-image paths, bad inputs,
and overfitting a fixed batch."""

import math

import pytest
import torch

from semmim import SemMIMConfig, build_model, from_preset
from semmim.dist import all_gather_no_grad
from semmim.losses import sample_hard_negatives
from semmim.model import SemMIMOutput

ALL = {"itc", "itm", "mlm", "glob", "mim"}


def make_batch(model, B=4, seed=0):
    words = [
        "red square",
        "green circle on grass",
        "blue sky",
        "yellow cat",
        "a dog",
        "white boat at sea",
        "purple flower",
        "black car",
    ]
    enc = model.tokenizer(
        [f"a photo of a {w}" for w in words[:B]], padding=True, return_tensors="pt"
    )
    S = model.cfg.vision.image_size
    images = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))
    return images, enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(from_preset("tiny"))


def test_public_api(tiny):
    images, ids, am = make_batch(tiny)
    out = tiny(images, ids, am)
    assert isinstance(out, SemMIMOutput)
    assert set(out.losses) == ALL
    assert out.loss.shape == () and torch.isfinite(out.loss)
    total = sum(v for v in out.losses.values())  # default weights are all 1
    torch.testing.assert_close(out.loss, total)
    assert isinstance(tiny.cfg, SemMIMConfig)
    assert tiny.tokenizer("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]


ABLATIONS = [
    ({}, ALL),
    ({"mim.target": "pixel"}, ALL),
    ({"mim.text_in_target": False}, ALL),
    ({"mim.psi": "text_cls"}, ALL),
    ({"masking.strategy": "random"}, ALL),
    ({"mim.enabled": False}, {"itc", "itm", "mlm"}),
    ({"mim.drop_tokens": False}, ALL),
    ({"masking.tau": 0.0}, ALL),
    ({"itc.queue_size": 0}, ALL),
    ({"momentum.schedule": "cosine"}, ALL),
    ({"loss.itm": 0.0, "loss.glob": 0.0}, {"itc", "mlm", "mim"}),
]


@pytest.mark.parametrize("overrides, keys", ABLATIONS, ids=[str(a[0]) for a in ABLATIONS])
def test_every_ablation_runs(overrides, keys):
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", overrides))
    model.set_step(30, 100)  # α and τ_t' in the middle of their ramps
    out = model(*make_batch(model), seed=1)
    assert set(out.losses) == keys
    for k, v in out.losses.items():
        assert v.shape == () and torch.isfinite(v), k
    out.loss.backward()
    model.update_momentum()


def test_small_preset_forward():
    torch.manual_seed(0)
    model = build_model(from_preset("small"))
    out = model(*make_batch(model, B=2), seed=0)
    assert set(out.losses) == ALL and all(torch.isfinite(v) for v in out.losses.values())


@pytest.mark.parametrize("overrides", [{}, {"mim.drop_tokens": False}, {"mim.target": "pixel"}])
def test_gradients_reach_every_trainable_parameter_and_no_ema_parameter(overrides):
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", overrides))
    model(*make_batch(model), seed=0).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("ema.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    for n, p in model.ema.named_parameters():
        assert not p.requires_grad and p.grad is None, n


def test_update_momentum_exact_rule():
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", **{"momentum.momentum": 0.9}))
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p))
    ema_before = [p.clone() for p in model.ema.parameters()]
    model.update_momentum()
    for e0, e1, p in zip(ema_before, model.ema.parameters(), model.net.parameters()):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * p, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema_before[0], next(model.ema.parameters()))


def test_cosine_momentum_and_warmups_follow_progress():
    model = build_model(
        from_preset("tiny", **{"momentum.schedule": "cosine", "momentum.momentum": 0.99})
    )
    c = model.cfg
    assert model.alpha == 0.0 and model.mim_teacher_temp == c.mim.teacher_temp
    assert math.isclose(model.momentum, 0.99)
    model.set_step(50, 100)
    assert math.isclose(model.momentum, 0.995)
    assert model.alpha == c.itc.alpha
    model.set_step(100, 100)
    assert math.isclose(model.momentum, 1.0)
    assert math.isclose(model.mim_teacher_temp, c.mim.teacher_temp_final)
    model.set_step(int(c.itc.alpha_warmup * 50), 100)  # half-way up the α warm-up
    assert math.isclose(model.alpha, c.itc.alpha / 2)


def test_queue_and_centres_are_buffers_updated_in_training_only(tiny):
    keys = tiny.state_dict().keys()
    for name in ["image_queue", "text_queue", "queue_ptr", "glob_center", "mim_center", "temp"]:
        assert name in keys
    assert any(k.startswith("ema.vision.") for k in keys)
    batch = make_batch(tiny)
    tiny.eval()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny(*batch, seed=0)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    tiny.train()
    ptr = int(tiny.queue_ptr)
    tiny(*batch, seed=0)
    B, Q = batch[0].shape[0], tiny.cfg.itc.queue_size
    assert int(tiny.queue_ptr) == (ptr + B) % Q
    with torch.no_grad():
        feat_m = torch.nn.functional.normalize(
            tiny.ema.vision_proj(tiny.ema.vision(batch[0])[:, 0]), dim=-1
        )
    torch.testing.assert_close(tiny.image_queue[ptr : ptr + B], feat_m)
    assert not torch.equal(before["glob_center"], tiny.glob_center)
    assert not torch.equal(before["mim_center"], tiny.mim_center)


def test_state_dict_round_trip_reproduces_outputs():
    torch.manual_seed(0)
    a = build_model(from_preset("tiny"))
    batch = make_batch(a)
    a(*batch, seed=0)  # move queue and centres away from their initial values
    torch.manual_seed(1)
    b = build_model(SemMIMConfig.from_dict(a.cfg.to_dict()))
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    la, lb = a(*batch, seed=5).losses, b(*batch, seed=5).losses
    for k in la:
        assert torch.equal(la[k], lb[k]), k


def test_two_masked_image_paths_agree_without_masking():
    """With M = 0 the token-dropping path (gather all patches) and the [MASK]-token path (mask
    nothing) are the same computation; with M > 0 they are different models."""
    torch.manual_seed(0)
    drop = build_model(from_preset("tiny", **{"masking.ratio": 0.0, "mim.drop_tokens": True}))
    full = build_model(from_preset("tiny", **{"masking.ratio": 0.0, "mim.drop_tokens": False}))
    missing, unexpected = full.load_state_dict(drop.state_dict(), strict=False)
    assert {k.split(".")[-1] for k in missing} == {"mask_token"}
    assert {k.split(".")[-1] for k in unexpected} == {"predictor_mask_token"}
    drop.eval()
    full.eval()
    batch = make_batch(drop)
    a, b = drop(*batch, seed=0), full(*batch, seed=0)
    assert a.mask_idx.shape[1] == 0
    for k in ALL:
        torch.testing.assert_close(a.losses[k], b.losses[k], rtol=1e-5, atol=1e-6)
    # kept-token path == full ViT on the same (unmasked) sequence
    images = batch[0]
    P = drop.cfg.vision.num_patches
    keep = torch.arange(P).expand(images.shape[0], P)
    torch.testing.assert_close(
        drop.net.vision.forward_kept(images, keep), drop.net.vision(images), rtol=1e-5, atol=1e-5
    )
    none = torch.zeros(images.shape[0], P, dtype=torch.bool)
    torch.testing.assert_close(
        full.net.vision.forward_masked(images, none), full.net.vision(images), rtol=1e-5, atol=1e-5
    )


def test_kept_tokens_match_explicitly_sliced_sequence():
    """forward_kept == running the ViT blocks on [CLS; patches[keep] + pos[keep]]."""
    torch.manual_seed(0)
    model = build_model(from_preset("tiny"))
    vit = model.net.vision
    images = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]])
    patches = vit.patchify(images) + vit.pos_embed[:, 1:]  # (B, P, D)
    ref = vit._run(torch.stack([patches[b, keep[b]] for b in range(2)]))
    torch.testing.assert_close(vit.forward_kept(images, keep), ref, rtol=1e-5, atol=1e-6)


def test_hard_negatives_exclude_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(16, 16, generator=g)
    for _ in range(20):
        neg = sample_hard_negatives(sim, g)
        assert neg.shape == (16,) and (neg != torch.arange(16)).all()
    peaked = torch.zeros(8, 8)
    peaked[torch.arange(8), (torch.arange(8) + 3) % 8] = 50.0  # one very similar negative
    peaked.fill_diagonal_(100.0)  # the positive is the most similar: must still be excluded
    assert torch.equal(sample_hard_negatives(peaked, g), (torch.arange(8) + 3) % 8)
    a = sample_hard_negatives(sim, torch.Generator().manual_seed(3))
    b = sample_hard_negatives(sim, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_encoders_and_itm_score(tiny):
    images, ids, am = make_batch(tiny)
    tiny.eval()
    with torch.no_grad():
        fi, ft = tiny.encode_image(images), tiny.encode_text(ids, am)
        assert fi.shape == ft.shape == (4, 256)
        torch.testing.assert_close(fi.norm(dim=-1), torch.ones(4))
        s = tiny.itm_score(images, ids, am)
        assert s.shape == (4,) and ((s >= 0) & (s <= 1)).all()
        s2 = tiny.itm_score(tiny.image_tokens(images), ids, am)
        torch.testing.assert_close(s, s2)


def test_all_gather_is_identity_without_distributed():
    x = torch.randn(3, 4)
    assert all_gather_no_grad(x) is x


@pytest.mark.parametrize(
    "change, arg",
    [
        (lambda im, ids, am: (im[:3], ids, am), "input_ids"),  # batch sizes differ
        (lambda im, ids, am: (im[..., :32, :32], ids, am), "images"),  # wrong size
        (lambda im, ids, am: (im[0], ids, am), "images"),  # wrong rank
        (lambda im, ids, am: (im.long(), ids, am), "images"),
        (lambda im, ids, am: (im, ids[0], am), "input_ids"),
        (lambda im, ids, am: (im, ids.float(), am), "input_ids"),
        (lambda im, ids, am: (im, ids, am[:, :-1]), "attention_mask"),
        (lambda im, ids, am: (im, ids, am * torch.tensor([1, 0, 1, 1])[:, None]), "input_ids"),
        (lambda im, ids, am: (im, torch.tensor([[101, 102]] * 4), torch.ones(4, 2)), "input_ids"),
        (lambda im, ids, am: (im, ids.repeat(1, 10), am.repeat(1, 10)), "input_ids"),  # > max_len
        (lambda im, ids, am: (im[:1], ids[:1], am[:1]), "images"),  # ITM needs B >= 2
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(tiny, change, arg):
    images, ids, am = change(*make_batch(tiny))
    with pytest.raises(ValueError) as e:
        tiny(images, ids, am)
    assert str(e.value).startswith(arg), str(e.value)


def test_empty_caption_error_names_the_row(tiny):
    images, ids, am = make_batch(tiny)
    am[2] = 0
    with pytest.raises(ValueError, match=r"input_ids: empty caption.*\[2\]"):
        tiny(images, ids, am)


# ---------------------------------------------------------------- overfitting a fixed batch

COLOURS = {
    "red": (1, -1, -1),
    "green": (-1, 1, -1),
    "blue": (-1, -1, 1),
    "yellow": (1, 1, -1),
    "purple": (0.5, -1, 1),
    "cyan": (-1, 1, 1),
    "white": (1, 1, 1),
    "black": (-1, -1, -1),
}


def coloured_shapes(size: int) -> tuple[torch.Tensor, list[str]]:
    """8 distinct images (a coloured square or disc on grey) and their captions."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c, r = size / 2, size / 4
    shapes = {
        "square": ((yy - c).abs() < r) & ((xx - c).abs() < r),
        "circle": (yy - c) ** 2 + (xx - c) ** 2 < (1.1 * r) ** 2,
    }
    images, captions = [], []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        shape = ["square", "circle"][i % 2]
        img = torch.full((3, size, size), -0.5)
        img[:, shapes[shape]] = torch.tensor(rgb, dtype=torch.float)[:, None]
        images.append(img)
        captions.append(f"a {colour} {shape}")
    return torch.stack(images), captions


def test_overfits_a_fixed_batch():
    """All five objectives on. Test-only overrides: no queue (on a fixed batch it holds only
    stale copies of the positives, which one-hot targets count as negatives), α = 0 (the soft
    momentum targets put a floor under ITC) and a fast EMA (0.9) because ITC trains the student
    against the momentum features and retrieval below uses the student's."""
    torch.manual_seed(0)
    model = build_model(
        from_preset("tiny", **{"itc.queue_size": 0, "itc.alpha": 0.0, "momentum.momentum": 0.9})
    )
    images, captions = coloured_shapes(model.cfg.vision.image_size)
    enc = model.tokenizer(captions, padding=True, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    params = [p for p in model.parameters() if p.requires_grad]
    steps = 250
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for step in range(steps):
        model.set_step(step, steps)
        out = model(images, ids, am, seed=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        model.update_momentum()
    model.eval()
    with torch.no_grad():
        last = model(images, ids, am, seed=0).losses
        sim = model.encode_image(images) @ model.encode_text(ids, am).T  # (8, 8)
        match = model.itm_score(images, ids, am)
    assert last["itc"] < 0.05 and last["itm"] < 0.05, last
    assert torch.equal(sim.argmax(1), torch.arange(8))  # image→text R@1 = 100%
    assert (match > 0.9).all(), match
