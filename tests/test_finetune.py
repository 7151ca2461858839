"""Fine-tuning on the training loop: exact resume, retrieval image ids and the Karpathy spec, the
CLI (help, bad input exits 2, pretrain -> finetune -> eval round trips). Tiny preset, few steps."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from PIL import Image
from run_helpers import small_run

from semmim import from_preset
from semmim.checkpoint import load_checkpoint
from semmim.cli import main
from semmim.data import image_id
from semmim.downstream.tasks import RetrievalTask, TaskConfig, make_task, open_pairs
from semmim.train import TrainConfig, train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def _tcfg(out, **kw) -> TrainConfig:
    return small_run(out, **{"data": "synthetic:24:6", "steps": 6, **kw})


def _rows(history, keys):
    return [tuple(row[k] for k in keys) for row in history]


def test_vqa_finetune_resumes_bit_exactly(tmp_path):
    cfg = from_preset("tiny")
    straight = train(cfg, _tcfg(tmp_path / "a"), task=make_task("vqa"))
    first = train(cfg, _tcfg(tmp_path / "b", stop_at=3), task=make_task("vqa"))
    assert first["step"] == 3
    state = load_checkpoint(str(tmp_path / "b"))
    assert state["task"] == "vqa" and state["task_config"]["answers"]
    task = make_task("vqa", state["task_config"])
    second = train(cfg, _tcfg(tmp_path / "b"), resume=True, task=task)
    keys = ("loss", "vqa")
    assert _rows(first["history"], keys) + _rows(second["history"], keys) == _rows(
        straight["history"], keys
    )
    a = load_checkpoint(str(tmp_path / "a"))["model"]
    b = load_checkpoint(str(tmp_path / "b"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "b" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and "vqa" in rows[0]
    assert os.path.exists(tmp_path / "b" / "loss.png")
    with pytest.raises(ValueError, match="'vqa' run, not 'caption'"):
        train(cfg, _tcfg(tmp_path / "b"), resume=True, task=make_task("caption"))


def _karpathy(tmp_path):
    images = []
    for n, split in enumerate(["train", "train", "restval", "test", "test", "val"]):
        name = f"im{n}.jpg"
        Image.new("RGB", (16, 16), (40 * n, 10, 10)).save(tmp_path / name)
        caps = [f"picture number {n} caption {c}" for c in range(2)]
        images.append(
            {
                "filepath": "",
                "filename": name,
                "split": split,
                "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
                "cocoid": 100 + n,
                "imgid": n,
            }
        )
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_spec_and_image_ids(tmp_path):
    path = _karpathy(tmp_path)
    source = open_pairs(f"karpathy:{path}", 0.1, 0)
    assert len(source.train) == 6 and len(source.val) == 4  # train+restval / test, 2 captions
    assert {r.key for r in source.val} == {"103", "104"}
    task = RetrievalTask()
    model_cfg = task.model_config(from_preset("tiny"))
    assert (model_cfg.loss.itc, model_cfg.loss.itm, model_cfg.loss.mlm, model_cfg.loss.mim) == (
        1.0,
        1.0,
        0.0,
        0.0,
    )

    class _M:
        from semmim.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()

    collate = task.collate(_M(), source.train, 16)
    items = [
        {"image": torch.zeros(3, 8, 8), "caption": r.caption, "index": i, "label": -1}
        for i, r in enumerate(source.train)
    ]
    batch = collate(items)
    ids = batch["image_ids"].tolist()  # two captions per image: the image key's hash
    assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4] == ids[5] != ids[0]
    assert ids == [image_id(r.key) for r in source.train]


def test_finetune_help_and_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "retrieval",
        "vqa",
        "caption",
        "--ckpt",
        "--eval-data",
        "--beam-size",
        "karpathy:",
    ):
        assert word in out, word
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--task" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "segmentation"])
    assert exc.value.code == 2
    out = str(tmp_path / "x")
    for argv, needle in [
        (["finetune", "vqa", "--data", "folder:/nonexistent"], "VQA data"),
        (["finetune", "vqa", "--data", "vqa:only_one.json"], "vqa:QUESTIONS"),
        (["finetune", "caption", "--beam-size", "0"], "beam_size"),
        (["finetune", "retrieval", "--ckpt", str(tmp_path / "none")], "no checkpoint"),
        (["finetune", "caption", "--resume"], "--resume"),
        (["finetune", "caption", "--set", "vision.nope=1"], "vision.nope"),
    ]:
        assert main([*argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert "error" in err and needle in err and "Traceback" not in err, (argv, err)
    assert TaskConfig().beam_size == 3


def test_pretrain_finetune_eval_round_trip(tmp_path, capsys):
    pre = str(tmp_path / "pre")
    common = ["--data", "synthetic:16:8", "--batch-size", "4", "--num-workers", "0"]
    common += ["--threads", "1", "--eval-rerank-k", "2"]
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", pre, *common]) == 0
    capsys.readouterr()
    ret = str(tmp_path / "ret")
    assert (
        main(["finetune", "retrieval", "--ckpt", pre, "--steps", "2", "--out", ret, *common]) == 0
    )
    out = capsys.readouterr().out
    assert "fine-tuned:" in out and "zero-shot (the starting checkpoint" in out
    result = json.load(open(os.path.join(ret, "eval.json")))
    assert "itm" in result and "itm" in result["zero_shot_retrieval"]
    assert os.path.exists(os.path.join(ret, "eval.txt"))
    # zero-shot retrieval of the pre-training checkpoint through `eval --task retrieval`
    js = str(tmp_path / "zs.json")
    argv = ["eval", "--task", "retrieval", "--ckpt", pre, "--rerank-k", "2", "--json", js]
    assert main([*argv, "--num-workers", "0"]) == 0
    assert json.load(open(js))["task"] == "retrieval"
    assert main(["eval", "--task", "vqa", "--ckpt", pre, "--num-workers", "0"]) == 2
    assert "'pretrain' checkpoint" in capsys.readouterr().err

    vqa = str(tmp_path / "vqa")
    assert main(["finetune", "vqa", "--ckpt", pre, "--steps", "2", "--out", vqa, *common]) == 0
    out = capsys.readouterr().out
    assert "VQA accuracy" in out and "majority" in out
    result = json.load(open(os.path.join(vqa, "eval.json")))
    assert result["n_questions"] == 8 * 3
    sub = json.load(open(os.path.join(vqa, "vqa_results.json")))
    assert len(sub) == 24 and set(sub[0]) == {"question_id", "answer"}
    assert main(["eval", "--ckpt", vqa, "--num-workers", "0", "--json", js]) == 0
    assert json.load(open(js))["model"] == result["model"]  # the same checkpoint, same numbers

    cap = str(tmp_path / "cap")
    argv = ["finetune", "caption", "--steps", "2", "--out", cap, "--max-gen-len", "6", *common]
    assert main(argv) == 0  # from scratch (no --ckpt): the log says so
    result = json.load(open(os.path.join(cap, "eval.json")))
    assert result["n_images"] == 8
    try:
        import pycocoevalcap  # noqa: F401

        assert "CIDEr" in result and "BLEU-4" in result
    except ImportError:
        assert "pycocoevalcap" in str(result["skipped"])
    assert len(json.load(open(os.path.join(cap, "captions.json")))) == 8
    argv = ["finetune", "caption", "--resume", "--steps", "3", "--out", cap, "--no-eval", *common]
    assert main(argv) == 0
    assert "trained 3/3 steps" in capsys.readouterr().out


def test_downstream_models_build_only_their_towers_and_load_the_pretrained_net():
    """VQA / caption build the encoders they use (no EMA copy, queues, projections, predictor)
    and take the trained ``net.<part>`` weights of a pre-training checkpoint."""
    from semmim import build_model
    from semmim.downstream.models import (
        CAPTION_PARTS,
        VQA_PARTS,
        CaptionModel,
        VQAModel,
        pretrained_towers,
    )

    torch.manual_seed(0)
    cfg = from_preset("tiny")
    state = {"model": build_model(cfg).state_dict()}
    towers = pretrained_towers(cfg, state, parts=VQA_PARTS)
    assert towers.vision_proj is None and towers.predictor is None and towers.mlm_head is None
    for k, v in towers.state_dict().items():
        assert torch.equal(v, state["model"]["net." + k]), k
    vqa = VQAModel(cfg, 3, towers)
    assert {k.split(".")[0] for k in vqa.state_dict()} == {"vision", "text", "fusion", "head"}
    caption = CaptionModel(cfg, 0.1, pretrained_towers(cfg, state, parts=CAPTION_PARTS))
    assert {k.split(".")[0] for k in caption.state_dict()} == {"vision", "decoder"}
    with pytest.raises(ValueError, match="parts"):
        pretrained_towers(cfg, parts=("mlm",))  # the MLM head's decoder is the text table
