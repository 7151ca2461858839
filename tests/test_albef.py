"""``semmim train --init albef:FILE`` (semmim.albef): ALBEF's published state-dict names and
shapes mapped onto ours and back. No ALBEF file can be downloaded here: the test writes ALBEF's
state dict from its model code's names (models/model_pretrain.py, models/vit.py,
models/xbert.py of github.com/salesforce/ALBEF) and configs (config_bert.json: BERT-base, 12
layers, fusion_layer 6; Pretrain.yaml: image_res 256, embed_dim 256, queue_size 65536)."""

from __future__ import annotations

import os

import pytest
import torch

from semmim.albef import (
    InitError,
    albef_to_semmim,
    init_from,
    load_albef,
    semmim_to_albef,
)
from semmim.cli import main
from semmim.config import from_preset
from semmim.model import SemMIM
from semmim.tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def albef_published_shapes(image_res: int = 256, queue: int = 65536) -> dict[str, tuple]:
    """``ALBEF(config=Pretrain.yaml).state_dict()``'s names and shapes, written from ALBEF's
    module tree (not from semmim's mapping): VisionTransformer (timm names, qkv fused), a
    BertForMaskedLM whose layers >= fusion_layer have ``crossattention``, the projections, ITM
    head, temperature, momentum copies (``*_m``) and the ITC queues (embed_dim, queue_size)."""
    D, E, V, L, F, W, P = 768, 256, 30522, 12, 6, 3072, (image_res // 16) ** 2
    sd: dict[str, tuple] = {}

    def linear(name, out_f, in_f):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (out_f, in_f), (out_f,)

    def norm(name):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (D,), (D,)

    for m in ("", "_m"):
        ve = f"visual_encoder{m}"
        sd[f"{ve}.cls_token"], sd[f"{ve}.pos_embed"] = (1, 1, D), (1, P + 1, D)
        sd[f"{ve}.patch_embed.proj.weight"], sd[f"{ve}.patch_embed.proj.bias"] = (
            (D, 3, 16, 16),
            (D,),
        )
        for i in range(12):
            b = f"{ve}.blocks.{i}"
            norm(f"{b}.norm1")
            linear(f"{b}.attn.qkv", 3 * D, D)
            linear(f"{b}.attn.proj", D, D)
            norm(f"{b}.norm2")
            linear(f"{b}.mlp.fc1", 4 * D, D)
            linear(f"{b}.mlp.fc2", D, 4 * D)
        norm(f"{ve}.norm")
        te = f"text_encoder{m}"
        emb = f"{te}.bert.embeddings"
        sd[f"{emb}.position_ids"] = (1, 512)
        sd[f"{emb}.word_embeddings.weight"] = (V, D)
        sd[f"{emb}.position_embeddings.weight"] = (512, D)
        sd[f"{emb}.token_type_embeddings.weight"] = (2, D)
        norm(f"{emb}.LayerNorm")
        for i in range(L):
            lay = f"{te}.bert.encoder.layer.{i}"
            for n in ("query", "key", "value"):
                linear(f"{lay}.attention.self.{n}", D, D)
            linear(f"{lay}.attention.output.dense", D, D)
            norm(f"{lay}.attention.output.LayerNorm")
            if i >= F:
                for n in ("query", "key", "value"):
                    linear(f"{lay}.crossattention.self.{n}", D, D)  # encoder_width 768
                linear(f"{lay}.crossattention.output.dense", D, D)
                norm(f"{lay}.crossattention.output.LayerNorm")
            linear(f"{lay}.intermediate.dense", W, D)
            linear(f"{lay}.output.dense", D, W)
            norm(f"{lay}.output.LayerNorm")
        pr = f"{te}.cls.predictions"
        sd[f"{pr}.bias"] = (V,)
        linear(f"{pr}.transform.dense", D, D)
        norm(f"{pr}.transform.LayerNorm")
        sd[f"{pr}.decoder.weight"], sd[f"{pr}.decoder.bias"] = (V, D), (V,)
        linear(f"vision_proj{m}", E, D)
        linear(f"text_proj{m}", E, D)
    linear("itm_head", 2, D)
    sd["temp"] = ()
    sd["image_queue"] = sd["text_queue"] = (E, queue)
    sd["queue_ptr"] = (1,)
    return sd


def _tagged(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Each tensor filled with its own index (expanded scalars: no memory), so where a value
    lands says which ALBEF tensor it came from."""
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        dtype = torch.long if name.endswith(("position_ids", "queue_ptr")) else torch.float32
        out[name] = torch.tensor(i + 1, dtype=dtype).expand(shape)
    return out


@pytest.fixture(scope="module")
def base_meta():
    """The base preset at ALBEF's 256 px, on the meta device (names and shapes, no memory)."""
    cfg = from_preset("base", {"vision.image_size": 256})
    with torch.device("meta"):
        model = SemMIM(cfg, load_tokenizer())
    return cfg, model.state_dict()


def test_our_base_model_in_albef_names_is_albefs_published_state_dict(base_meta):
    cfg, ours = base_meta
    published = albef_published_shapes()
    theirs = semmim_to_albef(ours, cfg)
    assert sorted(theirs) == sorted(published)
    bad = {k: (tuple(v.shape), published[k]) for k, v in theirs.items() if v.shape != published[k]}
    assert not bad


def test_every_albef_tensor_lands_in_the_right_parameter(base_meta):
    cfg, ours_meta = base_meta
    published = albef_published_shapes()
    albef = _tagged(published)
    tag = {name: int(t[(0,) * t.dim()]) for name, t in albef.items()}
    ours, unused = albef_to_semmim(albef, cfg)
    assert unused == []  # every ALBEF tensor is used (tied copies and position_ids excepted)
    for k, v in ours.items():
        assert k in ours_meta and v.shape == ours_meta[k].shape, k
    # each ALBEF tensor's values land in exactly one of our tensors
    where: dict[int, list[str]] = {}
    for k, v in ours.items():
        if all(s == 0 for s in v.stride()):  # one expanded ALBEF tensor: one value
            values = [v[(0,) * v.dim()].item()]
        else:  # fused rows (q/k/v, k/v): small, materialised by the mapping
            values = torch.unique(v).tolist()
        for t in values:
            where.setdefault(int(t), []).append(k)
    skipped = r"(decoder\.(weight|bias)|position_ids)$"
    import re

    for name, t in tag.items():
        if re.search(skipped, name):
            assert t not in where, name
        else:
            assert len(where[t]) == 1, (name, where.get(t))

    def came_from(ours_name, rows, albef_name):
        assert torch.all(ours[ours_name][rows] == tag[albef_name]), (ours_name, albef_name)

    everything = ...
    D = 768
    # read off ALBEF's architecture: layer 7 is fusion layer 1; q/k/v rows in that order
    came_from(
        "net.text.layers.0.attn.qkv.bias",
        slice(D, 2 * D),
        "text_encoder.bert.encoder.layer.0.attention.self.key.bias",
    )
    came_from(
        "net.text.layers.5.attn.qkv.weight",
        slice(2 * D, 3 * D),
        "text_encoder.bert.encoder.layer.5.attention.self.value.weight",
    )
    came_from(
        "net.fusion.layers.1.attn.qkv.weight",
        slice(0, D),
        "text_encoder.bert.encoder.layer.7.attention.self.query.weight",
    )
    came_from(
        "net.fusion.layers.1.cross.q.weight",
        everything,
        "text_encoder.bert.encoder.layer.7.crossattention.self.query.weight",
    )
    came_from(
        "net.fusion.layers.1.cross.kv.weight",
        slice(0, D),
        "text_encoder.bert.encoder.layer.7.crossattention.self.key.weight",
    )
    came_from(
        "net.fusion.layers.1.cross.kv.bias",
        slice(D, 2 * D),
        "text_encoder.bert.encoder.layer.7.crossattention.self.value.bias",
    )
    came_from(
        "ema.fusion.layers.5.norm_cross.weight",
        everything,
        "text_encoder_m.bert.encoder.layer.11.crossattention.output.LayerNorm.weight",
    )
    came_from(
        "net.fusion.layers.0.norm1.bias",
        everything,
        "text_encoder.bert.encoder.layer.6.attention.output.LayerNorm.bias",
    )
    came_from(
        "net.fusion.layers.2.mlp.0.weight",
        everything,
        "text_encoder.bert.encoder.layer.8.intermediate.dense.weight",
    )
    came_from(
        "net.text.layers.3.norm2.weight",
        everything,
        "text_encoder.bert.encoder.layer.3.output.LayerNorm.weight",
    )
    came_from("net.text.norm.bias", everything, "text_encoder.bert.embeddings.LayerNorm.bias")
    came_from(
        "net.text.token_type_embeddings.weight",
        everything,
        "text_encoder.bert.embeddings.token_type_embeddings.weight",
    )
    came_from(
        "ema.vision.blocks.11.mlp.2.weight", everything, "visual_encoder_m.blocks.11.mlp.fc2.weight"
    )
    came_from("net.vision.patch_embed.weight", everything, "visual_encoder.patch_embed.proj.weight")
    came_from("net.vision.pos_embed", everything, "visual_encoder.pos_embed")
    came_from(
        "net.mlm_head.norm.weight",
        everything,
        "text_encoder.cls.predictions.transform.LayerNorm.weight",
    )
    came_from("net.mlm_head.bias", everything, "text_encoder.cls.predictions.bias")
    came_from("ema.text_proj.weight", everything, "text_proj_m.weight")
    came_from("net.itm_head.bias", everything, "itm_head.bias")
    came_from("temp", everything, "temp")
    came_from("text_queue", everything, "text_queue")
    assert ours["image_queue"].shape == (65536, 256) and ours["queue_ptr"].shape == ()  # fmt: skip


def test_round_trips_are_the_identity(base_meta):
    """ALBEF → ours → ALBEF and ours → ALBEF → ours give back every tensor (base geometry)."""
    cfg, _ = base_meta
    published = albef_published_shapes()
    albef = _tagged(published)  # distinct values: the order of fused rows is checked too
    ours, _ = albef_to_semmim(albef, cfg)
    back = semmim_to_albef(ours, cfg)
    assert sorted(back) == sorted(albef)
    for k in albef:
        if k.endswith(("decoder.weight", "decoder.bias", "position_ids")):
            continue  # tied copies, regenerated from what they are tied to
        assert torch.equal(back[k], albef[k]), k
    again, unused = albef_to_semmim(back, cfg)
    assert unused == [] and sorted(again) == sorted(ours)
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def _tiny(seed: int, **overrides) -> SemMIM:
    torch.manual_seed(seed)
    return SemMIM(from_preset("tiny", overrides), load_tokenizer())


def _albef_file(tmp_path, model: SemMIM, drop_momentum=False, extra=None) -> str:
    sd = semmim_to_albef(model.state_dict(), model.cfg)
    if drop_momentum:
        sd = {k: v for k, v in sd.items() if "_m." not in k}
    sd.update(extra or {})
    path = str(tmp_path / "albef.pth")
    # as ALBEF's Pretrain.py saves it
    torch.save(
        {"model": sd, "optimizer": {"state": {}}, "config": {"embed_dim": 256}, "epoch": 29}, path
    )
    return path


def test_load_albef_copies_every_mapped_tensor_bit_for_bit(tmp_path):
    a, b = _tiny(0), _tiny(1)
    path = _albef_file(tmp_path, a, extra={"text_decoder.cls.bias": torch.zeros(3)})
    before = {k: v.clone() for k, v in b.state_dict().items()}
    report = load_albef(b, path)
    own_a, own_b = a.state_dict(), b.state_dict()
    for k in report.loaded:
        assert torch.equal(own_b[k], own_a[k]), k
    assert "net.text.layers.1.attn.qkv.weight" in report.loaded
    assert "ema.fusion.layers.1.cross.kv.bias" in report.loaded
    # semmim's own parts keep their initialisation; ALBEF has no momentum ITM head
    for k in ("net.head.prototypes", "net.predictor_pos", "glob_center", "id_queue"):
        assert k in report.not_in_file and torch.equal(own_b[k], before[k]), k
    assert "ema.itm_head.weight" in report.ema_from_net
    assert torch.equal(own_b["ema.itm_head.weight"], own_a["net.itm_head.weight"])
    assert report.unused == ["text_decoder.cls.bias"]
    # the tied MLM decoder follows the word embeddings
    assert b.net.mlm_head.word_embeddings.weight is b.net.text.word_embeddings.weight
    a.eval(), b.eval()
    images = torch.rand(2, 3, 64, 64)
    ids = torch.tensor([[101, 2003, 1037, 102], [101, 4937, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.itm_score(images, ids, mask), b.itm_score(images, ids, mask))
    text = report.text()
    assert "text_decoder.cls.bias" in text and "net.head.prototypes" in text


def test_a_file_without_momentum_copies_starts_the_ema_from_the_loaded_weights(tmp_path):
    a, b = _tiny(0), _tiny(1)
    report = load_albef(b, _albef_file(tmp_path, a, drop_momentum=True))
    assert "ema.vision.blocks.0.attn.qkv.weight" in report.ema_from_net
    assert torch.equal(
        b.ema.vision.blocks[0].attn.qkv.weight, a.net.vision.blocks[0].attn.qkv.weight
    )


def test_positions_are_resampled_and_other_shapes_refused_by_name(tmp_path):
    src = _tiny(0, **{"vision.image_size": 96})  # 6×6 patches; tiny is 64 px, 4×4
    report = load_albef(_tiny(1), _albef_file(tmp_path, src))
    assert report.resampled and "36 → 16" in report.resampled[0]
    wide = _tiny(2, **{"itc.embed_dim": 32})
    with pytest.raises(InitError, match=r"net\.vision_proj\.weight: \(32, 64\) in the file vs"):
        load_albef(_tiny(1), _albef_file(tmp_path, wide))


def test_queues_of_another_size_are_listed_not_loaded(tmp_path):
    src = _tiny(0, **{"itc.queue_size": 64})
    b = _tiny(1)
    queue = b.image_queue.clone()
    report = load_albef(b, _albef_file(tmp_path, src))
    assert torch.equal(b.image_queue, queue)
    assert any("image_queue" in u and "queue_size" in u for u in report.unused)


def test_bad_files_are_clear_errors(tmp_path):
    model = _tiny(0)
    with pytest.raises(InitError, match="no such file"):
        init_from(model, f"albef:{tmp_path}/missing.pth", None)
    other = str(tmp_path / "other.pth")
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(InitError, match="no ALBEF tensor in it"):
        load_albef(model, other)
    code = str(tmp_path / "code.pth")
    torch.save({"model": {"x": torch.zeros(1)}, "cls": torch.nn.Linear}, code)
    with pytest.raises(InitError, match="refused"):
        load_albef(model, code)
    with pytest.raises(ValueError, match="train.init: expected albef:FILE"):
        from semmim.run_config import TrainConfig

        TrainConfig(init="deit:x.pth")


def test_train_init_albef_cli(tmp_path, capsys):
    path = _albef_file(tmp_path, _tiny(5))
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--data", "synthetic:16:8", "--batch-size", "4"]
    common += ["--num-workers", "0", "--threads", "1", "--no-eval", "--steps", "1"]
    assert main(["train", *common, "--out", str(run), "--init", f"albef:{path}"]) == 0
    report = (run / "init_report.txt").read_text()
    assert report.startswith(f"--init albef:{path}") and "loaded: " in report
    state = torch.load(run / "checkpoints" / "step_00000001.pt", weights_only=True)
    assert state["train_config"]["init"] == f"albef:{path}"
    # a shape mismatch is exit status 2 with the tensor's name, no traceback
    small = _albef_file(tmp_path, _tiny(5, **{"text.intermediate": 128}))
    assert main(["train", *common, "--out", str(tmp_path / "r2"), "--init", f"albef:{small}"]) == 2
    err = capsys.readouterr().err
    assert "net.text.layers.0.mlp.0.weight" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "r2" / "log.csv")  # refused before a step ran
    # a missing file: refused before the data is listed or the run dir written
    assert main(["train", *common, "--out", str(tmp_path / "r3"), "--init", "albef:nope.pth"]) == 2
    assert "--init albef:nope.pth: no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r3" / "config.json")
    # fine-tuning starts from a semmim checkpoint, not from --init
    ft = [
        "finetune",
        "retrieval",
        *common,
        "--out",
        str(tmp_path / "ft"),
        "--init",
        f"albef:{path}",
    ]
    assert main(ft) == 2
    assert "starts pre-training (semmim train), not a retrieval" in capsys.readouterr().err
