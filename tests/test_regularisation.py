"""Dropout (text / fusion / vision) and the model's no-weight-decay parameter list."""

import pytest
import torch
from torch import nn

from semmim import SemMIMConfig, build_model, from_preset

DROP = {"text.dropout": 0.1, "fusion.dropout": 0.1, "vision.dropout": 0.1}


def batch(model, B=2):
    enc = model.tokenizer(
        ["a red circle", "two blue squares"][:B], padding=True, return_tensors="pt"
    )
    S = model.cfg.vision.image_size
    images = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(0))
    return images, enc["input_ids"], enc["attention_mask"]


def towers(model, images, ids, am):
    """Every tower that dropout touches: ViT, text, fusion, MIM predictor φ."""
    net = model.net
    v, t = net.vision(images), net.text(ids, am)
    return [v, t, net.fusion(t, am, v), net.predictor(v, t, am)]


def test_presets_dropout_defaults():
    tiny, small, base = (from_preset(n) for n in ("tiny", "small", "base"))
    assert (tiny.text.dropout, tiny.fusion.dropout, tiny.vision.dropout) == (0.0, 0.0, 0.0)
    for cfg in (small, base):  # BERT's 0.1 on the text side; ALBEF's DeiT has none
        assert (cfg.text.dropout, cfg.fusion.dropout, cfg.vision.dropout) == (0.1, 0.1, 0.0)
    with pytest.raises(ValueError, match=r"text.dropout: must be in \[0.0, 1.0\)"):
        from_preset("tiny", **{"text.dropout": 1.0})


def test_dropout_active_in_train_mode_only_and_not_in_the_ema():
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", DROP))
    inputs = batch(model)
    model.train()
    with torch.no_grad():
        a, b = towers(model, *inputs), towers(model, *inputs)
    for x, y in zip(a, b):
        assert not torch.equal(x, y)  # every tower draws its own dropout masks
    # the momentum teacher stays in eval mode: its targets carry no dropout noise
    assert not any(m.training for m in model.ema.modules())
    with torch.no_grad():
        assert torch.equal(model.ema.text(*inputs[1:]), model.ema.text(*inputs[1:]))
    model.eval()
    with torch.no_grad():
        a, b = towers(model, *inputs), towers(model, *inputs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    model.train()  # the whole forward trains with dropout on
    out = model(*inputs, seed=0)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_zero_dropout_is_the_plain_model():
    """dropout 0: no Dropout module at all, the same parameters, train mode == eval mode."""
    torch.manual_seed(0)
    plain = build_model(from_preset("tiny"))
    torch.manual_seed(0)
    dropped = build_model(from_preset("tiny", DROP))
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert any(isinstance(m, nn.Dropout) for m in dropped.modules())
    sd_plain, sd_drop = plain.state_dict(), dropped.state_dict()
    assert sd_plain.keys() == sd_drop.keys()  # checkpoints load across dropout settings
    assert all(torch.equal(sd_plain[k], sd_drop[k]) for k in sd_plain)
    inputs = batch(plain)
    with torch.no_grad():
        train = towers(plain.train(), *inputs)
        evals = towers(plain.eval(), *inputs)
        dropped_eval = towers(dropped.eval(), *inputs)
    for x, y, z in zip(train, evals, dropped_eval):
        assert torch.equal(x, y) and torch.equal(y, z)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, {"net.predictor_pos", "net.vision.pos_embed", "net.vision.cls_token", "temp"}),
        ({"mim.drop_tokens": False}, {"net.vision.mask_token"}),
        ({}, {"net.predictor_mask_token"}),
        ({"vision.dist_token": True}, {"net.vision.dist_token"}),
    ],
)
def test_no_weight_decay_lists_tokens_and_positions(overrides, expected):
    model = build_model(from_preset("tiny", overrides))
    names = model.no_weight_decay()
    assert expected <= names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names <= trainable  # only real, trainable names (no ema.*)
    assert (
        "net.predictor_pos"
        not in build_model(from_preset("tiny", **{"mim.enabled": False})).no_weight_decay()
    )


def test_no_weight_decay_covers_every_free_parameter():
    """A parameter registered directly on a module (not a Linear / Conv / Embedding / norm
    weight) is a token, a position table or a temperature: the optimiser's generic rules
    (ndim < 2, biases, norm and embedding modules) cannot tell, so the model must list it. The
    prototype matrix is the exception: a weight (decayed, as DINO's last layer)."""
    model = build_model(
        from_preset("tiny", **{"mim.drop_tokens": False, "vision.dist_token": True})
    )
    layers = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)
    free = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, layers):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.requires_grad and p_name != "bias":
                free.add(full)
    assert free - model.no_weight_decay() == {"net.head.prototypes"}


def test_configs_saved_before_dropout_existed_load_without_dropout():
    """A checkpoint's config dict from before the dropout fields: missing keys mean 0, the
    model it was trained as, whatever the preset now says."""
    old = from_preset("small").to_dict()
    for section in ("text", "fusion", "vision"):
        del old[section]["dropout"]
    cfg = SemMIMConfig.from_dict(old)
    assert (cfg.text.dropout, cfg.fusion.dropout, cfg.vision.dropout) == (0.0, 0.0, 0.0)
    assert SemMIMConfig.from_dict(from_preset("small").to_dict()) == from_preset("small")
